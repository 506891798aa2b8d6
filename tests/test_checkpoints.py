"""checkpoints.py: the typed checkpoints read files in the key layout the trainers wrote before the typed
classes existed (kept here as literal dicts), and write what they read."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
from checkpoints import ClassifierCheckpoint, SSLCheckpoint, TrainingState  # noqa: E402
from model_ssl import Classifier, ModelConfig, SimCLR  # noqa: E402
from utils import UserError  # noqa: E402

CONFIG = ModelConfig(backbone="resnet18", small_stem=True, projection_dim=16)
NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def older_ssl_dict() -> dict:
    """best_ssl_model.pth as train_ssl.py wrote it before the typed classes: run facts only in `args`."""
    model = SimCLR(CONFIG)
    return {"kind": "ssl", "model_config": CONFIG.to_dict(), "image_size": 32, "channels": 1,
            "normalization": NORMALIZATION, "encoder": model.encoder.state_dict(),
            "projector": model.projector.state_dict(),
            "args": {"num_epochs": 7, "label_file": "data/labels.csv", "split_seed": 5, "val_fraction": 0.2,
                     "test_fraction": 0.3, "seed": 42, "batch_size": 16},
            "epoch": 6, "loss": 4.5, "knn_accuracy": 0.61, "label_file_sha256": "ab" * 32,
            "excluded_files": ["P1_0.png", "P1_1.png"], "history_file": "ssl_history.csv", "world_size": 1}


def older_classifier_dict(multilabel: bool = False) -> dict:
    """best_finetuned_model.pth as fine_tune.py wrote it before the typed classes."""
    k = 4 if multilabel else 3
    model = Classifier(CONFIG, k)
    d = {"kind": "classifier", "model_config": CONFIG.to_dict(), "num_classes": k,
         "class_names": [f"c{i}" for i in range(k)], "class_display_names": [f"class {i}" for i in range(k)],
         "image_size": 32, "channels": 1, "normalization": NORMALIZATION,
         "encoder": model.encoder.state_dict(), "head": model.head.state_dict(), "init": "ssl",
         "ssl_checkpoint": "best_ssl_model.pth", "label_file_sha256": "cd" * 32, "split_seed": 5,
         "val_fraction": 0.2, "test_fraction": 0.3,
         "splits": {"train": ["a.png"], "val": ["b.png"], "test": ["c.png"]}, "train_files": ["a.png"],
         "label_fraction": 0.5, "val_metrics": {"loss": 1.0, "balanced_accuracy": 0.5, "accuracy": 0.5},
         "history_file": "finetuned_history.csv", "epoch": 3, "world_size": 1,
         "args": {"num_epochs": 9, "label_file": "data/labels.csv", "seed": 1}, "task": "multiclass"}
    if multilabel:
        d |= {"task": "multilabel", "uncertain": "zero", "label_format": "columns", "thresholds": [0.1, 0.2, 0.3, 0.4],
              "threshold_rule": "f1"}
    return d


def test_an_older_ssl_checkpoint_reads_its_run_facts_from_args(tmp_path):
    path = str(tmp_path / "best_ssl_model.pth")
    checkpoints.save_checkpoint(older_ssl_dict(), path)
    ssl = SSLCheckpoint.load(path, "--ssl_checkpoint")
    assert (ssl.num_epochs, ssl.label_file, ssl.split_seed, ssl.val_fraction, ssl.test_fraction) == \
        (7, "data/labels.csv", 5, 0.2, 0.3)
    assert ssl.model_config == CONFIG and (ssl.image_size, ssl.channels, ssl.epoch) == (32, 1, 6)
    assert ssl.not_left_out_of(["P1_0.png", "P2_0.png"]) == ["P2_0.png"]
    assert ssl.path == path and ssl.knn_accuracy == 0.61


def test_an_older_ssl_checkpoint_without_split_seed_used_its_seed(tmp_path):
    d = older_ssl_dict()
    del d["args"]["split_seed"]
    assert SSLCheckpoint.from_dict(d).split_seed == 42


@pytest.mark.parametrize("multilabel", [False, True])
def test_an_older_classifier_checkpoint_reads_and_rebuilds_its_model(tmp_path, multilabel):
    path = str(tmp_path / "best_finetuned_model.pth")
    checkpoints.save_checkpoint(older_classifier_dict(multilabel), path)
    ckpt = checkpoints.read_checkpoint(path, ("classifier", "ssl"))
    assert isinstance(ckpt, ClassifierCheckpoint) and ckpt.task == ("multilabel" if multilabel else "multiclass")
    assert (ckpt.num_epochs, ckpt.label_file, ckpt.epoch, ckpt.init) == (9, "data/labels.csv", 3, "ssl")
    assert ckpt.class_names == [f"c{i}" for i in range(ckpt.num_classes)]
    if multilabel:
        assert (ckpt.uncertain, ckpt.thresholds, ckpt.threshold_rule) == ("zero", [0.1, 0.2, 0.3, 0.4], "f1")
    model = ckpt.build_model()
    assert not model.training and model(torch.zeros(2, 3, 32, 32)).shape == (2, ckpt.num_classes)


@pytest.mark.parametrize("older", [older_ssl_dict, older_classifier_dict,
                                   lambda: older_classifier_dict(multilabel=True)])
def test_a_typed_checkpoint_writes_what_it_read(tmp_path, older):
    kind = {"ssl": SSLCheckpoint, "classifier": ClassifierCheckpoint}
    d = older()
    ckpt = kind[d["kind"]].from_dict(d)
    again = kind[d["kind"]].from_dict(ckpt.to_dict())
    assert again.to_dict().keys() == ckpt.to_dict().keys() >= d.keys()        # every older key is written again
    for key, value in d.items():
        if not isinstance(value, dict) or key in ("args", "splits", "val_metrics", "normalization", "model_config"):
            assert ckpt.to_dict()[key] == value, key


def test_the_resumable_state_rides_along_and_a_best_model_has_none(tmp_path):
    model = Classifier(CONFIG, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ckpt = ClassifierCheckpoint.from_dict(older_classifier_dict())
    state = TrainingState.capture(optimizer, scheduler, scaler, {"balanced_accuracy": 0.5, "loss": 1.0})
    state.rng_per_rank = [state.rng, state.rng]
    ckpt.save(str(tmp_path / "last.pth"), state)
    raw = checkpoints.load_checkpoint(str(tmp_path / "last.pth"), "classifier")
    back = TrainingState.from_dict(raw, "last.pth")
    assert back.best_metric == {"balanced_accuracy": 0.5, "loss": 1.0} and len(back.rng_per_rank) == 2
    ckpt.save(str(tmp_path / "best.pth"))
    raw = checkpoints.load_checkpoint(str(tmp_path / "best.pth"), "classifier")
    with pytest.raises(UserError, match="has no training state .*resume from a last_\\*_checkpoint.pth"):
        TrainingState.from_dict(raw, "best.pth")


def test_a_checkpoint_of_the_other_kind_is_refused_by_name(tmp_path):
    path = str(tmp_path / "best_ssl_model.pth")
    checkpoints.save_checkpoint(older_ssl_dict(), path)
    with pytest.raises(UserError, match="is a 'ssl' checkpoint, expected 'classifier'"):
        ClassifierCheckpoint.load(path)


@pytest.mark.parametrize("multilabel", [False, True])
def test_an_older_classifier_without_a_temperature_reads_as_uncalibrated(tmp_path, multilabel):
    path = str(tmp_path / "best_finetuned_model.pth")
    checkpoints.save_checkpoint(older_classifier_dict(multilabel), path)
    ckpt = ClassifierCheckpoint.load(path)
    assert ckpt.temperature == 1.0
    assert torch.equal(ckpt.temperature_tensor(), torch.ones(ckpt.num_classes))


@pytest.mark.parametrize("multilabel, temperature", [(False, 1.7), (True, [0.5, 1.0, 2.0, 3.0])])
def test_a_temperature_is_saved_at_the_top_level_and_read_back(tmp_path, multilabel, temperature):
    ckpt = ClassifierCheckpoint.from_dict(older_classifier_dict(multilabel) | {"temperature": temperature})
    path = str(tmp_path / "best.pth")
    ckpt.save(path)
    assert checkpoints.load_checkpoint(path, "classifier")["temperature"] == temperature
    back = ClassifierCheckpoint.load(path)
    assert back.temperature == temperature
    expected = temperature if multilabel else [temperature] * 3
    assert back.temperature_tensor().tolist() == pytest.approx(expected)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), [1.0, 2.0], "warm"])
def test_a_bad_temperature_is_refused_in_one_line(tmp_path, temperature):
    path = str(tmp_path / "best.pth")
    checkpoints.save_checkpoint(older_classifier_dict() | {"temperature": temperature}, path)
    with pytest.raises(UserError, match="temperature .*expected a positive number"):
        ClassifierCheckpoint.load(path)
