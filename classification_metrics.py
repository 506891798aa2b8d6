"""Classification metrics with bootstrap confidence intervals, vectorised over resamples: every metric
takes `weights` (B, N), how often each of N images is drawn in each of B resamples (a row of ones is
the point estimate). Resamples draw whole patients when patient ids are given (each drawn patient brings
all its images), images otherwise. Sensitivity, specificity, precision and recall get Wilson score
intervals at the patients' effective sample size instead. Where a ROC-AUC's or an average precision's
bootstrap interval has zero width (every resample ranks the positives the same way, as when a few positives
all rank first), a score interval over the positive and negative patients takes its place (Newcombe's for
the AUC, Wilson's for the average precision). The ECE gets no interval (its resampled values are biased
upward, so a percentile interval can miss its own point value); the Brier score, a mean over images, gets
one. One-label metrics, multi-label per-finding metrics, paired differences, and the formatting of a value
with its interval.
"""
import warnings

import numpy as np
from scipy.stats import norm

ECE_BINS = 15

CI_PERCENTILES = (2.5, 97.5)

MIN_VALID_RESAMPLES = 200         # fewer usable resamples than this: no percentile interval is reported

Z95 = float(norm.ppf(0.975))

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
    "brier": "Brier score",
}

PER_CLASS_METRICS = {
    "precision": "precision", "recall": "recall (sensitivity)", "specificity": "specificity", "f1": "F1",
    "roc_auc_per_class": "ROC-AUC", "pr_auc_per_class": "PR-AUC",
}

COMPARISON_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro", "brier", "ece")

NO_INTERVAL = ("ece",)   # the ECE of a resample is biased upward: a percentile interval can miss its own value

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
    out["brier"] = brier_score(weights, y_true, prob)
    return out


def brier_score(weights, y_true, prob) -> np.ndarray:
    """Multi-class Brier score: the mean over images of the squared distance between the probability vector
    and the one-hot truth, in [0, 2]; lower is better. (B,)"""
    per_image = ((prob - _one_hot(y_true, prob.shape[1])) ** 2).sum(1)
    return (weights @ per_image) / weights.sum(1)


def group_codes(groups, n: int) -> np.ndarray:
    """(N,) code 0..G-1 of each image's patient, numbered in order of first appearance; without `groups`,
    every image is its own unit (codes 0..N-1)."""
    if groups is None:
        return np.arange(n)
    _, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def resampling_unit(groups, n: int) -> dict:
    """What the bootstrap resamples: {'unit': 'patient' or 'image', 'units': how many, 'images': n}. Patients
    only when some patient has several images (one image each resamples exactly as images do)."""
    units = len(np.unique(np.asarray(groups))) if groups is not None and n else n
    return {"unit": "patient" if units < n else "image", "units": int(units), "images": int(n)}


def bootstrap_weights(n: int, resamples: int, seed: int, chunk: int, groups=None):
    """Yield (b, n) draw counts of `resamples` bootstrap resamples of n images, `chunk` at a time. With
    `groups` (a patient id per image), the patients are resampled and each image counts as often as its
    patient is drawn; with one patient per image (or no groups) this is the image bootstrap, draw for draw."""
    codes = group_codes(groups, n)
    g = int(codes.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = rng.integers(0, max(g, 1), size=(b, g)) + g * np.arange(b)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * g).reshape(b, g)
        yield counts[:, codes].astype(np.float64)


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


