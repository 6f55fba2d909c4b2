import dataclasses

import numpy as np
import pytest
import torch

import bench
import evaluate
import omniglot
import reptile
import utils
from models import OmniglotModel
from reptile import Hyperparameters


def random_sampler(characters: int = 30) -> omniglot.TaskSampler:
    torch.manual_seed(1)
    return omniglot.TaskSampler((torch.rand(characters, omniglot.DRAWERS, 28, 28) > 0.8).float())


def test_inner_batches_walk_shuffled_passes():
    generator = torch.Generator().manual_seed(0)
    one_pass = reptile.inner_batches(50, 10, 5, generator)
    assert one_pass.shape == (5, 10) and sorted(one_pass.flatten().tolist()) == list(range(50))
    spanning = reptile.inner_batches(7, 5, 3, generator).flatten().tolist()  # 15 indices: passes of 7, 7, then 1
    assert sorted(spanning[:7]) == list(range(7)) and sorted(spanning[7:14]) == list(range(7))
    many = reptile.inner_batches(5, 5, 50, generator)
    assert all(sorted(row.tolist()) == list(range(5)) for row in many)
    assert len({tuple(row.tolist()) for row in many}) > 1  # reshuffled between passes


def test_with_replacement_each_mini_batch_is_drawn_on_its_own():
    batches = reptile.inner_batches(10, 5, 200, torch.Generator().manual_seed(0), replacement=True)
    assert batches.shape == (200, 5)
    assert all(len(set(row.tolist())) == 5 for row in batches)  # as the paper's code: no image twice in one batch
    # Without replacement, every two batches are one pass over the ten images; here an image may recur at once.
    assert any(set(first.tolist()) & set(second.tolist()) for first, second in zip(batches[::2], batches[1::2]))


def sgd_learner_and_a_plain_copy():
    """The project's learner with inner SGD (lr 0.1), a plain model with the same weights, and one batch of ten."""
    torch.manual_seed(0)
    model, plain = OmniglotModel(5), OmniglotModel(5)
    plain.load_state_dict(model.state_dict())
    return (*reptile.make_learner(model, 0.1, "sgd"), plain, torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2))


def test_an_sgd_step_follows_the_gradient_of_the_loss_summed_over_the_batch():
    learner, optimizer, expected, images, labels = sgd_learner_and_a_plain_copy()
    reptile.adapt(learner, optimizer, [(images, labels)])
    torch.nn.functional.nll_loss(expected(images), labels, reduction="sum").backward()
    for param, before in zip(learner.parameters(), expected.parameters()):
        # p - lr * g: a mean would make every step ten times smaller, Adam would divide by its running scale.
        torch.testing.assert_close(param.detach(), before.detach() - 0.1 * before.grad, rtol=1e-3, atol=1e-5)


def test_the_inner_loop_minimises_the_loss_it_is_given():
    learner, optimizer, expected, images, labels = sgd_learner_and_a_plain_copy()
    squared_error = lambda log_probs, labels: ((log_probs.exp() - torch.nn.functional.one_hot(labels, 5)) ** 2).sum()
    reptile.adapt(learner, optimizer, [(images, labels)], loss=squared_error)
    squared_error(expected(images), labels).backward()
    for param, before in zip(learner.parameters(), expected.parameters()):
        torch.testing.assert_close(param.detach(), before.detach() - 0.1 * before.grad, rtol=1e-3, atol=1e-5)


def test_weight_decay_multiplies_the_weights_before_each_step():
    learner, optimizer, expected, images, labels = sgd_learner_and_a_plain_copy()
    reptile.adapt(learner, optimizer, [(images, labels)] * 2, weight_decay=0.5)
    for _ in range(2):
        with torch.no_grad():
            for param in expected.parameters():
                param.mul_(0.5)
        expected.zero_grad()
        torch.nn.functional.nll_loss(expected(images), labels, reduction="sum").backward()
        with torch.no_grad():
            for param in expected.parameters():
                param.sub_(0.1 * param.grad)
    for param, plain in zip(learner.parameters(), expected.parameters()):
        torch.testing.assert_close(param.detach(), plain.detach(), rtol=1e-3, atol=1e-5)


def test_meta_step_is_annealed_linearly():
    hp = Hyperparameters(meta_lr=1.0, meta_lr_final=0.2, meta_iterations=100)
    assert reptile.meta_step_size(0, hp) == 1.0
    assert reptile.meta_step_size(50, hp) == pytest.approx(0.6)
    assert reptile.meta_step_size(100, hp) == pytest.approx(0.2)


