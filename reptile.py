"""Reptile and first-order MAML (Nichol, Achiam & Schulman 2018) and MAML (Finn, Abbeel & Levine 2017), for any
torch.nn.Module, any loss and any targets (class labels or real values).

A task is the mini-batches of its inner loop, [(inputs, targets), ...] in order; for first-order MAML and MAML the
last one is the query. The caller owns the loop, the data and the metric:

    meta_learner = reptile.MetaLearner(model, hp, loss)
    for iteration in range(hp.meta_iterations):
        meta_learner.step([draw_task() for _ in range(hp.meta_batch)], reptile.meta_step_size(iteration, hp))

fast.py runs the same meta-iteration on tasks drawn as rows of an example bank kept on the model's device (one
gather a task), as CUDA graphs and under torchrun; evaluate.py adapts to test tasks and scores them.
"""
import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import nn

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (a model's raw outputs, targets) -> a scalar
Task = Sequence[tuple[torch.Tensor, torch.Tensor]]  # the inner loop's mini-batches (inputs, targets), in order


@dataclass(frozen=True)
class Hyperparameters:
    """What a run learns and how it is evaluated; the defaults are the Reptile paper's 5-way 5-shot Omniglot setting.
    options.py makes train_omniglot.py's flags from these fields (their help is there)."""
    classes: int = 5  # N-way
    shots: int = 5  # K-shot at meta-test
    train_shots: int = 10  # examples per class in a meta-training task
    meta_batch: int = 5  # tasks per meta-iteration
    meta_iterations: int = 100000
    inner_steps: int = 5  # inner mini-batches per meta-training task (with a query, it is the last of them)
    batch: int = 10  # examples per inner mini-batch
    lr: float = 0.001  # the inner optimizer's learning rate
    meta_lr: float = 1.0  # the meta-step at the start...
    meta_lr_final: float = 0.0  # ...annealed linearly to this at the end
    algorithm: str = "reptile"  # "reptile", "fomaml" (the Reptile paper's first-order MAML) or "maml"
    first_order: bool = False  # MAML without the second derivatives through the inner steps
    query_shots: Optional[int] = None  # fomaml, maml: examples per class of the query, kept apart from the others
    inner_optimizer: str = "adam"  # "adam" (beta1 = 0, as in the Reptile paper) or "sgd"
    meta_optimizer: str = "sgd"  # "sgd": the Reptile paper's meta-step; "adam": the MAML paper's
    replacement: bool = False  # draw each inner mini-batch on its own instead of walking shuffled passes
    weight_decay: float = 1.0  # multiply the weights by this before each inner step (1: none)
    test_iterations: int = 50  # inner steps on a test task
    test_batch: int = 5  # examples per inner mini-batch on a test task
    transductive: bool = False  # classify a test task's queries in one batch


class TestTask(NamedTuple):
    """A test task: the support set a model adapts to, and the queries it is then scored on."""
    support_inputs: torch.Tensor  # (support examples, ...)
    support_targets: torch.Tensor  # (support examples, ...)
    query_inputs: torch.Tensor  # (queries, ...)
    query_targets: torch.Tensor


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Reptile paper's inner loss: the cross-entropy of a model's logits summed over the mini-batch, not averaged.
    Adam's state carries over from training (batch 10 in 5-way) to evaluation (batch 5), so the sum matters."""
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def per_shot_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The MAML paper's loss: the summed cross-entropy divided by K, the examples of each class in the batch (its
    batches hold K of each of the logits' classes)."""
    return summed_cross_entropy(logits, labels) / (len(labels) / logits.shape[-1])


# ----------------------------------------------------------------------------- the inner loop

def inner_batches(examples: int, batch: int, steps: int, generator: torch.Generator,
                  replacement: bool = False) -> torch.Tensor:
    """(steps, batch) example indices: shuffled passes over a task's examples, walked in order (a batch may span
    two); with replacement, each batch is drawn on its own (no example twice within it, as the paper's code does)."""
    if replacement:
        return torch.stack([torch.randperm(examples, generator=generator)[:batch] for _ in range(steps)])
    passes = math.ceil(batch * steps / examples)
    order = torch.cat([torch.randperm(examples, generator=generator) for _ in range(passes)])
    return order[:batch * steps].view(steps, batch)


def backpropagate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: Loss) -> None:
    """Add the gradient of loss(model(inputs), targets) to each parameter's .grad."""
    loss(model(inputs), targets).backward()


