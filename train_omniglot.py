"""Meta-train Reptile on Omniglot (Nichol, Achiam & Schulman 2018), then evaluate it on meta-test characters.

    python train_omniglot.py                      # the paper's 5-way 5-shot run, logged to runs/5way5shot
    python train_omniglot.py --paper-setting 20way1shot
    python train_omniglot.py runs/x --eval-only   # evaluate the latest checkpoint of runs/x

Running the same command again resumes from the latest checkpoint of the logdir. The algorithm is in reptile.py, the
scoring of test tasks in evaluate.py and the flags in options.py; this script is the training loop, checkpoints,
TensorBoard, the final evaluation and torchrun.
"""
import argparse
import contextlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import evaluate
import fast
import lake
import omniglot
import options
import reptile
import run_folder
from models import OmniglotModel
from reptile import Hyperparameters
from utils import (UserError, WriteError, any_process, confidence_interval, find_latest_file, processes, provenance,
                   rank, read_results, reason, run_script, stop_signals, stream, training_lock, write_json)

RECENT_TASKS = 100  # the validation tasks that the logged mean accuracy and the progress bar average over
# Independent random streams, so that validation or evaluation never changes what training samples.
TRAIN_STREAM, VALIDATION_STREAM, EVALUATION_STREAM = 0, 1, 2
# torchrun's process group on each device: on CUDA the stop flag (a CPU tensor) goes through gloo, so that checking
# it each meta-iteration does not wait for the GPU.
BACKENDS = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl"}


# ----------------------------------------------------------------------------- torchrun

def join_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun, join its process group (gloo; on CUDA, nccl for CUDA tensors); rank() then tells this
    process's place in it."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    if count == 1:
        return
    if args.meta_batch < count:
        raise UserError(f"--meta-batch {args.meta_batch} leaves some of the {count} processes without a task; "
                        f"use at most {args.meta_batch} processes, or a larger --meta-batch")
    if args.eval_lake:
        raise UserError("--eval-lake runs in one process: run it with python, not torchrun")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(BACKENDS[args.device])


# ----------------------------------------------------------------------------- the run folder

def record_result(args: argparse.Namespace, result: dict, training: list[dict]) -> str:
    """Add an entry to the run's results.json (see run_folder.record_result), with the settings, the seed of its
    tasks, what evaluated it and what trained the checkpoint (`training`: its segments; empty for checkpoints written
    before they were recorded); return its key."""
    return run_folder.record_result(Path(args.logdir), {**result, "seed": args.seed,
                                                        "settings": options.saved_args(args),
                                                        "provenance": provenance(args.device),
                                                        "training": training})


# ----------------------------------------------------------------------------- evaluation

def final_evaluation(meta_model: OmniglotModel, inner_optimizer: torch.optim.Optimizer, samplers: dict,
                     args: argparse.Namespace, iteration: int, checkpoint: str, split: dict,
                     training: list[dict]) -> None:
    """Evaluate on --eval-tasks tasks of each character set (or meta-test only); print and record the accuracies."""
    hp = options.hyperparameters(args)
    mode = options.evaluation_mode(args)
    seconds = 0.0
    result = {"shots": hp.shots, "mode": mode, "meta_iteration": iteration, "checkpoint": checkpoint,
              "split": split["split"], "tasks": args.eval_tasks}
    names = ["meta-test"] if args.meta_test_only else list(samplers)
    workers = args.workers if processes() == 1 and args.device == "cpu" else 0
    # A stopped evaluation goes on from the tasks it finished (under torchrun it starts again).
    kept = {name: run_folder.unfinished_evaluation(Path(args.logdir), options.cell(args), name, iteration, args.seed,
                                                   args.eval_tasks) if processes() == 1 else None for name in names}
    with evaluate.start_pool(samplers, workers) as pool:
        for name in names:
            started = time.time()
            try:
                accuracies, _ = evaluate.score_tasks(meta_model, inner_optimizer, samplers, name, hp, args.eval_tasks,
                                                     stream(args.seed, EVALUATION_STREAM), pool, workers,
                                                     progress=rank() == 0, share=processes() > 1, keep=kept[name],
                                                     loss=options.LOSSES[args.loss])
            except KeyboardInterrupt:
                if pool is not None:
                    evaluate.stop_pool(pool)
                if kept[name] is not None and kept[name].exists():
                    print(f"the tasks evaluated so far are kept in {kept[name]}; the same command goes on from them",
                          file=sys.stderr)
                raise
            # A resumed evaluation counts the seconds of its earlier parts too.
            seconds += evaluate.kept_seconds(kept[name]) if kept[name] is not None else time.time() - started
            accuracy, interval = 100 * accuracies.mean(), 100 * confidence_interval(accuracies)
            result[name] = {"accuracy": accuracy, "ci95": interval}
            if rank() == 0:
                print(f"{name} accuracy: {accuracy:.2f}% +- {interval:.2f}% "
                      f"(95% CI, {args.eval_tasks} tasks, {hp.classes}-way {hp.shots}-shot, {mode})")
    if rank() != 0:
        return
    result["seconds"] = round(seconds, 1)
    key = record_result(args, result, training)
    print(f"recorded in {Path(args.logdir) / 'results.json'} as \"{key}\"")
    for path in kept.values():
        if path is not None:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # left by a kill while it was written


