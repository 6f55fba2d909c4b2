"""Shared fixtures: the offline Omniglot copy, a prepared data folder, and running the training script."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import omniglot  # noqa: E402
import options  # noqa: E402
from utils import UserError  # noqa: E402

# One thread, here and in the scripts the tests start: the tests' tensors are tiny, so a second thread gains
# nothing, and when other work holds the cores (a training run beside the suite) threads that wait for each other
# made the suite crawl (one test took 83 s on two threads against 33 s on one, and 253 s with more load).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Any attempt to reach the network goes to a closed local port and fails at once.
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


def find_mirror() -> Optional[Path]:
    """The folder holding the two Omniglot zips: $OMNIGLOT_MIRROR, else ../shared/omniglot; None if neither does."""
    path = Path(os.environ.get(omniglot.MIRROR_VARIABLE) or ROOT.parent / "shared" / "omniglot").resolve()
    return path if all((path / f"{name}.zip").is_file() for name in omniglot.SETS) else None


def unavailable(reason: str) -> None:
    """Skip a test that needs data this machine lacks; under CI (CI=true) nothing may be skipped that way."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must have the data)", pytrace=False)
    pytest.skip(reason)


HOW_TO_PROVIDE = (f"set {omniglot.MIRROR_VARIABLE} to a folder holding images_background.zip and "
                  f"images_evaluation.zip (or connect to the internet once: the tests download Omniglot into "
                  f"{ROOT / 'omniglot'})")


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The folder holding the two official Omniglot zips, for the tests of reading and checking them."""
    path = find_mirror()
    if path is None:
        unavailable(f"these tests read the Omniglot zips themselves: set {omniglot.MIRROR_VARIABLE} to a folder "
                    f"holding images_background.zip and images_evaluation.zip")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared data folder shared by the whole session: from the mirror, else the project's own download into
    its default data folder (kept there for the next run)."""
    mirror = find_mirror()
    if mirror is not None:
        # One folder for all of pytest-xdist's workers: prepare_data's lock lets the first fill it, the others wait.
        shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else \
            tmp_path_factory.getbasetemp()
        return omniglot.prepare_data(str(shared / "data" / "omniglot"), str(mirror))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a network that never answers fails the download instead of hanging it
    try:
        return omniglot.prepare_data(str(ROOT / "omniglot"))
    except UserError:
        unavailable(f"no Omniglot here, and no network to download it: {HOW_TO_PROVIDE}")
    finally:
        socket.setdefaulttimeout(previous)


@pytest.fixture(scope="session")
def offline() -> dict:
    """The environment of a script under test: no network, and the mirror where there is one."""
    mirror = find_mirror()
    return {**NO_NETWORK, **({omniglot.MIRROR_VARIABLE: str(mirror)} if mirror else {})}


def copy_data(data_dir: Path, destination: Path, **copytree_options) -> Path:
    """A copy of a data folder whose images are hard links to the originals, ten times faster than copying them.

    An image of the copy is the original's file: replace it (unlink, then write), never write into it.
    """
    def link_images(source: str, target: str) -> None:
        if source.endswith(".png"):
            os.link(source, target)
        else:
            shutil.copy2(source, target)
    shutil.copytree(data_dir, destination, copy_function=link_images, **copytree_options)
    return destination


@pytest.fixture(scope="session")
def loaded(data_dir):
    """(characters, images) of the prepared data folder."""
    return omniglot.load_images(data_dir)


@pytest.fixture
def script(data_dir, offline):
    """(command line, environment) that run train_omniglot.py offline on the prepared data."""
    def command(*args: str, env: dict = None) -> tuple[list[str], dict]:
        environment = {**os.environ, **offline, **(env or {})}
        return [sys.executable, str(ROOT / "train_omniglot.py"), "--data", str(data_dir), *args], environment
    return command


@pytest.fixture
def run_script(script):
    """Run train_omniglot.py to the end (later --data flags override the prepared data)."""
    def run(*args: str, env: dict = None) -> subprocess.CompletedProcess:
        argv, environment = script(*args, env=env)
        result = subprocess.run(argv, capture_output=True, env=environment, cwd=ROOT, timeout=600)
        # Decoded by hand: text mode would turn the progress bars' carriage returns into newlines.
        result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
        return result
    return run


def read_results(folder) -> dict:
    """A run folder's results.json, read as JSON ({} when there is none)."""
    path = Path(folder) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_checkpoint(path) -> dict:
    """A checkpoint of train_omniglot.py, read as the scripts read it (RunFolder.read_checkpoint)."""
    return options.folder(Path(path).parent.parent).read_checkpoint(str(path))


def result_of(logdir: Path, shots, mode, iteration: int, tasks: int, seed: int = 0) -> dict:
    """The entry of a run's results.json that measured this (Lake's: shots and mode None, tasks its repeats)."""
    entry = evaluate.find_result(read_results(Path(logdir)), shots, mode, iteration, tasks, seed)
    assert entry is not None, f"no {shots}-shot {mode} entry at {iteration}, {tasks} tasks, seed {seed} in {logdir}"
    return entry


def pytest_terminal_summary(terminalreporter) -> None:
    """Say once why tests were skipped, and how many (pytest's -rs says it once per test file and line)."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"{count} skipped: {reason}")
