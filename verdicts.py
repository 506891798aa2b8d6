"""What a report says in words: the verdict of a paired comparison, the one-model summary, where the
numbers came from, and warnings when a split is too small for tight intervals.
"""
import os

import numpy as np

from classification_metrics import (ALPHA, LOWER_IS_BETTER, MIN_VALID_RESAMPLES, PRIMARY_METRIC, VERDICT_METRICS, _signed,
                                    fmt, with_ci)
from evaluated_model import Evaluated

ACCURACY_HALF_WIDTHS = (0.10, 0.05)     # interval half-widths the small-split warning says how to reach

MIN_CLASS_IMAGES = 30                   # below this a class's recall interval is wider than about +-0.18


INIT_WORDS = {"ssl": "SSL-initialised", "scratch": "from-scratch"}

METHOD_CLAIM = ("One pair of trained models on one test set says nothing about the training method in general: "
                "whether SSL pretraining helps is what the label-efficiency benchmark's multi-seed result measures "
                "(benchmarks/label_efficiency.py; docs/results.md).")


def units_text(resampling: dict, split: str = "") -> str:
    """'106 test patients (318 images)' or '318 test images': what the bootstrap resampled."""
    split = f"{split} " if split else ""
    if resampling["unit"] == "patient":
        return f"{resampling['units']} {split}patients ({resampling['images']} images)"
    return f"{resampling['images']} {split}images"


def interval_text(resampling: dict, resamples: int, seed: int | None = None) -> str:
    """How the report's 95% intervals were made, in one sentence."""
    if not resamples:
        return "no intervals (--bootstrap 0)"
    seed = "" if seed is None else f", seed {seed}"
    return (f"95% intervals: bootstrap over {units_text(resampling)}, {resamples} resamples, percentile{seed}; an interval needs {MIN_VALID_RESAMPLES} resamples that define the metric, else it reads "
            f"n/a; sensitivity, specificity, precision and recall: Wilson score intervals at the effective "
            f"sample size of the patients; a ROC-AUC or average precision whose bootstrap interval has zero width: "
            f"a score interval over its positive and negative patients; the ECE: no interval (docs/design.md)")


def bootstrap_document(resampling: dict, args) -> dict:
    """metrics.json's account of the intervals."""
    return {"resamples": args.bootstrap, "seed": args.seed, "interval": "percentile, 95%",
            "unit": resampling["unit"], "units": resampling["units"], "images": resampling["images"],
            "min_usable_resamples": MIN_VALID_RESAMPLES,
            "proportions": "Wilson score, 95%, at the effective sample size of the patients",
            "zero_width_ranking": "ROC-AUC: Newcombe's score interval (method 5); average precision: Wilson score "
                                  "interval; over the positive and negative patients",
            "ece": "no interval (biased upward under resampling); the Brier score has one"}


def _p(d: dict, key: str = "p_holm") -> str:
    return f"Holm-adjusted p {d[key]:.3f}" if np.isfinite(d.get(key, np.nan)) else "Holm-adjusted p n/a"


def metric_verdict(name_a: str, name_b: str, key: str, d: dict) -> str:
    """One clause: which model is better on one metric, by how much, or no difference detected; a secondary
    metric is judged by its Holm-adjusted p-value."""
    label, ci = VERDICT_METRICS[key], f"95% CI [{_signed(d['low'])}, {_signed(d['high'])}]"
    if not np.isfinite(d["difference"]):
        return f"{label}: undefined on these images"
    primary = d.get("primary", key == PRIMARY_METRIC)
    detected = d["excludes_zero"] if primary else d.get("detected", d["excludes_zero"])
    mark = "" if primary else f", {_p(d)}"
    if not detected:
        return f"{label}: no difference detected ({name_a} minus {name_b} {_signed(d['difference'])}, {ci}{mark})"
    a_better = (d["difference"] < 0) if key in LOWER_IS_BETTER else (d["difference"] > 0)
    winner, loser = (name_a, name_b) if a_better else (name_b, name_a)
    word = "lower" if key in LOWER_IS_BETTER else "higher"
    return f"{label}: **{winner}** is better, {abs(d['difference']):.3f} {word} than {loser} ({ci}{mark})"


def model_words(name: str, init) -> str:
    """'this SSL-initialised model (SSL init)', or the name alone when the init is unknown."""
    return f"this {INIT_WORDS[init]} model ({name})" if init in INIT_WORDS else name


