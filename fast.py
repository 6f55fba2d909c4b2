"""The fast path beside reptile.py: the same meta-iteration (reptile.MetaLearner) on tasks drawn as rows of an example
bank kept on the model's device (one gather a task), replayed as one captured graph on CUDA, shared out under
torchrun. tests/test_fast.py holds it equal to the plain algorithm, bit for bit.
"""
import sys
from typing import Callable, Optional, Protocol

import torch

from reptile import Hyperparameters, MetaLearner, inner_batches


class Bank(Protocol):
    """Where meta-training tasks come from, for the fast path (omniglot.TaskSampler is one)."""

    def bank(self) -> torch.Tensor:
        """Every example's input, stacked along the first dimension."""

    def draw_rows(self, classes: int, shots: int, queries: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A new task: the bank rows of its examples and their targets, each (classes, shots + queries): per class,
        `shots` examples and `queries` others, all distinct."""


def prepare_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model on `device`, its convolution weights channels-last (faster small convolutions). On CUDA, cuDNN is held
    deterministic: some of its algorithms add in a varying order, which Adam turns into full-size steps."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.deterministic = True
    return model.to(device, memory_format=torch.channels_last)


def query_shots(hp: Hyperparameters) -> int:
    """Examples per class kept apart for the query, the last mini-batch (0: it is drawn like the others)."""
    return hp.query_shots if hp.algorithm in ("fomaml", "maml") and hp.query_shots else 0


def mini_batch_sizes(hp: Hyperparameters) -> list[int]:
    """The number of examples in each inner mini-batch of a meta-training task, in order."""
    query = query_shots(hp)
    return [hp.batch] * (hp.inner_steps - (1 if query else 0)) + ([hp.classes * query] if query else [])


def draw_task(sampler: Bank, hp: Hyperparameters, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A new meta-training task: the bank rows of its inner mini-batches' examples, in order, and their targets; with
    a query, the last mini-batch is query_shots examples per class that no earlier one holds."""
    query = query_shots(hp)
    shots = hp.train_shots - query
    rows, targets = sampler.draw_rows(hp.classes, shots, query, generator)
    order = inner_batches(hp.classes * shots, hp.batch, hp.inner_steps - (1 if query else 0), generator,
                          hp.replacement).reshape(-1)
    return (torch.cat([rows[:, :shots].reshape(-1)[order], rows[:, shots:].reshape(-1)]),
            torch.cat([targets[:, :shots].reshape(-1)[order], targets[:, shots:].reshape(-1)]))


def mini_batches(bank: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                 sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A task drawn by draw_task as reptile.py takes it: its mini-batches (examples from `bank`, targets), in order."""
    return list(zip(bank[rows].split(sizes), targets.split(sizes)))


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
    """Meta-iterations of a MetaLearner on tasks drawn from a Bank: drawn on the CPU as rows of the bank, kept on the
    model's device, and adapted to there; on CUDA the adaptation is replayed as one captured graph."""

    def __init__(self, meta_learner: MetaLearner, sampler: Bank, tasks: Optional[int] = None,
                 cuda_graphs: bool = True):
        self.meta_learner, self.sampler, self.hp = meta_learner, sampler, meta_learner.hp
        self.tasks = self.hp.meta_batch if tasks is None else tasks  # under torchrun, this process's share
        device = next(meta_learner.model.parameters()).device
        self.bank = sampler.bank().to(device)
        self.sizes = mini_batch_sizes(self.hp)
        self.rows, self.targets = None, None  # the drawn tasks, on the device; a captured graph reads them in place
        self.adapt = Graphed(self.adapt_to_drawn_tasks, cuda_graphs and device.type == "cuda",
                             (meta_learner.inner_optimizer,))

    def adapt_to_drawn_tasks(self) -> None:
        """MetaLearner.accumulate on the tasks in self.rows and self.targets."""
        self.meta_learner.accumulate([mini_batches(self.bank, rows, targets, self.sizes)
                                      for rows, targets in zip(self.rows, self.targets)])

    def __call__(self, step_size: float, generator: torch.Generator,
                 all_reduce: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """One meta-iteration: adapt the meta-model to each task of a meta-batch, then take the meta-step. Shared
        between processes, each adapts its share of the tasks and `all_reduce` sums the shares in place."""
        rows, targets = (torch.stack(part) for part in zip(*[draw_task(self.sampler, self.hp, generator)
                                                            for _ in range(self.tasks)]))
        if self.rows is None:
            self.rows, self.targets = rows.to(self.bank.device), targets.to(self.bank.device)
        for held, drawn in ((self.rows, rows), (self.targets, targets)):
            held.copy_(drawn.pin_memory() if held.is_cuda else drawn, non_blocking=True)
        self.adapt()
        if all_reduce is not None:
            with torch.no_grad():
                means = self.meta_learner.mean
                total = torch.cat([mean.reshape(-1) for mean in means])
                all_reduce(total)
                for mean, summed in zip(means, total.split([mean.numel() for mean in means])):
                    mean.copy_(summed.view(mean.shape))
        self.meta_learner.meta_update(step_size)
