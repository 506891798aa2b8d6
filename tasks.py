"""The task a label file poses: one class per image (SingleLabel) or several findings per image (MultiLabel).

The label file decides the task once, where it is read (label_tables.load_label_table sets `table.task`);
everything that differs between the two comes from the task object, so the trainers, the scoring and the
reports are written once:

    task = tasks.of(table.task)                        # or tasks.of(ckpt.task) for a classifier checkpoint
    train_idx = task.train_subset(table, table.indices("train"), 0.1, seed)
    val = task.validate(model, val_loader, device, autocast_dtype, table.num_classes, "youden")
    if task.is_better(val, best): ...

Single-label: softmax outputs, cross entropy, the best epoch by val balanced accuracy, metrics per class.
Multi-label: one sigmoid per finding, masked binary cross entropy (uncertain cells left out), the best
epoch by the mean val ROC-AUC, a decision threshold per finding chosen on val, metrics per finding.
What each task reports in an evaluation lives in single_label_reports.py and multilabel_reports.py.
"""
import json

import numpy as np
import torch
import torch.nn.functional as F

import calibration
import data_splits
import label_tables
from image_io import normalize
from model_ssl import masked_bce_with_logits
from multilabel_reports import MultiLabelReports
from single_label_reports import SingleLabelReports
from utils import UserError, autocast


@torch.no_grad()
def val_batches(model, loader, device, autocast_dtype):
    """(logits float32 on the device, labels) of every batch of `loader`, the model in eval mode."""
    model.eval()
    for images, labels, _ in loader:
        x = normalize(images.to(device)).contiguous(memory_format=torch.channels_last)
        with autocast(device.type, autocast_dtype):
            logits = model(x).float()
        yield logits, labels


def epoch_row(task, epoch: int, num_epochs: int, stats: dict, val: dict, frozen: bool, improved: bool) -> dict:
    """Print the epoch's line; return its history row (the task's val columns between loss and lr)."""
    text, columns = task.val_columns(val)
    print(f"epoch {epoch + 1}/{num_epochs}  train_loss {stats['loss']:.4f}  val_loss {val['loss']:.4f}  "
          f"{text}{'  (encoder frozen)' if frozen else ''}{'  *saved best*' if improved else ''}", flush=True)
    return {"epoch": epoch + 1, "train_loss": stats["loss"], "val_loss": val["loss"], **columns,
            "lr": stats["lr"], "encoder_frozen": int(frozen), "images_per_sec": stats["images_per_sec"]}


