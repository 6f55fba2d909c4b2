import argparse
import subprocess
from pathlib import Path

import pytest

import utils
from utils import UserError, non_negative_float, non_negative_int, positive_float, positive_int, read_json, write_json


def test_write_json_round_trip_leaves_no_temporary(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_read_json_names_a_damaged_file(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(UserError, match="a.json"):
        read_json(tmp_path / "a.json")


def test_number_flags_refuse_what_is_out_of_range():
    assert positive_int("1") == 1 and non_negative_int("0") == 0 and non_negative_float("0") == 0.0
    for parse, text in ((positive_int, "0"), (non_negative_int, "-1"), (positive_float, "0"),
                        (positive_float, "nan"), (positive_float, "inf"), (non_negative_float, "Infinity")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {text}"):
            parse(text)


def test_results_written_under_runs_do_not_count_as_uncommitted_code(tmp_path):
    def run_git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    run_git("init", "-q")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "results.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    run_git("add", "-A")
    run_git("commit", "-qm", "first")
    assert utils.code_commit(tmp_path)["uncommitted_changes"] is False
    (tmp_path / "runs" / "a" / "results.json").write_text('{"new": 1}')
    (tmp_path / "runs" / "b").mkdir()
    assert utils.code_commit(tmp_path)["uncommitted_changes"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert utils.code_commit(tmp_path)["uncommitted_changes"] is True
    assert utils.code_commit(Path("/")) == {}  # not a checkout
