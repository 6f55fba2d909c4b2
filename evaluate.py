"""Evaluation on test tasks: the meta-model adapted to each task and its queries scored with a metric (accuracy, or
squared error for regression), one task at a time (on the CPU, in worker processes) or many side by side (on a GPU);
a long evaluation keeps its finished tasks on disk, so that a stopped one goes on from them.
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Protocol, Union

import numpy as np
import torch
from tqdm import tqdm

import fast
import reptile
from reptile import Hyperparameters, Loss, TestTask
from utils import gather, processes, rank, read_json, write_json

TASKS_TOGETHER = 500  # evaluation tasks adapted side by side on a GPU (20-way 5-shot: about 20 GB)
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (a task's query outputs, their targets) -> a score


def correct_queries(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Classification: how many queries have their label as the largest output."""
    return (outputs.argmax(dim=-1) == labels).sum()


def mean_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression: the mean over the queries of the squared error."""
    return torch.nn.functional.mse_loss(outputs, targets)


# ----------------------------------------------------------------------------- test tasks

class TaskSampler(Protocol):
    """Where test tasks come from (omniglot.TaskSampler is one)."""

    def sample(self, classes: int, shots: int, queries: int, generator: torch.Generator) -> TestTask:
        """A new test task: `shots` support examples and `queries` queries of each of `classes` classes, labelled
        0..classes-1."""


def task_seeds(tasks: int, generator: torch.Generator) -> list[int]:
    """One seed per evaluation task, so tasks can be evaluated in any order or process."""
    return torch.randint(2 ** 62, (tasks,), generator=generator).tolist()


def test_batches(hp: Hyperparameters, support: int, generator: torch.Generator) -> torch.Tensor:
    """(test_iterations, test_batch) indices of a test task's `support` examples: its inner mini-batches."""
    return reptile.inner_batches(support, hp.test_batch, hp.test_iterations, generator, hp.replacement)


def draw_test_tasks(sampler: TaskSampler, hp: Hyperparameters,
                    seeds: list[int]) -> tuple[list[TestTask], torch.Tensor]:
    """One hp.classes-way hp.shots-shot test task per seed (one query per class), and the order of each one's support
    examples in its inner mini-batches: (tasks, steps, batch)."""
    tasks, batches = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        tasks.append(sampler.sample(hp.classes, hp.shots, 1, generator))
        batches.append(test_batches(hp, hp.classes * hp.shots, generator))
    return tasks, torch.stack(batches)


class OneTask(torch.nn.Module):
    """A model adapted to one task, in SideBySide's shapes: inputs (1, examples, ...), outputs (1, examples, ...)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs[0])[None]

    def each(self, function: Callable) -> Callable:
        """`function` of one task's tensors, applied to the task."""
        return lambda *tensors: function(*(tensor[0] for tensor in tensors))[None]

    def gradients(self, inputs: torch.Tensor, targets: torch.Tensor, loss: Loss) -> None:
        """reptile.backpropagate on the task."""
        reptile.backpropagate(self.model, inputs[0], targets[0], loss)


class SideBySide(torch.nn.Module):
    """`count` copies of a model's weights, each adapted to a task of its own: inputs (count, examples, ...) give
    outputs (count, examples, ...), one computation vmapped over the tasks (for GPUs)."""

    def __init__(self, model: torch.nn.Module, count: int):
        super().__init__()
        self.template = [model]  # a list, not a submodule: its structure is used, with these weights
        self.names = [name for name, _ in model.named_parameters()]
        # Contiguous, not channels-last: vmapped BatchNorm on CUDA does not support channels-last tensors.
        self.weights = torch.nn.ParameterList(torch.empty(count, *param.shape, device=param.device)
                                              for param in model.parameters())

    def one(self, weights: tuple, inputs: torch.Tensor) -> torch.Tensor:
        """The outputs of one task's weights."""
        return torch.func.functional_call(self.template[0], dict(zip(self.names, weights)), (inputs,))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(self.one)(tuple(self.weights), inputs)

    def each(self, function: Callable) -> Callable:
        """`function` of one task's tensors, applied to every task."""
        return torch.func.vmap(function)

    def gradients(self, inputs: torch.Tensor, targets: torch.Tensor, loss: Loss) -> None:
        """Set each task's weights' .grad to the gradient of its own loss (torch.func.grad, vmapped)."""
        task_loss = torch.func.grad(lambda weights, task_inputs, task_targets: loss(self.one(weights, task_inputs),
                                                                                    task_targets))
        gradients = torch.func.vmap(task_loss)(tuple(weight.detach() for weight in self.weights), inputs, targets)
        for weight, gradient in zip(self.weights, gradients):
            weight.grad = gradient


