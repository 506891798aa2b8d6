r"""Metrics and figures for trained checkpoints, on a held-out split, with bootstrap confidence intervals.

    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth --data_dir ./data/medical_images \
        --label_file ./data/medical_images/labels.csv --output_dir ./evaluation_results --num_classes 3
    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth \
        --checkpoint ./checkpoints/best_baseline_model.pth --names "SSL init" "from scratch" \
        --data_dir ./data/medical_images --output_dir ./evaluation_results/ssl_vs_scratch
    python evaluate.py --checkpoint ./checkpoints/best_ssl_model.pth --data_dir ./data/medical_images \
        --output_dir ./evaluation_results/ssl_probe          # linear probe + kNN on frozen features
    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth --split val --bootstrap 2000
    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth --images ./new_scans \
        --output_dir ./predictions                          # no labels: predictions.csv, summary.md, gradcam.png

A classifier is scored on the split recorded in its checkpoint (never recomputed); an SSL checkpoint is
scored as a representation (a logistic-regression probe and a kNN fitted on the train split's frozen
features). Several --checkpoint flags add comparison.csv/.md, an overlaid ROC figure and a paired bootstrap
of the differences between the first two models, said in words at the top of the report. A classifier's
report shows Grad-CAM heat maps (the `grad-cam` package); when the data folder has findings.csv (the
synthetic generator writes it) the pointing game scores them against where the finding was drawn.
"""
import argparse
import csv
import io
import os
import re
import sys
import warnings
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

import data_loader
import model_ssl
import utils
from utils import UserError, run_cli

ECE_BINS = 15
CI_PERCENTILES = (2.5, 97.5)
MIN_VALID_RESAMPLES = 10          # fewer usable resamples than this: no interval is reported
SCALAR_METRICS = {                # key -> label in tables
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "f1_macro": "macro F1",
    "f1_weighted": "weighted F1",
    "roc_auc": "ROC-AUC",
    "roc_auc_macro": "ROC-AUC (macro, one-vs-rest)",
    "pr_auc": "PR-AUC (average precision)",
    "pr_auc_macro": "PR-AUC (macro)",
    "ece": f"expected calibration error ({ECE_BINS} bins)",
}
PER_CLASS_METRICS = {
    "precision": "precision", "recall": "recall (sensitivity)", "specificity": "specificity", "f1": "F1",
    "roc_auc_per_class": "ROC-AUC", "pr_auc_per_class": "PR-AUC",
}
COMPARISON_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro", "ece")


# ============ metrics, vectorised over bootstrap resamples ============
# Every metric takes `weights` (B, N): how many times each of the N images is drawn in each of B
# resamples. A row of ones is the point estimate, so one code path gives both.

def _one_hot(codes: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((len(codes), width))
    out[np.arange(len(codes)), codes] = 1.0
    return out


def _ratio(num, den):
    """num / den, NaN where den == 0 (an undefined metric, never a silent 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(x, axis):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN rows stay NaN
        return np.nanmean(x, axis=axis)


def confusion_matrices(weights, y_true, y_pred, k: int) -> np.ndarray:
    """(B, N) weights -> (B, K, K) weighted confusion matrices, rows true class, columns predicted."""
    return (weights @ _one_hot(y_true * k + y_pred, k * k)).reshape(-1, k, k)


def count_metrics(cm: np.ndarray) -> dict:
    """Threshold metrics from (B, K, K) confusion matrices; per-class arrays are (B, K)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted, total = cm.sum(2), cm.sum(1), cm.sum((1, 2))
    fp, fn = predicted - tp, support - tp
    tn = total[:, None] - tp - fp - fn
    recall, f1 = _ratio(tp, support), _ratio(2 * tp, 2 * tp + fp + fn)   # f1 NaN: class neither true nor predicted
    return {
        "accuracy": tp.sum(1) / total,
        "balanced_accuracy": _nanmean(recall, 1),                          # over classes present, as sklearn
        "f1_macro": _nanmean(f1, 1),                                       # over classes true or predicted, as sklearn
        "f1_weighted": np.nansum(f1 * support, 1) / total,
        "precision": _ratio(tp, predicted), "recall": recall, "specificity": _ratio(tn, tn + fp), "f1": f1,
    }


def class_ranking(weights, is_positive: np.ndarray, score: np.ndarray):
    """ROC-AUC and average precision of one class's scores: two (B,) arrays, NaN where undefined.

    Images are sorted once by score; tied scores form one threshold (as sklearn), and each resample
    only changes how much weight every tied group carries.
    """
    order = np.argsort(-score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])               # first image of each tied group
    w = weights[:, order]
    pos = np.add.reduceat(w * is_positive[order], starts, axis=1)        # (B, U) positive weight per group
    neg = np.add.reduceat(w * ~is_positive[order], starts, axis=1)
    tp, fp = pos.cumsum(1), neg.cumsum(1)                                # at each threshold, descending
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    below = n_neg[:, None] - fp                                          # negatives scored strictly lower
    auc = _ratio((pos * (below + 0.5 * neg)).sum(1), n_pos * n_neg)      # Mann-Whitney U / (P * N)
    ap = _ratio(np.nansum(pos * _ratio(tp, tp + fp), 1), n_pos)            # sum of recall steps x precision
    return auc, ap


def ranking_metrics(weights, y_true, prob, k: int):
    """One-vs-rest ROC-AUC and average precision per class: two (B, K) arrays."""
    per_class = [class_ranking(weights, y_true == c, prob[:, c]) for c in range(k)]
    return np.stack([a for a, _ in per_class], 1), np.stack([p for _, p in per_class], 1)


