import argparse
import copy
import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bench
import omniglot
import train_omniglot as T
from models import OmniglotModel

TINY = ["--meta-iterations", "6", "--eval-tasks", "4", "--validate-every", "2", "--check-every", "3",
        "--test-iterations", "5", "--shots", "1"]


def settings(**overrides) -> argparse.Namespace:
    """The default flags, with some changed."""
    args = T.build_parser().parse_args([])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def random_sampler(characters: int = 30) -> omniglot.TaskSampler:
    torch.manual_seed(1)
    return omniglot.TaskSampler((torch.rand(characters, omniglot.DRAWERS, 28, 28) > 0.8).float())


def test_inner_batches_walk_shuffled_passes():
    generator = torch.Generator().manual_seed(0)
    one_pass = T.inner_batches(50, 10, 5, generator)
    assert one_pass.shape == (5, 10) and sorted(one_pass.flatten().tolist()) == list(range(50))
    spanning = T.inner_batches(7, 5, 3, generator).flatten().tolist()  # 15 indices: passes of 7, 7, then 1
    assert sorted(spanning[:7]) == list(range(7)) and sorted(spanning[7:14]) == list(range(7))
    many = T.inner_batches(5, 5, 50, generator)
    assert all(sorted(row.tolist()) == list(range(5)) for row in many)
    assert len({tuple(row.tolist()) for row in many}) > 1  # reshuffled between passes


def test_meta_step_is_annealed_linearly():
    args = settings(meta_lr=1.0, meta_lr_final=0.2, meta_iterations=100)
    assert T.meta_step_size(0, args) == 1.0
    assert T.meta_step_size(50, args) == pytest.approx(0.6)
    assert T.meta_step_size(100, args) == pytest.approx(0.2)


def project_side(classes: int, lr: float):
    """The project's meta-model, learner, inner Adam, mean holder and meta-optimizer, from seed 0."""
    torch.manual_seed(0)
    meta_model = T.prepare_model(OmniglotModel(classes), "cpu")
    learner, inner_optimizer = T.make_learner(meta_model, lr)
    return meta_model, learner, inner_optimizer, meta_model.clone(), torch.optim.SGD(meta_model.parameters(), lr=1)


def is_conv_bias(model: OmniglotModel, name: str) -> bool:
    """Whether a parameter is the bias of a convolution followed by BatchNorm.

    BatchNorm subtracts the batch mean, so such a bias has no effect on the output and its gradient is
    rounding noise; Adam divides that noise by its own scale, so the bias drifts differently under any change
    of summation order (fused Adam, memory layout) while the function stays the same.
    """
    module_name, _, kind = name.rpartition(".")
    return kind == "bias" and isinstance(model.get_submodule(module_name), torch.nn.Conv2d)


def test_train_step_equals_the_straightforward_loop():
    args = settings(classes=3, train_shots=4, meta_batch=3, iterations=3, batch=5)
    sampler = random_sampler()
    meta_model, learner, inner_optimizer, mean_model, meta_optimizer = project_side(3, args.lr)
    plain_model = OmniglotModel(3)
    plain_model.load_state_dict(meta_model.state_dict())
    adam_state = {"state": {}, "param_groups": inner_optimizer.state_dict()["param_groups"]}
    generator, plain_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step_size in (0.4, 0.3):  # two meta-iterations: the inner Adam state carries over
        T.train_step(meta_model, learner, inner_optimizer, mean_model, meta_optimizer, sampler, args, step_size,
                     generator)
        adam_state = bench.baseline_meta_iteration(plain_model, adam_state, sampler, args, step_size,
                                                   plain_generator)
    plain_params = dict(plain_model.named_parameters())
    for name, param in meta_model.named_parameters():
        if is_conv_bias(meta_model, name):
            continue  # see is_conv_bias
        torch.testing.assert_close(param.detach(), plain_params[name].detach(), rtol=1e-4, atol=1e-5, msg=name)
    images = sampler.sample(3, 5, 0, torch.Generator().manual_seed(0)).support_images
    torch.testing.assert_close(meta_model(images), plain_model(images), rtol=1e-4, atol=1e-5)
    assert not torch.equal(meta_model.features[0][0].weight, OmniglotModel(3).features[0][0].weight)
    assert torch.equal(generator.get_state(), plain_generator.get_state())
    state = inner_optimizer.state_dict()["state"]
    assert state[0]["step"].item() == adam_state["state"][0]["step"].item() == 2 * args.meta_batch * args.iterations
    for index, plain in adam_state["state"].items():
        torch.testing.assert_close(state[index]["exp_avg_sq"], plain["exp_avg_sq"], rtol=1e-3, atol=1e-9)