def design_effect(success: np.ndarray, counted: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(K,) variance of a proportion over clustered images relative to independent images, per column of
    the (N, K) 0/1 arrays: the cluster-robust (ratio-estimator) variance over the binomial one, kept within
    [1, sum n_j^2 / n] (the upper end: every image of a patient alike); the upper end where the proportion
    is 0 or 1 or fewer than 2 patients count, since no spread can be estimated there."""
    g = int(codes.max()) + 1 if len(codes) else 0
    n_j, x_j = np.zeros((g, counted.shape[1])), np.zeros((g, counted.shape[1]))
    np.add.at(n_j, codes, counted.astype(float))
    np.add.at(x_j, codes, (success & counted).astype(float))
    n, clusters = n_j.sum(0), (n_j > 0).sum(0)
    p = _ratio(x_j.sum(0), n)
    upper = _ratio((n_j ** 2).sum(0), n)
    with np.errstate(divide="ignore", invalid="ignore"):
        robust = clusters / (clusters - 1) * ((x_j - p * n_j) ** 2).sum(0) / n ** 2
        ratio = robust / (p * (1 - p) / n)
    estimable = (clusters >= 2) & (p > 0) & (p < 1)
    return np.where(estimable, np.clip(np.nan_to_num(ratio, nan=1.0), 1.0, np.maximum(upper, 1.0)), upper)


def wilson_interval(p: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple:
    """Wilson score interval of a proportion p over n (possibly effective, non-integer) trials; NaN at n 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = 1 + z ** 2 / n
        center = (p + z ** 2 / (2 * n)) / shrink
        half = z * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2)) / shrink
    ok = n > 0
    return np.where(ok, center - half, np.nan), np.where(ok, center + half, np.nan)


def clustered_wilson(success: np.ndarray, counted: np.ndarray, codes: np.ndarray) -> tuple:
    """(low, high), each (K,): Wilson intervals of success / counted per column of the (N, K) 0/1 arrays, at
    the effective sample size n / design effect of the patients `codes` (N,)."""
    n = counted.sum(0).astype(float)
    p = _ratio((success & counted).sum(0), n)
    return wilson_interval(p, n / design_effect(success, counted, codes))


SCORE_GRID = np.linspace(0.0, 1.0, 200_001)


def _auc_variance(theta, m, n):
    """Variance of a Mann-Whitney AUC `theta` over m positives and n negatives: Hanley and McNeil's formula
    with m - 1 and n - 1 both replaced by (m + n) / 2 - 1 (Newcombe 2006, Stat Med 25:559, method 5)."""
    k = (m + n) / 2 - 1
    return theta * (1 - theta) / (m * n) * (1 + k * (1 - theta) / (2 - theta) + k * theta / (1 + theta))


def auc_score_interval(auc: np.ndarray, m: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple:
    """(low, high) per element: the AUCs theta with (auc - theta)^2 <= z^2 var(theta) (a Wilson-type score
    interval, Newcombe's method 5), which keeps its width at an AUC of 0 or 1 where a percentile bootstrap
    collapses; m, n are the positive and negative patients. Solved on a grid of step 5e-6; NaN where undefined."""
    auc, m, n = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (auc, m, n))
    low, high = np.full(auc.shape, np.nan), np.full(auc.shape, np.nan)
    for j in np.flatnonzero(np.isfinite(auc) & (m > 0) & (n > 0)):
        inside = SCORE_GRID[(auc[j] - SCORE_GRID) ** 2 <= z ** 2 * _auc_variance(SCORE_GRID, m[j], n[j])]
        low[j], high[j] = min(inside.min(), auc[j]), max(inside.max(), auc[j])
    return low, high


def unit_counts(is_positive: np.ndarray, counted: np.ndarray, codes: np.ndarray) -> tuple:
    """(positive units, negative units), each (K,): patients (or images) with a counted positive image and
    with a counted negative image, per column of the (N, K) 0/1 arrays."""
    def units(mask):
        return np.array([len(np.unique(codes[mask[:, k]])) for k in range(mask.shape[1])], dtype=float)
    return units(is_positive & counted), units(~is_positive & counted)


def collapsed(entry: dict) -> np.ndarray:
    """Where a bootstrap interval has zero width: every usable resample gave the point value."""
    low, high = np.asarray(entry["low"], dtype=float), np.asarray(entry["high"], dtype=float)
    return np.isfinite(low) & (high - low <= 1e-12)


def _with_score_fallback(entry: dict, low, high, units=None) -> dict:
    """The entry with `low`/`high` in place of its limits where its percentile interval collapsed; 'score'
    marks which, 'units' keeps the (positive, negative) patient counts the score interval used."""
    where = collapsed(entry)
    if not where.any():
        return entry
    pick = lambda new, old: np.where(where, new, old) if np.ndim(old) else (float(new) if where else old)  # noqa: E731
    extra = {} if units is None else {"units": units}
    return entry | {"low": pick(low, entry["low"]), "high": pick(high, entry["high"]), "score": where} | extra