def confidence_bins(prob: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each image's top-label confidence; bin b holds (b/bins, (b+1)/bins]."""
    return np.clip(np.ceil(prob.max(1) * bins).astype(int) - 1, 0, bins - 1)


def expected_calibration_error(weights, y_true, prob, bins: int = ECE_BINS) -> np.ndarray:
    """Top-label ECE: sum over bins of |accuracy - mean confidence| weighted by the bin's share. (B,)"""
    gap = (prob.argmax(1) == y_true) - prob.max(1)                       # (N,) correct - confidence
    per_bin = weights @ (_one_hot(confidence_bins(prob, bins), bins) * gap[:, None])   # (B, bins)
    return np.abs(per_bin).sum(1) / weights.sum(1)


def all_metrics(weights, y_true, prob, k: int, scorable: np.ndarray) -> dict:
    """Every metric for each row of `weights`; `scorable` = classes with positives and negatives in the split."""
    out = count_metrics(confusion_matrices(weights, y_true, prob.argmax(1), k))
    auc, ap = ranking_metrics(weights, y_true, prob, k)
    out["roc_auc_per_class"], out["pr_auc_per_class"] = auc, ap
    nan = np.full(len(weights), np.nan)
    # a resample that lost one of the split's classes has no macro AUC: it is skipped, not averaged around
    out["roc_auc_macro"] = auc[:, scorable].mean(1) if scorable.any() else nan
    out["pr_auc_macro"] = ap[:, scorable].mean(1) if scorable.any() else nan
    out["roc_auc"] = auc[:, 1] if k == 2 else out["roc_auc_macro"]     # binary: class 1 is the positive class
    out["pr_auc"] = ap[:, 1] if k == 2 else out["pr_auc_macro"]
    out["ece"] = expected_calibration_error(weights, y_true, prob)
    return out


def bootstrap_weights(n: int, resamples: int, seed: int, chunk: int):
    """Yield (b, n) draw counts of `resamples` bootstrap resamples of n images, `chunk` at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def percentile_interval(samples: np.ndarray) -> tuple:
    """Percentile 95% interval over resamples (axis 0), ignoring NaN resamples; NaN when too few.

    Returns (low, high, number of usable resamples), each shaped like one resample."""
    shape = samples.shape[1:]
    flat = samples.reshape(samples.shape[0], int(np.prod(shape)))
    low, high = np.full(flat.shape[1], np.nan), np.full(flat.shape[1], np.nan)
    for j in range(flat.shape[1]):
        valid = flat[:, j][np.isfinite(flat[:, j])]
        if len(valid) >= MIN_VALID_RESAMPLES:
            low[j], high[j] = np.percentile(valid, CI_PERCENTILES)
    return low.reshape(shape), high.reshape(shape), np.isfinite(flat).sum(0).reshape(shape)


def _chunk(n: int, width: int = 1) -> int:
    """Resamples per batch, so that a batch's (resamples, n, width) arrays stay near 16 MB."""
    return max(1, 2_000_000 // max(1, n * width))


def compute_metrics(y_true, prob, k: int, resamples: int, seed: int) -> dict:
    """{metric: {'value', 'low', 'high', 'valid'}} with percentile bootstrap intervals over images,
    plus 'support': images per class."""
    y_true, prob = np.asarray(y_true), np.asarray(prob, dtype=np.float64)
    n, counts = len(y_true), np.bincount(y_true, minlength=k)
    scorable = (counts > 0) & (counts < n)
    point = all_metrics(np.ones((1, n)), y_true, prob, k, scorable)
    draws = [all_metrics(w, y_true, prob, k, scorable) for w in bootstrap_weights(n, resamples, seed, _chunk(n, k))]
    out = {"support": counts}
    for key, value in point.items():
        samples = np.concatenate([d[key] for d in draws]) if draws else value[:0]
        low, high, valid = percentile_interval(samples)
        out[key] = {"value": value[0], "low": low, "high": high, "valid": valid}
    return out


def paired_accuracy_difference(y_true, prob_a, prob_b, resamples: int, seed: int) -> dict:
    """Accuracy of A minus B on the same images, with a paired bootstrap (same resampled images for both)."""
    n = len(y_true)
    correct = np.stack([prob_a.argmax(1) == y_true, prob_b.argmax(1) == y_true], 1).astype(float)   # (N, 2)
    accuracies = [(w @ correct) / w.sum(1, keepdims=True) for w in bootstrap_weights(n, resamples, seed, _chunk(n))]
    accuracies = np.concatenate(accuracies) if accuracies else np.zeros((0, 2))                     # (B, 2)
    low, high, _ = percentile_interval(accuracies[:, 0] - accuracies[:, 1])
    return {"difference": float(correct[:, 0].mean() - correct[:, 1].mean()), "low": float(low),
            "high": float(high), "num_images": n, "excludes_zero": bool(np.isfinite(low) and (low > 0 or high < 0))}


# ============ predictions: one `Evaluated` per scored model ============

@dataclass
class ModelInfo:
    """Where a model's predictions came from, for the reports and metrics.json."""
    split: str                                 # the evaluated split
    split_source: str                          # "recorded in the checkpoint" or "label file"
    checkpoint_kind: str                       # "classifier" or "ssl"
    init: str | None = None                    # "ssl", "scratch", or "ssl, frozen encoder" for probes
    label_fraction: float | None = None
    epoch: int | None = None                   # the kept epoch
    num_epochs: int | None = None              # of how many
    fit_images: int | None = None              # probes and kNN: train-split images they were fitted on
    probe: str | None = None                   # "linear probe" or "kNN"
    probe_C: float | None = None               # the linear probe's L2 strength, chosen on val
    task: str = "multiclass"
    uncertain: str | None = None               # multi-label: the --uncertain policy
    thresholds: list | None = None             # multi-label: per-finding thresholds chosen on val
    threshold_rule: str | None = None
    small_split: list = field(default_factory=list)   # warnings: the split is too small for tight intervals

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Evaluated:
    """What one model predicted on the evaluated split, and where it came from."""
    name: str
    checkpoint: str
    kind: str                    # "classifier", "linear probe" or "kNN"
    filenames: list
    y_true: np.ndarray           # (N,) int64, in `class_names` order
    prob: np.ndarray             # (N, K) class probabilities
    features: np.ndarray         # (N, D) encoder embeddings, for t-SNE / UMAP
    class_names: list
    info: ModelInfo
    notes: list = field(default_factory=list)
    history_csv: str | None = None
    explained: object = None     # an `Explained` (network + preprocessing) for Grad-CAM; None for probes and kNN


def warn(notes: list, message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
    notes.append(message)


def read_table(args, num_classes, split_args: dict) -> data_loader.LabelTable:
    """The label file, with splits made the way the checkpoint's run made them when it has no split column."""
    split_args = {k: v for k, v in split_args.items() if v is not None}
    return data_loader.read_label_table(
        args.label_file, args.data_dir, num_classes=num_classes, seed=split_args.get("seed", args.split_seed),
        val_fraction=split_args.get("val_fraction", 0.15), test_fraction=split_args.get("test_fraction", 0.15))


def check_label_hash(recorded, table, label_file: str, path: str, notes: list) -> None:
    if recorded and recorded != table.sha256:
        warn(notes, f"{label_file} is not the label file {os.path.basename(path)} was trained with (SHA-256 "
                    f"{table.sha256[:12]}... vs {recorded[:12]}...); scoring with the labels it gives now")


def labels_in_class_order(table, class_names: list, label_file: str) -> np.ndarray:
    """Labels as indices into the checkpoint's `class_names` (a label file with names may order them differently,
    or lack a class)."""
    if all(name.lstrip("-").isdigit() for name in table.class_names):
        if table.labels.max() >= len(class_names):
            raise UserError(f"--label_file {label_file}: label {int(table.labels.max())} is outside the "
                            f"checkpoint's {len(class_names)} classes [0, {len(class_names)}); use the label file "
                            f"it was trained with")
        return table.labels
    unknown = sorted(set(table.class_names) - set(class_names))
    if unknown:
        raise UserError(f"--label_file {label_file}: class {unknown[0]!r} is not one the checkpoint knows "
                        f"({', '.join(class_names)}); use the label file it was trained with")
    return np.array([class_names.index(table.class_names[i]) for i in table.labels], dtype=np.int64)


def recorded_split(ckpt: dict, table, split: str, path: str, label_file: str, notes: list) -> np.ndarray:
    """Rows of `table` in the checkpoint's recorded split (every row for 'all'), in label-file order."""
    if split == "all":
        return table.indices("all")
    recorded = (ckpt.get("splits") or {}).get(split)
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


def check_not_trained_on(ckpt: dict, filenames: list, split: str, path: str, notes: list) -> None:
    """A val or test image the classifier was trained on would inflate every number: refuse."""
    trained = set(ckpt.get("train_files") or [])
    if split in ("train", "all"):
        warn(notes, f"--split {split} includes images {os.path.basename(path)} was trained on: its scores are "
                    f"optimistic and say nothing about new patients")
        return
    leaked = [f for f in filenames if f in trained]
    if leaked:
        raise UserError(f"--checkpoint {path}: {len(leaked)} {split}-split image(s) are among its training images "
                        f"(first {leaked[0]!r}); its recorded splits are inconsistent, retrain it")


def encode_images(encoder, filenames: list, ckpt: dict, args, device, autocast_dtype) -> np.ndarray:
    """Frozen encoder features (N, D) of `filenames`, decoded the way the checkpoint was trained."""
    store = data_loader.ImageStore(args.data_dir, filenames, ckpt["image_size"], args.cache_gb, ckpt.get("channels"))
    workers = args.num_workers
    if workers is None:
        workers = utils.default_num_workers(device, streaming=not store.in_memory)
    loader = data_loader.BatchLoader(store, np.arange(len(filenames)), batch_size=args.batch_size,
                                     num_workers=workers)
    print(f"encoding {len(filenames)} images at {ckpt['image_size']} px ...")
    features, _, indices = utils.extract_features(encoder.to(device), loader, data_loader.normalize, device,
                                                  autocast_dtype)
    return features[torch.argsort(indices)].numpy()


def history_beside(ckpt: dict, path: str, notes: list):
    """The per-epoch CSV the checkpoint names (train_ssl.py writes ssl_history.csv beside its checkpoints)."""
    name = ckpt.get("history_file") or ("ssl_history.csv" if ckpt["kind"] == "ssl" else None)
    if not name:
        return None
    csv_path = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(csv_path):
        if ckpt.get("history_file"):
            notes.append(f"no training curves: the history file {name} is not beside the checkpoint")
        return None
    return csv_path


def scored_rows(ckpt: dict, table, args, path: str, notes: list) -> tuple:
    """(rows, filenames) of a classifier's split to score: the one its checkpoint recorded, checked against the
    label file it was trained with and against its training images."""
    check_label_hash(ckpt.get("label_file_sha256"), table, args.label_file, path, notes)
    rows = recorded_split(ckpt, table, args.split, path, args.label_file, notes)
    filenames = [table.filenames[i] for i in rows]
    check_not_trained_on(ckpt, filenames, args.split, path, notes)
    return rows, filenames


def checked_num_classes(ckpt: dict, args, path: str, what: str) -> int:
    """The checkpoint's class (or finding) count; --num_classes, when given, must agree with it."""
    k = int(ckpt["num_classes"])
    if args.num_classes is not None and args.num_classes != k:
        raise UserError(f"--num_classes {args.num_classes}: {path} was trained for {k} {what}; "
                        f"drop the flag or pass --num_classes {k}")
    return k


def evaluate_classifier(path: str, name: str, ckpt: dict, args, device, autocast_dtype) -> list:
    """Softmax probabilities of a fine-tuned classifier on its recorded split."""
    notes, num_classes = [], checked_num_classes(ckpt, args, path, "classes")
    class_names = [str(c) for c in ckpt.get("class_names") or range(num_classes)]
    # no class count passed down: a label file lacking a class is still scorable, mapped by name below
    table = read_table(args, None, {"seed": ckpt.get("split_seed"), "val_fraction": ckpt.get("val_fraction"),
                                    "test_fraction": ckpt.get("test_fraction")})
    rows, filenames = scored_rows(ckpt, table, args, path, notes)

    model = load_classifier(ckpt, path)
    features = encode_images(model.encoder, filenames, ckpt, args, device, autocast_dtype)
    with torch.no_grad():
        prob = model.head.eval().cpu()(torch.from_numpy(features)).softmax(1).double().numpy()
    info = ModelInfo(args.split, "recorded in the checkpoint" if args.split != "all" else "label file", "classifier",
                     init=ckpt.get("init"), label_fraction=ckpt.get("label_fraction"), epoch=ckpt.get("epoch"),
                     num_epochs=(ckpt.get("args") or {}).get("num_epochs"))
    y_true = labels_in_class_order(table, class_names, args.label_file)[rows]
    explained = Explained(model, normalizer(ckpt), cam_layer_name(model.config, ckpt["image_size"], args.cam_layer),
                          args.data_dir, ckpt["image_size"], ckpt.get("channels", 3))
    return [Evaluated(name, path, "classifier", filenames, y_true, prob, features,
                      classifier_class_names(ckpt, args.label_file), info, notes, history_beside(ckpt, path, notes),
                      explained)]


PROBE_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)   # inverse L2 strength, on standardised features


@dataclass
class Probe:
    prob: np.ndarray        # (N, K) probabilities on the scored images (0 for classes unseen in training)
    C: float                # the inverse regularisation strength used
    chosen_by: str          # how C was chosen, in words


def _logistic(train_x, train_y, C: float, seed: int, notes: list):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(train_x, train_y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.append(f"the linear probe's solver (C={C:g}) stopped at max_iter=2000 before converging")
    return model


def _probabilities(model, x, k: int) -> np.ndarray:
    prob = np.zeros((len(x), k))
    prob[:, model.classes_] = model.predict_proba(x)
    return prob


def _probe_score(y, prob, k: int) -> float:
    """Val ROC-AUC (macro over the classes val holds), or accuracy where no AUC can be computed."""
    auc = compute_metrics(y, prob, k, resamples=0, seed=0)["roc_auc_macro"]["value"]
    return float(auc) if np.isfinite(auc) else float((prob.argmax(1) == y).mean())


def fit_linear_probe(train_x, train_y, eval_x, k: int, seed: int, notes: list, val_x=None, val_y=None) -> Probe:
    """Logistic regression on standardised frozen features. With val features, the L2 strength is chosen on
    them from PROBE_C_GRID (the SSL literature's linear evaluation does the same): a fixed C can hide what a
    few labels get out of good features. Without them C is 1."""
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        raise UserError("the linear probe needs at least two classes among the train-split images; "
                        "check the label file's split column")
    scaler = StandardScaler().fit(train_x)
    train_x = scaler.transform(train_x)
    C, chosen_by = 1.0, "fixed (no val split to choose it on)"
    if val_x is not None and len(val_y) > 0:
        val_x = scaler.transform(val_x)
        scores = {c: _probe_score(val_y, _probabilities(_logistic(train_x, train_y, c, seed, []), val_x, k), k)
                  for c in PROBE_C_GRID}
        C = max(scores, key=lambda c: (scores[c], -c))               # ties: the stronger regularisation
        chosen_by = f"chosen on {len(val_y)} val images (val ROC-AUC {scores[C]:.3f}) from {list(PROBE_C_GRID)}"
    model = _logistic(train_x, train_y, C, seed, notes)
    return Probe(_probabilities(model, scaler.transform(eval_x), k), C, chosen_by)


def pretraining_overlap(ckpt: dict, filenames: list, split: str, path: str, notes: list) -> None:
    """An SSL run given the label file leaves the test split out of pretraining; say so when it did not."""
    if split != "test":
        return
    seen = utils.not_left_out_of_pretraining(ckpt, filenames)
    if seen is None:
        notes.append(f"{os.path.basename(path)} records no test images left out of pretraining: the encoder may "
                     f"have seen the test images (without labels)")
        return
    if seen:
        warn(notes, f"{len(seen)} of the {len(filenames)} test images were not left out of pretraining "
                    f"(first {seen[0]!r}); the label file or its split differs from the pretraining run's")


def ssl_encoder(ckpt: dict, path: str, pretrained: bool = True) -> torch.nn.Module:
    """The encoder of an SSL checkpoint, with its weights (or, pretrained=False, at random init)."""
    config = model_ssl.ModelConfig(**ckpt["model_config"])
    encoder = model_ssl.build_encoder(config.backbone, config.small_stem)
    if pretrained:
        utils.load_state_strict(encoder, ckpt["encoder"], "encoder", path)
    return encoder


def evaluate_ssl(path: str, name: str, ckpt: dict, args, device, autocast_dtype) -> list:
    """A pretrained encoder as a representation: a linear probe and a kNN on frozen train-split features."""
    notes = []
    run_args = ckpt.get("args") or {}
    table = read_table(args, args.num_classes, {"seed": run_args.get("split_seed", run_args.get("seed"))})
    check_label_hash(ckpt.get("label_file_sha256"), table, args.label_file, path, notes)
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
    knn = utils.knn_predict(torch.from_numpy(fit_x), torch.from_numpy(fit_y), torch.from_numpy(eval_x), k).numpy()
    info = ModelInfo(args.split, "label file", "ssl", init="ssl, frozen encoder", epoch=ckpt.get("epoch"),
                     num_epochs=run_args.get("num_epochs"), fit_images=int(len(fit_rows)))
    history = history_beside(ckpt, path, notes)
    chosen = [f"linear probe: L2 strength C={probe.C:g}, {probe.chosen_by}"]
    return [Evaluated(f"{name} {kind}", path, kind, filenames, y, prob.astype(np.float64), eval_x,
                      data_loader.read_class_names(args.label_file, table.class_names), dataclasses.replace(info, probe=kind, probe_C=probe.C if kind == "linear probe" else None),
                      list(notes) + extra, history)
            for kind, prob, extra in (("linear probe", probe.prob, chosen), ("kNN", knn, []))]


def default_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def evaluate_checkpoint(path: str, name: str, args, device, autocast_dtype, ckpt: dict | None = None) -> list:
    """Predictions of one checkpoint (loaded from `path` unless given) on the split `args` asks for."""
    if ckpt is None:
        ckpt = utils.load_checkpoint(path, kind=("classifier", "ssl"))
    for key in ("image_size", "encoder"):
        if key not in ckpt:
            raise UserError(f"--checkpoint {path}: has no {key!r} entry (see docs/checkpoints.md)")
    if ckpt["kind"] == "classifier" and ckpt.get("task") == "multilabel":
        return evaluate_multilabel_classifier(path, name, ckpt, args, device, autocast_dtype)
    if ckpt["kind"] == "ssl" and data_loader.label_file_format(args.label_file) != "classes":
        raise UserError(f"--checkpoint {path}: an SSL checkpoint is probed with one class per image, and "
                        f"{args.label_file} is multi-label; fine-tune it (fine_tune.py --ssl_checkpoint) and evaluate "
                        f"that checkpoint")
    run = evaluate_classifier if ckpt["kind"] == "classifier" else evaluate_ssl
    return run(path, name, ckpt, args, device, autocast_dtype)


# ============ figures ============

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def class_colors(k: int) -> list:
    cmap = pyplot().get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def with_ci(m: dict, index=None, digits: int = 3) -> str:
    """'0.812 [0.750, 0.870]' for a metric entry (a per-class one when `index` is given)."""
    pick = (lambda a: a) if index is None else (lambda a: np.asarray(a)[index])
    value, low, high = pick(m["value"]), pick(m["low"]), pick(m["high"])
    if not np.isfinite(value):
        return "n/a"
    ci = f" [{fmt(low, digits)}, {fmt(high, digits)}]" if np.isfinite(low) else ""
    return fmt(value, digits) + ci


def plot_confusion(ev: Evaluated, path: str) -> None:
    plt = pyplot()
    k = len(ev.class_names)
    cm = confusion_matrices(np.ones((1, len(ev.y_true))), ev.y_true, ev.prob.argmax(1), k)[0]
    rows = cm.sum(1, keepdims=True)
    normalised = _ratio(cm, rows)
    size = max(4.0, 0.55 * k + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    panels = ((axes[0], cm, "counts", True), (axes[1], normalised, "row-normalised (recall)", False))
    for ax, data, title, as_int in panels:
        im = ax.imshow(np.nan_to_num(data), cmap="Blues", vmin=0, vmax=None if as_int else 1)
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images" if as_int else "fraction of the row")
        if as_int:
            bar.ax.yaxis.set_major_locator(pyplot().MaxNLocator(integer=True))
        peak = np.nanmax(data) if np.isfinite(data).any() else 1
        for i in range(k):
            for j in range(k):
                v = data[i, j]
                text = "–" if not np.isfinite(v) else (f"{int(v)}" if as_int else f"{v:.2f}")
                ax.text(j, i, text, ha="center", va="center", fontsize=max(6, 11 - k // 3),
                        color="white" if np.isfinite(v) and v > 0.6 * peak else "black")
        ax.set_xticks(range(k), ev.class_names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), [f"{c} (n={int(r)})" for c, r in zip(ev.class_names, rows[:, 0])])
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
    fig.suptitle(f"Confusion matrix: {ev.name}, {ev.info.split} split ({len(ev.y_true)} images)")
    fig.tight_layout()
    utils.atomic_savefig(fig, path)


def roc_curve_of(y_true, prob, k: int):
    """(fpr, tpr) of the headline curve: class 1 for binary, else the macro average over scorable classes."""
    from sklearn.metrics import roc_curve

    classes = [c for c in range(k) if 0 < (y_true == c).sum() < len(y_true)]
    if k == 2:
        classes = [1] if 1 in classes else []
    if not classes:
        return None
    curves = [roc_curve(y_true == c, prob[:, c])[:2] for c in classes]
    grid = np.unique(np.concatenate([f for f, _ in curves]))   # every knot: its area is the mean of the AUCs
    return grid, np.mean([np.interp(grid, f, t) for f, t in curves], axis=0)


def plot_roc(ev: Evaluated, metrics: dict, path: str) -> None:
    from sklearn.metrics import roc_curve

    plt = pyplot()
    k, colors = len(ev.class_names), class_colors(len(ev.class_names))
    fig, ax = plt.subplots(figsize=(6, 5.5))
    auc = metrics["roc_auc_per_class"]
    for c in ([1] if k == 2 else range(k)):
        if np.isfinite(auc["value"][c]):
            fpr, tpr, _ = roc_curve(ev.y_true == c, ev.prob[:, c])
            label = f"{ev.class_names[c]}{' (positive class)' if k == 2 else ''}: AUC {with_ci(auc, c)}"
            ax.plot(fpr, tpr, color=colors[c], lw=1.6, label=label)
    macro = roc_curve_of(ev.y_true, ev.prob, k)
    if k > 2 and macro is not None:
        ax.plot(*macro, color="black", lw=2.4, ls="--", label=f"macro average: AUC {with_ci(metrics['roc_auc_macro'])}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="chance (AUC 0.5)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", title=f"ROC curves{' (one-vs-rest)' if k > 2 else ''}: {ev.name}")
    ax.legend(loc="lower right", fontsize=8, title="95% bootstrap CI in brackets", title_fontsize=7)
    ax.grid(alpha=0.3)
    utils.atomic_savefig(fig, path)


def plot_pr(ev: Evaluated, metrics: dict, path: str) -> None:
    from sklearn.metrics import precision_recall_curve

    plt = pyplot()
    k, colors = len(ev.class_names), class_colors(len(ev.class_names))
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ap = metrics["pr_auc_per_class"]
    for c in ([1] if k == 2 else range(k)):
        if np.isfinite(ap["value"][c]):
            precision, recall, _ = precision_recall_curve(ev.y_true == c, ev.prob[:, c])
            ax.step(recall, precision, where="post", color=colors[c], lw=1.6,
                    label=f"{ev.class_names[c]}{' (positive class)' if k == 2 else ''}: AP {with_ci(ap, c)}")
            prevalence = (ev.y_true == c).mean()
            ax.axhline(prevalence, color=colors[c], lw=0.8, ls=":")
    ax.plot([], [], color="grey", lw=0.8, ls=":", label="chance (= class prevalence)")
    title = f"Precision-recall curves: {ev.name}"
    if k > 2:
        title += f"\nmacro AP {with_ci(metrics['pr_auc_macro'])}"
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.03), xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title=title)
    ax.legend(loc="best", fontsize=8, title="95% bootstrap CI in brackets", title_fontsize=7)
    ax.grid(alpha=0.3)
    utils.atomic_savefig(fig, path)


def plot_reliability(ev: Evaluated, metrics: dict, path: str) -> None:
    plt = pyplot()
    confidence, correct = ev.prob.max(1), ev.prob.argmax(1) == ev.y_true
    bins = confidence_bins(ev.prob)
    count = np.bincount(bins, minlength=ECE_BINS)
    accuracy = _ratio(np.bincount(bins, correct, ECE_BINS), count)
    mean_conf = _ratio(np.bincount(bins, confidence, ECE_BINS), count)
    centres, width = (np.arange(ECE_BINS) + 0.5) / ECE_BINS, 1 / ECE_BINS
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 4.8))
    floor = 1 / len(ev.class_names)                   # the top class always has at least 1/K
    for a in (ax, hist):
        a.axvspan(0, floor, color="0.92", zorder=0, label=f"below 1/{len(ev.class_names)}: impossible")
    used = count > 0
    ax.bar(centres[used], accuracy[used], width=width, edgecolor="black", color="tab:blue", alpha=0.8,
           label="accuracy in bin")
    ax.bar(centres[used], mean_conf[used] - accuracy[used], bottom=accuracy[used], width=width, color="tab:red",
           alpha=0.25, hatch="//", edgecolor="tab:red", label="gap (accuracy - confidence)")
    ax.plot(centres[used], mean_conf[used], "D", color="black", ms=4, label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)", ylabel="accuracy",
           title="reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centres, count, width=width, edgecolor="black", color="tab:grey")
    hist.axvline(confidence.mean(), color="tab:red", ls="--", label=f"mean confidence {confidence.mean():.3f}")
    hist.axvline(correct.mean(), color="tab:blue", ls="-", lw=2, label=f"accuracy {correct.mean():.3f}")
    hist.set(xlim=(0, 1.01), xlabel="confidence (top-class probability)", ylabel="images",
             title="confidence histogram")
    hist.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Calibration: {ev.name}, ECE {with_ci(metrics['ece'])} ({ECE_BINS} bins)")
    fig.tight_layout()
    utils.atomic_savefig(fig, path)


class ProjectionSkipped(Exception):
    """A 2-D projection that cannot be computed for this split; the reason goes into the report."""


def project_embedding(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2) with t-SNE or UMAP, neighbourhood sizes shrunk to fit small splits."""
    n = len(features)
    if n < 5:
        raise ProjectionSkipped(f"{method} needs at least 5 images; the split has {n}")
    if np.ptp(features, axis=0).max() == 0:
        raise ProjectionSkipped(f"{method} is meaningless: every image has the same embedding")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # umap and sklearn warn about small inputs and n_jobs
            if method == "t-SNE":
                from sklearn.manifold import TSNE
                solver = "exact" if n <= 500 else "barnes_hut"   # exact is faster below ~500 points
                return TSNE(perplexity=min(30.0, (n - 1) / 3), init="pca", method=solver,
                            random_state=seed).fit_transform(features)
            import umap  # slow import (numba); only when a figure needs it
            return umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1).fit_transform(features)
    except Exception as e:  # an optional figure must not lose the metrics already computed
        raise ProjectionSkipped(f"{method} failed on {n} images ({type(e).__name__}: {str(e)[:120]})")


def plot_embedding(coords: np.ndarray, ev: Evaluated, method: str, path: str) -> None:
    plt = pyplot()
    colors = class_colors(len(ev.class_names))
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for c, name in enumerate(ev.class_names):
        mask = ev.y_true == c
        if mask.any():
            ax.scatter(coords[mask, 0], coords[mask, 1], s=18 if len(coords) > 200 else 36, color=colors[c],
                       alpha=0.8, edgecolors="none", label=f"{name} (n={int(mask.sum())})")
    ax.set(xlabel=f"{method} 1", ylabel=f"{method} 2", xticks=[], yticks=[],
           title=f"{method} of encoder embeddings: {default_name(ev.checkpoint)}\n"
                 f"{ev.info.split} split, {len(coords)} images, coloured by true class")
    ax.legend(title="class", fontsize=8, loc="best")
    utils.atomic_savefig(fig, path)


# ============ Grad-CAM and the pointing game ============
# Heat maps come from the maintained `grad-cam` package (pytorch_grad_cam). Its GradCAM upsamples the
# map of one layer to the input size and scales each image's map to [0, 1].

CAM_LAYERS = ("layer4", "layer3", "layer2")
CAM_MIN_SIDE = 7           # deepest ResNet stage whose map is at least this many cells a side (7 at 224 px)
RANDOM_INIT_NAME = "random init"


def cam_layer_name(config: model_ssl.ModelConfig, image_size: int, choice: str = "auto") -> str:
    """The ResNet stage Grad-CAM reads. 'auto': the deepest with a map of at least CAM_MIN_SIDE cells: layer4
    at 224 px, but at 64 px layer4 is 2x2 cells, too coarse to say where a finding is, so layer2 (8x8)."""
    if choice != "auto":
        return choice
    side = image_size // (1 if config.small_stem else 4)        # after the stem: stride 1, or 2 plus a max-pool
    for name, stride in zip(CAM_LAYERS, (8, 4, 2)):
        if side // stride >= CAM_MIN_SIDE:
            return name
    return CAM_LAYERS[-1]


def load_classifier(ckpt: dict, path: str) -> model_ssl.Classifier:
    model = model_ssl.Classifier(model_ssl.ModelConfig(**ckpt["model_config"]), int(ckpt["num_classes"]))
    utils.load_state_strict(model.encoder, ckpt["encoder"], "encoder", path)
    utils.load_state_strict(model.head, ckpt["head"], "classification head", path)
    return model.eval()


def random_init_classifier(config: model_ssl.ModelConfig, num_classes: int, seed: int) -> model_ssl.Classifier:
    """The same network untrained: the reference a heat map must beat to say anything (Adebayo et al. 2018)."""
    torch.manual_seed(seed)
    return model_ssl.Classifier(config, num_classes).eval()


def normalizer(ckpt: dict):
    """uint8 (B, C, S, S) -> the float input the checkpoint was trained on (its recorded mean and std)."""
    norm = ckpt.get("normalization") or {}
    mean = torch.tensor(norm.get("mean", data_loader.IMAGENET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(norm.get("std", data_loader.IMAGENET_STD)).view(1, 3, 1, 1)
    return lambda images: (images.float() / 255.0 - mean.to(images.device)) / std.to(images.device)


def grad_cams(model, images: torch.Tensor, targets, layer: str, prepare, device, batch_size: int) -> np.ndarray:
    """Grad-CAM maps (N, S, S) in [0, 1] of `images` uint8 (N, C, S, S) for the class indices `targets`."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = model.to(device).eval()
    maps = []
    with GradCAM(model=model, target_layers=[getattr(model.encoder, layer)[-1]]) as cam:
        for start in range(0, len(images), batch_size):
            x = prepare(images[start:start + batch_size].to(device))
            batch_targets = [ClassifierOutputTarget(int(t)) for t in targets[start:start + batch_size]]
            maps.append(cam(input_tensor=x, targets=batch_targets))
    model.cpu()
    return np.concatenate(maps) if maps else np.zeros((0,) + tuple(images.shape[2:]))


def cam_peaks(cams: np.ndarray):
    """(row, col) of each map's maximum, and whether the map is blank (all zero: it points nowhere)."""
    flat = cams.reshape(len(cams), -1)
    rows, cols = np.unravel_index(flat.argmax(1), cams.shape[1:])
    return np.stack([rows, cols], 1), flat.max(1) <= 0


# A peak this close to the finding still counts (Zhang et al. 2018, "Top-down neural attention by excitation
# backprop": 15 px at 224 px). A ResNet stage's map is coarse (8x8 cells at 64 px) and its peak often sits
# on the finding's edge, a pixel outside; chance is computed with the same widened boxes.
POINTING_TOLERANCE = 15 / 224      # of the image's longer side


def box_mask(boxes: list, width: int, height: int, margin: int = 0) -> np.ndarray:
    """The pixels inside any of the boxes, each widened by `margin` pixels on every side."""
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0 - margin):max(0, y1 + margin), max(0, x0 - margin):max(0, x1 + margin)] = True
    return mask


