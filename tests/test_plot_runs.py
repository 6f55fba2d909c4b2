import json
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

import plot_runs
from utils import UserError, write_json


def log_scalars(logdir, tag: str, values: list[float], every: int = 10) -> None:
    """Write `values` of `tag` at steps every, 2 * every, ... as train_omniglot.py logs them."""
    with SummaryWriter(str(logdir)) as writer:
        for index, value in enumerate(values):
            writer.add_scalar(tag, value, (index + 1) * every)


def test_moving_average_is_the_mean_over_the_last_window_meta_iterations():
    values = np.random.default_rng(0).random(50)
    steps = 10 * np.arange(1, 51)  # a point every 10 meta-iterations
    expected = [values[max(0, i - 6):i + 1].mean() for i in range(len(values))]
    np.testing.assert_allclose(plot_runs.moving_average(steps, values, 70), expected)
    np.testing.assert_allclose(plot_runs.moving_average(steps, values, 10), values)
    blocks, means, _ = plot_runs.block_means(steps, values, np.ones(50), 100)  # a summarized run smooths the same
    np.testing.assert_allclose(plot_runs.moving_average(blocks, means, 500),
                               plot_runs.moving_average(steps, values, 500)[9::10])


def test_read_curve_returns_the_logged_points(tmp_path):
    log_scalars(tmp_path, plot_runs.TAG, [0.2, 0.5, 0.75])
    steps, values = plot_runs.read_curve(tmp_path)
    assert steps.tolist() == [10, 20, 30]
    np.testing.assert_allclose(values, [0.2, 0.5, 0.75], rtol=1e-6)


def test_block_means_average_each_block_of_meta_iterations():
    steps, values = np.arange(1, 251), np.arange(1, 251, dtype=float)
    ends, means, counts = plot_runs.block_means(steps, values, np.ones(250), 100)
    assert ends.tolist() == [100, 200, 250] and counts.tolist() == [100, 100, 50]  # the last block is partial
    np.testing.assert_allclose(means, [50.5, 150.5, 225.5])


def test_a_summarized_run_is_drawn_from_its_curve_json(tmp_path, capsys):
    run, committed = tmp_path / "run", tmp_path / "committed"
    log_scalars(run, plot_runs.TAG, [0.1, 0.3, 0.5, 0.7, 0.9], every=1)
    assert plot_runs.main([str(run), "--summarize", "2"]) == 0
    assert f"wrote {run / plot_runs.CURVE}" in capsys.readouterr().out
    committed.mkdir()
    (committed / plot_runs.CURVE).write_bytes((run / plot_runs.CURVE).read_bytes())  # without the event files
    steps, values = plot_runs.read_curve(committed)
    assert steps.tolist() == [2, 4, 5]
    np.testing.assert_allclose(values, [0.2, 0.6, 0.9])
    np.testing.assert_allclose(plot_runs.read_curve(run)[1], [0.1, 0.3, 0.5, 0.7, 0.9], rtol=1e-6)  # events first


def test_a_run_resumed_from_its_curve_json_alone_draws_like_an_uninterrupted_one_however_often_summarized(tmp_path):
    values = list(np.random.default_rng(1).random(250).round(3))
    whole, clone = tmp_path / "whole", tmp_path / "clone"
    log_scalars(whole, plot_runs.TAG, values, every=1)
    plot_runs.summarize(whole, 100)
    log_scalars(clone, plot_runs.TAG, values[:130], every=1)  # stopped at 130, a partial block
    plot_runs.summarize(clone, 100)
    for events in clone.glob("events.out.tfevents.*"):  # a fresh clone holds only the committed curve.json
        events.unlink()
    with SummaryWriter(str(clone)) as writer:  # the resumed run logs 131 on
        for step, value in enumerate(values[130:], start=131):
            writer.add_scalar(plot_runs.TAG, value, step)
    straight = json.loads((whole / plot_runs.CURVE).read_text())
    np.testing.assert_allclose(plot_runs.read_curve(clone)[1], straight["means"], rtol=1e-5)  # drawn as blocks
    for _ in range(2):  # summarized twice while it trains, as a periodic autosave does
        plot_runs.summarize(clone, 100)
        merged = json.loads((clone / plot_runs.CURVE).read_text())
        assert merged["meta_iterations"] == [100, 130, 200, 250]  # the block that spans the resumption in two parts
        assert merged["counts"] == [100, 30, 70, 50]
        steps, means = plot_runs.read_curve(clone)
        assert steps.tolist() == straight["meta_iterations"] == [100, 200, 250]
        np.testing.assert_allclose(means, straight["means"], rtol=1e-5)
    for events in clone.glob("events.out.tfevents.*"):
        events.unlink()
    np.testing.assert_allclose(plot_runs.read_curve(clone)[1], straight["means"], rtol=1e-5)
    plot_runs.summarize(clone, 100)  # with no event file left, the two parts become one block again
    assert json.loads((clone / plot_runs.CURVE).read_text())["counts"] == straight["counts"] == [100, 100, 50]
    with pytest.raises(UserError, match="summarize it with --summarize 100"):
        plot_runs.summarize(clone, 50)  # its first blocks cannot be cut smaller


