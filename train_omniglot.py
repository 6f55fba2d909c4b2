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
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import evaluate
import fast
import lake
import omniglot
import options
import reptile
from models import OmniglotModel
from reptile import Hyperparameters
from run_folder import RunFolder, Training
from utils import (UserError, any_process, confidence_interval, gather, processes, rank, run_script,
                   stream, write_json)

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
    """Add an entry to the run's results.json under a key that says what it measured (evaluate.result_key), with the
    seed of its tasks (RunFolder.record_evaluation); return its key."""
    entry = {**result, "seed": args.seed}
    return options.folder(args.logdir).record_evaluation(evaluate.result_key(entry), entry, options.saved_args(args),
                                                         training, args.device)


def save_checkpoint(folder: RunFolder, iteration: int, meta_learner: reptile.MetaLearner, generators: dict,
                    recent: dict, args: argparse.Namespace, segments: list[dict]) -> Path:
    """Write the checkpoint of meta-iteration `iteration` (RunFolder.write_checkpoint). Under torchrun only the first
    process writes, with the inner state and random streams of every process."""
    own = {"inner_optimizer": meta_learner.inner_optimizer.state_dict(),
           "generators": {name: generator.get_state() for name, generator in generators.items()}}
    first, *others = gather(own)
    if rank() != 0:
        return folder.checkpoint_folder / f"check-{iteration}.pth"
    return folder.write_checkpoint(iteration, {
        "model": meta_learner.model.state_dict(),
        "meta_optimizer": meta_learner.meta_optimizer.state_dict(),
        **first,
        "other_processes": others,  # under torchrun: the inner state of the processes after the first
        "recent_accuracies": recent,  # the validation accuracies that the next logged means average over
        "args": options.saved_args(args),
        "segments": segments,
    }, args.keep, args.device)


# ----------------------------------------------------------------------------- evaluation

def final_evaluation(meta_model: OmniglotModel, inner_optimizer: torch.optim.Optimizer, samplers: dict,
                     args: argparse.Namespace, iteration: int, checkpoint: str, split: dict,
                     training: list[dict]) -> None:
    """Evaluate on --eval-tasks tasks of each character set (or meta-test only); print and record the accuracies."""
    hp = options.hyperparameters(args)
    mode = evaluate.evaluation_mode(args.transductive)
    seconds = 0.0
    result = {"shots": hp.shots, "mode": mode, "meta_iteration": iteration, "checkpoint": checkpoint,
              "split": split["split"], "tasks": args.eval_tasks}
    names = ["meta-test"] if args.meta_test_only else list(samplers)
    workers = args.workers if processes() == 1 and args.device == "cpu" else 0
    # A stopped evaluation goes on from the tasks it finished (under torchrun it starts again).
    cell = evaluate.cell(args.shots, args.transductive)
    kept = {name: evaluate.unfinished_evaluation(Path(args.logdir), cell, name, iteration, args.seed, args.eval_tasks)
            if processes() == 1 else None for name in names}
    with evaluate.start_pool(samplers, workers) as pool:
        for name in names:
            try:
                accuracies, _, spent = evaluate.score_tasks(
                    meta_model, inner_optimizer, samplers, name, hp, args.eval_tasks,
                    stream(args.seed, EVALUATION_STREAM), pool, workers, progress=rank() == 0,
                    share=processes() > 1, keep=kept[name], loss=options.LOSSES[args.loss])
            except KeyboardInterrupt:
                if pool is not None:
                    evaluate.stop_pool(pool)
                if kept[name] is not None and kept[name].exists():
                    print(f"the tasks evaluated so far are kept in {kept[name]}; the same command goes on from them",
                          file=sys.stderr)
                raise
            seconds += spent
            accuracy, interval = 100 * accuracies.mean(), 100 * confidence_interval(accuracies)
            result[name] = {"accuracy": accuracy, "ci95": interval}
            if rank() == 0:
                print(f"{name} accuracy: {accuracy:.2f}% +- {interval:.2f}% "
                      f"(95% CI, {args.eval_tasks} tasks, {hp.classes}-way {hp.shots}-shot, {mode})")
    if rank() != 0:
        return
    result["seconds"] = round(seconds, 1)
    record_result(args, result, training)
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
            status = evaluate_checkpoint(args)
        else:
            # One training process per run folder: under torchrun the first process holds it for all of them.
            with options.folder(args.logdir).training_lock() if rank() == 0 else contextlib.nullcontext():
                status = train(args, argv)
        if processes() > 1:
            # No process tears the group down while another still reads its last messages (gloo's threads would
            # abort that process).
            torch.distributed.barrier()
        return status
    finally:
        # Left to the interpreter's exit, gloo's worker threads sometimes abort the process (SIGABRT).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def load_samplers(args: argparse.Namespace) -> tuple[dict, dict, Path]:
    """The run's task samplers {"meta-test": ..., "meta-train": ...}, its split, and the data folder."""
    if rank() != 0:
        torch.distributed.barrier()  # the first process prepares the data folder alone
    data_dir = omniglot.prepare_data(args.data, args.omniglot_mirror)
    train_sampler, test_sampler, split = omniglot.load_split(Path(args.logdir), data_dir, args.split, args.seed,
                                                               args.device, args.split_from)
    if rank() == 0 and processes() > 1:
        torch.distributed.barrier()
    return {"meta-test": test_sampler, "meta-train": train_sampler}, split, data_dir


