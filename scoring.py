"""Scoring checkpoints on a labelled split: one `Evaluated` (predictions, labels, embeddings, provenance)
per model, for fine-tuned classifiers (one-label and multi-label, on the split their checkpoint
recorded) and for SSL encoders (a linear probe and a kNN on frozen features).
"""
import dataclasses
import os
import sys

import numpy as np
import torch

import checkpoints
import data_loader
import image_io
import label_tables
import model_ssl
import probes
import tasks
import utils
from checkpoints import Checkpoint, ClassifierCheckpoint, SSLCheckpoint
from evaluated_model import Evaluated, ModelInfo
from gradcam import Explained, cam_layer_name
from probes import fit_linear_probe
from utils import UserError


def warn(notes: list, message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
    notes.append(message)


def check_label_hash(recorded, table, label_file: str, path: str, notes: list) -> None:
    if recorded and recorded != table.sha256:
        warn(notes, f"{label_file} is not the label file {os.path.basename(path)} was trained with (SHA-256 "
                    f"{table.sha256[:12]}... vs {recorded[:12]}...); scoring with the labels it gives now")


def recorded_split(ckpt: ClassifierCheckpoint, table, split: str, path: str, label_file: str, notes: list) -> np.ndarray:
    """Rows of `table` in the checkpoint's recorded split (every row for 'all'), in label-file order."""
    if split == "all":
        return table.indices("all")
    recorded = (ckpt.splits or {}).get(split)
    if recorded is None:
        raise UserError(f"--checkpoint {path}: has no recorded {split!r} split (ckpt['splits'], written by "
                        f"fine_tune.py); it cannot be scored without risking training images in the test set")
    row = {f: i for i, f in enumerate(table.filenames)}
    rows = np.sort([row[f] for f in recorded if f in row]).astype(np.int64)
    if len(rows) == 0:
        raise UserError(f"--label_file {label_file}: none of the {len(recorded)} {split}-split images "
                        f"recorded in {path} is listed; use the label file the checkpoint was trained with")
    if len(rows) < len(recorded):
        warn(notes, f"{len(recorded) - len(rows)} of the {len(recorded)} recorded {split}-split images are not in "
                    f"the label file; scoring the {len(rows)} that are")
    return rows


def check_not_trained_on(ckpt: ClassifierCheckpoint, filenames: list, split: str, path: str, notes: list) -> None:
    """A val or test image the classifier was trained on would inflate every number: refuse."""
    trained = set(ckpt.train_files)
    if split in ("train", "all"):
        warn(notes, f"--split {split} includes images {os.path.basename(path)} was trained on: its scores are "
                    f"optimistic and say nothing about new patients")
        return
    leaked = [f for f in filenames if f in trained]
    if leaked:
        raise UserError(f"--checkpoint {path}: {len(leaked)} {split}-split image(s) are among its training images "
                        f"(first {leaked[0]!r}); its recorded splits are inconsistent, retrain it")


def encode_images(encoder, filenames: list, ckpt: Checkpoint, args, device, autocast_dtype) -> np.ndarray:
    """Frozen encoder features (N, D) of `filenames`, decoded the way the checkpoint was trained."""
    store = data_loader.ImageStore(args.data_dir, filenames, ckpt.image_size, args.cache_gb, ckpt.channels)
    workers = args.num_workers
    if workers is None:
        workers = utils.default_num_workers(device, streaming=not store.in_memory)
    loader = data_loader.BatchLoader(store, np.arange(len(filenames)), batch_size=args.batch_size,
                                     num_workers=workers)
    print(f"encoding {len(filenames)} images at {ckpt.image_size} px ...")
    features, _, indices = probes.extract_features(encoder.to(device), loader, image_io.normalize, device,
                                                   autocast_dtype)
    return features[torch.argsort(indices)].numpy()


def history_beside(ckpt: Checkpoint, path: str, notes: list):
    """The per-epoch CSV the checkpoint names (train_ssl.py writes ssl_history.csv beside its checkpoints)."""
    name = ckpt.history_file or ("ssl_history.csv" if ckpt.kind == "ssl" else None)
    if not name:
        return None
    csv_path = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(csv_path):
        if ckpt.history_file:
            notes.append(f"no training curves: the history file {name} is not beside the checkpoint")
        return None
    return csv_path


def scored_rows(ckpt: ClassifierCheckpoint, table, args, path: str, notes: list) -> tuple:
    """(rows, filenames) of a classifier's split to score: the one its checkpoint recorded, checked against the
    label file it was trained with and against its training images."""
    check_label_hash(ckpt.label_file_sha256, table, args.label_file, path, notes)
    rows = recorded_split(ckpt, table, args.split, path, args.label_file, notes)
    filenames = [table.filenames[i] for i in rows]
    check_not_trained_on(ckpt, filenames, args.split, path, notes)
    return rows, filenames


def checked_num_classes(ckpt: ClassifierCheckpoint, args, path: str, what: str) -> int:
    """The checkpoint's class (or finding) count; --num_classes, when given, must agree with it."""
    k = ckpt.num_classes
    if args.num_classes is not None and args.num_classes != k:
        raise UserError(f"--num_classes {args.num_classes}: {path} was trained for {k} {what}; "
                        f"drop the flag or pass --num_classes {k}")
    return k


def evaluate_classifier(path: str, name: str, ckpt: ClassifierCheckpoint, args, device, autocast_dtype) -> list:
    """The probabilities of a fine-tuned classifier (softmax over its classes, or one sigmoid per finding) on
    the split its checkpoint recorded, its logits divided by the temperature it records (and, for the ECE
    before calibration, not divided)."""
    task = tasks.of(ckpt.task)
    notes = []
    checked_num_classes(ckpt, args, path, task.unit)
    table = task.scoring_table(args, ckpt)
    rows, filenames = scored_rows(ckpt, table, args, path, notes)
    y_true = task.targets(table, rows, ckpt.class_names, args.label_file)

    model = ckpt.build_model()
    features = encode_images(model.encoder, filenames, ckpt, args, device, autocast_dtype)
    with torch.no_grad():
        logits = model.head.eval().cpu()(torch.from_numpy(features))
        prob = task.probabilities(logits / ckpt.temperature_tensor()).double().numpy()
        uncalibrated = task.probabilities(logits).double().numpy()
    info = ModelInfo(args.split, "recorded in the checkpoint" if args.split != "all" else "label file", "classifier",
                     init=ckpt.init, label_fraction=ckpt.label_fraction, epoch=ckpt.epoch,
                     num_epochs=ckpt.num_epochs, temperature=ckpt.temperature, **task.model_info(ckpt))
    names = classifier_class_names(ckpt, args.label_file) if task.explains else ckpt.class_names
    explained = Explained(model, normalizer(ckpt), cam_layer_name(model.config, ckpt.image_size, args.cam_layer),
                          args.data_dir, ckpt.image_size, ckpt.channels or 3) if task.explains else None
    return [Evaluated(name, path, task.evaluated_kind, filenames, y_true, prob, features, names, info, notes,
                      history_beside(ckpt, path, notes), explained, prob_uncalibrated=uncalibrated,
                      patient_ids=table.patient_ids[rows])]


def pretraining_overlap(ckpt: SSLCheckpoint, filenames: list, split: str, path: str, notes: list) -> None:
    """An SSL run given the label file leaves the test split out of pretraining; say so when it did not."""
    if split != "test":
        return
    seen = ckpt.not_left_out_of(filenames)
    if seen is None:
        notes.append(f"{os.path.basename(path)} records no test images left out of pretraining: the encoder may "
                     f"have seen the test images (without labels)")
        return
    if seen:
        warn(notes, f"{len(seen)} of the {len(filenames)} test images were not left out of pretraining "
                    f"(first {seen[0]!r}); the label file or its split differs from the pretraining run's")


def ssl_encoder(ckpt: SSLCheckpoint, path: str, pretrained: bool = True) -> torch.nn.Module:
    """The encoder of an SSL checkpoint, with its weights (or, pretrained=False, at random init)."""
    config = ckpt.model_config
    encoder = model_ssl.build_encoder(config.backbone, config.small_stem)
    if pretrained:
        checkpoints.load_state_strict(encoder, ckpt.encoder, "encoder", path)
    return encoder


def evaluate_ssl(path: str, name: str, ckpt: SSLCheckpoint, args, device, autocast_dtype) -> list:
    """A pretrained encoder as a representation: a linear probe and a kNN on frozen train-split features."""
    notes = []
    table = tasks.read_run_table(args, args.num_classes, {"seed": ckpt.split_seed})
    check_label_hash(ckpt.label_file_sha256, table, args.label_file, path, notes)
    rows = table.indices(args.split)
    fit_rows = np.setdiff1d(table.indices("train"), rows)            # never fit on an image that is scored
    if len(rows) == 0:
        raise UserError(f"--label_file {args.label_file}: no images in the {args.split!r} split")
    if len(fit_rows) == 0:
        raise UserError(f"--split {args.split} leaves no train-split images to fit the linear probe and kNN on; "
                        f"evaluate an SSL checkpoint on --split test or val")
    filenames = [table.filenames[i] for i in rows]
    pretraining_overlap(ckpt, filenames, args.split, path, notes)

    choose_rows = np.setdiff1d(table.indices("val"), np.r_[rows, fit_rows])   # the probe's C is chosen here
    encoder = ssl_encoder(ckpt, path)
    every = encode_images(encoder, [table.filenames[i] for i in np.r_[fit_rows, choose_rows, rows]], ckpt, args,
                          device, autocast_dtype)
    fit_x, val_x, eval_x = np.split(every, [len(fit_rows), len(fit_rows) + len(choose_rows)])
    fit_y, y = table.labels[fit_rows], table.labels[rows]
    k = table.num_classes
    probe = fit_linear_probe(fit_x, fit_y, eval_x, k, args.seed, notes, val_x, table.labels[choose_rows])
    knn = probes.knn_predict(torch.from_numpy(fit_x), torch.from_numpy(fit_y), torch.from_numpy(eval_x), k).numpy()
    info = ModelInfo(args.split, "label file", "ssl", init="ssl, frozen encoder", epoch=ckpt.epoch,
                     num_epochs=ckpt.num_epochs, fit_images=int(len(fit_rows)))
    history = history_beside(ckpt, path, notes)
    chosen = [f"linear probe: L2 strength C={probe.C:g}, {probe.chosen_by}"]
    return [Evaluated(f"{name} {kind}", path, kind, filenames, y, prob.astype(np.float64), eval_x,
                      label_tables.read_class_names(args.label_file, table.class_names), dataclasses.replace(info, probe=kind, probe_C=probe.C if kind == "linear probe" else None),
                      list(notes) + extra, history, patient_ids=table.patient_ids[rows])
            for kind, prob, extra in (("linear probe", probe.prob, chosen), ("kNN", knn, []))]


def evaluate_checkpoint(path: str, name: str, args, device, autocast_dtype, ckpt: Checkpoint | None = None) -> list:
    """Predictions of one checkpoint (loaded from `path` unless given) on the split `args` asks for."""
    if ckpt is None:
        ckpt = checkpoints.read_checkpoint(path, ("classifier", "ssl"))
    if ckpt.kind == "ssl" and label_tables.label_file_format(args.label_file) != "classes":
        raise UserError(f"--checkpoint {path}: an SSL checkpoint is probed with one class per image, and "
                        f"{args.label_file} is multi-label; fine-tune it (fine_tune.py --ssl_checkpoint) and evaluate "
                        f"that checkpoint")
    run = evaluate_classifier if ckpt.kind == "classifier" else evaluate_ssl
    return run(path, name, ckpt, args, device, autocast_dtype)


def normalizer(ckpt: Checkpoint):
    """uint8 (B, C, S, S) -> the float input the checkpoint was trained on (its recorded mean and std)."""
    norm = ckpt.normalization
    mean = torch.tensor(norm.get("mean", image_io.IMAGENET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(norm.get("std", image_io.IMAGENET_STD)).view(1, 3, 1, 1)
    return lambda images: (images.float() / 255.0 - mean.to(images.device)) / std.to(images.device)


def classifier_class_names(ckpt: ClassifierCheckpoint, label_file: str | None) -> list:
    """Readable class names of a classifier: recorded in the checkpoint, else classes.txt beside the label file
    (the one given, or the one it was trained with), else the raw labels."""
    raw = ckpt.class_names
    recorded = ckpt.class_display_names
    if recorded and len(recorded) == len(raw):
        return [str(c) for c in recorded]
    for candidate in (label_file, ckpt.label_file):
        if candidate:
            names = label_tables.read_class_names(candidate, raw)
            if names != raw:
                return names
    return raw
