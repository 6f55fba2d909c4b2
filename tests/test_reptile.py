"""reptile.py on toy problems and plain torch.nn.Modules: no Omniglot, no project model."""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import reptile
from reptile import Hyperparameters

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def mlp(inputs: int = 1, outputs: int = 1, hidden: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).sum()


def regression_task(generator: torch.Generator, batches: int = 3, batch: int = 4) -> list:
    """A line y = a x + b with its own a and b: mini-batches of (x, y), real-valued targets."""
    slope, offset = torch.randn(2, generator=generator)
    x = torch.randn(batches, batch, 1, generator=generator)
    return [(inputs, slope * inputs + offset) for inputs in x]


def classification_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(10, 6, generator=generator), torch.arange(5).repeat(2)


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
    assert all(len(set(row.tolist())) == 5 for row in batches)  # as the paper's code: no example twice in one batch
    # Without replacement, every two batches are one pass over the ten examples; here an example may recur at once.
    assert any(set(first.tolist()) & set(second.tolist()) for first, second in zip(batches[::2], batches[1::2]))


def test_an_sgd_step_follows_the_gradient_of_the_cross_entropy_of_the_logits_summed_over_the_batch():
    model, inputs, labels = mlp(6, 5), *classification_batch()
    expected = copy.deepcopy(model)
    reptile.adapt(model, torch.optim.SGD(model.parameters(), lr=0.1), [(inputs, labels)])
    # Written out: log-softmax of the logits, minus the log-probability of each label, summed (not averaged).
    log_probs = expected(inputs) - expected(inputs).exp().sum(dim=1, keepdim=True).log()
    (-log_probs[torch.arange(10), labels].sum()).backward()
    for param, before in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(param.detach(), before.detach() - 0.1 * before.grad)


def test_the_inner_loop_minimises_the_loss_it_is_given_on_real_valued_targets():
    model = mlp()
    expected = copy.deepcopy(model)
    [(inputs, targets)] = regression_task(torch.Generator().manual_seed(1), batches=1)
    reptile.adapt(model, torch.optim.SGD(model.parameters(), lr=0.1), [(inputs, targets)], squared_error)
    squared_error(expected(inputs), targets).backward()
    for param, before in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(param.detach(), before.detach() - 0.1 * before.grad)


def test_weight_decay_multiplies_the_weights_before_each_step():
    model = mlp()
    expected = copy.deepcopy(model)
    batch = regression_task(torch.Generator().manual_seed(1), batches=1)[0]
    reptile.adapt(model, torch.optim.SGD(model.parameters(), lr=0.1), [batch] * 2, squared_error, weight_decay=0.5)
    for _ in range(2):
        with torch.no_grad():
            for param in expected.parameters():
                param.mul_(0.5)
        expected.zero_grad()
        squared_error(expected(batch[0]), batch[1]).backward()
        with torch.no_grad():
            for param in expected.parameters():
                param.sub_(0.1 * param.grad)
    for param, plain in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(param.detach(), plain.detach())


def test_the_inner_adam_has_beta1_zero_as_in_the_paper():
    optimizer = reptile.make_inner_optimizer(mlp().parameters(), 0.001, "adam")
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.001, (0.0, 0.999), 1e-8, 0)


def test_meta_step_is_annealed_linearly():
    hp = Hyperparameters(meta_lr=1.0, meta_lr_final=0.2, meta_iterations=100)
    assert reptile.meta_step_size(0, hp) == 1.0
    assert reptile.meta_step_size(50, hp) == pytest.approx(0.6)
    assert reptile.meta_step_size(100, hp) == pytest.approx(0.2)


