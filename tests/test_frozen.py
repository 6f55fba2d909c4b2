"""What the code computed before reptile.py became dataset-free and evaluation one scorer (frozen on CPU in
tests/frozen/values.json by `python tests/test_frozen.py`): the same inputs must give the same floats, bit for bit."""
import hashlib
import json
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import lake  # noqa: E402
import options  # noqa: E402
import run_folder  # noqa: E402
import train_omniglot as T  # noqa: E402
import utils  # noqa: E402

FROZEN = Path(__file__).resolve().parent / "frozen" / "values.json"
CHECKPOINT = ROOT / "runs/5way-exact-split/checkpoint/check-100000.pth"
LAKE_CHECKPOINT = ROOT / "runs/20way-background/checkpoint/check-200000.pth"
RUNS = {  # five meta-iterations from the seeded start, a validation task of each set after each
    "adam": [],
    "fomaml with tail, sgd, weight decay, replacement": ["--algorithm", "fomaml", "--fomaml-tail", "2",
                                                         "--inner-optimizer", "sgd", "--lr", "0.01",
                                                         "--weight-decay", "0.999", "--replacement"],
}
EVALUATIONS = {"1-shot": ["--shots", "1"], "5-shot": ["--shots", "5"], "1-shot transductive": ["--shots", "1",
                                                                                               "--transductive"]}


def digest(state: dict) -> str:
    """A sha256 of every tensor of a state dict, in order: equal only if every bit is."""
    hashed = hashlib.sha256()
    for value in state.values():
        hashed.update(value.detach().cpu().contiguous().numpy().tobytes())
    return hashed.hexdigest()


def scalars(logdir: Path) -> dict:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [point.value for point in events.Scalars(tag)] for tag in sorted(events.Tags()["scalars"])}


def meta_training(data_dir: Path, folder: Path) -> dict:
    """Each run's meta-weights (digest) and inner optimizer state (digest) after 5 meta-iterations, and its
    validation scores, through the command line."""
    found = {}
    for name, flags in RUNS.items():
        logdir = folder / name.replace(" ", "_").replace(",", "")
        status = T.run([str(logdir), "--data", str(data_dir), "--device", "cpu", "--meta-iterations", "5",
                        "--validate-every", "1", "--eval-tasks", "2", "--meta-test-only", "--workers", "1", *flags])
        assert status == 0
        state = torch.load(logdir / "checkpoint" / "check-5.pth", weights_only=True)
        found[name] = {"meta-weights": digest(state["meta_net"]),
                       "inner state": digest({f"{key}{name}": value for key, moments in
                                              state["inner_optimizer"]["state"].items()
                                              for name, value in moments.items()}),
                       "validation": {tag: values for tag, values in scalars(logdir).items()
                                      if tag.split("/")[-1] in ("accuracy", "loss")}}
    return found


def scored_tasks(data_dir: Path) -> dict:
    """(correct queries, loss) of 50 meta-test tasks of runs/5way-exact-split, each way of evaluating."""
    state = run_folder.load_checkpoint(str(CHECKPOINT))
    sampler = run_folder.load_split(ROOT / "runs/5way-exact-split", data_dir, "paper", 0, "cpu")[1]
    found = {}
    for name, flags in EVALUATIONS.items():
        args = options.parse_args([str(ROOT / "runs/5way-exact-split"), "--eval-only", "--data", str(data_dir),
                                   "--device", "cpu", *flags])
        meta_model = T.new_model(args)[0]
        meta_model.load_state_dict(state["meta_net"])
        seeds = evaluate.task_seeds(50, utils.stream(0, T.EVALUATION_STREAM))
        hp = options.hyperparameters(args)
        for form, together in (("", False), (", side by side", True)):
            found[name + form] = evaluate.evaluate_tasks(meta_model, state["inner_optimizer"], sampler, hp, seeds,
                                                         together)
    return found


def lake_run(data_dir: Path, mirror: Path) -> dict:
    """The error rates of runs/20way-background on Lake's run01, after each of its 10 adaptations."""
    state = run_folder.load_checkpoint(str(LAKE_CHECKPOINT))
    args = options.parse_args([str(ROOT / "runs/20way-background"), "--eval-lake", "--data", str(data_dir),
                               "--device", "cpu"])
    meta_model, _, inner_optimizer = T.new_model(args)
    meta_model.load_state_dict(state["meta_net"])
    runs = lake.load_runs(data_dir, str(mirror))
    seeds = evaluate.task_seeds(lake.REPEATS, utils.stream(0, T.EVALUATION_STREAM))
    errors = lake.error_rates(meta_model, state["inner_optimizer"], {"run01": runs["run01"]},
                              options.hyperparameters(args), seeds)
    return {mode: table.tolist() for mode, table in errors.items()}


def compute(data_dir: Path, mirror: Path, folder: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return json.loads(json.dumps({"meta-training": meta_training(data_dir, folder),
                                      "test tasks": scored_tasks(data_dir), "lake run01": lake_run(data_dir, mirror)}))
    finally:
        torch.set_num_threads(threads)


def test_the_code_computes_what_it_computed_when_frozen(data_dir, mirror, tmp_path):
    frozen = json.loads(FROZEN.read_text())
    now = compute(data_dir, mirror, tmp_path)
    for part in frozen:
        for name in frozen[part]:
            assert now[part][name] == frozen[part][name], (part, name)


if __name__ == "__main__":  # python tests/test_frozen.py DATA_DIR MIRROR: freeze what the code computes now
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        FROZEN.write_text(json.dumps(compute(Path(sys.argv[1]), Path(sys.argv[2]), Path(folder)), indent=1) + "\n")
    print(f"wrote {FROZEN}")
