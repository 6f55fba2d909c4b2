"""Time the project's meta-training and evaluation against a straightforward PyTorch loop, in one process.

    python bench.py                  # 5-way 1-shot, the paper's settings, on this machine's CPU
    python bench.py --classes 20     # 20-way (inner batch 20, 10 steps; evaluation batch 10)
    python bench.py --device cuda    # add --no-cuda-graphs to time the project's eager path there
    python bench.py --maml maml-5way1shot fomaml-5way1shot   # MAML presets: tasks one after another or side by side

Both sides run the same tasks, interleaved round by round. The images are random binary 28x28 images in the
paper split's shape (1,200 meta-training characters in 4 rotations, 423 meta-test characters): the work does
not depend on the pixels, and no data folder is needed.
"""
import argparse
import contextlib
import copy
import time
from typing import Callable, ContextManager, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

import evaluate
import fast
import omniglot
import options
import oracle
import reptile
from models import OmniglotModel
from reptile import Hyperparameters
from utils import HelpFormatter, non_negative_int, positive_int


# ----------------------------------------------------------------------------- the straightforward baseline

def baseline_meta_iteration(meta_model: OmniglotModel, adam_state: dict, sampler: omniglot.TaskSampler,
                            hp: Hyperparameters, step_size: float, generator: torch.Generator) -> dict:
    """One meta-iteration the plain way (oracle.py) on tasks drawn one by one; the new inner Adam state."""
    tasks = []
    for _ in range(hp.meta_batch):
        task = sampler.sample(hp.classes, hp.train_shots, 0, generator)
        order = reptile.inner_batches(len(task.support_inputs), hp.batch, hp.inner_steps, generator)
        tasks.append([(task.support_inputs[rows], task.support_targets[rows]) for rows in order])
    return oracle.reptile_meta_iteration(meta_model, adam_state, tasks, hp.lr, step_size)


def baseline_evaluate(meta_model: OmniglotModel, adam_state: dict, sampler: omniglot.TaskSampler,
                      hp: Hyperparameters, seeds: list[int]) -> list[tuple[int, float]]:
    """(correct queries, query loss) of one task per seed, the plain way (oracle.py)."""
    results = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        task = sampler.sample(hp.classes, hp.shots, 1, generator)
        order = reptile.inner_batches(len(task.support_inputs), hp.test_batch, hp.test_iterations, generator)
        results.append(oracle.score_test_task(meta_model, adam_state, task, order, hp.lr, hp.transductive))
    return results


# ----------------------------------------------------------------------------- measuring

def synthetic_samplers(device: str, seed: int = 0) -> dict:
    """Task samplers over random binary images shaped like the paper split."""
    images = (torch.rand(1623, omniglot.DRAWERS, omniglot.IMAGE_SIZE, omniglot.IMAGE_SIZE,
                         generator=torch.Generator().manual_seed(seed)) > 0.2).float().to(device)
    train, test = omniglot.split_sizes("paper")
    return {"meta-train": omniglot.TaskSampler(images[:train], omniglot.ROTATIONS),
            "meta-test": omniglot.TaskSampler(images[train:train + test])}


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that clocks measure it."""
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a large float32 matrix product on this device."""
    a = torch.randn(size, size, device=device)
    a @ a
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def time_in_turn(sides: dict[str, Callable[[torch.Generator], None]], rounds: int, device: str, seed: int = 0,
                 around: Optional[Callable[[str], ContextManager]] = None) -> dict[str, float]:
    """The seconds each side's work took in all, over `rounds` rounds after an untimed warm-up round; within a round
    the sides run in turn, each from the same state of the random generator it is given, inside `around(side)` if
    given (entered and left untimed)."""
    seconds, generator = dict.fromkeys(sides, 0.0), torch.Generator().manual_seed(seed)
    for round_ in range(rounds + 1):
        state = generator.get_state()
        for side, work in sides.items():
            generator.set_state(state)
            with around(side) if around else contextlib.nullcontext():
                synchronize(device)
                started = time.perf_counter()
                work(generator)
                synchronize(device)
                if round_:
                    seconds[side] += time.perf_counter() - started
    return seconds


