"""Meta-train Reptile on Omniglot (Nichol, Achiam & Schulman 2018), then evaluate it on meta-test characters.

    python train_omniglot.py                      # the paper's 5-way 5-shot run, logged to runs/5way5shot
    python train_omniglot.py runs/x --eval-only   # evaluate the latest checkpoint of runs/x

Running the same command again resumes from the latest checkpoint of the logdir.
"""
import argparse
import contextlib
import copy
import math
import os
import shlex
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import omniglot
from models import OmniglotModel
from utils import (UserError, checkpoint_iteration, find_latest_file, list_checkpoints, non_negative_float,
                   non_negative_int, positive_float, positive_int, read_json, write_atomically, write_json)

PROGRAM = "reptile-omniglot"  # marks checkpoints written by this script
# Flags that fix what a run learns: a resumed run must keep them (--meta-iterations may grow).
TRAINING_FLAGS = ("classes", "shots", "train_shots", "meta_batch", "iterations", "batch", "lr", "meta_lr",
                  "meta_lr_final", "split", "seed")
# Flags that fix the model and its characters: evaluation must keep them too.
MODEL_FLAGS = ("classes", "split")
NOT_SAVED = ("logdir", "eval_only", "eval_lake", "checkpoint")
# Flags that belong to the machine, not the run: recorded in args.json but never taken from it.
MACHINE_FLAGS = ("device", "workers")
LAKE_REPEATS = 10  # adaptations to each run of Lake's benchmark, each with its own mini-batch order
TASKS_TOGETHER = 500  # evaluation tasks adapted side by side on a GPU (20-way 5-shot: about 20 GB)
# Independent random streams, so that validation or evaluation never changes what training samples.
TRAIN_STREAM, VALIDATION_STREAM, EVALUATION_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------- configuration

