"""Shared fixtures: the offline Omniglot copy, a prepared data folder, and running the training script."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import omniglot  # noqa: E402

# One thread, here and in the scripts the tests start: the tests' tensors are tiny, so a second thread gains
# nothing, and when other work holds the cores (a training run beside the suite) threads that wait for each other
# made the suite crawl (one test took 83 s on two threads against 33 s on one, and 253 s with more load).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Any attempt to reach the network goes to a closed local port and fails at once.
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The folder holding the two official Omniglot zips ($OMNIGLOT_MIRROR, else ../shared/omniglot)."""
    path = Path(os.environ.get(omniglot.MIRROR_VARIABLE) or ROOT.parent / "shared" / "omniglot").resolve()
    if not all((path / f"{name}.zip").is_file() for name in omniglot.SETS):
        pytest.fail(f"no Omniglot zips in {path}: set {omniglot.MIRROR_VARIABLE} to a folder holding them")
    return path


@pytest.fixture(scope="session")
def data_dir(mirror, tmp_path_factory) -> Path:
    """A data folder prepared from the mirror, shared by the whole session."""
    return omniglot.prepare_data(str(tmp_path_factory.mktemp("data") / "omniglot"), str(mirror))


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
def script(data_dir, mirror):
    """(command line, environment) that run train_omniglot.py offline on the prepared data."""
    def command(*args: str, env: dict = None) -> tuple[list[str], dict]:
        environment = {**os.environ, **NO_NETWORK, omniglot.MIRROR_VARIABLE: str(mirror), **(env or {})}
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
