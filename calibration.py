"""Temperature scaling (Guo et al. 2017): one temperature T > 0 that divides a classifier's logits, fitted on
the val split by minimising the negative log-likelihood; for a multi-label classifier one T per finding
(its sigmoid), the ignored (-1) cells left out. Dividing by T keeps every argmax, so accuracy does not move;
with two classes or per-finding sigmoids it keeps every ranking too (ROC-AUC unchanged), while with three
or more classes a class's probabilities can reorder slightly across images. Also the ECE before and after
that evaluate.py reports.

    T = fit_temperature(val_logits, val_labels, multilabel=False)        # 1.37
    prob = tasks.of(ckpt.task).probabilities(logits / ckpt.temperature_tensor())
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from classification_metrics import ECE_BINS, expected_calibration_error

LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))   # a temperature outside means the fit has no signal to go on


def _bounded_argmin(nll) -> float:
    """exp of the log-temperature in LOG_T_BOUNDS that minimises `nll(T)`."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: nll(math.exp(log_t)), bounds=LOG_T_BOUNDS, method="bounded",
                             options={"xatol": 1e-5})
    return float(math.exp(result.x))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> float | list:
    """The val NLL-minimising temperature: a float for softmax over classes (`labels` (N,) indices), a list
    of K floats for K sigmoids (`labels` (N, K) of 1, 0 and -1 = ignored; a finding without counted cells
    keeps 1.0)."""
    logits = logits.detach().double().cpu()
    if not multilabel:
        labels = labels.long().cpu()
        return _bounded_argmin(lambda t: F.cross_entropy(logits / t, labels).item())
    labels = labels.double().cpu()
    temperatures = []
    for k in range(logits.shape[1]):
        counted = labels[:, k] >= 0
        z, y = logits[counted, k], labels[counted, k]
        temperatures.append(1.0 if len(y) == 0 else
                            _bounded_argmin(lambda t: F.binary_cross_entropy_with_logits(z / t, y).item()))
    return temperatures


def recalibrated_thresholds(thresholds: list, temperatures: list) -> list:
    """Per-finding probability thresholds chosen on uncalibrated sigmoids, moved to the calibrated scale:
    sigmoid(logit(t) / T) predicts exactly the same images."""
    out = []
    for t, temp in zip(thresholds, temperatures):
        if t <= 0.0 or t >= 1.0:
            out.append(float(t))
            continue
        out.append(float(1.0 / (1.0 + math.exp(-math.log(t / (1.0 - t)) / temp))))
    return out


def thresholds_keeping_val_predictions(thresholds: list, recalibrated: list, logits: torch.Tensor,
                                       temperatures: list) -> list:
    """`recalibrated` (sigmoid(logit(t) / T), exact in real numbers) nudged where float32 rounding would flip a
    val cell across it: each threshold ends up above every calibrated val probability that was below its old
    threshold and at or below every one that was at or above it, as evaluation computes them."""
    before = logits.sigmoid().numpy() >= np.asarray(thresholds)
    after = (logits / torch.tensor(temperatures, dtype=torch.float32)).sigmoid().numpy().astype(np.float64)
    out = []
    for k, t in enumerate(recalibrated):
        positive, negative = after[before[:, k], k], after[~before[:, k], k]
        if positive.size and t > positive.min():
            t = float(positive.min())
        if negative.size and t <= negative.max() and not (positive.size and negative.max() >= positive.min()):
            t = float(np.nextafter(np.float32(negative.max()), np.float32(np.inf)))
        out.append(t)
    return out


def binary_ece(y: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of one finding's sigmoid over its counted cells: |positive rate - mean probability| per bin."""
    counted = y >= 0
    y, prob = y[counted].astype(np.float64), prob[counted]
    if len(y) == 0:
        return float("nan")
    which = np.clip(np.ceil(prob * bins).astype(int) - 1, 0, bins - 1)
    gap = np.bincount(which, y - prob, bins)
    return float(np.abs(gap).sum() / len(y))


def ece(y_true: np.ndarray, prob: np.ndarray, multilabel: bool) -> float:
    """Top-label ECE (one label), or the mean over findings of each finding's ECE (multi-label)."""
    if multilabel:
        values = [binary_ece(y_true[:, k], prob[:, k]) for k in range(prob.shape[1])]
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")
    return float(expected_calibration_error(np.ones((1, len(y_true))), y_true, prob)[0])


def brier_score(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Multi-class Brier score: the mean over images of the squared distance between the probability vector
    (N, K) and the one-hot label; 0 is perfect, 2 the worst. Unlike ECE it needs no bins."""
    y_true, prob = np.asarray(y_true), np.asarray(prob, dtype=np.float64)
    if len(y_true) == 0:
        return float("nan")
    onehot = np.eye(prob.shape[1])[y_true]
    return float(((prob - onehot) ** 2).sum(1).mean())


def ece_before_after(ev, task) -> dict | None:
    """metrics.json's "calibration" entry of a scored classifier: its temperature and the ECE of its split's
    probabilities before (T = 1) and after temperature scaling; None for models without uncalibrated ones."""
    if ev.prob_uncalibrated is None:
        return None
    return {"temperature": ev.info.temperature, "fitted_on": "val split (negative log-likelihood)",
            "ece_uncalibrated": task.ece(ev.y_true, ev.prob_uncalibrated),
            "ece_calibrated": task.ece(ev.y_true, ev.prob),
            "ece_definition": f"{task.ece_definition}, {ECE_BINS} bins"}


def report_line(calibration: dict) -> str:
    """The report's one line on calibration."""
    t = calibration["temperature"]
    temp = f"T = {t:.3f}" if isinstance(t, float) else "T per finding " + ", ".join(f"{v:.2f}" for v in t)
    return (f"- calibration: temperature scaling fitted on val ({temp}); ECE {calibration['ece_uncalibrated']:.4f} "
            f"before, {calibration['ece_calibrated']:.4f} after; the probabilities, metrics and figures below are the "
            f"calibrated ones (scaling keeps every argmax, so accuracy is unchanged)")