class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none or its help already tells it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line; the defaults are the paper's 5-way 5-shot Omniglot setting."""
    parser = OneLineParser(prog="train_omniglot.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                           formatter_class=HelpFormatter)
    parser.add_argument("logdir", nargs="?", help="run folder for TensorBoard events, checkpoints and results "
                        "(default: runs/<classes>way<shots>shot)")
    task = parser.add_argument_group("task")
    task.add_argument("--classes", type=positive_int, default=5, help="classes per task (N-way)")
    task.add_argument("--shots", type=positive_int, default=5, help="support images per class at meta-test (K-shot)")
    task.add_argument("--train-shots", type=positive_int, default=10, help="images per class in a meta-training task")
    task.add_argument("--split", choices=("paper", "background"), default="paper",
                      help="paper: 1,200 random characters train, 423 test (with --seed 0 the paper's own); "
                      "background: background alphabets train, evaluation alphabets test")
    meta = parser.add_argument_group("meta-training")
    meta.add_argument("--meta-batch", type=positive_int, default=5, help="tasks per meta-iteration")
    meta.add_argument("--meta-iterations", type=positive_int, default=100000, help="meta-iterations in all")
    meta.add_argument("--iterations", type=positive_int, default=5, help="inner Adam steps per task")
    meta.add_argument("--batch", type=positive_int, default=10, help="inner mini-batch size")
    meta.add_argument("--lr", type=positive_float, default=0.001, help="inner Adam learning rate (betas 0, 0.999)")
    meta.add_argument("--meta-lr", type=positive_float, default=1.0, help="meta-step size at the start")
    meta.add_argument("--meta-lr-final", type=non_negative_float, default=0.0,
                      help="meta-step size at the end (annealed linearly)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--test-iterations", type=positive_int, default=50, help="Adam steps on a test task")
    evaluation.add_argument("--test-batch", type=positive_int, default=5, help="mini-batch size on a test task")
    evaluation.add_argument("--eval-tasks", type=positive_int, default=10000, help="tasks in the final evaluation")
    evaluation.add_argument("--meta-test-only", action="store_true",
                            help="final evaluation on meta-test tasks only, in half the time (default: meta-train "
                            "tasks too)")
    evaluation.add_argument("--transductive", action="store_true",
                            help="classify all queries of a task in one batch (default: each query on its own)")
    evaluation.add_argument("--eval-only", action="store_true", help="evaluate a checkpoint of the logdir, no training")
    evaluation.add_argument("--eval-lake", action="store_true",
                            help="evaluate a checkpoint on Lake et al.'s one-shot benchmark instead (20 runs of 20-way "
                            "one-shot tasks within an evaluation alphabet; needs a 20-way --split background run)")
    evaluation.add_argument("--checkpoint", help="with --eval-only or --eval-lake: the checkpoint file "
                            "(default: the latest)")
    run = parser.add_argument_group("run")
    run.add_argument("--validate-every", type=positive_int, default=10,
                     help="log one meta-train and one meta-test task every this many meta-iterations")
    run.add_argument("--check-every", type=positive_int, default=1000,
                     help="checkpoint every this many meta-iterations")
    run.add_argument("--keep", type=positive_int, default=3,
                     help="checkpoints kept (the newest), besides those that results.json reports on")
    run.add_argument("--workers", type=non_negative_int, default=len(os.sched_getaffinity(0)),
                     help="evaluation worker processes on CPU, one thread each (ignored on CUDA)")
    run.add_argument("--seed", type=int, default=0, help="seed of the split, the initial weights and every task")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    run.add_argument("--data", default="omniglot", help="Omniglot folder (downloaded and extracted when missing)")
    run.add_argument("--omniglot-mirror", help=f"folder holding the two Omniglot zips, used instead of the network "
                     f"(default: ${omniglot.MIRROR_VARIABLE})")
    return parser


def flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line."""
    written = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {action.dest for action in parser._actions if written & set(action.option_strings)}


def flag(name: str) -> str:
    """The command-line spelling of an argument's destination."""
    return "--" + name.replace("_", "-")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags from the command line; a run folder's args.json fills in those not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.eval_only = args.eval_only or args.eval_lake
    given = flags_given(parser, argv)
    args.logdir = args.logdir or f"runs/{args.classes}way{args.shots}shot"
    saved_path = Path(args.logdir) / "args.json"
    if saved_path.is_file():
        saved = read_json(saved_path)
        fixed = MODEL_FLAGS if args.eval_only else TRAINING_FLAGS
        for name, value in saved.items():
            if name in NOT_SAVED + MACHINE_FLAGS or not hasattr(args, name):
                continue
            if name not in given:
                setattr(args, name, value)
            elif name in fixed and getattr(args, name) != value:
                raise UserError(f"{flag(name)} {getattr(args, name)} differs from {value} in {saved_path}; "
                                f"leave it out to continue this run, or choose a new logdir")
    if args.shots + 1 > omniglot.DRAWERS:
        raise UserError(f"--shots {args.shots} leaves no query image: a character has {omniglot.DRAWERS} drawings, "
                        f"so --shots can be at most {omniglot.DRAWERS - 1}")
    if args.train_shots > omniglot.DRAWERS:
        raise UserError(f"--train-shots {args.train_shots} exceeds the {omniglot.DRAWERS} drawings of a character")
    train_classes, test_classes = split_classes(args)
    for classes, name in ((train_classes, "meta-train"), (test_classes, "meta-test")):
        if args.classes > classes:
            raise UserError(f"--classes {args.classes} exceeds the {classes} {name} classes of the {args.split} split")
    latest = find_latest_file(Path(args.logdir) / "checkpoint")
    if latest and not args.eval_only and checkpoint_iteration(latest) > args.meta_iterations:
        raise UserError(f"--meta-iterations {args.meta_iterations} is below the {checkpoint_iteration(latest)} this "
                        f"run has done; use --eval-only --checkpoint to evaluate an earlier checkpoint")
    if args.checkpoint and not args.eval_only:
        raise UserError("--checkpoint needs --eval-only or --eval-lake (training always resumes from the latest "
                        "checkpoint)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here; use --device cpu")
    return args


def split_classes(args: argparse.Namespace) -> tuple[int, int]:
    """(meta-train classes, meta-test classes) of the run's split, known before any data is read."""
    split_path = Path(args.logdir) / "split.json"
    if split_path.is_file():
        split = read_json(split_path)
        return len(split["train"]) * len(split["train_rotations"]), len(split["test"])
    train, test = omniglot.split_sizes(args.split)
    return train * len(omniglot.ROTATIONS), test


def stream(seed: int, purpose: int, process: Optional[int] = None) -> torch.Generator:
    """A torch generator for one independent random stream of the run (of one process, under torchrun)."""
    entropy = [seed, purpose] + ([] if process is None else [process])
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


# ----------------------------------------------------------------------------- Reptile

# The paper's code minimises the loss summed over the mini-batch, not its mean. Adam alone would not care, but
# its state carries over from training (batch 10 in 5-way) to evaluation (batch 5): summed gradients make each
# evaluation step about half the size that means give, relative to the training gradients Adam has seen.
LOSS_REDUCTION = "sum"


def inner_batches(num_images: int, batch: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, batch) image indices: shuffled passes over the task's images, walked in order (a batch may span two)."""
    passes = math.ceil(batch * steps / num_images)
    order = torch.cat([torch.randperm(num_images, generator=generator) for _ in range(passes)])
    return order[:batch * steps].view(steps, batch)


def adapt(model: OmniglotModel, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
          steps: int, batch: int, generator: torch.Generator) -> None:
    """Train `model` on one task's images with `steps` Adam steps of mini-batches of `batch`."""
    for indices in inner_batches(len(images), batch, steps, generator).to(images.device):
        loss = torch.nn.functional.nll_loss(model(images[indices]), labels[indices], reduction=LOSS_REDUCTION)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def meta_step_size(iteration: int, args: argparse.Namespace) -> float:
    """The meta-step, annealed linearly from --meta-lr to --meta-lr-final across training."""
    done = iteration / args.meta_iterations
    return done * args.meta_lr_final + (1 - done) * args.meta_lr


def prepare_model(model: OmniglotModel, device: str) -> OmniglotModel:
    """The model on `device`, its convolution weights channels-last (faster small convolutions)."""
    return model.to(device, memory_format=torch.channels_last)


def make_learner(model: OmniglotModel, lr: float) -> tuple[OmniglotModel, torch.optim.Adam]:
    """A copy of `model` to adapt to tasks, and its inner Adam (beta1 = 0, as in the paper)."""
    learner = model.clone()
    return learner, torch.optim.Adam(learner.parameters(), lr=lr, betas=(0.0, 0.999), fused=True)


def copy_weights(source: OmniglotModel, destination: OmniglotModel) -> None:
    """Overwrite the parameters of `destination` with those of `source`."""
    with torch.no_grad():
        for param, source_param in zip(destination.parameters(), source.parameters()):
            param.copy_(source_param)


def adapt_to_tasks(meta_model: OmniglotModel, learner: OmniglotModel, inner_optimizer: torch.optim.Optimizer,
                   mean_model: OmniglotModel, sampler: omniglot.TaskSampler, args: argparse.Namespace, tasks: int,
                   generator: torch.Generator) -> None:
    """Adapt the meta-model to `tasks` new tasks in turn; set mean_model to the sum of the results / --meta-batch."""
    with torch.no_grad():
        for param in mean_model.parameters():
            param.zero_()
    for _ in range(tasks):
        task = sampler.sample(args.classes, args.train_shots, 0, generator)
        copy_weights(meta_model, learner)
        # The inner Adam's state is not reset: as in the paper's code it lives on from task to task.
        adapt(learner, inner_optimizer, task.support_images, task.support_labels, args.iterations, args.batch,
              generator)
        with torch.no_grad():
            for mean, param in zip(mean_model.parameters(), learner.parameters()):
                mean.add_(param, alpha=1 / args.meta_batch)


def meta_step(meta_model: OmniglotModel, mean_model: OmniglotModel, meta_optimizer: torch.optim.Optimizer,
              step_size: float) -> None:
    """Move the meta-model `step_size` of the way to mean_model."""
    for group in meta_optimizer.param_groups:
        group["lr"] = step_size
    meta_model.point_grad_to(mean_model)
    meta_optimizer.step()


def train_step(meta_model: OmniglotModel, learner: OmniglotModel, inner_optimizer: torch.optim.Optimizer,
               mean_model: OmniglotModel, meta_optimizer: torch.optim.Optimizer, sampler: omniglot.TaskSampler,
               args: argparse.Namespace, step_size: float, generator: torch.Generator) -> None:
    """One meta-iteration: adapt the meta-model to each task of a meta-batch, then step towards the mean result."""
    # Under torchrun each process adapts its share of the tasks (5 over 2 processes: 3 and 2), and one all-reduce
    # sums the shares into the mean.
    adapt_to_tasks(meta_model, learner, inner_optimizer, mean_model, sampler, args,
                   len(range(rank(), args.meta_batch, processes())), generator)
    if processes() > 1:
        with torch.no_grad():
            means = list(mean_model.parameters())
            total = torch.cat([mean.reshape(-1) for mean in means])
            torch.distributed.all_reduce(total)
            for mean, summed in zip(means, total.split([mean.numel() for mean in means])):
                mean.copy_(summed.view(mean.shape))
    meta_step(meta_model, mean_model, meta_optimizer, step_size)


def task_seeds(tasks: int, generator: torch.Generator) -> list[int]:
    """One seed per evaluation task, so tasks can be evaluated in any order or process."""
    return torch.randint(2 ** 62, (tasks,), generator=generator).tolist()


def evaluate_tasks(meta_state: dict, adam_state: dict, sampler: omniglot.TaskSampler, args: argparse.Namespace,
                   seeds: list[int]) -> list[tuple[int, float]]:
    """(correct queries, mean query loss) of one test task per seed, each adapted from the meta-weights."""
    model = prepare_model(OmniglotModel(args.classes), sampler.images.device)
    model.load_state_dict(meta_state)
    learner, optimizer = make_learner(model, args.lr)
    results = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        task = sampler.sample(args.classes, args.shots, 1, generator)
        adapt_to_test_task(model, learner, optimizer, adam_state, task, args, generator)
        log_probs = classify_queries(learner, task, args.transductive)
        correct = (learner.predict(log_probs) == task.query_labels).sum().item()
        results.append((correct, torch.nn.functional.nll_loss(log_probs, task.query_labels).item()))
    return results


def adapt_to_test_task(model: OmniglotModel, learner: OmniglotModel, optimizer: torch.optim.Optimizer,
                       adam_state: dict, task: omniglot.Task, args: argparse.Namespace,
                       generator: torch.Generator) -> None:
    """Set `learner` to the meta-weights of `model`, then adapt it to a test task's support images."""
    copy_weights(model, learner)
    # Every test task starts from the training Adam state; load_state_dict would share its tensors.
    optimizer.load_state_dict(copy.deepcopy(adam_state))
    adapt(learner, optimizer, task.support_images, task.support_labels, args.test_iterations, args.test_batch,
          generator)


def classify_queries(learner: OmniglotModel, task: omniglot.Task, transductive: bool) -> torch.Tensor:
    """Log-probabilities of a task's queries: all in one batch (transductive), or each with the support images."""
    # Evaluation workers turn oneDNN off for the small adaptation batches; on these larger ones it is faster
    # (20-way 5-shot: 20 batches of 101 images). allow_tf32=None leaves that setting alone (setting it warns).
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=True, allow_tf32=None):
        if transductive:
            return learner(task.query_images)
        # Each query in a batch with the support images: queries never share BatchNorm statistics.
        return torch.cat([learner(torch.cat([task.support_images, query[None]]))[-1:] for query in task.query_images])