def verdict_lines(paired) -> list:
    """The first lines of a comparison: the primary metric's verdict on these models and these patients, the
    secondary metrics Holm-adjusted, and where the claim about the method lives."""
    if paired is None:
        return ["**Verdict:** the first two models share no scored image, so they cannot be compared."]
    a, b, diffs = paired["model_a"], paired["model_b"], paired["metrics"]
    primary = diffs[PRIMARY_METRIC]
    if not primary["excludes_zero"]:
        outcome = "**no difference detected**"
    else:
        outcome = f"**{a if primary['difference'] > 0 else b}** is better"
    resampling = paired.get("resampling") or {"unit": "image", "images": paired["num_images"]}
    head = (f"**Verdict** (primary metric: {VERDICT_METRICS[PRIMARY_METRIC]}): {model_words(a, paired.get('init_a'))}"
            f" vs {model_words(b, paired.get('init_b'))} on these {units_text(resampling, paired['split'])}: "
            f"{outcome}, {a} minus {b} {_signed(primary['difference'])} (paired bootstrap over the "
            f"{resampling['unit']}s, 95% CI [{_signed(primary['low'])}, {_signed(primary['high'])}]).")
    secondary = [f"- {metric_verdict(a, b, key, d)}" for key, d in diffs.items() if key != PRIMARY_METRIC]
    return [head, "", METHOD_CLAIM, "", f"Secondary metrics ({len(secondary)} comparisons, Holm-adjusted):", ""] \
        + secondary


def multilabel_verdict_lines(paired) -> list:
    """The first lines of a multi-label comparison: the mean AUC (the primary metric) of these two models on
    these patients, and where the claim about the method lives."""
    if paired is None:
        return ["**Verdict:** the first two models share no scored image, so they cannot be compared."]
    a, b = paired["model_a"], paired["model_b"]
    d, low, high = paired["difference"][-1], paired["low"][-1], paired["high"][-1]
    if not np.isfinite(d):
        outcome = "undefined (no finding has positives and negatives in every model's split)"
    elif np.isfinite(low) and (low > 0 or high < 0):
        outcome = f"**{a if d > 0 else b}** is better"
    else:
        outcome = "**no difference detected**"
    return [f"**Verdict** (primary metric: mean ROC-AUC over the findings): {model_words(a, paired.get('init_a'))} vs "
            f"{model_words(b, paired.get('init_b'))} on these {units_text(paired['resampling'], paired['split'])}: "
            f"{outcome}, {a} minus {b} {_signed(d)} (paired bootstrap over the {paired['resampling']['unit']}s, "
            f"95% CI [{_signed(low)}, {_signed(high)}]).", "", METHOD_CLAIM]


def provenance_lines(ev: Evaluated, metrics: dict, args, split_detail: str = "", extra: list = ()) -> list:
    """A report's bullets on where its numbers came from: checkpoint, split (+ split_detail), `extra`, label
    file and how the intervals were made."""
    return [f"- checkpoint: `{os.path.abspath(ev.checkpoint)}` ({describe(ev)})",
            f"- split: **{ev.info.split}** ({ev.info.split_source}), {units_text(metrics['resampling'])}"
            f"{split_detail}",
            *extra,
            f"- label file: `{os.path.abspath(args.label_file)}`",
            f"- {interval_text(metrics['resampling'], args.bootstrap, args.seed)}"]


def headline_sentence(ev: Evaluated, metrics: dict) -> str:
    """The one-model verdict: the headline metrics in one sentence."""
    auc_key = "roc_auc" if len(ev.class_names) == 2 else "roc_auc_macro"
    return (f"**Summary:** on {units_text(metrics['resampling'], ev.info.split)}, {ev.name} has balanced accuracy "
            f"{with_ci(metrics['balanced_accuracy'])} (the primary metric), accuracy {with_ci(metrics['accuracy'])}, "
            f"macro F1 {with_ci(metrics['f1_macro'])} and ROC-AUC {with_ci(metrics[auc_key])} (95% bootstrap CI; "
            f"chance balanced accuracy {1 / len(ev.class_names):.3f}).")


def images_for_half_width(half_width: float, p: float = 0.5) -> int:
    """Images a proportion near p needs for a 95% interval of +-half_width (normal approximation)."""
    return int(np.ceil(1.96 ** 2 * p * (1 - p) / half_width ** 2))


VAL_SPLIT_WARNING = ("--split val scores the split that chose the kept epoch, the calibration temperature, the "
                     "multi-label thresholds and the linear probe's C: its numbers are optimistic; report the test "
                     "split")