def ranking_fallbacks(out: dict, auc_key: str, ap_key: str, pos, counted, codes, means: dict) -> None:
    """Replaces collapsed per-class (per-finding) AUC and AP intervals by score intervals over the positive
    and negative patients, and collapsed averages (`means`: key -> (per-class key, columns averaged)) by the
    mean of their classes' limits."""
    m, n = unit_counts(pos, counted, codes)
    out[auc_key] = _with_score_fallback(out[auc_key], *auc_score_interval(out[auc_key]["value"], m, n), (m, n))
    out[ap_key] = _with_score_fallback(out[ap_key], *wilson_interval(np.asarray(out[ap_key]["value"]), m), (m, n))
    for key, (per_class, columns) in means.items():
        if collapsed(out[key]).any() and len(columns):
            limits = [np.mean(np.asarray(out[per_class][side])[columns]) for side in ("low", "high")]
            out[key] = _with_score_fallback(out[key], *limits)


def interval_kind(m: dict, index=None) -> str:
    """How an entry's (one class's, with `index`) 95% interval was made, for metrics.json."""
    score = m.get("score")
    if score is not None and bool(np.asarray(score) if index is None else np.asarray(score)[index]):
        return "score (the bootstrap interval had zero width)"
    if m.get("interval") == "none":
        return "none"
    return "Wilson score" if m.get("interval") == "wilson" else "percentile bootstrap"


def score_notes(m: dict, label: str, names: list, unit: str) -> list:
    """A sentence per class (finding) whose AUC or AP interval is a score interval, so none goes unexplained."""
    if "units" not in m:
        return []
    (pos_units, neg_units), score = m["units"], np.atleast_1d(np.asarray(m["score"]))
    return [f"{label} of {names[j]!r}: every resample ranked its {int(pos_units[j])} positive {unit}s the same "
            f"way against its {int(neg_units[j])} negative ones (a zero-width bootstrap interval); its interval is a "
            f"score interval over those {unit}s instead (docs/design.md)" for j in np.flatnonzero(score)]


def _entry(value, samples, resamples: int) -> dict:
    """A metric's point value with its percentile interval over the bootstrap `samples`."""
    low, high, valid = percentile_interval(samples)
    return {"value": value, "low": low, "high": high, "valid": valid, "resamples": resamples}


def _with_wilson(entry: dict, success, counted, codes) -> dict:
    """The entry with Wilson limits (see clustered_wilson) in place of percentile ones."""
    low, high = clustered_wilson(success, counted, codes)
    return entry | {"low": low, "high": high, "valid": np.full(low.shape, entry["resamples"]), "interval": "wilson"}


def compute_metrics(y_true, prob, k: int, resamples: int, seed: int, groups=None) -> dict:
    """{metric: {'value', 'low', 'high', 'valid', 'resamples'}} with percentile bootstrap intervals over
    patients (`groups`: a patient id per image) or images, Wilson intervals for precision, recall and
    specificity, plus 'support' (images per class) and 'resampling' (resampling_unit)."""
    y_true, prob = np.asarray(y_true), np.asarray(prob, dtype=np.float64)
    n, counts = len(y_true), np.bincount(y_true, minlength=k)
    scorable = (counts > 0) & (counts < n)
    point = all_metrics(np.ones((1, n)), y_true, prob, k, scorable)
    draws = [all_metrics(w, y_true, prob, k, scorable)
             for w in bootstrap_weights(n, resamples, seed, _chunk(n, k), groups)]
    out = {"support": counts, "resampling": resampling_unit(groups, n)}
    for key, value in point.items():
        out[key] = _entry(value[0], np.concatenate([d[key] for d in draws]) if draws else value[:0], resamples)
    if resamples:
        true, pred, codes = _one_hot(y_true, k) > 0, _one_hot(prob.argmax(1), k) > 0, group_codes(groups, n)
        out["recall"] = _with_wilson(out["recall"], pred, true, codes)
        out["specificity"] = _with_wilson(out["specificity"], ~pred, ~true, codes)
        out["precision"] = _with_wilson(out["precision"], true, pred, codes)
        columns = np.flatnonzero(scorable)
        means = {"roc_auc_macro": ("roc_auc_per_class", columns), "pr_auc_macro": ("pr_auc_per_class", columns),
                 "roc_auc": ("roc_auc_per_class", [1] if k == 2 else columns),
                 "pr_auc": ("pr_auc_per_class", [1] if k == 2 else columns)}
        ranking_fallbacks(out, "roc_auc_per_class", "pr_auc_per_class", true, np.ones_like(true), codes, means)
    for key in NO_INTERVAL:
        out[key] = out[key] | {"low": np.nan, "high": np.nan, "interval": "none"}
    return out


