import subprocess
import sys
import zipfile

import pytest
import torch

import rescale_adam
from conftest import ROOT

RESCALED = {"runs/5way/checkpoint/check-100000.pth": 10, "runs/20way/checkpoint/check-20006.pth": 20,
            "runs/20way-background/checkpoint/check-20008.pth": 20}
COMMIT = "a77c55f"  # the commit that rescaled them by hand


def test_summed_gradients_from_a_rescaled_state_take_the_steps_that_means_took():
    torch.manual_seed(0)
    images, labels = torch.randn(10, 4), torch.randint(0, 3, (10,))
    means, sums = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    sums.load_state_dict(means.state_dict())
    mean_adam, sum_adam = (torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.999)) for model in (means, sums))
    for _ in range(3):  # a history with the averaged loss
        mean_adam.zero_grad()
        torch.nn.functional.cross_entropy(means(images), labels).backward()
        mean_adam.step()
    sums.load_state_dict(means.state_dict())
    sum_adam.load_state_dict(rescale_adam.rescale({"inner_optimizer": mean_adam.state_dict()}, 10)["inner_optimizer"])
    for _ in range(3):
        for model, adam, reduction in ((means, mean_adam, "mean"), (sums, sum_adam, "sum")):
            adam.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels, reduction=reduction).backward()
            adam.step()
    for mean_weight, sum_weight in zip(means.parameters(), sums.parameters()):
        torch.testing.assert_close(sum_weight, mean_weight, rtol=1e-5, atol=1e-6)  # only Adam's epsilon differs


def git_file(commit: str, path: str, destination) -> bool:
    """Write `path` as of `commit` to `destination`; False where this checkout lacks that history."""
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True)
    if shown.returncode != 0:
        return False
    destination.write_bytes(shown.stdout)
    return True


def members(path) -> dict:
    """The files inside a checkpoint's zip, without the folder torch.save names after the file."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename.split("/", 1)[1]: archive.read(info) for info in archive.infolist()}


@pytest.mark.parametrize("path", RESCALED)
def test_the_script_redoes_the_hand_edit_of_the_committed_checkpoints(path, tmp_path):
    before, after = tmp_path / "before.pth", tmp_path / "after.pth"
    if not (git_file(f"{COMMIT}^", path, before) and git_file(COMMIT, path, after)):
        pytest.skip(f"this checkout lacks the git history of {path} (commit {COMMIT})")
    output = tmp_path / "rescaled.pth"
    done = subprocess.run([sys.executable, str(ROOT / "rescale_adam.py"), str(before), str(output), "--batch",
                           str(RESCALED[path])], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert members(output) == members(after)
    assert members(before) != members(after)