def pointing_hits(cams: np.ndarray, boxes: list, sizes: list, tolerance: float = POINTING_TOLERANCE):
    """Per image: whether the map's peak lies in one of its finding boxes, widened by `tolerance` x the image
    side (boxes in the file's own pixels, `sizes` its (width, height)); the share of the image the widened
    boxes cover (a random peak's hit rate); and which maps are blank."""
    peaks, blank = cam_peaks(cams)
    side_y, side_x = cams.shape[1:]
    hits, chance = np.zeros(len(cams), bool), np.zeros(len(cams))
    for i, ((row, col), image_boxes, (w, h)) in enumerate(zip(peaks, boxes, sizes)):
        mask = box_mask(image_boxes, w, h, int(round(tolerance * max(w, h))))
        y, x = min(h - 1, int((row + 0.5) * h / side_y)), min(w - 1, int((col + 0.5) * w / side_x))
        hits[i] = mask[y, x] and not blank[i]
        chance[i] = mask.mean()
    return hits, chance, blank


def proportion_with_ci(hits: np.ndarray, resamples: int, seed: int) -> dict:
    """Mean of 0/1 outcomes with a percentile bootstrap 95% interval over images."""
    n = len(hits)
    draws = [w @ hits.astype(float) / n for w in bootstrap_weights(n, resamples, seed, _chunk(n))]
    low, high, _ = percentile_interval(np.concatenate(draws) if draws else np.zeros(0))
    return {"value": float(hits.mean()) if n else float("nan"), "low": float(low), "high": float(high)}


