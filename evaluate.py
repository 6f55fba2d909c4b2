"""Evaluation on test tasks: adapting the meta-model to a task and scoring its queries, one task at a time (on the
CPU, in worker processes) or many side by side (on a GPU), validation during training, and confidence intervals.
"""
import contextlib
import copy
import dataclasses
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm import tqdm

import omniglot
import reptile
import run_folder
from models import OmniglotModel
from reptile import Hyperparameters
from utils import gather, processes, rank

TASKS_TOGETHER = 500  # evaluation tasks adapted side by side on a GPU (20-way 5-shot: about 20 GB)


# ----------------------------------------------------------------------------- test tasks

def task_seeds(tasks: int, generator: torch.Generator) -> list[int]:
    """One seed per evaluation task, so tasks can be evaluated in any order or process."""
    return torch.randint(2 ** 62, (tasks,), generator=generator).tolist()


def adapt_to_test_task(model: OmniglotModel, learner: OmniglotModel, optimizer: torch.optim.Optimizer,
                       adam_state: dict, task: omniglot.Task, hp: Hyperparameters,
                       generator: torch.Generator) -> None:
    """Set `learner` to the meta-weights of `model`, then adapt it to a test task's support images."""
    reptile.copy_weights(model, learner)
    # Every test task starts from the training Adam state; load_state_dict would share its tensors.
    optimizer.load_state_dict(copy.deepcopy(adam_state))
    batches = reptile.inner_batches(len(task.support_images), hp.test_batch, hp.test_iterations, generator,
                                    hp.replacement)
    reptile.adapt(learner, optimizer, reptile.mini_batches(task.support_images, task.support_labels, batches),
                  hp.weight_decay)


def classify_queries(learner: OmniglotModel, task: omniglot.Task, transductive: bool) -> torch.Tensor:
    """Log-probabilities of a task's queries: all in one batch (transductive), or each with the support images."""
    # Evaluation workers turn oneDNN off for the small adaptation batches; on these larger ones it is faster
    # (20-way 5-shot: 20 batches of 101 images). allow_tf32=None leaves that setting alone (setting it warns).
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=True, allow_tf32=None):
        if transductive:
            return learner(task.query_images)
        # Each query in a batch with the support images: queries never share BatchNorm statistics.
        return torch.cat([learner(torch.cat([task.support_images, query[None]]))[-1:] for query in task.query_images])


def evaluate_tasks(meta_state: dict, adam_state: dict, sampler: omniglot.TaskSampler, hp: Hyperparameters,
                   seeds: list[int]) -> list[tuple[int, float]]:
    """(correct queries, mean query loss) of one test task per seed, each adapted from the meta-weights."""
    model = reptile.prepare_model(OmniglotModel(hp.classes), sampler.images.device)
    model.load_state_dict(meta_state)
    learner, optimizer = reptile.make_learner(model, hp.lr, hp.inner_optimizer)
    results = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        task = sampler.sample(hp.classes, hp.shots, 1, generator)
        adapt_to_test_task(model, learner, optimizer, adam_state, task, hp, generator)
        log_probs = classify_queries(learner, task, hp.transductive)
        correct = (learner.predict(log_probs) == task.query_labels).sum().item()
        results.append((correct, torch.nn.functional.nll_loss(log_probs, task.query_labels).item()))
    return results


