"""The GPU checks of the CUDA-graph path, in one call: run it whenever a CUDA machine is at hand.

    OMNIGLOT_MIRROR=FOLDER python check_gpu.py SCRATCH    # FOLDER holds the two Omniglot zips; runs go to SCRATCH

Each check prints PASS or FAIL with its figures, and a summary ends the output: graph replay against eager
execution (Reptile, first-order MAML, MAML), kill and resume, a CPU checkpoint resumed on CUDA, torchrun's process
group, the vmapped evaluator against the per-task one; bench.py (5-way with and without graphs, 20-way); whole runs
timed and multiplied out to their setting's length (5-way, 20-way, and the four 20-way MAML presets).
`--device cpu --quick` runs the same code on the CPU (without graphs), to try the script where there is no GPU.
"""
import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

import bench
import evaluate
import fast
import options
import reptile
import train_omniglot as T
from models import OmniglotModel
from reptile import Hyperparameters

RESULTS = []


def report(name: str, passed: bool, details: str) -> None:
    """Print one check's outcome and remember it for the summary."""
    RESULTS.append((name, passed))
    print(f"{'PASS' if passed else 'FAIL'} {name}: {details}", flush=True)


def attempt(name: str, check, *args) -> None:
    """Run one check; an exception fails it (with its last line) instead of ending the script."""
    try:
        check(*args)
    except Exception as error:
        report(name, False, f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}")


def difference(first: Iterable[torch.Tensor], second: Iterable[torch.Tensor]) -> tuple[float, bool, bool]:
    """(largest absolute difference, equal within rtol 1e-5 and atol 1e-7, bit-identical) of two models' weights."""
    pairs = list(zip(first, second, strict=True))
    return (max((a - b).abs().max().item() for a, b in pairs),
            all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs), all(torch.equal(a, b) for a, b in pairs))


def train_side(device: str, hp: Hyperparameters, iterations: int, graphs: bool, deterministic: bool = True,
               flags: Optional[dict] = None) -> tuple:
    """A meta-model after `iterations` meta-iterations (validated every 2), its validation scores, seconds, capture;
    `flags`: a preset's model, loss and side_by_side (options.preset)."""
    flags = flags or options.preset("5way1shot")[1]
    samplers = bench.synthetic_samplers(device)
    torch.manual_seed(0)
    meta_model = fast.prepare_model(OmniglotModel(hp.classes, maml=flags["model"] == "maml"), device)
    torch.backends.cudnn.deterministic = deterministic  # prepare_model holds it on CUDA: lifted to show why
    loss = options.LOSSES[flags["loss"]]
    meta_learner = reptile.MetaLearner(meta_model, hp, loss, flags["side_by_side"])
    inner_optimizer = meta_learner.inner_optimizer
    meta_iteration = fast.MetaIteration(meta_learner, samplers["meta-train"], cuda_graphs=graphs)
    generator, validation = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    scorer, scores = None, []
    started = time.perf_counter()
    for iteration in range(iterations):
        meta_iteration(reptile.meta_step_size(iteration, hp), generator)
        if (iteration + 1) % 2 == 0:
            scorer = scorer or evaluate.TestTaskScorer(meta_model, inner_optimizer.state_dict(), hp, loss=loss,
                                                       cuda_graphs=graphs)
            scores.append(evaluate.score_new_task(scorer, samplers["meta-test"], validation))
    bench.synchronize(device)
    return meta_model, scores, time.perf_counter() - started, meta_iteration.adapt.graph is not None


