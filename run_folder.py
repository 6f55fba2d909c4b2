"""A run folder: its characters (split.json), checkpoints (checkpoint/check-<meta-iteration>.pth) and results.json,
written atomically, and the lock that lets one training process at a time write it."""
import contextlib
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

import omniglot
from utils import (UserError, find_latest_file, gather, list_checkpoints, locked, rank, read_json, reason,
                   save_atomically, write_json)

PROGRAM = "reptile-omniglot"  # marks checkpoints written by train_omniglot.py
LOCK = ".lock"  # held by the process that trains the run; it holds that process's id while it does
RESULTS_LOCK = ".results.lock"  # held while results.json is read, changed and written back


@contextlib.contextmanager
def training_lock(logdir: Path):
    """Hold the run folder for one training process; another one is refused at once with a UserError.

    The operating system releases the lock when the process ends, however it ends (kill -9 included).
    """
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot use {logdir} as the run folder ({reason(error)}); give a folder you can write "
                        f"to") from None
    with contextlib.ExitStack() as stack:
        try:
            descriptor = stack.enter_context(locked(logdir / LOCK, wait=False))
        except BlockingIOError:
            holder = (logdir / LOCK).read_text(errors="replace").strip()
            raise UserError(f"{logdir} is being trained by another process{f' (pid {holder})' if holder else ''}; "
                            f"wait for it to end or stop it, or choose another logdir") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(descriptor, 0)  # the process id goes; the file stays, so that no two locks exist at once


def results_lock(logdir: Path):
    """Wait for, then hold, the run's results.json for one read-change-write (trainer and --eval-only alike)."""
    return locked(logdir / RESULTS_LOCK)


