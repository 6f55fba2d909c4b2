"""The command lines of train_omniglot.py and train_sine.py, made one way: each flag from a table (help, group,
kind, and its role in the run's args.json: what is recorded, what a resumed run must keep), and the papers' settings.
"""
import argparse
import dataclasses
import os
import textwrap
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch

import reptile
from reptile import Hyperparameters
from run_folder import RunFolder
from utils import (HelpFormatter, OneLineParser, UserError, non_negative_float, non_negative_int, positive_float,
                   positive_int)


class Flag(NamedTuple):
    """One flag of a script: its help, its group in --help, its kind (bool for a switch, OFF for a --no- switch, a
    tuple of choices, or the type of its value), its role in the run's args.json (below), and its metavar."""
    help: str
    group: str
    kind: Any
    role: str
    metavar: Optional[str] = None


OFF = "off"  # a switch spelled --no-NAME that sets NAME to False
# A flag's role says what a run's args.json does with it. model: recorded, and every later command on the run keeps it
# (the network and its characters); training: recorded, a resumed training keeps it, an evaluation may change it;
# resumed: recorded, taken back when not given, free to change (--meta-iterations may grow); record: recorded, never
# taken back (the machine's, or how the run began); now: not recorded, for this command only.
HYPERPARAMETER_FLAGS = {  # train_omniglot.py's, one for each field of reptile.Hyperparameters
    "classes": Flag("classes per task (N-way)", "task", positive_int, "model"),
    "shots": Flag("support images per class at meta-test (K-shot)", "task", positive_int, "training"),
    "train_shots": Flag("images per class in a meta-training task", "task", positive_int, "training"),
    "meta_batch": Flag("tasks per meta-iteration", "meta-training", positive_int, "training"),
    "meta_iterations": Flag("meta-iterations in all", "meta-training", positive_int, "resumed"),
    "inner_steps": Flag("inner mini-batches per meta-training task (with fomaml and maml, the last is the query)",
                        "meta-training", positive_int, "training"),
    "batch": Flag("inner mini-batch size", "meta-training", positive_int, "training"),
    "lr": Flag("inner learning rate (of Adam with betas 0, 0.999, or of SGD)", "meta-training", positive_float,
               "training"),
    "meta_lr": Flag("meta-step size at the start (the meta-optimizer's learning rate)", "meta-training",
                    positive_float, "training"),
    "meta_lr_final": Flag("meta-step size at the end (annealed linearly)", "meta-training", non_negative_float,
                          "training"),
    "algorithm": Flag("reptile: step towards the adapted weights; fomaml: first-order MAML as the Reptile paper's code "
                      "has it, step along the change made by the last inner step alone; maml: MAML's meta-gradient, "
                      "through the inner SGD steps (second order)", "meta-training", ("reptile", "fomaml", "maml"),
                      "training"),
    "first_order": Flag("with --algorithm maml: drop the second derivatives (the query loss's gradient at the adapted "
                        "weights: first-order MAML as the MAML paper defines it)", "meta-training", bool, "training"),
    "query_shots": Flag("with --algorithm fomaml or maml: the last mini-batch, the query, is this many images per "
                        "class of the task, kept apart from the earlier steps (default for fomaml: drawn like the "
                        "others)", "meta-training", positive_int, "training"),
    "inner_optimizer": Flag("the inner loop's optimizer, at meta-training and meta-test", "meta-training",
                            ("adam", "sgd"), "training"),
    "meta_optimizer": Flag("the meta-optimizer: sgd (the Reptile paper's meta-step) or adam (the MAML paper's)",
                           "meta-training", ("sgd", "adam"), "training"),
    "replacement": Flag("draw each inner mini-batch on its own (default: shuffled passes over the task's images)",
                        "meta-training", bool, "training"),
    "weight_decay": Flag("multiply the weights by this before each inner step, at meta-training and meta-test (1: "
                         "none)", "meta-training", positive_float, "training"),
    "test_iterations": Flag("inner steps on a test task", "evaluation", positive_int, "resumed"),
    "test_batch": Flag("mini-batch size on a test task", "evaluation", positive_int, "resumed"),
    "transductive": Flag("classify all queries of a task in one batch (default: each query on its own)", "evaluation",
                         bool, "resumed"),
}
# Names that changed, old: new. The old flags still work (the commands in RESULTS.md use them), and an args.json
# written before is read with the new names.
OLD_NAMES = {"iterations": "inner_steps", "fomaml_tail": "query_shots"}
# The paper's four Omniglot settings (openai/supervised-reptile's README) in this script's flags; the flags not
# named are the same in all four.
TWENTY_WAY = {"batch": 20, "inner_steps": 10, "lr": 0.0005, "meta_iterations": 200000, "test_batch": 10}
FIVE_WAY = {name: getattr(Hyperparameters, name) for name in TWENTY_WAY}
PAPER_SETTINGS = {f"{classes}way{shots}shot": {"classes": classes, "shots": shots, **flags}
                  for classes, flags in ((5, FIVE_WAY), (20, TWENTY_WAY)) for shots in (1, 5)}


