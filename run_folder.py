"""An Omniglot run folder: its characters (split.json), checkpoints (checkpoint/check-<meta-iteration>.pth) and
results.json, written atomically (utils.py holds what train_sine.py shares: the training lock, results entries)."""
from pathlib import Path
from typing import Optional

import torch

import omniglot
from utils import (UserError, add_result, find_latest_file, gather, newest_good_checkpoint, rank, read_checkpoint,
                   read_json, read_results, provenance, write_checkpoint)

PROGRAM = "reptile-omniglot"  # marks checkpoints written by train_omniglot.py


def save_checkpoint(logdir: Path, iteration: int, meta_model: torch.nn.Module, meta_optimizer: torch.optim.Optimizer,
                    inner_optimizer: torch.optim.Optimizer, generators: dict, recent: dict, settings: dict,
                    keep: int, segments: list[dict], device: str) -> Path:
    """Write checkpoint/check-<iteration>.pth atomically; keep the newest `keep` and those results.json reports on.

    `segments` are the parts of the run's training, each from one start (or resume) to its last checkpoint, with what
    trained it. Under torchrun only the first process writes.
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
        "segments": segments,
        "provenance": provenance(device),  # of this file: the code, PyTorch, device and date that wrote it
    }
    return write_checkpoint(folder, iteration, state, keep, evaluated_checkpoints(logdir))


def evaluated_checkpoints(logdir: Path) -> set[str]:
    """File names of the checkpoints that the run's results.json reports on."""
    return {Path(entry["checkpoint"]).name for entry in read_results(logdir).values() if "checkpoint" in entry}


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by train_omniglot.py, or a UserError that says what is wrong with the file."""
    return read_checkpoint(path, PROGRAM, "train_omniglot.py")


def latest_good_checkpoint(logdir: Path) -> Optional[dict]:
    """The newest readable checkpoint of the run, skipping (and reporting) damaged ones; None if there is none."""
    return newest_good_checkpoint(logdir / "checkpoint", PROGRAM, "train_omniglot.py")


def measured(entry: dict) -> tuple:
    """What a results.json entry measured: (shots, mode, meta-iteration, tasks or repeats, evaluation seed).

    Entries written before the seed was recorded on its own carry it in their settings.
    """
    seed = entry.get("seed", entry.get("settings", {}).get("seed"))
    return (entry.get("shots"), entry.get("mode"), entry["meta_iteration"], entry.get("tasks", entry.get("repeats")),
            seed)


def result_name(entry: dict) -> str:
    """The key of a new results.json entry, from what it measured, e.g. "1-shot non-transductive at 100000, 10000
    tasks, seed 0" or "lake one-shot at 200000, seed 0"."""
    shots, mode, iteration, tasks, seed = measured(entry)
    if shots is None:
        return f"lake one-shot at {iteration}, seed {seed}"
    return f"{shots}-shot {mode} at {iteration}, {tasks} tasks, seed {seed}"


def find_result(results: dict, shots: Optional[int], mode: Optional[str], iteration: int, tasks: int,
                seed: int) -> Optional[dict]:
    """The first entry of `results` (a results.json) that measured this, or None; Lake's have no shots or mode."""
    return next((entry for entry in results.values() if measured(entry) == (shots, mode, iteration, tasks, seed)),
                None)


def record_result(logdir: Path, result: dict) -> str:
    """Add an entry to the run's results.json under a key that says what it measured (utils.add_result); return the
    key."""
    return add_result(logdir, result_name(result), result)


def unfinished_evaluation(logdir: Path, key: str, name: str, iteration: int, seed: int, tasks: int) -> Path:
    """Where an evaluation keeps the tasks it has finished until it ends, so that a stopped one resumes there."""
    return logdir / f"unfinished-evaluation-{key.replace(' ', '-')}-{name}-at-{iteration}-seed{seed}-{tasks}.json"


def read_split(path: str) -> dict:
    """The split.json of a run folder, or a split.json file itself (for --split-from)."""
    file = Path(path) / "split.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise UserError(f"--split-from {path}: no split.json there; give a run folder or its split.json")
    split = read_json(file)
    if not isinstance(split, dict) or not all(key in split for key in ("split", "train", "test", "train_rotations")):
        raise UserError(f"--split-from {path}: {file} is not a split.json written by train_omniglot.py")
    return split


def same_characters(first: dict, second: dict) -> bool:
    """Whether two splits meta-train and meta-test on the same characters (and rotations)."""
    return all(first[key] == second[key] for key in ("train", "test", "train_rotations"))


def given_split(logdir: Path, split_from: Optional[str] = None) -> Optional[dict]:
    """The run's split.json, else the split of --split-from, else None (a new split is to be drawn)."""
    if (logdir / "split.json").is_file():
        return read_json(logdir / "split.json")
    return read_split(split_from) if split_from is not None else None


def split_classes(logdir: Path, split: str, split_from: Optional[str] = None) -> tuple[int, int]:
    """(meta-train classes, meta-test classes) of the run's split, before any data."""
    given = given_split(logdir, split_from)
    if given is None:
        train, test = omniglot.split_sizes(split)
        return train * len(omniglot.ROTATIONS), test
    return len(given["train"]) * len(given["train_rotations"]), len(given["test"])


def load_split(logdir: Path, data_dir: Path, split: str, seed: int, device: str,
               split_from: Optional[str] = None) -> tuple[omniglot.TaskSampler, omniglot.TaskSampler, dict]:
    """Meta-train and meta-test task samplers on the run's characters (split.json, else those of --split-from, else
    a new split), and the split."""
    characters, images = omniglot.load_images(data_dir)
    chosen = given_split(logdir, split_from) or omniglot.make_split(data_dir, characters, split, seed)
    index = {character: i for i, character in enumerate(characters)}
    missing = [c for c in chosen["train"] + chosen["test"] if c not in index]
    if missing:
        raise UserError(f"the run's split names {len(missing)} characters missing from {data_dir} "
                        f"(such as {missing[0]}); point --data at the Omniglot folder this run used")
    images = images.to(device)
    train = omniglot.TaskSampler(images[[index[c] for c in chosen["train"]]], chosen["train_rotations"])
    test = omniglot.TaskSampler(images[[index[c] for c in chosen["test"]]])
    return train, test, chosen


def kept(logdir: Path) -> str:
    """What a run that stops on a failure keeps: its newest checkpoint, named."""
    newest = find_latest_file(logdir / "checkpoint")
    return f"the newest good checkpoint, {newest}, is kept" if newest else "no checkpoint had been written yet"
