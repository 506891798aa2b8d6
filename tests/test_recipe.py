"""--recipe {spec,tuned} on train_ssl.py, fine_tune.py and benchmarks/label_efficiency.py: the values each
recipe resolves to, explicit flags winning in every spelling, the sources in the settings file, the recipe
in the checkpoint, and --resume refusing a recipe that changes what RESUME_KEYS protects."""
import argparse
import json
import os
import sys

import pytest
import torch

import fine_tune
import train_ssl
import utils
from tiny_data import write_tiny_dataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import distributed  # noqa: E402
import label_efficiency  # noqa: E402

# written out here, not read from the scripts: the measured recipe of benchmarks/label_efficiency.py
TUNED_SSL = {"optimizer": "lars", "lr": 1.2, "batch_size": 64, "temperature": 0.2, "crop_min_scale": 0.3,
             "rotation": 0.0, "jitter": 0.3, "gamma": 0.35, "warmup_epochs": 10}
TUNED_FT = {"lr": 1e-3, "batch_size": 32, "encoder_lr_scale": 0.1, "rotation_fill": "reflection", "num_steps": 200}


@pytest.mark.parametrize("script", [train_ssl, fine_tune])
def test_spec_is_the_parsers_defaults_untouched(script):
    parser = script.get_args_parser()
    for argv in ([], ["--recipe", "spec"]):
        args = parser.parse_args(argv)
        for action in parser._actions:
            if action.default is not argparse.SUPPRESS:
                assert getattr(args, action.dest) == action.default, action.dest
        assert set(args.value_sources.values()) == {"default"}


@pytest.mark.parametrize("script, tuned", [(train_ssl, TUNED_SSL), (fine_tune, TUNED_FT)])
def test_tuned_resolves_the_benchmarks_values(script, tuned):
    args = script.get_args_parser().parse_args(["--recipe", "tuned"])
    assert {k: getattr(args, k) for k in tuned} == tuned
    assert {k: args.value_sources[k] for k in tuned} == {k: "recipe tuned" for k in tuned}
    # and the flags that --num_steps and --frozen_steps set (a from-scratch run: nothing to freeze)
    assert set(args.value_sources) - set(tuned) <= {"frozen_steps", "num_epochs", "freeze_encoder",
                                                    "unfreeze_after_epoch"}
    assert args.recipe == "tuned"


@pytest.mark.parametrize("argv, flag, value", [(["--lr", "0.5"], "lr", 0.5), (["--lr=0.5"], "lr", 0.5),
                                               (["--temp", "0.4"], "temperature", 0.4),      # an abbreviation
                                               (["--lr", "1.2"], "lr", 1.2)])   # the recipe's value, given: a flag
def test_an_explicit_flag_wins_over_the_recipe_in_any_spelling(argv, flag, value):
    args = train_ssl.get_args_parser().parse_args(["--recipe=tuned", *argv, "--num_epochs", "30"])
    assert getattr(args, flag) == value and args.value_sources[flag] == "flag"
    assert args.optimizer == "lars" and args.value_sources["optimizer"] == "recipe tuned"
    assert args.warmup_epochs == 3                      # the recipe's rule sees the given --num_epochs
    spec = train_ssl.get_args_parser().parse_args(argv)
    assert getattr(spec, flag) == value and spec.value_sources[flag] == "flag" and spec.optimizer == "adam"


def test_tuned_counts_fine_tuning_in_steps_unless_epochs_are_given():
    parser = fine_tune.get_args_parser()
    given = parser.parse_args(["--recipe", "tuned", "--num_epochs", "7"])
    assert given.num_steps == 0 and given.num_epochs == 7 and given.value_sources["num_steps"].startswith("default")
    args = parser.parse_args(["--recipe", "tuned"])
    fine_tune.resolve_num_epochs(args, 3)               # 200 steps at 3 a epoch: 67 epochs (rounded up)
    assert args.num_epochs == 67 and args.value_sources["num_epochs"] == "--num_steps 200 at 3 step(s) per epoch"
    fine_tune.resolve_num_epochs(given, 3)              # --num_steps 0: --num_epochs stands
    assert given.num_epochs == 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"), n=24, size=32)


