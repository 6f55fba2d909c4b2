"""Reptile (Nichol, Achiam & Schulman 2018) on N-way K-shot tasks: its hyperparameters, the inner loop and the
meta-iteration.

Every function takes explicit values (the run's `Hyperparameters`); adaptation to test tasks and their scores live in
evaluate.py, the command line, run folders and checkpoints in train_omniglot.py.
"""
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Optional, Protocol

import torch

from models import ReptileModel
from utils import non_negative_float, positive_float, positive_int

def summed_cross_entropy(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The inner loss by default: the cross-entropy of a model's log-probabilities, summed over the mini-batch.

    The paper's code minimises the sum, not the mean. Adam alone would not care, but its state carries over from
    training (batch 10 in 5-way) to evaluation (batch 5): summed gradients make each evaluation step about half the
    size that means give, relative to the training gradients Adam has seen.
    """
    return torch.nn.functional.nll_loss(log_probs, labels, reduction="sum")


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model outputs, targets) -> a scalar to minimise


class TestTask(NamedTuple):
    """A test task: the support set a model adapts to, and the queries it is then scored on."""
    support_inputs: torch.Tensor  # (support examples, ...)
    support_targets: torch.Tensor  # (support examples,): class labels 0..N-1
    query_inputs: torch.Tensor  # (queries, ...)
    query_targets: torch.Tensor


class Tasks(Protocol):
    """Where tasks come from (omniglot.TaskSampler is one). Meta-training draws a task on the CPU as rows of a bank
    of every example's input, kept on the model's device, so that a task is one gather there; a test task is drawn
    whole."""

    def bank(self) -> torch.Tensor:
        """Every example's input, stacked along the first dimension."""

    def draw_rows(self, classes: int, shots: int, queries: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A new task: the bank rows of its examples and their class labels, each (classes, shots + queries): per
        class, `shots` examples and `queries` others, all distinct."""

    def sample(self, classes: int, shots: int, queries: int, generator: torch.Generator) -> TestTask:
        """A new test task: `shots` support examples and `queries` queries of each of `classes` classes, labelled
        0..classes-1, on the device of the bank's source."""


def setting(default, help: str, group: str, type: Optional[Callable] = None, choices: Optional[tuple] = None,
            training: bool = True):
    """A field of Hyperparameters with what its command-line flag needs: help, type, choices, and its group of flags;
    `training`: it fixes what a run learns (a resumed run must keep it)."""
    return field(default=default, metadata={"help": help, "group": group, "type": type, "choices": choices,
                                            "training": training})


@dataclass(frozen=True)
class Hyperparameters:
    """What a run learns and how it is evaluated; the defaults are the paper's 5-way 5-shot Omniglot setting.

    Each field is declared once, here: train_omniglot.py makes its flags (and the list of flags a resumed run must
    keep) from these.
    """
    classes: int = setting(5, "classes per task (N-way)", "task", positive_int)
    shots: int = setting(5, "support images per class at meta-test (K-shot)", "task", positive_int)
    train_shots: int = setting(10, "images per class in a meta-training task", "task", positive_int)
    meta_batch: int = setting(5, "tasks per meta-iteration", "meta-training", positive_int)
    meta_iterations: int = setting(100000, "meta-iterations in all", "meta-training", positive_int, training=False)
    iterations: int = setting(5, "inner steps per task", "meta-training", positive_int)
    batch: int = setting(10, "inner mini-batch size", "meta-training", positive_int)
    lr: float = setting(0.001, "inner learning rate (of Adam with betas 0, 0.999, or of SGD)", "meta-training",
                        positive_float)
    meta_lr: float = setting(1.0, "meta-step size at the start", "meta-training", positive_float)
    meta_lr_final: float = setting(0.0, "meta-step size at the end (annealed linearly)", "meta-training",
                                   non_negative_float)
    algorithm: str = setting("reptile", "reptile: step towards the adapted weights; fomaml: first-order MAML, step "
                             "along the change made by the last inner step alone", "meta-training",
                             choices=("reptile", "fomaml"))
    fomaml_tail: Optional[int] = setting(None, "with --algorithm fomaml: the last inner step is on this many images "
                                         "per class of the task, kept apart from the earlier steps (default: drawn "
                                         "like the others)", "meta-training", positive_int)
    inner_optimizer: str = setting("adam", "the inner loop's optimizer, at meta-training and meta-test",
                                   "meta-training", choices=("adam", "sgd"))
    replacement: bool = setting(False, "draw each inner mini-batch on its own (default: shuffled passes over the "
                                "task's images)", "meta-training")
    weight_decay: float = setting(1.0, "multiply the weights by this before each inner step, at meta-training and "
                                  "meta-test (1: none)", "meta-training", positive_float)
    test_iterations: int = setting(50, "inner steps on a test task", "evaluation", positive_int, training=False)
    test_batch: int = setting(5, "mini-batch size on a test task", "evaluation", positive_int, training=False)
    transductive: bool = setting(False, "classify all queries of a task in one batch (default: each query on its "
                                 "own)", "evaluation", training=False)


# ----------------------------------------------------------------------------- the inner loop

def inner_batches(num_images: int, batch: int, steps: int, generator: torch.Generator,
                  replacement: bool = False) -> torch.Tensor:
    """(steps, batch) image indices: shuffled passes over the task's images, walked in order (a batch may span two);
    with replacement, each batch is drawn on its own (no image twice within it, as the paper's code does)."""
    if replacement:
        return torch.stack([torch.randperm(num_images, generator=generator)[:batch] for _ in range(steps)])
    passes = math.ceil(batch * steps / num_images)
    order = torch.cat([torch.randperm(num_images, generator=generator) for _ in range(passes)])
    return order[:batch * steps].view(steps, batch)


def backpropagate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: Loss) -> None:
    """Add the gradient of loss(model(inputs), targets) to each parameter's .grad."""
    loss(model(inputs), targets).backward()


def adapt(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
          weight_decay: float = 1.0, loss: Loss = summed_cross_entropy,
          gradients: Callable[..., None] = backpropagate) -> None:
    """Train `model` with one optimizer step on each mini-batch (inputs, targets) in turn; `gradients(model, inputs,
    targets, loss)` sets the parameters' .grad (evaluate.SideBySide brings its own)."""
    for inputs, targets in batches:
        if weight_decay != 1.0:
            with torch.no_grad():
                for param in model.parameters():
                    param.mul_(weight_decay)
        optimizer.zero_grad()
        gradients(model, inputs, targets, loss)
        optimizer.step()


def prepare_model(model: ReptileModel, device: str) -> ReptileModel:
    """The model on `device`, its convolution weights channels-last (faster small convolutions).

    On CUDA, cuDNN is held to deterministic algorithms: some of its others add in a varying order (20-way batches),
    and Adam turns such rounding noise into full-size steps, so a run would not repeat itself, resumed or not.
    """
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.deterministic = True
    return model.to(device, memory_format=torch.channels_last)


def make_inner_optimizer(params: Iterable[torch.Tensor], lr: float, inner_optimizer: str,
                         fused: bool = True) -> torch.optim.Optimizer:
    """The inner loop's optimizer over `params`: Adam (beta1 = 0, as in the paper) or SGD.

    Fused Adam is one kernel a step; the evaluator that adapts tasks side by side asks for PyTorch's other Adam, whose
    arithmetic its frozen figures were computed with (the two differ in the last bit of some weights).
    """
    if inner_optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999), **({"fused": True} if fused else {"foreach": False}))