def lake_evaluation(meta_model: OmniglotModel, inner_optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                    iteration: int, checkpoint: str, split: dict, data_dir: Path, training: list[dict]) -> None:
    """Error rates on Lake et al.'s one-shot runs, both ways of classifying; printed and recorded in results.json."""
    started = time.time()
    seeds = evaluate.task_seeds(lake.REPEATS, stream(args.seed, EVALUATION_STREAM))
    errors = lake.benchmark(meta_model, inner_optimizer.state_dict(), split, data_dir,
                            args.omniglot_mirror, options.hyperparameters(args), seeds, args.logdir, iteration)
    record_result(args, {"meta_iteration": iteration, "checkpoint": checkpoint, "split": split["split"],
                         "repeats": lake.REPEATS, **errors, "seconds": round(time.time() - started, 1)}, training)


# ----------------------------------------------------------------------------- the program

def main(argv: list[str]) -> int:
    args = options.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    join_torchrun(args)  # under torchrun, only the first process (rank 0) writes logs, checkpoints and results
    try:
        if args.eval_only:
            return evaluate_checkpoint(args)
        # One training process per run folder: under torchrun the first process holds it for all of them.
        with training_lock(Path(args.logdir)) if rank() == 0 else contextlib.nullcontext():
            return train(args, argv)
    finally:
        # Left to the interpreter's exit, gloo's worker threads sometimes abort the process (SIGABRT).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def load_samplers(args: argparse.Namespace) -> tuple[dict, dict, Path]:
    """The run's task samplers {"meta-test": ..., "meta-train": ...}, its split, and the data folder."""
    if rank() != 0:
        torch.distributed.barrier()  # the first process prepares the data folder alone
    data_dir = omniglot.prepare_data(args.data, args.omniglot_mirror)
    train_sampler, test_sampler, split = run_folder.load_split(Path(args.logdir), data_dir, args.split, args.seed,
                                                               args.device, args.split_from)
    if rank() == 0 and processes() > 1:
        torch.distributed.barrier()
    return {"meta-test": test_sampler, "meta-train": train_sampler}, split, data_dir


def new_model(args: argparse.Namespace) -> OmniglotModel:
    """The meta-model at its seeded initialisation, on the run's device."""
    torch.manual_seed(args.seed)
    return fast.prepare_model(OmniglotModel(args.classes, maml=args.model == "maml"), args.device)


def all_finite(tensors) -> bool:
    """Whether every value of the tensors is finite (one check; a sum overflows only on absurd magnitudes)."""
    return bool(torch.stack([tensor.detach().sum() for tensor in tensors]).isfinite().all())


def evaluate_checkpoint(args: argparse.Namespace) -> int:
    """--eval-only and --eval-lake: evaluate a checkpoint of the run and record the result."""
    checkpoint_path = args.checkpoint or find_latest_file(Path(args.logdir) / "checkpoint")
    if checkpoint_path is None:
        raise UserError(f"--eval-only: {args.logdir} holds no checkpoint; train first, or give --checkpoint FILE")
    state = run_folder.load_checkpoint(checkpoint_path)
    samplers, split, data_dir = load_samplers(args)
    meta_model = new_model(args)
    meta_model.load_state_dict(state["meta_net"])
    inner_optimizer = reptile.MetaLearner(meta_model, options.hyperparameters(args)).inner_optimizer
    inner_optimizer.load_state_dict(state["inner_optimizer"])
    if rank() == 0:
        print(f"evaluating {checkpoint_path} (meta-iteration {state['meta_iteration']})")
    training = state.get("segments", [])
    if args.eval_lake:
        lake_evaluation(meta_model, inner_optimizer, args, state["meta_iteration"], checkpoint_path, split, data_dir,
                        training)
    else:
        final_evaluation(meta_model, inner_optimizer, samplers, args, state["meta_iteration"], checkpoint_path, split,
                         training)
    return 0


