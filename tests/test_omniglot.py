import concurrent.futures
import json
import random
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
from torchvision.datasets.utils import list_dir

import omniglot
from conftest import NO_NETWORK, ROOT, copy_data
from utils import UserError, locked


def numbered_images(characters: int) -> torch.Tensor:
    """Images whose every pixel holds a unique id: character * 20 + drawer."""
    ids = torch.arange(characters * omniglot.DRAWERS, dtype=torch.float32).view(characters, omniglot.DRAWERS, 1, 1)
    return ids.expand(-1, -1, omniglot.IMAGE_SIZE, omniglot.IMAGE_SIZE).clone()


def test_task_labels_and_disjoint_support_and_query():
    sampler = omniglot.TaskSampler(numbered_images(12))
    task = sampler.sample(5, 3, 2, torch.Generator().manual_seed(0))
    assert task.support_inputs.shape == (15, 1, 28, 28) and task.query_inputs.shape == (10, 1, 28, 28)
    assert sorted(task.support_targets.tolist()) == sorted(list(range(5)) * 3)
    assert sorted(task.query_targets.tolist()) == sorted(list(range(5)) * 2)
    support_ids = task.support_inputs[:, 0, 0, 0].long()
    query_ids = task.query_inputs[:, 0, 0, 0].long()
    assert not set(support_ids.tolist()) & set(query_ids.tolist())
    # All images of a label come from one character, and labels are distinct characters.
    character_of = {}
    for image_id, label in zip(torch.cat([support_ids, query_ids]).tolist(),
                               torch.cat([task.support_targets, task.query_targets]).tolist()):
        assert character_of.setdefault(label, image_id // omniglot.DRAWERS) == image_id // omniglot.DRAWERS
    assert len(set(character_of.values())) == 5


def test_a_seed_reproduces_a_task_and_labels_are_shuffled():
    sampler = omniglot.TaskSampler(numbered_images(12))
    first = sampler.sample(5, 1, 1, torch.Generator().manual_seed(3))
    again = sampler.sample(5, 1, 1, torch.Generator().manual_seed(3))
    other = sampler.sample(5, 1, 1, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first.support_inputs, other.support_inputs)
    # Label 0 is not always the lowest-numbered character.
    lowest_is_zero = []
    for seed in range(20):
        task = sampler.sample(5, 1, 0, torch.Generator().manual_seed(seed))
        lowest_is_zero.append(task.support_inputs[:, 0, 0, 0].argmin().item() == 0)
    assert not all(lowest_is_zero)


def test_rotations_are_classes_of_their_own():
    images = torch.zeros(1, omniglot.DRAWERS, 28, 28)
    images[:, :, 0, :5] = 1  # a stroke along the top edge
    sampler = omniglot.TaskSampler(images, omniglot.ROTATIONS)
    assert sampler.num_classes == 4
    task = sampler.sample(4, 1, 0, torch.Generator().manual_seed(0))
    by_label = {label: image[0] for label, image in zip(task.support_targets.tolist(), task.support_inputs)}
    seen = {tuple(image.nonzero()[0].tolist()) for image in by_label.values()}
    assert len(seen) == 4  # four different orientations
    turned = {tuple(torch.rot90(images[0, 0], k).nonzero()[0].tolist()) for k in range(4)}
    assert seen == turned


def test_the_bank_holds_each_drawn_image_turned_as_its_class_is():
    images = torch.rand(3, omniglot.DRAWERS, 28, 28)
    sampler = omniglot.TaskSampler(images, omniglot.ROTATIONS)
    bank = sampler.bank()
    assert bank.shape == (3 * 4 * omniglot.DRAWERS, 1, 28, 28)
    for seed in range(5):
        task = sampler.sample(4, 2, 1, torch.Generator().manual_seed(seed))
        rows = omniglot.bank_rows(*sampler.draw(4, 2, 1, torch.Generator().manual_seed(seed)))
        assert torch.equal(bank[rows[:, :2].reshape(-1)], task.support_inputs)
        assert torch.equal(bank[rows[:, 2]], task.query_inputs)


def test_sampling_refuses_impossible_tasks():
    sampler = omniglot.TaskSampler(numbered_images(3))
    with pytest.raises(ValueError):
        sampler.sample(4, 1, 1, torch.Generator())
    with pytest.raises(ValueError):
        sampler.sample(2, 20, 1, torch.Generator())


def test_merged_folder_has_all_alphabets(data_dir, loaded):
    assert len(list_dir(str(data_dir))) == 50
    characters, images = loaded
    assert len(characters) == 1623 and len(set(characters)) == 1623
    assert images.shape == (1623, 20, 28, 28)
    assert set(images.unique().tolist()) == {0.0, 1.0}
    assert images.mean() > 0.8  # background 1, ink 0


def test_paper_split(data_dir, loaded):
    characters, images = loaded
    split = omniglot.make_split(data_dir, characters, "paper", seed=0)
    assert len(split["train"]) == 1200 and len(split["test"]) == 423
    assert set(split["train"]) | set(split["test"]) == set(characters)
    assert not set(split["train"]) & set(split["test"])
    assert omniglot.TaskSampler(images[:1200], split["train_rotations"]).num_classes == 4800
    assert omniglot.make_split(data_dir, characters, "paper", seed=0) == split
    assert omniglot.make_split(data_dir, characters, "paper", seed=1)["train"] != split["train"]


def papers_order(alphabets: dict[str, list[str]], seed: int) -> list[str]:
    """The characters in the order the paper's code shuffles them into (its first 1,200 meta-train): random.seed,
    then random.shuffle of the characters listed alphabet by alphabet, both levels sorted."""
    listed = [f"{alphabet}/{character}" for alphabet in sorted(alphabets) for character in sorted(alphabets[alphabet])]
    state = random.getstate()
    try:
        random.seed(seed)
        random.shuffle(listed)
    finally:
        random.setstate(state)
    return listed


def first_difference(ours: list[str], theirs: list[str]) -> int | None:
    """The first position where two lists differ (pytest's own report on lists this long takes minutes)."""
    return next((i for i, pair in enumerate(zip(ours, theirs)) if pair[0] != pair[1]), None)


@pytest.mark.parametrize("seed", [0, 5])
def test_paper_split_is_the_papers_own(data_dir, loaded, seed):
    alphabets = {alphabet: list_dir(str(data_dir / alphabet)) for alphabet in list_dir(str(data_dir))}
    split = omniglot.make_split(data_dir, loaded[0], "paper", seed=seed)
    assert first_difference(split["train"] + split["test"], papers_order(alphabets, seed)) is None


def test_every_committed_run_holds_the_characters_its_split_names(data_dir, loaded):
    """Each reference run's split.json is what its named procedure draws for its seed: a split's name never lies."""
    splits = sorted(ROOT.glob("runs/**/split.json"))
    assert len(splits) >= 16
    for path in splits:
        saved = json.loads(path.read_text())
        drawn = omniglot.make_split(data_dir, loaded[0], saved["split"], saved["seed"])
        assert drawn == saved, path


def test_the_random_1200_split_is_another_draw_than_the_papers(data_dir, loaded):
    random_split = omniglot.make_split(data_dir, loaded[0], "random-1200", seed=0)
    paper = omniglot.make_split(data_dir, loaded[0], "paper", seed=0)
    assert len(random_split["train"]) == 1200
    assert set(random_split["train"]) | set(random_split["test"]) == set(loaded[0])
    assert len(set(random_split["test"]) & set(paper["test"])) == 100


def test_paper_split_lists_alphabet_by_alphabet():
    # "A-B/..." sorts before "A/..." as a string, but the alphabet "A" sorts before "A-B".
    alphabets = {"A": [f"character{i:03d}" for i in range(900)], "A-B": [f"character{i:03d}" for i in range(900)]}
    characters = sorted(f"{alphabet}/{character}" for alphabet, names in alphabets.items() for character in names)
    split = omniglot.make_split(None, characters, "paper", seed=0)
    assert first_difference(split["train"] + split["test"], papers_order(alphabets, 0)) is None


def test_background_split_shares_no_alphabet(data_dir, loaded):
    characters, _ = loaded
    split = omniglot.make_split(data_dir, characters, "background", seed=0)
    assert len(split["train"]) == 964 and len(split["test"]) == 659
    train_alphabets = {c.split("/")[0] for c in split["train"]}
    test_alphabets = {c.split("/")[0] for c in split["test"]}
    assert len(train_alphabets) == 30 and len(test_alphabets) == 20
    assert not train_alphabets & test_alphabets


def test_a_prepared_folder_touches_no_archive(data_dir, tmp_path):
    assert omniglot.prepare_data(str(data_dir), str(tmp_path / "no-such-mirror")) == data_dir


def test_without_network_or_mirror_the_error_says_what_to_do(tmp_path, monkeypatch):
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(omniglot.MIRROR_VARIABLE, raising=False)
    with pytest.raises(UserError, match=omniglot.MIRROR_VARIABLE):
        omniglot.prepare_data(str(tmp_path / "data"))
    assert not (tmp_path / "data" / omniglot.MARKER).exists()
    assert not list((tmp_path / "data").glob("*.part"))


def copy_mirror(mirror, destination):
    """A writable copy of the mirror folder."""
    destination.mkdir()
    for name in omniglot.SETS:
        shutil.copy(mirror / f"{name}.zip", destination)
    return destination


def test_a_truncated_zip_is_rejected(mirror, tmp_path):
    bad = copy_mirror(mirror, tmp_path / "mirror")
    archive = bad / "images_evaluation.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match="images_evaluation.zip is damaged"):
        omniglot.prepare_data(str(tmp_path / "data"), str(bad))
    assert not (tmp_path / "data" / omniglot.MARKER).exists()


def test_a_zip_missing_an_alphabet_is_rejected(mirror, tmp_path):
    bad = tmp_path / "mirror"
    copy_mirror(mirror, bad)
    with zipfile.ZipFile(mirror / "images_evaluation.zip") as source, \
            zipfile.ZipFile(bad / "images_evaluation.zip", "w") as target:
        for info in source.infolist():
            if not info.filename.startswith("images_evaluation/Angelic/"):
                target.writestr(info, source.read(info))
    with pytest.raises(UserError, match="19 alphabets, 639 characters"):
        omniglot.prepare_data(str(tmp_path / "data"), str(bad))
    assert not (tmp_path / "data" / omniglot.MARKER).exists()


def test_two_processes_preparing_one_folder_extract_it_once(mirror, tmp_path):
    prepare = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import omniglot; "
               f"omniglot.prepare_data({str(tmp_path / 'data')!r}, {str(mirror)!r})")
    processes = [subprocess.Popen([sys.executable, "-c", prepare], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert sum("extracting Omniglot" in stdout for stdout, _ in outputs) == 1  # the other waited and used its work
    omniglot.check_counts(tmp_path / "data", (50, 1623, 32460), "the folder", "")  # else UserError


def test_an_interrupted_extraction_is_redone(mirror, tmp_path):
    data = tmp_path / "data"
    (data / ".extracting" / "images_background" / "Latin").mkdir(parents=True)
    (data / "Latin" / "character01").mkdir(parents=True)  # half-moved alphabet from an earlier attempt
    (data / "Latin" / "character01" / "0001_01.png").write_bytes(b"partial")
    omniglot.prepare_data(str(data), str(mirror))
    omniglot.check_counts(data, (50, 1623, 32460), "the folder", "")  # else UserError
    assert not (data / ".extracting").exists()
    assert (data / omniglot.MARKER).is_file()


def test_a_damaged_character_folder_is_named(data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data")
    victim = data / "Latin" / "character03"
    for image in sorted(victim.iterdir())[:2]:
        image.unlink()
    with pytest.raises(UserError, match="Latin/character03 holds 18 images"):
        omniglot.load_images(data)
    for image in sorted(victim.iterdir())[0], data / "Latin" / "character04" / "0001_01.png":
        image.unlink(missing_ok=True)  # a linked image is replaced, never written into
        image.write_bytes(b"not a png")
    with pytest.raises(UserError, match="character0[34]"):
        omniglot.load_images(data)
    assert len(omniglot.list_character_images(data_dir)["Latin/character03"]) == 20  # the originals are untouched
    original = data_dir / "Latin" / "character03"
    assert all(omniglot.read_image(str(image)).shape == (28, 28) for image in original.iterdir())


def test_decoded_images_are_cached_and_a_bad_cache_is_rebuilt(data_dir, loaded, tmp_path):
    characters, images = loaded
    assert (data_dir / omniglot.CACHE).is_file()
    again_characters, again_images = omniglot.load_images(data_dir)
    assert again_characters == characters and torch.equal(again_images, images)
    data = copy_data(data_dir, tmp_path / "data")
    (data / omniglot.CACHE).write_bytes(b"damaged")
    rebuilt_characters, rebuilt_images = omniglot.load_images(data)
    assert rebuilt_characters == characters and torch.equal(rebuilt_images, images)
    torch.save({"characters": characters[:-1] + ["Latin/character99"], "images": images.to(torch.uint8) * 0},
               data / omniglot.CACHE)  # a cache of other characters is not used
    assert torch.equal(omniglot.load_images(data)[1], images)


def test_a_process_finding_the_images_being_decoded_waits_and_reads_the_cache(data_dir, loaded, tmp_path, monkeypatch):
    data = copy_data(data_dir, tmp_path / "data", ignore=shutil.ignore_patterns(omniglot.CACHE))
    waiting = threading.Event()

    def signal_then_lock(path):
        waiting.set()
        return locked(path)

    def decode(path, source=None):
        raise AssertionError("decoded the images while another process was writing them")

    monkeypatch.setattr(omniglot, "locked", signal_then_lock)
    monkeypatch.setattr(omniglot, "read_image", decode)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with locked(data / omniglot.LOCK):  # held as by another process decoding the images
            other = pool.submit(omniglot.load_images, data)
            assert waiting.wait(timeout=60), other.exception()
            shutil.copy(data_dir / omniglot.CACHE, data / omniglot.CACHE)
        characters, images = other.result(timeout=60)
    assert characters == loaded[0] and torch.equal(images, loaded[1])


@pytest.mark.parametrize("edit, named", [
    (lambda data: shutil.rmtree(data / "Latin" / "character07"), "Latin holds 25 entries"),
    (lambda data: (data / "notes.txt").write_text("x"), "notes.txt does not belong"),
    (lambda data: (data / "Latin" / "character07" / "Thumbs.db").write_text("x"), "Thumbs.db does not belong"),
    (lambda data: (data / "Latin" / "extra").mkdir(), "Latin holds 27 entries"),
    (lambda data: shutil.rmtree(data / "Angelic"), "Angelic holds 0 entries"),
])
def test_a_folder_edited_by_hand_is_named(edit, named, data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data")
    (data / "Latin" / ".DS_Store").write_text("x")  # hidden files are tolerated
    omniglot.list_character_images(data)
    edit(data)
    with pytest.raises(UserError, match=named):
        omniglot.load_images(data)