def make_learner(model: ReptileModel, lr: float, inner_optimizer: str) -> tuple[ReptileModel, torch.optim.Optimizer]:
    """A copy of `model` to adapt to tasks, and its inner optimizer (make_inner_optimizer): "adam" or "sgd", as
    the run's Hyperparameters.inner_optimizer says (no default, so that meta-training and test tasks agree)."""
    learner = model.clone()
    return learner, make_inner_optimizer(learner.parameters(), lr, inner_optimizer)


def copy_weights(source: ReptileModel, destination: ReptileModel) -> None:
    """Overwrite the parameters of `destination` with those of `source`."""
    with torch.no_grad():
        for param, source_param in zip(destination.parameters(), source.parameters()):
            param.copy_(source_param)


# ----------------------------------------------------------------------------- the meta-iteration

def tail_shots(hp: Hyperparameters) -> int:
    """Images per class kept apart for first-order MAML's last inner step (0: none, it is drawn like the others)."""
    return hp.fomaml_tail if hp.algorithm == "fomaml" and hp.fomaml_tail else 0


def inner_step_sizes(hp: Hyperparameters) -> list[int]:
    """The number of images in each inner mini-batch of a meta-training task, in order."""
    tail = tail_shots(hp)
    return [hp.batch] * (hp.iterations - (1 if tail else 0)) + ([hp.classes * tail] if tail else [])