@dataclass
class Explained:
    """Grad-CAM inputs of one scored classifier: the network, its preprocessing and the images it scored."""
    model: torch.nn.Module
    prepare: object
    layer: str
    root: str
    image_size: int
    channels: int


def decode_images(root: str, filenames: list, ex: Explained) -> torch.Tensor:
    return torch.stack([data_loader.decode_to_tensor(os.path.join(root, f), ex.image_size, ex.channels)
                        for f in filenames]) if filenames else torch.zeros(0, ex.channels, ex.image_size, ex.image_size,
                                                                           dtype=torch.uint8)


def image_sizes(root: str, filenames: list) -> list:
    from PIL import Image

    sizes = []
    for f in filenames:
        with Image.open(os.path.join(root, f)) as im:
            sizes.append(im.size)
    return sizes


def pointing_game(evaluated: list, findings: dict, args, device) -> list:
    """Pointing-game rows for every classifier scored (Grad-CAM of the true class on each split image with a
    finding) and for the same network at random init; [] when no scored image has a finding box."""
    models = [(ev.name, ev) for ev in evaluated if ev.explained is not None]
    if not models or findings is None:
        return []
    first = models[0][1]
    ex0 = first.explained
    keep = [i for i, f in enumerate(first.filenames) if findings.get(f)]
    if not keep:
        return []
    files = [first.filenames[i] for i in keep]
    images, sizes = decode_images(ex0.root, files, ex0), image_sizes(ex0.root, files)
    boxes, targets = [findings[f] for f in files], first.y_true[keep]
    config, k = ex0.model.config, len(first.class_names)
    random_model = Explained(random_init_classifier(config, k, args.seed), ex0.prepare, ex0.layer, ex0.root,
                             ex0.image_size, ex0.channels)
    rows = []
    for name, ex in [(n, ev.explained) for n, ev in models] + [(RANDOM_INIT_NAME, random_model)]:
        if (ex.image_size, ex.channels) != (ex0.image_size, ex0.channels):
            continue                                         # another resolution: not the same images
        print(f"pointing game: Grad-CAM ({ex.layer}) of {name} on {len(files)} images with a finding ...")
        cams = grad_cams(ex.model, images, targets, ex.layer, ex.prepare, device, args.batch_size)
        hits, chance, blank = pointing_hits(cams, boxes, sizes)
        rows.append({"model": name, "images": len(files), "hits": int(hits.sum()), "layer": ex.layer,
                     "blank_maps": int(blank.sum()), "chance": float(chance.mean()),
                     **proportion_with_ci(hits, args.bootstrap, args.seed)})
    return rows


def pointing_sentences(rows: list) -> list:
    if not rows:
        return []
    n, chance = rows[0]["images"], rows[0]["chance"]
    lines = [f"Pointing game: the share of the {n} split images with a drawn finding (findings.csv) whose "
             f"Grad-CAM peak, for the true class, falls inside the finding's box (widened by "
             f"{POINTING_TOLERANCE:.1%} of the image side, 15 px at 224 px, as Zhang et al. 2018). Chance (a "
             f"random peak) is {chance:.3f}, the share of the image the widened boxes cover. 95% bootstrap "
             f"intervals over images.", "",
             "| model | Grad-CAM layer | hits | pointing accuracy [95% CI] | blank maps |", "|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['hits']}/{r['images']} | {with_ci(r)} | {r['blank_maps']} |")
    lines += ["", "A blank map (Grad-CAM zero everywhere) points nowhere and counts as a miss.", "",
              "![Pointing game](pointing_game.png)"]
    return lines


def plot_pointing_game(rows: list, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2.5, 4))
    values = np.array([r["value"] for r in rows])
    errors = np.array([[r["value"] - r["low"], r["high"] - r["value"]] for r in rows]).T
    colors = ["tab:grey" if r["model"] == RANDOM_INIT_NAME else c for r, c in zip(rows, class_colors(len(rows)))]
    ax.bar(range(len(rows)), values, color=colors, yerr=np.nan_to_num(errors), capsize=6, edgecolor="black")
    ax.axhline(rows[0]["chance"], color="black", ls=":", label=f"chance ({rows[0]['chance']:.2f}: box area share)")
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set(ylim=(0, 1.02), ylabel="Grad-CAM peak inside the finding",
           title=f"Pointing game on {rows[0]['images']} images with a finding\n(95% bootstrap CI)")
    ax.legend(fontsize=8, loc="upper right")
    utils.atomic_savefig(fig, path)


def gradcam_examples(ev: Evaluated) -> list:
    """Split indices, two per true class (row): the most confident correct and the most confident wrong
    prediction, None where the split has no such image."""
    pred, conf = ev.prob.argmax(1), ev.prob.max(1)
    picks = []
    for c in range(len(ev.class_names)):
        for correct in (True, False):
            idx = np.flatnonzero((ev.y_true == c) & ((pred == c) == correct))
            picks.append(int(idx[np.argmax(conf[idx])]) if len(idx) else None)
    return picks


def overlay(image: torch.Tensor, cam: np.ndarray) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = image.float().div(255).expand(3, -1, -1).permute(1, 2, 0).numpy()
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.55)


