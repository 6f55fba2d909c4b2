import contextlib
import copy
import io
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import pytest
import torch

from conftest import ROOT, read_results

import options
import reptile
import train_sine as S
from run_folder import checkpoint_iteration
from utils import read_json, run_script, stream

TINY = ["--meta-iterations", "40", "--eval-waves", "5", "--validate-every", "10", "--check-every", "10"]


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def sine(*argv, check=True) -> Ran:
    """Run train_sine.py's command line in this process (the kill test starts processes of its own)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        returncode = run_script(S.main, list(argv), "train_sine.py")
    if check:
        assert returncode == 0, err.getvalue()[-2000:]
    return Ran(returncode, out.getvalue(), err.getvalue())


def settings(**changes) -> dict:
    """The default run's training settings, changed."""
    args = options.build_sine_parser().parse_args([])
    return {**options.sine_settings(args), **changes}


def tasks(count: int, seed: int = 0, **changes) -> list:
    """`count` meta-training tasks drawn as the training loop draws them."""
    generator = torch.Generator().manual_seed(seed)
    return [S.draw_training_task(S.hyperparameters(settings(**changes)), 50, generator) for _ in range(count)]


def final_weights(logdir) -> dict:
    return S.load_model(logdir, None)[1]["model"]


def test_a_tiny_run_trains_logs_checkpoints_and_records_its_evaluation(tmp_path):
    done = sine(str(tmp_path / "run"), *TINY)
    assert "after 32 steps: mean squared error" in done.stdout
    run = tmp_path / "run"
    assert read_json(run / "args.json") == settings(meta_iterations=40)
    assert sorted(path.name for path in (run / "checkpoint").iterdir()) == ["check-30.pth", "check-40.pth"]
    assert any(run.glob("events.out.tfevents.*"))
    [(key, entry)] = read_results(run).items()
    assert key == "5 waves, 10 points, at 40, eval seed 0"
    assert set(entry["mse"]) == {"0", "1", "8", "32"} and entry["training"][0]["from"] == 0
    assert entry["training"][-1]["to"] == 40
    again = sine(str(run), *TINY)  # finished and evaluated: says so, records nothing new
    assert "training is complete" in again.stdout and len(read_results(run)) == 1
    changed = sine(str(run), *TINY, "--lr", "0.01", check=False)  # args.json says 0.02
    assert changed.returncode == 2 and "--lr 0.01 differs from 0.02" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
    shorter = sine(str(run), "--meta-iterations", "30", check=False)
    assert shorter.returncode == 2 and "--meta-iterations 30 is below the 40 this run has done" in shorter.stderr
    longer = sine(str(run), "--meta-iterations", "50", "--eval-waves", "5")  # the rest from args.json
    assert "resumed" in longer.stdout and read_json(run / "args.json") == settings(meta_iterations=50)
    assert (run / "checkpoint" / "check-50.pth").exists() and len(read_results(run)) == 2


@pytest.mark.parametrize("algorithm", ["fomaml", "maml", "joint", "random"])
def test_each_algorithm_runs_and_the_baselines_behave_as_named(algorithm, tmp_path):
    sine(str(tmp_path), "--algorithm", algorithm, *TINY)
    weights = final_weights(tmp_path)
    initial = S.new_model(settings(algorithm=algorithm, meta_iterations=40)).state_dict()
    unchanged = all(torch.equal(weights[name], initial[name]) for name in initial)
    assert unchanged == (algorithm == "random")


