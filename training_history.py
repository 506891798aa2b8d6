"""Per-epoch history files (CSV) of a training run and the training-curve figure drawn from them.
"""
import csv
import math
import os
import time

import numpy as np

from utils import atomic_savefig, atomic_write_text


class History:
    """Rows of per-epoch metrics in a CSV, rewritten atomically each epoch; `--resume` reloads it."""

    def __init__(self, path: str, resume: bool = False):
        self.path = path
        self.rows = []
        if resume and os.path.isfile(path):
            with open(path, newline="") as f:
                self.rows = [dict(r) for r in csv.DictReader(f)]

    def truncate(self, num_epochs: int) -> None:
        self.rows = [r for r in self.rows if int(r["epoch"]) <= num_epochs]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        lines = [",".join(fields)]
        for r in self.rows:
            lines.append(",".join(_fmt(r.get(k, "")) for k in fields))
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


PLOT_EVERY_S = 30.0      # redraw training curves at most this often (and after the last epoch)

_last_plotted: dict = {}


def plot_history_throttled(csv_path: str, png_path: str, title: str, last_epoch: bool, **plot_args) -> None:
    """plot_history after the first and the last epoch, and in between at most every PLOT_EVERY_S
    seconds: on a small CPU drawing the figure takes as long as a fine-tuning epoch on a few dozen images
    (docs/performance.md). The CSV is written every epoch regardless. `plot_args` (best_epoch, chance) go
    to plot_history."""
    now = time.monotonic()
    if not last_epoch and now - _last_plotted.get(png_path, -math.inf) < PLOT_EVERY_S:
        return
    plot_history(csv_path, png_path, title, **plot_args)
    _last_plotted[png_path] = time.monotonic()


# The panels of the training-curve figure: (title, history columns drawn together, y label). Other columns
# (images/s, the encoder-frozen flag) are for the CSV: a reader of the figure needs loss, quality and lr.
HISTORY_PANELS = (
    ("loss", ("train_loss", "val_loss", "loss"), "loss per image"),
    ("validation", ("val_balanced_accuracy", "val_accuracy", "knn_accuracy", "val_mean_auc"), "accuracy"),
    ("learning rate", ("lr",), "learning rate"),
    ("embedding spread (collapse if near 0)", ("embedding_std",), "std of normalised embeddings"),
)


def best_history_epoch(df):
    """The epoch the trainers keep, by their own rules: fine-tuning the highest val balanced accuracy (ties:
    lower val loss, then the earlier epoch); pretraining the highest kNN accuracy (ties: the later epoch),
    else the lowest loss. None when the history has none of these columns."""
    if "val_balanced_accuracy" in df and df["val_balanced_accuracy"].notna().any():
        d = df.dropna(subset=["val_balanced_accuracy"])
        loss = d["val_loss"] if "val_loss" in d else 0
        ranked = d.assign(_neg_loss=-loss).sort_values(["val_balanced_accuracy", "_neg_loss"], ascending=False,
                                                       kind="stable")
        return int(ranked["epoch"].iloc[0])
    if "val_mean_auc" in df and df["val_mean_auc"].notna().any():     # multi-label: the first best mean AUC
        d = df.dropna(subset=["val_mean_auc"])
        return int(d["epoch"][d["val_mean_auc"] == d["val_mean_auc"].max()].iloc[0])
    if "knn_accuracy" in df and df["knn_accuracy"].notna().any():
        d = df.dropna(subset=["knn_accuracy"])
        return int(d["epoch"][d["knn_accuracy"] == d["knn_accuracy"].max()].iloc[-1])
    if "loss" in df and df["loss"].notna().any():
        return int(df["epoch"][df["loss"].idxmin()])
    return None


def plot_history(csv_path: str, png_path: str, title: str, best_epoch: int | None = None,
                 chance: float | None = None) -> None:
    """A compact grid of the training curves that matter (loss, validation accuracy, lr, embedding spread),
    epochs on a shared x axis, the kept epoch marked (`best_epoch`, else found by the trainers' rules) and
    the accuracy `chance` level (1 / classes) drawn when given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import pandas as pd

    df = pd.read_csv(csv_path)
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    panels = [(t, [c for c in cols if c in numeric], y) for t, cols, y in HISTORY_PANELS]
    if "val_mean_auc" in numeric:                      # a multi-label run's validation panel holds its mean AUC
        panels = [(t, c, "mean ROC-AUC" if t == "validation" else y) for t, c, y in panels]
    panels = [p for p in panels if p[1]]
    if not panels or "epoch" not in df:
        return
    best_epoch = best_epoch if best_epoch is not None else best_history_epoch(df)
    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False)
    for ax, (panel_title, cols, ylabel) in zip(axes.flat, panels):
        for col in cols:
            d = df[["epoch", col]].dropna()
            ax.plot(d["epoch"], d[col], marker="o", ms=3 if len(d) < 40 else 0, label=col.replace("_", " "))
        if panel_title == "validation":
            ax.set_ylim(0, 1.02)                  # accuracies on one scale, so a flat curve looks flat
            if chance is not None:
                ax.axhline(chance, color="grey", ls=":", lw=1, label=f"chance ({chance:.2f})")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:red", ls="--", lw=1, label=f"kept: epoch {best_epoch}")
        ax.set(title=panel_title, ylabel=ylabel, xlabel="epoch", xlim=(0.5, max(1, df["epoch"].max()) + 0.5))
        values = df[cols].to_numpy(float)
        if panel_title == "loss" and np.nanmin(values) > 0 and np.nanmax(values) > 30 * np.nanmin(values):
            ax.set_yscale("log")                  # a first-epoch val loss of 100 would flatten the rest
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, png_path)
