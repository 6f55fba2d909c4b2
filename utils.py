"""Small helpers that know nothing of meta-learning: one-line errors, files written atomically and locked, stop
signals, random streams, confidence intervals, argparse types, the process group under torchrun, and provenance (the
code's commit, PyTorch, the device, the date)."""
import argparse
import contextlib
import datetime
import fcntl
import functools
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import numpy as np
import torch


class UserError(Exception):
    """A problem the user must fix (bad flag, missing data, damaged file); the message says how."""


class WriteError(UserError):
    """A file that could not be written (a full disk, no permission); nothing half-written was left."""


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(file)` under a temporary name, then rename it into place; a failed write removes
    the temporary file and raises a WriteError that names the file and the reason."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path} ({reason(error)})") from None


@contextlib.contextmanager
def locked(path: Path, wait: bool = True):
    """Hold an exclusive lock on the file `path` (made if missing), freed when the process ends; yield its descriptor.
    With wait=False, a lock held elsewhere raises BlockingIOError at once instead of being waited for."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise WriteError(f"cannot write {path} ({reason(error)})") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield descriptor
    finally:
        os.close(descriptor)


def save_atomically(path: str, data: Any) -> None:
    """torch.save `data` to `path` atomically (serialized in memory first, so a failed write names its reason)."""
    serialized = io.BytesIO()
    torch.save(data, serialized)
    write_atomically(path, lambda file: file.write(serialized.getbuffer()))


def reason(error: Exception) -> str:
    """The first line of an exception's message, e.g. "No space left on device"."""
    text = getattr(error, "strerror", None) or str(error).strip() or type(error).__name__
    return text.splitlines()[0][:160]


def write_json(path: str, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_atomically(path, lambda file: file.write((json.dumps(data, indent=2) + "\n").encode()))


def read_json(path: str) -> Any:
    """Read a JSON file, with an error that names it if it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is unreadable ({error}); delete it or restore it") from None


@contextlib.contextmanager
def stop_signals():
    """Ctrl-C or SIGTERM asks a training loop to stop after its current iteration (yields the list of such signals);
    a second one stops at once."""
    interrupted = []

    def on_interrupt(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)

    previous_handlers = {signum: signal.signal(signum, on_interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    # TensorBoard's writer thread reports a failed write (OSError) to this thread, which says it in one line; the
    # thread's own traceback would only repeat it.
    previous_hook = threading.excepthook
    threading.excepthook = lambda hook: None if issubclass(hook.exc_type, OSError) else previous_hook(hook)
    try:
        yield interrupted
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        threading.excepthook = previous_hook


def stream(seed: int, purpose: int, process: Optional[int] = None) -> torch.Generator:
    """A torch generator for one independent random stream of the run (of one process, under torchrun)."""
    entropy = [seed, purpose] + ([] if process is None else [process])
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def confidence_interval(values: np.ndarray) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean of per-task values."""
    return 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def run_script(main: Callable[[list[str]], int], argv: list[str], script: str) -> int:
    """main(argv), with a UserError reported in one line (status 2) and Ctrl-C as status 130."""
    try:
        return main(argv)
    except UserError as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        return 130


def number(kind: type, minimum: float, strict: bool = False):
    """An argparse type: a finite number of `kind` at least `minimum` (above it, if strict)."""
    def parse(text: str):
        value = kind(text)
        if not (value > minimum if strict else value >= minimum):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {minimum}, got {text}")
        if not math.isfinite(value):  # an infinite learning rate or meta-step can never train
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid value" message
    return parse


positive_int, non_negative_int = number(int, 1), number(int, 0)
positive_float, non_negative_float = number(float, 0, strict=True), number(float, 0)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none, is an on/off switch, or its help already tells it; the
    description and the epilog as they are written."""

    def _get_help_string(self, action):
        if (action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def pyplot(what: str):
    """matplotlib.pyplot, drawing to files only; a UserError that says how to install it where it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot
    except ImportError:
        raise UserError(f"{what} needs matplotlib; install it with: pip install matplotlib") from None
    return matplotlib.pyplot


def processes() -> int:
    """How many processes share the work: torchrun's world size, or 1."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    """This process's rank under torchrun, or 0."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process, so that all processes stop at the same meta-iteration."""
    if processes() == 1:
        return flag
    flags = torch.tensor([float(flag)])  # on the CPU (gloo), so that on CUDA it does not wait for the GPU
    torch.distributed.all_reduce(flags)
    return flags.item() > 0


def gather(value) -> list:
    """[the value of each process] on every process (just [value] without torchrun)."""
    if processes() == 1:
        return [value]
    values = [None] * processes()
    torch.distributed.all_gather_object(values, value)
    return values


def git(*args: str, folder: Path = Path(__file__).resolve().parent) -> Optional[str]:
    """The output of a git command run in `folder` (default: this checkout), or None where git or a checkout is
    missing."""
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git here
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_commit(folder: Path = Path(__file__).resolve().parent) -> dict:
    """The checkout's commit, and whether it has uncommitted changes outside runs/ (whose results and checkpoints
    are not code: recording a result there must not mark the next one); {} outside a git checkout."""
    commit = git("rev-parse", "HEAD", folder=folder)
    if commit is None:
        return {}
    return {"commit": commit,
            "uncommitted_changes": bool(git("status", "--porcelain", "--", ".", ":(exclude)runs", folder=folder))}


@functools.cache
def code_and_machine(device: str) -> dict:
    """The code's commit (code_commit), the PyTorch version and the device."""
    code = code_commit()
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.is_file() else []
        name = f"{models[0]} ({len(os.sched_getaffinity(0))} cores)" if models else platform.processor() or "CPU"
    return {**code, "torch": str(torch.__version__), "device": name}


def provenance(device: str) -> dict:
    """What produced a result or checkpoint now: commit (outside a git checkout: none), PyTorch, device and date."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {**code_and_machine(device), "date": now}