def graphs_against_eager(device: str, hp: Hyperparameters, iterations: int, label: str,
                         flags: Optional[dict] = None) -> None:
    """The same meta-iterations and validation tasks with and without CUDA graphs: the same meta-weights."""
    graph_model, graph_scores, graph_time, captured = train_side(device, hp, iterations, True, flags=flags)
    eager_model, eager_scores, eager_time, _ = train_side(device, hp, iterations, False, flags=flags)
    largest, close, identical = difference(graph_model.parameters(), eager_model.parameters())
    score_difference = max(abs(a - b) for pair in zip(graph_scores, eager_scores) for a, b in zip(*pair))
    report(f"graph replay = eager, {label}", close and captured == (device == "cuda"),
           f"{iterations} meta-iterations: largest difference {largest:.2e}, bit-identical {identical}; validation "
           f"scores differ by at most {score_difference:.2e}; graph captured: {captured}; "
           f"{1000 * graph_time / iterations:.1f} ms/it with graphs, {1000 * eager_time / iterations:.1f} without "
           f"(warm-up and capture included)")


def nondeterministic_cudnn(device: str, hp: Hyperparameters, iterations: int) -> None:
    """Why cuDNN is held deterministic: two eager runs without it, and the speed of graphs with and without it."""
    first, *_ = train_side(device, hp, iterations, False, deterministic=False)
    second, *_ = train_side(device, hp, iterations, False, deterministic=False)
    largest, close, identical = difference(first.parameters(), second.parameters())
    free = train_side(device, hp, 5 * iterations, True, deterministic=False)[2]
    held = train_side(device, hp, 5 * iterations, True)[2]
    report("(information) cuDNN's default algorithms", True,
           f"two eager runs of {iterations} meta-iterations: largest difference {largest:.2e}, within rtol 1e-5: "
           f"{close}, bit-identical {identical}; with graphs, {1000 * free / (5 * iterations):.1f} ms/it with "
           f"them and {1000 * held / (5 * iterations):.1f} deterministic (warm-up and capture included)")


def vmapped_evaluator(device: str, tasks: int) -> None:
    """The test-task scorer side by side (the GPU's final evaluation) against one task at a time, on this device."""
    hp = Hyperparameters(classes=5, shots=1, meta_batch=1)
    samplers = bench.synthetic_samplers(device)
    torch.manual_seed(0)
    meta_model = fast.prepare_model(OmniglotModel(hp.classes), device)
    meta_learner = reptile.MetaLearner(meta_model, hp)
    inner_optimizer = meta_learner.inner_optimizer
    meta_iteration = fast.MetaIteration(meta_learner, samplers["meta-train"])
    for iteration in range(3):  # an inner Adam state to start the test tasks from
        meta_iteration(1.0, torch.Generator().manual_seed(iteration))
    seeds = evaluate.task_seeds(tasks, torch.Generator().manual_seed(9))
    one_by_one, together = (np.array(evaluate.evaluate_tasks(meta_model, inner_optimizer.state_dict(),
                                                             samplers["meta-test"], hp, seeds, side_by_side))
                            for side_by_side in (False, True))
    agreement = (together[:, 0] == one_by_one[:, 0]).mean()
    loss_difference = np.median(np.abs(together[:, 1] - one_by_one[:, 1]) / one_by_one[:, 1])
    report("side-by-side scorer = one task at a time", agreement >= 0.98 and loss_difference < 1e-3,
           f"{tasks} tasks: same correct count in {100 * agreement:.1f}%, median relative loss difference "
           f"{loss_difference:.1e}")


def train(logdir: Path, flags: list[str], log: Path) -> subprocess.CompletedProcess:
    """train_omniglot.py LOGDIR FLAGS, its output appended to `log`."""
    with open(log, "a") as output:
        return subprocess.run([sys.executable, "train_omniglot.py", str(logdir), *flags], stdout=output,
                              stderr=subprocess.STDOUT)


