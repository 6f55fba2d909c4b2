"""A run folder, for both training scripts: its settings (args.json), checkpoints
(checkpoint/check-<meta-iteration>.pth) and results (results.json), written atomically; the lock that lets one
process train it; and `Training`, the stretch of a run from its newest checkpoint: progress bar, TensorBoard writer,
stop signals, segments and one-line errors.
"""
import contextlib
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils import (UserError, WriteError, locked, provenance, read_json, reason, save_atomically, stop_signals,
                   write_json)

LOCK = ".lock"  # held by the process that trains a run; it holds that process's id while it does
RESULTS_LOCK = ".results.lock"  # held while results.json is read, changed and written back


def checkpoint_iteration(path: str) -> Optional[int]:
    """The meta-iteration in a checkpoint's file name (`check-<iteration>.pth`), or None."""
    match = re.fullmatch(r"check-(\d+)\.pth", Path(path).name)
    return int(match.group(1)) if match else None


def load_checkpoint_file(path: str, program: str, script: str) -> dict:
    """The checkpoint file at `path` as `script` wrote it (its "program" entry is `program`), or a UserError that
    says what is wrong with it."""
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
    if not isinstance(state, dict) or state.get("program") != program:
        raise UserError(f"{path} is not a checkpoint of {script}")
    return state


class RunFolder:
    """The folder of one run of `script`, whose checkpoints are marked with `program`."""

    def __init__(self, path: Path, program: str, script: str):
        self.path, self.program, self.script = Path(path), program, script
        self.checkpoint_folder = self.path / "checkpoint"

    # ------------------------------------------------------------------------- one training process at a time

    @contextlib.contextmanager
    def training_lock(self):
        """Hold the folder for one training process, another one refused at once with a UserError; the operating
        system releases it when the process ends, however it ends (kill -9 included)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot use {self.path} as the run folder ({reason(error)}); give a folder you can "
                            f"write to") from None
        with contextlib.ExitStack() as stack:
            try:
                descriptor = stack.enter_context(locked(self.path / LOCK, wait=False))
            except BlockingIOError:
                holder = (self.path / LOCK).read_text(errors="replace").strip()
                raise UserError(f"{self.path} is being trained by another process"
                                f"{f' (pid {holder})' if holder else ''}; wait for it to end or stop it, or choose "
                                f"another logdir") from None
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, str(os.getpid()).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(descriptor, 0)  # the process id goes; the file stays, so that no two locks exist at once

    # ------------------------------------------------------------------------- args.json

    def saved_args(self) -> Optional[dict]:
        """The run's args.json, or None for a new run."""
        path = self.path / "args.json"
        return read_json(path) if path.is_file() else None

    def write_args(self, args: dict) -> None:
        write_json(self.path / "args.json", args)

    # ------------------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint files, oldest first by the meta-iteration in their names."""
        if not self.checkpoint_folder.is_dir():
            return []
        return sorted((path for path in self.checkpoint_folder.iterdir() if checkpoint_iteration(path) is not None),
                      key=checkpoint_iteration)

    def newest_checkpoint(self) -> Optional[Path]:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def refuse_fewer_iterations(self, total: int) -> None:
        """A run may train longer, never shorter: --meta-iterations below what it has done is refused in one line."""
        newest = self.newest_checkpoint()
        done = checkpoint_iteration(newest) if newest is not None else 0
        if done > total:
            raise UserError(f"--meta-iterations {total} is below the {done} this run has done; "
                            f"use --eval-only --checkpoint to evaluate an earlier checkpoint")

    def say_resumed(self, start: int, total: int) -> None:
        print(f"resumed {self.path} at meta-iteration {start} of {total}, with the settings of its args.json and the "
              f"flags given")

    def read_checkpoint(self, path: str) -> dict:
        """A checkpoint of this script in one schema (model, generators, args, segments, provenance and the script's
        own parts; older ones, with meta_net and one generator, are read into it), or a UserError that says why not."""
        state = load_checkpoint_file(path, self.program, self.script)
        if "meta_net" in state:
            state["model"] = state.pop("meta_net")
        if "generator" in state:
            state["generators"] = {"train": state.pop("generator")}
        state.setdefault("segments", [])  # not recorded before 2026-12-06
        state["path"] = str(path)
        return state

    def checkpoint_to_evaluate(self, path: Optional[str]) -> dict:
        """The checkpoint at `path`, or the newest one; a UserError if there is none."""
        path = path or self.newest_checkpoint()
        if path is None:
            raise UserError(f"{self.path} holds no checkpoint; train first, or give --checkpoint FILE")
        return self.read_checkpoint(path)

    def newest_good_checkpoint(self) -> Optional[dict]:
        """The newest readable checkpoint, skipping (and reporting) damaged ones; None if there is none."""
        for path in reversed(self.checkpoints()):
            try:
                return self.read_checkpoint(path)
            except UserError as error:
                print(f"warning: {error}; trying the previous checkpoint", file=sys.stderr)
        return None

    def write_checkpoint(self, iteration: int, state: dict, keep: int, device: str) -> Path:
        """Write checkpoint/check-<iteration>.pth atomically, marked with the program, the meta-iteration and what
        wrote it; delete the older ones but the newest `keep` and those that results.json reports on."""
        self.checkpoint_folder.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_folder / f"check-{iteration}.pth"
        save_atomically(path, {"program": self.program, "meta_iteration": iteration, **state,
                               "provenance": provenance(device)})  # of this file: code, PyTorch, device and date
        reported = {Path(entry["checkpoint"]).name for entry in self.results().values() if "checkpoint" in entry}
        for old in self.checkpoints()[:-keep]:
            if old.name not in reported:
                old.unlink()
        return path

    def what_is_kept(self) -> str:
        """What a run that stops on a failure keeps, in words: its newest checkpoint, named."""
        newest = self.newest_checkpoint()
        return f"the newest good checkpoint, {newest}, is kept" if newest else "no checkpoint had been written yet"

    # ------------------------------------------------------------------------- results.json

    def results(self) -> dict:
        """The run's results.json, or {} if it has none yet."""
        path = self.path / "results.json"
        return read_json(path) if path.is_file() else {}

    def results_lock(self):
        """Wait for, then hold, results.json for one read-change-write (trainer and --eval-only alike)."""
        return locked(self.path / RESULTS_LOCK)

    def add_result(self, key: str, entry: dict) -> str:
        """Add an entry to results.json under `key` (what it measured; a repeat is kept beside it as "<key> #2"),
        leaving every other entry as it is, those other processes write meanwhile included; return its key."""
        with self.results_lock():
            results = self.results()
            unique, repeat = key, 1
            while unique in results:
                repeat += 1
                unique = f"{key} #{repeat}"
            results[unique] = entry
            write_json(self.path / "results.json", results)
        return unique

    def record_evaluation(self, key: str, entry: dict, settings: dict, training: list[dict], device: str) -> str:
        """add_result with the run's settings, what evaluated it (provenance) and what trained the checkpoint
        (`training`: its segments); say where it went."""
        key = self.add_result(key, {**entry, "settings": settings, "provenance": provenance(device),
                                    "training": training})
        print(f"recorded in {self.path / 'results.json'} as \"{key}\"")
        return key

    def say_complete(self, what: str) -> None:
        """Tell the user that training is complete and its evaluation recorded."""
        print(f"training is complete and {self.path / 'results.json'} holds {what}; use --eval-only to evaluate again")


