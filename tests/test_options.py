"""options.py: what a run's args.json does with each flag of both scripts, checked through their parsers."""
import json
import re

import pytest

import options
from utils import UserError

# Written out here, not read from options.py: what changes what a run learns (a resumed training must keep it), and
# of those, what fixes its network and characters (every later command must keep it).
OMNIGLOT_KEPT_BY_TRAINING = {"shots", "train_shots", "meta_batch", "inner_steps", "batch", "lr", "meta_lr",
                             "meta_lr_final", "algorithm", "first_order", "query_shots", "inner_optimizer",
                             "meta_optimizer", "replacement", "weight_decay", "side_by_side", "seed"}
OMNIGLOT_KEPT_ALWAYS = {"classes", "split", "model", "loss"}
OMNIGLOT_NEVER_TAKEN_BACK = {"workers", "device", "cuda_graphs", "split_from"}  # the machine's, or how a run began
SINE_KEPT_BY_TRAINING = {"algorithm", "activation", "hidden", "meta_batch", "meta_lr", "lr", "points", "batch",
                         "inner_steps", "seed"}


def other_value(parser, name: str) -> list[str]:
    """Command-line words that give flag `name` a valid value other than its default."""
    spelled = options.flag(name)
    default = parser.get_default(name)
    choices = {"split": "background", "model": "maml", "loss": "per-shot", "algorithm": "fomaml",
               "inner_optimizer": "sgd", "meta_optimizer": "adam", "activation": "relu"}
    if name in choices:
        return [spelled, choices[name]]
    if isinstance(default, bool):
        return [spelled]
    return [spelled, str(1 if default is None else default + 1)]


def saved_run(tmp_path, settings: dict) -> str:
    """A run folder whose args.json holds `settings`."""
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / "args.json").write_text(json.dumps(settings))
    return str(logdir)


def test_a_resumed_omniglot_run_refuses_exactly_the_flags_that_change_what_it_learns(tmp_path):
    logdir = saved_run(tmp_path, options.saved_args(options.parse_args([str(tmp_path / "new")])))
    parser = options.build_parser()
    for name in OMNIGLOT_KEPT_BY_TRAINING | OMNIGLOT_KEPT_ALWAYS:
        with pytest.raises(UserError, match=f"^{options.flag(name)} .* differs from"):
            options.parse_args([logdir, *other_value(parser, name)])
    for name in ("meta_iterations", "test_iterations", "test_batch", "transductive", "eval_tasks", "validate_every",
                 "check_every", "keep", "workers"):
        assert getattr(options.parse_args([logdir, *other_value(parser, name)]), name) != parser.get_default(name)


def test_an_evaluation_keeps_the_network_and_characters_and_may_change_the_rest(tmp_path):
    logdir = saved_run(tmp_path, options.saved_args(options.parse_args([str(tmp_path / "new")])))
    parser = options.build_parser()
    for name in OMNIGLOT_KEPT_ALWAYS:
        with pytest.raises(UserError, match=f"^{options.flag(name)} .* differs from"):
            options.parse_args([logdir, "--eval-only", *other_value(parser, name)])
    for name in OMNIGLOT_KEPT_BY_TRAINING - {"first_order", "query_shots", "side_by_side"}:  # those need maml
        words = other_value(parser, name)
        assert getattr(options.parse_args([logdir, "--eval-only", *words]), name) != parser.get_default(name), name


def test_args_json_fills_in_what_is_not_given_except_what_belongs_to_the_machine(tmp_path):
    parser = options.build_parser()
    changed = {name: options.parse_args([str(tmp_path / "new"), *other_value(parser, name)])
               for name in ("test_iterations", "eval_tasks", "workers", "seed", "classes")}
    logdir = saved_run(tmp_path, {**options.saved_args(options.parse_args([str(tmp_path / "new")])),
                                  **{name: getattr(args, name) for name, args in changed.items()},
                                  "device": "cpu", "cuda_graphs": False})
    resumed = options.parse_args([logdir])
    for name in changed:
        assert (getattr(resumed, name) == parser.get_default(name)) == (name in OMNIGLOT_NEVER_TAKEN_BACK), name
    assert resumed.device == "auto" and resumed.cuda_graphs is True
    assert not {"logdir", "eval_only", "eval_lake", "checkpoint", "paper_setting"} & set(options.saved_args(resumed))


def test_a_resumed_sine_run_refuses_exactly_the_flags_that_change_what_it_learns(tmp_path):
    parser = options.build_sine_parser()
    logdir = saved_run(tmp_path, options.sine_settings(parser.parse_args([])))
    for name in SINE_KEPT_BY_TRAINING:
        with pytest.raises(UserError, match=f"^{options.flag(name)} .* differs from"):
            options.parse_sine_args([logdir, *other_value(parser, name)])
    for name in ("meta_iterations", "shots", "eval_waves", "eval_seed", "validate_every", "check_every"):
        assert getattr(options.parse_sine_args([logdir, *other_value(parser, name)]), name) != \
            parser.get_default(name)
    assert set(options.sine_settings(parser.parse_args([]))) == SINE_KEPT_BY_TRAINING | {"meta_iterations"}


def test_a_preset_outside_the_command_line_is_what_the_command_line_makes_of_it(tmp_path):
    for setting in options.PAPER_SETTINGS:
        args = options.parse_args([str(tmp_path / setting), "--paper-setting", setting])
        hp, flags = options.preset(setting)
        assert hp == options.hyperparameters(args), setting
        assert flags == {name: getattr(args, name) for name in ("model", "loss", "side_by_side")}, setting


def test_help_lists_for_each_paper_setting_the_flags_that_make_the_same_run(tmp_path):
    listing = options.build_parser().format_help().split("fills in these flags where they are not given:\n")[1]
    written = dict(re.findall(r"^  (\S+) +(.+(?:\n {20}.+)*)", listing, re.M))
    assert list(written) == list(options.PAPER_SETTINGS)
    for setting, flags in written.items():
        logdir = str(tmp_path / setting)
        assert vars(options.parse_args([logdir, *flags.split()])) == \
            {**vars(options.parse_args([logdir, "--paper-setting", setting])), "paper_setting": None}, setting