def test_the_script_imports_nothing_of_omniglot():
    code = "import sys, train_sine; sys.exit(any('omniglot' in name.lower() for name in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_a_killed_and_an_interrupted_run_end_exactly_like_an_uninterrupted_one(tmp_path):
    flags = ["--meta-iterations", "800", "--eval-waves", "5", "--check-every", "50", "--validate-every", "50"]
    sine(str(tmp_path / "straight"), *flags)
    stopped = tmp_path / "stopped"
    for stop, after in ((signal.SIGKILL, 200), (signal.SIGINT, 450)):
        process = subprocess.Popen([sys.executable, str(ROOT / "train_sine.py"), str(stopped), *flags], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        waited = time.time()
        while (checkpoint_iteration(options.sine_folder(stopped).newest_checkpoint() or "none") or 0) < after:
            assert process.poll() is None and time.time() - waited < 120, "no checkpoint came"
            time.sleep(0.05)
        os.kill(process.pid, stop)
        stderr = process.communicate(timeout=60)[1]
        if stop == signal.SIGINT:
            assert process.returncode == 128 + signal.SIGINT and "resume with: python train_sine.py" in stderr
    sine(str(stopped), *flags)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(stopped)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    first, second = (next(iter(read_results(run).values())) for run in (tmp_path / "straight", stopped))
    assert first["mse"] == second["mse"]
    assert [(part["from"], part["to"]) for part in second["training"]][0][0] == 0
    assert second["training"][-1]["to"] == 800 and len(second["training"]) == 3


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_reptile_and_first_order_maml_step_as_straightforward_loops_do(algorithm):
    run = settings(algorithm=algorithm, meta_batch=2)
    model = S.new_model(run)
    expected = copy.deepcopy(model)
    drawn = tasks(2 * 3, seed=4)
    meta_iteration = S.MetaIteration(model, run)
    for iteration in range(3):
        meta_iteration(drawn[2 * iteration:2 * iteration + 2], 0.1 * (1 - iteration / 3))
    for iteration in range(3):
        meta = [param.detach().clone() for param in expected.parameters()]
        targets = []
        for batches in drawn[2 * iteration:2 * iteration + 2]:
            learner = copy.deepcopy(expected)
            for inputs, targets_ in batches:
                before = [param.detach().clone() for param in learner.parameters()]
                learner.zero_grad()
                S.mse(learner(inputs), targets_).backward()
                with torch.no_grad():
                    for param in learner.parameters():
                        param -= 0.02 * param.grad
            after = [param.detach() for param in learner.parameters()]
            # Reptile moves towards the adapted weights; first-order MAML by the last step's change alone.
            targets.append(after if algorithm == "reptile" else [m + a - b for m, a, b in zip(meta, after, before)])
        with torch.no_grad():
            for k, param in enumerate(expected.parameters()):
                mean = (targets[0][k] + targets[1][k]) / 2
                param += 0.1 * (1 - iteration / 3) * (mean - param)
    for got, want in zip(model.parameters(), expected.parameters()):
        assert torch.allclose(got, want, atol=1e-6)


def test_the_meta_step_is_the_demonstrations_annealed_linearly_to_zero(tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(S.MetaIteration, "__call__", lambda self, tasks, step_size: steps.append(step_size))
    sine(str(tmp_path / "run"), *TINY)
    # The authors' demonstration: outer step 0.1 at the start, annealed linearly to 0 over the iterations.
    assert steps == pytest.approx([0.1 * (1 - iteration / 40) for iteration in range(40)])


def test_maml_moves_the_weights_by_the_meta_step_times_the_inner_step_times_its_meta_gradient():
    run = settings(algorithm="maml")
    model = S.new_model(run)
    before = copy.deepcopy(model)
    [task] = tasks(1, seed=2)
    S.MetaIteration(model, run)([task], 0.1)
    gradient = reptile.maml_gradients(before, task, 0.02, S.mse)
    for old, new, meta_gradient in zip(before.parameters(), model.parameters(), gradient):
        assert torch.allclose(new, old - 0.1 * 0.02 * meta_gradient, atol=1e-7)


def test_held_out_waves_follow_the_task_distribution_and_do_not_depend_on_the_training_seed():
    waves = S.draw_waves(5000, stream(0, S.HELD_OUT_STREAM))
    assert 0.1 <= waves[:, 0].min() and waves[:, 0].max() <= 5.0
    assert 0 <= waves[:, 1].min() and waves[:, 1].max() <= 2 * torch.pi
    first, second = (S.draw_held_out(3, 10, stream(0, S.HELD_OUT_STREAM)) for _ in range(2))
    assert all(torch.equal(a.support_inputs, b.support_inputs) for a, b in zip(first, second))
    assert first[0].support_inputs.shape == (10, 1) and first[0].query_inputs.shape == (1000, 1)
    assert -5 <= first[0].support_inputs.min() and first[0].support_inputs.max() <= 5


def test_the_readme_table_is_the_committed_results_and_eval_only_reproduces_them(tmp_path):
    readme = (ROOT / "README.md").read_text()
    for run, row in ROWS.items():
        entry = next(iter(read_results(ROOT / "runs" / run).values()))
        cells = " | ".join(f"{entry['mse'][steps]['mean']:.3f} +- {entry['mse'][steps]['ci95']:.3f}"
                           for steps in ("1", "8", "32"))
        assert f"| {row} | {cells} |" in readme, run
    for run in ("sine-maml",):  # the others are as quick to check (RESULTS.md); one keeps the suite short
        folder = tmp_path / run
        folder.mkdir()
        (folder / "checkpoint").symlink_to(ROOT / "runs" / run / "checkpoint")
        sine(str(folder), "--eval-only")
        committed, again = (next(iter(read_results(f).values())) for f in (ROOT / "runs" / run, folder))
        for steps in committed["mse"]:
            assert again["mse"][steps]["mean"] == pytest.approx(committed["mse"][steps]["mean"], rel=1e-4)


ROWS = {"sine-reptile": "Reptile", "sine-fomaml": "first-order MAML", "sine-maml": "MAML",
        "sine-joint": "joint training (baseline)", "sine-random": "random initialization (baseline)",
        "sine-reptile-relu": "Reptile, ReLU", "sine-fomaml-meta-lr-0.5": "first-order MAML, meta-step 0.5",
        "sine-maml-meta-lr-0.5": "MAML, meta-step 0.5"}


def test_the_figure_is_drawn_from_runs(tmp_path):
    pytest.importorskip("matplotlib")
    sine(str(tmp_path / "run"), "--meta-iterations", "20", "--eval-waves", "2")
    sine(str(tmp_path / "run"), str(tmp_path / "run"), "--figure", str(tmp_path / "figure.png"))
    assert (tmp_path / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_flags_are_one_line_errors(tmp_path):
    for argv, message in [(["a", "b"], "give one logdir"), (["--checkpoint", "x"], "goes with --eval-only"),
                          ([str(tmp_path), "--eval-only"], "holds no checkpoint"),
                          (["--figure", "x.png"], "name the runs")]:
        done = sine(*argv, check=False)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