def sgd_adapted(model: nn.Module, batches: list, lr: float, held: frozenset = frozenset()) -> tuple[nn.Module, list]:
    """A copy of `model` after plain SGD steps on the batches (the parameters named in `held` left as they are), and
    its weights before the last step."""
    learner = copy.deepcopy(model)
    before = None
    for inputs, targets in batches:
        before = [param.detach().clone() for param in learner.parameters()]
        learner.zero_grad()
        squared_error(learner(inputs), targets).backward()
        with torch.no_grad():
            for name, param in learner.named_parameters():
                if name not in held:
                    param -= lr * param.grad
    return learner, before


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_reptile_and_the_reptile_papers_first_order_maml_step_as_straightforward_loops_do(algorithm):
    hp = Hyperparameters(meta_batch=2, lr=0.05, inner_optimizer="sgd", algorithm=algorithm)
    model = mlp()
    expected = copy.deepcopy(model)
    meta_learner = reptile.MetaLearner(model, hp, squared_error)
    generator = torch.Generator().manual_seed(3)
    for step_size in (0.5, 0.3):
        tasks = [regression_task(generator) for _ in range(2)]
        meta_learner.step(tasks, step_size)
        meta = [param.detach().clone() for param in expected.parameters()]
        targets = []
        for task in tasks:
            learner, before_last = sgd_adapted(expected, task, 0.05)
            after = [param.detach() for param in learner.parameters()]
            # Reptile moves towards the adapted weights; first-order MAML by the last step's change alone.
            targets.append(after if algorithm == "reptile" else [m + a - b for m, a, b in zip(meta, after,
                                                                                               before_last)])
        with torch.no_grad():
            for k, param in enumerate(expected.parameters()):
                param += step_size * ((targets[0][k] + targets[1][k]) / 2 - param)
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want)


def query_loss_after_sgd(model: nn.Module, weights: torch.Tensor, task: list, lr: float,
                         held: frozenset = frozenset()) -> float:
    """The query's loss (the last mini-batch) after plain SGD steps on the others, from these weights."""
    start = copy.deepcopy(model)
    nn.utils.vector_to_parameters(weights, start.parameters())
    learner, _ = sgd_adapted(start, task[:-1], lr, held)
    return squared_error(learner(task[-1][0]), task[-1][1]).item()


@pytest.mark.parametrize("held", [frozenset(), frozenset({"0.bias", "2.weight"})], ids=["all adapted", "some held"])
def test_mamls_meta_gradient_equals_finite_differences(held):
    # A model may name parameters that only the meta-update learns (`meta_only`): the inner steps leave them alone,
    # but the query loss still depends on them, directly and through those steps.
    model = mlp(hidden=3).double()
    model.meta_only = held
    task = [(x.double(), y.double()) for x, y in regression_task(torch.Generator().manual_seed(2))]
    analytic = torch.cat([g.reshape(-1) for g in reptile.maml_gradients(model, task, 0.05, squared_error)])
    weights = nn.utils.parameters_to_vector(model.parameters()).detach()
    numeric = torch.zeros_like(weights)
    for i in range(len(weights)):
        step = torch.zeros_like(weights)
        step[i] = 1e-6
        numeric[i] = (query_loss_after_sgd(model, weights + step, task, 0.05, held)
                      - query_loss_after_sgd(model, weights - step, task, 0.05, held)) / 2e-6
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_the_inner_loop_leaves_the_parameters_a_model_keeps_for_the_meta_update_alone():
    model = mlp()
    model.meta_only = frozenset({"0.bias"})
    meta_learner = reptile.MetaLearner(model, Hyperparameters(lr=0.05, inner_optimizer="sgd"), squared_error)
    target = dict(zip([name for name, _ in model.named_parameters()],
                      meta_learner.target(regression_task(torch.Generator().manual_seed(1)))))
    for name, param in model.named_parameters():
        assert torch.equal(target[name], param) == (name == "0.bias"), name


def test_first_order_maml_is_the_query_gradient_at_the_adapted_weights_and_differs_from_maml():
    model = mlp(hidden=3).double()
    task = [(x.double(), y.double()) for x, y in regression_task(torch.Generator().manual_seed(2))]
    first_order = reptile.maml_gradients(model, task, 0.05, squared_error, first_order=True)
    adapted, _ = sgd_adapted(model, task[:-1], 0.05)
    adapted.zero_grad()
    squared_error(adapted(task[-1][0]), task[-1][1]).backward()
    for got, param in zip(first_order, adapted.parameters()):
        torch.testing.assert_close(got, param.grad)
    second_order = reptile.maml_gradients(model, task, 0.05, squared_error)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(first_order, second_order))


