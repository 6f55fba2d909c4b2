"""Omniglot: download both sets, merge them into one folder of 50 alphabets, split the characters (a run's
split.json), sample tasks.

Images are 28x28 floats with the paper's convention: background 1, ink 0.
"""
import http.client
import os
import random
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from reptile import TestTask
from utils import UserError, locked, read_json, reason, save_atomically, write_json

URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
LAKE_ARCHIVE = "all_runs.zip"  # Lake et al.'s one-shot benchmark, read by lake.py; it may lie in the data folder
MIRROR_VARIABLE = "OMNIGLOT_MIRROR"
MARKER = ".complete"  # written last: a data folder without it is redone, never used
CACHE = "images28.pt"  # the decoded 28x28 images, saved beside the alphabets
LOCK = ".lock"  # held by the process that prepares the folder or decodes its images


class SetInfo(NamedTuple):
    md5: str
    alphabets: int
    characters: int
    images: int

    def counts(self) -> tuple[int, int, int]:
        return self.alphabets, self.characters, self.images


SETS = {
    "images_background": SetInfo("68d2efa1b9178cc56df9314c21c6e718", 30, 964, 19280),
    "images_evaluation": SetInfo("6b91aef0f799c5bb55b94e3f2daec811", 20, 659, 13180),
}
DRAWERS = 20  # images per character, one by each of 20 people
IMAGE_SIZE = 28
ROTATIONS = (0, 90, 180, 270)  # degrees; each rotation of a meta-training character is a class of its own
PAPER_TRAIN_CHARACTERS = 1200
# How each split chooses its characters: "paper" is the released code's procedure (seed 0: the paper's own split);
# "random-1200" is this project's first procedure, which trained runs/5way, runs/5way-seed1 and runs/20way.
SPLITS = ("paper", "random-1200", "background")


def check_counts(root: Path, expected: tuple[int, int, int], where: str, repair: str) -> None:
    """A UserError unless the folder `root`, laid out ALPHABET/characterNN/*.png, holds `expected` (alphabets,
    characters, images); the message names the folder (`where`) and what to do (`repair`)."""
    alphabets = [a for a in visible(root) if a.is_dir()] if root.is_dir() else []
    characters = [c for a in alphabets for c in visible(a) if c.is_dir()]
    found = (len(alphabets), len(characters), sum(f.suffix == ".png" for c in characters for f in visible(c)))
    if found != expected:
        raise UserError(f"{where} holds {found[0]} alphabets, {found[1]} characters and {found[2]} images, where "
                        f"Omniglot has {expected[0]}, {expected[1]} and {expected[2]}; {repair}")


def fetch_archive(url: str, md5: str, data_dir: Path, mirror: Optional[str]) -> tuple[Path, bool]:
    """The zip at `url`, from the mirror folder (same file name) or downloaded; and whether it was downloaded."""
    # Imported here, not above: importing torchvision takes seconds (it loads torch._dynamo), which every run and
    # evaluation worker would pay, and only preparing the data folder needs it.
    from torchvision.datasets.utils import check_md5, download_url
    file_name = url.rsplit("/", 1)[1]
    if mirror:
        if not Path(mirror).is_dir():
            raise UserError(f"the mirror {mirror} ({MIRROR_VARIABLE} or --omniglot-mirror) is not a folder; it must be "
                            f"a folder holding {file_name}, a copy of {url}")
        path = Path(mirror) / file_name
        if not path.is_file():
            raise UserError(f"{path} not found: the mirror folder ({MIRROR_VARIABLE} or --omniglot-mirror) "
                            f"must hold {file_name}, a copy of {url}")
        return path, False
    path = data_dir / file_name
    if path.is_file() and check_md5(str(path), md5):
        return path, True
    partial = path.with_name(path.name + ".part")
    print(f"downloading {url}")
    try:
        download_url(url, str(data_dir), partial.name)
    except (OSError, http.client.HTTPException) as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot download {url} ({error}); without internet, set {MIRROR_VARIABLE} "
                        f"(or --omniglot-mirror) to a folder holding a copy of {file_name}") from None
    if not check_md5(str(partial), md5):
        partial.unlink()
        raise UserError(f"{url} did not match its official md5 {md5}; run again to retry the download")
    os.replace(partial, path)
    return path, True