def test_a_folder_without_the_curve_is_named(tmp_path):
    with pytest.raises(UserError, match="is not a run folder"):
        plot_runs.read_curve(tmp_path / "missing")
    log_scalars(tmp_path, "something/else", [1.0])
    with pytest.raises(UserError, match="holds no 'meta-test/accuracy' scalars"):
        plot_runs.read_curve(tmp_path)


def test_a_window_below_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        plot_runs.main([str(tmp_path), "--window", "0"])
    assert stop.value.code == 2 and "argument --window: must be at least 1, got 0" in capsys.readouterr().err


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot_runs.main([str(tmp_path), "--output", str(tmp_path / "plot.png")])
    assert not (tmp_path / "plot.png").exists()


def test_a_plot_of_two_runs_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for name, classes in (("a", 5), ("b", 20)):
        log_scalars(tmp_path / name, plot_runs.TAG, list(np.linspace(0.2, 0.9, 30)))
        write_json(tmp_path / name / "args.json", {"classes": classes, "split": "paper"})
    output = tmp_path / "out" / "plot.png"
    assert plot_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(output), "--window", "5"]) == 0
    assert output.read_bytes().startswith(b"\x89PNG")
    assert f"wrote {output}" in capsys.readouterr().out


def test_the_tensorboard_means_are_those_the_trainer_logs(tmp_path):
    """The mean of the last 100 logged tasks, recomputed at every 100th meta-iteration into LOGDIR/mean100/; from
    the blocks of curve.json where the event files are gone."""
    values = list(np.random.default_rng(2).random(250).round(3))
    run = tmp_path / "run"
    log_scalars(run, "meta-test/accuracy", values)  # one task every 10 meta-iterations, to 2,500
    log_scalars(run, "meta-train/accuracy", values[::-1])
    written = plot_runs.write_means(run)
    assert written == run / plot_runs.MEANS / "events.out.tfevents.mean100"
    for name, logged in (("meta-test", values), ("meta-train", values[::-1])):
        steps, means = plot_runs.logged_points(run / plot_runs.MEANS, f"{name}/accuracy_mean100")
        assert steps.tolist() == list(range(100, 2501, 100))
        expected = [np.mean(logged[max(0, i - 99):i + 1]) for i in range(9, 250, 10)]
        np.testing.assert_allclose(means, expected, rtol=1e-6)
    plot_runs.write_means(run)  # again: replaced, not added
    assert [path.name for path in (run / plot_runs.MEANS).iterdir()] == ["events.out.tfevents.mean100"]

    committed = tmp_path / "committed"
    log_scalars(run / "every", plot_runs.TAG, values, every=1)
    plot_runs.summarize(run / "every", 100)
    committed.mkdir()
    (committed / plot_runs.CURVE).write_bytes((run / "every" / plot_runs.CURVE).read_bytes())
    plot_runs.write_means(committed)
    steps, means = plot_runs.logged_points(committed / plot_runs.MEANS, "meta-test/accuracy_mean100")
    assert steps.tolist() == [100, 200, 250]
    np.testing.assert_allclose(means, [np.mean(values[:100]), np.mean(values[100:200]), np.mean(values[200:])],
                               rtol=1e-6)


def test_training_hours_add_up_each_event_file_without_the_pauses_between_them(tmp_path):
    for start, end in ((1000.0, 4600.0), (90000.0, 91800.0)):  # an hour, a pause of a day, half an hour
        with SummaryWriter(str(tmp_path), filename_suffix=f".{start}") as writer:
            for step, walltime in enumerate(np.linspace(start, end, 5)):
                writer.add_scalar(plot_runs.TAG, 0.5, step, walltime=walltime)
    assert plot_runs.training_hours(tmp_path) == (pytest.approx(1.5), 2)