class TestTaskScorer:
    """evaluate_tasks for one task at a time, from the meta-model and inner optimizer as they are while training;
    on CUDA the adaptation and scoring are replayed as one captured graph (the training validation's way)."""

    def __init__(self, meta_model: OmniglotModel, learner: OmniglotModel, inner_optimizer: torch.optim.Optimizer,
                 sampler: omniglot.TaskSampler, hp: Hyperparameters, cuda_graphs: bool = True,
                 bank: Optional[torch.Tensor] = None):
        self.meta_model, self.training_learner, self.training_optimizer = meta_model, learner, inner_optimizer
        self.sampler, self.hp = sampler, hp
        self.learner, self.optimizer = reptile.make_learner(meta_model, hp.lr, hp.inner_optimizer)
        self.optimizer.load_state_dict(copy.deepcopy(inner_optimizer.state_dict()))  # its state tensors, to copy into
        device = next(meta_model.parameters()).device
        self.bank = sampler.bank().to(device) if bank is None else bank  # the meta-training one is 301 MB: shared
        self.support_labels = torch.arange(hp.classes, device=device).repeat_interleave(hp.shots)
        self.query_labels = torch.arange(hp.classes, device=device)
        self.sizes = [hp.classes * hp.shots, hp.classes, hp.test_iterations * hp.test_batch]
        self.drawn = torch.zeros(sum(self.sizes), dtype=torch.long, device=device)
        self.score = reptile.Graphed(self.adapt_and_score, cuda_graphs and device.type == "cuda", (self.optimizer,))

    def adapt_and_score(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(correct queries, mean query loss) of the task in self.drawn, adapted from the current meta-weights."""
        reptile.copy_weights(self.meta_model, self.learner)
        with torch.no_grad():  # every test task starts from the training state of the inner optimizer
            for param, training_param in zip(self.learner.parameters(), self.training_learner.parameters()):
                for key, value in self.optimizer.state[param].items():
                    value.copy_(self.training_optimizer.state[training_param][key])
        support_rows, query_rows, positions = self.drawn.split(self.sizes)
        support = self.bank[support_rows]
        batches = [(support[indices], self.support_labels[indices])
                   for indices in positions.view(self.hp.test_iterations, self.hp.test_batch)]
        reptile.adapt(self.learner, self.optimizer, batches, self.hp.weight_decay)
        task = omniglot.Task(support, self.support_labels, self.bank[query_rows], self.query_labels)
        log_probs = classify_queries(self.learner, task, self.hp.transductive)
        return ((self.learner.predict(log_probs) == self.query_labels).sum(),
                torch.nn.functional.nll_loss(log_probs, self.query_labels))

    def __call__(self, generator: torch.Generator) -> tuple[float, float]:
        """The accuracy and mean query loss of a new test task, drawn as evaluate_tasks draws it."""
        hp = self.hp
        task_generator = torch.Generator().manual_seed(task_seeds(1, generator)[0])
        chosen, drawers = self.sampler.draw(hp.classes, hp.shots, 1, task_generator)
        rows = omniglot.bank_rows(chosen, drawers)
        batches = reptile.inner_batches(hp.classes * hp.shots, hp.test_batch, hp.test_iterations, task_generator,
                                        hp.replacement)
        drawn = torch.cat([rows[:, :hp.shots].reshape(-1), rows[:, hp.shots], batches.reshape(-1)])
        self.drawn.copy_(drawn.pin_memory() if self.drawn.is_cuda else drawn, non_blocking=True)
        correct, loss = self.score()
        return correct.item() / hp.classes, loss.item()


def evaluate_tasks_together(meta_state: dict, adam_state: dict, sampler: omniglot.TaskSampler, hp: Hyperparameters,
                            seeds: list[int]) -> list[tuple[int, float]]:
    """evaluate_tasks, with all the tasks adapted side by side as one computation vmapped over tasks (for GPUs)."""
    device = sampler.images.device
    model = OmniglotModel(hp.classes).to(device)
    tasks, batches = [], []
    for seed in seeds:  # the same draws, in the same order, as evaluate_tasks
        generator = torch.Generator().manual_seed(seed)
        tasks.append(sampler.sample(hp.classes, hp.shots, 1, generator))
        batches.append(reptile.inner_batches(hp.classes * hp.shots, hp.test_batch, hp.test_iterations, generator,
                                             hp.replacement))
    support, support_labels, queries, query_labels = (torch.stack(part) for part in zip(*tasks))
    batches = torch.stack(batches).to(device)  # (tasks, steps, batch)
    count = len(seeds)
    # Contiguous, not channels-last: vmapped BatchNorm on CUDA does not support channels-last tensors.
    params = {name: value.to(device).expand(count, *value.shape).contiguous().requires_grad_()
              for name, value in meta_state.items()}
    # One inner optimizer over the weights of all the tasks stacked (Adam and SGD work element by element), each
    # task starting from the training state of the inner optimizer.
    group = adam_state["param_groups"][0]
    optimizer = reptile.make_inner_optimizer(params.values(), group["lr"], hp.inner_optimizer, fused=False)
    for index, param in enumerate(params.values()):
        if index in adam_state["state"]:
            # Adam's step count stays on the CPU: only its fused and capturable forms take it on the GPU.
            optimizer.state[param] = {key: value.to(device).expand_as(param).contiguous() if value.dim() else
                                      value.detach().cpu().clone() for key, value in adam_state["state"][index].items()}

    def loss(task_params: dict, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return reptile.summed_cross_entropy(torch.func.functional_call(model, task_params, (images,)), labels)

    task_gradients = torch.func.vmap(torch.func.grad(loss))
    rows = torch.arange(count, device=device)[:, None]
    for step in range(hp.test_iterations):
        if hp.weight_decay != 1.0:
            with torch.no_grad():
                for param in params.values():
                    param.mul_(hp.weight_decay)
        indices = batches[:, step]
        detached = {name: param.detach() for name, param in params.items()}
        gradients = task_gradients(detached, support[rows, indices], support_labels[rows, indices])
        for name, param in params.items():
            param.grad = gradients[name]
        optimizer.step()
    params = {name: param.detach() for name, param in params.items()}

    forward = torch.func.vmap(lambda task_params, images: torch.func.functional_call(model, task_params, (images,)))
    with torch.no_grad():
        if hp.transductive:
            log_probs = forward(params, queries)  # (tasks, classes, classes)
        else:  # each query in a batch with its task's support images, one query position at a time
            log_probs = torch.stack([forward(params, torch.cat([support, queries[:, q:q + 1]], dim=1))[:, -1]
                                     for q in range(queries.shape[1])], dim=1)
        correct = (log_probs.argmax(dim=2) == query_labels).sum(dim=1)
        losses = torch.nn.functional.nll_loss(log_probs.transpose(1, 2), query_labels, reduction="none").mean(dim=1)
    return list(zip(correct.tolist(), losses.tolist()))


def confidence_interval(accuracies: np.ndarray) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean of per-task accuracies."""
    return 1.96 * accuracies.std(ddof=1) / math.sqrt(len(accuracies)) if len(accuracies) > 1 else float("nan")


# ----------------------------------------------------------------------------- evaluation workers

_worker_samplers: dict = {}  # the task samplers of an evaluation worker process
# On one thread, ATen's own convolutions adapt batches of up to 15 images faster than oneDNN's (5-way 5-shot:
# 2.9 against 3.4 ms a step at batch 5), and oneDNN's larger ones (6.5 against 15.3 ms at batch 25).
ONEDNN_FROM_BATCH = 20


def start_worker(samplers: dict) -> None:
    """Set up an evaluation worker: one thread, the run's task samplers (their images in shared memory)."""
    torch.set_num_threads(1)
    _worker_samplers.update(samplers)


def evaluate_on_cpu(sampler: omniglot.TaskSampler, meta_state: dict, adam_state: dict, hp: Hyperparameters,
                    seeds: list[int]) -> list[tuple[int, float]]:
    """evaluate_tasks with the convolution kernels that are faster on one thread at --test-batch."""
    with torch.backends.mkldnn.flags(enabled=hp.test_batch >= ONEDNN_FROM_BATCH, allow_tf32=None):
        return evaluate_tasks(meta_state, adam_state, sampler, hp, seeds)


def evaluate_in_worker(name: str, meta_state: dict, adam_state: dict, hp: Hyperparameters,
                       seeds: list[int]) -> list[tuple[int, float]]:
    """evaluate_on_cpu on the worker's sampler called `name`."""
    return evaluate_on_cpu(_worker_samplers[name], meta_state, adam_state, hp, seeds)


def start_pool(samplers: dict, workers: int) -> Union[ProcessPoolExecutor, contextlib.nullcontext]:
    """Evaluation worker processes, one thread each (small convolutions use a second thread poorly)."""
    if workers <= 1 or any(sampler.images.is_cuda for sampler in samplers.values()):
        return contextlib.nullcontext()
    return ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn"),
                               initializer=start_worker, initargs=(samplers,))


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers at once: the tasks they had finished are kept by the main process, the rest are dropped.

    A graceful shutdown would wait for every task already queued to them, and the interpreter's exit would too.
    """
    for process in list((pool._processes or {}).values()):  # terminate_workers() is Python 3.14's; this is 3.11
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def score_tasks(meta_model: OmniglotModel, inner_optimizer: torch.optim.Optimizer, samplers: dict, name: str,
                hp: Hyperparameters, tasks: int, generator: torch.Generator, pool: Optional[ProcessPoolExecutor] = None,
                workers: int = 1, progress: bool = False, share: bool = False,
                keep: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-task accuracies and losses on `tasks` tasks of samplers[name] (in the pool's workers, or shared).

    With `keep`, finished tasks are written there as they come (with the seconds spent on them), and an evaluation
    of the same weights, settings and tasks that finds the file goes on from them.
    """
    seeds = task_seeds(tasks, generator)
    # Copies: sending tensors to worker processes moves them into shared memory, and these must not be the model's.
    meta_state = {key: value.detach().cpu().clone() for key, value in meta_model.state_dict().items()}
    adam_state = copy.deepcopy(inner_optimizer.state_dict())
    identity = run_folder.evaluation_identity(meta_state, adam_state, dataclasses.asdict(hp), seeds) if keep else ""
    finished, earlier_seconds = run_folder.finished_tasks(keep, identity) if keep else ({}, 0.0)
    started = time.time()
    if finished and progress:
        print(f"evaluating {name}: going on after the {len(finished)} of {tasks} tasks kept in {keep}")
    positions = [position for position in range(tasks) if position not in finished]
    on_gpu = samplers[name].images.is_cuda
    size = TASKS_TOGETHER if on_gpu else max(1, min(25, tasks // (4 * max(1, workers))))
    chunks = [positions[i:i + size] for i in range(0, len(positions), size)]
    if share:
        chunks = chunks[rank()::processes()]
    picked = [[seeds[position] for position in chunk] for chunk in chunks]
    if on_gpu:  # a GPU is fast only with large pieces of work: it adapts many tasks side by side
        parts = (evaluate_tasks_together(meta_state, adam_state, samplers[name], hp, chunk)
                 for chunk in picked)
    elif pool is None:
        parts = (evaluate_on_cpu(samplers[name], meta_state, adam_state, hp, chunk) for chunk in picked)
    else:
        futures = [pool.submit(evaluate_in_worker, name, meta_state, adam_state, hp, chunk) for chunk in picked]
        parts = (future.result() for future in futures)
    with tqdm(total=tasks, initial=len(finished), desc=f"evaluating {name}", unit="task", disable=not progress,
              leave=False) as bar:
        for chunk, part in zip(chunks, parts):
            finished.update(zip(chunk, part))
            if keep:
                run_folder.keep_finished_tasks(keep, identity, finished, earlier_seconds + time.time() - started)
            bar.update(len(part) * (processes() if share else 1))
    if share:
        finished = {position: result for process_results in gather(finished) for position, result in
                    process_results.items()}
    correct, losses = np.array([finished[position] for position in range(tasks)]).T
    return correct / hp.classes, losses
