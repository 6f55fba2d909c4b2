import io
import zipfile

import pytest
import torch
from PIL import Image

import lake
import omniglot
import oracle
import paper
import reptile
from conftest import NO_NETWORK
from models import OmniglotModel
from reptile import Hyperparameters
from utils import UserError


def make_lake_zip(path, runs: int = 2, classes: int = 5) -> list[list[int]]:
    """An archive laid out like Lake's all_runs.zip, each test item a copy of one class image; the true classes."""
    generator = torch.Generator().manual_seed(0)
    truths = []
    with zipfile.ZipFile(path, "w") as archive:
        for run in range(1, runs + 1):
            pngs = []
            for _ in range(classes):
                pixels = (torch.rand(105, 105, generator=generator) > 0.1).numpy()
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                pngs.append(buffer.getvalue())
            truth = torch.randperm(classes, generator=generator).tolist()
            lines = []
            for item, label in enumerate(truth, 1):
                archive.writestr(f"run{run:02}/training/class{item:02}.png", pngs[item - 1])
                archive.writestr(f"run{run:02}/test/item{item:02}.png", pngs[label])
                lines.append(f"run{run:02}/test/item{item:02}.png run{run:02}/training/class{label + 1:02}.png")
            archive.writestr(f"run{run:02}/class_labels.txt", "\n".join(lines) + "\n")
            truths.append(truth)
    return truths


def test_lake_runs_are_read_with_their_labels(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    truths = make_lake_zip(mirror / "all_runs.zip")
    runs = lake.load_runs(tmp_path / "data", str(mirror))
    assert list(runs) == ["run01", "run02"]
    for task, truth in zip(runs.values(), truths):
        assert task.support_inputs.shape == task.query_inputs.shape == (5, 1, 28, 28)
        assert task.support_targets.tolist() == list(range(5)) and task.query_targets.tolist() == truth
        assert torch.equal(task.query_inputs, task.support_inputs[truth])  # each item is its class's image
        assert set(task.support_inputs.unique().tolist()) == {0.0, 1.0}


def test_the_real_lake_benchmark_has_20_runs_of_20_classes(mirror):
    runs = lake.load_runs(mirror, str(mirror))
    assert len(runs) == 20
    for task in runs.values():
        assert task.support_inputs.shape == task.query_inputs.shape == (20, 1, 28, 28)
        assert sorted(task.query_targets.tolist()) == list(range(20))


def test_a_lake_archive_that_contradicts_its_labels_is_named(tmp_path):
    make_lake_zip(tmp_path / "all_runs.zip")
    with zipfile.ZipFile(tmp_path / "all_runs.zip") as archive:
        files = {name: archive.read(name) for name in archive.namelist() if name != "run02/training/class03.png"}
    with zipfile.ZipFile(tmp_path / "all_runs.zip", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(UserError, match="run02 does not match its class_labels.txt"):
        lake.load_runs(tmp_path / "data", str(tmp_path))
    (tmp_path / "all_runs.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="damaged"):
        lake.load_runs(tmp_path / "data", str(tmp_path))


def test_without_network_or_mirror_the_lake_error_says_what_to_do(tmp_path, monkeypatch):
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(omniglot.MIRROR_VARIABLE, raising=False)
    with pytest.raises(UserError, match=f"cannot download {lake.URL}.*{omniglot.MIRROR_VARIABLE}"):
        lake.load_runs(tmp_path)
    assert not list(tmp_path.glob("*.part"))


def test_each_way_of_classifying_lakes_queries_is_the_straightforward_loops():
    # The queries are the support images, faded: in one batch (transductive) BatchNorm scales the fading away, beside
    # the support images (non-transductive) it does not. The two ways give other answers here.
    torch.manual_seed(0)
    support = (torch.rand(5, 1, 28, 28) > 0.5).float()
    runs = {f"run{k:02}": reptile.TestTask(support, torch.arange(5), 0.2 * support[order], order)
            for k, order in enumerate(torch.stack([torch.randperm(5) for _ in range(3)]))}
    hp = Hyperparameters(classes=5, shots=1, test_iterations=20, lr=paper.FIVE_WAY["lr"])
    meta_model = OmniglotModel(5)
    seeds = [11, 12]
    errors = lake.error_rates(meta_model, {"state": {}}, runs, hp, seeds)
    for mode in lake.MODES:
        expected = []
        for task in runs.values():
            orders = [reptile.inner_batches(5, hp.test_batch, hp.test_iterations, torch.Generator().manual_seed(seed))
                      for seed in seeds]
            expected.append([100 * (5 - oracle.score_test_task(meta_model, {"state": {}}, task, order,
                                                               paper.FIVE_WAY["lr"], mode == "transductive")[0]) / 5
                             for order in orders])
        assert errors[mode].tolist() == expected, mode
    assert errors["transductive"].tolist() != errors["non-transductive"].tolist()