def resume(logdir: Path, meta_model: OmniglotModel, meta_optimizer: torch.optim.Optimizer,
           inner_optimizer: torch.optim.Optimizer, generators: dict, recent: dict) -> tuple[int, list[dict]]:
    """Load the run's newest good checkpoint into the models, optimizers, generators and recent accuracies; return
    its meta-iteration and the segments of training so far (0 and none for a new run)."""
    state = run_folder.latest_good_checkpoint(logdir)
    if state is None:
        return 0, []
    trained_by = 1 + len(state.get("other_processes", []))
    if trained_by != processes():
        raise UserError(f"{logdir} was trained by {trained_by} process(es); resume it with as many "
                        f"(torchrun --nproc_per_node={trained_by}, or python for 1)")
    own = ([state] + state.get("other_processes", []))[rank()]  # under torchrun, each process its own inner state
    meta_model.load_state_dict(state["meta_net"])
    meta_optimizer.load_state_dict(state["meta_optimizer"])
    inner_optimizer.load_state_dict(own["inner_optimizer"])
    for name, generator in generators.items():
        generator.set_state(own["generators"][name])
    recent.update(state.get("recent_accuracies", {}))  # checkpoints from before the mean was logged lack it
    return state["meta_iteration"], state.get("segments", [])  # older checkpoints lack segments


def already_evaluated(args: argparse.Namespace, iteration: int) -> bool:
    """Whether results.json holds this finished run's evaluation (said when it does)."""
    result = run_folder.find_result(read_results(Path(args.logdir)), args.shots,
                                    options.evaluation_mode(args), iteration, args.eval_tasks, args.seed)
    if result is not None and rank() == 0:
        accuracy = result["meta-test"]
        print(f"training is complete and {Path(args.logdir) / 'results.json'} holds its {options.cell(args)} "
              f"evaluation (meta-test accuracy {accuracy['accuracy']:.2f}% +- {accuracy['ci95']:.2f}%); "
              f"use --eval-only to evaluate again")
    return result is not None


def check_finite(done: int, meta_model: OmniglotModel, inner_optimizer: torch.optim.Optimizer,
                 hp: Hyperparameters, logdir: Path) -> None:
    """Stop the run with one line if the meta-weights or the inner optimizer's state are no longer finite."""
    if not all_finite([*meta_model.parameters(), *(value for state in inner_optimizer.state.values()
                                                   for value in state.values() if isinstance(value, torch.Tensor))]):
        raise UserError(f"by meta-iteration {done}, the meta-weights or the inner optimizer's state became "
                        f"NaN or infinite; the inner learning rate (--lr {hp.lr}) or the meta-step "
                        f"(--meta-lr {hp.meta_lr}) is likely too large. Nothing non-finite was written "
                        f"({run_folder.kept(logdir)}); train with smaller values in a new logdir")


def validate(scorer: evaluate.TestTaskScorer, samplers: dict, generator: torch.Generator, recent: dict,
             writer: SummaryWriter, done: int, step_size: float) -> None:
    """Score one new test task of each character set and log it, the mean of the recent ones, and the meta-step."""
    for name, sampler in samplers.items():
        accuracy, loss = evaluate.score_new_task(scorer, sampler, generator)
        recent[name] = (recent[name] + [accuracy])[-RECENT_TASKS:]
        writer.add_scalar(f"{name}/accuracy", accuracy, done)
        writer.add_scalar(f"{name}/loss", loss, done)
        writer.add_scalar(f"{name}/accuracy_mean{RECENT_TASKS}", np.mean(recent[name]), done)
    writer.add_scalar("meta-step", step_size, done)


