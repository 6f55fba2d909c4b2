"""Carry a checkpoint meta-trained with the inner loss averaged over each mini-batch over to the summed loss.

    python rescale_adam.py OLD.pth NEW.pth --batch 10

The paper's code sums the inner loss over the mini-batch; this project averaged it until commit a77c55f. A summed
loss makes every gradient `--batch` times larger, which Adam's steps do not see (up to its epsilon) but its second
moments do: they hold `--batch` squared times more. This multiplies the inner Adam's second moments (`exp_avg_sq`) of
every process by that, and changes nothing else, so that a run trained with means goes on (and is evaluated) as if it
had summed. It was applied once, by hand, to the three checkpoints that commit a77c55f changed:
runs/5way/checkpoint/check-100000.pth (--batch 10), runs/20way/checkpoint/check-20006.pth and
runs/20way-background/checkpoint/check-20008.pth (--batch 20); tests/test_rescale_adam.py re-does it from their
earlier versions in git history and finds the committed files, byte for byte.
"""
import copy
import sys

import options
import run_folder
from utils import HelpFormatter, OneLineParser, UserError, positive_int, run_script, save_atomically


def rescale(state: dict, batch: int) -> dict:
    """A copy of the checkpoint `state` with the second moments of each process's inner Adam times batch squared."""
    state = copy.deepcopy(state)
    for inner in [state, *state.get("other_processes", [])]:
        for moments in inner["inner_optimizer"]["state"].values():
            moments["exp_avg_sq"] = moments["exp_avg_sq"] * batch ** 2
    return state


def main(argv: list[str]) -> int:
    parser = OneLineParser(prog="rescale_adam.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint of a run trained with the averaged inner loss")
    parser.add_argument("output", help="where to write the rescaled checkpoint (never the same file)")
    parser.add_argument("--batch", type=positive_int, required=True, help="the run's inner mini-batch size (--batch)")
    args = parser.parse_args(argv)
    if args.output == args.checkpoint:
        raise UserError("give another output file: the checkpoint itself stays as it is")
    state = run_folder.load_checkpoint_file(args.checkpoint, options.PROGRAM, "train_omniglot.py")
    if state["inner_optimizer"]["param_groups"][0].get("betas") is None:
        raise UserError(f"{args.checkpoint}'s inner optimizer is not Adam: there is nothing to rescale")
    save_atomically(args.output, rescale(state, args.batch))
    print(f"wrote {args.output}: the inner Adam's second moments of {args.checkpoint} times {args.batch ** 2}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:], "rescale_adam.py"))