def maml_setting(classes: int, shots: int, lr: float, steps: int, test_steps: int, meta_batch: int) -> dict:
    """One of the MAML paper's Omniglot settings (Finn et al. 2017, appendix A.1, and its code) in this script's
    flags: K support and K query images per class, every inner SGD step on all the support images."""
    return {"classes": classes, "shots": shots, "train_shots": 2 * shots, "query_shots": shots,
            "batch": classes * shots, "inner_steps": steps + 1, "test_batch": classes * shots,
            "test_iterations": test_steps, "lr": lr, "meta_batch": meta_batch, "meta_iterations": 60000,
            "meta_lr": 0.001, "meta_lr_final": 0.001, "algorithm": "maml", "inner_optimizer": "sgd",
            "meta_optimizer": "adam", "model": "maml", "loss": "per-shot"}


# MAML and, as the MAML paper defines it, first-order MAML: 5-way with 1 inner step of 0.4 at training and 3 at test
# and 32 tasks a meta-batch; 20-way with 5 steps of 0.1 at both and 16 tasks. Tasks side by side where `bench.py
# --maml` measured that faster on one CPU thread: 5-way 1-shot (RESULTS.md, "MAML and first-order MAML on Omniglot").
PAPER_SETTINGS.update({f"{name}-{classes}way{shots}shot": {**maml_setting(classes, shots, *steps), **first_order,
                                                           **({"side_by_side": True} if (classes, shots) == (5, 1)
                                                              else {})}
                       for classes, *steps in ((5, 0.4, 1, 3, 32), (20, 0.1, 5, 5, 16)) for shots in (1, 5)
                       for name, first_order in (("maml", {}), ("fomaml", {"first_order": True}))})
LOSSES = {"sum": reptile.summed_cross_entropy, "per-shot": reptile.per_shot_cross_entropy}
PROGRAM, SINE_PROGRAM = "reptile-omniglot", "reptile-sine"  # what marks each script's checkpoints


def folder(logdir: str) -> RunFolder:
    """The run folder of a train_omniglot.py run."""
    return RunFolder(Path(logdir), PROGRAM, "train_omniglot.py")


def sine_folder(logdir: str) -> RunFolder:
    """The run folder of a train_sine.py run."""
    return RunFolder(Path(logdir), SINE_PROGRAM, "train_sine.py")