def plot_cam_grid(panels: list, path: str, title: str, ncols: int = 4) -> None:
    """panels: (overlay RGB or None for an empty cell, panel title, finding boxes in input pixels) -> a grid."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols + 1.0, 3.3 * nrows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (rgb, text, boxes) in zip(axes.flat, panels):
        if rgb is None:
            ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes)
            continue
        ax.imshow(rgb)
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.2, ls="--"))
        ax.set_title(text, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    utils.atomic_savefig(fig, path)


def scaled_boxes(boxes: list, size: tuple, side: int) -> list:
    """Finding boxes in the file's pixels -> in the model input's pixels."""
    w, h = size
    return [(x0 * side / w, y0 * side / h, x1 * side / w, y1 * side / h) for x0, y0, x1, y1 in boxes]


def write_gradcam_figure(ev: Evaluated, findings, folder: str, device, batch_size: int) -> str | None:
    """gradcam.png: for each class the most confident correct and wrong images with the heat map of the
    predicted class; returns why it was skipped, or None."""
    ex = ev.explained
    slots = gradcam_examples(ev)
    picks = [i for i in slots if i is not None]
    if ex is None or not picks:
        return None
    files = [ev.filenames[i] for i in picks]
    images = decode_images(ex.root, files, ex)
    pred = ev.prob[picks].argmax(1)
    cams = dict(zip(picks, grad_cams(ex.model, images, pred, ex.layer, ex.prepare, device, batch_size)))
    images, files = dict(zip(picks, images)), dict(zip(picks, files))
    panels = []
    for slot, i in enumerate(slots):
        name = ev.class_names[slot // 2]
        if i is None:
            panels.append((None, f"true {name}:\nno {'correct' if slot % 2 == 0 else 'wrong'} prediction", []))
            continue
        p = ev.class_names[int(ev.prob[i].argmax())]
        boxes = findings.get(files[i], []) if findings else []
        boxes = scaled_boxes(boxes, image_sizes(ex.root, [files[i]])[0], ex.image_size) if boxes else []
        panels.append((overlay(images[i], cams[i]), f"{'correct' if slot % 2 == 0 else 'WRONG'}: true {name}\n"
                                                    f"pred {p} (p={ev.prob[i].max():.2f})", boxes))
    plot_cam_grid(panels, os.path.join(folder, "gradcam.png"),
                  f"Grad-CAM ({ex.layer}) of the predicted class: {ev.name}\nper true class, the most confident "
                  f"correct and wrong prediction" + ("; dashed: where the finding was drawn" if findings else ""),
                  ncols=2)
    return "gradcam.png"


# ============ verdicts in words, and warnings about small splits ============

VERDICT_METRICS = {"balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "f1_macro": "macro F1",
                   "roc_auc_macro": "ROC-AUC", "ece": "calibration error (ECE)"}
LOWER_IS_BETTER = {"ece"}
ACCURACY_HALF_WIDTHS = (0.10, 0.05)     # interval half-widths the small-split warning says how to reach
MIN_CLASS_IMAGES = 30                   # below this a class's recall interval is wider than about +-0.18


def paired_metric_differences(y_true, prob_a, prob_b, k: int, resamples: int, seed: int) -> dict:
    """{metric: difference A - B, 95% paired-bootstrap interval}: both models scored on the same resampled
    images, so what the images have in common cancels out."""
    y_true = np.asarray(y_true)
    n, counts = len(y_true), np.bincount(y_true, minlength=k)
    scorable = (counts > 0) & (counts < n)
    keys = list(VERDICT_METRICS)
    a, b = (all_metrics(np.ones((1, n)), y_true, p, k, scorable) for p in (prob_a, prob_b))
    draws = []
    for w in bootstrap_weights(n, resamples, seed, _chunk(n, k)):
        da, db = all_metrics(w, y_true, prob_a, k, scorable), all_metrics(w, y_true, prob_b, k, scorable)
        draws.append(np.stack([da[key] - db[key] for key in keys], 1))
    samples = np.concatenate(draws) if draws else np.zeros((0, len(keys)))
    low, high, _ = percentile_interval(samples)
    out = {}
    for j, key in enumerate(keys):
        diff = float(a[key][0] - b[key][0])
        excludes = bool(np.isfinite(low[j]) and (low[j] > 0 or high[j] < 0))
        out[key] = {"difference": diff, "low": float(low[j]), "high": float(high[j]), "excludes_zero": excludes}
    return out


def _signed(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.3f}"


def metric_verdict(name_a: str, name_b: str, key: str, d: dict) -> str:
    """One clause: which model is better on one metric, by how much, or no significant difference."""
    label, ci = VERDICT_METRICS[key], f"95% CI [{_signed(d['low'])}, {_signed(d['high'])}]"
    if not np.isfinite(d["difference"]):
        return f"{label}: undefined on these images"
    if not d["excludes_zero"]:
        return f"{label}: no significant difference ({name_a} minus {name_b} {_signed(d['difference'])}, {ci})"
    a_better = (d["difference"] < 0) if key in LOWER_IS_BETTER else (d["difference"] > 0)
    winner, loser = (name_a, name_b) if a_better else (name_b, name_a)
    word = "lower" if key in LOWER_IS_BETTER else "higher"
    return f"{label}: **{winner}** is better, {abs(d['difference']):.3f} {word} than {loser} ({ci})"


def verdict_lines(paired) -> list:
    """The first lines of a comparison: did the first model beat the second (did SSL help), metric by metric."""
    if paired is None:
        return ["**Verdict:** the first two models share no scored image, so they cannot be compared."]
    a, b, diffs = paired["model_a"], paired["model_b"], paired["metrics"]
    primary = diffs["balanced_accuracy"]
    ssl_vs_scratch = {paired.get("init_a"), paired.get("init_b")} == {"ssl", "scratch"}
    if not primary["excludes_zero"]:
        head = ("SSL pretraining made **no significant difference**" if ssl_vs_scratch else
                f"**No significant difference** between {a} and {b}")
    else:
        winner = a if primary["difference"] > 0 else b
        helped = (winner == a) == (paired.get("init_a") == "ssl")
        head = (f"SSL pretraining **{'helped' if helped else 'hurt'}**" if ssl_vs_scratch
                else f"**{winner}** is better")
    head += (f" in balanced accuracy on the {paired['num_images']} {paired['split']} images: {a} minus {b} "
             f"{_signed(primary['difference'])} (paired bootstrap 95% CI [{_signed(primary['low'])}, "
             f"{_signed(primary['high'])}]).")
    return [f"**Verdict:** {head}", ""] + [f"- {metric_verdict(a, b, key, d)}" for key, d in diffs.items()]


def provenance_lines(ev: Evaluated, args, split_detail: str = "", extra: list = ()) -> list:
    """A report's bullets on where its numbers came from: checkpoint, split (+ split_detail), `extra`, label
    file and bootstrap settings."""
    return [f"- checkpoint: `{os.path.abspath(ev.checkpoint)}` ({describe(ev)})",
            f"- split: **{ev.info.split}** ({ev.info.split_source}), {len(ev.y_true)} images{split_detail}",
            *extra,
            f"- label file: `{os.path.abspath(args.label_file)}`",
            f"- intervals: {args.bootstrap} bootstrap resamples of the images, 95% percentile, seed {args.seed}"]


def headline_sentence(ev: Evaluated, metrics: dict) -> str:
    """The one-model verdict: the headline metrics in one sentence."""
    auc_key = "roc_auc" if len(ev.class_names) == 2 else "roc_auc_macro"
    return (f"**Summary:** on {len(ev.y_true)} {ev.info.split}-split images, {ev.name} has balanced accuracy "
            f"{with_ci(metrics['balanced_accuracy'])}, accuracy {with_ci(metrics['accuracy'])}, macro F1 "
            f"{with_ci(metrics['f1_macro'])} and ROC-AUC {with_ci(metrics[auc_key])} (95% bootstrap CI; chance "
            f"balanced accuracy {1 / len(ev.class_names):.3f}).")


def images_for_half_width(half_width: float, p: float = 0.5) -> int:
    """Images a proportion near p needs for a 95% interval of +-half_width (normal approximation)."""
    return int(np.ceil(1.96 ** 2 * p * (1 - p) / half_width ** 2))


def small_split_warnings(ev: Evaluated, metrics: dict) -> list:
    """Sentences for a split (or a class in it) too small for its intervals to mean much."""
    n, out = len(ev.y_true), []
    need = [images_for_half_width(h) for h in ACCURACY_HALF_WIDTHS]
    if n < need[0]:
        out.append(f"only {n} {ev.info.split} images: a 95% interval for accuracy is about "
                   f"+-{1.96 * np.sqrt(0.25 / n):.2f} wide, and bootstrap intervals of so few images can be "
                   f"degenerate (e.g. [0.500, 0.500]); about {need[0]} images give +-{ACCURACY_HALF_WIDTHS[0]:.2f} "
                   f"and {need[1]} give +-{ACCURACY_HALF_WIDTHS[1]:.2f}")
    small = [(name, int(c)) for name, c in zip(ev.class_names, metrics["support"]) if 0 < c < MIN_CLASS_IMAGES]
    if small:
        shown = ", ".join(f"{name} ({c})" for name, c in small)
        out.append(f"few images of class {shown}: a per-class recall or precision interval is wider than "
                   f"+-{1.96 * np.sqrt(0.25 / MIN_CLASS_IMAGES):.2f} below {MIN_CLASS_IMAGES} images of the class; "
                   f"about {need[0]} per class give +-{ACCURACY_HALF_WIDTHS[0]:.2f}")
    return out


# ============ files of one model ============

def plain(x):
    """A float for JSON; NaN (an undefined metric) becomes null."""
    x = float(x)
    return x if np.isfinite(x) else None


def metrics_document(ev: Evaluated, metrics: dict, args) -> dict:
    scalars = {key: {"value": plain(metrics[key]["value"]), "ci95": [plain(metrics[key]["low"]),
                                                                     plain(metrics[key]["high"])],
                     "resamples_used": int(metrics[key]["valid"])} for key in SCALAR_METRICS}
    per_class = {key: {name: {"value": plain(metrics[key]["value"][c]),
                              "ci95": [plain(metrics[key]["low"][c]), plain(metrics[key]["high"][c])]}
                       for c, name in enumerate(ev.class_names)} for key in PER_CLASS_METRICS}
    per_class["support"] = {name: int(n) for name, n in zip(ev.class_names, metrics["support"])}
    return {"model": ev.name, "checkpoint": os.path.abspath(ev.checkpoint), "kind": ev.kind, **ev.info.as_dict(),
            "num_images": len(ev.y_true), "class_names": ev.class_names, "label_file": os.path.abspath(args.label_file),
            "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "interval": "percentile, 95%",
                          "unit": "image"},
            "metrics": scalars, "per_class": per_class, "notes": ev.notes}


def metric_notes(ev: Evaluated, metrics: dict, resamples: int) -> list:
    """Sentences for undefined or thinly supported numbers, so an 'n/a' never goes unexplained."""
    notes = []
    predicted = np.bincount(ev.prob.argmax(1), minlength=len(ev.class_names))
    for c, name in enumerate(ev.class_names):
        if metrics["support"][c] == 0:
            notes.append(f"class {name!r} has no images in the {ev.info.split} split: its recall, ROC-AUC and "
                         f"PR-AUC are undefined (n/a) and the macro averages leave it out")
        elif predicted[c] == 0:
            notes.append(f"class {name!r} is never predicted: its precision is undefined (n/a)")
    used = int(metrics["roc_auc"]["valid"])
    if resamples and used < resamples:
        notes.append(f"the ROC-AUC interval uses {used} of {resamples} resamples; the others lost a class")
    return notes


def write_predictions(ev: Evaluated, path: str) -> None:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["filename", "true", "predicted"] + [f"prob_{c}" for c in ev.class_names])
    for f, t, p in zip(ev.filenames, ev.y_true, ev.prob):
        w.writerow([f, ev.class_names[t], ev.class_names[int(p.argmax())]] + [f"{v:.6f}" for v in p])
    utils.atomic_write_text(path, out.getvalue())


def write_classification_report(ev: Evaluated, metrics: dict, path: str) -> None:
    from sklearn.metrics import classification_report

    k = len(ev.class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = classification_report(ev.y_true, ev.prob.argmax(1), labels=list(range(k)),
                                     target_names=ev.class_names, digits=3, zero_division=0)
    lines = [f"{ev.name}: {ev.info.split} split, {len(ev.y_true)} images", "", text, "",
             "95% bootstrap confidence intervals (percentile, resampling images):", ""]
    lines += [f"  {label:<48} {with_ci(metrics[key])}" for key, label in headline_metrics(ev.class_names).items()]
    for c, name in enumerate(ev.class_names):
        lines += ["", f"  class {name} (n={int(metrics['support'][c])})"]
        lines += [f"    {label:<46} {with_ci(metrics[key], c)}" for key, label in PER_CLASS_METRICS.items()]
    utils.atomic_write_text(path, "\n".join(lines) + "\n")


def write_figures(ev: Evaluated, metrics: dict, folder: str, projections: dict) -> dict:
    """Every figure of one model; returns {file name: caption}, with a reason in place of a skipped one."""
    figures = {"confusion_matrix.png": "Confusion matrix (counts and row-normalised)",
               "roc_curves.png": "ROC curves", "pr_curves.png": "Precision-recall curves",
               "reliability.png": "Reliability diagram and confidence histogram"}
    plot_confusion(ev, os.path.join(folder, "confusion_matrix.png"))
    plot_roc(ev, metrics, os.path.join(folder, "roc_curves.png"))
    plot_pr(ev, metrics, os.path.join(folder, "pr_curves.png"))
    plot_reliability(ev, metrics, os.path.join(folder, "reliability.png"))
    for method, file in (("t-SNE", "tsne.png"), ("UMAP", "umap.png")):
        coords = projections[method]
        if isinstance(coords, str):
            ev.notes.append(f"no {file}: {coords}")
            continue
        plot_embedding(coords, ev, method, os.path.join(folder, file))
        figures[file] = f"{method} of the encoder's embeddings"
    if ev.history_csv:
        with open(ev.history_csv) as f:
            utils.atomic_write_text(os.path.join(folder, os.path.basename(ev.history_csv)), f.read())
        utils.plot_history(ev.history_csv, os.path.join(folder, "training_curves.png"),
                           f"Training curves: {ev.name} ({default_name(ev.checkpoint)})",
                           best_epoch=ev.info.epoch, chance=1 / len(ev.class_names))
        if os.path.isfile(os.path.join(folder, "training_curves.png")):
            figures["training_curves.png"] = "Training curves (from the history file beside the checkpoint)"
    return figures


def describe(ev: Evaluated) -> str:
    parts = [ev.kind]
    if ev.info.init:
        parts.append(f"init {ev.info.init}")
    if ev.info.label_fraction is not None:
        parts.append(f"{ev.info.label_fraction:.0%} of the train labels")
    if ev.info.epoch is not None:
        of = f" of {ev.info.num_epochs}" if ev.info.num_epochs else ""
        parts.append(f"{'pretraining: ' if ev.info.checkpoint_kind == 'ssl' else ''}best epoch {ev.info.epoch}{of}")
    if ev.info.fit_images:
        parts.append(f"fitted on {ev.info.fit_images} train-split images")
    return ", ".join(parts)


def headline_metrics(class_names: list) -> dict:
    """The rows a reader needs: AUCs of the positive class when binary, their macro averages otherwise."""
    rows = {key: SCALAR_METRICS[key] for key in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted")}
    if len(class_names) == 2:
        rows["roc_auc"] = f"ROC-AUC (positive class: {class_names[1]})"
        rows["pr_auc"] = f"PR-AUC (average precision, positive class: {class_names[1]})"
    else:
        rows["roc_auc_macro"] = SCALAR_METRICS["roc_auc_macro"]
        rows["pr_auc_macro"] = "PR-AUC (macro average precision)"
    return rows | {"ece": SCALAR_METRICS["ece"]}


def metrics_table(ev: Evaluated, metrics: dict) -> list:
    lines = ["| metric | value [95% CI] |", "|---|---|"]
    lines += [f"| {label} | {with_ci(metrics[key])} |" for key, label in headline_metrics(ev.class_names).items()]
    header = " | ".join(PER_CLASS_METRICS.values())
    lines += ["", f"| class | images | {header} |", "|---|---:|" + "---|" * len(PER_CLASS_METRICS)]
    for c, name in enumerate(ev.class_names):
        cells = " | ".join(with_ci(metrics[key], c) for key in PER_CLASS_METRICS)
        lines.append(f"| {name} | {int(metrics['support'][c])} | {cells} |")
    return lines


def write_model_report(ev: Evaluated, metrics: dict, figures: dict, args, path: str, pointing=()) -> None:
    lines = [f"# Evaluation: {ev.name}", "", headline_sentence(ev, metrics), ""]
    for w in ev.info.small_split:
        lines += [f"> **Caution:** {w}", ""]
    lines += provenance_lines(ev, args) + ["", "## Metrics", ""] + metrics_table(ev, metrics)
    if ev.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in ev.notes]
    if pointing:
        lines += ["", "## Grad-CAM pointing game", ""] + pointing_sentences(pointing)
    lines += ["", "## Figures", ""]
    for file, caption in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    lines += ["Files: [metrics.json](metrics.json), [classification_report.txt](classification_report.txt), "
              "[predictions.csv](predictions.csv)"]
    utils.atomic_write_text(path, "\n".join(lines) + "\n")


def write_model_outputs(ev: Evaluated, metrics: dict, folder: str, args, projections: dict, device=None,
                        findings=None, pointing=()) -> None:
    ev.notes.extend(metric_notes(ev, metrics, args.bootstrap))
    ev.info.small_split = small_split_warnings(ev, metrics)
    for w in ev.info.small_split:
        print(f"warning: {ev.name}: {w}")
    write_predictions(ev, os.path.join(folder, "predictions.csv"))
    write_classification_report(ev, metrics, os.path.join(folder, "classification_report.txt"))
    figures = write_figures(ev, metrics, folder, projections)
    figures |= write_explanations(ev, folder, args, device, findings, pointing)
    utils.atomic_write_json(os.path.join(folder, "metrics.json"), metrics_document(ev, metrics, args))
    write_model_report(ev, metrics, figures, args, os.path.join(folder, "report.md"), pointing)


def write_explanations(ev: Evaluated, folder: str, args, device, findings, pointing) -> dict:
    """Grad-CAM examples and the pointing-game figure of one model: {file: caption}."""
    figures = {}
    if args.gradcam and ev.explained is not None:
        print(f"Grad-CAM examples of {ev.name} ...")
        if write_gradcam_figure(ev, findings, folder, device or torch.device("cpu"), args.batch_size):
            figures["gradcam.png"] = ("Grad-CAM: per class, the most confident correct and wrong test images, "
                                      "heat map of the predicted class")
    elif ev.explained is None:
        ev.notes.append(f"no Grad-CAM: a {ev.kind} on frozen features has no network to take gradients through")
    if pointing:
        plot_pointing_game(pointing, os.path.join(folder, "pointing_game.png"))
    return figures


# ============ comparison of several models ============

def plot_roc_comparison(evaluated: list, results: list, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.8))
    colors, styles = class_colors(len(evaluated)), ["-", "--", "-.", (0, (1, 1))]
    for i, (ev, m) in enumerate(zip(evaluated, results)):
        curve = roc_curve_of(ev.y_true, ev.prob, len(ev.class_names))
        if curve is not None:                     # line styles keep identical curves visible
            key = "roc_auc" if len(ev.class_names) == 2 else "roc_auc_macro"
            ax.plot(*curve, color=colors[i], ls=styles[i % 4], lw=2, label=f"{ev.name}: AUC {with_ci(m[key])}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="chance (AUC 0.5)")
    binary = all(len(ev.class_names) == 2 for ev in evaluated)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)",
           title="ROC comparison" + (" (positive class)" if binary else " (macro average, one-vs-rest)"))
    ax.legend(loc="lower right", fontsize=8, title="95% bootstrap CI in brackets", title_fontsize=7)
    ax.grid(alpha=0.3)
    utils.atomic_savefig(fig, path)


def paired_comparison(a: Evaluated, b: Evaluated, resamples: int, seed: int):
    """The paired accuracy difference of two models on the images both scored, or None with no overlap."""
    rows_b = {f: i for i, f in enumerate(b.filenames)}
    common = [(i, rows_b[f]) for i, f in enumerate(a.filenames) if f in rows_b]
    if not common:
        return None
    ia, ib = np.array(common).T
    result = paired_accuracy_difference(a.y_true[ia], a.prob[ia], b.prob[ib], resamples, seed)
    result["metrics"] = paired_metric_differences(a.y_true[ia], a.prob[ia], b.prob[ib], len(a.class_names),
                                                  resamples, seed)
    return result | {"model_a": a.name, "model_b": b.name, "init_a": a.info.init,
                     "init_b": b.info.init, "split": a.info.split}


def comparison_rows(evaluated: list, results: list, folders: list) -> list:
    rows = []
    for ev, m, folder in zip(evaluated, results, folders):
        row = {"model": ev.name, "checkpoint": os.path.abspath(ev.checkpoint), "kind": ev.kind,
               "init": ev.info.init or "", "label_fraction": ev.info.label_fraction,
               "split": ev.info.split, "num_images": len(ev.y_true), "folder": os.path.basename(folder)}
        for key in COMPARISON_METRICS:
            row |= {key: plain(m[key]["value"]), f"{key}_ci_low": plain(m[key]["low"]),
                    f"{key}_ci_high": plain(m[key]["high"])}
        rows.append(row)
    return rows


def write_comparison(evaluated, results, folders, paired, args, pointing=()) -> None:
    out = args.output_dir
    rows = comparison_rows(evaluated, results, folders)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    utils.atomic_write_text(os.path.join(out, "comparison.csv"), buf.getvalue())
    plot_roc_comparison(evaluated, results, os.path.join(out, "roc_comparison.png"))

    header = ["model", "init", "label fraction", "images"]
    header += [SCALAR_METRICS[k].split(" (")[0] for k in COMPARISON_METRICS]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ev, m, r in zip(evaluated, results, rows):
        fraction = "" if r["label_fraction"] is None else f"{r['label_fraction']:.0%}"
        cells = [f"[{ev.name}]({r['folder']}/report.md)", r["init"], fraction, str(r["num_images"])]
        table.append("| " + " | ".join(cells + [with_ci(m[k]) for k in COMPARISON_METRICS]) + " |")
    cautions = list(dict.fromkeys(w for ev in evaluated for w in ev.info.small_split))
    lines = [f"# Comparison on the {args.split} split", ""] + verdict_lines(paired) + [""]
    for w in cautions:
        lines += [f"> **Caution:** {w}", ""]
    lines += [f"Values with 95% bootstrap intervals ({args.bootstrap} resamples of the images, seed {args.seed}). "
             f"ROC-AUC: the macro one-vs-rest average (with two classes, the positive class's AUC); "
             f"ECE (expected calibration error): lower is better.", ""] + table
    lines += ["", "## Paired differences", ""] + paired_sentences(paired)
    if pointing:
        lines += ["", "## Grad-CAM pointing game", ""] + pointing_sentences(pointing)
        plot_pointing_game(pointing, os.path.join(out, "pointing_game.png"))
    utils.atomic_write_text(os.path.join(out, "comparison.md"), "\n".join(lines) + "\n")
    report = lines + ["", "## ROC curves", "", "![ROC comparison](roc_comparison.png)", "",
                      "## Per-model reports", ""] + [f"- [{ev.name}]({os.path.basename(f)}/report.md)"
                                                     for ev, f in zip(evaluated, folders)]
    report[0] = f"# Evaluation report: {len(evaluated)} models on the {args.split} split"
    utils.atomic_write_text(os.path.join(out, "report.md"), "\n".join(report) + "\n")


def paired_sentences(paired) -> list:
    if paired is None:
        return ["The first two models share no evaluated image, so no paired difference is computed."]
    verdict = ("excludes zero: the difference is unlikely to be resampling noise" if paired["excludes_zero"]
               else "includes zero: the data do not show a difference")
    lines = [f"Accuracy of **{paired['model_a']}** minus **{paired['model_b']}** on the {paired['num_images']} "
             f"images both scored: **{paired['difference']:+.3f}** (95% CI [{fmt(paired['low'])}, "
             f"{fmt(paired['high'])}], paired bootstrap: the same resampled images for both). The interval {verdict}.",
             "", f"| metric | {paired['model_a']} minus {paired['model_b']} | 95% CI | significant |", "|---|---:|---|---|"]
    for key, d in paired.get("metrics", {}).items():
        lines.append(f"| {VERDICT_METRICS[key]} | {_signed(d['difference'])} | [{_signed(d['low'])}, "
                     f"{_signed(d['high'])}] | {'yes' if d['excludes_zero'] else 'no'} |")
    return lines


# ============ predictions on a folder of new images (--images) ============

def check_predict_checkpoint(ckpt: dict, path: str) -> None:
    if ckpt["kind"] == "ssl":
        raise UserError(f"--checkpoint {path}: is an SSL encoder, which predicts no class; pass the classifier "
                        f"fine_tune.py wrote (best_finetuned_model.pth or best_baseline_model.pth) with --images")


def classifier_class_names(ckpt: dict, label_file: str | None) -> list:
    """Readable class names of a classifier: recorded in the checkpoint, else classes.txt beside the label file
    (the one given, or the one it was trained with), else the raw labels."""
    raw = [str(c) for c in ckpt.get("class_names") or range(int(ckpt["num_classes"]))]
    recorded = ckpt.get("class_display_names")
    if recorded and len(recorded) == len(raw):
        return [str(c) for c in recorded]
    for candidate in (label_file, (ckpt.get("args") or {}).get("label_file")):
        if candidate:
            names = data_loader.read_class_names(candidate, raw)
            if names != raw:
                return names
    return raw


@torch.no_grad()
def predict_store(model, store, prepare, device, autocast_dtype, batch_size: int, multilabel: bool = False):
    """Probabilities (N, K) of every image in `store`, batched, with a progress bar: softmax over the
    classes, or one sigmoid per finding for a multi-label classifier."""
    from tqdm import tqdm

    model = model.to(device).eval()
    loader = data_loader.BatchLoader(store, np.arange(len(store)), batch_size=batch_size)
    probs = []
    for images, _, _ in tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True):
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(prepare(images.to(device)))
        probs.append((logits.float().sigmoid() if multilabel else logits.float().softmax(1)).cpu())
    model.cpu()
    return torch.cat(probs).double().numpy()


def write_folder_predictions(filenames: list, prob: np.ndarray, class_names: list, path: str,
                             thresholds=None) -> None:
    """predictions.csv: the predicted class (multi-label: the |-joined findings at or above their recorded val
    thresholds, "No Finding" for none) and one probability column per class."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["filename", "predicted"] + [f"prob_{c}" for c in class_names])
    for f, p in zip(filenames, prob):
        if thresholds is None:
            predicted = class_names[int(p.argmax())]
        else:
            predicted = "|".join(c for c, v, t in zip(class_names, p, thresholds) if v >= t) or "No Finding"
        w.writerow([f, predicted] + [f"{v:.6f}" for v in p])
    utils.atomic_write_text(path, out.getvalue())