def killed_and_resumed(out: Path, device: str, iterations: int, setting: str) -> None:
    """A run killed (SIGKILL) after its first checkpoint and resumed ends with the uninterrupted run's weights."""
    flags = ["--device", device, "--paper-setting", setting, "--meta-iterations", str(iterations),
             "--check-every", str(iterations // 4),
             "--validate-every", "10", "--eval-tasks", "20", "--meta-test-only", "--shots", "1", "--workers", "1"]
    log = out / f"kill_resume_{setting}.log"
    straight, killed = out / f"straight_{setting}", out / f"killed_{setting}"
    started = time.perf_counter()
    assert train(straight, flags, log).returncode == 0, f"the uninterrupted run failed: see {log}"
    seconds = time.perf_counter() - started
    with open(log, "a") as output:
        process = subprocess.Popen([sys.executable, "train_omniglot.py", str(killed), *flags], stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        first = killed / "checkpoint" / f"check-{iterations // 4}.pth"
        while not first.exists() and process.poll() is None:
            time.sleep(0.01)
        interrupted = process.poll() is None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    newest = options.folder(killed).newest_checkpoint()
    assert train(killed, flags, log).returncode == 0, f"the resumed run failed: see {log}"
    largest, close, identical = difference(*(options.folder(run).read_checkpoint(
        run / "checkpoint" / f"check-{iterations}.pth")["model"].values() for run in (straight, killed)))
    report(f"killed and resumed = uninterrupted, {setting}, {device}", interrupted and close,
           f"{iterations} meta-iterations ({seconds:.1f} s uninterrupted), killed before finishing: {interrupted} "
           f"(newest checkpoint then {newest.name}); largest difference {largest:.2e}, bit-identical: {identical}")


def cpu_checkpoint_resumed_on(out: Path, device: str) -> None:
    """A run trained on the CPU goes on on `device` from its checkpoint."""
    log = out / "cpu_then_device.log"
    flags = ["--validate-every", "10", "--eval-tasks", "20", "--meta-test-only", "--shots", "1", "--workers", "1",
             "--check-every", "10"]
    logdir = out / "cpu_then_device"
    first = train(logdir, [*flags, "--device", "cpu", "--meta-iterations", "20"], log).returncode
    second = train(logdir, [*flags, "--device", device, "--meta-iterations", "40"], log).returncode
    resumed = "resumed" in log.read_text() and (logdir / "checkpoint" / "check-40.pth").exists()
    report(f"a CPU checkpoint resumes on {device}", first == second == 0 and resumed,
           f"statuses {first} and {second}, checkpoint 40 written: {resumed}")


def process_group(out: Path, device: str) -> None:
    """torchrun's process group for `device` (in one process): all-reduces of a device and a CPU tensor."""
    torch.distributed.init_process_group(T.BACKENDS[device], init_method=f"file://{out.resolve() / 'store'}",
                                         rank=0, world_size=1)
    try:
        on_device, on_cpu = torch.ones(3, device=device), torch.ones(1)
        torch.distributed.all_reduce(on_device)
        torch.distributed.all_reduce(on_cpu)
        bench.synchronize(device)
        report(f"process group {T.BACKENDS[device]}", on_device.sum().item() == 3 and on_cpu.item() == 1,
               f"all-reduces on {device} and on the CPU gave {on_device.tolist()} and {on_cpu.tolist()}")
    finally:
        torch.distributed.destroy_process_group()
        (out / "store").unlink(missing_ok=True)


def timed_run(out: Path, device: str, flags: list[str], label: str, full_length: int) -> None:
    """Wall-clock of a whole training run (data loading, validation, checkpoints, final evaluation included), and its
    progress bar's last rate multiplied out to the `full_length` meta-iterations of the setting it tries."""
    log = out / f"{label}.log"
    started = time.perf_counter()
    status = train(out / label, ["--device", device, *flags], log).returncode
    seconds = time.perf_counter() - started
    iterations = int(flags[flags.index("--meta-iterations") + 1])
    rates = [part for part in log.read_text().replace("\r", "\n").splitlines() if "meta-training: 100%" in part]
    rate = re.search(r"([\d.]+)(s/it|it/s)[,\]]", rates[-1]) if rates else None  # before the postfix, if any
    per_iteration = None if rate is None else float(rate[1]) if rate[2] == "s/it" else 1 / float(rate[1])
    full = "" if per_iteration is None else \
        f"; at that rate, {full_length * per_iteration / 3600:.1f} h for {full_length:,}"
    report(f"timed run {label}", status == 0, f"python train_omniglot.py {' '.join(flags)}: {seconds:.0f} s in all "
           f"for {iterations} meta-iterations; progress bar at the end: {rates[-1].strip() if rates else '?'}{full}")


def run_bench(out: Path, device: str, flags: list[str], label: str) -> None:
    """bench.py with these flags; its output is printed and kept."""
    result = subprocess.run([sys.executable, "bench.py", "--device", device, *flags], capture_output=True, text=True)
    (out / f"bench_{label}.txt").write_text(result.stdout + result.stderr)
    print(result.stdout + result.stderr, end="", flush=True)
    report(f"bench.py {' '.join(flags)}", result.returncode == 0, "output above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder for the logs and runs")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (to try the script)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("equality", "runs", "bench", "timing", "maml"),
                        help="check groups to skip")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"check_gpu.py on {name}, PyTorch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    five_way, twenty_way = options.preset("5way1shot")[0], options.preset("20way1shot")[0]
    maml, maml_flags = options.preset("maml-5way1shot")
    iterations = 10 if args.quick else 50
    fomaml = dataclasses.replace(five_way, algorithm="fomaml", query_shots=5, inner_optimizer="sgd",
                                 weight_decay=0.999, replacement=True, train_shots=15, inner_steps=3)
    if "equality" not in args.skip:
        attempt("graphs, 5-way", graphs_against_eager, device, five_way, iterations, "5-way")
        attempt("graphs, 20-way", graphs_against_eager, device, twenty_way, iterations // 5, "20-way")
        attempt("graphs, first-order MAML", graphs_against_eager, device, fomaml, iterations // 5,
                "first-order MAML with tail, SGD, weight decay, replacement")
        attempt("graphs, MAML", graphs_against_eager, device, maml, iterations // 5,
                "MAML 5-way 1-shot, tasks side by side", maml_flags)
        attempt("vmapped evaluator", vmapped_evaluator, device, 20 if args.quick else 100)
        if device == "cuda":
            attempt("cuDNN's default algorithms", nondeterministic_cudnn, device, twenty_way, 10)
    if "runs" not in args.skip:
        for setting in ("5way1shot", "20way1shot"):
            attempt(f"kill and resume {setting}", killed_and_resumed, out, device, 40 if args.quick else 400,
                    setting)
        attempt("CPU checkpoint", cpu_checkpoint_resumed_on, out, device)
        attempt("process group", process_group, out, device)
    if "bench" not in args.skip:
        sizes = ["--rounds", "1", "--iterations", "2", "--tasks", "2"] if args.quick else ["--tasks", "20"]
        attempt("bench 5-way", run_bench, out, device, sizes, "5way")
        if device == "cuda":
            attempt("bench 5-way eager", run_bench, out, device, [*sizes, "--no-cuda-graphs"], "5way_eager")
        attempt("bench 20-way", run_bench, out, device, [*sizes, "--classes", "20"], "20way")
    if "timing" not in args.skip:
        short = ["--eval-tasks", "100" if args.quick else "1000", "--meta-test-only"]
        attempt("timed 5-way", timed_run, out, device,
                ["--meta-iterations", "20" if args.quick else "2000", *short], "5way1shot", five_way.meta_iterations)
        attempt("timed 20-way", timed_run, out, device,
                ["--paper-setting", "20way1shot", "--meta-iterations", "10" if args.quick else "1000", *short],
                "20way1shot", twenty_way.meta_iterations)
    if "maml" not in args.skip:  # what the 20-way MAML cells would cost on this device
        for setting in ("maml-20way1shot", "fomaml-20way1shot", "maml-20way5shot", "fomaml-20way5shot"):
            attempt(f"timed {setting}", timed_run, out, device, ["--paper-setting", setting, "--meta-iterations",
                    "2" if args.quick else "50", "--eval-tasks", "20", "--meta-test-only"], setting,
                    options.preset(setting)[0].meta_iterations)
    failed = [name for name, passed in RESULTS if not passed]
    print(f"summary: {len(RESULTS) - len(failed)} passed, {len(failed)} failed" +
          (f" ({'; '.join(failed)})" if failed else ""), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