def inner_parameters(model: nn.Module, copies: Optional[Iterable[torch.Tensor]] = None) -> list[torch.Tensor]:
    """The parameters that the inner loop adapts: all but those named in the model's `meta_only` attribute (if any);
    with `copies` (one tensor per parameter, in the model's order), their copies."""
    meta_only = getattr(model, "meta_only", frozenset())
    copies = model.parameters() if copies is None else copies
    return [copy for (name, _), copy in zip(model.named_parameters(), copies, strict=True) if name not in meta_only]


def adapt(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
          loss: Loss = summed_cross_entropy, weight_decay: float = 1.0,
          gradients: Callable[..., None] = backpropagate) -> None:
    """One optimizer step on each mini-batch (inputs, targets) in turn, after multiplying the stepped weights by
    `weight_decay`; `gradients(model, inputs, targets, loss)` sets their .grad."""
    for inputs, targets in batches:
        if weight_decay != 1.0:
            with torch.no_grad():
                for param in [param for group in optimizer.param_groups for param in group["params"]]:
                    param.mul_(weight_decay)
        optimizer.zero_grad()
        gradients(model, inputs, targets, loss)
        optimizer.step()


def make_inner_optimizer(params: Iterable[torch.Tensor], lr: float, inner_optimizer: str,
                         fused: bool = True) -> torch.optim.Optimizer:
    """The inner loop's optimizer: Adam with beta1 = 0 (the Reptile paper's), or SGD. Fused Adam is one kernel a step;
    fused=False gives PyTorch's other Adam, whose arithmetic the side-by-side evaluator's frozen figures used."""
    if inner_optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999), **({"fused": True} if fused else {"foreach": False}))


def copy_weights(source: nn.Module, destination: nn.Module) -> None:
    """Overwrite the parameters of `destination` with those of `source`."""
    with torch.no_grad():
        for param, source_param in zip(destination.parameters(), source.parameters()):
            param.copy_(source_param)


# ----------------------------------------------------------------------------- MAML's meta-gradient