def write_folder_gradcam(filenames, prob, class_names, ex: Explained, args, device, per_class: int = 3):
    """gradcam.png for --images: the `per_class` most confident images of each predicted class."""
    pred, conf = prob.argmax(1), prob.max(1)
    picks = [i for c in range(len(class_names)) for i in np.flatnonzero(pred == c)[np.argsort(-conf[pred == c])][:per_class]]
    files = [filenames[i] for i in picks]
    images = decode_images(ex.root, files, ex)
    cams = grad_cams(ex.model, images, pred[picks], ex.layer, ex.prepare, device, args.batch_size)
    panels = [(overlay(im, cam), f"{f[-28:]}\npred {class_names[pred[i]]} (p={conf[i]:.2f})", [])
              for i, f, im, cam in zip(picks, files, images, cams)]
    plot_cam_grid(panels, os.path.join(args.output_dir, "gradcam.png"),
                  f"Grad-CAM ({ex.layer}) of the predicted class: the {per_class} most confident images per class")


def write_folder_summary(args, ckpt, names, filenames, skipped, prob, has_cam: bool) -> str:
    pred, conf = prob.argmax(1), prob.max(1)
    lines = [f"# Predictions for {os.path.abspath(args.images)}", "",
             f"**Summary:** {len(filenames)} image(s) scored by `{os.path.basename(args.checkpoint[0])}` "
             f"({describe_checkpoint(ckpt)}); {len(skipped)} unreadable file(s) skipped.", "",
             "| predicted class | images | mean probability |", "|---|---:|---:|"]
    for c, name in enumerate(names):
        chosen = pred == c
        mean = f"{conf[chosen].mean():.3f}" if chosen.any() else "-"
        lines.append(f"| {name} | {int(chosen.sum())} | {mean} |")
    unsure = int((conf < 0.5).sum())
    lines += ["", f"- {unsure} image(s) have a top probability below 0.5: look at them yourself.",
              f"- preprocessing: resized to {ckpt['image_size']} px, {ckpt.get('channels', 3)} channel(s), the "
              f"checkpoint's normalisation; probabilities are the model's, not calibrated risks.",
              "- all predictions: [predictions.csv](predictions.csv)"]
    if skipped:
        lines += ["", "## Skipped (unreadable)", ""] + [f"- `{f}`" for f in skipped]
    if has_cam:
        lines += ["", "## Grad-CAM", "", "![Grad-CAM](gradcam.png)"]
    utils.atomic_write_text(os.path.join(args.output_dir, "summary.md"), "\n".join(lines) + "\n")
    return lines[2]


def describe_checkpoint(ckpt: dict) -> str:
    init = {"ssl": "SSL init", "scratch": "from scratch"}.get(ckpt.get("init"), ckpt.get("init") or "classifier")
    epochs = (ckpt.get("args") or {}).get("num_epochs")
    return init + (f", best epoch {ckpt['epoch']} of {epochs}" if ckpt.get("epoch") and epochs else "")


def predict_folder(args, device, autocast_dtype) -> dict:
    """--images: class probabilities for every readable image under the folder; no labels needed."""
    path = args.checkpoint[0]
    ckpt = utils.load_checkpoint(path, kind=("classifier", "ssl"))
    check_predict_checkpoint(ckpt, path)
    names = classifier_class_names(ckpt, args.label_file)
    all_files = data_loader.list_images(args.images)
    store = data_loader.ImageStore(args.images, all_files, ckpt["image_size"], args.cache_gb, ckpt.get("channels"),
                                   skip_unreadable=True)
    kept = set(store.filenames)
    skipped = [f for f in all_files if f not in kept]
    model, prepare = load_classifier(ckpt, path), normalizer(ckpt)
    print(f"predicting {len(store)} image(s) at {ckpt['image_size']} px on {device} ...")
    multilabel = ckpt.get("task") == "multilabel"
    prob = predict_store(model, store, prepare, device, autocast_dtype, args.batch_size, multilabel)
    thresholds = ckpt.get("thresholds") or [0.5] * len(names) if multilabel else None
    write_folder_predictions(store.filenames, prob, names, os.path.join(args.output_dir, "predictions.csv"),
                             thresholds)
    ex = Explained(model, prepare, cam_layer_name(model.config, ckpt["image_size"], args.cam_layer), args.images,
                   ckpt["image_size"], store.channels)
    if args.gradcam:
        write_folder_gradcam(store.filenames, prob, names, ex, args, device)
    summary = write_folder_summary(args, ckpt, names, store.filenames, skipped, prob, args.gradcam)
    print(summary.replace("**", ""))
    print(f"predictions: {os.path.join(args.output_dir, 'predictions.csv')}")
    return {"filenames": store.filenames, "skipped": skipped, "prob": prob, "class_names": names}


# ============ multi-label checkpoints (several findings per image) ============
# Targets y (N, K) hold 1, 0 or -1 (a cell ignored under --uncertain ignore); probabilities are sigmoids.
# An ignored cell gets weight 0 for its finding, so it counts in no metric of that finding.

MULTILABEL_KIND = "multi-label classifier"
FINDING_METRICS = {"roc_auc": "ROC-AUC", "average_precision": "average precision",
                   "sensitivity": "sensitivity", "specificity": "specificity"}
TOP_FINDINGS_SHOWN = 4           # t-SNE/UMAP panels: the most frequent findings of the split


def evaluate_multilabel_classifier(path: str, name: str, ckpt: dict, args, device, autocast_dtype) -> list:
    """Sigmoid probabilities of a multi-label classifier on its recorded split, with its val thresholds."""
    notes, k = [], checked_num_classes(ckpt, args, path, "findings")
    names = [str(c) for c in ckpt.get("class_names") or range(k)]
    table = data_loader.load_label_table(args.label_file, args.data_dir, "multilabel", ckpt.get("uncertain", "ignore"),
                                         seed=ckpt.get("split_seed", 42), val_fraction=ckpt.get("val_fraction", 0.15),
                                         test_fraction=ckpt.get("test_fraction", 0.15))
    rows, filenames = scored_rows(ckpt, table, args, path, notes)
    missing = [n for n in names if n not in table.class_names]
    if missing:
        raise UserError(f"--label_file {args.label_file}: has no finding {missing[0]!r} of the checkpoint's "
                        f"{', '.join(names)}; use the label file it was trained with")
    y = table.labels[rows][:, [table.class_names.index(n) for n in names]]

    model = model_ssl.Classifier(model_ssl.ModelConfig(**ckpt["model_config"]), k)
    utils.load_state_strict(model.encoder, ckpt["encoder"], "encoder", path)
    utils.load_state_strict(model.head, ckpt["head"], "classification head", path)
    features = encode_images(model.encoder, filenames, ckpt, args, device, autocast_dtype)
    with torch.no_grad():
        prob = model.head.eval().cpu()(torch.from_numpy(features)).sigmoid().double().numpy()
    info = ModelInfo(args.split, "recorded in the checkpoint" if args.split != "all" else "label file", "classifier",
                     init=ckpt.get("init"), label_fraction=ckpt.get("label_fraction"), epoch=ckpt.get("epoch"),
                     num_epochs=(ckpt.get("args") or {}).get("num_epochs"), task="multilabel",
                     uncertain=ckpt.get("uncertain", "ignore"),
                     thresholds=[float(t) for t in ckpt.get("thresholds") or [0.5] * k],
                     threshold_rule=ckpt.get("threshold_rule") or "fixed 0.5 (none recorded)")
    return [Evaluated(name, path, MULTILABEL_KIND, filenames, y, prob, features, names, info, notes,
                      history_beside(ckpt, path, notes))]