def extract_checked(archive: Path, name: str, staging: Path, downloaded: bool) -> Path:
    """Extract one set into `staging` and check it has Omniglot's alphabets, characters and images."""
    from torchvision.datasets.utils import extract_archive  # here, not above: see fetch_archive
    repair = ("it was deleted: run again to download it again" if downloaded
              else "replace it with a good copy of the official file")
    try:
        extract_archive(str(archive), str(staging))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        if downloaded:
            archive.unlink(missing_ok=True)
        raise UserError(f"{archive} is damaged ({error}); {repair}") from None
    root = staging / name
    try:
        check_counts(root, SETS[name].counts(), f"{archive}, under {name}/,", repair)
    except UserError:
        if downloaded:
            archive.unlink(missing_ok=True)
        raise
    return root


def prepare_data(data_dir: str, mirror: Optional[str] = None) -> Path:
    """Make `data_dir` hold all 50 alphabets (ALPHABET/characterNN/*.png), downloading or extracting if needed."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"the data folder {data_dir} is a file; give --data a folder (it is filled when missing)")
    if (data_dir / MARKER).is_file():
        return data_dir
    mirror = mirror or os.environ.get(MIRROR_VARIABLE)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the data folder {data_dir} ({reason(error)}); give --data a folder you can "
                        f"write to") from None
    with locked(data_dir / LOCK):  # another process preparing this folder: wait for it, then use its work
        if not (data_dir / MARKER).is_file():
            fill_data_folder(data_dir, mirror)
    return data_dir


def fill_data_folder(data_dir: Path, mirror: Optional[str]) -> None:
    """Download or take from the mirror both sets, extract and check them, merge them into `data_dir`."""
    staging = data_dir / ".extracting"
    shutil.rmtree(staging, ignore_errors=True)
    archives = {name: fetch_archive(f"{URL}{name}.zip", info.md5, data_dir, mirror) for name, info in SETS.items()}
    print(f"extracting Omniglot into {data_dir}")
    roots = {name: extract_checked(path, name, staging, downloaded) for name, (path, downloaded) in archives.items()}
    characters_of_set = {}  # {set: {alphabet: number of characters}}, kept in the marker to check the folder
    for name, root in roots.items():
        characters_of_set[name] = {a.name: len(visible(a)) for a in visible(root)}
        for alphabet in characters_of_set[name]:
            destination = data_dir / alphabet
            shutil.rmtree(destination, ignore_errors=True)  # left by an interrupted merge
            os.replace(root / alphabet, destination)
    shutil.rmtree(staging)
    check_counts(data_dir, tuple(map(sum, zip(*(info.counts() for info in SETS.values())))),
                 f"{data_dir}, after merging,", "it holds something else too: delete it (or choose another --data "
                 "folder) and run again")
    for path, downloaded in archives.values():
        if downloaded:
            path.unlink()
    write_json(data_dir / MARKER, characters_of_set)


def read_image(path: str, source: Optional[BinaryIO] = None) -> np.ndarray:
    """One 28x28 image (read from `source` if given, else `path`), float32, background 1 and ink 0."""
    try:  # Pillow resizes 1-bit images nearest-neighbour, as the paper's code did
        with Image.open(source or path) as image:
            return np.asarray(image.convert("1").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image {path} ({error}); delete the data folder and run again "
                        f"to extract it anew") from None


def visible(folder: Path) -> list[Path]:
    """The entries of a folder, without hidden ones (such as .DS_Store)."""
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def list_character_images(data_dir: Path) -> dict[str, list[str]]:
    """{'ALPHABET/characterNN': its 20 image paths}, after checking the folder holds exactly Omniglot."""
    repair = f"delete {data_dir} and run again to extract it anew"
    characters_of = {a: n for alphabets in read_json(data_dir / MARKER).values() for a, n in alphabets.items()}
    for entry in visible(data_dir):
        if entry.name not in characters_of and entry.name not in (CACHE, LAKE_ARCHIVE):
            raise UserError(f"{entry} does not belong in the Omniglot folder: remove it, or {repair}")
    images = {}
    for alphabet, count in characters_of.items():
        folder = data_dir / alphabet
        characters = visible(folder) if folder.is_dir() else []
        if len(characters) != count or not all(c.is_dir() for c in characters):
            raise UserError(f"{folder} holds {len(characters)} entries where Omniglot has {count} character "
                            f"folders; {repair}")
        for character in characters:
            files = visible(character)
            strays = [f for f in files if f.suffix != ".png"]
            if strays:
                raise UserError(f"{strays[0]} does not belong in the Omniglot folder: remove it, or {repair}")
            if len(files) != DRAWERS:
                raise UserError(f"{character} holds {len(files)} images where Omniglot has {DRAWERS}; {repair}")
            images[f"{alphabet}/{character.name}"] = [str(f) for f in files]
    return dict(sorted(images.items()))


def load_images(data_dir: Path) -> tuple[list[str], torch.Tensor]:
    """Every character as 'ALPHABET/characterNN' (sorted), and their images as a (characters, 20, 28, 28) tensor of
    torch's default dtype; decoded once, then read from images28.pt in the data folder while it holds them all."""
    files = list_character_images(data_dir)
    characters = list(files)
    images = read_cache(data_dir / CACHE, characters)
    if images is None:
        with locked(data_dir / LOCK):  # another process decoding: wait for it, then read its cache
            images = read_cache(data_dir / CACHE, characters)
            if images is None:
                images = torch.empty(len(characters), DRAWERS, IMAGE_SIZE, IMAGE_SIZE)
                for index, paths in enumerate(tqdm(files.values(), desc="decoding images", unit="char", leave=False)):
                    images[index] = torch.from_numpy(np.stack([read_image(path) for path in paths]))
                save_atomically(data_dir / CACHE, {"characters": characters, "images": images.to(torch.uint8)})
    return characters, images