def test_settings_record_sources_checkpoint_the_recipe_and_resume_refuses_another(tiny, tmp_path, capsys):
    argv = ["--data_dir", tiny, "--output_dir", str(tmp_path), "--image_size", "32", "--num_epochs", "1",
            "--device", "cpu", "--recipe", "tuned", "--batch_size", "12"]
    train_ssl.main(train_ssl.get_args_parser().parse_args(argv))
    settings = json.load(open(tmp_path / "ssl_settings.json"))
    assert settings["recipe"] == "tuned" and settings["optimizer"] == "lars"
    assert settings["value_sources"]["batch_size"] == "flag"
    assert settings["value_sources"]["temperature"] == "recipe tuned"
    assert "value_sources" in capsys.readouterr().out                # the printed settings show them too
    ckpt = torch.load(tmp_path / "last_ssl_checkpoint.pth", weights_only=True)
    assert ckpt["args"]["recipe"] == "tuned"
    spec = train_ssl.get_args_parser().parse_args(argv[:-4] + ["--batch_size", "12", "--num_epochs", "2", "--resume"])
    with pytest.raises(utils.UserError, match=r"--optimizer lars, now --optimizer adam \(that run used --recipe "
                                              r"tuned, this one --recipe spec\)"):
        train_ssl.main(spec)


def test_fine_tune_tuned_trains_the_steps_asked_for(tiny, tmp_path):
    argv = ["--data_dir", tiny, "--label_file", os.path.join(tiny, "labels.csv"), "--output_dir", str(tmp_path),
            "--image_size", "32", "--batch_size", "4", "--device", "cpu", "--recipe", "tuned", "--num_steps", "5"]
    fine_tune.main(fine_tune.get_args_parser().parse_args(argv))    # 16 train images, 4 a batch: 4 steps an epoch
    settings = json.load(open(tmp_path / "baseline_settings.json"))
    assert settings["num_epochs"] == 2 and settings["value_sources"]["num_steps"] == "flag"
    assert settings["value_sources"]["num_epochs"] == "--num_steps 5 at 4 step(s) per epoch"
    assert settings["rotation_fill"] == "reflection" and settings["value_sources"]["rotation_fill"] == "recipe tuned"
    again = fine_tune.get_args_parser().parse_args(argv)          # the same command again is not "another run",
    fine_tune.refuse_replacing_another_run(again, None, distributed.Dist(False, 0, 1, True, torch.device("cpu")))
    other = fine_tune.get_args_parser().parse_args(argv[:-1] + ["6"])      # though its epochs are not known yet
    with pytest.raises(utils.UserError, match="--num_steps 5 then, 6 now"):
        fine_tune.refuse_replacing_another_run(other, None, distributed.Dist(False, 0, 1, True, torch.device("cpu")))


def test_benchmark_passes_its_recipe_and_only_the_values_it_was_given():
    parse = label_efficiency.get_args_parser().parse_args
    assert label_efficiency.recipe_argv(parse([]), {"ssl"}) == ["--recipe", "tuned"]
    spec = parse(["--recipe", "spec", "--ssl_lr", "0.5", "--encoder_lr_scale", "0.1"])
    assert label_efficiency.recipe_argv(spec, {"ssl"}) == ["--recipe", "spec", "--lr", "0.5"]
    assert label_efficiency.recipe_argv(spec, {"ft"}) == ["--recipe", "spec"]                # scratch runs
    assert label_efficiency.recipe_argv(spec, {"ft", "ft_ssl"}) == ["--recipe", "spec", "--encoder_lr_scale", "0.1"]
    ssl = train_ssl.get_args_parser().parse_args(label_efficiency.recipe_argv(spec, {"ssl"}))
    assert (ssl.lr, ssl.optimizer, ssl.temperature) == (0.5, "adam", 0.5)   # spec: the scripts' defaults


