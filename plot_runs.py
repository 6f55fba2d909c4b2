"""Plot the meta-test accuracy of runs against meta-iteration, from their TensorBoard event files.

    pip install matplotlib                       # the one thing this script needs beyond requirements.txt
    python plot_runs.py runs/5way runs/20way     # writes runs/accuracy.png
    python plot_runs.py runs/combinations/*/ --summarize 100  # writes each run's curve.json
    python plot_runs.py runs/5way* runs/20way* runs/combinations/g*/ --tensorboard-means  # each run's mean100/
    python plot_runs.py runs/5way-exact-split --hours   # how long its event files say it trained

Each logged point is the accuracy on one meta-test task, so the curves are moving averages over a window of
meta-iterations. A run without event files is drawn from its curve.json (block means, small enough to commit);
--summarize merges a curve.json with newer event files, keeping a block that spans a resumption as two parts.
"""
import argparse
import shutil
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from utils import UserError, positive_int, pyplot, read_json, run_script, write_json

TAG = "meta-test/accuracy"
CURVE = "curve.json"
SETS = ("meta-train", "meta-test")
RECENT = 100  # the validation tasks in train_omniglot.py's logged mean (<set>/accuracy_mean100)
MEANS = "mean100"  # the folder of a run that holds the recomputed means, shown by TensorBoard as a run of its own
MEANS_EVERY = 100  # meta-iterations between two recomputed means (all of them would be several MB a run)