def small_split_warnings(ev: Evaluated, metrics: dict, thin: list | None = None,
                         what: str = "images of a class") -> list:
    """Sentences for a split too small (or, `thin`: [(name, count)], a class or finding in it too thin) for its
    intervals to mean much, and for scoring the val split; `thin` defaults to the classes' image counts."""
    r, out = metrics["resampling"], [VAL_SPLIT_WARNING] if ev.info.split == "val" else []
    n, unit = r["units"], r["unit"]
    need = [images_for_half_width(h) for h in ACCURACY_HALF_WIDTHS]
    if n < need[0]:
        out.append(f"only {units_text(r, ev.info.split)}: a 95% interval for accuracy is about "
                   f"+-{1.96 * np.sqrt(0.25 / n):.2f} wide at {n} independent {unit}s; about {need[0]} {unit}s give "
                   f"+-{ACCURACY_HALF_WIDTHS[0]:.2f} and {need[1]} give +-{ACCURACY_HALF_WIDTHS[1]:.2f}")
    if thin is None:
        thin = list(zip(ev.class_names, metrics["support"]))
    small = [(name, int(c)) for name, c in thin if 0 < c < MIN_CLASS_IMAGES]
    if small:
        shown = ", ".join(f"{name} ({c})" for name, c in small)
        out.append(f"few {what}: {shown}; a sensitivity, specificity or precision interval is wider "
                   f"than +-{1.96 * np.sqrt(0.25 / MIN_CLASS_IMAGES):.2f} below {MIN_CLASS_IMAGES} images (fewer "
                   f"patients widen it further); about {need[0]} give +-{ACCURACY_HALF_WIDTHS[0]:.2f}")
    return out


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


def paired_sentences(paired) -> list:
    if paired is None:
        return ["The first two models share no evaluated image, so no paired difference is computed."]
    # lead with the primary metric (the verdict's); accuracy where a comparison predates the per-metric table
    lead, name = paired.get("metrics", {}).get(PRIMARY_METRIC), VERDICT_METRICS[PRIMARY_METRIC].capitalize()
    if lead is None:
        lead, name = paired, "Accuracy"
    verdict = ("excludes zero: the difference is unlikely to be resampling noise" if lead["excludes_zero"]
               else "includes zero: no difference detected")
    resampling = paired.get("resampling") or {"unit": "image", "images": paired["num_images"]}
    lines = [f"{name} of **{paired['model_a']}** minus **{paired['model_b']}** on the {units_text(resampling)} "
             f"both scored: **{lead['difference']:+.3f}** (95% CI [{fmt(lead['low'])}, {fmt(lead['high'])}], "
             f"paired bootstrap: the same resampled {resampling['unit']}s for both). The interval {verdict}. "
             f"The primary metric is judged by its interval; the secondary ones by Holm-adjusted p-values "
             f"(bootstrap, two-sided), which control the chance of any false 'detected' among them at 5%.",
             "", f"| metric | {paired['model_a']} minus {paired['model_b']} | 95% CI | p | difference detected |",
             "|---|---:|---|---|---|"]
    for key, d in paired.get("metrics", {}).items():
        primary = d.get("primary", key == PRIMARY_METRIC)
        p = "primary metric" if primary else _p(d)
        detected = d["excludes_zero"] if primary else d.get("detected", d["excludes_zero"])
        lines.append(f"| {VERDICT_METRICS[key]} | {_signed(d['difference'])} | [{_signed(d['low'])}, "
                     f"{_signed(d['high'])}] | {p} | {'yes' if detected else 'no'} |")
    return lines


def paired_auc_lines(paired) -> list:
    """The multi-label paired comparison: the mean AUC (the primary metric, judged by its interval) and each
    finding's AUC difference with its Holm-adjusted p-value."""
    if paired is None:
        return ["The first two models share no evaluated image, so no paired difference is computed."]
    resampling = paired.get("resampling") or {"unit": "image", "images": paired["num_images"]}
    lines = [f"ROC-AUC of **{paired['model_a']}** minus **{paired['model_b']}** on the {units_text(resampling)} "
             f"both scored, on the same certain labels for both (paired bootstrap: the same resampled "
             f"{resampling['unit']}s for both). The mean AUC is the primary metric, judged by its interval; each "
             f"finding is marked by its Holm-adjusted p-value over the findings.", "",
             "| finding | difference [95% CI] | p | difference detected |", "|---|---|---|---|"]
    p_holm = list(paired.get("p_holm", [])) + [None]
    for k, finding in enumerate(paired["findings"] + ["**mean AUC**"]):
        d, lo, hi = paired["difference"][k], paired["low"][k], paired["high"][k]
        if not np.isfinite(d):
            lines.append(f"| {finding} | n/a | | |")
            continue
        ci = f" [{fmt(lo)}, {fmt(hi)}]" if np.isfinite(lo) else ""
        if p_holm[k] is None:
            mark, detected = "primary metric", np.isfinite(lo) and (lo > 0 or hi < 0)
        else:
            mark, detected = _p({"p_holm": p_holm[k]}), bool(p_holm[k] < ALPHA)
        lines.append(f"| {finding} | {d:+.3f}{ci} | {mark} | {'yes' if detected else 'no'} |")
    return lines
