"""The front page against the committed record: every figure of README's tables is what runs/*/results.json (or
the runs' event files) say, at the rounding shown, and its code example runs."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import evaluate
import lake
import omniglot
import plot_runs
import reptile
from models import OmniglotModel
from conftest import ROOT, load_checkpoint, read_results
import utils
from utils import read_json

README = (ROOT / "README.md").read_text()
GUIDE = (ROOT / "GUIDE.md").read_text()
MODES = {"ours": "non-transductive", "ours, transductive": "transductive"}


def figure(entry: dict) -> str:
    """An accuracy and its interval as the tables show them."""
    return f"{entry['accuracy']:.2f} +- {entry['ci95']:.2f}"


def the_cell(run: str, shots, mode, tasks: int) -> dict:
    """The run's entry at its final checkpoint with its own seed: what a table cell reports."""
    settings = read_json(ROOT / run / "args.json")
    entry = evaluate.find_result(read_results(ROOT / run), shots, mode, settings["meta_iterations"],
                                   tasks, settings["seed"])
    assert entry is not None, f"{run} has no {shots}-shot {mode} entry at its end with {tasks} tasks"
    return entry


def table_rows(first_column: str) -> list[dict]:
    """The rows of the README table whose header starts with `first_column`, as {header: cell}."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


ALGORITHMS = {"": ("reptile", False), "MAML ": ("maml", False), "first-order MAML ": ("maml", True)}


def test_every_figure_of_the_results_table_is_the_committed_one_and_names_its_split():
    rows = table_rows("setting")
    assert [row["setting"] for row in rows] == [f"{name}{setting}" for name in ALGORITHMS for setting in (
        ["5-way 1-shot", "5-way 5-shot"] + (["20-way 1-shot", "20-way 5-shot"] if not name else []))]
    for row in rows:
        name, classes, shots = re.fullmatch(r"(\D*)(\d+)-way (\d)-shot", row["setting"]).groups()
        run, split = re.fullmatch(r"`(runs/[^`]+)` \((\S+)\)", row["run (split)"]).groups()
        for column, mode in MODES.items():
            if row[column] == "in training":  # a run still training shows no figure, and has none at its end
                assert not (ROOT / run / "results.json").exists(), (row["setting"], column)
                continue
            assert row[column] == figure(the_cell(run, int(shots), mode, 10000)["meta-test"]), (row["setting"], column)
        if (ROOT / run).exists():
            settings = read_json(ROOT / run / "args.json")
            assert read_json(ROOT / run / "split.json")["split"] == split
            assert (settings["classes"], settings.get("algorithm", "reptile"), settings.get("first_order", False)) \
                == (int(classes), *ALGORITHMS[name])  # runs older than MAML's flags record neither
        if name:  # the paper's Table 1 quotes MAML with transduction only
            assert row["paper"] == "-" and split == "paper" and run == f"runs/{'fo' * ALGORITHMS[name][1]}maml-" \
                f"{classes}way{shots}shot"


def test_the_lake_row_is_the_committed_one_with_its_interval_over_the_runs():
    found = re.search(r"\| Reptile, ours \(`(runs/[^`]+)`, ([\d,]+) meta-iterations\) \| (.+) \|", README)
    run, iteration, shown = found.groups()
    entry = the_cell(run, None, None, lake.REPEATS)
    assert entry["meta_iteration"] == int(iteration.replace(",", ""))
    figures = {}
    for mode in ("non-transductive", "transductive"):
        errors = np.array(list(entry[mode]["runs"].values()))
        assert len(errors) == 20 and np.mean(errors) == entry[mode]["error"]
        figures[mode] = figure({"accuracy": entry[mode]["error"], "ci95": utils.confidence_interval(errors)})
    assert shown == f"{figures['non-transductive']} (transductive: {figures['transductive']})"


def test_the_re_check_shown_is_the_committed_one():
    command, result = re.search(r"```\n(python train_omniglot.py runs/5way-exact-split --eval-only [^\n]+)\n```\n\n"
                                r"[^`]*?it gave ([\d.]+ \+- [\d.]+)", README).groups()
    assert command.endswith("--shots 1 --seed 1 --eval-tasks 2000 --meta-test-only")
    entry = evaluate.find_result(read_results(ROOT / "runs/5way-exact-split"), 1, "non-transductive",
                                   100000, 2000, 1)
    assert entry is not None and figure(entry["meta-test"]) == result


TABLE_RUNS = {"5-way": "runs/5way-exact-split", "20-way": "runs/20way", "Lake": "runs/20way-background"}


def test_the_training_times_are_those_of_the_committed_event_files():
    for row in table_rows("row"):
        hours = float(re.fullmatch(r"([\d.]+) hours \(one core\)", row["time on CPU"]).group(1))
        assert f"{plot_runs.training_hours(ROOT / TABLE_RUNS[row['row']])[0]:.1f}" == f"{hours:.1f}", row["row"]


def test_the_gpu_times_are_the_committed_gpu_checks_whole_run_rates_multiplied_out():
    output = (ROOT / "runs/measurements/check_gpu-h200-2026-11-30.txt").read_text()
    rates = {f"{classes}-way": float(rate) for classes, rate
             in re.findall(r"PASS timed run (\d+)way1shot: .*\[[\d:]+<[\d:]+, ([\d.]+)it/s", output)}
    assert sorted(rates) == ["20-way", "5-way"]
    for row in table_rows("row"):
        minutes = int(re.fullmatch(r"about (\d+) minutes \(H200\)", row["time on GPU"]).group(1))
        args = read_json(ROOT / TABLE_RUNS[row["row"]] / "args.json")
        assert round(args["meta_iterations"] / rates[f"{args['classes']}-way"] / 60) == minutes, row["row"]


def python_block(text: str, heading: str) -> str:
    """The first ```python block after `heading` in a markdown text."""
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_the_own_problem_example_meta_learns_and_prints_what_readme_says(tmp_path):
    heading = "## Reptile on your own problem"
    done = subprocess.run([sys.executable, "-c", python_block(README, heading)], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = re.search(r"```python\n.*?```.*?```\n(.*?)```", README[README.index(heading):], re.S).group(1)
    percent = r"(\w[\w-]*) weights: ([\d.]+)% of the queries right"
    said, got = (dict(re.findall(percent, text)) for text in (printed, done.stdout))
    assert set(said) == set(got) == {"initial", "meta-learned"}
    for name in said:  # a query or two may go the other way on another CPU's floating point
        assert abs(float(got[name]) - float(said[name])) <= 0.2, (name, got[name], said[name])
    assert float(got["meta-learned"]) > float(got["initial"]) + 20


def test_the_guides_example_scores_a_task_as_the_evaluator_does(data_dir, tmp_path):
    example = python_block(GUIDE, "### In your own code")
    (tmp_path / "omniglot").symlink_to(data_dir)  # the example's data folder, prepared
    (tmp_path / "runs").symlink_to(ROOT / "runs")
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    state = load_checkpoint(str(ROOT / "runs/5way-exact-split/checkpoint/check-100000.pth"))
    test_characters = omniglot.load_split(ROOT / "runs/5way-exact-split", Path(data_dir), "paper", 0, "cpu")[1]
    meta_model = OmniglotModel(5)
    meta_model.load_state_dict(state["model"])
    (correct, _), = evaluate.evaluate_tasks(meta_model, state["inner_optimizer"], test_characters,
                                            reptile.Hyperparameters(shots=1), [0])
    assert done.stdout == f"{correct} of 5 queries right\n"


def test_tensorboard_finds_the_mean_accuracy_of_every_committed_run():
    """README: `runs/<run>/mean100` holds the mean of the last 100 logged tasks of each committed Omniglot run (the
    runs with a split.json), to its end."""
    runs = sorted(path.parent for path in ROOT.glob("runs/**/split.json") if (path.parent / "results.json").exists())
    assert len(runs) == 18  # the finished ones: runs still training are committed with their newest checkpoint
    for run in runs:
        steps, means = plot_runs.logged_points(run / plot_runs.MEANS, "meta-test/accuracy_mean100")
        assert steps[-1] == read_json(run / "args.json")["meta_iterations"] and 0 < means.min() <= means.max() <= 1


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_results_opens_with_a_contents_list_and_every_link_into_it_finds_its_heading():
    results = (ROOT / "RESULTS.md").read_text()
    sections = re.findall(r"^## (.+)$", results, re.M)
    listed = re.findall(r"^- \[(.+)\]\(#([^)]+)\)$", results[:results.index("\n## ")], re.M)
    assert listed == [(heading, anchor(heading)) for heading in sections]
    anchors = {anchor(heading) for heading in re.findall(r"^#+ (.+)$", results, re.M)}
    for text in (README, GUIDE, results):
        for link in re.findall(r"RESULTS\.md#([\w-]+)", text):
            assert link in anchors, link


def test_every_output_of_bench_and_check_gpu_quoted_in_the_record_is_a_committed_file():
    measurements = [path.read_text() for path in sorted((ROOT / "runs/measurements").iterdir())]
    quoted = [block for text in (README, (ROOT / "RESULTS.md").read_text())
              for block in re.findall(r"```\n(.*?)```", text, re.S)
              if re.match(r"(\$ .*python (bench|check_gpu)\.py|check_gpu\.py on )", block)]
    assert len(quoted) == 4
    for block in quoted:
        assert any(block.strip() in measured for measured in measurements), block.splitlines()[0]
