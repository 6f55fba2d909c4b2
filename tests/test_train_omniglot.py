import contextlib
import copy
import dataclasses
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import paper
from conftest import NO_NETWORK, ROOT, load_checkpoint, read_results, result_of
from test_lake import make_lake_zip
from test_evaluate import random_sampler, trained_side
from test_fast import is_conv_bias

import evaluate
import fast
import lake
import omniglot
import options
import reptile
import train_omniglot as T
from models import OmniglotModel
from reptile import Hyperparameters
import utils

# Few tasks and steps, and one evaluation worker (no pool to start) unless a test is about them.
TINY = ["--meta-iterations", "6", "--meta-batch", "2", "--inner-steps", "2", "--eval-tasks", "4",
        "--validate-every", "2", "--check-every", "3", "--test-iterations", "2", "--shots", "1", "--workers", "1"]


def test_evaluation_in_worker_processes_equals_evaluation_in_this_process():
    hp = Hyperparameters(classes=5, shots=1, test_iterations=10, meta_batch=1)
    samplers = {"meta-test": random_sampler()}
    meta_model, inner_optimizer = trained_side(hp, samplers["meta-test"])
    here = evaluate.score_tasks(meta_model, inner_optimizer,
                                samplers, "meta-test", hp, 40, torch.Generator().manual_seed(9))
    with evaluate.start_pool(samplers, 2) as pool:
        in_workers = evaluate.score_tasks(meta_model, inner_optimizer, samplers, "meta-test", hp, 40,
                                          torch.Generator().manual_seed(9), pool, 2)
    # Bit for bit: in either place the adaptation runs on the same convolution kernels.
    np.testing.assert_array_equal(in_workers[0], here[0])
    np.testing.assert_array_equal(in_workers[1], here[1])


def test_evaluation_leaves_the_training_state_alone():
    hp = Hyperparameters(classes=5, shots=1, test_iterations=3, meta_batch=1)
    samplers = {"meta-test": random_sampler()}
    meta_model, inner_optimizer = trained_side(hp, samplers["meta-test"])
    before = copy.deepcopy(inner_optimizer.state_dict())
    weights = copy.deepcopy(meta_model.state_dict())
    accuracies, losses, _ = evaluate.score_tasks(meta_model, inner_optimizer,
                                                 samplers, "meta-test", hp, 3, torch.Generator())
    assert accuracies.shape == (3,) and ((0 <= accuracies) & (accuracies <= 1)).all()
    after = inner_optimizer.state_dict()
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value)
    assert all(torch.equal(weights[k], v) for k, v in meta_model.state_dict().items())


def test_a_stopped_evaluation_goes_on_from_its_finished_tasks_and_ends_the_same(tmp_path, monkeypatch):
    hp = Hyperparameters(classes=5, shots=1, test_iterations=3, meta_batch=1)
    samplers = {"meta-test": random_sampler()}
    meta_model, inner_optimizer = trained_side(hp, samplers["meta-test"])
    whole = evaluate.score_tasks(meta_model, inner_optimizer,
                                 samplers, "meta-test", hp, 12, torch.Generator().manual_seed(3))
    kept = tmp_path / "unfinished.json"
    evaluated, evaluate_tasks = [], evaluate.evaluate_tasks

    def stopping_after(chunks: int):
        def counted(meta_model, inner_state, sampler, hp, seeds, **options):
            if len(evaluated) == chunks:
                raise KeyboardInterrupt
            evaluated.append(len(seeds))
            return evaluate_tasks(meta_model, inner_state, sampler, hp, seeds, **options)
        return counted

    monkeypatch.setattr(evaluate, "evaluate_tasks", stopping_after(2))  # chunks of 3 tasks: 6 of 12 finished
    with pytest.raises(KeyboardInterrupt):
        evaluate.score_tasks(meta_model, inner_optimizer,
                             samplers, "meta-test", hp, 12, torch.Generator().manual_seed(3),
                             keep=kept)
    assert len(json.loads(kept.read_text())["tasks"]) == 6
    evaluated.clear()
    monkeypatch.setattr(evaluate, "evaluate_tasks", stopping_after(100))
    resumed = evaluate.score_tasks(meta_model, inner_optimizer,
                                   samplers, "meta-test", hp, 12, torch.Generator().manual_seed(3),
                                   keep=kept)
    assert sum(evaluated) == 6  # only the tasks not kept
    assert all(np.array_equal(a, b) for a, b in zip(resumed[:2], whole[:2]))
    evaluated.clear()  # other tasks, or other settings, start again
    evaluate.score_tasks(meta_model, inner_optimizer,
                         samplers, "meta-test", hp, 12, torch.Generator().manual_seed(4), keep=kept)
    evaluate.score_tasks(meta_model, inner_optimizer,
                         samplers, "meta-test", dataclasses.replace(hp, transductive=True), 12,
                         torch.Generator().manual_seed(4), keep=kept)
    assert sum(evaluated) == 24