def omniglot_flags() -> dict[str, Flag]:
    """train_omniglot.py's flags, in the order of --help and of args.json."""
    import omniglot  # here, not above: train_sine.py takes its flags from this module and no Omniglot
    return {
        "paper_setting": Flag("one of the Reptile paper's four settings, or the MAML paper's for MAML (maml-) and "
                              "first-order MAML (fomaml-): fills in the flags not given (listed below)", "task",
                              tuple(PAPER_SETTINGS), "now", "NAME"),
        **HYPERPARAMETER_FLAGS,
        "side_by_side": Flag(
            "with --algorithm maml: compute a meta-batch's meta-gradients in one computation vmapped over its tasks "
            "instead of one task after another (on CPU, faster for 5-way 1-shot, slower for 5-shot; the two agree to "
            "rounding, so a run keeps the form it began with)", "meta-training", bool, "training"),
        "model": Flag("the network: reptile, a linear layer on the last 2 x 2 x 64 map flattened (the Reptile "
                      "paper's); maml, the MAML paper's code's: on its mean over the 2 x 2 positions, from N(0, 1) "
                      "weights, with BatchNorm offsets that only the meta-update learns and no BatchNorm scales",
                      "task", ("reptile", "maml"), "model"),
        "loss": Flag("the inner loss: sum, the cross-entropy summed over a mini-batch (the Reptile paper's); per-shot, "
                     "that sum divided by the images per class (the MAML paper's)", "task", tuple(LOSSES), "model"),
        "split": Flag("paper: 1,200 characters train, 423 test, shuffled as the paper's code does (with --seed 0 the "
                      "paper's own); random-1200: as many, drawn by this project's first procedure (runs/5way, "
                      "runs/20way); background: background alphabets train, evaluation alphabets test", "task",
                      omniglot.SPLITS, "model"),
        "split_from": Flag("train on the characters of another run (its folder or its split.json) instead of drawing "
                           "them; --split takes that run's", "task", str, "record", "RUN_OR_SPLIT_JSON"),
        "eval_tasks": Flag("tasks in the final evaluation", "evaluation", positive_int, "resumed"),
        "meta_test_only": Flag("final evaluation on meta-test tasks only, in half the time (default: meta-train tasks "
                               "too)", "evaluation", bool, "resumed"),
        "eval_only": Flag("evaluate a checkpoint of the logdir, no training", "evaluation", bool, "now"),
        "eval_lake": Flag("evaluate a checkpoint on Lake et al.'s one-shot benchmark instead (20 runs of 20-way "
                          "one-shot tasks within an evaluation alphabet; needs a 20-way --split background run)",
                          "evaluation", bool, "now"),
        "checkpoint": Flag("with --eval-only or --eval-lake: the checkpoint file (default: the latest)", "evaluation",
                           str, "now"),
        "validate_every": Flag("log one meta-train and one meta-test task every this many meta-iterations", "run",
                               positive_int, "resumed"),
        "check_every": Flag("checkpoint every this many meta-iterations", "run", positive_int, "resumed"),
        "keep": Flag("checkpoints kept (the newest), besides those that results.json reports on", "run", positive_int,
                     "resumed"),
        "workers": Flag("evaluation worker processes on CPU, one thread each (ignored on CUDA)", "run",
                        non_negative_int, "record"),
        "seed": Flag("seed of the split, the initial weights and every task", "run", int, "training"),
        "device": Flag("auto: cuda when available", "run", ("auto", "cpu", "cuda"), "record"),
        "cuda_graphs": Flag("on CUDA, launch every kernel of a meta-iteration and a validation one by one instead of "
                            "replaying them as captured CUDA graphs (slower; for debugging and comparison)", "run", OFF,
                            "record"),
        "data": Flag("Omniglot folder (downloaded and extracted when missing)", "run", str, "resumed"),
        "omniglot_mirror": Flag(f"folder holding the two Omniglot zips, used instead of the network (default: "
                                f"${omniglot.MIRROR_VARIABLE})", "run", str, "resumed"),
    }


OMNIGLOT_DEFAULTS = {**{field.name: field.default for field in dataclasses.fields(Hyperparameters)},
                     "model": "reptile", "loss": "sum", "split": "paper", "eval_tasks": 10000, "validate_every": 10,
                     "check_every": 1000, "keep": 3, "workers": len(os.sched_getaffinity(0)), "seed": 0,
                     "device": "auto", "data": "omniglot"}


def add_flags(parser: argparse.ArgumentParser, flags: dict[str, Flag], defaults: dict) -> None:
    """Add each flag of a table to its argument group, with its default from `defaults` (none if missing) and its old
    spelling (OLD_NAMES) beside it."""
    groups = {}
    for name, (help, group, kind, _, metavar) in flags.items():
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        spellings = [flag(name)] + [flag(old) for old, new in OLD_NAMES.items() if new == name]
        if kind is bool:
            groups[group].add_argument(*spellings, action="store_true", help=help)
        elif kind == OFF:
            groups[group].add_argument(flag("no_" + name), dest=name, action="store_false", help=help)
        elif isinstance(kind, tuple):
            groups[group].add_argument(*spellings, choices=kind, default=defaults.get(name), metavar=metavar,
                                       help=help)
        else:
            groups[group].add_argument(*spellings, type=kind, default=defaults.get(name), metavar=metavar, help=help)