def evaluate_tasks_together(meta_state: dict, adam_state: dict, sampler: omniglot.TaskSampler,
                            args: argparse.Namespace, seeds: list[int]) -> list[tuple[int, float]]:
    """evaluate_tasks, with all the tasks adapted side by side as one computation vmapped over tasks (for GPUs)."""
    device = sampler.images.device
    model = OmniglotModel(args.classes).to(device)
    tasks, batches = [], []
    for seed in seeds:  # the same draws, in the same order, as evaluate_tasks
        generator = torch.Generator().manual_seed(seed)
        tasks.append(sampler.sample(args.classes, args.shots, 1, generator))
        batches.append(inner_batches(args.classes * args.shots, args.test_batch, args.test_iterations, generator))
    support, support_labels, queries, query_labels = (torch.stack(part) for part in zip(*tasks))
    batches = torch.stack(batches).to(device)  # (tasks, steps, batch)
    count = len(seeds)
    # Contiguous, not channels-last: vmapped BatchNorm on CUDA does not support channels-last tensors.
    params = {name: value.to(device).expand(count, *value.shape).contiguous() for name, value in meta_state.items()}
    # Each task starts from the training Adam state (beta1 = 0: no first moment, step = lr * g / (sqrt(v) + eps)).
    names = [name for name, _ in model.named_parameters()]
    saved = adam_state["state"]
    squares = {name: saved[i]["exp_avg_sq"].to(device).expand_as(params[name]).contiguous() if i in saved
               else torch.zeros_like(params[name]) for i, name in enumerate(names)}
    steps_done = float(saved[0]["step"]) if saved else 0.0
    group = adam_state["param_groups"][0]
    lr, (_, beta2), eps = group["lr"], group["betas"], group["eps"]

    def loss(task_params: dict, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.nll_loss(torch.func.functional_call(model, task_params, (images,)), labels,
                                            reduction=LOSS_REDUCTION)

    task_gradients = torch.func.vmap(torch.func.grad(loss))
    rows = torch.arange(count, device=device)[:, None]
    for step in range(args.test_iterations):
        indices = batches[:, step]
        gradients = task_gradients(params, support[rows, indices], support_labels[rows, indices])
        correction = math.sqrt(1 - beta2 ** (steps_done + step + 1))
        with torch.no_grad():
            for name, gradient in gradients.items():
                squares[name].mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
                params[name].addcdiv_(gradient, (squares[name].sqrt() / correction).add_(eps), value=-lr)

    forward = torch.func.vmap(lambda task_params, images: torch.func.functional_call(model, task_params, (images,)))
    with torch.no_grad():
        if args.transductive:
            log_probs = forward(params, queries)  # (tasks, classes, classes)
        else:  # each query in a batch with its task's support images, one query position at a time
            log_probs = torch.stack([forward(params, torch.cat([support, queries[:, q:q + 1]], dim=1))[:, -1]
                                     for q in range(queries.shape[1])], dim=1)
        correct = (log_probs.argmax(dim=2) == query_labels).sum(dim=1)
        losses = torch.nn.functional.nll_loss(log_probs.transpose(1, 2), query_labels, reduction="none").mean(dim=1)
    return list(zip(correct.tolist(), losses.tolist()))


_worker_samplers: dict = {}  # the task samplers of an evaluation worker process


def start_worker(samplers: dict) -> None:
    """Set up an evaluation worker: one thread, the run's task samplers (their images in shared memory)."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # on one thread, ATen's own kernels run adaptation batches (5 or 10) faster
    _worker_samplers.update(samplers)


def evaluate_in_worker(name: str, meta_state: dict, adam_state: dict, args: argparse.Namespace,
                       seeds: list[int]) -> list[tuple[int, float]]:
    """evaluate_tasks on the worker's sampler called `name`."""
    return evaluate_tasks(meta_state, adam_state, _worker_samplers[name], args, seeds)


def start_pool(samplers: dict, workers: int) -> Union[ProcessPoolExecutor, contextlib.nullcontext]:
    """Evaluation worker processes, one thread each (small convolutions use a second thread poorly)."""
    if workers <= 1 or any(sampler.images.is_cuda for sampler in samplers.values()):
        return contextlib.nullcontext()
    return ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn"),
                               initializer=start_worker, initargs=(samplers,))