def scalars(logdir, tag):
    events = EventAccumulator(str(logdir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_tiny_run_writes_everything_then_resumes(run_script, run_here, tmp_path):
    logdir = tmp_path / "run"
    first = run_script(str(logdir), *TINY, "--workers", "2")  # the final evaluation in worker processes
    assert first.returncode == 0, first.stderr
    assert "meta-test accuracy: " in first.stdout
    assert "% (95% CI, 4 tasks, 5-way 1-shot, non-transductive)" in first.stdout
    for name in ("args.json", "split.json", "results.json", "checkpoint/check-6.pth", "checkpoint/check-3.pth"):
        assert (logdir / name).is_file(), name
    assert list(logdir.glob("events.out.tfevents.*"))
    assert scalars(logdir, "meta-test/accuracy") == [2, 4, 6]
    logged = all_scalars(logdir)
    for name in ("meta-train", "meta-test"):  # the readable curve: the mean of the tasks logged so far (up to 100)
        steps, accuracies = zip(*logged[f"{name}/accuracy"])
        mean_steps, means = zip(*logged[f"{name}/accuracy_mean100"])
        assert mean_steps == steps
        assert means == pytest.approx([np.mean(accuracies[:i + 1]) for i in range(len(accuracies))], abs=1e-6)
    results = result_of(logdir, 1, "non-transductive", 6, 4)
    assert 0 <= results["meta-test"]["accuracy"] <= 100
    split = json.loads((logdir / "split.json").read_text())
    assert len(split["train"]) == 1200 and len(split["test"]) == 423

    again = run_here(str(logdir), *TINY)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout and "meta-iteration 6 of 6" in again.stdout
    assert "training is complete" in again.stdout
    assert sorted(p.name for p in (logdir / "checkpoint").iterdir()) == ["check-3.pth", "check-6.pth"]

    longer = run_here(str(logdir), *TINY, "--meta-iterations", "9", "--keep", "1")
    assert longer.returncode == 0, longer.stderr
    assert "meta-iteration 6 of 9" in longer.stdout
    # check-6 stays beside the newest: results.json reported on it when check-9 was written.
    assert sorted(p.name for p in (logdir / "checkpoint").iterdir()) == ["check-6.pth", "check-9.pth"]
    assert scalars(logdir, "meta-test/accuracy") == [2, 4, 6, 8]
    result_of(logdir, 1, "non-transductive", 9, 4)
    assert result_of(logdir, 1, "non-transductive", 6, 4) == results  # a new evaluation adds an entry

    evaluation = run_here(str(logdir), "--eval-only", "--transductive", "--eval-tasks", "3", "--workers", "1")
    assert evaluation.returncode == 0, evaluation.stderr
    assert "(95% CI, 3 tasks, 5-way 1-shot, transductive)" in evaluation.stdout
    five_shot = run_here(str(logdir), "--eval-only", "--shots", "5", "--eval-tasks", "3", "--meta-test-only",
                         "--workers", "1")
    assert five_shot.returncode == 0, five_shot.stderr
    assert "meta-test accuracy: " in five_shot.stdout and "meta-train accuracy" not in five_shot.stdout
    assert len(read_results(logdir)) == 4
    transductive, five_shot = result_of(logdir, 1, "transductive", 9, 3), result_of(logdir, 5, "non-transductive", 9, 3)
    assert "meta-train" in transductive and "meta-train" not in five_shot
    assert transductive["settings"]["test_iterations"] == 2  # taken from the run's args.json

    changed = run_here(str(logdir), *TINY, "--classes", "10")
    assert changed.returncode != 0 and "--classes 10 differs from 5" in changed.stderr


def test_a_re_check_adds_an_entry_and_changes_no_other_file(existing_run, run_here, tmp_path):
    """Evaluating a finished run again (other tasks, or the training command once more) keeps every file but
    results.json as it was, and every earlier entry of results.json as it was."""
    logdir = tmp_path / "run"
    shutil.copytree(existing_run, logdir)
    before = snapshot(logdir)
    earlier = read_results(logdir)
    check = run_here(str(logdir), "--eval-only", "--seed", "1", "--eval-tasks", "3", "--meta-test-only")
    assert check.returncode == 0, check.stderr
    assert run_here(str(logdir), *TINY).returncode == 0  # "training is complete"
    after = snapshot(logdir)
    assert {name for name in before if before[name] != after.get(name)} == {"results.json"}
    results = read_results(logdir)
    assert {key: results[key] for key in earlier} == earlier and len(results) == len(earlier) + 1
    added = result_of(logdir, 1, "non-transductive", 6, 3, seed=1)
    assert added["seed"] == 1 and added["settings"]["seed"] == 1
    assert json.loads(before["args.json"])["seed"] == 0


def test_results_and_checkpoints_say_what_produced_them(existing_run):
    in_git = (ROOT / ".git").exists()
    checkpoint = torch.load(existing_run / "checkpoint" / "check-6.pth", weights_only=True)
    result = result_of(existing_run, 1, "non-transductive", 6, 4)
    for record in (checkpoint["provenance"], result["provenance"], *checkpoint["segments"], *result["training"]):
        assert {"torch", "device", "date"} <= set(record) and record["torch"] == str(torch.__version__)
        assert ("commit" in record) == in_git and ("uncommitted_changes" in record) == in_git
    assert [(segment["from"], segment["to"]) for segment in result["training"]] == [(0, 6)]


def test_split_from_trains_on_another_runs_characters_and_refuses_others_on_resume(existing_run, data_dir, loaded,
                                                                                   run_here, tmp_path):
    source = tmp_path / "random.json"
    source.write_text(json.dumps(omniglot.make_split(data_dir, loaded[0], "random-1200", seed=3)))
    logdir = tmp_path / "run"
    short = [*TINY, "--meta-iterations", "3", "--meta-test-only"]
    trained = run_here(str(logdir), *short, "--split-from", str(source))
    assert trained.returncode == 0, trained.stderr
    assert omniglot.same_characters(json.loads((logdir / "split.json").read_text()), json.loads(source.read_text()))
    saved = json.loads((logdir / "args.json").read_text())
    assert saved["split"] == "random-1200" and saved["split_from"] == str(source) and saved["seed"] == 0
    other = run_here(str(logdir), *short, "--meta-iterations", "4", "--split-from", str(existing_run))
    assert other.returncode == 2 and "trained on other characters than those of --split-from" in other.stderr
    same = run_here(str(logdir), *short, "--meta-iterations", "4", "--split-from", str(source))
    assert same.returncode == 0, same.stderr
    assert "resumed" in same.stdout
    mixed = run_here(str(tmp_path / "new"), *short, "--split", "background", "--split-from", str(source))
    assert mixed.returncode == 2 and "leave --split out" in mixed.stderr
    missing = run_here(str(tmp_path / "new"), *short, "--split-from", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no split.json there" in missing.stderr


def test_tensorboard_serves_the_logged_scalars(existing_run):
    """The real TensorBoard server, on a free loopback port, reads a tiny run's scalars back over its HTTP API."""
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(existing_run.parent),
                               "--host", "127.0.0.1", "--port", "0"], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **NO_NETWORK})
    try:
        address = None
        for line in server.stderr:  # it announces "TensorBoard 2.x at http://127.0.0.1:PORT/ (Press CTRL+C to quit)"
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if match:
                address = match.group(1)
                break
        assert address, "tensorboard did not say where it serves"

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy

        def get(path: str):
            with direct.open(address + path, timeout=10) as response:
                return json.loads(response.read())

        deadline = time.time() + 60
        while "run" not in get("/data/plugin/scalars/tags") and time.time() < deadline:
            time.sleep(0.5)  # it loads the event files in the background
        tags = get("/data/plugin/scalars/tags")["run"]
        assert {"meta-train/accuracy", "meta-train/loss", "meta-test/accuracy", "meta-test/loss", "meta-step",
                "meta-train/accuracy_mean100", "meta-test/accuracy_mean100"} <= set(tags)
        query = urllib.parse.urlencode({"run": "run", "tag": "meta-test/accuracy"})
        served = get(f"/data/plugin/scalars/scalars?{query}")
        assert [(step, value) for _, step, value in served] == all_scalars(existing_run)["meta-test/accuracy"]
        assert [step for _, step, _ in served] == [2, 4, 6]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(signum, script, tmp_path):
    logdir = tmp_path / "run"
    argv, environment = script(str(logdir), *TINY, "--meta-iterations", "100000", "--check-every", "100000")
    process = subprocess.Popen(argv, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not list(logdir.glob("events.out.tfevents.*")):  # training has begun: its signal handlers are set
        assert process.poll() is None, "the run ended before it started training"
        time.sleep(0.2)
    time.sleep(3)  # some meta-iterations
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    checkpoints = list((logdir / "checkpoint").iterdir())
    assert len(checkpoints) == 1 and checkpoints[0].name != "check-100000.pth"
    assert "resume with: python train_omniglot.py" in stderr.decode()


def visible_lines(stderr: str) -> list[str]:
    """What stays on a terminal: the text after each line's last carriage return (progress bars erase)."""
    return [line.split("\r")[-1] for line in stderr.split("\n") if line.split("\r")[-1].strip()]


# Each runs against an existing run folder, which must come out unchanged.
BAD_INPUTS = {
    "too many shots": (["--shots", "25"], "--shots 25"),
    "too many train shots": (["--train-shots", "21"], "--train-shots 21"),
    "zero classes": (["--classes", "0"], "--classes"),
    "negative learning rate": (["--lr", "-1"], "--lr"),
    "zero learning rate": (["--lr", "0"], "--lr"),
    "NaN meta-step": (["--meta-lr", "nan"], "--meta-lr"),
    "infinite learning rate": (["--lr", "inf"], "--lr: must be finite"),
    "infinite final meta-step": (["--meta-lr-final", "Infinity"], "--meta-lr-final: must be finite"),
    "not a number": (["--meta-batch", "five"], "--meta-batch"),
    "zero meta-batch": (["--meta-batch", "0"], "--meta-batch"),
    "negative meta-iterations": (["--meta-iterations", "-5"], "--meta-iterations"),
    "zero inner steps": (["--inner-steps", "0"], "--inner-steps"),
    "zero inner batch": (["--batch", "0"], "--batch"),
    "zero test batch": (["--test-batch", "0"], "--test-batch"),
    "zero test steps": (["--test-iterations", "0"], "--test-iterations"),
    "zero evaluation tasks": (["--eval-tasks", "0"], "--eval-tasks"),
    "zero validation interval": (["--validate-every", "0"], "--validate-every"),
    "zero checkpoint interval": (["--check-every", "0"], "--check-every"),
    "keep no checkpoint": (["--keep", "0"], "--keep"),
    "negative workers": (["--workers", "-1"], "--workers"),
    "unknown split": (["--split", "other"], "--split"),
    "unknown device": (["--device", "tpu"], "--device"),
    "more classes than test characters": (["--classes", "500"], "--classes 500"),
    "resume with other classes": (["--classes", "10"], "--classes 10 differs from 5"),
    "resume with other shots": (["--shots", "5"], "--shots 5 differs from 1"),
    "resume with another seed": (["--seed", "3"], "--seed 3 differs from 0"),
    "resume with another paper setting": (["--paper-setting", "20way1shot"], "--classes 20 differs from 5"),
    "resume with another algorithm": (["--algorithm", "fomaml"], "--algorithm fomaml differs from reptile"),
    "resume with another inner optimizer": (["--inner-optimizer", "sgd"], "--inner-optimizer sgd differs from adam"),
    "a tail without first-order MAML": (["--eval-only", "--fomaml-tail", "2"],
                                        "--query-shots needs --algorithm fomaml"),
    "a tail of every training image": (["--eval-only", "--algorithm", "fomaml", "--fomaml-tail", "10"],
                                       "--query-shots 10 leaves no image per class"),
    "a batch beyond the task with replacement": (["--eval-only", "--replacement", "--test-batch", "6"],
                                                 "--test-batch 6 exceeds the 5 images"),
    "zero weight decay": (["--weight-decay", "0"], "--weight-decay"),
    "unknown paper setting": (["--paper-setting", "10way1shot"], "--paper-setting"),
    "evaluate with other classes": (["--eval-only", "--classes", "20"], "--classes 20 differs from 5"),
    "fewer meta-iterations than done": (["--meta-iterations", "3"], "below the 6"),
    "checkpoint without eval-only": (["--checkpoint", "x.pth"], "--checkpoint needs --eval-only"),
    "missing checkpoint": (["--eval-only", "--checkpoint", "nowhere.pth"], "does not exist"),
    "not our checkpoint": (["--eval-only", "--checkpoint", "{tmp}/other.pth"], "not a checkpoint of"),
    "damaged checkpoint": (["--eval-only", "--checkpoint", "{tmp}/damaged.pth"], "unreadable"),
    "missing data, no network, no mirror": (["--data", "{tmp}/nodata"], "OMNIGLOT_MIRROR"),
    "data folder is a file": (["--data", "{tmp}/other.pth"], "the data folder {tmp}/other.pth is a file"),
    "checkpoint is a folder": (["--eval-only", "--checkpoint", "{tmp}"], "checkpoint {tmp} is a folder"),
    "mirror is a file": (["--data", "{tmp}/nodata", "--omniglot-mirror", "{tmp}/other.pth"],
                         "the mirror {tmp}/other.pth (OMNIGLOT_MIRROR or --omniglot-mirror) is not a folder"),
}


@pytest.fixture
def run_here(data_dir, offline, monkeypatch, capsys):
    """As run_script, but through train_omniglot.main in this process: seconds sooner, where the process is not
    under test."""
    def run(*args: str, env: dict = None) -> subprocess.CompletedProcess:
        for variable, value in {**offline, **(env or {})}.items():
            monkeypatch.setenv(variable, value)
        capsys.readouterr()  # what came before
        argv = ["--data", str(data_dir), *args]
        try:
            status = utils.run_script(T.main, argv, "train_omniglot.py")
        except SystemExit as exit:  # argparse's own errors
            status = exit.code
        output = capsys.readouterr()
        return subprocess.CompletedProcess(argv, status, output.out, output.err)
    return run


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, data_dir, offline):
    """A finished tiny run (5-way 1-shot, 6 meta-iterations)."""
    logdir = tmp_path_factory.mktemp("existing") / "run"
    environment = {**os.environ, **offline}
    subprocess.run([sys.executable, str(ROOT / "train_omniglot.py"), str(logdir), "--data", str(data_dir), *TINY],
                   env=environment, check=True, capture_output=True, timeout=600)
    return logdir