def read_cache(cache: Path, characters: list[str]) -> Optional[torch.Tensor]:
    """The images saved in `cache` if it holds exactly `characters`, else None (missing, damaged or outdated)."""
    try:
        cached = torch.load(cache, weights_only=True)
        return cached["images"].to(torch.get_default_dtype()) if cached["characters"] == characters else None
    except Exception:
        return None


def split_sizes(split: str) -> tuple[int, int]:
    """(meta-train characters, meta-test characters) of a split."""
    background, evaluation = SETS["images_background"].characters, SETS["images_evaluation"].characters
    if split == "background":
        return background, evaluation
    return PAPER_TRAIN_CHARACTERS, background + evaluation - PAPER_TRAIN_CHARACTERS


def make_split(data_dir: Path, characters: list[str], split: str, seed: int) -> dict:
    """Which characters meta-train and which meta-test, as written to split.json."""
    if split == "paper":
        # The paper's code: Python's random, seeded with the run's seed, shuffles the characters listed alphabet
        # by alphabet in sorted order; seed 0 (its default, and ours) gives the paper's own split.
        shuffled = sorted(characters, key=lambda character: character.split("/"))
        random.Random(seed).shuffle(shuffled)
        train, test = shuffled[:PAPER_TRAIN_CHARACTERS], shuffled[PAPER_TRAIN_CHARACTERS:]
    elif split == "random-1200":
        # A torch permutation of the characters in load_images' order, seeded with the run's seed: other random
        # draws of 1,200 and 423 characters than the paper's (seed 0 shares 100 meta-test characters with it).
        order = torch.randperm(len(characters), generator=torch.Generator().manual_seed(seed)).tolist()
        train = [characters[i] for i in order[:PAPER_TRAIN_CHARACTERS]]
        test = [characters[i] for i in order[PAPER_TRAIN_CHARACTERS:]]
    elif split == "background":
        background = set(read_json(data_dir / MARKER)["images_background"])
        train = [c for c in characters if c.split("/")[0] in background]
        test = [c for c in characters if c.split("/")[0] not in background]
    else:
        raise ValueError(f"unknown split {split!r}")
    return {"split": split, "seed": seed, "train_rotations": list(ROTATIONS), "train": train, "test": test}


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


def split_named_by(split_from: str, logdir: Path, split: Optional[str]) -> str:
    """--split-from: the name of the other run's split (--split, if given, must be it); a run that has characters
    must have the same ones."""
    source = read_split(split_from)
    if split is not None and split != source["split"]:
        raise UserError(f"--split {split} differs from the {source['split']} split of --split-from {split_from}; "
                        f"leave --split out")
    if (logdir / "split.json").is_file() and not same_characters(read_json(logdir / "split.json"), source):
        raise UserError(f"{logdir} was trained on other characters than those of --split-from {split_from}; leave "
                        f"--split-from out to continue this run, or choose a new logdir")
    return source["split"]