class Training:
    """The stretch of a run that this process trains, from meta-iteration `start` to `total`: progress bar, TensorBoard
    writer (if `writes`), stop signals (`any_process`: every process of a torchrun stops at the same meta-iteration),
    segments with what trained each, and write errors as one line that says what is kept and how to resume."""

    def __init__(self, folder: RunFolder, start: int, total: int, segments: list[dict], device: str,
                 resume_command: str, check_every: int, description: str, writes: bool = True,
                 any_process: Callable[[bool], bool] = bool, **segment_notes):
        self.folder, self.start, self.total, self.check_every = folder, start, total, check_every
        self.resume_command, self.writes, self.any_process = resume_command, writes, any_process
        self.segment = {"from": start, "to": start, **segment_notes, **provenance(device)}
        self.segments = segments + [self.segment]  # the parts of the training so far, each with what trained it
        self.checkpoint = folder.checkpoint_folder / f"check-{start}.pth"
        self.description, self.stop = description, False
        self.signals, self.writer, self.progress, self.stack = [], None, None, contextlib.ExitStack()

    def __enter__(self) -> "Training":
        self.signals = self.stack.enter_context(stop_signals())
        # Points logged after the checkpoint by an interrupted run are dropped, so none is duplicated.
        try:
            self.writer = SummaryWriter(str(self.folder.path), purge_step=self.start + 1) if self.writes else None
        except OSError as error:  # with __enter__ failing, `with` will not call __exit__: it is called here
            self.__exit__(type(error), error, None)
        self.progress = tqdm(initial=self.start, total=self.total, desc=self.description, unit="it",
                             dynamic_ncols=True, disable=not self.writes)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.progress is not None:
            self.progress.leave = kind is None  # an error's one line takes the progress bar's place
            self.progress.close()
        if self.writer is not None:
            with contextlib.suppress(OSError):  # already reported
                self.writer.close()
        self.stack.close()
        then = f"{self.folder.what_is_kept()}; once the cause is fixed, resume with: {self.resume_command}"
        if isinstance(error, WriteError):
            raise UserError(f"{error}; {then}") from None
        if isinstance(error, OSError):  # TensorBoard's writer could not write its events (a full disk, no permission)
            raise UserError(f"cannot write the TensorBoard events in {self.folder.path} ({reason(error)}); "
                            f"{then}") from None

    def done(self, iteration: int) -> bool:
        """Count meta-iteration `iteration` (1, 2, ...) done; whether a checkpoint is due (every check_every, at the
        end, and when stopping)."""
        self.progress.update()
        self.stop = self.any_process(bool(self.signals))
        return iteration % self.check_every == 0 or iteration == self.total or self.stop

    def save(self, iteration: int, write: Callable[[list[dict]], Path]) -> None:
        """Write the checkpoint of meta-iteration `iteration` with `write(segments)`, once every logged point is on
        disk (tensorboardX's flush does not wait; torch's does)."""
        if self.writer is not None:
            self.writer.flush()
        self.segment["to"] = iteration
        self.checkpoint = write(self.segments)

    def interrupted(self, iteration: int) -> int:
        """Say where the run stopped and how to resume it; the exit status (128 + the signal)."""
        self.progress.close()
        if self.writes:
            print(f"interrupted at meta-iteration {iteration}; checkpoint saved to {self.checkpoint}\n"
                  f"resume with: {self.resume_command}", file=sys.stderr)
        return 128 + (self.signals[0] if self.signals else signal.SIGTERM)

    def trained(self) -> list[dict]:
        """The segments that trained (not a start that found training complete)."""
        return [part for part in self.segments if part["to"] > part["from"]]