def excludes_zero(low, high) -> bool:
    return bool(np.isfinite(low) and (low > 0 or high < 0))


def paired_accuracy_difference(y_true, prob_a, prob_b, resamples: int, seed: int, groups=None) -> dict:
    """Accuracy of A minus B on the same images, with a paired bootstrap (the same resampled patients, or
    images without `groups`, for both)."""
    n = len(y_true)
    correct = np.stack([prob_a.argmax(1) == y_true, prob_b.argmax(1) == y_true], 1).astype(float)   # (N, 2)
    accuracies = [(w @ correct) / w.sum(1, keepdims=True)
                  for w in bootstrap_weights(n, resamples, seed, _chunk(n), groups)]
    accuracies = np.concatenate(accuracies) if accuracies else np.zeros((0, 2))                     # (B, 2)
    low, high, valid = percentile_interval(accuracies[:, 0] - accuracies[:, 1])
    return {"difference": float(correct[:, 0].mean() - correct[:, 1].mean()), "low": float(low),
            "high": float(high), "valid": int(valid), "resamples": resamples, "num_images": n,
            "resampling": resampling_unit(groups, n), "excludes_zero": excludes_zero(low, high)}


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def with_ci(m: dict, index=None, digits: int = 3) -> str:
    """'0.812 [0.750, 0.870]' for a metric entry (a per-class one when `index` is given); where resamples were
    drawn but too few of them define the metric, '0.812 [n/a: only 150 usable resamples]'."""
    pick = (lambda a: a) if index is None else (lambda a: np.asarray(a)[index])
    value, low, high = pick(m["value"]), pick(m["low"]), pick(m["high"])
    if not np.isfinite(value):
        return "n/a"
    if m.get("interval") == "none":
        return fmt(value, digits)
    if np.isfinite(low):
        return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"
    if m.get("resamples") and "valid" in m:
        return f"{fmt(value, digits)} [n/a: only {int(pick(m['valid']))} usable resamples]"
    return fmt(value, digits)


VERDICT_METRICS = {"balanced_accuracy": "balanced accuracy", "accuracy": "accuracy", "f1_macro": "macro F1",
                   "roc_auc_macro": "ROC-AUC", "brier": "Brier score"}

PRIMARY_METRIC = "balanced_accuracy"   # the verdict's metric; the others are secondary, Holm-adjusted

LOWER_IS_BETTER = {"ece", "brier"}

ALPHA = 0.05


def bootstrap_p_value(samples: np.ndarray) -> float:
    """Two-sided p-value of 'no difference' from bootstrap differences: twice the smaller share of usable
    resamples on either side of zero (each share counted as (k + 1) / (B + 1)); NaN when too few."""
    d = samples[np.isfinite(samples)]
    if len(d) < MIN_VALID_RESAMPLES:
        return float("nan")
    below, above = ((d <= 0).sum() + 1) / (len(d) + 1), ((d >= 0).sum() + 1) / (len(d) + 1)
    return float(min(1.0, 2 * min(below, above)))


