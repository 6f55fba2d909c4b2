"""A guard on what the code computes, frozen in tests/frozen/values.json by `python tests/test_frozen.py DATA_DIR
MIRROR`: meta-training from the seeded start, test tasks scored from a committed checkpoint, and Lake's run01.

It holds on any x86-64 CPU and still fails when the arithmetic changes:
- The computation runs in float64 (torch's default dtype while it runs; the images follow it). In float32, CPUs that
  sum in other orders (AVX2 against AVX-512, Intel against AMD) differ in the last bits, and Adam with beta1 = 0
  turns that into visible differences within a few meta-iterations; in float64 the same differences stay near 1e-11
  of each value, so floats are compared to 1e-8 of their scale (losses, and each weight tensor's sum, absolute sum
  and projection on a fixed direction). Changing a constant (the inner Adam's eps: 1e-3 of some losses) or an order
  (two mini-batches) moves them far more.
- A convolution's bias followed by BatchNorm changes no output, so its gradient is rounding noise, which Adam makes
  into steps of up to its learning rate: those biases and their Adam state are not compared.
- What is counted (correct queries, Lake's error rates) is compared exactly, in float64 and in float32, the dtype of
  the committed runs: a count moves only when the arithmetic does.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import lake  # noqa: E402
import omniglot  # noqa: E402
import options  # noqa: E402
import train_omniglot as T  # noqa: E402
import utils  # noqa: E402
from conftest import load_checkpoint  # noqa: E402

FROZEN = Path(__file__).resolve().parent / "frozen" / "values.json"
CHECKPOINT = ROOT / "runs/5way-exact-split/checkpoint/check-100000.pth"
LAKE_CHECKPOINT = ROOT / "runs/20way-background/checkpoint/check-200000.pth"
RUNS = {  # five meta-iterations from the seeded start, a validation task of each set after each
    "adam": [],
    "fomaml with tail, sgd, weight decay, replacement": ["--algorithm", "fomaml", "--query-shots", "2",
                                                         "--inner-optimizer", "sgd", "--lr", "0.01",
                                                         "--weight-decay", "0.999", "--replacement"],
}
EVALUATIONS = {"1-shot": ["--shots", "1"], "5-shot": ["--shots", "5"], "1-shot transductive": ["--shots", "1",
                                                                                               "--transductive"]}
TASKS = {torch.float64: 10, torch.float32: 30}  # test tasks scored in each dtype
TOLERANCE = 1e-8  # of a value's scale; float64 on other kernels moves values by about 1e-11 of it


def is_inert(name: str) -> bool:
    """Whether a parameter of OmniglotModel (or its Adam state: "NAME exp_avg") is a convolution's bias that
    BatchNorm cancels."""
    parameter = name.split()[0]
    return parameter.startswith("features.") and parameter.endswith(".0.bias")


def summary(tensors: dict) -> dict:
    """{name: [sum, absolute sum, projection on a fixed direction]} of each tensor but the inert ones."""
    found = {}
    for name, tensor in tensors.items():
        if is_inert(name) or not tensor.is_floating_point() or tensor.dim() == 0:
            continue
        values = tensor.detach().double().reshape(-1)
        direction = torch.linspace(-1, 1, len(values), dtype=torch.float64).cos()
        found[name] = [values.sum().item(), values.abs().sum().item(), (values * direction).sum().item()]
    return found


def scalars(logdir: Path) -> dict:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [point.value for point in events.Scalars(tag)] for tag in sorted(events.Tags()["scalars"])
            if tag.split("/")[-1] in ("accuracy", "loss")}


def meta_training(data_dir: Path, folder: Path) -> dict:
    """Each run's meta-weights and inner optimizer state (summaries) after 5 meta-iterations, and its validation
    scores, through the command line."""
    found = {}
    for name, flags in RUNS.items():
        logdir = folder / name.replace(" ", "_").replace(",", "")
        argv = [str(logdir), "--data", str(data_dir), "--device", "cpu", "--meta-iterations", "5", "--validate-every",
                "1", "--eval-tasks", "2", "--meta-test-only", "--workers", "1", *flags]
        status = utils.run_script(T.main, argv, "train_omniglot.py")
        assert status == 0
        state = torch.load(logdir / "checkpoint" / "check-5.pth", weights_only=True)
        names = list(state["model"])
        inner = {f"{names[index]} {key}": value for index, moments in state["inner_optimizer"]["state"].items()
                 for key, value in moments.items()}
        found[name] = {"meta-weights": summary(state["model"]), "inner state": summary(inner),
                       "validation": scalars(logdir)}
    return found


def scored_tasks(data_dir: Path, forms: tuple = (False, True)) -> dict:
    """(correct queries, loss) of TASKS[default dtype] meta-test tasks of runs/5way-exact-split, each way of
    evaluating (one task at a time; side by side)."""
    state = load_checkpoint(str(CHECKPOINT))
    sampler = omniglot.load_split(ROOT / "runs/5way-exact-split", data_dir, "paper", 0, "cpu")[1]
    found = {}
    for name, flags in EVALUATIONS.items():
        args = options.parse_args([str(ROOT / "runs/5way-exact-split"), "--eval-only", "--data", str(data_dir),
                                   "--device", "cpu", *flags])
        meta_model = T.new_model(args)
        meta_model.load_state_dict(state["model"])
        seeds = evaluate.task_seeds(TASKS[torch.get_default_dtype()], utils.stream(0, T.EVALUATION_STREAM))
        hp = options.hyperparameters(args)
        for together in forms:
            found[name + (", side by side" if together else "")] = evaluate.evaluate_tasks(
                meta_model, state["inner_optimizer"], sampler, hp, seeds, together)
    return found


def lake_run(data_dir: Path, mirror: Path) -> dict:
    """The error rates of runs/20way-background on Lake's run01, after each of its 10 adaptations."""
    state = load_checkpoint(str(LAKE_CHECKPOINT))
    args = options.parse_args([str(ROOT / "runs/20way-background"), "--eval-lake", "--data", str(data_dir),
                               "--device", "cpu"])
    meta_model = T.new_model(args)
    meta_model.load_state_dict(state["model"])
    runs = lake.load_runs(data_dir, str(mirror))
    seeds = evaluate.task_seeds(lake.REPEATS, utils.stream(0, T.EVALUATION_STREAM))
    errors = lake.error_rates(meta_model, state["inner_optimizer"], {"run01": runs["run01"]},
                              options.hyperparameters(args), seeds)
    return {mode: table.tolist() for mode, table in errors.items()}