def with_roles(flags: dict[str, Flag], *roles: str) -> list[str]:
    """The names of the flags that have one of these roles, in the table's order."""
    return [name for name, each in flags.items() if each.role in roles]


def take_saved_args(args: argparse.Namespace, saved: dict, given: set[str], fixed: list[str], path: Path) -> None:
    """A run goes on with its args.json (`saved`, read from `path`) as it is: a flag not given takes the saved value,
    and a flag in `fixed` that is given must equal it (else a UserError says so in one line)."""
    for name, value in saved.items():
        if name not in given:
            setattr(args, name, value)
        elif name in fixed and getattr(args, name) != value:
            raise UserError(f"{flag(name)} {getattr(args, name)} differs from {value} in {path}; leave it out to "
                            f"continue this run, or choose a new logdir")


def build_parser() -> argparse.ArgumentParser:
    """The command line; the defaults are the paper's 5-way 5-shot Omniglot setting."""
    parser = OneLineParser(prog="train_omniglot.py", description="Meta-train Reptile on Omniglot, then "
                           "evaluate it on meta-test characters.", allow_abbrev=False,
                           formatter_class=HelpFormatter, epilog=paper_settings_listing())
    parser.add_argument("logdir", nargs="?", help="run folder for TensorBoard events, checkpoints and results "
                        "(default: runs/<classes>way<shots>shot)")
    add_flags(parser, omniglot_flags(), OMNIGLOT_DEFAULTS)
    return parser


def paper_settings_listing() -> str:
    """The flags that each --paper-setting fills in, for the end of --help."""
    lines = ["--paper-setting NAME fills in these flags where they are not given:"]
    for name, flags in PAPER_SETTINGS.items():
        words = " ".join(flag(key) if value is True else f"{flag(key)} {value}" for key, value in flags.items())
        lines += textwrap.wrap(words, 110, initial_indent=f"  {name:18}", subsequent_indent=" " * 20,
                               break_on_hyphens=False)
    return "\n".join(lines)


def flags_given(argv: list[str], build: Callable[[], argparse.ArgumentParser] = build_parser) -> set[str]:
    """The destinations of the flags written on the command line: argv parsed again into a namespace whose every
    attribute is a marker, which argparse replaces only where argv gives a value (it fills in defaults elsewhere)."""
    parser, unset = build(), object()
    parsed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset)))
    return {name for name, value in vars(parsed).items() if value is not unset}