def finding_metrics(weights, y, prob, thresholds) -> dict:
    """Per-finding metrics for each row of `weights` (B, N): four (B, K) arrays, NaN where undefined."""
    counted, pos, neg = y >= 0, y == 1, y == 0
    ranked = [class_ranking(weights * counted[:, k], pos[:, k], prob[:, k]) for k in range(y.shape[1])]
    pred = prob >= np.asarray(thresholds)[None, :]
    tp, fn = weights @ (pos & pred), weights @ (pos & ~pred)
    tn, fp = weights @ (neg & ~pred), weights @ (neg & pred)
    return {"roc_auc": np.stack([a for a, _ in ranked], 1), "average_precision": np.stack([p for _, p in ranked], 1),
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp)}


def scorable_findings(y: np.ndarray) -> np.ndarray:
    """(K,) bool: findings with counted positives and negatives in the split (their AUC is defined)."""
    return (y == 1).any(0) & (y == 0).any(0)


def multilabel_draws(weights, y, prob, thresholds, scorable) -> dict:
    """finding_metrics plus the mean AUC and mean AP over the scorable findings (NaN for a resample that
    lost one of them: skipped, as the single-label macro averages are)."""
    out = finding_metrics(weights, y, prob, thresholds)
    nan = np.full(len(weights), np.nan)
    out["mean_auc"] = out["roc_auc"][:, scorable].mean(1) if scorable.any() else nan
    out["mean_ap"] = out["average_precision"][:, scorable].mean(1) if scorable.any() else nan
    return out


def compute_multilabel_metrics(y, prob, thresholds, resamples: int, seed: int) -> dict:
    """{metric: {'value', 'low', 'high', 'valid'}} (per-finding metrics are (K,) arrays) with percentile
    bootstrap intervals over images, plus 'positives' and 'negatives' counted per finding."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=np.float64)
    n, scorable = len(y), scorable_findings(y)
    point = multilabel_draws(np.ones((1, n)), y, prob, thresholds, scorable)
    draws = [multilabel_draws(w, y, prob, thresholds, scorable)
             for w in bootstrap_weights(n, resamples, seed, _chunk(n, 4 * y.shape[1]))]
    out = {"positives": (y == 1).sum(0), "negatives": (y == 0).sum(0), "ignored": (y < 0).sum(0)}
    for key, value in point.items():
        samples = np.concatenate([d[key] for d in draws]) if draws else value[:0]
        low, high, valid = percentile_interval(samples)
        out[key] = {"value": value[0], "low": low, "high": high, "valid": valid}
    return out


def paired_auc_difference(a: Evaluated, b: Evaluated, resamples: int, seed: int):
    """Per-finding and mean ROC-AUC of A minus B on the images both scored, paired bootstrap (the same
    resampled images for both); None without common images."""
    rows_b = {f: i for i, f in enumerate(b.filenames)}
    common = [(i, rows_b[f]) for i, f in enumerate(a.filenames) if f in rows_b]
    if not common:
        return None
    ia, ib = np.array(common).T
    y, pa, pb = a.y_true[ia], a.prob[ia], b.prob[ib]
    scorable = scorable_findings(y)

    def difference(w):
        auc_a = finding_metrics(w, y, pa, np.full(y.shape[1], 0.5))["roc_auc"]
        auc_b = finding_metrics(w, y, pb, np.full(y.shape[1], 0.5))["roc_auc"]
        diff = auc_a - auc_b                                                      # (B, K)
        mean = diff[:, scorable].mean(1, keepdims=True) if scorable.any() else np.full((len(w), 1), np.nan)
        return np.concatenate([diff, mean], 1)                                    # (B, K + 1)

    point = difference(np.ones((1, len(y))))[0]
    draws = [difference(w) for w in bootstrap_weights(len(y), resamples, seed, _chunk(len(y), 8 * y.shape[1]))]
    low, high, _ = percentile_interval(np.concatenate(draws) if draws else point[None, :0])
    if not draws:
        low = high = np.full(len(point), np.nan)
    return {"model_a": a.name, "model_b": b.name, "num_images": len(y), "findings": list(a.class_names),
            "difference": point, "low": low, "high": high}


# ------------ files and figures of multi-label models ------------

def plot_roc_grid(evaluated: list, results: list, path: str, title: str) -> None:
    """One ROC panel per finding, every model overlaid, its val-chosen operating point marked."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    names = evaluated[0].class_names
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.5 * rows), squeeze=False)
    colors = class_colors(max(len(evaluated), 2))
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        for i, (ev, m) in enumerate(zip(evaluated, results)):
            counted = ev.y_true[:, k] >= 0
            y, p = ev.y_true[counted, k], ev.prob[counted, k]
            if 0 < y.sum() < len(y):
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, color=colors[i], lw=1.5, label=f"{ev.name}: {with_ci(m['roc_auc'], k, 2)}")
                pred = p >= ev.info.thresholds[k]
                ax.plot(pred[y == 0].mean(), pred[y == 1].mean(), "o", color=colors[i], ms=5)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        positives = int((evaluated[0].y_true[:, k] == 1).sum())
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=f"{names[k]} ({positives} positive)")
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.legend(loc="lower right", fontsize=6, title="AUC [95% CI]", title_fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\n(dot: the operating point at the threshold chosen on val)", fontsize=10)
    fig.tight_layout()
    utils.atomic_savefig(fig, path)


def plot_multilabel_embedding(coords: np.ndarray, ev: Evaluated, method: str, path: str) -> None:
    """One panel per most frequent finding: its positives in colour over the other images in grey."""
    plt = pyplot()
    order = np.argsort(-(ev.y_true == 1).sum(0), kind="stable")[:TOP_FINDINGS_SHOWN]
    fig, axes = plt.subplots(1, len(order), figsize=(3.6 * len(order), 3.7), squeeze=False)
    colors, size = class_colors(len(ev.class_names)), 10 if len(coords) > 200 else 24
    for ax, k in zip(axes[0], order):
        pos, ignored = ev.y_true[:, k] == 1, ev.y_true[:, k] < 0
        ax.scatter(*coords[~pos & ~ignored].T, s=size, color="0.8", edgecolors="none", label="absent")
        if ignored.any():
            ax.scatter(*coords[ignored].T, s=size, color="0.5", marker="x", label="uncertain (ignored)")
        ax.scatter(*coords[pos].T, s=size, color=colors[k], edgecolors="none", label=f"present (n={int(pos.sum())})")
        ax.set(xticks=[], yticks=[], title=ev.class_names[k])
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{method} of encoder embeddings: {default_name(ev.checkpoint)}, {ev.info.split} split, "
                 f"{len(coords)} images, coloured by the {len(order)} most frequent findings", fontsize=10)
    fig.tight_layout()
    utils.atomic_savefig(fig, path)


def write_multilabel_predictions(ev: Evaluated, path: str) -> None:
    """One row per image: for each finding the label (1, 0, empty if ignored), probability, thresholded call."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["filename"] + [f"{kind}_{n}" for n in ev.class_names for kind in ("true", "prob", "pred")])
    thresholds = np.asarray(ev.info.thresholds)
    for f, y, p in zip(ev.filenames, ev.y_true, ev.prob):
        cells = [[("" if t < 0 else int(t)), f"{q:.6f}", int(q >= c)] for t, q, c in zip(y, p, thresholds)]
        w.writerow([f] + [c for triple in cells for c in triple])
    utils.atomic_write_text(path, out.getvalue())


def multilabel_table(ev: Evaluated, metrics: dict) -> list:
    lines = [f"- mean ROC-AUC over the findings with positives and negatives: **{with_ci(metrics['mean_auc'])}**",
             f"- mean average precision: {with_ci(metrics['mean_ap'])}", "",
             "| finding | positives | negatives | threshold | " + " | ".join(FINDING_METRICS.values()) + " |",
             "|---|---:|---:|---:|" + "---|" * len(FINDING_METRICS)]
    for k, name in enumerate(ev.class_names):
        cells = " | ".join(with_ci(metrics[key], k) for key in FINDING_METRICS)
        lines.append(f"| {name} | {int(metrics['positives'][k])} | {int(metrics['negatives'][k])} | "
                     f"{ev.info.thresholds[k]:.3f} | {cells} |")
    return lines


def multilabel_notes(ev: Evaluated, metrics: dict, resamples: int) -> list:
    notes = []
    for k, name in enumerate(ev.class_names):
        if metrics["positives"][k] == 0 or metrics["negatives"][k] == 0:
            notes.append(f"finding {name!r} has no {'positive' if metrics['positives'][k] == 0 else 'negative'} "
                         f"image in the {ev.info.split} split: its AUC, AP and one of sensitivity/specificity are "
                         f"undefined (n/a) and the mean AUC leaves it out")
        if metrics["ignored"][k]:
            notes.append(f"finding {name!r}: {int(metrics['ignored'][k])} uncertain cell(s) ignored "
                         f"(--uncertain {ev.info.uncertain})")
    used = int(metrics["mean_auc"]["valid"])
    if resamples and used < resamples:
        notes.append(f"the mean-AUC interval uses {used} of {resamples} resamples; the others lost a finding's "
                     f"positives or negatives")
    return notes


def multilabel_document(ev: Evaluated, metrics: dict, args) -> dict:
    def entry(m, k=None):
        pick = (lambda a: a) if k is None else (lambda a: np.asarray(a)[k])
        return {"value": plain(pick(m["value"])), "ci95": [plain(pick(m["low"])), plain(pick(m["high"]))]}

    per_finding = {name: {key: entry(metrics[key], k) for key in FINDING_METRICS} |
                   {"positives": int(metrics["positives"][k]), "negatives": int(metrics["negatives"][k]),
                    "ignored": int(metrics["ignored"][k]), "threshold": float(ev.info.thresholds[k])}
                   for k, name in enumerate(ev.class_names)}
    return {"model": ev.name, "checkpoint": os.path.abspath(ev.checkpoint), "kind": ev.kind, **ev.info.as_dict(),
            "num_images": len(ev.y_true), "findings": ev.class_names, "label_file": os.path.abspath(args.label_file),
            "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "interval": "percentile, 95%",
                          "unit": "image"},
            "metrics": {"mean_auc": entry(metrics["mean_auc"]) | {"resamples_used": int(metrics["mean_auc"]["valid"])},
                        "mean_ap": entry(metrics["mean_ap"])},
            "per_finding": per_finding, "notes": ev.notes}


def write_multilabel_outputs(ev: Evaluated, metrics: dict, folder: str, args, projections: dict) -> None:
    """predictions.csv, metrics.json, roc_grid.png, t-SNE/UMAP panels, training curves and report.md."""
    ev.notes.extend(multilabel_notes(ev, metrics, args.bootstrap))
    write_multilabel_predictions(ev, os.path.join(folder, "predictions.csv"))
    plot_roc_grid([ev], [metrics], os.path.join(folder, "roc_grid.png"), f"ROC per finding: {ev.name}")
    figures = {"roc_grid.png": "ROC curve per finding"}
    for method, file in (("t-SNE", "tsne.png"), ("UMAP", "umap.png")):
        if isinstance(projections[method], str):
            ev.notes.append(f"no {file}: {projections[method]}")
            continue
        plot_multilabel_embedding(projections[method], ev, method, os.path.join(folder, file))
        figures[file] = f"{method} of the encoder's embeddings, by the most frequent findings"
    if ev.history_csv:
        utils.plot_history(ev.history_csv, os.path.join(folder, "training_curves.png"),
                           f"Training curves: {default_name(ev.checkpoint)}")
        if os.path.isfile(os.path.join(folder, "training_curves.png")):
            figures["training_curves.png"] = "Training curves (from the history file beside the checkpoint)"
    utils.atomic_write_json(os.path.join(folder, "metrics.json"), multilabel_document(ev, metrics, args))
    provenance = provenance_lines(
        ev, args, f", {len(ev.class_names)} findings; uncertain cells: {ev.info.uncertain}",
        [f"- thresholds: chosen per finding on val ({ev.info.threshold_rule}), recorded in the checkpoint"])
    lines = [f"# Evaluation: {ev.name}", ""] + provenance + ["", "## Metrics", ""] + multilabel_table(ev, metrics)
    if ev.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in ev.notes]
    lines += ["", "## Figures", ""]
    for file, caption in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    lines += ["Files: [metrics.json](metrics.json), [predictions.csv](predictions.csv)"]
    utils.atomic_write_text(os.path.join(folder, "report.md"), "\n".join(lines) + "\n")


def write_multilabel_comparison(evaluated, results, folders, paired, args) -> None:
    """comparison.csv (a row per model and finding), comparison.md and report.md with the paired AUC
    differences of the first two models, and roc_grid_comparison.png."""
    names = evaluated[0].class_names
    rows = []
    for ev, m, folder in zip(evaluated, results, folders):
        for k, finding in enumerate(names + ["mean"]):
            src = {key: (m[key], k) for key in FINDING_METRICS} if finding != "mean" else \
                {"roc_auc": (m["mean_auc"], None), "average_precision": (m["mean_ap"], None)}
            row = {"model": ev.name, "folder": os.path.basename(folder), "finding": finding,
                   "init": ev.info.init or "", "label_fraction": ev.info.label_fraction,
                   "num_images": len(ev.y_true)}
            for key, (entry, idx) in src.items():
                pick = (lambda a: a) if idx is None else (lambda a, i=idx: np.asarray(a)[i])
                row |= {key: plain(pick(entry["value"])), f"{key}_ci_low": plain(pick(entry["low"])),
                        f"{key}_ci_high": plain(pick(entry["high"]))}
            rows.append(row)
    import pandas as pd
    utils.atomic_write_text(os.path.join(args.output_dir, "comparison.csv"), pd.DataFrame(rows).to_csv(index=False))
    plot_roc_grid(evaluated, results, os.path.join(args.output_dir, "roc_grid_comparison.png"),
                  f"ROC per finding, {args.split} split")
    header = ["finding", "positives"] + [f"{ev.name} AUC" for ev in evaluated]
    lines = [f"# Comparison on the {args.split} split ({len(names)} findings)", "",
             f"ROC-AUC per finding with 95% bootstrap intervals ({args.bootstrap} resamples of the images, seed "
             f"{args.seed}); the mean is over the findings with positives and negatives in the split.", "",
             "| " + " | ".join(header) + " |", "|---|---:|" + "---|" * len(evaluated)]
    for k, finding in enumerate(names):
        cells = [with_ci(m["roc_auc"], k) for m in results]
        lines.append(f"| {finding} | {int(results[0]['positives'][k])} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{with_ci(m['mean_auc'])}**" for m in results) + " |")
    lines += ["", "## Paired ROC-AUC difference", ""] + paired_auc_lines(paired)
    utils.atomic_write_text(os.path.join(args.output_dir, "comparison.md"), "\n".join(lines) + "\n")
    report = lines + ["", "## ROC curves per finding", "", "![ROC per finding](roc_grid_comparison.png)", "",
                      "## Per-model reports", ""] + [f"- [{ev.name}]({os.path.basename(f)}/report.md)"
                                                     for ev, f in zip(evaluated, folders)]
    report[0] = f"# Evaluation report: {len(evaluated)} multi-label models on the {args.split} split"
    utils.atomic_write_text(os.path.join(args.output_dir, "report.md"), "\n".join(report) + "\n")


def paired_auc_lines(paired) -> list:
    if paired is None:
        return ["The first two models share no evaluated image, so no paired difference is computed."]
    lines = [f"ROC-AUC of **{paired['model_a']}** minus **{paired['model_b']}** on the {paired['num_images']} "
             f"images both scored (paired bootstrap: the same resampled images for both). An interval that excludes "
             f"zero means the difference is unlikely to be resampling noise.", "",
             "| finding | difference [95% CI] | excludes zero |", "|---|---|---|"]
    for k, finding in enumerate(paired["findings"] + ["**mean AUC**"]):
        d, lo, hi = paired["difference"][k], paired["low"][k], paired["high"][k]
        if not np.isfinite(d):
            lines.append(f"| {finding} | n/a | |")
            continue
        ci = f" [{fmt(lo)}, {fmt(hi)}]" if np.isfinite(lo) else ""
        lines.append(f"| {finding} | {d:+.3f}{ci} | {'yes' if np.isfinite(lo) and (lo > 0 or hi < 0) else 'no'} |")
    return lines


def report_multilabel(evaluated: list, args, settings: dict) -> dict:
    """Metrics, files and figures when the checkpoints are multi-label (main's second half for them)."""
    if any(ev.kind != MULTILABEL_KIND for ev in evaluated) or \
            any(ev.class_names != evaluated[0].class_names for ev in evaluated):
        raise UserError("--checkpoint: multi-label checkpoints are compared only with multi-label checkpoints of the "
                        "same findings; evaluate the others separately")
    print(f"bootstrap: {args.bootstrap} resamples per model ...")
    results = [compute_multilabel_metrics(ev.y_true, ev.prob, ev.info.thresholds, args.bootstrap, args.seed)
               for ev in evaluated]
    single = len(evaluated) == 1
    folders = [args.output_dir] if single else [os.path.join(args.output_dir, f) for f in folder_names(evaluated)]
    projections = embedding_projections(evaluated, args.seed)
    for ev, metrics, folder in zip(evaluated, results, folders):
        write_multilabel_outputs(ev, metrics, folder, args, projections[ev.checkpoint])
    paired = None
    if not single:
        paired = paired_auc_difference(evaluated[0], evaluated[1], args.bootstrap, args.seed)
        write_multilabel_comparison(evaluated, results, folders, paired, args)
    utils.write_settings(os.path.join(args.output_dir, "evaluation_settings.json"), settings)
    width = max(len(ev.name) for ev in evaluated) + 2
    print(f"{'model':<{width}}{'split':<7}{'images':>7}  {'mean AUC':>10}{'mean AP':>10}")
    for ev, m in zip(evaluated, results):
        print(f"{ev.name:<{width}}{ev.info.split:<7}{len(ev.y_true):>7}  {fmt(m['mean_auc']['value']):>10}"
              f"{fmt(m['mean_ap']['value']):>10}")
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")
    return {"models": [ev.name for ev in evaluated], "folders": folders, "metrics": results, "paired": paired}


# ============ summary ============

def folder_names(evaluated: list) -> list:
    """A distinct, filesystem-safe folder name per model."""
    names = []
    for ev in evaluated:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", ev.name).strip("_") or "model"
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def print_summary(evaluated: list, results: list, report: str) -> None:
    width = max(len(ev.name) for ev in evaluated) + 2
    labels = ("accuracy", "bal. acc", "macro F1", "ROC-AUC", "ECE")
    keys = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "ece")
    print(f"{'model':<{width}}{'split':<7}{'images':>7}  " + "".join(f"{l:>10}" for l in labels))
    for ev, m in zip(evaluated, results):
        print(f"{ev.name:<{width}}{ev.info.split:<7}{len(ev.y_true):>7}  "
              + "".join(f"{fmt(m[k]['value']):>10}" for k in keys))
    print(f"report: {report}")