def in_dtype(dtype: torch.dtype, compute, *args):
    """compute(*args) on one thread with `dtype` as torch's default (new models and the images take it)."""
    threads, default = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(dtype)
    try:
        return json.loads(json.dumps(compute(*args)))
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(default)


def counts(scores: dict) -> dict:
    """The correct queries of each task, without the losses."""
    return {name: [correct for correct, _ in tasks] for name, tasks in scores.items()}


def compute_float64(data_dir: Path, mirror: Path, folder: Path) -> dict:
    return {"meta-training": meta_training(data_dir, folder), "test tasks": scored_tasks(data_dir),
            "lake run01": lake_run(data_dir, mirror)}


def compute_float32(data_dir: Path, mirror: Path) -> dict:
    return {"test task counts": counts(scored_tasks(data_dir, forms=(False,))),
            "lake run01": lake_run(data_dir, mirror)}


def assert_close(now, frozen, where: str, scale: float = None) -> None:
    """Counts (ints) equal; floats within TOLERANCE of `scale` (default: their own size)."""
    if isinstance(frozen, dict):
        assert sorted(now) == sorted(frozen), where
        for key in frozen:
            assert_close(now[key], frozen[key], f"{where} / {key}", scale)
    elif isinstance(frozen, list):
        assert len(now) == len(frozen), where
        for index, (value, expected) in enumerate(zip(now, frozen)):
            assert_close(value, expected, f"{where} [{index}]", scale)
    elif isinstance(frozen, int):
        assert now == frozen, where
    else:
        allowed = TOLERANCE * (scale if scale is not None else abs(frozen))
        assert abs(now - frozen) <= allowed, f"{where}: {now!r} against {frozen!r} (allowed {allowed:.3g})"


def assert_summaries_close(now: dict, frozen: dict, where: str) -> None:
    """Each tensor's summary within TOLERANCE of its absolute sum."""
    assert sorted(now) == sorted(frozen), where
    for name, values in frozen.items():
        assert_close(now[name], values, f"{where} / {name}", scale=values[1])


@pytest.fixture(scope="module")
def frozen() -> dict:
    return json.loads(FROZEN.read_text())


def test_float64_meta_training_test_tasks_and_lake_are_what_they_were_when_frozen(data_dir, mirror, tmp_path,
                                                                                   frozen):
    now = in_dtype(torch.float64, compute_float64, data_dir, mirror, tmp_path)
    expected = frozen["float64"]
    for name, run in expected["meta-training"].items():
        where = f"meta-training / {name}"
        assert_summaries_close(now["meta-training"][name]["meta-weights"], run["meta-weights"], where)
        assert_summaries_close(now["meta-training"][name]["inner state"], run["inner state"], where)
        # Logged as float32 by TensorBoard: one rounding more.
        for tag, values in run["validation"].items():
            assert now["meta-training"][name]["validation"][tag] == pytest.approx(values, rel=1e-6), (where, tag)
    assert_close(now["test tasks"], expected["test tasks"], "test tasks")
    assert_close(now["lake run01"], expected["lake run01"], "lake run01")


def test_float32_counts_of_the_committed_checkpoints_are_what_they_were_when_frozen(data_dir, mirror, frozen):
    assert in_dtype(torch.float32, compute_float32, data_dir, mirror) == frozen["float32"]


if __name__ == "__main__":  # python tests/test_frozen.py DATA_DIR MIRROR: freeze what the code computes now
    import tempfile
    data, copy = Path(sys.argv[1]), Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as temporary:
        values = {"float64": in_dtype(torch.float64, compute_float64, data, copy, Path(temporary)),
                  "float32": in_dtype(torch.float32, compute_float32, data, copy)}
    FROZEN.write_text(json.dumps(values, indent=1) + "\n")
    print(f"wrote {FROZEN}")