class TestTaskScorer:
    """Adapts copies of the meta-model to test tasks and scores their queries with `metric`: one task at a time, or
    `together` tasks side by side (SideBySide). Every task starts from the meta-weights and the inner optimizer's
    state (`inner_state`) as they are then; with cuda_graphs on CUDA, as one captured graph (validation's way)."""

    def __init__(self, meta_model: torch.nn.Module, inner_state: dict, hp: Hyperparameters, together: int = 0,
                 loss: Loss = reptile.summed_cross_entropy, cuda_graphs: bool = False,
                 metric: Metric = correct_queries):
        self.meta_model, self.inner_state, self.hp = meta_model, inner_state, hp
        self.loss, self.metric = loss, metric
        learner = copy.deepcopy(meta_model)
        self.learner = SideBySide(learner, together) if together else OneTask(learner)
        self.adapted = reptile.inner_parameters(meta_model, self.learner.parameters())  # in the optimizer's order
        # The side-by-side form steps with PyTorch's other Adam, whose arithmetic its figures were computed with.
        self.optimizer = reptile.make_inner_optimizer(self.adapted, hp.lr, hp.inner_optimizer, fused=not together)
        for index, param in enumerate(self.adapted):  # tensors to copy the inner optimizer's state into
            for key, value in inner_state["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor):  # Adam's step count stays on the CPU but when fused
                    self.optimizer.state[param][key] = torch.empty_like(param) if value.dim() else \
                        value.detach().to("cpu" if together else param.device, torch.float32).clone()
        self.held = []  # the tasks to score: support inputs and targets, query inputs and targets, mini-batches
        device = next(self.learner.parameters()).device
        self.run = fast.Graphed(lambda: (self.adapt(), self.score(hp.transductive))[1],
                                cuda_graphs and device.type == "cuda", (self.optimizer,))

    def hold(self, tasks: list[TestTask], batches: torch.Tensor) -> None:
        """Take these tasks and their inner mini-batches (tasks, steps, batch) as the ones to adapt to and score."""
        device = next(self.learner.parameters()).device
        parts = [torch.stack(part).to(device) for part in zip(*tasks)] + [batches.to(device, copy=True)]
        if [part.shape for part in parts] == [part.shape for part in self.held]:  # in place: a graph reads them
            for held, part in zip(self.held, parts):
                held.copy_(part)
        else:
            self.held = parts

    def adapt(self) -> None:
        """Set the learners to the meta-weights and the inner optimizer to its state, then adapt them to the held
        tasks' support sets."""
        with torch.no_grad():
            for param, meta_param in zip(self.learner.parameters(), self.meta_model.parameters()):
                param.copy_(meta_param)
            for index, param in enumerate(self.adapted):
                state, start = self.optimizer.state[param], self.inner_state["state"].get(index, {})
                for key in [key for key in state if key not in start]:  # made by the last task's steps
                    del state[key]
                for key, value in start.items():
                    if isinstance(state.get(key), torch.Tensor):
                        state[key].copy_(value)
                    else:  # None: SGD's momentum buffer without momentum
                        state[key] = value
        support, targets, _, _, batches = self.held
        rows = torch.arange(len(batches), device=batches.device)[:, None]
        reptile.adapt(self.learner, self.optimizer, [(support[rows, step], targets[rows, step])
                                                     for step in batches.unbind(1)],
                      self.loss, self.hp.weight_decay, type(self.learner).gradients)

    def score(self, transductive: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(metric, query loss / queries) of each held task: its queries taken all in one batch (transductive), or
        each in a batch with the support set, so that queries never share BatchNorm statistics."""
        support, _, queries, targets, _ = self.held
        # Evaluation workers turn oneDNN off for the small adaptation batches; on these larger ones it is faster
        # (20-way 5-shot: 20 batches of 101 images). allow_tf32=None leaves that setting alone (setting it warns).
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=True, allow_tf32=None):
            if transductive:
                outputs = self.learner(queries)
            else:
                outputs = torch.cat([self.learner(torch.cat([support, queries[:, query:query + 1]], dim=1))[:, -1:]
                                     for query in range(queries.shape[1])], dim=1)
            return (self.learner.each(self.metric)(outputs, targets),
                    self.learner.each(self.loss)(outputs, targets) / targets.shape[1])

    def __call__(self, tasks: list[TestTask], batches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(metric, query loss / queries) of each task (hp.transductive), each adapted from the meta-weights."""
        if isinstance(self.learner, OneTask) and len(tasks) > 1:
            scores = [self([task], task_batches[None]) for task, task_batches in zip(tasks, batches)]
            return tuple(torch.cat(part) for part in zip(*scores))
        self.hold(tasks, batches)
        return self.run()


def evaluate_tasks(meta_model: torch.nn.Module, inner_state: dict, sampler: TaskSampler, hp: Hyperparameters,
                   seeds: list[int], together: bool = False,
                   loss: Loss = reptile.summed_cross_entropy) -> list[tuple[int, float]]:
    """(correct queries, mean query loss) of one test task per seed, each adapted from the meta-weights: one at a
    time, or all side by side."""
    tasks, batches = draw_test_tasks(sampler, hp, seeds)
    scorer = TestTaskScorer(meta_model, inner_state, hp, len(seeds) if together else 0, loss)
    correct, losses = scorer(tasks, batches)
    return list(zip(correct.tolist(), losses.tolist()))


def score_new_task(scorer: TestTaskScorer, sampler: TaskSampler, generator: torch.Generator) -> tuple[float, float]:
    """The accuracy and mean query loss of a new test task of `sampler`, drawn as evaluate_tasks draws it."""
    correct, loss = scorer(*draw_test_tasks(sampler, scorer.hp, task_seeds(1, generator)))
    return correct.item() / scorer.hp.classes, loss.item()


# ----------------------------------------------------------------------------- evaluations kept on disk

def evaluation_identity(meta_state: dict, adam_state: dict, settings: dict, seeds: list[int]) -> str:
    """A digest of what an evaluation measures: the weights, the inner optimizer's state, the settings, the tasks."""
    digest = hashlib.sha256(json.dumps([settings, seeds], sort_keys=True).encode())
    for value in [*meta_state.values(), *(value for state in adam_state["state"].values()
                                          for value in state.values())]:
        digest.update(torch.as_tensor(value).detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finished_tasks(path: Path, identity: str) -> tuple[dict[int, list], float]:
    """The tasks (position: [correct queries, loss]) that a stopped evaluation of this identity kept in `path`, and
    the seconds spent on them."""
    kept = read_json(path) if path.is_file() else {}
    if kept.get("identity") != identity:
        return {}, 0.0
    return {int(position): result for position, result in kept["tasks"].items()}, kept.get("seconds", 0.0)


def keep_finished_tasks(path: Path, identity: str, tasks: dict[int, list], seconds: float) -> None:
    """Write the tasks an evaluation has finished so far and the seconds spent on them, atomically."""
    write_json(path, {"identity": identity, "seconds": round(seconds, 1),
                      "tasks": {str(position): result for position, result in tasks.items()}})


# ----------------------------------------------------------------------------- Omniglot's results.json entries

def measured(entry: dict) -> tuple:
    """What a results.json entry measured: (shots, mode, meta-iteration, tasks or repeats, evaluation seed); older
    entries carry the seed in their settings."""
    seed = entry.get("seed", entry.get("settings", {}).get("seed"))
    return (entry.get("shots"), entry.get("mode"), entry["meta_iteration"], entry.get("tasks", entry.get("repeats")),
            seed)


def evaluation_mode(transductive: bool) -> str:
    """How a test task's queries are classified, as results.json names it."""
    return "transductive" if transductive else "non-transductive"


def cell(shots: int, transductive: bool) -> str:
    """What an evaluation measures, e.g. "5-shot non-transductive"."""
    return f"{shots}-shot {evaluation_mode(transductive)}"


def result_key(entry: dict) -> str:
    """The key of a new results.json entry, from what it measured, e.g. "1-shot non-transductive at 100000, 10000
    tasks, seed 0" or "lake one-shot at 200000, seed 0"."""
    shots, mode, iteration, tasks, seed = measured(entry)
    if shots is None:
        return f"lake one-shot at {iteration}, seed {seed}"
    return f"{shots}-shot {mode} at {iteration}, {tasks} tasks, seed {seed}"


def find_result(results: dict, shots: Optional[int], mode: Optional[str], iteration: int, tasks: int,
                seed: int) -> Optional[dict]:
    """The first entry of `results` (a results.json) that measured this, or None; Lake's have no shots or mode."""
    return next((entry for entry in results.values() if measured(entry) == (shots, mode, iteration, tasks, seed)),
                None)


def unfinished_evaluation(logdir: Path, key: str, name: str, iteration: int, seed: int, tasks: int) -> Path:
    """Where an evaluation keeps the tasks it has finished until it ends, so that a stopped one resumes there."""
    return logdir / f"unfinished-evaluation-{key.replace(' ', '-')}-{name}-at-{iteration}-seed{seed}-{tasks}.json"


# ----------------------------------------------------------------------------- evaluation workers

_worker_samplers: dict = {}  # the task samplers of an evaluation worker process
# On one thread, ATen's own convolutions adapt batches of up to 15 images faster than oneDNN's (5-way 5-shot:
# 2.9 against 3.4 ms a step at batch 5), and oneDNN's larger ones (6.5 against 15.3 ms at batch 25).
ONEDNN_FROM_BATCH = 20


def start_worker(samplers: dict) -> None:
    """Set up an evaluation worker: one thread, the run's task samplers (their images in shared memory)."""
    torch.set_num_threads(1)
    _worker_samplers.update(samplers)


def evaluate_on_cpu(sampler: TaskSampler, meta_model: torch.nn.Module, inner_state: dict, hp: Hyperparameters,
                    seeds: list[int], loss: Loss = reptile.summed_cross_entropy) -> list[tuple[int, float]]:
    """evaluate_tasks with the convolution kernels that are faster on one thread at --test-batch."""
    with torch.backends.mkldnn.flags(enabled=hp.test_batch >= ONEDNN_FROM_BATCH, allow_tf32=None):
        return evaluate_tasks(meta_model, inner_state, sampler, hp, seeds, loss=loss)


def evaluate_in_worker(name: str, meta_model: torch.nn.Module, inner_state: dict, hp: Hyperparameters,
                       seeds: list[int], loss: Loss) -> list[tuple[int, float]]:
    """evaluate_on_cpu on the worker's sampler called `name`."""
    return evaluate_on_cpu(_worker_samplers[name], meta_model, inner_state, hp, seeds, loss)


def start_pool(samplers: dict, workers: int) -> Union[ProcessPoolExecutor, contextlib.nullcontext]:
    """Evaluation worker processes, one thread each (small convolutions use a second thread poorly); none for 1."""
    if workers <= 1:
        return contextlib.nullcontext()
    return ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn"),
                               initializer=start_worker, initargs=(samplers,))


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers at once, not after every task queued to them; the main process keeps those they finished."""
    for process in list((pool._processes or {}).values()):  # terminate_workers() is Python 3.14's; this is 3.11
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def score_tasks(meta_model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, samplers: dict, name: str,
                hp: Hyperparameters, tasks: int, generator: torch.Generator, pool: Optional[ProcessPoolExecutor] = None,
                workers: int = 1, progress: bool = False, share: bool = False, keep: Optional[Path] = None,
                loss: Loss = reptile.summed_cross_entropy) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-task accuracies and losses on `tasks` tasks of samplers[name] (in the pool's workers, or shared), and the
    seconds they took. With `keep`, finished tasks and their seconds are written there as they come; the same
    evaluation goes on from them, and its seconds count those of its earlier parts."""
    seeds = task_seeds(tasks, generator)
    # Copies: sending tensors to worker processes moves them into shared memory, and these must not be the model's.
    model, inner_state = copy.deepcopy(meta_model), copy.deepcopy(inner_optimizer.state_dict())
    identity = evaluation_identity(model.state_dict(), inner_state, dataclasses.asdict(hp), seeds) \
        if keep else ""
    finished, earlier_seconds = finished_tasks(keep, identity) if keep else ({}, 0.0)
    started = time.time()
    if finished and progress:
        print(f"evaluating {name}: going on after the {len(finished)} of {tasks} tasks kept in {keep}")
    positions = [position for position in range(tasks) if position not in finished]
    on_gpu = next(model.parameters()).is_cuda
    size = TASKS_TOGETHER if on_gpu else max(1, min(25, tasks // (4 * max(1, workers))))
    chunks = [positions[i:i + size] for i in range(0, len(positions), size)]
    if share:
        chunks = chunks[rank()::processes()]
    picked = [[seeds[position] for position in chunk] for chunk in chunks]
    if on_gpu:  # a GPU is fast only with large pieces of work: it adapts many tasks side by side
        parts = (evaluate_tasks(model, inner_state, samplers[name], hp, chunk, True, loss) for chunk in picked)
    elif pool is None:
        parts = (evaluate_on_cpu(samplers[name], model, inner_state, hp, chunk, loss) for chunk in picked)
    else:
        futures = [pool.submit(evaluate_in_worker, name, model, inner_state, hp, chunk, loss) for chunk in picked]
        parts = (future.result() for future in futures)
    with tqdm(total=tasks, initial=len(finished), desc=f"evaluating {name}", unit="task", disable=not progress,
              leave=False) as bar:
        for chunk, part in zip(chunks, parts):
            finished.update(zip(chunk, part))
            if keep:
                keep_finished_tasks(keep, identity, finished, earlier_seconds + time.time() - started)
            bar.update(len(part) * (processes() if share else 1))
    if share:
        finished = {position: result for process_results in gather(finished) for position, result in
                    process_results.items()}
    correct, losses = np.array([finished[position] for position in range(tasks)]).T
    return correct / hp.classes, losses, earlier_seconds + time.time() - started
