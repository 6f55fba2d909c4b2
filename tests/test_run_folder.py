import json
import subprocess
import sys
import time

import run_folder
from conftest import ROOT


def test_results_json_takes_one_writer_at_a_time(tmp_path):
    """A trainer and an --eval-only of the same run may record results at once; neither entry is lost."""
    record = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import pathlib, run_folder; print('ready', flush=True); "
              f"run_folder.record_result(pathlib.Path({str(tmp_path)!r}), 'from the other process', {{'x': 2}})")
    with run_folder.results_lock(tmp_path):  # this process is in the middle of its own read, change and write
        results = run_folder.read_results(tmp_path)
        other = subprocess.Popen([sys.executable, "-c", record], stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline() == "ready\n"
        time.sleep(1)
        assert other.poll() is None  # it waits for the lock
        results["from this process"] = {"x": 1}
        (tmp_path / "results.json").write_text(json.dumps(results))
    assert other.wait(timeout=60) == 0
    assert set(run_folder.read_results(tmp_path)) == {"from this process", "from the other process"}