def flag(name: str) -> str:
    """The command-line spelling of an argument's destination."""
    return "--" + name.replace("_", "-")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags from the command line (--paper-setting fills in those not given); args.json fills in the rest."""
    import omniglot  # here, not above: train_sine.py takes its flags from this module and no Omniglot
    parser = build_parser()
    args = parser.parse_args(argv)
    args.eval_only = args.eval_only or args.eval_lake
    given = flags_given(argv)
    for name, value in PAPER_SETTINGS.get(args.paper_setting, {}).items():
        if name not in given:
            setattr(args, name, value)
            given.add(name)
    args.logdir = args.logdir or f"runs/{args.paper_setting or f'{args.classes}way{args.shots}shot'}"
    if Path(args.logdir).exists() and not Path(args.logdir).is_dir():
        raise UserError(f"the run folder {args.logdir} is a file; give a folder (a new one, or an earlier run's)")
    if args.split_from is not None:
        args.split = omniglot.split_named_by(args.split_from, Path(args.logdir),
                                             args.split if "split" in given else None)
        given.add("split")
    if (saved := folder(args.logdir).saved_args()) is not None:
        saved = {OLD_NAMES.get(name, name): value for name, value in saved.items()}
        flags = omniglot_flags()
        fixed = with_roles(flags, "model", *([] if args.eval_only else ["training"]))
        # A training flag missing from args.json came after the run was made, which trained with its default.
        saved = {**{name: parser.get_default(name) for name in fixed}, **saved}
        taken = with_roles(flags, "model", "training", "resumed")
        take_saved_args(args, {name: value for name, value in saved.items() if name in taken}, given, fixed,
                        Path(args.logdir) / "args.json")
    if args.shots + 1 > omniglot.DRAWERS:
        raise UserError(f"--shots {args.shots} leaves no query image: a character has {omniglot.DRAWERS} drawings, "
                        f"so --shots can be at most {omniglot.DRAWERS - 1}")
    if args.train_shots > omniglot.DRAWERS:
        raise UserError(f"--train-shots {args.train_shots} exceeds the {omniglot.DRAWERS} drawings of a character")
    if args.query_shots is not None and args.algorithm == "reptile":
        raise UserError("--query-shots needs --algorithm fomaml or maml")
    if args.first_order and args.algorithm != "maml":
        raise UserError("--first-order goes with --algorithm maml (--algorithm fomaml is the Reptile paper's "
                        "first-order MAML)")
    if args.side_by_side and args.algorithm != "maml":
        raise UserError("--side-by-side goes with --algorithm maml (the other algorithms adapt one task at a time)")
    if args.algorithm == "maml":
        if (args.inner_optimizer != "sgd" or args.weight_decay != 1.0 or args.query_shots is None
                or args.inner_steps < 2):
            raise UserError("--algorithm maml differentiates through inner SGD steps on the support images and "
                            "takes the query loss on --query-shots images per class: give --inner-optimizer sgd, "
                            "--query-shots K, --inner-steps of at least 2 (the inner steps and the query) and no "
                            "--weight-decay")
    if args.query_shots is not None and args.query_shots >= args.train_shots:
        raise UserError(f"--query-shots {args.query_shots} leaves no image per class for the earlier inner steps; "
                        f"it must be below --train-shots {args.train_shots}")
    for images, batch, name in ((args.classes * (args.train_shots - (args.query_shots or 0)), args.batch, "--batch"),
                                (args.classes * args.shots, args.test_batch, "--test-batch")):
        if args.replacement and batch > images:
            raise UserError(f"{name} {batch} exceeds the {images} images a mini-batch is drawn from; with "
                            f"--replacement no image appears twice in one, so use at most {images}")
    train_classes, test_classes = omniglot.split_classes(Path(args.logdir), args.split, args.split_from)
    for classes, name in ((train_classes, "meta-train"), (test_classes, "meta-test")):
        if args.classes > classes:
            raise UserError(f"--classes {args.classes} exceeds the {classes} {name} classes of the {args.split} split")
    if not args.eval_only:
        folder(args.logdir).refuse_fewer_iterations(args.meta_iterations)
    if args.checkpoint and not args.eval_only:
        raise UserError("--checkpoint needs --eval-only or --eval-lake (training always resumes from the latest "
                        "checkpoint)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here; use --device cpu")
    return args


def preset(setting: str) -> tuple[Hyperparameters, dict]:
    """A --paper-setting's hyperparameters (the defaults where it names none) and its other flags (model, loss,
    side_by_side), for code that runs it without the command line."""
    flags, fields = PAPER_SETTINGS[setting], {field.name for field in dataclasses.fields(Hyperparameters)}
    return (Hyperparameters(**{name: value for name, value in flags.items() if name in fields}),
            {"model": OMNIGLOT_DEFAULTS["model"], "loss": OMNIGLOT_DEFAULTS["loss"], "side_by_side": False,
             **{name: value for name, value in flags.items() if name not in fields}})


def hyperparameters(args: argparse.Namespace) -> Hyperparameters:
    """The run's hyperparameters, for reptile.py."""
    return Hyperparameters(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Hyperparameters)})


def saved_args(args: argparse.Namespace) -> dict:
    """The settings of a run, as written to args.json."""
    flags = omniglot_flags()
    recorded = set(flags) - set(with_roles(flags, "now"))
    return {name: value for name, value in vars(args).items() if name in recorded}


# ----------------------------------------------------------------------------- train_sine.py