class SingleLabel(SingleLabelReports):
    """One class per image: `labels` (N,) int64 class indices."""
    name = "multiclass"
    selection_column = "val_balanced_accuracy"     # the history column is_better ranks first
    evaluated_kind = "classifier"
    unit = "classes"

    # ------------ training ------------
    def check_table(self, table, args) -> None:
        """What fine-tuning needs of the label file and flags."""
        if args.pos_weight != "none":
            raise UserError(f"--pos_weight is for multi-label files and {args.label_file} has one label per image; "
                            f"use --class_weights balanced")
        if args.uncertain != "ignore":
            raise UserError(f"--uncertain is for multi-label files (what a -1 cell means) and {args.label_file} has "
                            f"one label per image; drop --uncertain")
        present = len(np.unique(table.labels))
        if present < 2:
            only = table.class_names[table.labels[0]]
            raise UserError(f"--label_file {args.label_file}: every image has the label {only!r}; a classifier needs "
                            f"images of at least 2 classes")
        _check_class_count(table, args, present)

    def train_subset(self, table, indices, fraction: float, seed: int) -> np.ndarray:
        """A stratified `fraction` of each class, smaller fractions nested in larger ones."""
        return data_splits.stratified_subset(table.labels, indices, fraction, seed)

    def loss(self, logits, labels, weights=None):
        """Cross entropy of class indices; `weights`: per-class weights or None."""
        return F.cross_entropy(logits, labels, weight=weights)

    def loss_weights(self, args, labels, num_classes: int, device):
        """--class_weights balanced: each class weighted by its inverse frequency in the train subset."""
        if args.class_weights == "none":
            return None
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        weights = len(labels) / (num_classes * np.maximum(counts, 1))
        return torch.tensor(weights, dtype=torch.float32, device=device)

    @torch.no_grad()
    def validate(self, model, loader, device, autocast_dtype, num_classes: int, threshold_rule: str) -> dict:
        """Loss, accuracy and balanced accuracy on the val split."""
        losses, preds, trues = [], [], []
        for logits, labels in val_batches(model, loader, device, autocast_dtype):
            losses.append(F.cross_entropy(logits, labels.to(device), reduction="sum").item())
            preds.append(logits.argmax(1).cpu())
            trues.append(labels)
        pred, true = torch.cat(preds).numpy(), torch.cat(trues).numpy()
        recalls = [np.mean(pred[true == c] == c) for c in range(num_classes) if np.any(true == c)]
        return {"loss": sum(losses) / len(true), "accuracy": float(np.mean(pred == true)),
                "balanced_accuracy": float(np.mean(recalls))}

    def is_better(self, metrics: dict, best) -> bool:
        """Higher val balanced accuracy wins; ties go to the lower val loss."""
        return best is None or \
            (metrics["balanced_accuracy"], -metrics["loss"]) > (best["balanced_accuracy"], -best["loss"])

    def selection_text(self, best: dict) -> str:
        return f"val balanced accuracy {best['balanced_accuracy']:.3f}"

    def val_columns(self, val: dict) -> tuple:
        """(the epoch line's val text, the history row's val columns)."""
        return (f"val_acc {val['accuracy']:.3f}  val_bal_acc {val['balanced_accuracy']:.3f}",
                {"val_accuracy": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"]})

    def chance(self, num_classes: int) -> float:
        """The training curves' chance line: accuracy of a guess."""
        return 1 / num_classes

    def checkpoint_entries(self, table, val_metrics: dict) -> dict:
        return {"task": self.name}

    # ------------ scoring a checkpoint (evaluate.py) ------------
    def scoring_table(self, args, ckpt):
        """The label file as the checkpoint's run split it; no class count is passed: a label file lacking a
        class is still scorable, mapped by name (`targets`)."""
        return read_run_table(args, None, {"seed": ckpt.split_seed, "val_fraction": ckpt.val_fraction,
                                           "test_fraction": ckpt.test_fraction})

    def targets(self, table, rows, class_names: list, label_file: str) -> np.ndarray:
        """Labels (N,) as indices into the checkpoint's `class_names` (a label file with names may order them
        differently, or lack a class)."""
        if all(name.lstrip("-").isdigit() for name in table.class_names):
            if table.labels.max() >= len(class_names):
                raise UserError(f"--label_file {label_file}: label {int(table.labels.max())} is outside the "
                                f"checkpoint's {len(class_names)} classes [0, {len(class_names)}); use the label file "
                                f"it was trained with")
            return table.labels[rows]
        unknown = sorted(set(table.class_names) - set(class_names))
        if unknown:
            raise UserError(f"--label_file {label_file}: class {unknown[0]!r} is not one the checkpoint knows "
                            f"({', '.join(class_names)}); use the label file it was trained with")
        return np.array([class_names.index(table.class_names[i]) for i in table.labels], dtype=np.int64)[rows]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(1)

    def model_info(self, ckpt) -> dict:
        """What a scored classifier's ModelInfo records beyond its provenance."""
        return {}

    def decision_thresholds(self, ckpt):
        """Per-output probability thresholds of a prediction; None: the most probable class is predicted."""
        return None

    def calibrate(self, ckpt, logits, labels) -> None:
        """Fit the checkpoint's temperature on its val logits: one for the softmax."""
        ckpt.temperature = calibration.fit_temperature(logits, labels, multilabel=False)

    def temperature_text(self, temperature) -> str:
        return f"{temperature:.3f}"

    def ece(self, y_true, prob) -> float:
        return calibration.ece(y_true, prob, multilabel=False)

    ece_definition = "top-label ECE"
    output_text = "softmax over the classes"

    def export_metadata(self, ckpt) -> dict:
        return {}

    explains = True         # Grad-CAM of the predicted class
    knn_monitor = True      # pretraining can pick its epoch by kNN accuracy on val


class MultiLabel(MultiLabelReports):
    """Several findings per image: `labels` (N, K) float32 targets, 1 present, 0 absent, -1 left out (an
    uncertain cell under --uncertain ignore)."""
    name = "multilabel"
    selection_column = "val_mean_auc"
    evaluated_kind = "multi-label classifier"
    unit = "findings"

    # ------------ training ------------
    def check_table(self, table, args) -> None:
        label_tables.check_counted(table.labels, table.class_names, args.label_file)
        _check_class_count(table, args, table.num_classes)

    def train_subset(self, table, indices, fraction: float, seed: int) -> np.ndarray:
        """`fraction` of the images by iterative stratification, every finding keeping a positive image
        (docs/multilabel.md)."""
        return data_splits.iterative_stratified_subset(table.labels, indices, fraction, seed)

    def loss(self, logits, targets, weights=None):
        """Binary cross entropy per finding, ignored (-1) cells left out; `weights`: per-finding positive weights."""
        return masked_bce_with_logits(logits, targets, pos_weight=weights)

    def loss_weights(self, args, targets, num_classes: int, device):
        """--pos_weight balanced: each finding's positive term weighted by its negatives / positives among the
        counted (not ignored) train cells, so a rare finding weighs as much as a common one in the loss."""
        if args.class_weights != "none":
            raise UserError("--class_weights is for one label per image; for multi-label files use --pos_weight "
                            "balanced")
        if args.pos_weight == "none":
            return None
        positives, negatives = (targets == 1).sum(0), (targets == 0).sum(0)
        weights = negatives / np.maximum(positives, 1)
        return torch.tensor(weights, dtype=torch.float32, device=device)

    @torch.no_grad()
    def validate(self, model, loader, device, autocast_dtype, num_classes: int, threshold_rule: str) -> dict:
        """Masked BCE, per-finding ROC-AUC and their mean on the val split, and each finding's threshold on
        its sigmoid probability chosen there by `threshold_rule` (recorded in the checkpoint for evaluate.py)."""
        logits, targets = [], []
        for batch_logits, labels in val_batches(model, loader, device, autocast_dtype):
            logits.append(batch_logits.cpu())
            targets.append(labels)
        logits, targets = torch.cat(logits), torch.cat(targets)
        loss = masked_bce_with_logits(logits, targets).item()
        prob, y = logits.sigmoid().double().numpy(), targets.numpy()
        aucs = [finding_auc(y[:, k], prob[:, k]) for k in range(y.shape[1])]
        defined = [a for a in aucs if a is not None]
        return {"loss": loss, "mean_auc": float(np.mean(defined)) if defined else None, "auc": aucs,
                "thresholds": [choose_threshold(y[:, k], prob[:, k], threshold_rule) for k in range(y.shape[1])],
                "threshold_rule": threshold_rule}

    def is_better(self, metrics: dict, best) -> bool:
        """Higher mean val ROC-AUC wins (none defined counts as -1); ties go to the lower val loss."""
        if best is None:
            return True
        score = lambda m: -1.0 if m.get("mean_auc") is None else m["mean_auc"]   # noqa: E731
        return (score(metrics), -metrics["loss"]) > (score(best), -best["loss"])

    def selection_text(self, best: dict) -> str:
        auc = "n/a (no finding had positives and negatives in val)" if best["mean_auc"] is None \
            else f"{best['mean_auc']:.3f}"
        return f"val mean ROC-AUC {auc}, thresholds by {best['threshold_rule']} on val"

    def val_columns(self, val: dict) -> tuple:
        auc = "n/a" if val["mean_auc"] is None else f"{val['mean_auc']:.3f}"
        return f"val_mean_auc {auc}", {"val_mean_auc": "" if val["mean_auc"] is None else val["mean_auc"]}

    def chance(self, num_classes: int) -> float:
        """The training curves' chance line: ROC-AUC of a guess."""
        return 0.5

    def checkpoint_entries(self, table, val_metrics: dict) -> dict:
        """What evaluate.py needs to score the classifier the same way: the uncertain-cell policy and each
        finding's val-chosen threshold (the finding names are the checkpoint's class_names)."""
        return {"task": self.name, "uncertain": table.uncertain, "label_format": table.label_format,
                "thresholds": list(val_metrics["thresholds"]), "threshold_rule": val_metrics["threshold_rule"]}

    # ------------ scoring a checkpoint (evaluate.py) ------------
    def scoring_table(self, args, ckpt):
        """The label file read as multi-label with its uncertain cells left out (-1), whatever --uncertain the
        checkpoint was trained with: every model is scored against the same, certain ground truth (the splits
        are drawn from the certain cells either way)."""
        return label_tables.load_label_table(
            args.label_file, args.data_dir, "multilabel", "ignore",
            seed=42 if ckpt.split_seed is None else ckpt.split_seed,
            val_fraction=0.15 if ckpt.val_fraction is None else ckpt.val_fraction,
            test_fraction=0.15 if ckpt.test_fraction is None else ckpt.test_fraction)

    def targets(self, table, rows, class_names: list, label_file: str) -> np.ndarray:
        """Targets (N, K) of the checkpoint's findings, in its order."""
        missing = [n for n in class_names if n not in table.class_names]
        if missing:
            raise UserError(f"--label_file {label_file}: has no finding {missing[0]!r} of the checkpoint's "
                            f"{', '.join(class_names)}; use the label file it was trained with")
        return table.labels[rows][:, [table.class_names.index(n) for n in class_names]]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def decision_thresholds(self, ckpt) -> list:
        """Each finding is predicted at or above its threshold chosen on val (0.5 where none is recorded)."""
        return ckpt.thresholds or [0.5] * ckpt.num_classes

    def model_info(self, ckpt) -> dict:
        k = ckpt.num_classes
        return {"task": self.name, "uncertain": ckpt.uncertain or "ignore",
                "thresholds": [float(t) for t in ckpt.thresholds or [0.5] * k],
                "threshold_rule": ckpt.threshold_rule or "fixed 0.5 (none recorded)"}

    def calibrate(self, ckpt, logits, labels) -> None:
        """Fit one temperature per finding on its counted val cells; the thresholds chosen on uncalibrated val
        probabilities move to the calibrated scale, so the same findings are predicted."""
        ckpt.temperature = calibration.fit_temperature(logits, labels, multilabel=True)
        if (ckpt.val_metrics or {}).get("thresholds"):
            moved = calibration.recalibrated_thresholds(ckpt.val_metrics["thresholds"], ckpt.temperature)
            ckpt.thresholds = calibration.thresholds_keeping_val_predictions(
                ckpt.val_metrics["thresholds"], moved, logits.float().cpu(), ckpt.temperature)

    def temperature_text(self, temperature) -> str:
        return "[" + ", ".join(f"{v:.3f}" for v in temperature) + "]"

    def ece(self, y_true, prob) -> float:
        return calibration.ece(y_true, prob, multilabel=True)

    ece_definition = "mean over findings of each finding's ECE"
    output_text = "one sigmoid per finding"

    def export_metadata(self, ckpt) -> dict:
        return {"thresholds": json.dumps(self.decision_thresholds(ckpt))}

    explains = False        # no Grad-CAM for several findings at once
    knn_monitor = False     # the kNN monitor scores one class per image


SINGLE_LABEL, MULTI_LABEL = SingleLabel(), MultiLabel()
TASKS = {task.name: task for task in (SINGLE_LABEL, MULTI_LABEL)}


def read_run_table(args, num_classes, split_args: dict):
    """The one-label file, with splits made the way a checkpoint's run made them when it has no split column
    (`split_args`: seed, val_fraction, test_fraction as recorded; None where not recorded)."""
    split_args = {k: v for k, v in split_args.items() if v is not None}
    return label_tables.read_label_table(
        args.label_file, args.data_dir, num_classes=num_classes, seed=split_args.get("seed", args.split_seed),
        val_fraction=split_args.get("val_fraction", 0.15), test_fraction=split_args.get("test_fraction", 0.15))


def of(name: str):
    """The task object of a label table's, a checkpoint's or an evaluated model's task name."""
    return TASKS[name]


def of_models(evaluated: list):
    """The task of the models scored together: multi-label as soon as one is (MultiLabel then refuses a mix)."""
    return MULTI_LABEL if any(ev.info.task == MULTI_LABEL.name for ev in evaluated) else SINGLE_LABEL


def _check_class_count(table, args, present: int) -> None:
    """--num_classes, when given, and the classes (findings) with images must both match the label file's."""
    if args.num_classes is not None and args.num_classes not in (table.num_classes, present) or \
            present != table.num_classes:
        raise UserError(f"--num_classes {args.num_classes or table.num_classes}, but {args.label_file} has images of "
                        f"{present} classes; fix --num_classes or the label file")


def finding_auc(y, prob):
    """ROC-AUC of one finding over its counted cells (y 1 or 0), or None without both."""
    from sklearn.metrics import roc_auc_score

    counted = y >= 0
    if len(np.unique(y[counted])) < 2:
        return None
    return float(roc_auc_score(y[counted], prob[counted]))


def choose_threshold(y, prob, rule: str) -> float:
    """The probability cut-off of one finding on val: Youden's J (max sensitivity + specificity - 1) or
    max F1; 0.5 when val lacks positives or negatives of the finding."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    counted = y >= 0
    y, prob = y[counted], prob[counted]
    if len(np.unique(y)) < 2:
        return 0.5
    if rule == "f1":
        precision, recall, cuts = precision_recall_curve(y, prob)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        return between_scores(float(cuts[int(np.argmax(f1))]), prob)
    fpr, tpr, cuts = roc_curve(y, prob)
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1          # cuts[0] is +inf: nothing predicted positive
    return between_scores(float(min(cuts[best], 1.0)), prob)


def between_scores(cut: float, prob: np.ndarray) -> float:
    """The midpoint between the cut (a val score) and the next lower val score: the same val images predicted,
    and none sitting on the threshold, where the last bit of a recomputed probability would decide."""
    lower = prob[prob < cut]
    return float((cut + (lower.max() if lower.size else 0.0)) / 2)
