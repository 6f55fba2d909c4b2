"""Few-shot sine-wave regression, the Reptile paper's Figure 1: meta-learn the initialization of a small network so
that a few steps of SGD on 10 points of a new sine wave fit the whole wave.

    python train_sine.py                          # Reptile, logged to runs/sine-reptile
    python train_sine.py --algorithm maml         # also fomaml, joint and random; each logs to runs/sine-ALGORITHM
    python train_sine.py runs/sine-reptile --eval-only
    python train_sine.py runs/sine-maml runs/sine-fomaml runs/sine-reptile --figure runs/sine.png

Reptile, first-order MAML and MAML run through reptile.py (the Omniglot runs' code). Running the same command again
resumes from the run's latest checkpoint. CPU only: the network is too small for a GPU to help.
"""
import argparse
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import evaluate
import options
import reptile
from reptile import Hyperparameters, TestTask
from run_folder import Training
from utils import UserError, confidence_interval, pyplot, run_script, stream

AMPLITUDES, PHASES, X_RANGE = (0.1, 5.0), (0.0, 2 * math.pi), (-5.0, 5.0)  # the task distribution
GRID = torch.linspace(*X_RANGE, 1000).unsqueeze(1)  # where a held-out wave's error is measured
REPORTED_STEPS = (0, 1, 8, 32)  # SGD steps on a held-out wave after which its error is recorded
FIGURE_STEPS = {0: "blue", 1: "darkviolet", 32: "red"}  # steps drawn in the figure, and their colours
NAMES = {"reptile": "Reptile", "fomaml": "first-order MAML", "maml": "MAML", "joint": "joint training",
         "random": "random initialization"}
VALIDATION_WAVES = 20  # waves scored after 32 steps every --validate-every meta-iterations, for TensorBoard
TRAIN_STREAM, VALIDATION_STREAM, HELD_OUT_STREAM = 0, 1, 2
KEEP_CHECKPOINTS = 2
mse = nn.functional.mse_loss