def new_model(args: argparse.Namespace) -> OmniglotModel:
    """The meta-model at its seeded initialisation, on the run's device."""
    torch.manual_seed(args.seed)
    return fast.prepare_model(OmniglotModel(args.classes, maml=args.model == "maml"), args.device)


def evaluate_checkpoint(args: argparse.Namespace) -> int:
    """--eval-only and --eval-lake: evaluate a checkpoint of the run and record the result."""
    folder = options.folder(args.logdir)
    state = folder.checkpoint_to_evaluate(args.checkpoint)
    checkpoint_path = state["path"]
    samplers, split, data_dir = load_samplers(args)
    meta_model = new_model(args)
    meta_model.load_state_dict(state["model"])
    inner_optimizer = reptile.MetaLearner(meta_model, options.hyperparameters(args)).inner_optimizer
    inner_optimizer.load_state_dict(state["inner_optimizer"])
    if rank() == 0:
        print(f"evaluating {checkpoint_path} (meta-iteration {state['meta_iteration']})")
    training = state["segments"]
    if args.eval_lake:
        lake_evaluation(meta_model, inner_optimizer, args, state["meta_iteration"], checkpoint_path, split, data_dir,
                        training)
    else:
        final_evaluation(meta_model, inner_optimizer, samplers, args, state["meta_iteration"], checkpoint_path, split,
                         training)
    return 0


def resume(folder: RunFolder, meta_learner: reptile.MetaLearner, generators: dict,
           recent: dict) -> tuple[int, list[dict]]:
    """Load the run's newest good checkpoint into the meta-learner, generators and recent accuracies; return its
    meta-iteration and the segments of training so far (0 and none for a new run)."""
    state = folder.newest_good_checkpoint()
    if state is None:
        return 0, []
    trained_by = 1 + len(state.get("other_processes", []))
    if trained_by != processes():
        raise UserError(f"{folder.path} was trained by {trained_by} process(es); resume it with as many "
                        f"(torchrun --nproc_per_node={trained_by}, or python for 1)")
    own = ([state] + state.get("other_processes", []))[rank()]  # under torchrun, each process its own inner state
    meta_learner.model.load_state_dict(state["model"])
    meta_learner.meta_optimizer.load_state_dict(state["meta_optimizer"])
    meta_learner.inner_optimizer.load_state_dict(own["inner_optimizer"])
    for name, generator in generators.items():
        generator.set_state(own["generators"][name])
    recent.update(state.get("recent_accuracies", {}))  # checkpoints from before the mean was logged lack it
    return state["meta_iteration"], state["segments"]


def already_evaluated(args: argparse.Namespace, iteration: int) -> bool:
    """Whether results.json holds this finished run's evaluation (said when it does)."""
    folder = options.folder(args.logdir)
    result = evaluate.find_result(folder.results(), args.shots, evaluate.evaluation_mode(args.transductive), iteration,
                                  args.eval_tasks, args.seed)
    if result is not None and rank() == 0:
        accuracy = result["meta-test"]
        folder.say_complete(f"its {evaluate.cell(args.shots, args.transductive)} evaluation (meta-test accuracy "
                            f"{accuracy['accuracy']:.2f}% +- {accuracy['ci95']:.2f}%)")
    return result is not None


