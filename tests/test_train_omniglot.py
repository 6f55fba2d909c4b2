import argparse
import copy
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def twin(generator: torch.Generator) -> torch.Generator:
    """A generator in the same state."""
    return torch.Generator().set_state(generator.get_state())


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


def test_train_step_moves_towards_the_mean_of_adapted_weights():
    args = settings(classes=3, train_shots=4, meta_batch=3, iterations=2, batch=5)
    sampler = random_sampler()
    torch.manual_seed(0)
    meta_model = OmniglotModel(3)
    learner = meta_model.clone()
    inner_optimizer = torch.optim.Adam(learner.parameters(), lr=args.lr, betas=(0.0, 0.999))
    generator = torch.Generator().manual_seed(5)

    # The Reptile update written out: Adam (whose state carries over) on each task from the old weights.
    old = [p.detach().clone() for p in meta_model.parameters()]
    expected_generator = twin(generator)
    adapted_sum = [torch.zeros_like(p) for p in old]
    model = meta_model.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.0, 0.999))
    for _ in range(args.meta_batch):
        task = sampler.sample(3, 4, 0, expected_generator)
        with torch.no_grad():
            for p, o in zip(model.parameters(), old):
                p.copy_(o)
        for indices in T.inner_batches(12, args.batch, args.iterations, expected_generator):
            optimizer.zero_grad()
            torch.nn.functional.nll_loss(model(task.support_images[indices]), task.support_labels[indices]).backward()
            optimizer.step()
        adapted_sum = [s + p.detach() for s, p in zip(adapted_sum, model.parameters())]
    expected = [o + 0.4 * (s / args.meta_batch - o) for o, s in zip(old, adapted_sum)]

    T.train_step(meta_model, learner, inner_optimizer, meta_model.clone(),
                 torch.optim.SGD(meta_model.parameters(), lr=1.0), sampler, args, 0.4, generator)
    for new, want in zip(meta_model.parameters(), expected):
        torch.testing.assert_close(new.detach(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(generator.get_state(), expected_generator.get_state())
    assert inner_optimizer.state_dict()["state"][0]["step"].item() == args.meta_batch * args.iterations


@pytest.mark.parametrize("transductive", [False, True])
def test_evaluate_task_classifies_queries_as_the_paper_does(transductive):
    args = settings(classes=5, shots=2, test_iterations=4, test_batch=5, transductive=transductive)
    sampler = random_sampler()
    torch.manual_seed(0)
    meta_model = OmniglotModel(5)
    learner = meta_model.clone()
    optimizer = torch.optim.Adam(learner.parameters(), lr=args.lr, betas=(0.0, 0.999))
    task = sampler.sample(5, 2, 1, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    model = meta_model.clone()
    model_optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.0, 0.999))
    T.adapt(model, model_optimizer, task.support_images, task.support_labels, 4, 5, twin(generator))
    with torch.no_grad():
        if transductive:
            log_probs = model(task.query_images)
        else:
            log_probs = torch.stack([model(torch.cat([task.support_images, q[None]]))[-1]
                                     for q in task.query_images])
    correct, loss = T.evaluate_task(meta_model, learner, optimizer, optimizer.state_dict(), task, args, generator)
    assert correct == (log_probs.argmax(1) == task.query_labels).sum().item()
    assert loss == pytest.approx(torch.nn.functional.nll_loss(log_probs, task.query_labels).item(), rel=1e-5)


def test_evaluation_leaves_the_training_adam_state_alone():
    args = settings(classes=5, shots=1, test_iterations=3, test_batch=5, meta_batch=1)
    sampler = random_sampler()
    meta_model = OmniglotModel(5)
    learner = meta_model.clone()
    optimizer = torch.optim.Adam(learner.parameters(), lr=args.lr, betas=(0.0, 0.999))
    T.train_step(meta_model, learner, optimizer, meta_model.clone(), torch.optim.SGD(meta_model.parameters(), 1.0),
                 sampler, args, 1.0, torch.Generator().manual_seed(0))
    before = copy.deepcopy(optimizer.state_dict())
    weights = copy.deepcopy(meta_model.state_dict())
    accuracies, losses = T.evaluate(meta_model, learner, optimizer, sampler, args, 3, torch.Generator())
    assert accuracies.shape == (3,) and ((0 <= accuracies) & (accuracies <= 1)).all()
    after = optimizer.state_dict()
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value)
    assert all(torch.equal(weights[k], v) for k, v in meta_model.state_dict().items())


def test_confidence_interval():
    import numpy as np
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
    assert "meta-test accuracy: " in first.stdout and "% (95% CI, 4 tasks, non-transductive)" in first.stdout
    for name in ("args.json", "split.json", "results.json", "checkpoint/check-6.pth", "checkpoint/check-3.pth"):
        assert (logdir / name).is_file(), name
    assert list(logdir.glob("events.out.tfevents.*"))
    assert scalars(logdir, "meta-test/accuracy") == [2, 4, 6]
    results = json.loads((logdir / "results.json").read_text())["non-transductive"]
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
    assert json.loads((logdir / "results.json").read_text())["non-transductive"]["meta_iteration"] == 9

    evaluation = run_script(str(logdir), "--eval-only", "--transductive", "--eval-tasks", "3")
    assert evaluation.returncode == 0, evaluation.stderr
    assert "(95% CI, 3 tasks, transductive)" in evaluation.stdout
    results = json.loads((logdir / "results.json").read_text())
    assert set(results) == {"non-transductive", "transductive"}
    assert results["transductive"]["settings"]["shots"] == 1  # taken from the run's args.json

    changed = run_script(str(logdir), *TINY, "--classes", "10")
    assert changed.returncode != 0 and "--classes 10 differs from 5" in changed.stderr


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
