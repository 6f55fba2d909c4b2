"""fast.py: the meta-iteration on tasks drawn as rows of a device-resident bank equals reptile.py's plain one."""
import pytest
import torch

import fast
import omniglot
import oracle
import paper
import reptile
from models import OmniglotModel
from reptile import Hyperparameters


def random_sampler(characters: int = 30, rotations=(0,)) -> omniglot.TaskSampler:
    torch.manual_seed(1)
    return omniglot.TaskSampler((torch.rand(characters, omniglot.DRAWERS, 28, 28) > 0.8).float(), rotations)


def meta_learner(hp: Hyperparameters) -> reptile.MetaLearner:
    """A MetaLearner of the Omniglot model as the runs make it, from seed 0."""
    torch.manual_seed(0)
    return reptile.MetaLearner(fast.prepare_model(OmniglotModel(hp.classes), "cpu"), hp)


def per_step_task(sampler: omniglot.TaskSampler, hp: Hyperparameters,
                  generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A meta-training task's mini-batches drawn without the bank: the task's images sampled (and rotated) on their
    own, then indexed step by step; with a query, the query last."""
    query = hp.query_shots or 0
    task = sampler.sample(hp.classes, hp.train_shots - query, query, generator)
    batches = reptile.inner_batches(len(task.support_inputs), hp.batch, hp.inner_steps - (1 if query else 0),
                                    generator, hp.replacement)
    return [(task.support_inputs[indices], task.support_targets[indices]) for indices in batches] + (
        [(task.query_inputs, task.query_targets)] if query else [])


@pytest.mark.parametrize("settings", [{}, {"algorithm": "fomaml", "query_shots": 2, "replacement": True,
                                           "inner_optimizer": "sgd", "weight_decay": 0.9},
                                      {"algorithm": "maml", "query_shots": 2, "inner_optimizer": "sgd",
                                       "meta_optimizer": "adam"},
                                      {"algorithm": "maml", "first_order": True, "query_shots": 2,
                                       "inner_optimizer": "sgd"}])
def test_the_bank_path_gives_the_plain_algorithm_bit_for_bit(settings):
    # The CPU runs the CUDA path without capture: tasks as rows of a bank of every rotated image, gathered on the
    # device. The same draws give the same images in the same order, so the same floats, not merely close ones.
    hp = Hyperparameters(classes=4, train_shots=6, meta_batch=3, inner_steps=4, batch=5, lr=0.01, **settings)
    sampler = random_sampler(rotations=omniglot.ROTATIONS)
    fast_side, plain_side = meta_learner(hp), meta_learner(hp)
    meta_iteration = fast.MetaIteration(fast_side, sampler)
    generators = [torch.Generator().manual_seed(5) for _ in range(2)]
    for step_size in (0.5, 0.4, 0.3):
        meta_iteration(step_size, generators[0])
        plain_side.step([per_step_task(sampler, hp, generators[1]) for _ in range(hp.meta_batch)], step_size)
    assert all(torch.equal(a, b) for a, b in zip(fast_side.model.parameters(), plain_side.model.parameters()))
    assert not torch.equal(next(plain_side.model.parameters()), next(meta_learner(hp).model.parameters()))
    assert torch.equal(generators[0].get_state(), generators[1].get_state())


def is_conv_bias(model: OmniglotModel, name: str) -> bool:
    """Whether a parameter is the bias of a convolution followed by BatchNorm.

    BatchNorm subtracts the batch mean, so such a bias has no effect on the output and its gradient is
    rounding noise; Adam divides that noise by its own scale, so the bias drifts differently under any change
    of summation order (fused Adam, memory layout) while the function stays the same.
    """
    module_name, _, kind = name.rpartition(".")
    return kind == "bias" and isinstance(model.get_submodule(module_name), torch.nn.Conv2d)


def test_a_meta_iteration_equals_the_straightforward_loop():
    hp = Hyperparameters(classes=3, train_shots=4, meta_batch=3, inner_steps=3, batch=5)  # the default lr and Adam
    sampler = random_sampler()
    project = meta_learner(hp)
    meta_iteration = fast.MetaIteration(project, sampler)
    plain_model = OmniglotModel(3)
    plain_model.load_state_dict(project.model.state_dict())
    adam_state = {"state": {}}
    generator, plain_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step_size in (0.4, 0.3):  # two meta-iterations: the inner Adam state carries over
        meta_iteration(step_size, generator)
        tasks = [per_step_task(sampler, hp, plain_generator) for _ in range(hp.meta_batch)]
        adam_state = oracle.reptile_meta_iteration(plain_model, adam_state, tasks, paper.FIVE_WAY["lr"], step_size)
    plain_params = dict(plain_model.named_parameters())
    for name, param in project.model.named_parameters():
        if is_conv_bias(project.model, name):
            continue  # see is_conv_bias
        torch.testing.assert_close(param.detach(), plain_params[name].detach(), rtol=1e-4, atol=1e-5, msg=name)
    images = sampler.sample(3, 5, 0, torch.Generator().manual_seed(0)).support_inputs
    torch.testing.assert_close(project.model(images), plain_model(images), rtol=1e-4, atol=1e-5)
    assert not torch.equal(project.model.features[0][0].weight, OmniglotModel(3).features[0][0].weight)
    assert torch.equal(generator.get_state(), plain_generator.get_state())
    state = project.inner_optimizer.state_dict()["state"]
    assert state[0]["step"].item() == adam_state["state"][0]["step"].item() == 2 * hp.meta_batch * hp.inner_steps
    for index, plain in adam_state["state"].items():
        torch.testing.assert_close(state[index]["exp_avg_sq"], plain["exp_avg_sq"], rtol=1e-3, atol=1e-9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU would capture the graph")
def test_a_failed_capture_warns_in_one_line_and_goes_on_eagerly(monkeypatch, capsys):
    monkeypatch.setattr(fast.Graphed, "WARMUP_CALLS", 0)
    calls = []
    graphed = fast.Graphed(lambda: calls.append(1) or len(calls), enabled=True)  # no GPU here: capture fails
    assert graphed() == 1 and graphed() == 2 and graphed.graph is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: CUDA graph capture failed (")
    assert lines[0].endswith("; going on without CUDA graphs (slower)")


def numbered_sampler(characters: int = 12) -> omniglot.TaskSampler:
    """A sampler whose every image holds one number in all its pixels: character * 20 + drawer."""
    ids = torch.arange(characters * omniglot.DRAWERS, dtype=torch.float32).view(characters, omniglot.DRAWERS, 1, 1)
    return omniglot.TaskSampler(ids.expand(-1, -1, 28, 28).clone())


@pytest.mark.parametrize("algorithm", ["fomaml", "maml"])
def test_the_query_is_kept_apart_from_the_earlier_steps(algorithm):
    hp = Hyperparameters(classes=3, train_shots=6, inner_steps=8, batch=5, algorithm=algorithm, query_shots=2)
    for seed in range(20):
        sampler = numbered_sampler()
        rows, targets = fast.draw_task(sampler, hp, torch.Generator().manual_seed(seed))
        sizes = fast.mini_batch_sizes(hp)
        *earlier, (query_images, query_labels) = fast.mini_batches(sampler.bank(), rows, targets, sizes)
        assert len(earlier) == hp.inner_steps - 1 and len(query_images) == hp.classes * hp.query_shots
        assert sorted(query_labels.tolist()) == [0, 0, 1, 1, 2, 2]
        seen = {int(image[0, 0, 0]) for images, _ in earlier for image in images}
        assert len(seen) == hp.classes * (hp.train_shots - hp.query_shots)  # 8 steps of 5 cover the 12 images
        assert not seen & {int(image[0, 0, 0]) for image in query_images}