def flops_of(function) -> int:
    """Floating-point operations that `function()` performs, as torch counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


MAML_SETTINGS = [name for name in options.PAPER_SETTINGS if "maml" in name]


def time_maml_forms(setting: str, device: str, rounds: int, iterations: int) -> None:
    """Print the seconds a meta-iteration of a MAML preset takes with its tasks adapted one after another and side by
    side (--side-by-side), timed in turn round by round on the same tasks, and what 60,000 take at each."""
    hp, flags = options.preset(setting)
    sampler = synthetic_samplers(device)["meta-train"]
    torch.manual_seed(0)
    model = OmniglotModel(hp.classes, maml=flags["model"] == "maml")
    forms = {form: fast.MetaIteration(reptile.MetaLearner(fast.prepare_model(copy.deepcopy(model), device), hp,
                                                          options.LOSSES[flags["loss"]], side_by_side), sampler)
             for form, side_by_side in (("one after another", False), ("side by side", True))}
    seconds = {form: total / (rounds * iterations) for form, total in time_in_turn(
        {form: lambda generator, step=step: [step(hp.meta_lr, generator) for _ in range(iterations)]
         for form, step in forms.items()}, rounds, device).items()}
    chosen = "side by side" if flags["side_by_side"] else "one after another"
    print(f"{setting}: " + ", ".join(f"{form} {each:.3f} s/it ({each * hp.meta_iterations / 3600:.1f} h)"
                                     for form, each in seconds.items())
          + f"; ratio {seconds['one after another'] / seconds['side by side']:.2f}x; the preset: {chosen}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--classes", type=int, choices=(5, 20), default=5, help="N-way setting")
    parser.add_argument("--shots", type=positive_int, default=1, help="K-shot of the evaluation tasks")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on CUDA, run the project's meta-iterations and validation without CUDA graphs")
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds, each timing both sides in turn")
    parser.add_argument("--iterations", type=positive_int, default=10, help="meta-iterations per side and round")
    parser.add_argument("--tasks", type=positive_int, default=40, help="evaluation tasks per side and round")
    parser.add_argument("--workers", type=non_negative_int, default=options.build_parser().get_default("workers"),
                        help="the project's evaluation worker processes (CPU)")
    parser.add_argument("--maml", nargs="+", choices=MAML_SETTINGS, metavar="SETTING",
                        help="instead, time these MAML presets' meta-iterations with the tasks one after another and "
                        "side by side (" + ", ".join(MAML_SETTINGS) + "; meta-iterations per form and round: "
                        "--iterations)")
    bench = parser.parse_args()
    if bench.maml:
        print(f"bench: MAML presets, {bench.device}"
              f"{f' ({torch.get_num_threads()} threads)' if bench.device == 'cpu' else ''}, {bench.rounds} rounds of "
              f"{bench.iterations} meta-iterations")
        for setting in bench.maml:
            time_maml_forms(setting, bench.device, bench.rounds, bench.iterations)
        return
    hp, _ = options.preset(f"{bench.classes}way{bench.shots}shot")
    device = bench.device
    samplers = synthetic_samplers(device)
    print(f"bench: {hp.classes}-way {hp.shots}-shot, paper settings, {device}"
          f"{f' ({torch.get_num_threads()} threads)' if device == 'cpu' else ''}, {bench.rounds} rounds")
    print(f"matmul peak: {matmul_peak(device):.0f} GFLOP/s")

    torch.manual_seed(0)
    baseline_model = OmniglotModel(hp.classes).to(device)
    project_model = fast.prepare_model(OmniglotModel(hp.classes), device)
    project_model.load_state_dict(baseline_model.state_dict())
    meta_learner = reptile.MetaLearner(project_model, hp)
    inner_optimizer = meta_learner.inner_optimizer
    meta_iteration = fast.MetaIteration(meta_learner, samplers["meta-train"], cuda_graphs=bench.cuda_graphs)
    adam_state = {"state": {}, "param_groups": inner_optimizer.state_dict()["param_groups"]}

    def baseline(generator: torch.Generator) -> None:
        nonlocal adam_state
        for _ in range(bench.iterations):
            adam_state = baseline_meta_iteration(baseline_model, adam_state, samplers["meta-train"], hp, 0.5, generator)

    def project(generator: torch.Generator) -> None:
        for _ in range(bench.iterations):
            meta_iteration(0.5, generator)

    train_flops = flops_of(lambda: meta_iteration(0.5, torch.Generator().manual_seed(0)))
    times = time_in_turn({"baseline": baseline, "project": project}, bench.rounds, device, seed=1)
    iterations = bench.rounds * bench.iterations
    train_ms = {side: 1000 * seconds / iterations for side, seconds in times.items()}
    train_ratio = train_ms["baseline"] / train_ms["project"]
    print(f"meta-training ({hp.meta_batch} tasks x {hp.inner_steps} steps of batch {hp.batch}): "
          f"baseline {train_ms['baseline']:.1f} ms/it, project {train_ms['project']:.1f} ms/it, "
          f"ratio {train_ratio:.2f}x; project {train_flops / train_ms['project'] / 1e6:.0f} GFLOP/s")

    scorer = evaluate.TestTaskScorer(project_model, inner_optimizer.state_dict(), hp, cuda_graphs=bench.cuda_graphs)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):  # warm-up (and, on CUDA, capture)
        evaluate.score_new_task(scorer, samplers["meta-test"], generator)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(bench.iterations):
        evaluate.score_new_task(scorer, samplers["meta-test"], generator)
    validation_ms = 1000 * (time.perf_counter() - started) / bench.iterations
    validate_every = options.build_parser().get_default("validate_every")
    print(f"validation (one meta-train and one meta-test task every {validate_every} meta-iterations): "
          f"{validation_ms:.1f} ms a task, {2 * validation_ms / validate_every:.1f} ms per meta-iteration")

    workers = bench.workers if device == "cpu" else 0
    eval_flops = flops_of(lambda: evaluate.evaluate_tasks(project_model, inner_optimizer.state_dict(),
                                                          samplers["meta-test"], hp, [0]))
    pool, startup = None, []

    @contextlib.contextmanager
    def workers_of(side: str):
        """The project's worker processes, alive only while its side runs (an idle pool that has worked slows this
        process down, 3x per step seen here, which would handicap the baseline), started as a run does once."""
        nonlocal pool
        with evaluate.start_pool(samplers, workers if side == "project" else 0) as pool:
            started = time.perf_counter()
            if pool:
                evaluate.score_tasks(project_model, inner_optimizer, samplers, "meta-test", hp, workers,
                                     torch.Generator(), pool, workers)
                startup.append(time.perf_counter() - started)
            yield

    times = time_in_turn({
        "baseline": lambda generator: baseline_evaluate(baseline_model, adam_state, samplers["meta-test"], hp,
                                                        evaluate.task_seeds(bench.tasks, generator)),
        "project": lambda generator: evaluate.score_tasks(project_model, inner_optimizer, samplers, "meta-test", hp,
                                                          bench.tasks, generator, pool, workers),
    }, bench.rounds, device, seed=2, around=workers_of)
    tasks = bench.rounds * bench.tasks
    rate = {side: tasks / seconds for side, seconds in times.items()}
    eval_ratio = rate["project"] / rate["baseline"]
    if device == "cuda":
        how = f"up to {evaluate.TASKS_TOGETHER} tasks adapted side by side on the GPU"
    elif workers > 1:
        how = f"{workers} worker processes, one thread each, started in {sum(startup) / len(startup):.1f} s"
    else:
        how = "in this process"
    print(f"evaluation ({hp.test_iterations} steps of batch {hp.test_batch}, non-transductive): "
          f"baseline {rate['baseline']:.1f} tasks/s, project {rate['project']:.1f} tasks/s, ratio {eval_ratio:.2f}x "
          f"({how}); project {eval_flops * rate['project'] / 1e9:.0f} GFLOP/s")
    print(f"train speedup {train_ratio:.2f}x, eval speedup {eval_ratio:.2f}x")


if __name__ == "__main__":
    main()