def trained_side(args, sampler):
    """The project's side after one meta-iteration (so its inner Adam has a state)."""
    side = project_side(args.classes, args.lr)
    T.train_step(*side, sampler, args, 1.0, torch.Generator().manual_seed(0))
    return side


@pytest.mark.parametrize("transductive", [False, True])
def test_evaluation_agrees_with_the_straightforward_loop(transductive):
    args = settings(classes=5, shots=1, test_iterations=10, transductive=transductive, meta_batch=1, workers=2)
    samplers = {"meta-test": random_sampler()}
    meta_model, learner, inner_optimizer, *_ = trained_side(args, samplers["meta-test"])
    plain_model = OmniglotModel(5)
    plain_model.load_state_dict(meta_model.state_dict())
    seeds = T.task_seeds(200, torch.Generator().manual_seed(9))
    plain = np.array(bench.baseline_evaluate(plain_model, inner_optimizer.state_dict(), samplers["meta-test"], args,
                                             seeds))
    accuracies, losses = T.evaluate(meta_model, inner_optimizer, samplers, "meta-test", args, 200,
                                    torch.Generator().manual_seed(9))
    assert abs(accuracies.mean() - plain[:, 0].mean() / 5) <= 0.005
    assert (accuracies == plain[:, 0] / 5).mean() >= 0.95  # the same predictions, but for rare near-ties
    # Adam turns rounding differences in near-zero gradients into full-size steps, so losses drift slightly.
    assert np.median(np.abs(losses - plain[:, 1]) / plain[:, 1]) < 0.01
    with T.start_pool(samplers, 2) as pool:
        in_workers = T.evaluate(meta_model, inner_optimizer, samplers, "meta-test", args, 40,
                                torch.Generator().manual_seed(9), pool)
    np.testing.assert_allclose(in_workers[1], losses[:40], rtol=1e-4)


def test_non_transductive_queries_do_not_share_batch_statistics():
    args = settings(classes=5, shots=1, test_iterations=2)
    sampler = random_sampler()
    meta_model, _, inner_optimizer, *_ = trained_side(args, sampler)
    seeds = [3]
    alone = T.evaluate_tasks(meta_model.state_dict(), inner_optimizer.state_dict(), sampler, args, seeds)
    together = T.evaluate_tasks(meta_model.state_dict(), inner_optimizer.state_dict(), sampler,
                                settings(**{**vars(args), "transductive": True}), seeds)
    assert alone != together


def test_evaluation_leaves_the_training_state_alone():
    args = settings(classes=5, shots=1, test_iterations=3, meta_batch=1)
    samplers = {"meta-test": random_sampler()}
    meta_model, _, inner_optimizer, *_ = trained_side(args, samplers["meta-test"])
    before = copy.deepcopy(inner_optimizer.state_dict())
    weights = copy.deepcopy(meta_model.state_dict())
    accuracies, losses = T.evaluate(meta_model, inner_optimizer, samplers, "meta-test", args, 3, torch.Generator())
    assert accuracies.shape == (3,) and ((0 <= accuracies) & (accuracies <= 1)).all()
    after = inner_optimizer.state_dict()
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value)
    assert all(torch.equal(weights[k], v) for k, v in meta_model.state_dict().items())


def test_confidence_interval():
    accuracies = np.array([1.0, 0.0] * 50)
    assert T.confidence_interval(accuracies) == pytest.approx(1.96 * accuracies.std(ddof=1) / 10)