def train(args: argparse.Namespace, argv: list[str]) -> int:
    """Meta-train from the run's newest checkpoint (or the start) to --meta-iterations, then evaluate."""
    hp = options.hyperparameters(args)
    logdir = Path(args.logdir)
    samplers, split, _ = load_samplers(args)
    meta_model = new_model(args)
    meta_learner = reptile.MetaLearner(meta_model, hp, options.LOSSES[args.loss], args.side_by_side)
    inner_optimizer, meta_optimizer = meta_learner.inner_optimizer, meta_learner.meta_optimizer
    # Under torchrun each process draws its own tasks and keeps its own inner Adam state.
    generators = {"train": stream(args.seed, TRAIN_STREAM, rank() if processes() > 1 else None),
                  "validation": stream(args.seed, VALIDATION_STREAM)}
    recent = {"meta-train": [], "meta-test": []}  # accuracies of the last RECENT_TASKS validation tasks
    start, segments = resume(logdir, meta_model, meta_optimizer, inner_optimizer, generators, recent)
    if start and rank() == 0:
        print(f"resumed {logdir} at meta-iteration {start} of {hp.meta_iterations}")
    if start >= hp.meta_iterations and already_evaluated(args, start):
        return 0
    if rank() == 0:
        write_json(logdir / "args.json", options.saved_args(args))
        write_json(logdir / "split.json", split)
    segment = {"from": start, "to": start, "processes": processes(), **provenance(args.device)}
    segments = segments + [segment]  # the parts of the training so far, each with what trained it
    checkpoint_path = str(logdir / "checkpoint" / f"check-{start}.pth")
    resume_command = f"{'python' if processes() == 1 else f'torchrun --nproc_per_node={processes()}'} " \
                     f"train_omniglot.py {shlex.join(argv)}"
    # Under torchrun each process adapts its share of the tasks (5 over 2 processes: 3 and 2), and one all-reduce
    # sums the shares into the mean.
    share = len(range(rank(), hp.meta_batch, processes()))
    meta_iteration = fast.MetaIteration(meta_learner, samplers["meta-train"], share, args.cuda_graphs)
    scorer = None  # made at the first validation, when the inner optimizer has a state
    all_reduce = torch.distributed.all_reduce if processes() > 1 else None
    progress = tqdm(initial=start, total=hp.meta_iterations, desc="meta-training", unit="it", dynamic_ncols=True,
                    disable=rank() != 0)
    writer = None
    try:
        with stop_signals() as interrupted:
            # Points logged after the checkpoint by an interrupted run are dropped, so none is duplicated.
            writer = SummaryWriter(str(logdir), purge_step=start + 1) if rank() == 0 else None
            for iteration in range(start, hp.meta_iterations):
                step_size = reptile.meta_step_size(iteration, hp)
                meta_iteration(step_size, generators["train"], all_reduce)
                done = iteration + 1
                progress.update()
                stop = any_process(bool(interrupted))
                saving = done % args.check_every == 0 or done == hp.meta_iterations or stop
                # Checked when validating and before saving, not every meta-iteration: on a GPU a check waits.
                if done % args.validate_every == 0 or saving:
                    check_finite(done, meta_model, inner_optimizer, hp, logdir)
                if done % args.validate_every == 0 and rank() == 0:
                    scorer = scorer or evaluate.TestTaskScorer(meta_model, inner_optimizer.state_dict(), hp,
                                                               loss=options.LOSSES[args.loss],
                                                               cuda_graphs=args.cuda_graphs)
                    validate(scorer, samplers, generators["validation"], recent, writer, done, step_size)
                    progress.set_postfix({f"{name} acc": f"{np.mean(accs):.3f}" for name, accs in recent.items()})
                if saving:
                    if writer:
                        writer.flush()  # waits until every logged point is on disk (tensorboardX's does not)
                    segment["to"] = done
                    checkpoint_path = str(run_folder.save_checkpoint(
                        logdir, done, meta_model, meta_optimizer, inner_optimizer, generators, recent,
                        options.saved_args(args), args.keep, segments, args.device))
                if stop:
                    progress.close()
                    if rank() == 0:
                        print(f"interrupted at meta-iteration {done}; checkpoint saved to {checkpoint_path}\n"
                              f"resume with: {resume_command}", file=sys.stderr)
                    return 128 + (interrupted[0] if interrupted else signal.SIGTERM)
    except OSError as error:  # TensorBoard's writer could not write its events (a full disk, no permission)
        raise UserError(f"cannot write the TensorBoard events in {logdir} ({reason(error)}); "
                        f"{run_folder.kept(logdir)}; once the cause is fixed, resume with: {resume_command}") from None
    except WriteError as error:
        raise UserError(f"{error}; {run_folder.kept(logdir)}; once the cause is fixed, resume with: "
                        f"{resume_command}") from None
    finally:
        progress.leave = sys.exc_info()[0] is None  # an error's one line takes the progress bar's place
        progress.close()
        if writer:
            with contextlib.suppress(OSError):  # already reported
                writer.close()

    trained = [part for part in segments if part["to"] > part["from"]]  # not a start that found training complete
    final_evaluation(meta_model, inner_optimizer, samplers, args, hp.meta_iterations, checkpoint_path, split, trained)
    return 0


def run(argv: list[str]) -> int:
    """main(), with a problem the user can fix reported in one line (status 2) and Ctrl-C as status 130."""
    return run_script(main, argv, "train_omniglot.py")


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