class SineModel(nn.Module):
    """1 -> hidden -> hidden -> 1 with tanh (the authors' demonstration) or ReLU (the paper's figure)."""

    def __init__(self, activation: str = "tanh", hidden: int = 64):
        super().__init__()
        layer = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        self.net = nn.Sequential(nn.Linear(1, hidden), layer(), nn.Linear(hidden, hidden), layer(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions (B, 1) at inputs (B, 1)."""
        return self.net(x)


# ----------------------------------------------------------------------------- tasks

def draw_waves(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 2) amplitudes and phases of new sine waves y = amplitude * sin(x + phase)."""
    uniform = torch.rand(count, 2, generator=generator)
    low = torch.tensor([AMPLITUDES[0], PHASES[0]])
    return low + uniform * torch.tensor([AMPLITUDES[1] - AMPLITUDES[0], PHASES[1] - PHASES[0]])


def wave_values(wave: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The wave (amplitude, phase) at the inputs x."""
    return wave[0] * torch.sin(x + wave[1])


def draw_inputs(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 1) inputs drawn uniformly from X_RANGE."""
    return X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * torch.rand(count, 1, generator=generator)


def draw_training_task(hp: Hyperparameters, points: int,
                       generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A meta-training task: `points` points of a new wave, as the inner loop's mini-batches (shuffled passes)."""
    wave = draw_waves(1, generator)[0]
    x = draw_inputs(points, generator)
    y = wave_values(wave, x)
    return [(x[rows], y[rows]) for rows in reptile.inner_batches(points, hp.batch, hp.inner_steps, generator)]


def draw_held_out(count: int, shots: int, generator: torch.Generator) -> list[TestTask]:
    """Held-out waves: `shots` points of each to fit, and the dense GRID to measure the fit on."""
    tasks = []
    for wave in draw_waves(count, generator):
        x = draw_inputs(shots, generator)
        tasks.append(TestTask(x, wave_values(wave, x), GRID, wave_values(wave, GRID)))
    return tasks


class MetaIteration:
    """One meta-iteration of the run's algorithm on given tasks (lists of mini-batches), in place on the model:
    reptile.MetaLearner for Reptile, first-order MAML and MAML, plain SGD on every wave's points for joint training."""

    def __init__(self, model: nn.Module, settings: dict):
        self.model, self.algorithm, self.hp = model, settings["algorithm"], hyperparameters(settings)
        self.meta_learner = reptile.MetaLearner(model, self.hp, mse)
        self.joint_optimizer = torch.optim.SGD(model.parameters(), lr=self.hp.lr)

    def __call__(self, tasks: list[list[tuple[torch.Tensor, torch.Tensor]]], step_size: float) -> None:
        if self.algorithm == "random":
            return
        if self.algorithm == "joint":  # no meta-step: plain SGD on the points of every training wave
            for batches in tasks:
                reptile.adapt(self.model, self.joint_optimizer, batches, mse)
            return
        # MAML's meta-gradient is scaled by the inner SGD step, as first-order MAML's last inner step is: the three
        # algorithms share the meta-step size (a step of 1 takes MAML where one SGD step along it would).
        self.meta_learner.step(tasks, step_size * self.hp.lr if self.algorithm == "maml" else step_size)


# ----------------------------------------------------------------------------- evaluation

def adapted(model: nn.Module, task: TestTask, hp: Hyperparameters, steps: Iterable[int]) -> Iterator[torch.Tensor]:
    """The held-out wave's (mean squared error, predictions at its query points) after each count of SGD steps in
    `steps`, each on all its support points, from the model's weights (evaluate.TestTaskScorer)."""
    scorer = evaluate.TestTaskScorer(model, {"state": {}}, hp, loss=mse, metric=evaluate.mean_squared_error)
    for count in steps:
        scorer.hold([task], torch.arange(len(task.support_targets)).expand(1, count, -1))
        scorer.adapt()
        error, _ = scorer.score(transductive=True)  # no batch statistics: every query point at once
        with torch.no_grad():
            yield error.item(), scorer.learner(task.query_inputs[None])[0]


def errors_after_steps(model: nn.Module, tasks: list[TestTask], hp: Hyperparameters,
                       steps: tuple[int, ...] = REPORTED_STEPS, progress: bool = False) -> np.ndarray:
    """(tasks, len(steps)) mean squared error on each task's queries after each count of SGD steps (`adapted`)."""
    errors = np.zeros((len(tasks), len(steps)))
    for row, task in enumerate(tqdm(tasks, desc="held-out waves", unit="wave", disable=not progress, leave=False)):
        errors[row] = [error for error, _ in adapted(model, task, hp, steps)]
    return errors


def evaluation_key(args: argparse.Namespace, iteration: int) -> str:
    """The results.json key of an evaluation (a repeat of it gets " #2" and so on)."""
    return f"{args.eval_waves} waves, {args.shots} points, at {iteration}, eval seed {args.eval_seed}"


def score_held_out_waves(model: nn.Module, state: dict, args: argparse.Namespace, logdir: Path) -> None:
    """Score the model of a checkpoint (load_model) on --eval-waves held-out waves; print the errors and record
    them in results.json."""
    started = time.time()
    tasks = draw_held_out(args.eval_waves, args.shots, stream(args.eval_seed, HELD_OUT_STREAM))
    errors = errors_after_steps(model, tasks, hyperparameters(state["args"]), progress=True)
    result = {"meta_iteration": state["meta_iteration"], "checkpoint": state["path"], "waves": args.eval_waves,
              "eval_seed": args.eval_seed, "shots": args.shots,
              "mse": {str(steps): {"mean": errors[:, column].mean(), "ci95": confidence_interval(errors[:, column])}
                      for column, steps in enumerate(REPORTED_STEPS)},
              "seconds": round(time.time() - started, 1)}
    for steps, error in result["mse"].items():
        print(f"after {steps:>2} steps: mean squared error {error['mean']:.3f} +- {error['ci95']:.3f} (95% CI, "
              f"{args.eval_waves} held-out waves, {args.shots} points each)")
    options.sine_folder(logdir).record_evaluation(evaluation_key(args, state["meta_iteration"]), result,
                                                  state["args"], state["segments"], "cpu")


def draw_figure(logdirs: list[Path], path: str, seed: int) -> None:
    """The paper's Figure 1 from each run's latest checkpoint: a held-out wave, its points, and the predictions
    after 0, 1 and 32 steps."""
    plt = pyplot("--figure")
    task = draw_held_out(1, 10, stream(seed, HELD_OUT_STREAM))[0]
    figure, axes = plt.subplots(1, len(logdirs), figsize=(4.5 * len(logdirs), 3.9), sharey=True, squeeze=False)
    for axis, logdir in zip(axes[0], logdirs):
        model, state = load_model(logdir, None)
        axis.plot(GRID, task.query_targets, color="green", label="true")
        for (_, predictions), (steps, colour) in zip(adapted(model, task, hyperparameters(state["args"]), FIGURE_STEPS),
                                                     FIGURE_STEPS.items()):
            axis.plot(GRID, predictions, color=colour, label=f"after {steps} step{'' if steps == 1 else 's'}")
        axis.plot(task.support_inputs, task.support_targets, "x", color="black", label="the 10 points fitted")
        axis.set_title(f"{NAMES[state['args']['algorithm']]} ({state['args']['activation']}, {logdir.name})")
        axis.set_xlabel("x")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(FIGURE_STEPS) + 2)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- the run folder

def hyperparameters(settings: dict) -> Hyperparameters:
    """reptile.py's settings for this run (its fields about classes and shots do not apply)."""
    algorithm = settings["algorithm"] if settings["algorithm"] in ("reptile", "fomaml", "maml") else "reptile"
    return Hyperparameters(meta_batch=settings["meta_batch"], meta_iterations=settings["meta_iterations"],
                           inner_steps=settings["inner_steps"], batch=settings["batch"], lr=settings["lr"],
                           meta_lr=settings["meta_lr"], meta_lr_final=0.0, algorithm=algorithm,
                           inner_optimizer="sgd")


def new_model(settings: dict) -> SineModel:
    """The network at the run's seeded initialization (PyTorch's default for Linear layers)."""
    torch.manual_seed(settings["seed"])
    return SineModel(settings["activation"], settings["hidden"])


def load_model(logdir: Path, checkpoint: Optional[str]) -> tuple[SineModel, dict]:
    """The network of a checkpoint (default: the run's latest) and the checkpoint."""
    state = options.sine_folder(logdir).checkpoint_to_evaluate(checkpoint)
    model = SineModel(state["args"]["activation"], state["args"]["hidden"])
    model.load_state_dict(state["model"])
    return model, state


# ----------------------------------------------------------------------------- training

def train(args: argparse.Namespace, argv: list[str]) -> int:
    """Meta-train (or, for the baselines, train or not) from the run's latest checkpoint to --meta-iterations, then
    evaluate on held-out waves."""
    folder = options.sine_folder(Path(args.logdir))
    settings = options.sine_settings(args)
    total = 0 if args.algorithm == "random" else args.meta_iterations
    model = new_model(settings)
    generator = stream(args.seed, TRAIN_STREAM)
    folder.refuse_fewer_iterations(total)
    state = folder.newest_good_checkpoint()
    start, segments = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        generator.set_state(state["generators"]["train"])
        start, segments = state["meta_iteration"], state["segments"]
        if start >= total and (key := evaluation_key(args, start)) in folder.results():
            folder.say_complete(f'"{key}"')
            return 0
        folder.say_resumed(start, total)
    folder.write_args(settings)
    meta_iteration = MetaIteration(model, settings)
    hp = meta_iteration.hp
    validation = draw_held_out(VALIDATION_WAVES, args.shots, stream(args.seed, VALIDATION_STREAM))

    def save(iteration: int, segments: list[dict]) -> Path:
        return folder.write_checkpoint(iteration, {"model": model.state_dict(),
                                                   "generators": {"train": generator.get_state()},
                                                   "args": settings, "segments": segments}, KEEP_CHECKPOINTS, "cpu")

    with Training(folder, start, total, segments, "cpu", f"python train_sine.py {' '.join(argv)}",
                  args.check_every, args.algorithm) as training:
        if state is None:
            training.save(0, lambda segments: save(0, segments))
        for iteration in range(start, total):
            tasks = [draw_training_task(hp, args.points, generator) for _ in range(args.meta_batch)]
            step_size = reptile.meta_step_size(iteration, hp)
            meta_iteration(tasks, step_size)
            done = iteration + 1
            saving = training.done(done)
            if done % args.validate_every == 0:
                error = errors_after_steps(model, validation, hp, (32,)).mean()
                if not math.isfinite(error):
                    raise UserError(f"by meta-iteration {done} the network's predictions are no longer finite; "
                                    f"train with a smaller --lr or --meta-lr in a new logdir")
                training.writer.add_scalar("validation/mse_after_32_steps", error, done)
                training.writer.add_scalar("meta-step", step_size, done)
                training.progress.set_postfix({"validation mse": f"{error:.3f}"})
            if saving:
                training.save(done, lambda segments: save(done, segments))
            if training.stop:
                return training.interrupted(done)
    model, state = load_model(folder.path, str(training.checkpoint))
    score_held_out_waves(model, state, args, folder.path)
    return 0


# ----------------------------------------------------------------------------- the program

def main(argv: list[str]) -> int:
    args = options.parse_sine_args(argv)
    torch.set_num_threads(1)  # the network is small: one thread is fastest, and leaves the other cores to other runs
    if args.figure:
        draw_figure([Path(logdir) for logdir in args.logdir], args.figure, args.eval_seed)
        return 0
    if args.eval_only:
        model, state = load_model(Path(args.logdir), args.checkpoint)
        print(f"evaluating {state['path']} (meta-iteration {state['meta_iteration']})")
        score_held_out_waves(model, state, args, Path(args.logdir))
        return 0
    with options.sine_folder(Path(args.logdir)).training_lock():
        return train(args, argv)


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:], "train_sine.py"))