INIT_NAMES = {"ssl": "SSL init", "scratch": "from scratch"}


def display_names(args, ckpts: list) -> list:
    """--names, or what each model is: "SSL init" / "from scratch" (the checkpoint's `init`), "SSL encoder" for
    a pretrained encoder; the file name is added where two models would share a name."""
    if args.names:
        return list(args.names)
    kinds = [INIT_NAMES.get(c.get("init"), "SSL encoder" if c["kind"] == "ssl" else default_name(p))
             for p, c in zip(args.checkpoint, ckpts)]
    stems = [default_name(p) for p in args.checkpoint]
    stems = [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{s}" if stems.count(s) > 1 else s
             for p, s in zip(args.checkpoint, stems)]
    return [f"{k} ({s})" if kinds.count(k) > 1 and k != s else k for k, s in zip(kinds, stems)]


def embedding_projections(evaluated: list, seed: int) -> dict:
    """t-SNE and UMAP coordinates per checkpoint (its models share one encoder), or why they were skipped."""
    by_checkpoint = {}
    for ev in evaluated:
        if ev.checkpoint in by_checkpoint:
            continue
        by_checkpoint[ev.checkpoint] = {}
        for method in ("t-SNE", "UMAP"):
            print(f"{method} of {len(ev.features)} embeddings ({default_name(ev.checkpoint)}) ...")
            try:
                by_checkpoint[ev.checkpoint][method] = project_embedding(ev.features, method, seed)
            except ProjectionSkipped as e:
                by_checkpoint[ev.checkpoint][method] = str(e)
    return by_checkpoint


def check_args(args) -> None:
    if args.label_file is None and args.images is None:
        args.label_file = os.path.join(args.data_dir, "labels.csv")
    if args.names and len(args.names) != len(args.checkpoint):
        raise UserError(f"--names gives {len(args.names)} name(s) for {len(args.checkpoint)} --checkpoint(s); "
                        f"give one per checkpoint, in the same order")
    utils.check_flags(args, {"data_dir": None} if args.images is not None else None)   # --images reads no data_dir
    if args.images is not None and len(args.checkpoint) != 1:
        raise UserError(f"--images scores a folder with one classifier; give one --checkpoint, not "
                        f"{len(args.checkpoint)}")


@utils.locks_output_dir(check_args, "evaluate")
def main(args):
    device = utils.resolve_device(args.device)
    autocast_dtype, precision = utils.resolve_precision(args.precision, args.amp, device)
    if args.images is not None:
        utils.print_settings("evaluate: predictions for a folder", {
            "checkpoint": args.checkpoint[0], "images": args.images, "output_dir": args.output_dir,
            "batch_size": args.batch_size, "device": str(device), "precision": precision})
        return predict_folder(args, device, autocast_dtype)
    ckpts = [utils.load_checkpoint(p, kind=("classifier", "ssl")) for p in args.checkpoint]
    names = display_names(args, ckpts)
    settings = {"checkpoints": args.checkpoint, "names": names, "data_dir": args.data_dir,
                "label_file": args.label_file, "output_dir": args.output_dir, "split": args.split,
                "bootstrap": args.bootstrap, "batch_size": args.batch_size, "seed": args.seed,
                "device": str(device), "precision": precision}
    utils.print_settings("evaluate", settings)
    utils.seed_everything(args.seed)

    # ============ predictions ============
    evaluated = []
    for path, ckpt, name in zip(args.checkpoint, ckpts, names):
        evaluated += evaluate_checkpoint(path, name, args, device, autocast_dtype, ckpt)
    del ckpts
    if any(ev.kind == MULTILABEL_KIND for ev in evaluated):       # several findings per image: its own report
        return report_multilabel(evaluated, args, settings)

    # ============ metrics with bootstrap intervals, the pointing game ============
    print(f"bootstrap: {args.bootstrap} resamples per model ...")
    results = [compute_metrics(ev.y_true, ev.prob, len(ev.class_names), args.bootstrap, args.seed)
               for ev in evaluated]
    findings = data_loader.read_findings(args.data_dir)
    pointing = pointing_game(evaluated, findings, args, device) if args.gradcam else []

    # ============ files and figures ============
    single = len(evaluated) == 1
    folders = [args.output_dir] if single else [os.path.join(args.output_dir, f) for f in folder_names(evaluated)]
    projections = embedding_projections(evaluated, args.seed)
    for ev, metrics, folder in zip(evaluated, results, folders):
        write_model_outputs(ev, metrics, folder, args, projections[ev.checkpoint], device, findings,
                            pointing if single else ())
    paired = None
    if not single:
        paired = paired_comparison(evaluated[0], evaluated[1], args.bootstrap, args.seed)
        write_comparison(evaluated, results, folders, paired, args, pointing)
    if pointing:
        utils.atomic_write_json(os.path.join(args.output_dir, "pointing_game.json"), pointing)
    utils.write_settings(os.path.join(args.output_dir, "evaluation_settings.json"), settings)
    print_summary(evaluated, results, os.path.join(args.output_dir, "report.md"))
    print_verdict(evaluated, results, paired, pointing)
    return {"models": [ev.name for ev in evaluated], "folders": folders, "metrics": results, "paired": paired,
            "pointing": pointing}


def print_verdict(evaluated, results, paired, pointing) -> None:
    lines = verdict_lines(paired) if paired is not None else [headline_sentence(evaluated[0], results[0])]
    for line in lines:
        if line:
            print(line.replace("**", ""))
    for r in pointing:
        print(f"pointing game, {r['model']}: {with_ci(r)} ({r['hits']}/{r['images']}; chance {r['chance']:.3f})")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter, parents=[utils.common_parser()])
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a classifier (best_finetuned_model.pth, best_baseline_model.pth) or SSL checkpoint "
                        "(best_ssl_model.pth); repeat the flag to compare several side by side")
    p.add_argument("--data_dir", default="./data/medical_images", help="folder the label file's paths are relative to")
    p.add_argument("--label_file", default=None,
                   help="CSV filename,label[,split][,patient_id]; None means <data_dir>/labels.csv")
    p.add_argument("--output_dir", default="./evaluation_results", help="folder for metrics, figures and report.md")
    p.add_argument("--num_classes", type=int, default=None,
                   help="expected number of classes; an error if a classifier checkpoint has another count")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                   help="images to score; for a classifier, the split recorded in its checkpoint")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the images for the 95%% confidence intervals (0: none)")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    p.add_argument("--names", nargs="+", default=None,
                   help="display names, one per --checkpoint in order (default: what each model is, from the "
                        "checkpoint: 'SSL init', 'from scratch', 'SSL encoder')")
    p.add_argument("--images", default=None,
                   help="score every readable image under this folder (PNG, JPEG, BMP, TIFF, DICOM; no label file) "
                        "with one classifier: predictions.csv, summary.md and gradcam.png in --output_dir")
    p.add_argument("--gradcam", action=argparse.BooleanOptionalAction, default=True,
                   help="Grad-CAM heat maps (gradcam.png) and, when the data folder has findings.csv, the "
                        "pointing game")
    p.add_argument("--cam_layer", default="auto", choices=("auto",) + CAM_LAYERS,
                   help="ResNet stage Grad-CAM reads; auto: the deepest whose map is at least 7 cells a side "
                        "(layer4 at 224 px, layer2 at 64 px)")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser())