def maml_gradients(model: nn.Module, task: Task, lr: float, loss: Loss = summed_cross_entropy,
                   first_order: bool = False, side_by_side: bool = False) -> list[torch.Tensor]:
    """MAML's meta-gradient of one task: the gradient of the query's loss (the last mini-batch) after SGD steps of
    size lr on the others (not on `meta_only` parameters), through those steps; first order: at the adapted weights.
    side_by_side: `task` is several same-shaped tasks stacked along a new first dimension, and so is each gradient."""
    stepped = inner_parameters(model, [name for name, _ in model.named_parameters()])

    def adapted(weights: dict[str, torch.Tensor], task: Task) -> dict[str, torch.Tensor]:
        for inputs, targets in task[:-1]:
            held = {name: weight for name, weight in weights.items() if name not in stepped}
            step = torch.func.grad(lambda w: loss(torch.func.functional_call(model, {**w, **held}, (inputs,)),
                                                  targets))({name: weights[name] for name in stepped})
            weights = {name: weight - lr * step[name] if name in stepped else weight
                       for name, weight in weights.items()}
        return weights

    def query_loss(weights: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
        inputs, targets = task[-1]
        return loss(torch.func.functional_call(model, weights, (inputs,)), targets)

    def task_gradients(weights: dict[str, torch.Tensor], task: Task) -> dict[str, torch.Tensor]:
        if first_order:
            return torch.func.grad(query_loss)(adapted(weights, task), task)
        return torch.func.grad(lambda start: query_loss(adapted(start, task), task))(weights)

    start = {name: param.detach() for name, param in model.named_parameters()}
    gradients = (torch.func.vmap(task_gradients, in_dims=(None, 0)) if side_by_side else task_gradients)(start, task)
    return [gradients[name] for name in start]


def stack_tasks(tasks: Sequence[Task]) -> Task:
    """Tasks of the same shapes as one, each tensor stacked along a new first dimension (for side_by_side)."""
    return [tuple(torch.stack(part) for part in zip(*batches)) for batches in zip(*tasks)]


# ----------------------------------------------------------------------------- the meta-iteration

def meta_step_size(iteration: int, hp: Hyperparameters) -> float:
    """The meta-step at `iteration`, annealed linearly from meta_lr to meta_lr_final across meta_iterations."""
    done = iteration / hp.meta_iterations
    return done * hp.meta_lr_final + (1 - done) * hp.meta_lr


def point_grad_to(model: nn.Module, target: Iterable[torch.Tensor]) -> None:
    """Set each parameter's .grad to (parameter - target), so an SGD step of size s moves it s of the way there."""
    for param, target_param in zip(model.parameters(), target):
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.sub(param.detach(), target_param.detach().to(param.device, param.dtype), out=param.grad)


class MetaLearner:
    """Meta-trains `model` in place with hp.algorithm, one meta-batch of tasks at a time (`step`): Reptile towards the
    mean of the weights adapted to each task, the Reptile paper's first-order MAML along the mean change made by each
    last inner step, MAML against its mean meta-gradient; by the meta-optimizer: SGD (the annealed meta-step), Adam."""

    def __init__(self, model: nn.Module, hp: Hyperparameters, loss: Loss = summed_cross_entropy,
                 side_by_side: bool = False):
        self.model, self.hp, self.loss, self.side_by_side = model, hp, loss, side_by_side  # see maml_gradients
        self.learner = copy.deepcopy(model)  # adapted to each task in turn
        # The inner optimizer's state is not reset between tasks: as in the paper's code it lives on from one to the
        # next, and a test task starts from it.
        self.inner_optimizer = make_inner_optimizer(inner_parameters(self.learner), hp.lr, hp.inner_optimizer)
        meta_optimizer = torch.optim.Adam if hp.meta_optimizer == "adam" else torch.optim.SGD
        self.meta_optimizer = meta_optimizer(model.parameters(), lr=hp.meta_lr)
        self.mean = [torch.zeros_like(param) for param in model.parameters()]  # of the tasks' targets or gradients

    def target(self, task: Task) -> list[torch.Tensor]:
        """Where Reptile, or the Reptile paper's first-order MAML, moves the meta-weights for one task: the adapted
        weights, or the meta-weights moved by the change that the last inner step made."""
        copy_weights(self.model, self.learner)
        if self.hp.algorithm == "reptile":
            adapt(self.learner, self.inner_optimizer, task, self.loss, self.hp.weight_decay)
            return list(self.learner.parameters())
        adapt(self.learner, self.inner_optimizer, task[:-1], self.loss, self.hp.weight_decay)
        before_last = [param.detach().clone() for param in self.learner.parameters()]
        adapt(self.learner, self.inner_optimizer, task[-1:], self.loss, self.hp.weight_decay)
        with torch.no_grad():
            return [meta + param - before for meta, param, before
                    in zip(self.model.parameters(), self.learner.parameters(), before_last)]

    def accumulate(self, tasks: Iterable[Task]) -> None:
        """Set self.mean to the sum over the tasks of their targets (MAML: meta-gradients) / meta_batch."""
        with torch.no_grad():
            for mean in self.mean:
                mean.zero_()
        if self.hp.algorithm == "maml" and self.side_by_side:
            found_each = [[gradients.sum(dim=0) for gradients in maml_gradients(
                self.model, stack_tasks(list(tasks)), self.hp.lr, self.loss, self.hp.first_order, side_by_side=True)]]
        elif self.hp.algorithm == "maml":
            found_each = (maml_gradients(self.model, task, self.hp.lr, self.loss, self.hp.first_order)
                          for task in tasks)
        else:
            found_each = (self.target(task) for task in tasks)  # each read before the next task overwrites it
        for found in found_each:
            with torch.no_grad():
                for mean, value in zip(self.mean, found):
                    mean.add_(value, alpha=1 / self.hp.meta_batch)

    def meta_update(self, step_size: float) -> None:
        """Move the meta-weights with the meta-optimizer at learning rate `step_size`, from self.mean."""
        for group in self.meta_optimizer.param_groups:
            group["lr"] = step_size
        if self.hp.algorithm == "maml":
            for param, gradient in zip(self.model.parameters(), self.mean):
                param.grad = gradient.clone()
        else:
            point_grad_to(self.model, self.mean)
        self.meta_optimizer.step()

    def step(self, tasks: Iterable[Task], step_size: float) -> None:
        """One meta-iteration on these tasks (a meta-batch)."""
        self.accumulate(tasks)
        self.meta_update(step_size)
