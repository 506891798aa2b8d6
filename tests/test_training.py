"""train_ssl.py and fine_tune.py, called through main(args) on tiny images."""
import json
import os
import re

import numpy as np
import pytest
import torch

import augmentations
import checkpoints
import fine_tune
import label_tables
import optimizers
import synthetic
import train_ssl
import training
import training_history
import training_run
import utils
from model_ssl import Classifier, ModelConfig
from tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def ssl_args(data_dir, out, *extra):
    return train_ssl.get_args_parser().parse_args([
        "--data_dir", data_dir, "--output_dir", str(out), "--image_size", "32", "--batch_size", "12",
        "--num_epochs", "4", "--warmup_epochs", "1", "--lr", "1e-3", "--device", "cpu", "--seed", "3", *extra])


def ft_args(data_dir, out, *extra):
    return fine_tune.get_args_parser().parse_args([
        "--data_dir", data_dir, "--label_file", os.path.join(data_dir, "labels.csv"), "--output_dir", str(out),
        "--batch_size", "8", "--num_epochs", "2", "--device", "cpu", "--seed", "1", *extra])


@pytest.fixture(scope="module")
def pretrained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl")
    train_ssl.main(ssl_args(tiny, out, "--label_file", os.path.join(tiny, "labels.csv"), "--eval_every", "2"))
    return out


def read_history(path):
    import pandas as pd
    return pd.read_csv(path)


def test_pretraining_names_the_epoch_it_kept_by_its_knn_accuracy(pretrained):
    best = torch.load(pretrained / "best_ssl_model.pth", weights_only=True)
    assert best["knn_accuracy"] is not None
    assert train_ssl.done_line(str(pretrained / "best_ssl_model.pth"), 4).startswith(
        f"done: best epoch {best['epoch']} of 4 by kNN accuracy on val {best['knn_accuracy']:.3f} -> ")


def test_pretraining_writes_its_outputs_and_loss_goes_down(pretrained):
    for name in ("best_ssl_model.pth", "last_ssl_checkpoint.pth", "ssl_history.csv", "ssl_training.png",
                 "ssl_settings.json"):
        assert os.path.getsize(pretrained / name) > 0, name
    hist = read_history(pretrained / "ssl_history.csv")
    assert list(hist["epoch"]) == [1, 2, 3, 4]
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    assert hist["knn_accuracy"].notna().sum() == 2          # epochs 2 and 4