def check_finite(done: int, meta_model: OmniglotModel, inner_optimizer: torch.optim.Optimizer,
                 hp: Hyperparameters, folder: RunFolder) -> None:
    """Stop the run with one line if the meta-weights or the inner optimizer's state are no longer finite."""
    tensors = [*meta_model.parameters(), *(value for state in inner_optimizer.state.values()
                                           for value in state.values() if isinstance(value, torch.Tensor))]
    # One check of the sums, not of every value: a sum overflows only on absurd magnitudes.
    if not torch.stack([tensor.detach().sum() for tensor in tensors]).isfinite().all():
        raise UserError(f"by meta-iteration {done}, the meta-weights or the inner optimizer's state became "
                        f"NaN or infinite; the inner learning rate (--lr {hp.lr}) or the meta-step "
                        f"(--meta-lr {hp.meta_lr}) is likely too large. Nothing non-finite was written "
                        f"({folder.what_is_kept()}); train with smaller values in a new logdir")


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
    folder = options.folder(args.logdir)
    samplers, split, _ = load_samplers(args)
    meta_model = new_model(args)
    meta_learner = reptile.MetaLearner(meta_model, hp, options.LOSSES[args.loss], args.side_by_side)
    # Under torchrun each process draws its own tasks and keeps its own inner Adam state.
    generators = {"train": stream(args.seed, TRAIN_STREAM, rank() if processes() > 1 else None),
                  "validation": stream(args.seed, VALIDATION_STREAM)}
    recent = {"meta-train": [], "meta-test": []}  # accuracies of the last RECENT_TASKS validation tasks
    start, segments = resume(folder, meta_learner, generators, recent)
    if start and rank() == 0:
        folder.say_resumed(start, hp.meta_iterations)
    if start >= hp.meta_iterations and already_evaluated(args, start):
        return 0
    if rank() == 0:
        folder.write_args(options.saved_args(args))
        write_json(folder.path / "split.json", split)
    resume_command = f"{'python' if processes() == 1 else f'torchrun --nproc_per_node={processes()}'} " \
                     f"train_omniglot.py {shlex.join(argv)}"
    # Under torchrun each process adapts its share of the tasks (5 over 2 processes: 3 and 2), and one all-reduce
    # sums the shares into the mean.
    share = len(range(rank(), hp.meta_batch, processes()))
    meta_iteration = fast.MetaIteration(meta_learner, samplers["meta-train"], share, args.cuda_graphs)
    scorer = None  # made at the first validation, when the inner optimizer has a state
    all_reduce = torch.distributed.all_reduce if processes() > 1 else None
    with Training(folder, start, hp.meta_iterations, segments, args.device, resume_command, args.check_every,
                  "meta-training", writes=rank() == 0, any_process=any_process, processes=processes()) as training:
        for iteration in range(start, hp.meta_iterations):
            step_size = reptile.meta_step_size(iteration, hp)
            meta_iteration(step_size, generators["train"], all_reduce)
            done = iteration + 1
            saving = training.done(done)
            # Checked when validating and before saving, not every meta-iteration: on a GPU a check waits.
            if done % args.validate_every == 0 or saving:
                check_finite(done, meta_model, meta_learner.inner_optimizer, hp, folder)
            if done % args.validate_every == 0 and rank() == 0:
                scorer = scorer or evaluate.TestTaskScorer(meta_model, meta_learner.inner_optimizer.state_dict(), hp,
                                                           loss=options.LOSSES[args.loss],
                                                           cuda_graphs=args.cuda_graphs)
                validate(scorer, samplers, generators["validation"], recent, training.writer, done, step_size)
                training.progress.set_postfix({f"{name} acc": f"{np.mean(accs):.3f}" for name, accs in recent.items()})
            if saving:
                training.save(done, lambda segments: save_checkpoint(folder, done, meta_learner, generators, recent,
                                                                     args, segments))
            if training.stop:
                return training.interrupted(done)
    final_evaluation(meta_model, meta_learner.inner_optimizer, samplers, args, hp.meta_iterations,
                     str(training.checkpoint), split, training.trained())
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:], "train_omniglot.py"))