def save_checkpoint(logdir: Path, iteration: int, meta_model: torch.nn.Module, meta_optimizer: torch.optim.Optimizer,
                    inner_optimizer: torch.optim.Optimizer, generators: dict, recent: dict, settings: dict,
                    keep: int) -> Path:
    """Write checkpoint/check-<iteration>.pth atomically; keep the newest `keep` and those results.json reports on.

    Under torchrun only the first process writes.
    """
    folder = logdir / "checkpoint"
    path = folder / f"check-{iteration}.pth"
    own = {"inner_optimizer": inner_optimizer.state_dict(),
           "generators": {name: generator.get_state() for name, generator in generators.items()}}
    first, *others = gather(own)
    if rank() != 0:
        return path
    state = {
        "program": PROGRAM,
        "meta_iteration": iteration,
        "meta_net": meta_model.state_dict(),
        "meta_optimizer": meta_optimizer.state_dict(),
        **first,
        "other_processes": others,  # under torchrun: the inner state of the processes after the first
        "recent_accuracies": recent,  # the validation accuracies that the next logged means average over
        "args": settings,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_atomically(path, state)
    evaluated = evaluated_checkpoints(logdir)
    for old in list_checkpoints(folder)[:-keep]:
        if Path(old).name not in evaluated:
            Path(old).unlink()
    return path


def evaluated_checkpoints(logdir: Path) -> set[str]:
    """File names of the checkpoints that the run's results.json reports on."""
    return {Path(entry["checkpoint"]).name for entry in read_results(logdir).values() if "checkpoint" in entry}


def read_results(logdir: Path) -> dict:
    """The run's results.json, or {} if it has none yet."""
    results_path = logdir / "results.json"
    return read_json(results_path) if results_path.is_file() else {}


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or a UserError that says what is wrong with the file."""
    if Path(path).is_dir():
        raise UserError(f"checkpoint {path} is a folder; give a checkpoint file, such as LOGDIR/checkpoint/"
                        f"check-1000.pth")
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # a damaged file may first trigger warnings about its contents
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many kinds of error on damaged files
        raise UserError(f"checkpoint {path} is unreadable ({reason(error)[:120]})") from None
    if not isinstance(state, dict) or state.get("program") != PROGRAM:
        raise UserError(f"{path} is not a checkpoint of train_omniglot.py")
    return state


def latest_good_checkpoint(logdir: Path) -> Optional[dict]:
    """The newest readable checkpoint of the run, skipping (and reporting) damaged ones; None if there is none."""
    for path in reversed(list_checkpoints(logdir / "checkpoint")):
        try:
            return load_checkpoint(path)
        except UserError as error:
            print(f"warning: {error}; trying the previous checkpoint", file=sys.stderr)
    return None


def record_result(logdir: Path, key: str, result: dict) -> None:
    """Set one entry of the run's results.json, keeping the entries that other processes write meanwhile."""
    with results_lock(logdir):
        results = read_results(logdir)
        results[key] = result
        write_json(logdir / "results.json", results)


def unfinished_evaluation(logdir: Path, key: str, name: str, iteration: int, seed: int, tasks: int) -> Path:
    """Where an evaluation keeps the tasks it has finished until it ends, so that a stopped one resumes there."""
    return logdir / f"unfinished-evaluation-{key.replace(' ', '-')}-{name}-at-{iteration}-seed{seed}-{tasks}.json"


def evaluation_identity(meta_state: dict, adam_state: dict, settings: dict, seeds: list[int]) -> str:
    """A digest of what an evaluation measures: the weights, the inner optimizer's state, the settings, the tasks."""
    digest = hashlib.sha256(json.dumps([settings, seeds], sort_keys=True).encode())
    for value in [*meta_state.values(), *(value for state in adam_state["state"].values()
                                          for value in state.values())]:
        digest.update(torch.as_tensor(value).detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finished_tasks(path: Path, identity: str) -> tuple[dict[int, list], float]:
    """The tasks (position: [correct queries, loss]) that a stopped evaluation of this identity kept in `path`, and
    the seconds spent on them."""
    if not path.is_file():
        return {}, 0.0
    kept = read_json(path)
    if kept["identity"] != identity:
        return {}, 0.0
    return {int(position): result for position, result in kept["tasks"].items()}, kept.get("seconds", 0.0)


def keep_finished_tasks(path: Path, identity: str, tasks: dict[int, list], seconds: float) -> None:
    """Write the tasks an evaluation has finished so far and the seconds spent on them, atomically."""
    write_json(path, {"identity": identity, "seconds": round(seconds, 1),
                      "tasks": {str(position): result for position, result in tasks.items()}})


def kept_seconds(path: Path) -> float:
    """The seconds spent on the tasks kept in `path`, over every part of a stopped and resumed evaluation."""
    return read_json(path).get("seconds", 0.0)


def split_classes(logdir: Path, split: str) -> tuple[int, int]:
    """(meta-train classes, meta-test classes) of the run's split (split.json, else a new `split`), before any data."""
    split_path = logdir / "split.json"
    if split_path.is_file():
        saved = read_json(split_path)
        return len(saved["train"]) * len(saved["train_rotations"]), len(saved["test"])
    train, test = omniglot.split_sizes(split)
    return train * len(omniglot.ROTATIONS), test


def load_split(logdir: Path, data_dir: Path, split: str, seed: int,
               device: str) -> tuple[omniglot.TaskSampler, omniglot.TaskSampler, dict]:
    """Meta-train and meta-test task samplers on the run's characters (split.json, else a new split), and the split."""
    characters, images = omniglot.load_images(data_dir)
    split_path = logdir / "split.json"
    chosen = read_json(split_path) if split_path.is_file() else omniglot.make_split(data_dir, characters, split, seed)
    index = {character: i for i, character in enumerate(characters)}
    missing = [c for c in chosen["train"] + chosen["test"] if c not in index]
    if missing:
        raise UserError(f"{split_path} names {len(missing)} characters missing from {data_dir} "
                        f"(such as {missing[0]}); point --data at the Omniglot folder this run used")
    images = images.to(device)
    train = omniglot.TaskSampler(images[[index[c] for c in chosen["train"]]], chosen["train_rotations"])
    test = omniglot.TaskSampler(images[[index[c] for c in chosen["test"]]])
    return train, test, chosen


def kept(logdir: Path) -> str:
    """What a run that stops on a failure keeps: its newest checkpoint, named."""
    newest = find_latest_file(logdir / "checkpoint")
    return f"the newest good checkpoint, {newest}, is kept" if newest else "no checkpoint had been written yet"