def scalars(logdir, tag):
    events = EventAccumulator(str(logdir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_tiny_run_writes_everything_then_resumes(run_script, tmp_path):
    logdir = tmp_path / "run"
    first = run_script(str(logdir), *TINY)
    assert first.returncode == 0, first.stderr
    assert "meta-test accuracy: " in first.stdout
    assert "% (95% CI, 4 tasks, 5-way 1-shot, non-transductive)" in first.stdout
    for name in ("args.json", "split.json", "results.json", "checkpoint/check-6.pth", "checkpoint/check-3.pth"):
        assert (logdir / name).is_file(), name
    assert list(logdir.glob("events.out.tfevents.*"))
    assert scalars(logdir, "meta-test/accuracy") == [2, 4, 6]
    results = json.loads((logdir / "results.json").read_text())["1-shot non-transductive"]
    assert results["meta_iteration"] == 6 and results["tasks"] == 4 and 0 <= results["meta-test"]["accuracy"] <= 100
    split = json.loads((logdir / "split.json").read_text())
    assert len(split["train"]) == 1200 and len(split["test"]) == 423

    again = run_script(str(logdir), *TINY)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout and "meta-iteration 6 of 6" in again.stdout
    assert "training is complete" in again.stdout
    assert sorted(p.name for p in (logdir / "checkpoint").iterdir()) == ["check-3.pth", "check-6.pth"]

    longer = run_script(str(logdir), *TINY, "--meta-iterations", "9", "--keep", "2")
    assert longer.returncode == 0, longer.stderr
    assert "meta-iteration 6 of 9" in longer.stdout
    assert sorted(p.name for p in (logdir / "checkpoint").iterdir()) == ["check-6.pth", "check-9.pth"]
    assert scalars(logdir, "meta-test/accuracy") == [2, 4, 6, 8]
    assert json.loads((logdir / "results.json").read_text())["1-shot non-transductive"]["meta_iteration"] == 9

    evaluation = run_script(str(logdir), "--eval-only", "--transductive", "--eval-tasks", "3")
    assert evaluation.returncode == 0, evaluation.stderr
    assert "(95% CI, 3 tasks, 5-way 1-shot, transductive)" in evaluation.stdout
    five_shot = run_script(str(logdir), "--eval-only", "--shots", "5", "--eval-tasks", "3")
    assert five_shot.returncode == 0, five_shot.stderr
    results = json.loads((logdir / "results.json").read_text())
    assert set(results) == {"1-shot non-transductive", "1-shot transductive", "5-shot non-transductive"}
    assert results["1-shot transductive"]["settings"]["test_iterations"] == 5  # taken from the run's args.json

    changed = run_script(str(logdir), *TINY, "--classes", "10")
    assert changed.returncode != 0 and "--classes 10 differs from 5" in changed.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(signum, script, tmp_path):
    logdir = tmp_path / "run"
    argv, environment = script(str(logdir), *TINY, "--meta-iterations", "100000", "--check-every", "100000")
    process = subprocess.Popen(argv, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (logdir / "args.json").exists() and time.time() < deadline:
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


BAD_INPUTS = {
    "too many shots": (["--shots", "25"], "--shots 25"),
    "too many train shots": (["--train-shots", "21"], "--train-shots 21"),
    "zero classes": (["--classes", "0"], "--classes"),
    "negative learning rate": (["--lr", "-1"], "--lr"),
    "not a number": (["--meta-batch", "five"], "--meta-batch"),
    "more classes than test characters": (["--classes", "500", "--shots", "1"], "--classes 500"),
    "checkpoint without eval-only": (["--checkpoint", "x.pth"], "--checkpoint"),
    "eval-only on an empty logdir": (["--eval-only"], "holds no checkpoint"),
    "missing checkpoint": (["--eval-only", "--checkpoint", "nowhere.pth"], "does not exist"),
    "missing data, no network, no mirror": (["--data", "{tmp}/nodata"], "OMNIGLOT_MIRROR"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_end_with_one_line(name, run_script, tmp_path):
    argv, expected = BAD_INPUTS[name]
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    result = run_script(str(tmp_path / "run"), *argv, env={"OMNIGLOT_MIRROR": ""})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = visible_lines(result.stderr)
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_a_corrupt_checkpoint_is_one_line(run_script, tmp_path):
    bad = tmp_path / "check-5.pth"
    bad.write_bytes(b"\x80\x04 this is not a checkpoint")
    result = run_script(str(tmp_path / "run"), "--eval-only", "--checkpoint", str(bad))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = visible_lines(result.stderr)
    assert len(lines) == 1 and "unreadable" in lines[0], result.stderr


def test_cuda_without_cuda_is_refused(run_script, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_script(str(tmp_path / "run"), "--device", "cuda")
    assert result.returncode != 0 and visible_lines(result.stderr) == [
        "train_omniglot.py: error: --device cuda: CUDA is not available here; use --device cpu"]
