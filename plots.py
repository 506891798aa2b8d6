"""Evaluation figures: confusion matrices, ROC and precision-recall curves, reliability diagrams, t-SNE/UMAP
projections of the embeddings, and their multi-label and comparison forms.
"""
import textwrap
import warnings

import numpy as np

import utils
from classification_metrics import ECE_BINS, _ratio, confidence_bins, confusion_matrices, with_ci
from evaluated_model import Evaluated


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def class_colors(k: int) -> list:
    cmap = pyplot().get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def tick_names(names: list, width: int = 16) -> list:
    """Class names wrapped at `width` characters (at most two lines), so long names stay inside their tick."""
    out = []
    for name in names:
        lines = textwrap.wrap(str(name).replace("_", " "), width, break_long_words=True) or [""]
        out.append("\n".join(lines[:2]) + ("…" if len(lines) > 2 else ""))
    return out


def confusion_figure(ev: Evaluated):
    """Counts and row-normalised (recall) confusion matrices as seaborn heat maps, sized so that up to 14 class
    names neither overlap each other nor leave the figure."""
    import seaborn as sns
    plt = pyplot()
    k = len(ev.class_names)
    cm = confusion_matrices(np.ones((1, len(ev.y_true))), ev.y_true, ev.prob.argmax(1), k)[0]
    rows = cm.sum(1, keepdims=True)
    names = tick_names(ev.class_names)
    longest = max(len(line) for n in names for line in n.split("\n"))
    rotate = k > 3 or longest > 10                     # upright names need a cell's height, not its width
    cell = 0.5 if rotate else max(0.6, 0.085 * longest)  # inches
    side = max(2.5, cell * k) + 0.075 * longest + 1.0
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side + 0.5), layout="constrained")
    font = 8 if k > 8 else 10
    normalised = _ratio(cm, rows)
    panels = ((axes[0], cm, "counts", np.vectorize(lambda v: f"{int(v)}")(cm), None, "images"),
              (axes[1], normalised, "row-normalised (recall)",     # a class with no images has no recall: '–'
               np.vectorize(lambda v: f"{v:.2f}" if np.isfinite(v) else "–")(normalised), 1, "fraction of the row"))
    for ax, data, title, text, vmax, unit in panels:
        sns.heatmap(np.nan_to_num(data), ax=ax, annot=text, fmt="", cmap="Blues", vmin=0, vmax=vmax, square=True,
                    cbar_kws={"label": unit, "shrink": 0.8}, annot_kws={"fontsize": font}, linewidths=0.5,
                    linecolor="white", xticklabels=names,
                    yticklabels=[f"{n} (n={int(r)})" for n, r in zip(names, rows[:, 0])])
        ax.set_xticklabels(ax.get_xticklabels(), rotation=90 if rotate else 0, ha="right" if rotate else "center",
                           rotation_mode="anchor", fontsize=font)
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0, fontsize=font)
        ax.set(xlabel="predicted class", ylabel="true class", title=title)
        if vmax is None:
            ax.collections[0].colorbar.ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(f"Confusion matrix: {ev.name}, {ev.info.split} split ({len(ev.y_true)} images)")
    return fig


def plot_confusion(ev: Evaluated, path: str) -> None:
    utils.atomic_savefig(confusion_figure(ev), path)


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


def plot_curves(ev: Evaluated, metrics: dict, path: str, kind: str) -> None:
    """One model's ROC curves (kind "roc") or precision-recall curves ("pr"): one per scorable class (binary: the
    positive class) with its area and 95% bootstrap CI, the macro-average ROC curve when K > 2, and chance."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = pyplot()
    roc, k, colors = kind == "roc", len(ev.class_names), class_colors(len(ev.class_names))
    area, area_name = (metrics["roc_auc_per_class"], "AUC") if roc else (metrics["pr_auc_per_class"], "AP")
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for c in ([1] if k == 2 else range(k)):
        if not np.isfinite(area["value"][c]):
            continue
        label = f"{ev.class_names[c]}{' (positive class)' if k == 2 else ''}: {area_name} {with_ci(area, c)}"
        if roc:
            fpr, tpr, _ = roc_curve(ev.y_true == c, ev.prob[:, c])
            ax.plot(fpr, tpr, color=colors[c], lw=1.6, label=label)
        else:
            precision, recall, _ = precision_recall_curve(ev.y_true == c, ev.prob[:, c])
            ax.step(recall, precision, where="post", color=colors[c], lw=1.6, label=label)
            ax.axhline((ev.y_true == c).mean(), color=colors[c], lw=0.8, ls=":")    # chance: the class's prevalence
    if roc:
        macro = roc_curve_of(ev.y_true, ev.prob, k)
        if k > 2 and macro is not None:
            ax.plot(*macro, color="black", lw=2.4, ls="--",
                    label=f"macro average: AUC {with_ci(metrics['roc_auc_macro'])}")
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="chance (AUC 0.5)")
        ax.set(ylim=(-0.01, 1.01), xlabel="false positive rate (1 - specificity)",
               ylabel="true positive rate (sensitivity)",
               title=f"ROC curves{' (one-vs-rest)' if k > 2 else ''}: {ev.name}")
    else:
        ax.plot([], [], color="grey", lw=0.8, ls=":", label="chance (= class prevalence)")
        macro_ap = f"\nmacro AP {with_ci(metrics['pr_auc_macro'])}" if k > 2 else ""
        ax.set(ylim=(-0.01, 1.03), xlabel="recall (sensitivity)", ylabel="precision (PPV)",
               title=f"Precision-recall curves: {ev.name}{macro_ap}")
    ax.set(xlim=(-0.01, 1.01))
    ax.legend(loc="lower right" if roc else "best", fontsize=8, title="95% bootstrap CI in brackets", title_fontsize=7)
    ax.grid(alpha=0.3)
    utils.atomic_savefig(fig, path)


def plot_roc(ev: Evaluated, metrics: dict, path: str) -> None:
    """roc_curves.png: plot_curves of kind "roc"."""
    plot_curves(ev, metrics, path, "roc")


def plot_pr(ev: Evaluated, metrics: dict, path: str) -> None:
    """pr_curves.png: plot_curves of kind "pr"."""
    plot_curves(ev, metrics, path, "pr")


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
           title=f"{method} of encoder embeddings: {ev.name}\n"
                 f"{ev.info.split} split, {len(coords)} images, coloured by true class")
    ax.legend(title="class", fontsize=8, loc="best")
    utils.atomic_savefig(fig, path)


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


TOP_FINDINGS_SHOWN = 4           # t-SNE/UMAP panels: the most frequent findings of the split


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
    fig.suptitle(f"{method} of encoder embeddings: {ev.name}, {ev.info.split} split, "
                 f"{len(coords)} images, coloured by the {len(order)} most frequent findings", fontsize=10)
    fig.tight_layout()
    utils.atomic_savefig(fig, path)
