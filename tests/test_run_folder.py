"""run_folder.py: a run folder's checkpoints, results.json and lock, for both training scripts."""
import json
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import options
import train_sine
from conftest import ROOT, read_results
from models import OmniglotModel
from run_folder import RunFolder
from utils import UserError

ENTRY = {"shots": 1, "mode": "non-transductive", "meta_iteration": 2, "tasks": 3, "seed": 0}


def test_checkpoints_are_ordered_by_meta_iteration_not_by_name(tmp_path):
    folder = RunFolder(tmp_path, "test", "test.py")
    assert folder.checkpoints() == [] and folder.newest_checkpoint() is None  # no checkpoint folder yet
    folder.checkpoint_folder.mkdir()
    for iteration in (900, 1000, 50):
        (folder.checkpoint_folder / f"check-{iteration}.pth").write_bytes(b"")
    (folder.checkpoint_folder / "check-5000.pth.tmp").write_bytes(b"")  # an unfinished write is not a checkpoint
    (folder.checkpoint_folder / "notes.txt").write_text("")
    assert [path.name for path in folder.checkpoints()] == ["check-50.pth", "check-900.pth", "check-1000.pth"]
    assert folder.newest_checkpoint().name == "check-1000.pth"


def test_pruning_keeps_the_newest_and_those_results_report_on(tmp_path):
    folder = RunFolder(tmp_path, "test", "test.py")
    for iteration in (1, 2):
        folder.write_checkpoint(iteration, {"model": {}}, keep=1, device="cpu")
    folder.add_result("an entry", {"checkpoint": str(folder.checkpoint_folder / "check-2.pth")})
    for iteration in (3, 4):
        folder.write_checkpoint(iteration, {"model": {}}, keep=1, device="cpu")
    assert [path.name for path in folder.checkpoints()] == ["check-2.pth", "check-4.pth"]
    state = folder.read_checkpoint(folder.newest_checkpoint())
    assert (state["program"], state["meta_iteration"], state["segments"]) == ("test", 4, [])
    assert {"commit", "torch", "device", "date"} <= set(state["provenance"])


def test_older_checkpoints_are_read_into_the_one_schema_and_others_refused(tmp_path):
    folder = RunFolder(tmp_path, "test", "test.py")
    folder.checkpoint_folder.mkdir()
    weights, generator = {"w": torch.ones(2)}, torch.Generator().manual_seed(1).get_state()
    torch.save({"program": "test", "meta_iteration": 7, "meta_net": weights}, folder.checkpoint_folder / "check-7.pth")
    torch.save({"program": "test", "meta_iteration": 8, "model": weights, "generator": generator},
               folder.checkpoint_folder / "check-8.pth")
    older, newer = (folder.read_checkpoint(path) for path in folder.checkpoints())
    assert torch.equal(older["model"]["w"], weights["w"]) and "meta_net" not in older
    assert torch.equal(newer["generators"]["train"], generator) and "generator" not in newer
    torch.save({"program": "other", "meta_iteration": 9}, folder.checkpoint_folder / "check-9.pth")
    with pytest.raises(UserError, match="not a checkpoint of test.py"):
        folder.read_checkpoint(folder.checkpoint_folder / "check-9.pth")
    (folder.checkpoint_folder / "check-10.pth").write_bytes(b"damaged")
    assert folder.newest_good_checkpoint()["meta_iteration"] == 8  # the damaged and the foreign ones skipped


def test_results_json_takes_one_writer_at_a_time(tmp_path):
    """A trainer and an --eval-only of the same run may record results at once; neither entry is lost."""
    record = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import pathlib, run_folder; print('ready', flush=True); "
              f"run_folder.RunFolder(pathlib.Path({str(tmp_path)!r}), 'p', 's').add_result('other', {ENTRY!r})")
    folder = RunFolder(tmp_path, "p", "s")
    with folder.results_lock():  # this process is in the middle of its own read, change and write
        results = folder.results()
        other = subprocess.Popen([sys.executable, "-c", record], stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline() == "ready\n"
        time.sleep(1)
        assert other.poll() is None  # it waits for the lock
        results["from this process"] = {**ENTRY, "seed": 1}
        (tmp_path / "results.json").write_text(json.dumps(results))
    assert other.wait(timeout=60) == 0
    assert read_results(tmp_path) == {"from this process": {**ENTRY, "seed": 1}, "other": ENTRY}


def test_an_entry_is_found_by_what_it_measured_and_never_replaced(tmp_path):
    """Same shots, mode, meta-iteration, tasks and seed: the same measurement, kept beside the first; anything else is
    another. Entries of the older form (keyed by shots and mode, the seed in their settings) are found the same way."""
    folder = RunFolder(tmp_path, "p", "s")
    old = {"shots": 1, "mode": "non-transductive", "meta_iteration": 100, "tasks": 10000, "settings": {"seed": 0},
           "meta-test": {"accuracy": 95.0}}
    (tmp_path / "results.json").write_text(json.dumps({"1-shot non-transductive": old}))
    new = {key: value for key, value in old.items() if key != "settings"}
    for changed in ({"shots": 5}, {"mode": "transductive"}, {"meta_iteration": 99}, {"tasks": 2000}, {"seed": 1}):
        entry = {**new, "seed": 0, **changed}
        folder.add_result(evaluate.result_key(entry), entry)
        assert evaluate.find_result(folder.results(), 1, "non-transductive", 100, 10000, 0) == old
    again = {**new, "seed": 0, "meta-test": {"accuracy": 95.5}}
    assert folder.add_result(evaluate.result_key(again), again) == "1-shot non-transductive at 100, 10000 tasks, seed 0"
    assert folder.add_result(evaluate.result_key(again), again) == \
        "1-shot non-transductive at 100, 10000 tasks, seed 0 #2"
    results = folder.results()
    assert len(results) == 8 and results["1-shot non-transductive"] == old
    assert evaluate.find_result(results, 1, "non-transductive", 100, 10000, 0) == old


def committed_checkpoints() -> list:
    """Every checkpoint file committed under runs/ (git's list: a run still training here may hold more)."""
    listed = subprocess.run(["git", "ls-files", "runs"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / path for path in listed if "/checkpoint/check-" in path]


def test_every_committed_checkpoint_and_args_json_still_reads():
    checkpoints = committed_checkpoints()
    if not checkpoints:
        pytest.skip("not a git checkout: the committed checkpoints cannot be listed")
    assert len({path.parent.parent for path in checkpoints}) == 28
    for path in checkpoints:
        run = path.parent.parent
        if run.name.startswith("sine-"):
            state = options.sine_folder(run).read_checkpoint(path)
            model = train_sine.new_model(json.loads((run / "args.json").read_text()))
        else:
            args = options.parse_args([str(run), "--eval-only"])  # its args.json as an evaluation takes it
            saved = json.loads((run / "args.json").read_text())
            assert args.inner_steps == saved.get("inner_steps", saved.get("iterations")), run  # the old name read
            state = options.folder(run).read_checkpoint(path)
            model = OmniglotModel(args.classes, maml=args.model == "maml")
            assert state["inner_optimizer"]["state"] or args.inner_optimizer == "sgd", path
        model.load_state_dict(state["model"])  # every weight there, of the right shape
        assert state["meta_iteration"] == int(path.stem.split("-")[1]) and isinstance(state["segments"], list), path
