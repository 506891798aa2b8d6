"""--tensorboard: both trainers log the scalars of their history CSV under OUTPUT_DIR/tensorboard/<run>, a resumed
run does not double a step, evaluation writes the projector's embeddings with thumbnails, and without the
tensorboard package the flag is one line naming the package."""
import builtins
import csv
import os

import pytest

import evaluate
import fine_tune
import train_ssl
import utils
from tiny_data import write_tiny_dataset

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(folder: str) -> dict:
    """{tag: [(step, value), ...]} of the event files in `folder`."""
    acc = EventAccumulator(folder)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def history(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("tensorboard")
    data = write_tiny_dataset(root / "data", n=36, size=40, classes=3, splits=(24, 6))
    labels, out = os.path.join(data, "labels.csv"), str(root / "ckpt")
    common = ["--data_dir", data, "--output_dir", out, "--device", "cpu", "--image_size", "32", "--batch_size", "12",
              "--tensorboard"]
    utils.run_cli(train_ssl.main, train_ssl.get_args_parser(), [*common, "--num_epochs", "2"])
    utils.run_cli(fine_tune.main, fine_tune.get_args_parser(),
                  [*common, "--label_file", labels, "--num_epochs", "3",
                   "--ssl_checkpoint", os.path.join(out, "best_ssl_model.pth")])
    return {"root": root, "data": data, "labels": labels, "out": out, "common": common}


def test_pretraining_logs_every_history_row_as_scalars(runs):
    logged = scalars(os.path.join(runs["out"], "tensorboard", "ssl"))
    rows = history(os.path.join(runs["out"], "ssl_history.csv"))
    assert [step for step, _ in logged["loss/loss"]] == [1, 2]
    assert [v for _, v in logged["loss/loss"]] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    assert {"optimiser/lr", "speed/images_per_sec", "collapse/embedding_std"} <= set(logged)


def test_fine_tuning_logs_losses_and_val_metrics(runs):
    logged = scalars(os.path.join(runs["out"], "tensorboard", "finetuned"))
    rows = history(os.path.join(runs["out"], "finetuned_history.csv"))
    assert [v for _, v in logged["validation/val_balanced_accuracy"]] == pytest.approx(
        [float(r["val_balanced_accuracy"]) for r in rows], rel=1e-5)
    assert {"loss/train_loss", "loss/val_loss", "optimiser/lr"} <= set(logged)


def test_a_resumed_run_does_not_double_a_step(runs):
    out = runs["out"]
    utils.run_cli(fine_tune.main, fine_tune.get_args_parser(),
                  [*runs["common"], "--label_file", runs["labels"], "--num_epochs", "4",
                   "--ssl_checkpoint", os.path.join(out, "best_ssl_model.pth"), "--resume"])
    steps = [step for step, _ in scalars(os.path.join(out, "tensorboard", "finetuned"))["loss/train_loss"]]
    assert steps == [1, 2, 3, 4]


def test_evaluation_writes_the_projector_with_one_point_per_test_image(runs):
    out = str(runs["root"] / "eval")
    utils.run_cli(evaluate.main, evaluate.get_args_parser(), [
        "--checkpoint", os.path.join(runs["out"], "best_finetuned_model.pth"), "--data_dir", runs["data"],
        "--output_dir", out, "--bootstrap", "20", "--device", "cpu", "--tensorboard", "--no-gradcam"])
    run = os.path.join(out, "tensorboard", "SSL_init")
    [embedding] = [d for d, _, files in os.walk(run) if "metadata.tsv" in files]
    with open(os.path.join(embedding, "metadata.tsv")) as f:
        labels = f.read().split()
    assert len(labels) == 6                      # the split column's test images
    assert set(labels) <= {"0", "1", "2"}
    assert os.path.isfile(os.path.join(embedding, "sprite.png"))


@pytest.mark.parametrize("script", [train_ssl, fine_tune])
def test_without_tensorboard_the_flag_is_one_line_naming_the_package(runs, script, monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        utils.run_cli(script.main, script.get_args_parser(),
                      ["--data_dir", runs["data"], "--label_file", runs["labels"], "--output_dir", out,
                       "--tensorboard"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "pip install tensorboard" in err[0]
    assert not os.path.exists(out)