SINE_FLAGS = {
    "algorithm": Flag("reptile; fomaml: first-order MAML (as on Omniglot: the change made by the last inner step); "
                      "maml: its meta-gradient through the inner steps (second order); joint: one network trained by "
                      "SGD on the points of all training waves, a baseline; random: no training, a baseline",
                      "training", ("reptile", "fomaml", "maml", "joint", "random"), "training"),
    "activation": Flag("tanh (the authors' demonstration) or ReLU (the paper's figure)", "training", ("tanh", "relu"),
                       "training"),
    "hidden": Flag("units in each of the two hidden layers", "training", positive_int, "training"),
    "meta_iterations": Flag("meta-iterations in all", "training", positive_int, "resumed"),
    "meta_batch": Flag("waves per meta-iteration", "training", positive_int, "training"),
    "meta_lr": Flag("meta-step size at the start, annealed linearly to 0", "training", positive_float, "training"),
    "lr": Flag("SGD step size of the inner loop, at training and on held-out waves (and of joint training)",
               "training", positive_float, "training"),
    "points": Flag("points of each training wave", "training", positive_int, "training"),
    "batch": Flag("inner mini-batch size", "training", positive_int, "training"),
    "inner_steps": Flag("inner steps per training wave (shuffled passes over its points); MAML and first-order MAML "
                        "take the last one's batch as their query", "training", positive_int, "training"),
    "seed": Flag("seed of the initialization and training waves", "training", non_negative_int, "training"),
    "shots": Flag("points of a held-out wave to fit", "evaluation and logging", positive_int, "now"),
    "eval_waves": Flag("held-out waves to score", "evaluation and logging", positive_int, "now"),
    "eval_seed": Flag("seed of the held-out waves", "evaluation and logging", non_negative_int, "now"),
    "validate_every": Flag("meta-iterations between two logged validation errors (the mean over the validation waves "
                           "after 32 steps)", "evaluation and logging", positive_int, "now"),
    "check_every": Flag("meta-iterations between checkpoints", "evaluation and logging", positive_int, "now"),
    "eval_only": Flag("evaluate the run's latest checkpoint (or --checkpoint) and record it in results.json",
                      "evaluation and logging", bool, "now"),
    "checkpoint": Flag("with --eval-only: the checkpoint file to evaluate", "evaluation and logging", str, "now"),
    "figure": Flag("draw the paper's Figure 1 from the runs given as logdirs (a held-out wave of --eval-seed) and "
                   "stop", "evaluation and logging", str, "now", "PNG"),
}
SINE_DEFAULTS = {"algorithm": "reptile", "activation": "tanh", "hidden": 64, "meta_iterations": 30000, "meta_batch": 1,
                 "meta_lr": 0.1, "lr": 0.02, "points": 50, "batch": 10, "inner_steps": 5, "seed": 0, "shots": 10,
                 "eval_waves": 1000, "eval_seed": 0, "validate_every": 500, "check_every": 1000}


def build_sine_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="train_sine.py", description="Few-shot sine-wave regression, the Reptile paper's "
                           "Figure 1.", allow_abbrev=False, formatter_class=HelpFormatter)
    parser.add_argument("logdir", nargs="*", help="the run folder (default: runs/sine-ALGORITHM, with -relu for "
                        "--activation relu); several with --figure")
    add_flags(parser, SINE_FLAGS, SINE_DEFAULTS)
    return parser


def sine_settings(args: argparse.Namespace) -> dict:
    """What a train_sine.py run's args.json holds: the flags that fix what it learns, and --meta-iterations."""
    now = with_roles(SINE_FLAGS, "now")
    return {name: getattr(args, name) for name in SINE_FLAGS if name not in now}


def parse_sine_args(argv: list[str]) -> argparse.Namespace:
    """train_sine.py's flags; a run that has an args.json goes on with it (take_saved_args)."""
    args = build_sine_parser().parse_args(argv)
    if args.figure:
        if not args.logdir:
            raise UserError("--figure: name the runs to draw, e.g. runs/sine-maml runs/sine-reptile")
        return args
    if len(args.logdir) > 1:
        raise UserError("give one logdir (several only with --figure)")
    if args.checkpoint and not args.eval_only:
        raise UserError("--checkpoint goes with --eval-only")
    args.logdir = args.logdir[0] if args.logdir else \
        f"runs/sine-{args.algorithm}{'-relu' if args.activation == 'relu' else ''}"
    saved = sine_folder(args.logdir).saved_args()
    if saved is not None and not args.eval_only:
        take_saved_args(args, saved, flags_given(argv, build_sine_parser), with_roles(SINE_FLAGS, "training"),
                        Path(args.logdir) / "args.json")
    return args
