"""What a report says in words: the verdict of a paired comparison, the one-model summary, where the
numbers came from, and warnings when a split is too small for tight intervals.
"""
import os

import numpy as np

from classification_metrics import LOWER_IS_BETTER, VERDICT_METRICS, _signed, fmt, with_ci
from evaluated_model import Evaluated

ACCURACY_HALF_WIDTHS = (0.10, 0.05)     # interval half-widths the small-split warning says how to reach

MIN_CLASS_IMAGES = 30                   # below this a class's recall interval is wider than about +-0.18


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