@pytest.mark.parametrize("meta_optimizer", ["sgd", "adam"])
def test_maml_steps_the_meta_optimizer_on_the_mean_meta_gradient(meta_optimizer):
    hp = Hyperparameters(meta_batch=2, lr=0.05, inner_optimizer="sgd", algorithm="maml", meta_optimizer=meta_optimizer,
                         meta_lr=0.01)
    model = mlp()
    expected = copy.deepcopy(model)
    tasks = [regression_task(torch.Generator().manual_seed(seed)) for seed in (4, 5)]
    reptile.MetaLearner(model, hp, squared_error).step(tasks, 0.01)
    gradients = [reptile.maml_gradients(expected, task, 0.05, squared_error) for task in tasks]
    optimizer = (torch.optim.Adam if meta_optimizer == "adam" else torch.optim.SGD)(expected.parameters(), lr=0.01)
    for param, first, second in zip(expected.parameters(), *gradients):
        param.grad = (first + second) / 2
    optimizer.step()
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml", "maml"])
def test_each_algorithm_meta_trains_a_plain_module_on_real_valued_targets(algorithm):
    # Lines y = a x + b whose slope and offset are drawn around (2, 1): a good initialization fits one quickly.
    def task(generator):
        slope, offset = torch.tensor([2.0, 1.0]) + 0.3 * torch.randn(2, generator=generator)
        x = torch.randn(4, 5, 1, generator=generator)
        return [(inputs, slope * inputs + offset) for inputs in x]

    hp = Hyperparameters(meta_batch=4, lr=0.02, inner_optimizer="sgd", algorithm=algorithm, meta_iterations=300,
                         meta_lr=0.02 if algorithm == "maml" else 1.0)
    model = mlp(hidden=16)
    meta_learner = reptile.MetaLearner(model, hp, squared_error)
    held_out = [task(torch.Generator().manual_seed(1000 + seed)) for seed in range(20)]

    def error_after_three_steps() -> float:
        errors = []
        for batches in held_out:
            learner, _ = sgd_adapted(model, batches[:-1], hp.lr)
            with torch.no_grad():
                errors.append(squared_error(learner(batches[-1][0]), batches[-1][1]).item())
        return sum(errors) / len(errors)

    before = error_after_three_steps()
    generator = torch.Generator().manual_seed(0)
    for iteration in range(hp.meta_iterations):
        meta_learner.step([task(generator) for _ in range(hp.meta_batch)], reptile.meta_step_size(iteration, hp))
    assert error_after_three_steps() < 0.3 * before


def test_reptile_imports_nothing_of_the_project_and_works_without_fcntl():
    code = ("import sys, importlib.abc\n"
            "class NoFcntl(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'fcntl':\n"
            "            raise ImportError('no fcntl here')\n"
            "sys.modules.pop('fcntl', None)\n"
            "sys.meta_path.insert(0, NoFcntl())\n"
            "import reptile\n"
            "project = {'omniglot', 'evaluate', 'run_folder', 'options', 'utils', 'models', 'fast', 'lake'}\n"
            "print(sorted(project & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_maml_papers_loss_is_the_summed_cross_entropy_divided_by_the_examples_per_class():
    logits, labels = torch.randn(15, 5), torch.arange(5).repeat(3)  # 3 examples of each of 5 classes
    torch.testing.assert_close(reptile.per_shot_cross_entropy(logits, labels),
                               nn.functional.cross_entropy(logits, labels, reduction="sum") / 3)


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "first-order maml"])
def test_mamls_meta_gradients_vmapped_over_the_tasks_equal_those_of_a_loop_over_them(first_order):
    # BatchNorm on the batch's statistics, as the Omniglot networks have, and a parameter held out of the inner loop.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(),
                          nn.Linear(8, 1)).double()
    model.meta_only = frozenset({"1.bias"})
    generator = torch.Generator().manual_seed(6)
    tasks = [[(x.double(), y.double()) for x, y in regression_task(generator)] for _ in range(3)]
    stacked = reptile.maml_gradients(model, reptile.stack_tasks(tasks), 0.05, squared_error, first_order,
                                     side_by_side=True)
    for index, task in enumerate(tasks):
        for got, want in zip(stacked, reptile.maml_gradients(model, task, 0.05, squared_error, first_order)):
            torch.testing.assert_close(got[index], want, rtol=1e-12, atol=1e-12)
    # SGD as the meta-optimizer: Adam would turn the rounding in the near-zero gradient of the bias before
    # BatchNorm into steps of any size.
    hp = Hyperparameters(meta_batch=3, lr=0.05, inner_optimizer="sgd", algorithm="maml", first_order=first_order,
                         meta_optimizer="sgd", meta_lr=0.01)
    side_by_side, loop = copy.deepcopy(model), copy.deepcopy(model)
    reptile.MetaLearner(side_by_side, hp, squared_error, side_by_side=True).step(tasks, 0.01)
    reptile.MetaLearner(loop, hp, squared_error).step(tasks, 0.01)
    assert not torch.equal(side_by_side[0].weight, model[0].weight)
    for got, want in zip(side_by_side.parameters(), loop.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