def snapshot(folder: Path) -> dict:
    """Every file under a folder and its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_end_with_one_line_and_change_nothing(name, existing_run, run_here, tmp_path):
    argv, expected = BAD_INPUTS[name]
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    (tmp_path / "damaged.pth").write_bytes(b"\x80\x04 this is not a checkpoint")
    argv, expected = [arg.replace("{tmp}", str(tmp_path)) for arg in argv], expected.replace("{tmp}", str(tmp_path))
    before = snapshot(existing_run)
    result = run_here(str(existing_run), *argv, env={omniglot.MIRROR_VARIABLE: ""})
    assert result.returncode != 0
    lines = visible_lines(result.stderr)
    assert len(lines) == 1 and expected in lines[0], lines
    assert lines[0].startswith("train_omniglot.py: error: ")
    assert snapshot(existing_run) == before


def test_a_run_older_than_a_training_flag_keeps_that_flag_at_its_default(existing_run, tmp_path):
    logdir = tmp_path / "older"
    logdir.mkdir()
    saved = json.loads((existing_run / "args.json").read_text())
    del saved["algorithm"], saved["inner_optimizer"]
    (logdir / "args.json").write_text(json.dumps(saved))
    assert options.parse_args([str(logdir)]).algorithm == "reptile"
    with pytest.raises(T.UserError, match="--algorithm fomaml differs from reptile"):
        options.parse_args([str(logdir), "--algorithm", "fomaml"])
    with pytest.raises(T.UserError, match="--inner-optimizer sgd differs from adam"):
        options.parse_args([str(logdir), "--inner-optimizer", "sgd"])
    assert options.parse_args([str(logdir), "--eval-only", "--inner-optimizer", "sgd"]).inner_optimizer == "sgd"


def test_paths_of_the_wrong_kind_are_named_in_one_line(run_here, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = run_here(str(a_file), *TINY)
    assert result.returncode == 2 and visible_lines(result.stderr) == [
        f"train_omniglot.py: error: the run folder {a_file} is a file; give a folder (a new one, or an earlier run's)"]
    result = run_here(str(tmp_path / "run"), "--data", str(tmp_path / "new-data"), *TINY,
                      env={omniglot.MIRROR_VARIABLE: str(a_file)})
    lines = visible_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and f"the mirror {a_file} (OMNIGLOT_MIRROR" in lines[0]


def test_a_second_trainer_is_refused_until_the_first_is_killed(script, run_here, existing_run, tmp_path):
    logdir = tmp_path / "run"
    argv, environment = script(str(logdir), *TINY, "--meta-iterations", "100000", "--check-every", "100000")
    first = subprocess.Popen(argv, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not list(logdir.glob("events.out.tfevents.*")):  # training has begun
            assert first.poll() is None, "the first run ended before it trained"
            time.sleep(0.2)
        second = run_here(str(logdir), *TINY)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert visible_lines(second.stderr) == [f"train_omniglot.py: error: {logdir} is being trained by another "
                                                f"process (pid {first.pid}); wait for it to end or stop it, or "
                                                f"choose another logdir"]
        assert len(list(logdir.glob("events.out.tfevents.*"))) == 1  # the second one wrote nothing
        # Evaluation of a folder in training still works (here of another run's checkpoint, as this one has none yet).
        evaluation = run_here(str(logdir), "--eval-only", "--eval-tasks", "2", "--meta-test-only", "--workers", "1",
                              "--checkpoint", str(existing_run / "checkpoint" / "check-6.pth"))
        assert evaluation.returncode == 0, evaluation.stderr
    finally:
        first.kill()  # SIGKILL: the operating system releases the lock
        first.wait()
    again = run_here(str(logdir), *TINY)
    assert again.returncode == 0, again.stderr


def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(run_here, tmp_path, monkeypatch):
    diverging = run_here(str(tmp_path / "diverging"), *TINY, "--lr", "1e30")
    assert diverging.returncode == 2 and "Traceback" not in diverging.stderr
    assert visible_lines(diverging.stderr) == [
        "train_omniglot.py: error: by meta-iteration 2, the meta-weights or the inner optimizer's state became NaN or "
        "infinite; the inner learning rate (--lr 1e+30) or the meta-step (--meta-lr 1.0) is likely too large. "
        "Nothing non-finite was written (no checkpoint had been written yet); train with smaller values in a new "
        "logdir"]
    assert not (tmp_path / "diverging" / "checkpoint").exists()

    # A run whose weights turn NaN in its 5th meta-iteration, after good checkpoints at 2 and 4: found at the
    # validation of the 6th, before its checkpoint.
    real_call, calls = fast.MetaIteration.__call__, []

    def meta_iteration_that_fails_at_5(self, *args, **kwargs):
        real_call(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            with torch.no_grad():
                next(self.meta_learner.model.parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(fast.MetaIteration, "__call__", meta_iteration_that_fails_at_5)
    logdir = tmp_path / "run"
    flags = [str(logdir), *TINY, "--check-every", "2"]
    stopped = run_here(*flags)
    lines = visible_lines(stopped.stderr)
    assert stopped.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("train_omniglot.py: error: by meta-iteration 6, ")
    assert f"the newest good checkpoint, {logdir / 'checkpoint' / 'check-4.pth'}, is kept" in lines[0]
    assert sorted(p.name for p in (logdir / "checkpoint").iterdir()) == ["check-2.pth", "check-4.pth"]
    state = load_checkpoint(str(logdir / "checkpoint" / "check-4.pth"))
    assert all(value.isfinite().all() for value in state["model"].values())
    monkeypatch.setattr(fast.MetaIteration, "__call__", real_call)
    assert run_here(*flags).returncode == 0  # resumes from check-4 and finishes


def limit_file_size(size: int):
    """A preexec_fn that makes every file the child writes fail beyond `size` bytes (File too large)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_failed_write_ends_in_one_line_leaves_no_temporary_file_and_resumes(script, run_here, tmp_path):
    logdir = tmp_path / "run"
    assert run_here(str(logdir), *TINY, "--meta-iterations", "3").returncode == 0  # check-3.pth
    argv, environment = script(str(logdir), *TINY)
    # A checkpoint is about 1.4 MB; the JSON files and events are far smaller.
    failed = subprocess.run(argv, env=environment, capture_output=True, timeout=600,
                            preexec_fn=limit_file_size(1_000_000))
    stderr = failed.stderr.decode()  # not text mode, which would turn the progress bar's carriage returns into lines
    assert failed.returncode == 2 and "Traceback" not in stderr
    assert visible_lines(stderr) == [
        f"train_omniglot.py: error: cannot write {logdir / 'checkpoint' / 'check-6.pth'} (File too large); the "
        f"newest good checkpoint, {logdir / 'checkpoint' / 'check-3.pth'}, is kept; once the cause is fixed, resume "
        f"with: python train_omniglot.py {shlex.join(argv[2:])}"]
    assert not [path for path in logdir.rglob("*") if path.suffix == ".tmp"]
    resumed = run_here(str(logdir), *TINY)
    assert resumed.returncode == 0, resumed.stderr
    assert "meta-iteration 3 of 6" in resumed.stdout and (logdir / "checkpoint" / "check-6.pth").is_file()


