import dataclasses

import numpy as np
import pytest
import torch

import bench
import omniglot
import reptile
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


def test_adapt_follows_the_gradient_of_the_loss_summed_over_the_batch():
    torch.manual_seed(0)
    model, expected = OmniglotModel(5), OmniglotModel(5)
    expected.load_state_dict(model.state_dict())
    images, labels = torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2)
    # One step over all ten images: their order within the batch changes neither BatchNorm nor the sum.
    reptile.adapt(model, torch.optim.SGD(model.parameters(), lr=1.0), images, labels, 1, 10, torch.Generator())
    torch.nn.functional.nll_loss(expected(images), labels, reduction="sum").backward()
    for param, before in zip(model.parameters(), expected.parameters()):
        # Summation order differs between the two; a mean would make every step ten times smaller.
        torch.testing.assert_close(before.detach() - param.detach(), before.grad, rtol=1e-2, atol=1e-4)


def test_meta_step_is_annealed_linearly():
    hp = Hyperparameters(meta_lr=1.0, meta_lr_final=0.2, meta_iterations=100)
    assert reptile.meta_step_size(0, hp) == 1.0
    assert reptile.meta_step_size(50, hp) == pytest.approx(0.6)
    assert reptile.meta_step_size(100, hp) == pytest.approx(0.2)


def project_side(classes: int, lr: float):
    """The project's meta-model, learner, inner Adam, mean holder and meta-optimizer, from seed 0."""
    torch.manual_seed(0)
    meta_model = reptile.prepare_model(OmniglotModel(classes), "cpu")
    learner, inner_optimizer = reptile.make_learner(meta_model, lr)
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
    hp = Hyperparameters(classes=3, train_shots=4, meta_batch=3, iterations=3, batch=5)
    sampler = random_sampler()
    meta_model, learner, inner_optimizer, mean_model, meta_optimizer = project_side(3, hp.lr)
    plain_model = OmniglotModel(3)
    plain_model.load_state_dict(meta_model.state_dict())
    adam_state = {"state": {}, "param_groups": inner_optimizer.state_dict()["param_groups"]}
    generator, plain_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step_size in (0.4, 0.3):  # two meta-iterations: the inner Adam state carries over
        reptile.train_step(meta_model, learner, inner_optimizer, mean_model, meta_optimizer, sampler, hp, step_size,
                     generator)
        adam_state = bench.baseline_meta_iteration(plain_model, adam_state, sampler, hp, step_size,
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
    assert state[0]["step"].item() == adam_state["state"][0]["step"].item() == 2 * hp.meta_batch * hp.iterations
    for index, plain in adam_state["state"].items():
        torch.testing.assert_close(state[index]["exp_avg_sq"], plain["exp_avg_sq"], rtol=1e-3, atol=1e-9)


def trained_side(hp, sampler):
    """The project's side after one meta-iteration (so its inner Adam has a state)."""
    side = project_side(hp.classes, hp.lr)
    reptile.train_step(*side, sampler, hp, 1.0, torch.Generator().manual_seed(0))
    return side


@pytest.mark.parametrize("transductive", [False, True])
def test_evaluation_agrees_with_the_straightforward_loop(transductive):
    hp = Hyperparameters(classes=5, shots=1, test_iterations=10, transductive=transductive, meta_batch=1)
    sampler = random_sampler()
    meta_model, _, inner_optimizer, *_ = trained_side(hp, sampler)
    plain_model = OmniglotModel(5)
    plain_model.load_state_dict(meta_model.state_dict())
    seeds = reptile.task_seeds(200, torch.Generator().manual_seed(9))
    plain = np.array(bench.baseline_evaluate(plain_model, inner_optimizer.state_dict(), sampler, hp, seeds))
    ours = np.array(reptile.evaluate_tasks(meta_model.state_dict(), inner_optimizer.state_dict(), sampler, hp, seeds))
    assert abs(ours[:, 0].mean() - plain[:, 0].mean()) / 5 <= 0.005
    assert (ours[:, 0] == plain[:, 0]).mean() >= 0.95  # the same predictions, but for rare near-ties
    # Adam turns rounding differences in near-zero gradients into full-size steps, so losses drift slightly.
    assert np.median(np.abs(ours[:, 1] - plain[:, 1]) / plain[:, 1]) < 0.01
    # The GPU's way, all tasks adapted side by side (vmapped), against the per-task evaluator on the first 100.
    together = np.array(reptile.evaluate_tasks_together(meta_model.state_dict(), inner_optimizer.state_dict(),
                                                        sampler, hp, seeds[:100]))
    assert (together[:, 0] == ours[:100, 0]).mean() >= 0.98
    assert np.median(np.abs(together[:, 1] - ours[:100, 1]) / ours[:100, 1]) < 1e-3


def test_non_transductive_queries_do_not_share_batch_statistics():
    hp = Hyperparameters(classes=5, shots=1, test_iterations=2)
    sampler = random_sampler()
    meta_model, _, inner_optimizer, *_ = trained_side(hp, sampler)
    seeds = [3]
    alone = reptile.evaluate_tasks(meta_model.state_dict(), inner_optimizer.state_dict(), sampler, hp, seeds)
    together = reptile.evaluate_tasks(meta_model.state_dict(), inner_optimizer.state_dict(), sampler,
                                      dataclasses.replace(hp, transductive=True), seeds)
    assert alone != together


def test_confidence_interval():
    accuracies = np.array([1.0, 0.0] * 50)
    assert reptile.confidence_interval(accuracies) == pytest.approx(1.96 * accuracies.std(ddof=1) / 10)