def logged_points(logdir: Path, tag: str, missing_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(meta-iterations, values) of one scalar in a run's event files, in order; empty if it has none."""
    if not any(logdir.glob("events.out.tfevents.*")):
        return np.array([], dtype=int), np.array([])
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        if missing_ok:
            return np.array([], dtype=int), np.array([])
        raise UserError(f"{logdir} holds no '{tag}' scalars; is it a run of train_omniglot.py?")
    points = sorted(events.Scalars(tag), key=lambda point: point.step)
    return np.array([p.step for p in points]), np.array([p.value for p in points])


class Points(NamedTuple):
    """A run's values of one scalar: each logged value on its own, after the blocks of its curve.json that end
    before the first of them (all of them, where no event file is left)."""
    steps: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    block: Optional[int]  # the curve's block size, None if no block is used
    logged_from: float  # the first logged meta-iteration, inf if none is logged


def read_points(logdir: Path, tag: str = TAG) -> Points:
    """A run's values of `tag`, from its event files and its curve.json."""
    if not logdir.is_dir():
        raise UserError(f"{logdir} is not a run folder")
    steps, values = logged_points(logdir, tag)
    logged_from = steps[0] if len(steps) else np.inf
    ends, sums, counts, block = np.array([], dtype=int), np.array([]), np.array([]), None
    if (logdir / CURVE).is_file():
        curve = read_json(logdir / CURVE)
        if curve["tag"] != tag:
            raise UserError(f"{logdir / CURVE} holds '{curve['tag']}', not '{tag}'")
        ends, counts = np.array(curve["meta_iterations"]), np.array(curve["counts"])
        sums = np.array(curve["means"]) * counts
        earlier = ends < logged_from
        ends, sums, counts = ends[earlier], sums[earlier], counts[earlier]
        block = curve["block"] if earlier.any() else None
    if not len(steps) and not len(ends):
        raise UserError(f"{logdir} holds no '{tag}' scalars; is it a run of train_omniglot.py?")
    return Points(np.concatenate([ends, steps]), np.concatenate([sums, values]),
                  np.concatenate([counts, np.ones(len(steps))]), block, logged_from)


def moving_average(steps: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """At each point, the mean of the values logged in the last `window` meta-iterations (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.searchsorted(steps, steps - window, side="right")
    ends = np.arange(1, len(values) + 1)
    return (sums[ends] - sums[starts]) / (ends - starts)


def block_means(steps: np.ndarray, sums: np.ndarray, counts: np.ndarray, block: int,
                logged_from: float = np.inf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ends, means, counts) of the values in each block of `block` meta-iterations (1..block, ...), each at the
    block's last meta-iteration (a last, partial block ends where the run did). A block with values on both sides
    of meta-iteration `logged_from` is kept as two parts, the first ending at its last value before it."""
    later = steps >= logged_from
    keys, index = np.unique(2 * ((steps - 1) // block) + later, return_inverse=True)
    totals, sizes = np.bincount(index, weights=sums), np.bincount(index, weights=counts)
    last = np.zeros(len(keys), dtype=steps.dtype)
    np.maximum.at(last, index, steps)
    ends = np.minimum((keys // 2 + 1) * block, steps.max())
    # Kept apart, the first part still ends before the event files that a later --summarize merges with it.
    first_of_two = (keys % 2 == 0) & np.isin(keys + 1, keys)
    return np.where(first_of_two, last, ends), totals / sizes, sizes


def read_curve(logdir: Path, tag: str = TAG) -> tuple[np.ndarray, np.ndarray]:
    """(meta-iterations, values) of one scalar of a run: the logged values, or block means where the run's
    curve.json stands in for event files that are gone."""
    steps, sums, counts, block, _ = read_points(logdir, tag)
    if block is None:
        return steps, sums
    ends, means, _ = block_means(steps, sums, counts, block)
    return ends, means


def summarize(logdir: Path, block: int) -> Path:
    """Write a run's curve as block means to LOGDIR/curve.json (merged with the blocks it already holds)."""
    steps, sums, counts, earlier_block, logged_from = read_points(logdir)
    if earlier_block not in (None, block):
        raise UserError(f"{logdir / CURVE} holds blocks of {earlier_block} meta-iterations that its event files no "
                        f"longer cover; summarize it with --summarize {earlier_block}")
    ends, means, sizes = block_means(steps, sums, counts, block, logged_from)
    write_json(logdir / CURVE, {"tag": TAG, "block": block, "meta_iterations": ends.tolist(),
                                "means": [round(float(mean), 6) for mean in means],
                                "counts": [int(size) for size in sizes]})
    return logdir / CURVE


def write_means(logdir: Path, every: int = MEANS_EVERY) -> Path:
    """Write into LOGDIR/mean100/ the <set>/accuracy_mean100 scalars of a run at each logged meta-iteration that is a
    multiple of `every` (and the last): from its logged points, or from its curve.json's blocks where it has no event
    files (a block of 100 meta-iterations with one task each is the mean of the last 100)."""
    from torch.utils.tensorboard import SummaryWriter  # here: the plots need no torch
    folder = logdir / MEANS
    shutil.rmtree(folder, ignore_errors=True)
    written = []
    curve_tag = read_json(logdir / CURVE)["tag"] if (logdir / CURVE).is_file() else None
    with SummaryWriter(str(folder)) as writer:
        for name in SETS:
            tag = f"{name}/accuracy"
            steps, values = logged_points(logdir, tag, missing_ok=True)
            if len(steps):
                means = moving_average(np.arange(len(values)), values, RECENT)  # over the last RECENT points
                shown = (steps % every == 0) | (steps == steps[-1])
            elif tag == curve_tag:  # every block: each is already the mean of its meta-iterations
                steps, means = read_curve(logdir, tag)
                shown = np.ones(len(steps), dtype=bool)
            else:
                continue
            for step, mean in zip(steps[shown], means[shown]):
                writer.add_scalar(f"{tag}_mean{RECENT}", mean, int(step), walltime=0.0)
            written.append(name)
    if not written:
        shutil.rmtree(folder)
        raise UserError(f"{logdir} holds no logged accuracy; is it a run of train_omniglot.py?")
    events, = folder.glob("events.out.tfevents.*")
    return events.rename(folder / "events.out.tfevents.mean100")  # one name, so that writing again replaces it


def training_hours(logdir: Path) -> tuple[float, int]:
    """(hours, event files) a run trained for: over each event file, the time from its first logged meta-test task to
    its last (a resumed run writes one file per start, so the pauses between starts are not counted)."""
    seconds, files = 0.0, sorted(logdir.glob("events.out.tfevents.*"))
    if not files:
        raise UserError(f"{logdir} holds no event files")
    for file in files:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        if TAG in events.Tags()["scalars"]:
            times = [point.wall_time for point in events.Scalars(TAG)]
            seconds += max(times) - min(times)
    return seconds / 3600, len(files)


def label(logdir: Path) -> str:
    """A run's name, setting and characters, e.g. 'runs/5way (5-way, random-1200 split, seed 0)'."""
    args_path, split_path = logdir / "args.json", logdir / "split.json"
    if not (args_path.is_file() and split_path.is_file()):
        return str(logdir)
    split = read_json(split_path)
    return f"{logdir} ({read_json(args_path)['classes']}-way, {split['split']} split, seed {split['seed']})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders of train_omniglot.py")
    parser.add_argument("--window", type=positive_int, default=2000,
                        help="meta-iterations in the moving average (at least a summarized run's block)")
    parser.add_argument("--output", default="runs/accuracy.png", help="the PNG to write")
    parser.add_argument("--summarize", type=positive_int, metavar="BLOCK",
                        help="instead of plotting, write each run's curve.json: the mean of each BLOCK "
                        "meta-iterations")
    parser.add_argument("--tensorboard-means", action="store_true",
                        help=f"instead of plotting, write each run's {MEANS}/ folder: the mean of the last {RECENT} "
                        f"logged tasks of each character set every {MEANS_EVERY} meta-iterations, for TensorBoard")
    parser.add_argument("--hours", action="store_true",
                        help="instead of plotting, print how many hours each run trained, from its event files")
    args = parser.parse_args(argv)
    if args.hours or args.summarize or args.tensorboard_means:
        for run in args.runs:
            if args.hours:
                hours, files = training_hours(Path(run))
                print(f"{run}: {hours:.1f} hours of training in {files} event files")
            else:
                print(f"wrote {summarize(Path(run), args.summarize) if args.summarize else write_means(Path(run))}")
        return 0
    plt = pyplot("plot_runs.py")
    curves = {label(Path(run)): read_curve(Path(run)) for run in args.runs}
    figure, axes = plt.subplots(figsize=(11, 5))
    for name, (steps, values) in curves.items():
        axes.plot(steps, 100 * moving_average(steps, values, args.window), label=name)
    axes.set_xlabel("meta-iteration")
    axes.set_ylabel("meta-test accuracy, %")
    axes.set_title(f"moving average over {args.window:,} meta-iterations", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)  # beside the curves, never over them
    figure.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, sys.argv[1:], "plot_runs.py"))