def draw_task(sampler: Tasks, hp: Hyperparameters, generator: torch.Generator) -> torch.Tensor:
    """A new meta-training task: the bank rows and the labels (2, images) of its inner mini-batches, in order.

    With first-order MAML's tail, the last mini-batch is fomaml_tail images per class that no earlier one holds.
    """
    tail = tail_shots(hp)
    shots = hp.train_shots - tail
    rows, labels = sampler.draw_rows(hp.classes, shots, tail, generator)
    batches = inner_batches(hp.classes * shots, hp.batch, hp.iterations - (1 if tail else 0), generator,
                            hp.replacement).reshape(-1)
    return torch.stack([torch.cat([rows[:, :shots].reshape(-1)[batches], rows[:, shots:].reshape(-1)]),
                        torch.cat([labels[:, :shots].reshape(-1)[batches], labels[:, shots:].reshape(-1)])])


def drawn_mini_batches(bank: torch.Tensor, drawn: torch.Tensor,
                       sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The mini-batches (images, labels) of a task drawn by draw_task, its images taken from `bank`."""
    return list(zip(bank[drawn[0]].split(sizes), drawn[1].split(sizes)))


def adapt_to_tasks(meta_model: ReptileModel, learner: ReptileModel, inner_optimizer: torch.optim.Optimizer,
                   mean_model: ReptileModel, tasks: list[list[tuple[torch.Tensor, torch.Tensor]]],
                   hp: Hyperparameters, loss: Loss = summed_cross_entropy) -> None:
    """Adapt the meta-model to each task (its mini-batches) in turn; set mean_model to the sum of their targets /
    meta-batch.

    A task's target is its adapted weights (Reptile), or the meta-weights moved by the change that the last inner
    step made (first-order MAML).
    """
    with torch.no_grad():
        for param in mean_model.parameters():
            param.zero_()
    for batches in tasks:
        copy_weights(meta_model, learner)
        # The inner optimizer's state is not reset: as in the paper's code it lives on from task to task.
        if hp.algorithm == "fomaml":
            adapt(learner, inner_optimizer, batches[:-1], hp.weight_decay, loss)
            before_last = [param.detach().clone() for param in learner.parameters()]
            adapt(learner, inner_optimizer, batches[-1:], hp.weight_decay, loss)
            with torch.no_grad():
                targets = [meta + param - before for meta, param, before
                           in zip(meta_model.parameters(), learner.parameters(), before_last)]
        else:
            adapt(learner, inner_optimizer, batches, hp.weight_decay, loss)
            targets = learner.parameters()
        with torch.no_grad():
            for mean, target in zip(mean_model.parameters(), targets):
                mean.add_(target, alpha=1 / hp.meta_batch)


def meta_step(meta_model: ReptileModel, mean_model: ReptileModel, meta_optimizer: torch.optim.Optimizer,
              step_size: float) -> None:
    """Move the meta-model `step_size` of the way to mean_model: the Reptile update."""
    for group in meta_optimizer.param_groups:
        group["lr"] = step_size
    meta_model.point_grad_to(mean_model)
    meta_optimizer.step()


def meta_step_size(iteration: int, hp: Hyperparameters) -> float:
    """The meta-step at `iteration`, annealed linearly from meta_lr to meta_lr_final across meta_iterations."""
    done = iteration / hp.meta_iterations
    return done * hp.meta_lr_final + (1 - done) * hp.meta_lr


class Graphed:
    """Calls `function` (no arguments; the tensors it reads and writes stay in place). With CUDA graphs enabled,
    the first calls run eagerly (warm-up), the next one captures a CUDA graph, and later calls replay it."""
    WARMUP_CALLS = 2

    def __init__(self, function: Callable, enabled: bool, optimizers: tuple[torch.optim.Optimizer, ...] = ()):
        self.function, self.enabled, self.optimizers = function, enabled, optimizers
        self.calls, self.graph, self.outputs = 0, None, None

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if not self.enabled:
            return self.function()
        if self.calls < self.WARMUP_CALLS:  # on a side stream, as PyTorch asks before a capture
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.function()
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        try:
            self.set_capturable(True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs = self.function()
        except RuntimeError as error:
            self.enabled = False
            print(f"warning: CUDA graph capture failed ({str(error).splitlines()[0]}); going on without CUDA graphs "
                  f"(slower)", file=sys.stderr)
            return self.function()
        finally:
            self.set_capturable(False)  # only the capture needs it; outside one, PyTorch warns about it
        self.graph = graph
        graph.replay()
        return self.outputs

    def set_capturable(self, capturable: bool) -> None:
        """Let the optimizers be captured (fused Adam computes the same either way), or not."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                if "capturable" in group:
                    group["capturable"] = capturable


class MetaIteration:
    """Meta-iterations of a meta-model: the tasks are drawn on the CPU as rows of an image bank on the model's
    device, and the adaptation to them runs there; on CUDA it is replayed as one captured graph."""

    def __init__(self, meta_model: ReptileModel, learner: ReptileModel, inner_optimizer: torch.optim.Optimizer,
                 meta_optimizer: torch.optim.Optimizer, sampler: Tasks, hp: Hyperparameters,
                 tasks: Optional[int] = None, cuda_graphs: bool = True, loss: Loss = summed_cross_entropy):
        self.meta_model, self.learner, self.inner_optimizer = meta_model, learner, inner_optimizer
        self.meta_optimizer, self.sampler, self.hp, self.loss = meta_optimizer, sampler, hp, loss
        self.tasks = hp.meta_batch if tasks is None else tasks  # under torchrun, this process's share
        self.mean_model = meta_model.clone()  # holds the mean of the tasks' targets
        device = next(meta_model.parameters()).device
        self.bank = sampler.bank().to(device)
        self.sizes = inner_step_sizes(hp)
        self.drawn = torch.zeros(self.tasks, 2, sum(self.sizes), dtype=torch.long, device=device)
        self.adapt = Graphed(self.adapt_to_drawn_tasks, cuda_graphs and device.type == "cuda", (inner_optimizer,))

    def adapt_to_drawn_tasks(self) -> None:
        """adapt_to_tasks on the tasks in self.drawn."""
        tasks = [drawn_mini_batches(self.bank, drawn, self.sizes) for drawn in self.drawn]
        adapt_to_tasks(self.meta_model, self.learner, self.inner_optimizer, self.mean_model, tasks, self.hp,
                       self.loss)

    def __call__(self, step_size: float, generator: torch.Generator,
                 all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """One meta-iteration: adapt the meta-model to each task of a meta-batch, then step towards the mean result.

        Shared between processes, each adapts its share of the tasks and `all_reduce` sums the shares in place.
        """
        drawn = torch.stack([draw_task(self.sampler, self.hp, generator) for _ in range(self.tasks)])
        self.drawn.copy_(drawn.pin_memory() if self.drawn.is_cuda else drawn, non_blocking=True)
        self.adapt()
        if all_reduce is not None:
            with torch.no_grad():
                means = list(self.mean_model.parameters())
                total = torch.cat([mean.reshape(-1) for mean in means])
                all_reduce(total)
                for mean, summed in zip(means, total.split([mean.numel() for mean in means])):
                    mean.copy_(summed.view(mean.shape))
        meta_step(self.meta_model, self.mean_model, self.meta_optimizer, step_size)