def test_a_failed_write_of_tensorboard_events_ends_in_one_line(script, loaded, tmp_path):
    logdir = tmp_path / "run"  # `loaded`: the data folder's decoded-image cache (8 MB) is written beforehand
    argv, environment = script(str(logdir), *TINY, "--meta-iterations", "100000", "--check-every", "100000",
                               "--validate-every", "1", "--meta-batch", "1", "--inner-steps", "1", "--test-iterations",
                               "1")
    # split.json (51 kB) fits; the event file outgrows the limit after about 80 (quick) meta-iterations.
    failed = subprocess.run(argv, env=environment, capture_output=True, timeout=600,
                            preexec_fn=limit_file_size(60_000))
    stderr = failed.stderr.decode()
    assert failed.returncode == 2 and "Traceback" not in stderr and "Exception in thread" not in stderr
    assert visible_lines(stderr) == [
        f"train_omniglot.py: error: cannot write the TensorBoard events in {logdir} (File too large); no checkpoint "
        f"had been written yet; once the cause is fixed, resume with: python train_omniglot.py {shlex.join(argv[2:])}"]


def test_eval_lake_scores_a_background_run_and_refuses_others(run_here, existing_run, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_lake_zip(mirror / "all_runs.zip", runs=2, classes=5)
    offline = {"env": {omniglot.MIRROR_VARIABLE: str(mirror)}}
    refused = run_here(str(existing_run), "--eval-lake", **offline)  # a paper-split run saw evaluation alphabets
    assert refused.returncode == 2 and "meta-trained on" in refused.stderr and "--split background" in refused.stderr
    logdir = tmp_path / "background"
    trained = run_here(str(logdir), *TINY, "--split", "background")
    assert trained.returncode == 0, trained.stderr
    scored = run_here(str(logdir), "--eval-lake", **offline)
    assert scored.returncode == 0, scored.stderr
    lines = scored.stdout.splitlines()
    assert [line.split()[0] for line in lines[-4:]] == ["run01", "run02", "mean", "recorded"]
    result = result_of(logdir, None, None, 6, lake.REPEATS)
    assert result["repeats"] == lake.REPEATS and result["split"] == "background"
    for mode in ("non-transductive", "transductive"):
        assert set(result[mode]["runs"]) == {"run01", "run02"} and 0 <= result[mode]["error"] <= 100
        assert result[mode]["error"] == pytest.approx(np.mean(list(result[mode]["runs"].values())))
        assert result[mode]["ci95"] == pytest.approx(1.96 * np.std(list(result[mode]["runs"].values()), ddof=1)
                                                     / np.sqrt(2))
    wrong_size = tmp_path / "twenty"
    wrong_size.mkdir()
    make_lake_zip(wrong_size / "all_runs.zip", runs=1, classes=20)
    refused = run_here(str(logdir), "--eval-lake", env={omniglot.MIRROR_VARIABLE: str(wrong_size)})
    assert refused.returncode == 2 and "runs are 20-way" in refused.stderr


def test_a_paper_setting_fills_in_the_flags_not_given(tmp_path):
    args = options.parse_args(["--paper-setting", "20way1shot", "--lr", "0.001"])
    assert (args.classes, args.shots, args.batch, args.inner_steps, args.meta_iterations, args.test_batch) == (
        20, 1, 20, 10, 200000, 10)
    assert args.lr == 0.001 and args.logdir == "runs/20way1shot"  # a flag given wins
    five_shot = options.parse_args([str(tmp_path / "run"), "--paper-setting", "5way5shot"])
    assert vars(five_shot) == {**vars(options.parse_args([str(tmp_path / "run")])), "paper_setting": "5way5shot"}
    assert "paper_setting" not in options.saved_args(args)


def test_eval_only_rescores_a_committed_checkpoint_as_frozen(run_here, tmp_path):
    """--eval-only on runs/5way-exact-split (its weights and its inner Adam state) gets the correct counts that
    tests/frozen/values.json holds for the same 30 tasks."""
    source, copy_ = ROOT / "runs/5way-exact-split", tmp_path / "run"
    (copy_ / "checkpoint").mkdir(parents=True)
    for name in ("args.json", "split.json", "checkpoint/check-100000.pth"):
        shutil.copy(source / name, copy_ / name)
    counts = json.loads((ROOT / "tests/frozen/values.json").read_text())["float32"]["test task counts"]["1-shot"]
    done = run_here(str(copy_), "--eval-only", "--shots", "1", "--eval-tasks", str(len(counts)), "--meta-test-only",
                    "--workers", "1", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = result_of(copy_, 1, "non-transductive", 100000, len(counts))
    assert result["meta-test"]["accuracy"] == pytest.approx(100 * sum(counts) / (5 * len(counts)), abs=1e-9)


@pytest.mark.parametrize("setting", sorted(paper.SETTINGS))
def test_each_paper_setting_and_the_defaults_are_the_papers_numbers(setting, tmp_path):
    args = options.parse_args([str(tmp_path / "run"), "--paper-setting", setting])
    assert {name: getattr(args, name) for name in paper.SETTINGS[setting]} == paper.SETTINGS[setting]
    assert (args.algorithm, args.inner_optimizer, args.meta_optimizer, args.weight_decay) == ("reptile", "adam",
                                                                                             "sgd", 1.0)
    defaults = options.parse_args([str(tmp_path / "run")])
    assert {name: getattr(defaults, name) for name in paper.SETTINGS["5way5shot"]} == paper.SETTINGS["5way5shot"]


@pytest.mark.parametrize("setting", sorted(paper.MAML))
def test_the_maml_presets_are_the_maml_papers_numbers(setting, tmp_path):
    for name, first_order in ((setting, False), (setting.replace("maml", "fomaml"), True)):
        args = options.parse_args([str(tmp_path / "run"), "--paper-setting", name])
        assert {key: getattr(args, key) for key in paper.MAML[setting]} == paper.MAML[setting]
        assert args.first_order is first_order and not args.transductive
        assert options.parse_args(["--paper-setting", name]).logdir == f"runs/{name}"


def test_a_tiny_maml_run_trains_with_the_maml_papers_settings(run_here, tmp_path):
    # First-order MAML differs only in reptile.maml_gradients (tests/test_reptile.py, tests/test_fast.py).
    tiny = [*TINY, "--meta-iterations", "6", "--meta-batch", "2", "--test-iterations", "3", "--shots", "1"]
    assert run_here(str(tmp_path / "run"), "--paper-setting", "maml-5way1shot", *tiny).returncode == 0
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint" / "check-6.pth"))
    assert "exp_avg" in state["meta_optimizer"]["state"][0]  # Adam's, the MAML paper's meta-optimizer
    assert state["model"]["classifier.weight"].shape == (5, 64)  # the features averaged
    assert json.loads((tmp_path / "run" / "args.json").read_text())["side_by_side"]  # the tasks vmapped
    result = result_of(tmp_path / "run", 1, "non-transductive", 6, 4)
    assert 0 <= result["meta-test"]["accuracy"] <= 100
    refused = run_here(str(tmp_path / "adam"), *TINY, "--algorithm", "maml", "--fomaml-tail", "1")
    assert refused.returncode == 2 and "--inner-optimizer sgd" in refused.stderr


def test_first_order_maml_with_sgd_trains_and_keeps_its_settings(run_here, tmp_path):
    flags = [str(tmp_path / "run"), *TINY, "--algorithm", "fomaml",
             "--query-shots", "1", "--inner-optimizer", "sgd", "--replacement", "--weight-decay", "0.999",
             "--lr", "0.003", "--train-shots", "3", "--inner-steps", "3", "--batch", "5", "--test-batch", "5"]
    assert run_here(*flags).returncode == 0
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert {name: saved[name] for name in ("algorithm", "query_shots", "inner_optimizer", "replacement",
                                           "weight_decay")} == {"algorithm": "fomaml", "query_shots": 1,
                                                                "inner_optimizer": "sgd", "replacement": True,
                                                                "weight_decay": 0.999}
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint" / "check-6.pth"))
    assert state["inner_optimizer"]["state"] == {}  # plain SGD keeps no state
    changed = run_here(*flags, "--weight-decay", "1")
    assert changed.returncode == 2 and "--weight-decay 1.0 differs from 0.999" in changed.stderr


def test_help_shows_every_default_but_none_and_on_off_switches():
    help_text = " ".join(options.build_parser().format_help().split())  # one line, as the wrapping falls
    assert "--seed SEED seed of the split, the initial weights and every task (default: 0)" in help_text
    assert "meta-step size at the end (annealed linearly) (default: 0.0)" in help_text
    assert "(default: False)" not in help_text and "(default: None)" not in help_text
    assert "(default: True)" not in help_text  # --no-cuda-graphs: True is the value it turns off


def test_the_scripts_start_without_importing_torchvision():
    # Importing torchvision loads torch._dynamo: seconds that --help, a refused command or a plot need not wait for.
    # Only preparing the data folder needs it.
    probe = "import sys, bench, plot_runs, train_omniglot; print(sorted(m for m in sys.modules if 'torchvision' in m))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr


def test_the_command_line_reports_a_bad_flag_in_one_line(run_script, tmp_path):
    result = run_script(str(tmp_path / "run"), "--shots", "25")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert visible_lines(result.stderr) == ["train_omniglot.py: error: --shots 25 leaves no query image: a character "
                                            "has 20 drawings, so --shots can be at most 19"]


def test_eval_only_on_an_empty_logdir_is_one_line(run_here, tmp_path):
    result = run_here(str(tmp_path / "empty"), "--eval-only")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert visible_lines(result.stderr) == [f"train_omniglot.py: error: {tmp_path / 'empty'} holds no checkpoint; "
                                            f"train first, or give --checkpoint FILE"]


def test_each_process_destroys_its_process_group_even_after_an_error(run_here, tmp_path, monkeypatch):
    # Left to the interpreter's exit, gloo's threads abort one torchrun process in about six (4 of 25 measured).
    def join_a_group_of_one(args) -> None:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    monkeypatch.setattr(T, "join_torchrun", join_a_group_of_one)
    try:
        result = run_here(str(tmp_path / "empty"), "--eval-only")
        assert result.returncode == 2 and "holds no checkpoint" in result.stderr
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_cuda_without_cuda_is_refused(run_here, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_here(str(tmp_path / "run"), "--device", "cuda")
    assert result.returncode != 0 and visible_lines(result.stderr) == [
        "train_omniglot.py: error: --device cuda: CUDA is not available here; use --device cpu"]


def all_scalars(logdir) -> dict:
    """Every logged scalar as {tag: [(step, value), ...]}, as TensorBoard reads them."""
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def final_state(logdir) -> dict:
    """The newest checkpoint of a run."""
    return torch.load(sorted((logdir / "checkpoint").iterdir(), key=lambda p: int(p.stem.split("-")[1]))[-1],
                      weights_only=True)


def comparable_results(logdir) -> dict:
    """results.json without what may differ between two runs of the same command: timings and paths."""
    results = json.loads((logdir / "results.json").read_text())
    for result in results.values():
        for name in ("seconds", "provenance", "training"):
            del result[name]
        result["checkpoint"] = Path(result["checkpoint"]).name
    return results


@pytest.mark.parametrize("setting", [[], ["--paper-setting", "maml-5way1shot", "--meta-batch", "4"]],
                         ids=["reptile", "maml"])
def test_a_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(setting, script, run_here, tmp_path):
    flags = [*setting, "--meta-iterations", "40", "--check-every", "10", "--validate-every", "5", "--eval-tasks", "6",
             "--test-iterations", "5", "--shots", "1", "--workers", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_here(str(straight), *flags).returncode == 0

    argv, environment = script(str(killed), *flags)
    process = subprocess.Popen(argv, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its own process group: kill -9 reaches its workers too
    while not (killed / "checkpoint" / "check-10.pth").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1 if setting else 3))  # a tiny MAML run has about 3 s left to train here
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_here(str(killed), *flags)
    assert resumed.returncode == 0, resumed.stderr

    straight_state, killed_state = final_state(straight), final_state(killed)
    assert straight_state["meta_iteration"] == killed_state["meta_iteration"] == 40
    for part in ("model", "inner_optimizer", "meta_optimizer"):
        flat_straight = torch.utils._pytree.tree_flatten(straight_state[part])[0]
        flat_killed = torch.utils._pytree.tree_flatten(killed_state[part])[0]
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(flat_straight, flat_killed, strict=True)), part
    assert comparable_results(killed) == comparable_results(straight)
    assert all_scalars(killed) == all_scalars(straight)
    # What trained it: one segment for the straight run, one per start for the killed one, joined end to end.
    parts = [(segment["from"], segment["to"]) for segment in killed_state["segments"]]
    assert [(segment["from"], segment["to"]) for segment in straight_state["segments"]] == [(0, 40)]
    assert len(parts) == 2 and parts[0][0] == 0 and parts[0][1] == parts[1][0] and parts[1][1] == 40


def test_a_killed_evaluation_resumes_and_records_what_an_uninterrupted_one_does(script, run_here, existing_run,
                                                                                tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for folder in (straight, killed):
        shutil.copytree(existing_run, folder)
    flags = ["--eval-only", "--eval-tasks", "150", "--meta-test-only", "--workers", "1", "--seed", "5"]
    assert run_here(str(straight), *flags).returncode == 0

    argv, environment = script(str(killed), *flags)
    process = subprocess.Popen(argv, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list(killed.glob("unfinished-evaluation-*meta-test*.json")):  # not the temporary .json.tmp
        assert process.poll() is None, "the evaluation ended before keeping a task"
        time.sleep(0.05)
    process.kill()
    process.wait()
    kept_file = next(killed.glob("unfinished-evaluation-*.json"))
    kept = json.loads(kept_file.read_text())
    kept_file.write_text(json.dumps({**kept, "seconds": 5000.0}))  # as if the first part had run for hours
    resumed = run_here(str(killed), *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert f"going on after the {len(kept['tasks'])} of 150 tasks kept in" in resumed.stdout
    assert comparable_results(killed) == comparable_results(straight)
    assert 5000 < result_of(killed, 1, "non-transductive", 6, 150, seed=5)["seconds"] < 5100
    assert not list(killed.glob("unfinished-evaluation-*")) and not list(straight.glob("unfinished-evaluation-*"))


def test_an_interrupted_evaluation_stops_its_workers_soon(script, existing_run, tmp_path):
    """Ctrl-C sent to the main process alone (as kill -INT does) ends an evaluation in worker processes within
    seconds, not after every task sent to the workers."""
    logdir = tmp_path / "run"
    shutil.copytree(existing_run, logdir)
    argv, environment = script(str(logdir), "--eval-only", "--eval-tasks", "10000", "--test-iterations", "50",
                               "--meta-test-only", "--workers", "2")
    # As from a terminal: a shell starts a command in the background with SIGINT ignored, as this one may be.
    process = subprocess.Popen(argv, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), start_new_session=True)
    try:
        while not list(logdir.glob("unfinished-evaluation-*meta-test*.json")):
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        started = time.time()
        assert process.wait(timeout=120) == 130
        assert time.time() - started < 60
        assert "the same command goes on from them" in process.stderr.read()
    finally:  # a failure leaves no workers behind to slow the tests after it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(run_here, tmp_path):
    logdir = tmp_path / "run"
    assert run_here(str(logdir), *TINY).returncode == 0
    (logdir / "checkpoint" / "check-6.pth").write_bytes(b"truncated")
    result = run_here(str(logdir), *TINY)
    assert result.returncode == 0, result.stderr
    assert "check-6.pth is unreadable" in result.stderr and "trying the previous checkpoint" in result.stderr
    assert "resumed" in result.stdout and "meta-iteration 3 of 6" in result.stdout
    assert load_checkpoint(str(logdir / "checkpoint" / "check-6.pth"))["meta_iteration"] == 6


def test_torchrun_splits_the_meta_batch_and_changes_no_mathematics(script, data_dir, tmp_path):
    logdir = tmp_path / "ddp"
    flags = ["--eval-tasks", "6", "--test-iterations", "5", "--shots", "1", "--validate-every", "1"]

    def torchrun(iterations: int) -> str:
        argv, environment = script(str(logdir), *flags, "--meta-iterations", str(iterations))
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 *argv[1:]], capture_output=True, env=environment, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr.decode()[-3000:]
        return result.stdout.decode()

    torchrun(2)
    assert "resumed" in torchrun(3)  # resumes under torchrun, each process with its own inner state
    state = final_state(logdir)
    assert state["meta_iteration"] == 3 and len(state["other_processes"]) == 1
    results = result_of(logdir, 1, "non-transductive", 3, 6)
    assert 0 <= results["meta-test"]["accuracy"] <= 100

    # The same arithmetic in one process, on one thread as under torchrun: each process's tasks adapted in its
    # own inner Adam chain (the meta-batch of 5: 3 tasks and 2), the two shares summed, one meta-step.
    args = options.parse_args([str(logdir), "--data", str(data_dir), "--device", "cpu"])
    sampler = omniglot.load_split(Path(args.logdir), data_dir, args.split, args.seed, "cpu")[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(args.seed)
        hp = options.hyperparameters(args)
        meta_model = fast.prepare_model(OmniglotModel(hp.classes), "cpu")
        # Each process: its own inner Adam chain (a MetaLearner's) and its own stream of tasks.
        processes = [(reptile.MetaLearner(meta_model, hp), utils.stream(args.seed, T.TRAIN_STREAM, process))
                     for process in (0, 1)]
        for iteration, total in ((0, 2), (1, 2), (2, 3)):  # the schedule of each launch's --meta-iterations
            for (share, generator), tasks in zip(processes, (3, 2)):
                drawn = [fast.draw_task(sampler, hp, generator) for _ in range(tasks)]
                sizes = fast.mini_batch_sizes(hp)
                share.accumulate([fast.mini_batches(sampler.bank(), rows, targets, sizes)
                                  for rows, targets in drawn])
            first = processes[0][0]
            with torch.no_grad():
                for mean, second in zip(first.mean, processes[1][0].mean):
                    mean.add_(second)
            first.meta_update(reptile.meta_step_size(iteration, dataclasses.replace(hp, meta_iterations=total)))
    finally:
        torch.set_num_threads(threads)
    for name, param in meta_model.named_parameters():
        if not is_conv_bias(meta_model, name):  # see is_conv_bias
            torch.testing.assert_close(state["model"][name], param.detach(), rtol=1e-4, atol=1e-5)
    assert torch.equal(state["generators"]["train"], processes[0][1].get_state())
    assert torch.equal(state["other_processes"][0]["generators"]["train"], processes[1][1].get_state())