def given_split(logdir: Path, split_from: Optional[str] = None) -> Optional[dict]:
    """The run's split.json, else the split of --split-from, else None (a new split is to be drawn)."""
    if (logdir / "split.json").is_file():
        return read_json(logdir / "split.json")
    return read_split(split_from) if split_from is not None else None


def split_classes(logdir: Path, split: str, split_from: Optional[str] = None) -> tuple[int, int]:
    """(meta-train classes, meta-test classes) of the run's split, before any data."""
    given = given_split(logdir, split_from)
    if given is None:
        train, test = split_sizes(split)
        return train * len(ROTATIONS), test
    return len(given["train"]) * len(given["train_rotations"]), len(given["test"])


def load_split(logdir: Path, data_dir: Path, split: str, seed: int, device: str,
               split_from: Optional[str] = None) -> tuple["TaskSampler", "TaskSampler", dict]:
    """Meta-train and meta-test task samplers on the run's characters (split.json, else those of --split-from, else
    a new split), and the split."""
    characters, images = load_images(data_dir)
    chosen = given_split(logdir, split_from) or make_split(data_dir, characters, split, seed)
    index = {character: i for i, character in enumerate(characters)}
    missing = [c for c in chosen["train"] + chosen["test"] if c not in index]
    if missing:
        raise UserError(f"the run's split names {len(missing)} characters missing from {data_dir} "
                        f"(such as {missing[0]}); point --data at the Omniglot folder this run used")
    images = images.to(device)
    train = TaskSampler(images[[index[c] for c in chosen["train"]]], chosen["train_rotations"])
    test = TaskSampler(images[[index[c] for c in chosen["test"]]])
    return train, test, chosen


class TaskSampler:
    """Draws N-way tasks from a set of characters, each rotation of a character a class of its own: whole test tasks
    (evaluate.TaskSampler), or meta-training tasks as rows of a bank of every image (fast.Bank)."""

    def __init__(self, images: torch.Tensor, rotations: Sequence[int] = (0,)):
        self.images = images
        self.quarter_turns = [r // 90 for r in rotations]
        self.num_classes = len(images) * len(self.quarter_turns)

    def draw(self, classes: int, shots: int, queries: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The random part of `sample`: N class indices, and `shots` + `queries` distinct drawers of each."""
        if classes > self.num_classes or shots + queries > DRAWERS:
            raise ValueError(f"cannot draw {classes} classes x {shots + queries} images from "
                             f"{self.num_classes} classes x {DRAWERS} images")
        chosen = torch.randperm(self.num_classes, generator=generator)[:classes]
        drawers = torch.stack([torch.randperm(DRAWERS, generator=generator)[:shots + queries] for _ in chosen])
        return chosen, drawers

    def draw_rows(self, classes: int, shots: int, queries: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`draw` as rows of bank() and their labels 0..N-1, each (classes, shots + queries)."""
        rows = bank_rows(*self.draw(classes, shots, queries, generator))
        return rows, torch.arange(classes)[:, None].expand_as(rows)

    def sample(self, classes: int, shots: int, queries: int, generator: torch.Generator) -> TestTask:
        """N random classes labelled 0..N-1 in random order, with `shots` support and `queries` query images each."""
        chosen, drawers = self.draw(classes, shots, queries, generator)
        characters, turns = chosen // len(self.quarter_turns), chosen % len(self.quarter_turns)
        images = self.images[characters[:, None].to(self.images.device), drawers.to(self.images.device)]
        images = torch.stack([torch.rot90(class_images, self.quarter_turns[turn], dims=(-2, -1))
                              for class_images, turn in zip(images, turns.tolist())])
        images = images.unsqueeze(2)  # (classes, shots + queries, 1, 28, 28)
        labels = torch.arange(classes, device=images.device)[:, None].expand(classes, shots + queries)
        return TestTask(images[:, :shots].reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE), labels[:, :shots].reshape(-1),
                        images[:, shots:].reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE), labels[:, shots:].reshape(-1))

    def bank(self) -> torch.Tensor:
        """Every image of every class, rotated, as (classes * 20, 1, 28, 28): image d of class c is row c * 20 + d."""
        turned = torch.stack([torch.rot90(self.images, turns, dims=(-2, -1)) for turns in self.quarter_turns], dim=1)
        return turned.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)


def bank_rows(chosen: torch.Tensor, drawers: torch.Tensor) -> torch.Tensor:
    """The rows of TaskSampler.bank() holding the drawn images: (classes, images per class)."""
    return chosen[:, None] * DRAWERS + drawers
