import json
import subprocess
import sys
import time

import run_folder
import utils
from utils import read_results
from conftest import ROOT

ENTRY = {"shots": 1, "mode": "non-transductive", "meta_iteration": 2, "tasks": 3, "seed": 0}


def test_results_json_takes_one_writer_at_a_time(tmp_path):
    """A trainer and an --eval-only of the same run may record results at once; neither entry is lost."""
    record = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import pathlib, run_folder; print('ready', flush=True); "
              f"run_folder.record_result(pathlib.Path({str(tmp_path)!r}), {ENTRY!r})")
    with utils.results_lock(tmp_path):  # this process is in the middle of its own read, change and write
        results = read_results(tmp_path)
        other = subprocess.Popen([sys.executable, "-c", record], stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline() == "ready\n"
        time.sleep(1)
        assert other.poll() is None  # it waits for the lock
        results["from this process"] = {**ENTRY, "seed": 1}
        (tmp_path / "results.json").write_text(json.dumps(results))
    assert other.wait(timeout=60) == 0
    assert read_results(tmp_path) == {"from this process": {**ENTRY, "seed": 1},
                                      run_folder.result_name(ENTRY): ENTRY}


def test_an_entry_is_found_by_what_it_measured_and_never_replaced(tmp_path):
    """Same shots, mode, meta-iteration, tasks and seed: the same measurement, kept beside the first; anything else is
    another. Entries of the older form (keyed by shots and mode, the seed in their settings) are found the same way."""
    old = {"shots": 1, "mode": "non-transductive", "meta_iteration": 100, "tasks": 10000, "settings": {"seed": 0},
           "meta-test": {"accuracy": 95.0}}
    (tmp_path / "results.json").write_text(json.dumps({"1-shot non-transductive": old}))
    new = {key: value for key, value in old.items() if key != "settings"}
    for changed in ({"shots": 5}, {"mode": "transductive"}, {"meta_iteration": 99}, {"tasks": 2000}, {"seed": 1}):
        run_folder.record_result(tmp_path, {**new, "seed": 0, **changed})
        assert run_folder.find_result(read_results(tmp_path), 1, "non-transductive", 100, 10000, 0) == old
    again = {**new, "seed": 0, "meta-test": {"accuracy": 95.5}}
    assert run_folder.record_result(tmp_path, again) == "1-shot non-transductive at 100, 10000 tasks, seed 0"
    assert run_folder.record_result(tmp_path, again) == "1-shot non-transductive at 100, 10000 tasks, seed 0 #2"
    results = read_results(tmp_path)
    assert len(results) == 8 and results["1-shot non-transductive"] == old
    assert run_folder.find_result(results, 1, "non-transductive", 100, 10000, 0) == old