def evaluate(meta_model: OmniglotModel, inner_optimizer: torch.optim.Optimizer, samplers: dict, name: str,
             args: argparse.Namespace, tasks: int, generator: torch.Generator,
             pool: Optional[ProcessPoolExecutor] = None, progress: bool = False,
             share: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-task accuracies and losses on `tasks` tasks of samplers[name] (in the pool's workers, or shared)."""
    seeds = task_seeds(tasks, generator)
    # Copies: sending tensors to worker processes moves them into shared memory, and these must not be the model's.
    meta_state = {key: value.detach().cpu().clone() for key, value in meta_model.state_dict().items()}
    adam_state = copy.deepcopy(inner_optimizer.state_dict())
    on_gpu = samplers[name].images.is_cuda
    size = TASKS_TOGETHER if on_gpu else max(1, min(25, tasks // (4 * max(1, args.workers))))
    chunks = [seeds[i:i + size] for i in range(0, tasks, size)]
    if share:
        chunks = chunks[rank()::processes()]
    if on_gpu:  # a GPU is fast only with large pieces of work: it adapts many tasks side by side
        parts = (evaluate_tasks_together(meta_state, adam_state, samplers[name], args, chunk) for chunk in chunks)
    elif pool is None:
        parts = (evaluate_tasks(meta_state, adam_state, samplers[name], args, chunk) for chunk in chunks)
    else:
        futures = [pool.submit(evaluate_in_worker, name, meta_state, adam_state, args, chunk) for chunk in chunks]
        parts = (future.result() for future in futures)
    results = []
    with tqdm(total=tasks, desc=f"evaluating {name}", unit="task", disable=not progress, leave=False) as bar:
        for part in parts:
            results += part
            bar.update(len(part) * (processes() if share else 1))
    if share:
        results = [result for process_results in gather(results) for result in process_results]
    correct, losses = np.array(results).T
    return correct / args.classes, losses


def confidence_interval(accuracies: np.ndarray) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean."""
    return 1.96 * accuracies.std(ddof=1) / math.sqrt(len(accuracies)) if len(accuracies) > 1 else float("nan")


# ----------------------------------------------------------------------------- torchrun

def join_torchrun(args: argparse.Namespace) -> int:
    """This process's rank in torchrun's process group (gloo on CPU, nccl on CUDA); 0 when not under torchrun."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    if count == 1:
        return 0
    if args.meta_batch < count:
        raise UserError(f"--meta-batch {args.meta_batch} leaves some of the {count} processes without a task; "
                        f"use at most {args.meta_batch} processes, or a larger --meta-batch")
    if args.eval_lake:
        raise UserError("--eval-lake runs in one process: run it with python, not torchrun")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
    return torch.distributed.get_rank()


def processes() -> int:
    """How many processes share the work: torchrun's world size, or 1."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    """This process's rank under torchrun, or 0."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process, so that all processes stop at the same meta-iteration."""
    if processes() == 1:
        return flag
    flags = torch.tensor([float(flag)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(flags)
    return flags.item() > 0


def gather(value) -> list:
    """[the value of each process] on every process (just [value] without torchrun)."""
    if processes() == 1:
        return [value]
    values = [None] * processes()
    torch.distributed.all_gather_object(values, value)
    return values


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(logdir: Path, iteration: int, meta_model, meta_optimizer, inner_optimizer,
                    generators: dict, args: argparse.Namespace) -> Path:
    """Write checkpoint/check-<iteration>.pth atomically; keep the newest --keep and those results.json reports on.

    Under torchrun only the first process writes.
    """
    folder = logdir / "checkpoint"
    path = folder / f"check-{iteration}.pth"
    own = {"inner_optimizer": inner_optimizer.state_dict(),
           "generators": {name: generator.get_state() for name, generator in generators.items()}}
    first, *others = gather(own)
    if rank() != 0:
        return path
    state = {
        "program": PROGRAM,
        "meta_iteration": iteration,
        "meta_net": meta_model.state_dict(),
        "meta_optimizer": meta_optimizer.state_dict(),
        **first,
        "other_processes": others,  # under torchrun: the inner state of the processes after the first
        "args": saved_args(args),
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda file: torch.save(state, file))
    evaluated = evaluated_checkpoints(logdir)
    for old in list_checkpoints(folder)[:-args.keep]:
        if Path(old).name not in evaluated:
            Path(old).unlink()
    return path


def evaluated_checkpoints(logdir: Path) -> set[str]:
    """File names of the checkpoints that the run's results.json reports on."""
    return {Path(entry["checkpoint"]).name for entry in read_results(logdir).values() if "checkpoint" in entry}


def read_results(logdir: Path) -> dict:
    """The run's results.json, or {} if it has none yet."""
    results_path = logdir / "results.json"
    return read_json(results_path) if results_path.is_file() else {}


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or a UserError that says what is wrong with the file."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # a damaged file may first trigger warnings about its contents
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds of error on damaged files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"checkpoint {path} is unreadable ({reason[:120]})") from None
    if not isinstance(state, dict) or state.get("program") != PROGRAM:
        raise UserError(f"{path} is not a checkpoint of train_omniglot.py")
    return state


def latest_good_checkpoint(logdir: Path) -> Optional[dict]:
    """The newest readable checkpoint of the run, skipping (and reporting) damaged ones; None if there is none."""
    for path in reversed(list_checkpoints(logdir / "checkpoint")):
        try:
            return load_checkpoint(path)
        except UserError as error:
            print(f"warning: {error}; trying the previous checkpoint", file=sys.stderr)
    return None


def saved_args(args: argparse.Namespace) -> dict:
    """The settings of a run, as written to args.json."""
    return {name: value for name, value in vars(args).items() if name not in NOT_SAVED}


# ----------------------------------------------------------------------------- the run

def load_split(args: argparse.Namespace, data_dir: Path) -> tuple[omniglot.TaskSampler, omniglot.TaskSampler, dict]:
    """Meta-train and meta-test task samplers on the run's characters (split.json if the run has one)."""
    characters, images = omniglot.load_images(data_dir)
    split_path = Path(args.logdir) / "split.json"
    split = read_json(split_path) if split_path.is_file() else omniglot.make_split(data_dir, characters, args.split,
                                                                                    args.seed)
    index = {character: i for i, character in enumerate(characters)}
    missing = [c for c in split["train"] + split["test"] if c not in index]
    if missing:
        raise UserError(f"{split_path} names {len(missing)} characters missing from {data_dir} "
                        f"(such as {missing[0]}); point --data at the Omniglot folder this run used")
    images = images.to(args.device)
    train = omniglot.TaskSampler(images[[index[c] for c in split["train"]]], split["train_rotations"])
    test = omniglot.TaskSampler(images[[index[c] for c in split["test"]]])
    return train, test, split


def evaluation_mode(args: argparse.Namespace) -> str:
    """How queries are classified: "transductive" or "non-transductive"."""
    return "transductive" if args.transductive else "non-transductive"


def results_key(args: argparse.Namespace) -> str:
    """The entry of results.json that an evaluation with these settings fills, e.g. "5-shot non-transductive"."""
    return f"{args.shots}-shot {evaluation_mode(args)}"


def record_result(args: argparse.Namespace, key: str, result: dict) -> None:
    """Set one entry of the run's results.json, with the settings that produced it."""
    results = read_results(Path(args.logdir))
    results[key] = {**result, "settings": saved_args(args)}
    write_json(Path(args.logdir) / "results.json", results)


def final_evaluation(meta_model, inner_optimizer, samplers: dict, args, iteration: int, checkpoint: str,
                     split: dict) -> None:
    """Evaluate on --eval-tasks tasks of each character set (or meta-test only); print and record the accuracies."""
    mode = evaluation_mode(args)
    started = time.time()
    result = {"shots": args.shots, "mode": mode, "meta_iteration": iteration, "checkpoint": checkpoint,
              "split": split["split"], "tasks": args.eval_tasks}
    names = ["meta-test"] if args.meta_test_only else list(samplers)
    with start_pool(samplers, args.workers if processes() == 1 else 0) as pool:
        for name in names:
            accuracies, _ = evaluate(meta_model, inner_optimizer, samplers, name, args, args.eval_tasks,
                                     stream(args.seed, EVALUATION_STREAM), pool, progress=rank() == 0,
                                     share=processes() > 1)
            accuracy, interval = 100 * accuracies.mean(), 100 * confidence_interval(accuracies)
            result[name] = {"accuracy": accuracy, "ci95": interval}
            if rank() == 0:
                print(f"{name} accuracy: {accuracy:.2f}% +- {interval:.2f}% "
                      f"(95% CI, {args.eval_tasks} tasks, {args.classes}-way {args.shots}-shot, {mode})")
    if rank() != 0:
        return
    result["seconds"] = round(time.time() - started, 1)
    record_result(args, results_key(args), result)


def lake_evaluation(meta_model: OmniglotModel, inner_optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                    iteration: int, checkpoint: str, split: dict, data_dir: Path) -> None:
    """Error rates on Lake et al.'s one-shot runs, both ways of classifying; printed and recorded in results.json."""
    started = time.time()
    evaluation_alphabets = set(read_json(data_dir / omniglot.MARKER)["images_evaluation"])
    seen = [c for c in split["train"] if c.split("/")[0] in evaluation_alphabets]
    if seen:
        raise UserError(f"--eval-lake: {args.logdir} was meta-trained on {len(seen)} characters of the evaluation "
                        f"alphabets (such as {seen[0]}), where Lake's benchmark tests; evaluate a run trained with "
                        f"--split background")
    runs = omniglot.load_lake_runs(data_dir, args.omniglot_mirror)
    sizes = {len(task.support_labels) for task in runs.values()}
    if sizes != {args.classes}:
        raise UserError(f"--eval-lake: the benchmark's runs are {'/'.join(map(str, sizes))}-way and {args.logdir} "
                        f"is {args.classes}-way; evaluate a run trained with --classes {min(sizes)}")
    seeds = task_seeds(LAKE_REPEATS, stream(args.seed, EVALUATION_STREAM))
    learner, optimizer = make_learner(meta_model, args.lr)
    adam_state = copy.deepcopy(inner_optimizer.state_dict())
    errors = {mode: np.zeros((len(runs), LAKE_REPEATS)) for mode in ("non-transductive", "transductive")}
    with tqdm(total=len(runs) * LAKE_REPEATS, desc="Lake's runs", unit="task", leave=False) as bar:
        for index, task in enumerate(runs.values()):
            task = omniglot.Task(*(part.to(args.device) for part in task))
            for repeat, seed in enumerate(seeds):
                adapt_to_test_task(meta_model, learner, optimizer, adam_state, task, args,
                                   torch.Generator().manual_seed(seed))
                for mode in errors:
                    log_probs = classify_queries(learner, task, mode == "transductive")
                    wrong = learner.predict(log_probs) != task.query_labels
                    errors[mode][index, repeat] = 100 * wrong.sum().item() / len(wrong)
                bar.update()
    print(f"Lake et al.'s one-shot benchmark, meta-iteration {iteration}: error rate in %, mean +- standard deviation "
          f"over {LAKE_REPEATS} adaptations")
    print(f"{'run':8}{'non-transductive':>20}{'transductive':>20}")
    for index, run in enumerate(runs):
        print(f"{run:8}" + "".join(f"{errors[mode][index].mean():>12.1f} +- {errors[mode][index].std():4.1f}"
                                   for mode in errors))
    print(f"{'mean':8}" + "".join(f"{errors[mode].mean():>12.2f} +- {errors[mode].mean(axis=0).std():4.2f}"
                                  for mode in errors))
    result = {"meta_iteration": iteration, "checkpoint": checkpoint, "split": split["split"], "repeats": LAKE_REPEATS}
    for mode, table in errors.items():
        result[mode] = {"error": table.mean(), "std": table.mean(axis=0).std(),
                        "runs": dict(zip(runs, table.mean(axis=1).tolist()))}
    result["seconds"] = round(time.time() - started, 1)
    record_result(args, "lake one-shot", result)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    logdir = Path(args.logdir)
    first = join_torchrun(args) == 0  # under torchrun, only the first process writes logs, checkpoints and results
    if args.eval_only:
        checkpoint_path = args.checkpoint or find_latest_file(logdir / "checkpoint")
        if checkpoint_path is None:
            raise UserError(f"--eval-only: {logdir} holds no checkpoint; train first, or give --checkpoint FILE")
        state = load_checkpoint(checkpoint_path)
    if not first:
        torch.distributed.barrier()  # the first process prepares the data folder alone
    data_dir = omniglot.prepare_data(args.data, args.omniglot_mirror)
    train_sampler, test_sampler, split = load_split(args, data_dir)
    if first and processes() > 1:
        torch.distributed.barrier()

    torch.manual_seed(args.seed)
    meta_model = prepare_model(OmniglotModel(args.classes), args.device)
    learner, inner_optimizer = make_learner(meta_model, args.lr)  # adapted to each task in turn
    samplers = {"meta-test": test_sampler, "meta-train": train_sampler}

    if args.eval_only:
        meta_model.load_state_dict(state["meta_net"])
        inner_optimizer.load_state_dict(state["inner_optimizer"])
        if first:
            print(f"evaluating {checkpoint_path} (meta-iteration {state['meta_iteration']})")
        if args.eval_lake:
            lake_evaluation(meta_model, inner_optimizer, args, state["meta_iteration"], checkpoint_path, split,
                            data_dir)
        else:
            final_evaluation(meta_model, inner_optimizer, samplers, args, state["meta_iteration"], checkpoint_path,
                             split)
        return 0

    mean_model = meta_model.clone()  # holds the mean of the adapted weights of a meta-batch
    meta_optimizer = torch.optim.SGD(meta_model.parameters(), lr=args.meta_lr)
    # Under torchrun each process draws its own tasks and keeps its own inner Adam state.
    generators = {"train": stream(args.seed, TRAIN_STREAM, rank() if processes() > 1 else None),
                  "validation": stream(args.seed, VALIDATION_STREAM)}
    if first:
        logdir.mkdir(parents=True, exist_ok=True)
        write_json(logdir / "args.json", saved_args(args))
        write_json(logdir / "split.json", split)
    start = 0
    state = latest_good_checkpoint(logdir)
    if state is not None:
        start = state["meta_iteration"]
        trained_by = 1 + len(state.get("other_processes", []))
        if trained_by != processes():
            raise UserError(f"{logdir} was trained by {trained_by} process(es); resume it with as many "
                            f"(torchrun --nproc_per_node={trained_by}, or python for 1)")
        own = ([state] + state.get("other_processes", []))[rank()]
        meta_model.load_state_dict(state["meta_net"])
        meta_optimizer.load_state_dict(state["meta_optimizer"])
        inner_optimizer.load_state_dict(own["inner_optimizer"])
        for name, generator in generators.items():
            generator.set_state(own["generators"][name])
        if first:
            print(f"resumed {logdir} at meta-iteration {start} of {args.meta_iterations}")
    checkpoint_path = str(logdir / "checkpoint" / f"check-{start}.pth")

    if start >= args.meta_iterations:
        result = read_results(logdir).get(results_key(args), {})
        if result.get("meta_iteration") == start and result.get("tasks") == args.eval_tasks:
            if first:
                accuracy = result["meta-test"]
                print(f"training is complete and {logdir / 'results.json'} holds its {results_key(args)} evaluation "
                      f"(meta-test accuracy {accuracy['accuracy']:.2f}% +- {accuracy['ci95']:.2f}%); "
                      f"use --eval-only to evaluate again")
            return 0

    # Ctrl-C or SIGTERM ends the run cleanly after the current meta-iteration; a second one stops at once.
    interrupted = []

    def on_interrupt(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)

    previous_handlers = {signum: signal.signal(signum, on_interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    # Points logged after the checkpoint by an interrupted run are dropped, so none is duplicated.
    writer = SummaryWriter(str(logdir), purge_step=start + 1) if first else None
    recent = {"meta-train": [], "meta-test": []}
    progress = tqdm(range(start, args.meta_iterations), initial=start, total=args.meta_iterations,
                    desc="meta-training", unit="it", dynamic_ncols=True, disable=not first)
    try:
        for iteration in progress:
            step_size = meta_step_size(iteration, args)
            train_step(meta_model, learner, inner_optimizer, mean_model, meta_optimizer, train_sampler, args,
                       step_size, generators["train"])
            done = iteration + 1
            stop = any_process(bool(interrupted))
            if done % args.validate_every == 0 and first:
                for name in samplers:
                    accuracies, losses = evaluate(meta_model, inner_optimizer, samplers, name, args, 1,
                                                  generators["validation"])
                    writer.add_scalar(f"{name}/accuracy", accuracies[0], done)
                    writer.add_scalar(f"{name}/loss", losses[0], done)
                    recent[name] = (recent[name] + [accuracies[0]])[-100:]
                writer.add_scalar("meta-step", step_size, done)
                progress.set_postfix({f"{name} acc": f"{np.mean(accs):.3f}" for name, accs in recent.items()})
            if done % args.check_every == 0 or done == args.meta_iterations or stop:
                if writer:
                    writer.flush()  # waits until every logged point is on disk (tensorboardX's flush does not)
                checkpoint_path = str(save_checkpoint(logdir, done, meta_model, meta_optimizer, inner_optimizer,
                                                      generators, args))
            if stop:
                progress.close()
                launcher = "python" if processes() == 1 else f"torchrun --nproc_per_node={processes()}"
                if first:
                    print(f"interrupted at meta-iteration {done}; checkpoint saved to {checkpoint_path}\n"
                          f"resume with: {launcher} train_omniglot.py {shlex.join(argv)}", file=sys.stderr)
                return 128 + (interrupted[0] if interrupted else signal.SIGTERM)
    finally:
        progress.close()
        if writer:
            writer.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)

    final_evaluation(meta_model, inner_optimizer, samplers, args, args.meta_iterations, checkpoint_path, split)
    return 0


def run(argv: list[str]) -> int:
    """main(), with a problem the user can fix reported in one line (status 2) and Ctrl-C as status 130."""
    try:
        return main(argv)
    except UserError as error:
        print(f"train_omniglot.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train_omniglot.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
