"""Lake et al.'s one-shot benchmark (Science 2015): 20 runs, each a 20-way one-shot problem whose classes all come
from one evaluation alphabet of Omniglot; reading its all_runs.zip and scoring a meta-trained model on it.
"""
import os
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import evaluate
import omniglot
import reptile
from reptile import TestTask
from utils import UserError, confidence_interval, read_json

URL = omniglot.URL + "one-shot-classification/" + omniglot.LAKE_ARCHIVE
MD5 = "e8996daecdf12afeeb4a53a179f06b19"
MODES = ("non-transductive", "transductive")
REPEATS = 10  # adaptations to each run, each with its own mini-batch order


def load_runs(data_dir: Path, mirror: Optional[str] = None) -> dict[str, TestTask]:
    """Lake et al.'s one-shot runs as {'runNN': Task}, from the mirror's all_runs.zip or one downloaded to data_dir."""
    # Support images: one per class, labelled in file order (class01 is 0); queries: labelled by class_labels.txt.
    mirror = mirror or os.environ.get(omniglot.MIRROR_VARIABLE)
    archive, _ = omniglot.fetch_archive(URL, MD5, Path(data_dir), mirror)
    problem = f"{archive} is not laid out as Lake's all_runs.zip (runNN/training, runNN/test, runNN/class_labels.txt)"
    try:
        with zipfile.ZipFile(archive) as zip_file:
            def read(name: str) -> torch.Tensor:
                with zip_file.open(name) as file:
                    image = omniglot.read_image(f"{archive}:{name}", file)
                    return torch.as_tensor(image, dtype=torch.get_default_dtype())[None]  # float64 in tests/test_frozen

            names = set(zip_file.namelist())
            runs = {}
            for run in sorted({name.split("/")[0] for name in names if name.endswith("/class_labels.txt")}):
                classes = sorted(n for n in names if n.startswith(f"{run}/training/") and n.endswith(".png"))
                pairs = [line.split() for line in zip_file.read(f"{run}/class_labels.txt").decode().splitlines()
                         if line.strip()]
                if not classes or any(len(pair) != 2 or pair[0] not in names or pair[1] not in classes
                                      for pair in pairs):
                    raise UserError(f"{problem}: {run} does not match its class_labels.txt")
                runs[run] = TestTask(torch.stack([read(name) for name in classes]), torch.arange(len(classes)),
                                     torch.stack([read(test) for test, _ in pairs]),
                                     torch.tensor([classes.index(label) for _, label in pairs]))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as error:
        raise UserError(f"{archive} is damaged ({error}); replace it with a good copy of {URL}") from None
    if not runs:
        raise UserError(problem)
    return runs


def benchmark(meta_model: torch.nn.Module, inner_state: dict, split: dict, data_dir: Path, mirror: Optional[str],
              hp: reptile.Hyperparameters, seeds: list[int], logdir: str, iteration: int) -> dict:
    """Check that the run may be scored, score it, print the table and return its figures for results.json."""
    evaluation_alphabets = set(read_json(data_dir / omniglot.MARKER)["images_evaluation"])
    seen = [c for c in split["train"] if c.split("/")[0] in evaluation_alphabets]
    if seen:
        raise UserError(f"--eval-lake: {logdir} was meta-trained on {len(seen)} characters of the evaluation "
                        f"alphabets (such as {seen[0]}), where Lake's benchmark tests; evaluate a run trained with "
                        f"--split background")
    runs = load_runs(data_dir, mirror)
    sizes = {len(task.support_targets) for task in runs.values()}
    if sizes != {hp.classes}:
        raise UserError(f"--eval-lake: the benchmark's runs are {'/'.join(map(str, sizes))}-way and {logdir} "
                        f"is {hp.classes}-way; evaluate a run trained with --classes {min(sizes)}")
    return report(error_rates(meta_model, inner_state, runs, hp, seeds), runs, iteration)


def error_rates(meta_model: torch.nn.Module, inner_state: dict, runs: dict[str, TestTask],
                hp: reptile.Hyperparameters, seeds: list[int]) -> dict[str, np.ndarray]:
    """{mode: error rate in % of each run (rows) after each adaptation (columns, one per seed)}."""
    scorer = evaluate.TestTaskScorer(meta_model, inner_state, hp)
    errors = {mode: np.zeros((len(runs), len(seeds))) for mode in MODES}
    with tqdm(total=len(runs) * len(seeds), desc="Lake's runs", unit="task", leave=False) as bar:
        for index, task in enumerate(runs.values()):
            queries = len(task.query_targets)
            for repeat, seed in enumerate(seeds):
                generator = torch.Generator().manual_seed(seed)
                scorer.hold([task], evaluate.test_batches(hp, len(task.support_targets), generator)[None])
                scorer.adapt()
                for mode in errors:
                    correct, _ = scorer.score(mode == "transductive")
                    errors[mode][index, repeat] = 100 * (queries - correct.item()) / queries
                bar.update()
    return errors


def report(errors: dict[str, np.ndarray], runs: dict[str, TestTask], iteration: int) -> dict:
    """Print each run's error rate (+- its standard deviation over adaptations) and their mean with its 95% interval
    over the runs; return them."""
    repeats = len(next(iter(errors.values()))[0])
    print(f"Lake et al.'s one-shot benchmark, meta-iteration {iteration}: error rate in %; each run's mean +- standard "
          f"deviation over {repeats} adaptations, and the mean over the runs +- its 95% confidence interval")
    print(f"{'run':8}{'non-transductive':>20}{'transductive':>20}")
    for index, run in enumerate(runs):
        print(f"{run:8}" + "".join(f"{errors[mode][index].mean():>12.1f} +- {errors[mode][index].std():4.1f}"
                                   for mode in MODES))
    figures = {mode: {"error": table.mean(), "ci95": confidence_interval(table.mean(axis=1)),
                      "std": table.mean(axis=0).std(), "runs": dict(zip(runs, table.mean(axis=1).tolist()))}
               for mode, table in errors.items()}
    print(f"{'mean':8}" + "".join(f"{figures[mode]['error']:>12.2f} +- {figures[mode]['ci95']:4.2f}" for mode in MODES))
    return figures