def holm_adjusted(p) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN p-values stay NaN, not counted."""
    p = np.asarray(p, dtype=float)
    out, ok = np.full(p.shape, np.nan), np.isfinite(p)
    q = p[ok]
    order = np.argsort(q, kind="stable")
    m = len(q)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order])) if m else q
    filled = np.empty(m)
    filled[order] = adjusted
    out[ok] = filled
    return out


def paired_metric_differences(y_true, prob_a, prob_b, k: int, resamples: int, seed: int, groups=None,
                              skip=()) -> dict:
    """{metric: difference A - B, 95% paired-bootstrap interval, bootstrap p-value}: both models scored on the
    same resampled patients (or images without `groups`), so what they have in common cancels out. The
    secondary metrics (all but PRIMARY_METRIC) also get Holm-adjusted p-values ('p_holm', 'detected'); the
    metrics in `skip` (undefined for one of the models) are left out of the family."""
    y_true = np.asarray(y_true)
    n, counts = len(y_true), np.bincount(y_true, minlength=k)
    scorable = (counts > 0) & (counts < n)
    keys = [key for key in VERDICT_METRICS if key not in skip]
    a, b = (all_metrics(np.ones((1, n)), y_true, p, k, scorable) for p in (prob_a, prob_b))
    draws = []
    for w in bootstrap_weights(n, resamples, seed, _chunk(n, k), groups):
        da, db = all_metrics(w, y_true, prob_a, k, scorable), all_metrics(w, y_true, prob_b, k, scorable)
        draws.append(np.stack([da[key] - db[key] for key in keys], 1))
    samples = np.concatenate(draws) if draws else np.zeros((0, len(keys)))
    low, high, valid = percentile_interval(samples)
    p = [bootstrap_p_value(samples[:, j]) for j in range(len(keys))]
    secondary = [j for j, key in enumerate(keys) if key != PRIMARY_METRIC]
    p_holm = dict(zip(secondary, holm_adjusted([p[j] for j in secondary])))
    out = {}
    for j, key in enumerate(keys):
        out[key] = {"difference": float(a[key][0] - b[key][0]), "low": float(low[j]), "high": float(high[j]),
                    "valid": int(valid[j]), "excludes_zero": excludes_zero(low[j], high[j]), "p": p[j],
                    "primary": key == PRIMARY_METRIC}
        if j in p_holm:
            out[key] |= {"p_holm": float(p_holm[j]), "detected": bool(p_holm[j] < ALPHA)}
        else:
            out[key]["detected"] = out[key]["excludes_zero"]
    return out


def _signed(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.3f}"


def plain(x):
    """A float for JSON; NaN (an undefined metric) becomes null."""
    x = float(x)
    return x if np.isfinite(x) else None


FINDING_METRICS = {"roc_auc": "ROC-AUC", "average_precision": "average precision",
                   "sensitivity": "sensitivity", "specificity": "specificity"}


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


def compute_multilabel_metrics(y, prob, thresholds, resamples: int, seed: int, groups=None) -> dict:
    """{metric: {'value', 'low', 'high', 'valid', 'resamples'}} (per-finding metrics are (K,) arrays) with
    percentile bootstrap intervals over patients (`groups`) or images and Wilson intervals for sensitivity and
    specificity, plus 'positives', 'negatives' and 'ignored' (uncertain cells) counted per finding and
    'resampling' (resampling_unit)."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=np.float64)
    n, scorable = len(y), scorable_findings(y)
    point = multilabel_draws(np.ones((1, n)), y, prob, thresholds, scorable)
    draws = [multilabel_draws(w, y, prob, thresholds, scorable)
             for w in bootstrap_weights(n, resamples, seed, _chunk(n, 4 * y.shape[1]), groups)]
    out = {"positives": (y == 1).sum(0), "negatives": (y == 0).sum(0), "ignored": (y < 0).sum(0),
           "resampling": resampling_unit(groups, n)}
    for key, value in point.items():
        out[key] = _entry(value[0], np.concatenate([d[key] for d in draws]) if draws else value[:0], resamples)
    if resamples:
        pred, codes = prob >= np.asarray(thresholds)[None, :], group_codes(groups, n)
        out["sensitivity"] = _with_wilson(out["sensitivity"], pred, y == 1, codes)
        out["specificity"] = _with_wilson(out["specificity"], ~pred, y == 0, codes)
        columns = np.flatnonzero(scorable)
        ranking_fallbacks(out, "roc_auc", "average_precision", y == 1, y >= 0, codes,
                          {"mean_auc": ("roc_auc", columns), "mean_ap": ("average_precision", columns)})
    return out