def project_side(classes: int, lr: float, inner_optimizer: str = "adam"):
    """The project's meta-model, learner, inner optimizer and meta-optimizer, from seed 0."""
    torch.manual_seed(0)
    meta_model = reptile.prepare_model(OmniglotModel(classes), "cpu")
    learner, optimizer = reptile.make_learner(meta_model, lr, inner_optimizer)
    return meta_model, learner, optimizer, torch.optim.SGD(meta_model.parameters(), lr=1)


def is_conv_bias(model: OmniglotModel, name: str) -> bool:
    """Whether a parameter is the bias of a convolution followed by BatchNorm.

    BatchNorm subtracts the batch mean, so such a bias has no effect on the output and its gradient is
    rounding noise; Adam divides that noise by its own scale, so the bias drifts differently under any change
    of summation order (fused Adam, memory layout) while the function stays the same.
    """
    module_name, _, kind = name.rpartition(".")
    return kind == "bias" and isinstance(model.get_submodule(module_name), torch.nn.Conv2d)


def test_a_meta_iteration_equals_the_straightforward_loop():
    hp = Hyperparameters(classes=3, train_shots=4, meta_batch=3, iterations=3, batch=5)
    sampler = random_sampler()
    meta_model, learner, inner_optimizer, meta_optimizer = project_side(3, hp.lr)
    meta_iteration = reptile.MetaIteration(meta_model, learner, inner_optimizer, meta_optimizer, sampler, hp)
    plain_model = OmniglotModel(3)
    plain_model.load_state_dict(meta_model.state_dict())
    adam_state = {"state": {}, "param_groups": inner_optimizer.state_dict()["param_groups"]}
    generator, plain_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step_size in (0.4, 0.3):  # two meta-iterations: the inner Adam state carries over
        meta_iteration(step_size, generator)
        adam_state = bench.baseline_meta_iteration(plain_model, adam_state, sampler, hp, step_size,
                                                   plain_generator)
    plain_params = dict(plain_model.named_parameters())
    for name, param in meta_model.named_parameters():
        if is_conv_bias(meta_model, name):
            continue  # see is_conv_bias
        torch.testing.assert_close(param.detach(), plain_params[name].detach(), rtol=1e-4, atol=1e-5, msg=name)
    images = sampler.sample(3, 5, 0, torch.Generator().manual_seed(0)).support_inputs
    torch.testing.assert_close(meta_model(images), plain_model(images), rtol=1e-4, atol=1e-5)
    assert not torch.equal(meta_model.features[0][0].weight, OmniglotModel(3).features[0][0].weight)
    assert torch.equal(generator.get_state(), plain_generator.get_state())
    state = inner_optimizer.state_dict()["state"]
    assert state[0]["step"].item() == adam_state["state"][0]["step"].item() == 2 * hp.meta_batch * hp.iterations
    for index, plain in adam_state["state"].items():
        torch.testing.assert_close(state[index]["exp_avg_sq"], plain["exp_avg_sq"], rtol=1e-3, atol=1e-9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU would capture the graph")
def test_a_failed_capture_warns_in_one_line_and_goes_on_eagerly(monkeypatch, capsys):
    monkeypatch.setattr(reptile.Graphed, "WARMUP_CALLS", 0)
    calls = []
    graphed = reptile.Graphed(lambda: calls.append(1) or len(calls), enabled=True)  # no GPU here: capture fails
    assert graphed() == 1 and graphed() == 2 and graphed.graph is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: CUDA graph capture failed (")
    assert lines[0].endswith("; going on without CUDA graphs (slower)")


def per_step_task(sampler: omniglot.TaskSampler, hp: Hyperparameters,
                  generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A meta-training task's mini-batches as the project drew them before the image bank: the task's images
    sampled (and rotated) on their own, then indexed step by step; with first-order MAML's tail, the queries last."""
    tail = hp.fomaml_tail or 0
    task = sampler.sample(hp.classes, hp.train_shots - tail, tail, generator)
    batches = reptile.inner_batches(len(task.support_inputs), hp.batch, hp.iterations - (1 if tail else 0),
                                    generator, hp.replacement)
    return [(task.support_inputs[indices], task.support_targets[indices]) for indices in batches] + (
        [(task.query_inputs, task.query_targets)] if tail else [])


@pytest.mark.parametrize("settings", [{}, {"algorithm": "fomaml", "fomaml_tail": 2, "replacement": True,
                                           "inner_optimizer": "sgd", "weight_decay": 0.9}])
def test_the_image_bank_path_gives_the_per_step_path_bit_for_bit(settings):
    # The CPU runs the CUDA path without capture: tasks as rows of a bank of every rotated image, gathered on the
    # device. The same draws give the same images in the same order, so the same floats, not merely close ones.
    hp = Hyperparameters(classes=4, train_shots=6, meta_batch=3, iterations=4, batch=5, lr=0.01, **settings)
    sampler = omniglot.TaskSampler(random_sampler().images, omniglot.ROTATIONS)
    sides = [project_side(4, hp.lr, hp.inner_optimizer) for _ in range(2)]
    meta_iteration = reptile.MetaIteration(*sides[0], sampler, hp)
    meta_model, learner, inner_optimizer, meta_optimizer = sides[1]
    mean_model = meta_model.clone()
    generators = [torch.Generator().manual_seed(5) for _ in range(2)]
    for step_size in (0.5, 0.4, 0.3):
        meta_iteration(step_size, generators[0])
        tasks = [per_step_task(sampler, hp, generators[1]) for _ in range(hp.meta_batch)]
        reptile.adapt_to_tasks(meta_model, learner, inner_optimizer, mean_model, tasks, hp)
        reptile.meta_step(meta_model, mean_model, meta_optimizer, step_size)
    assert all(torch.equal(a, b) for a, b in zip(sides[0][0].parameters(), meta_model.parameters()))
    assert not torch.equal(next(meta_model.parameters()), next(project_side(4, hp.lr)[0].parameters()))
    assert torch.equal(generators[0].get_state(), generators[1].get_state())


def test_the_validation_scorer_follows_the_training_and_gives_the_evaluator_bit_for_bit():
    hp = Hyperparameters(classes=5, shots=2, test_iterations=7, meta_batch=1)
    sampler = random_sampler()
    meta_model, learner, inner_optimizer, meta_optimizer = project_side(hp.classes, hp.lr)
    meta_iteration = reptile.MetaIteration(meta_model, learner, inner_optimizer, meta_optimizer, sampler, hp)
    meta_iteration(1.0, torch.Generator().manual_seed(0))
    scorer = evaluate.TestTaskScorer(meta_model, inner_optimizer.state_dict(), hp)
    generator, evaluation_generator = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    scores = []
    for iteration in range(3):  # each task starts afresh from the meta-model and inner state as they are now
        correct, loss = evaluate.evaluate_tasks(meta_model, inner_optimizer.state_dict(), sampler, hp,
                                                evaluate.task_seeds(1, evaluation_generator))[0]
        scores.append(evaluate.score_new_task(scorer, sampler, generator))
        assert scores[-1] == (correct / hp.classes, loss)
        meta_iteration(1.0, torch.Generator().manual_seed(iteration + 1))
    assert torch.equal(generator.get_state(), evaluation_generator.get_state())
    assert len(set(scores)) == 3


@pytest.mark.parametrize("together", [False, True])
def test_every_test_task_starts_from_the_inner_state_given_even_an_empty_one(together):
    hp = Hyperparameters(classes=5, shots=1, test_iterations=3, meta_batch=1)
    meta_model, _, fresh_adam, _ = project_side(hp.classes, hp.lr)
    tasks, batches = evaluate.draw_test_tasks(random_sampler(), hp, [7, 7, 8])
    scorer = evaluate.TestTaskScorer(meta_model, fresh_adam.state_dict(), hp, 3 if together else 0)
    _, losses = scorer(tasks, batches)
    assert torch.equal(scorer(tasks, batches)[1], losses) and not fresh_adam.state  # nothing kept from call to call
    if not together:  # nor from task to task (side by side, a task's place changes the last bits)
        assert losses[0] == losses[1] != losses[2]


def test_first_order_maml_steps_along_the_change_of_the_last_inner_step():
    hp = Hyperparameters(classes=3, train_shots=4, meta_batch=2, iterations=3, batch=5, algorithm="fomaml")
    sampler = random_sampler()
    meta_model, learner, inner_optimizer, meta_optimizer = project_side(3, hp.lr)
    start = [param.detach().clone() for param in meta_model.parameters()]
    # Straightforward: each task adapted in turn from the meta-weights (the inner Adam state carried on), the
    # change made by its last step kept, the mean change scaled by the meta-step.
    plain_learner, plain_optimizer = reptile.make_learner(meta_model, hp.lr, hp.inner_optimizer)
    generator = torch.Generator().manual_seed(5)
    changes = []
    for _ in range(hp.meta_batch):
        batches = per_step_task(sampler, hp, generator)
        reptile.copy_weights(meta_model, plain_learner)
        reptile.adapt(plain_learner, plain_optimizer, batches[:-1])
        before = [param.detach().clone() for param in plain_learner.parameters()]
        reptile.adapt(plain_learner, plain_optimizer, batches[-1:])
        changes.append([param.detach() - old for param, old in zip(plain_learner.parameters(), before)])
    expected = [first + 0.7 * (a + b) / 2 for first, a, b in zip(start, *changes)]
    reptile.MetaIteration(meta_model, learner, inner_optimizer, meta_optimizer, sampler, hp)(
        0.7, torch.Generator().manual_seed(5))
    for name, param, want in zip(dict(meta_model.named_parameters()), meta_model.parameters(), expected):
        torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-6, msg=name)
    adapted = [param.detach() for param in plain_learner.parameters()]  # Reptile would step towards these
    assert not all(torch.allclose(param, first + 0.7 * (last - first), atol=1e-6)
                   for param, first, last in zip(meta_model.parameters(), start, adapted))


def numbered_sampler(characters: int = 12) -> omniglot.TaskSampler:
    """A sampler whose every image holds one number in all its pixels: character * 20 + drawer."""
    ids = torch.arange(characters * omniglot.DRAWERS, dtype=torch.float32).view(characters, omniglot.DRAWERS, 1, 1)
    return omniglot.TaskSampler(ids.expand(-1, -1, 28, 28).clone())


def test_the_fomaml_tail_is_kept_apart_from_the_earlier_steps():
    hp = Hyperparameters(classes=3, train_shots=6, iterations=8, batch=5, algorithm="fomaml", fomaml_tail=2)
    for seed in range(20):
        sampler = numbered_sampler()
        drawn = reptile.draw_task(sampler, hp, torch.Generator().manual_seed(seed))
        *earlier, (tail_images, tail_labels) = reptile.drawn_mini_batches(sampler.bank(), drawn,
                                                                          reptile.inner_step_sizes(hp))
        assert len(earlier) == hp.iterations - 1 and len(tail_images) == hp.classes * hp.fomaml_tail
        assert sorted(tail_labels.tolist()) == [0, 0, 1, 1, 2, 2]
        seen = {int(image[0, 0, 0]) for images, _ in earlier for image in images}
        assert len(seen) == hp.classes * (hp.train_shots - hp.fomaml_tail)  # 8 steps of 5 cover the 12 images
        assert not seen & {int(image[0, 0, 0]) for image in tail_images}


def test_the_side_by_side_evaluator_agrees_with_sgd_weight_decay_and_replacement():
    hp = Hyperparameters(classes=5, shots=2, test_iterations=6, test_batch=4, meta_batch=1, lr=0.05,
                         inner_optimizer="sgd", weight_decay=0.99, replacement=True)
    sampler = random_sampler()
    meta_model, learner, inner_optimizer, meta_optimizer = project_side(5, hp.lr)
    _, sgd = reptile.make_learner(meta_model, hp.lr, "sgd")
    seeds = evaluate.task_seeds(50, torch.Generator().manual_seed(3))
    one_by_one, together = (np.array(evaluate.evaluate_tasks(meta_model, sgd.state_dict(), sampler, hp, seeds,
                                                             side_by_side)) for side_by_side in (False, True))
    assert (together[:, 0] == one_by_one[:, 0]).mean() >= 0.98
    assert np.median(np.abs(together[:, 1] - one_by_one[:, 1]) / one_by_one[:, 1]) < 1e-4
    adam = np.array(evaluate.evaluate_tasks(meta_model, inner_optimizer.state_dict(), sampler,
                                            dataclasses.replace(hp, inner_optimizer="adam"), seeds))
    assert not np.allclose(adam[:, 1], one_by_one[:, 1])  # the inner optimizer applies at meta-test too


def trained_side(hp, sampler):
    """The project's side after one meta-iteration (so its inner Adam has a state)."""
    side = project_side(hp.classes, hp.lr)
    reptile.MetaIteration(*side, sampler, hp)(1.0, torch.Generator().manual_seed(0))
    return side


@pytest.mark.parametrize("transductive", [False, True])
def test_evaluation_agrees_with_the_straightforward_loop(transductive):
    hp = Hyperparameters(classes=5, shots=1, test_iterations=10, transductive=transductive, meta_batch=1)
    sampler = random_sampler()
    meta_model, _, inner_optimizer, *_ = trained_side(hp, sampler)
    plain_model = OmniglotModel(5)
    plain_model.load_state_dict(meta_model.state_dict())
    seeds = evaluate.task_seeds(100, torch.Generator().manual_seed(9))
    plain = np.array(bench.baseline_evaluate(plain_model, inner_optimizer.state_dict(), sampler, hp, seeds))
    ours = np.array(evaluate.evaluate_tasks(meta_model, inner_optimizer.state_dict(), sampler, hp, seeds))
    # The same correct count but for near-ties (these random tasks are all near-ties): 95% of tasks here; starting
    # each task from a fresh Adam instead of the training state gives 85%, the other mode 63%.
    assert (ours[:, 0] == plain[:, 0]).mean() >= 0.93
    # Adam turns rounding differences in near-zero gradients into full-size steps, so losses drift slightly.
    assert np.median(np.abs(ours[:, 1] - plain[:, 1]) / plain[:, 1]) < 0.01
    # The GPU's way, all tasks adapted side by side (vmapped), against the per-task evaluator on the first 50.
    together = np.array(evaluate.evaluate_tasks(meta_model, inner_optimizer.state_dict(), sampler, hp, seeds[:50],
                                                together=True))
    assert (together[:, 0] == ours[:50, 0]).mean() >= 0.98
    assert np.median(np.abs(together[:, 1] - ours[:50, 1]) / ours[:50, 1]) < 1e-3


def test_non_transductive_queries_do_not_share_batch_statistics():
    hp = Hyperparameters(classes=5, shots=1, test_iterations=2)
    sampler = random_sampler()
    meta_model, _, inner_optimizer, *_ = trained_side(hp, sampler)
    seeds = [3]
    alone = evaluate.evaluate_tasks(meta_model, inner_optimizer.state_dict(), sampler, hp, seeds)
    together = evaluate.evaluate_tasks(meta_model, inner_optimizer.state_dict(), sampler,
                                       dataclasses.replace(hp, transductive=True), seeds)
    assert alone != together


def test_confidence_interval():
    accuracies = np.array([1.0, 0.0] * 50)
    assert utils.confidence_interval(accuracies) == pytest.approx(1.96 * accuracies.std(ddof=1) / 10)


@pytest.mark.parametrize("inner_optimizer", ["adam", "sgd"])
def test_both_evaluators_step_with_the_same_inner_optimizer_settings(inner_optimizer, monkeypatch):
    """The scorer one task at a time and side by side (the GPU's) takes one inner optimizer each time from
    make_inner_optimizer; learning rate, betas, epsilon and weight decay must be the same."""
    hp = Hyperparameters(classes=5, shots=1, test_iterations=2, meta_batch=1, inner_optimizer=inner_optimizer)
    sampler = random_sampler()
    meta_model, _, inner_optimizer_state, *_ = trained_side(hp, sampler)
    made = []

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    original = reptile.make_inner_optimizer
    monkeypatch.setattr(reptile, "make_inner_optimizer", recording)
    seeds = evaluate.task_seeds(2, torch.Generator().manual_seed(3))
    if inner_optimizer == "sgd":  # trained_side's inner loop is Adam's; SGD keeps no state
        inner_optimizer_state = reptile.make_learner(meta_model, hp.lr, "sgd")[1]
    made.clear()
    for side_by_side in (False, True):
        evaluate.evaluate_tasks(meta_model, inner_optimizer_state.state_dict(), sampler, hp, seeds, side_by_side)
    one_by_one, side_by_side = made

    def settings(optimizer):
        implementation = ("params", "fused", "foreach", "capturable", "differentiable")
        return type(optimizer), {key: value for key, value in optimizer.param_groups[0].items()
                                 if key not in implementation}
    assert settings(one_by_one) == settings(side_by_side)
