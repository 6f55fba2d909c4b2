"""Straightforward loops of the Reptile paper's Omniglot procedure, written from the paper and its code rather than
from reptile.py and evaluate.py: the reference that tests/ and bench.py hold the project's code to.

Plain and slow on purpose: a deep copy and a new optimizer per task, one step at a time. Every setting is an argument
or written here as the paper's code has it; nothing is taken from the project's objects (an optimizer's state is
taken as saved, never its settings).
"""
import copy

import torch
from torch import nn

from reptile import TestTask


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The paper's inner loss: minus the log-probability of each label, summed over the batch."""
    return -torch.log_softmax(logits, dim=1)[torch.arange(len(labels)), labels].sum()


def inner_optimizer(model: nn.Module, lr: float, kind: str, state: dict) -> torch.optim.Optimizer:
    """TensorFlow's Adam as the paper's code makes it (beta1 = 0; beta2 0.999 and epsilon 1e-8, TF's defaults), or
    plain SGD; with the moments and step count of `state` (a state_dict), but not its settings."""
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    optimizer.load_state_dict({"state": copy.deepcopy(state["state"]),
                               "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, weight_decay: float = 1.0) -> None:
    """One optimizer step on each mini-batch (images, labels), the weights first multiplied by weight_decay."""
    for images, labels in batches:
        if weight_decay != 1.0:
            with torch.no_grad():
                for param in model.parameters():
                    param *= weight_decay
        optimizer.zero_grad()
        cross_entropy_sum(model(images), labels).backward()
        optimizer.step()


def reptile_meta_iteration(meta_model: nn.Module, state: dict, tasks: list[list], lr: float, step_size: float,
                           kind: str = "adam") -> dict:
    """Reptile's meta-iteration: each task (its mini-batches) adapted in turn from the meta-weights, the inner
    optimizer's state carried from task to task, then the meta-weights moved step_size of the way to the mean of the
    adapted weights. Returns the inner optimizer's new state."""
    adapted = []
    for batches in tasks:
        model = copy.deepcopy(meta_model)
        optimizer = inner_optimizer(model, lr, kind, state)
        train_steps(model, optimizer, batches)
        state = copy.deepcopy(optimizer.state_dict())
        adapted.append([param.detach() for param in model.parameters()])
    with torch.no_grad():
        for index, param in enumerate(meta_model.parameters()):
            mean = sum(weights[index] for weights in adapted) / len(adapted)
            param += step_size * (mean - param)
    return state


def score_test_task(meta_model: nn.Module, state: dict, task: TestTask, order: torch.Tensor, lr: float,
                    transductive: bool, kind: str = "adam", weight_decay: float = 1.0) -> tuple[int, float]:
    """(correct queries, mean query loss) of a test task: a copy of the meta-model adapted on the support images in
    the mini-batches of `order` (steps, batch), from the inner optimizer's saved state; then each query classified
    in a batch of the support images and itself (BatchNorm sees no other query), or all queries in one batch
    (transductive)."""
    model = copy.deepcopy(meta_model)
    train_steps(model, inner_optimizer(model, lr, kind, state),
                [(task.support_inputs[rows], task.support_targets[rows]) for rows in order], weight_decay)
    with torch.no_grad():
        if transductive:
            logits = model(task.query_inputs)
        else:
            logits = torch.stack([model(torch.cat([task.support_inputs, query[None]]))[-1]
                                  for query in task.query_inputs])
    correct = (logits.argmax(dim=1) == task.query_targets).sum().item()
    return correct, cross_entropy_sum(logits, task.query_targets).item() / len(task.query_targets)