def test_ssl_checkpoint_describes_itself_and_leaves_out_the_test_split(pretrained, tiny):
    ckpt = torch.load(pretrained / "best_ssl_model.pth", map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "ssl" and ckpt["image_size"] == 32 and ckpt["channels"] == 1
    assert ckpt["model_config"] == {"backbone": "resnet18", "small_stem": True, "projection_dim": 128}
    assert set(ckpt) >= {"encoder", "projector", "args", "epoch", "loss", "normalization", "excluded_files"}
    assert len(ckpt["excluded_files"]) > 0
    settings = (pretrained / "ssl_settings.json").read_text()
    assert f'"images": {36 - len(ckpt["excluded_files"])}' in settings
    resolved = json.loads(settings)                  # what ran and why, not the flags' 'auto'
    assert resolved["device"] == "cpu (asked for)" and resolved["precision"].startswith(("fp32 (auto", "bf16 (auto"))
    assert resolved["num_workers"].startswith("0 (auto: images in memory")


def test_pretraining_leaves_out_the_test_split_of_the_shares_fine_tuning_uses(tmp_path):
    """--test_fraction on a label file without a split column: the same test images as fine_tune.py's."""
    synthetic.generate_dataset(str(tmp_path), 60, 3, 32, seed=1)
    labels = str(tmp_path / "labels.csv")
    args = train_ssl.get_args_parser().parse_args(["--data_dir", str(tmp_path), "--label_file", labels,
                                                   "--test_fraction", "0.4"])
    files, table, excluded = train_ssl.pretraining_files(args)
    test = label_tables.load_label_table(labels, str(tmp_path), test_fraction=0.4)
    assert excluded == sorted(np.asarray(test.filenames)[test.indices("test")].tolist())
    assert 0.3 * 60 < len(excluded) < 0.5 * 60 and not set(excluded) & set(files)


def test_fine_tuning_warns_when_pretraining_did_not_leave_its_test_split_out(tmp_path, capsys):
    synthetic.generate_dataset(str(tmp_path), 60, 3, 32, seed=1)
    labels = str(tmp_path / "labels.csv")
    default = label_tables.load_label_table(labels, str(tmp_path))
    ssl = checkpoints.SSLCheckpoint.from_dict({"excluded_files": np.asarray(default.filenames)[default.indices("test")]
                                               .tolist()})
    assert fine_tune.warn_if_pretraining_saw_test_images(ssl, default, "ssl.pth") == []
    wider = label_tables.load_label_table(labels, str(tmp_path), test_fraction=0.4)
    seen = fine_tune.warn_if_pretraining_saw_test_images(ssl, wider, "ssl.pth")
    assert seen and f"{len(seen)} of the {len(wider.indices('test'))} test images" in capsys.readouterr().err
    nothing_left_out = checkpoints.SSLCheckpoint.from_dict({"excluded_files": []})
    assert fine_tune.warn_if_pretraining_saw_test_images(nothing_left_out, wider, "ssl.pth") == []


def test_progress_bars_obey_tqdm_disable(monkeypatch, capsys):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = lambda m, batch: (m(batch).pow(2).mean(), len(batch))     # noqa: E731
    batches = [torch.randn(4, 2) for _ in range(3)]
    for env, expect_bar in ((None, True), ("1", False)):
        if env:
            monkeypatch.setenv("TQDM_DISABLE", env)
        training.train_one_epoch(model, batches, optimizer, loss_fn, device=torch.device("cpu"),
                              scaler=training.make_grad_scaler(torch.device("cpu"), None), desc="bar-check")
        assert ("bar-check" in capsys.readouterr().err) == expect_bar, env


def reference_lars_step(params_and_groups, state, lr, momentum, weight_decay, eta):
    """LARS as You et al. (2017) and SimCLR write it, one parameter at a time."""
    for p, exclude in params_and_groups:
        if p.grad is None:
            continue
        d_p = p.grad
        if not exclude:
            d_p = d_p.add(p, alpha=weight_decay)
            p_norm, g_norm = torch.norm(p), torch.norm(d_p)
            trust = torch.where((p_norm > 0) & (g_norm > 0), eta * p_norm / g_norm, torch.ones_like(p_norm))
            d_p = d_p.mul(trust)
        if p not in state:
            state[p] = torch.clone(d_p)
        else:
            state[p].mul_(momentum).add_(d_p)
        p.add_(state[p], alpha=-lr)


@pytest.mark.parametrize("foreach", [False, True])       # the CPU's loop, the GPU's multi-tensor update
def test_lars_matches_the_per_parameter_algorithm_bit_for_bit(foreach):
    torch.manual_seed(0)
    ours = [torch.randn(8, 4), torch.randn(5, 3, 3), torch.zeros(6, 2), torch.randn(4), torch.randn(3)]
    ref, start = [p.clone() for p in ours], [p.clone() for p in ours]
    exclude = [False, False, False, True, True]                 # a zero weight: trust ratio 1
    opt = optimizers.LARS([{"params": ours[:3], "weight_decay": 1e-4, "lars_exclude": False},
                      {"params": ours[3:], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5, foreach=foreach)
    state = {}
    for step in range(4):
        for i, (a, b) in enumerate(zip(ours, ref)):
            grad = None if (step == 0 and i == 1) else torch.randn_like(a)   # one parameter starts late
            a.grad, b.grad = grad, None if grad is None else grad.clone()
        opt.step()
        reference_lars_step([(b, e) for b, e in zip(ref, exclude)], state, 0.5, 0.9, 1e-4, 0.001)
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), step
    assert not any(torch.equal(a, s) for a, s in zip(ours, start))


def test_lars_resumes_from_a_state_saved_before_the_foreach_option():
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2)
    saved = optimizers.LARS([p], lr=0.1).state_dict()
    for g in saved["param_groups"]:
        del g["foreach"]
    opt = optimizers.LARS([p], lr=0.1)
    opt.load_state_dict(saved)
    opt.step()
    assert opt.param_groups[0]["foreach"] is None


def run_interrupted_in_epoch(monkeypatch, epoch: int, main, args) -> str:
    """Run main(args) with a KeyboardInterrupt at the start of epoch `epoch` (1-based), as Ctrl-C would;
    returns the message the user sees."""
    real_epoch = training.train_one_epoch

    def interrupt(*a, **k):
        if k["epoch"] == epoch - 1:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    monkeypatch.setattr(training, "train_one_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        main(args)
    monkeypatch.setattr(training, "train_one_epoch", real_epoch)
    return str(interrupted.value)


def assert_same_last_checkpoints(a_path, b_path, parts, epoch: int) -> None:
    a, b = (torch.load(p, weights_only=True) for p in (a_path, b_path))
    assert a["epoch"] == b["epoch"] == epoch
    for part in parts:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_pretraining_writes_the_last_checkpoint_at_most_every_30_s_and_resumes_from_it_bit_identically(
        tiny, tmp_path, monkeypatch, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_ssl.main(ssl_args(tiny, full))
    best = torch.load(full / "best_ssl_model.pth", weights_only=True)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"done: best epoch {best['epoch']} of 4 by loss {best['loss']:.4f} -> {full / 'best_ssl_model.pth'}")
    monkeypatch.setattr(training_run, "LAST_CHECKPOINT_EVERY_S", 1e9)      # epochs 2 and 3 fall inside the interval
    message = run_interrupted_in_epoch(monkeypatch, 4, train_ssl.main, ssl_args(tiny, cut))
    assert message == "interrupted: last_ssl_checkpoint.pth holds epoch 1 of 4; continue from there with --resume"
    assert torch.load(cut / "last_ssl_checkpoint.pth", weights_only=True)["epoch"] == 1
    assert read_history(cut / "ssl_history.csv")["epoch"].tolist() == [1, 2, 3]
    train_ssl.main(ssl_args(tiny, cut, "--resume"))                   # redoes epochs 2 and 3

    assert_same_last_checkpoints(full / "last_ssl_checkpoint.pth", cut / "last_ssl_checkpoint.pth",
                                 ("encoder", "projector"), 4)
    assert read_history(cut / "ssl_history.csv")["epoch"].tolist() == [1, 2, 3, 4]


def test_fine_tune_from_ssl_and_from_scratch_write_different_files(pretrained, tiny, tmp_path):
    fine_tune.main(ft_args(tiny, tmp_path, "--ssl_checkpoint", str(pretrained / "best_ssl_model.pth"),
                           "--freeze_encoder", "--unfreeze_after_epoch", "1"))
    fine_tune.main(ft_args(tiny, tmp_path, "--image_size", "32"))
    ssl_run = torch.load(tmp_path / "best_finetuned_model.pth", map_location="cpu", weights_only=True)
    scratch = torch.load(tmp_path / "best_baseline_model.pth", map_location="cpu", weights_only=True)
    assert ssl_run["init"] == "ssl" and ssl_run["ssl_checkpoint"] == "best_ssl_model.pth"
    assert scratch["init"] == "scratch" and scratch["ssl_checkpoint"] is None
    assert ssl_run["image_size"] == 32                                    # an SSL checkpoint brings its size
    assert fine_tune.get_args_parser().parse_args([]).image_size is None  # else 224 (from scratch)
    for ckpt in (ssl_run, scratch):
        assert ckpt["kind"] == "classifier" and ckpt["num_classes"] == 3
        assert set(ckpt["splits"]) == {"train", "val", "test"}
        assert not set(ckpt["splits"]["test"]) & set(ckpt["train_files"])
        assert set(ckpt["train_files"]) <= set(ckpt["splits"]["train"])
        assert {"balanced_accuracy", "accuracy", "loss"} <= set(ckpt["val_metrics"])
        assert len(ckpt["label_file_sha256"]) == 64
    for name in ("finetuned_history.csv", "baseline_history.csv", "finetuned_training.png", "baseline_training.png"):
        assert os.path.getsize(tmp_path / name) > 0
    frozen = read_history(tmp_path / "finetuned_history.csv")["encoder_frozen"].tolist()
    assert frozen == [1, 0]


def test_frozen_epochs_leave_the_ssl_encoder_bit_identical(pretrained, tiny, tmp_path):
    fine_tune.main(ft_args(tiny, tmp_path, "--ssl_checkpoint", str(pretrained / "best_ssl_model.pth"),
                           "--freeze_encoder", "--unfreeze_after_epoch", "5"))
    ssl = torch.load(pretrained / "best_ssl_model.pth", weights_only=True)["encoder"]
    tuned = torch.load(tmp_path / "last_finetuned_checkpoint.pth", weights_only=True)["encoder"]
    assert all(torch.equal(ssl[k], tuned[k]) for k in ssl)            # weights and BN buffers


def test_label_fraction_is_stratified_and_deterministic(tiny, tmp_path):
    fine_tune.main(ft_args(tiny, tmp_path / "a", "--label_fraction", "0.2", "--num_epochs", "1", "--image_size", "32"))
    fine_tune.main(ft_args(tiny, tmp_path / "b", "--label_fraction", "0.2", "--num_epochs", "1", "--image_size", "32"))
    a = torch.load(tmp_path / "a" / "best_baseline_model.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "best_baseline_model.pth", weights_only=True)
    assert a["train_files"] == b["train_files"]
    assert len(a["train_files"]) < len(a["splits"]["train"])
    labels = dict(line.split(",") for line in open(os.path.join(tiny, "labels.csv")).read().split()[1:])
    assert {labels[f] for f in a["train_files"]} == {"0", "1", "2"}


def test_wrong_inputs_are_refused_with_one_clear_message(pretrained, tiny, tmp_path):
    with pytest.raises(utils.UserError, match="--num_classes 4"):
        fine_tune.main(ft_args(tiny, tmp_path, "--num_classes", "4", "--image_size", "32"))
    with pytest.raises(utils.UserError, match="is a 'ssl' checkpoint, expected 'classifier'"):
        fine_tune.main(ft_args(tiny, tmp_path, "--resume", str(pretrained / "best_ssl_model.pth")))
    clf = tmp_path / "clf.pth"
    checkpoints.save_checkpoint({"kind": "classifier", "model_config": ModelConfig().to_dict(),
                           "encoder": Classifier(ModelConfig(), 3).encoder.state_dict()}, str(clf))
    with pytest.raises(utils.UserError, match="expected 'ssl'"):
        fine_tune.main(ft_args(tiny, tmp_path, "--ssl_checkpoint", str(clf)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(utils.UserError, match="not a readable PyTorch checkpoint"):
        fine_tune.main(ft_args(tiny, tmp_path, "--ssl_checkpoint", str(junk)))
    with pytest.raises(utils.UserError, match="no such file"):
        fine_tune.main(ft_args(tiny, tmp_path, "--ssl_checkpoint", str(tmp_path / "missing.pth")))
    with pytest.raises(utils.UserError, match="stem"):
        fine_tune.main(ft_args(tiny, tmp_path, "--ssl_checkpoint", str(pretrained / "best_ssl_model.pth"),
                               "--image_size", "64"))


def test_crop_rotation_and_jitter_flags_reach_both_augmentation_pipelines(tiny, tmp_path):
    args = ssl_args(tiny, tmp_path, "--crop_min_scale", "0.3", "--jitter", "0.8", "--rotation", "0")
    config = train_ssl.ssl_augment_config(args)
    assert config.crop_scale == (0.3, 1.0) and config.brightness == config.contrast == 0.8 and config.rotation == 0
    default = train_ssl.ssl_augment_config(ssl_args(tiny, tmp_path))
    assert default.brightness == default.contrast == 0.3 and default.crop_scale == (0.8, 1.0)   # the spec's
    assert default.rotation == 15
    assert fine_tune.supervised_augment_config(ft_args(tiny, tmp_path)).rotation == 10           # the spec's
    supervised = fine_tune.supervised_augment_config(ft_args(tiny, tmp_path, "--rotation", "3",
                                                            "--rotation_fill", "reflection"))
    assert supervised.rotation == 3 and supervised.rotation_fill == "reflection"
    assert fine_tune.supervised_augment_config(ft_args(tiny, tmp_path)).rotation_fill == "zeros"
    jitter = [t for t in augmentations.build_pil_transform(config, 32).transforms if "ColorJitter" in repr(t)]
    assert jitter and jitter[0].brightness == pytest.approx((0.2, 1.8))


def test_training_curves_are_redrawn_at_most_every_30_s_and_after_the_last_epoch(monkeypatch):
    drawn, clock = [], iter([0.0, 0.1, 5.0, 31.0, 31.1, 40.0, 40.1])
    monkeypatch.setattr(training_history, "plot_history", lambda csv, png, title: drawn.append(png))
    monkeypatch.setattr(utils.time, "monotonic", lambda: next(clock))
    for last in (False, False, False, True):           # epochs at t = 0, 5, 31, 40
        training_history.plot_history_throttled("h.csv", "curves.png", "t", last_epoch=last)
    assert len(drawn) == 3                              # t = 0 (first), 31 (30 s later), 40 (last epoch)


def test_fine_tune_writes_the_last_checkpoint_at_most_every_30_s_and_resumes_from_it_bit_identically(
        tiny, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    fine_tune.main(ft_args(tiny, full, "--num_epochs", "4"))
    monkeypatch.setattr(training_run, "LAST_CHECKPOINT_EVERY_S", 1e9)        # epochs 2 and 3 fall inside the interval
    message = run_interrupted_in_epoch(monkeypatch, 4, fine_tune.main, ft_args(tiny, cut, "--num_epochs", "4"))
    assert "last_baseline_checkpoint.pth holds epoch 1 of 4" in message
    assert torch.load(cut / "last_baseline_checkpoint.pth", weights_only=True)["epoch"] == 1
    assert read_history(cut / "baseline_history.csv")["epoch"].tolist() == [1, 2, 3]
    fine_tune.main(ft_args(tiny, cut, "--num_epochs", "4", "--resume"))     # redoes epochs 2 and 3

    assert_same_last_checkpoints(full / "last_baseline_checkpoint.pth", cut / "last_baseline_checkpoint.pth",
                                 ("encoder", "head"), 4)
    assert read_history(cut / "baseline_history.csv")["epoch"].tolist() == [1, 2, 3, 4]


def test_head_prefit_fits_the_head_on_frozen_features_and_leaves_the_encoder(pretrained, tiny, tmp_path, capsys):
    ssl_path = str(pretrained / "best_ssl_model.pth")
    fine_tune.main(ft_args(tiny, tmp_path, "--ssl_checkpoint", ssl_path, "--head_prefit_steps", "300",
                           "--freeze_encoder", "--unfreeze_after_epoch", "5"))
    fitted = re.search(r"head pre-fitted on frozen features of (\d+) images: 300 steps, loss ([\d.]+)",
                       capsys.readouterr().out)
    assert fitted and float(fitted.group(2)) < 0.5          # chance is ln 3 = 1.10
    ssl = torch.load(ssl_path, weights_only=True)["encoder"]
    tuned = torch.load(tmp_path / "last_finetuned_checkpoint.pth", weights_only=True)["encoder"]
    assert all(torch.equal(ssl[k], tuned[k]) for k in ssl)  # only the head was pre-fitted
    assert fine_tune.get_args_parser().parse_args([]).head_prefit_steps == 0   # the spec's behaviour by default


def test_a_kNN_tie_keeps_the_later_longer_trained_encoder():
    assert train_ssl._improved(0.543, 4.4, 0.543, monitored_by_knn=True)
    assert not train_ssl._improved(0.543, 4.4, 0.5, monitored_by_knn=True)
    assert not train_ssl._improved(4.0, 4.0, None, monitored_by_knn=False)     # by loss: strictly lower


def test_fine_tune_says_when_its_best_epoch_was_one_of_the_last():
    assert "train longer" in fine_tune.still_improving_hint(30, 30)
    assert "best val epoch was 91 of 100" in fine_tune.still_improving_hint(91, 100)
    assert fine_tune.still_improving_hint(90, 100) is None          # peaked and held: converged
    assert fine_tune.still_improving_hint(2, 2) is None             # too short a run to tell


def test_a_late_best_epoch_that_only_won_a_tie_on_val_loss_is_called_a_plateau(tmp_path):
    # the quick start's from-scratch run: val balanced accuracy 0.639 from epoch 135, kept epoch 198 by val loss
    history = tmp_path / "baseline_history.csv"
    rows = [(e, 0.5 if e < 135 else 0.638889, 2.1 - e / 1000) for e in range(1, 201)]
    history.write_text("epoch,val_loss,val_balanced_accuracy\n" + "".join(f"{e},{l},{b}\n" for e, b, l in rows))
    reached = fine_tune.first_epoch_at_best(str(history), "val_balanced_accuracy", 198)
    assert reached == 135
    hint = fine_tune.still_improving_hint(198, 200, reached)
    assert "level since epoch 135 of 200" in hint and "train longer" not in hint
    assert "train longer" in fine_tune.still_improving_hint(198, 200, 190)        # it rose late: still improving
    assert fine_tune.first_epoch_at_best(str(tmp_path / "missing.csv"), "val_balanced_accuracy", 198) == 198


def test_training_curves_show_what_matters_and_mark_the_kept_epoch(tmp_path, monkeypatch):
    import pandas as pd
    fine = tmp_path / "finetuned_history.csv"
    fine.write_text("epoch,train_loss,val_loss,val_accuracy,val_balanced_accuracy,lr,encoder_frozen,images_per_sec\n"
                    "1,1.1,1.0,0.4,0.40,1e-3,1,50\n2,0.9,0.8,0.6,0.55,9e-4,1,50\n3,0.8,0.7,0.6,0.55,5e-4,0,50\n"
                    "4,0.7,0.9,0.6,0.55,1e-4,0,50\n")
    ssl = tmp_path / "ssl_history.csv"
    ssl.write_text("epoch,loss,lr,images_per_sec,knn_accuracy,embedding_std\n1,5.1,3e-4,90,,0.05\n"
                   "2,4.9,2e-4,90,0.5,0.06\n3,4.8,1e-4,90,,0.06\n4,4.7,0,90,0.5,0.07\n")
    # the trainers' own rules: ties in val balanced accuracy go to the lower val loss; kNN ties to the later epoch
    assert training_history.best_history_epoch(pd.read_csv(fine)) == 3
    assert training_history.best_history_epoch(pd.read_csv(ssl)) == 4
    drawn = []
    real_subplots = __import__("matplotlib.pyplot").pyplot.subplots

    def spy(*args, **kwargs):
        fig, axes = real_subplots(*args, **kwargs)
        drawn.append(axes)
        return fig, axes

    monkeypatch.setattr("matplotlib.pyplot.subplots", spy)
    training_history.plot_history(str(fine), str(tmp_path / "fine.png"), "fine-tuning", chance=1 / 3)
    training_history.plot_history(str(ssl), str(tmp_path / "ssl.png"), "SimCLR", best_epoch=2)
    fine_axes, ssl_axes = ([a for a in axes.flat if a.axison] for axes in drawn)
    assert [a.get_title() for a in fine_axes] == ["loss", "validation", "learning rate"]    # no images/s, no flag
    labels = [line.get_label() for line in fine_axes[1].get_lines()]
    assert "chance (0.33)" in labels and "kept: epoch 3" in labels
    assert len(ssl_axes) == 4 and "kept: epoch 2" in [line.get_label() for line in ssl_axes[0].get_lines()]
    knn = [line for line in ssl_axes[1].get_lines() if line.get_label() == "knn accuracy"][0]
    assert list(knn.get_xdata()) == [2, 4]                        # kNN points at their epochs
    assert (tmp_path / "fine.png").stat().st_size > 5000 and (tmp_path / "ssl.png").stat().st_size > 5000


def test_ctrl_c_names_the_epoch_the_last_checkpoint_holds_and_only_where_one_was_saved(tmp_path, capsys):
    last = training_run.LastCheckpoint(str(tmp_path / "last_ssl_checkpoint.pth"))
    with pytest.raises(training_run.TrainingInterrupted, match="nothing resumable was saved; start again without --resume"):
        with last.on_interrupt(5):
            raise KeyboardInterrupt
    last.saved_epoch = 3                                           # the throttled file can lag the running epoch
    with pytest.raises(training_run.TrainingInterrupted, match="last_ssl_checkpoint.pth holds epoch 3 of 5"):
        with last.on_interrupt(5):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as other_rank:           # under torchrun only rank 0 writes
        with last.on_interrupt(5, is_main=False):
            raise KeyboardInterrupt
    assert not isinstance(other_rank.value, training_run.TrainingInterrupted)

    def interrupted_main(args):                                    # evaluate.py, data_loader.py: nothing resumable
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_code:
        utils.run_cli(interrupted_main, train_ssl.get_args_parser(), [])
    assert exit_code.value.code == 130
    assert capsys.readouterr().err.strip() == ("interrupted: every file written is complete (none half-written); "
                                               "run the command again")