def test_tuned_freezes_an_ssl_encoder_for_the_first_half_of_the_steps():
    parser = fine_tune.get_args_parser()
    args = parser.parse_args(["--recipe", "tuned", "--ssl_checkpoint", "ssl.pth"])
    assert args.frozen_steps == 100 and args.value_sources["frozen_steps"] == "recipe tuned"
    fine_tune.resolve_num_epochs(args, 3)               # 200 steps at 3 an epoch: 67 epochs, the first 34 frozen
    assert (args.num_epochs, args.freeze_encoder, args.unfreeze_after_epoch) == (67, True, 34)
    assert args.value_sources["unfreeze_after_epoch"] == "--frozen_steps 100 at 3 step(s) per epoch"
    scratch = parser.parse_args(["--recipe", "tuned"])  # a from-scratch run has nothing to freeze
    fine_tune.resolve_num_epochs(scratch, 3)
    assert scratch.frozen_steps == 0 and not scratch.freeze_encoder
    given = parser.parse_args(["--recipe", "tuned", "--ssl_checkpoint", "ssl.pth", "--freeze_encoder",
                               "--unfreeze_after_epoch", "5"])   # freezing given by hand wins
    fine_tune.resolve_num_epochs(given, 3)
    assert given.frozen_steps == 0 and given.unfreeze_after_epoch == 5


def test_tuned_with_adam_keeps_adams_learning_rate_not_larss():
    """LARS's 1.2 would make AdamW diverge: the tuned learning rate follows the optimizer actually used."""
    args = train_ssl.get_args_parser().parse_args(["--recipe", "tuned", "--optimizer", "adam"])
    assert args.optimizer == "adam" and args.lr == 3e-4
    assert args.value_sources["lr"] == "default (recipe tuned leaves it here)"
    assert train_ssl.get_args_parser().parse_args(["--recipe", "tuned"]).lr == 1.2


@pytest.mark.parametrize("argv, message", [
    (["--num_epochs", "5", "--num_steps", "100"], r"--num_steps 100 sets --num_epochs, which was also given \(--num_epochs 5\)"),
    (["--recipe", "tuned", "--num_steps=100", "--num_e", "5"], r"--num_steps 100 sets --num_epochs"),  # any spelling
    (["--frozen_steps", "4", "--unfreeze_after_epoch", "2"], r"--frozen_steps 4 sets --unfreeze_after_epoch"),
    (["--frozen_steps", "4", "--freeze_encoder"], r"--frozen_steps 4 sets --freeze_encoder, which was also given "
                                                  r"\(--freeze_encoder\)"),
])
def test_a_flag_and_a_flag_that_sets_it_both_given_are_refused(argv, message):
    args = fine_tune.get_args_parser().parse_args(["--data_dir", ".", "--label_file", __file__, *argv])
    with pytest.raises(utils.UserError, match=message):
        fine_tune.check_args(args)


@pytest.mark.parametrize("argv", [["--num_epochs", "5", "--num_steps", "0"], ["--num_steps", "9"],
                                  ["--recipe", "tuned", "--num_epochs", "5"], ["--frozen_steps", "0", "--freeze_encoder"]])
def test_a_setter_at_zero_or_alone_is_no_contradiction(argv):
    args = fine_tune.get_args_parser().parse_args(["--data_dir", ".", "--label_file", __file__, *argv])
    fine_tune.check_args(args)
    assert args.value_sources["num_epochs"] == ("flag" if "--num_epochs" in argv else "default")


def test_frozen_steps_that_cover_every_epoch_are_refused_naming_where_they_came_from():
    args = fine_tune.get_args_parser().parse_args(["--recipe", "tuned", "--ssl_checkpoint", "ssl.pth"])
    with pytest.raises(utils.UserError, match=r"--frozen_steps 100 \(recipe tuned\) covers all 1 epoch\(s\) of 300 "
                                              r"step\(s\): the encoder would never train; lower --frozen_steps or "
                                              r"raise --num_steps"):
        fine_tune.resolve_num_epochs(args, 300)          # a large labelled set: 200 and 100 steps both round to 1


@pytest.mark.parametrize("argv, note", [(["--num_epochs", "5"], "--warmup_epochs 10 (default) is not below --num_epochs 5"),
                                        (["--num_epochs", "5", "--warmup_epochs", "5"], "--warmup_epochs 5 (flag)"),
                                        (["--recipe", "tuned", "--num_epochs", "1"], "--warmup_epochs 1 (recipe tuned)"),
                                        (["--num_epochs", "11"], None), (["--recipe", "tuned", "--num_epochs", "5"], None)])
def test_a_warm_up_as_long_as_the_run_is_announced_naming_where_it_came_from(argv, note, tmp_path, capsys):
    train_ssl.check_args(train_ssl.get_args_parser().parse_args(["--data_dir", str(tmp_path), *argv]))
    err = capsys.readouterr().err
    assert (note in err and "never decays" in err) if note else "warmup" not in err
