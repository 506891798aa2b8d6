"""Figures a reader can read: the confusion matrix's class names never overlap each other or the other labels, from
3 to 14 classes (ChestX-ray14's findings), and every figure names the model as the report does."""
import itertools

import numpy as np
import pytest

import plots
from evaluated_model import Evaluated, ModelInfo

CXR14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
         "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def evaluated(names, n=300, seed=0, name="SSL init"):
    rng = np.random.default_rng(seed)
    k = len(names)
    y = rng.integers(0, k, n)
    prob = rng.random((n, k))
    prob[np.arange(n), y] += rng.random(n)
    return Evaluated(name, "runs/a/best_finetuned_model.pth", "classifier", [f"{i}.png" for i in range(n)], y,
                     prob / prob.sum(1, keepdims=True), rng.normal(size=(n, 4)), list(names),
                     ModelInfo("test", "checkpoint", "classifier"))


def label_boxes(fig) -> list:
    """(text, window extent) of every tick label, axis label, title and colour-bar label with text in `fig`."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        texts += ax.get_xticklabels() + ax.get_yticklabels() + [ax.xaxis.label, ax.yaxis.label, ax.title]
    texts.append(fig._suptitle)
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t is not None and t.get_text().strip()]


def overlapping(boxes) -> list:
    return [(a, b) for (a, ea), (b, eb) in itertools.combinations(boxes, 2)
            if min(ea.x1, eb.x1) - max(ea.x0, eb.x0) > 0.5 and min(ea.y1, eb.y1) - max(ea.y0, eb.y0) > 0.5]


@pytest.mark.parametrize("names", [["normal", "pneumonia", "nodule"], CXR14[:3], ["Pleural_Thickening"] + CXR14[:2],
                                   CXR14[:7], CXR14, [f"{n}_with_a_longer_name" for n in CXR14]],
                         ids=["3 short", "3 medium", "3 long", "7", "14", "14 very long"])
def test_confusion_matrix_labels_never_overlap(names):
    fig = plots.confusion_figure(evaluated(names))
    boxes = label_boxes(fig)
    assert sum(1 for text, _ in boxes if "(n=" in text) == 2 * len(names)       # every class named on both panels
    assert overlapping(boxes) == []
    for ax in fig.axes[:2]:                       # the two heat maps: no name drawn over a cell
        area = ax.get_window_extent()
        ticks = [(t.get_text(), t.get_window_extent()) for t in ax.get_xticklabels() + ax.get_yticklabels()]
        assert overlapping(ticks + [("heat map", area)]) == []
    plots.pyplot().close(fig)


def test_counts_and_recall_panels_hold_the_confusion_matrix():
    ev = evaluated(["a", "b", "c"])
    fig = plots.confusion_figure(ev)
    counts = np.array([float(t.get_text()) for t in fig.axes[0].texts]).reshape(3, 3)
    expected = np.array([[np.sum((ev.y_true == i) & (ev.prob.argmax(1) == j)) for j in range(3)] for i in range(3)])
    assert np.array_equal(counts, expected)
    recall = np.array([float(t.get_text()) for t in fig.axes[1].texts]).reshape(3, 3)
    assert np.allclose(recall, expected / expected.sum(1, keepdims=True), atol=0.005)
    plots.pyplot().close(fig)


def test_a_class_with_no_test_image_has_no_recall_rather_than_zero():
    ev = evaluated(["a", "b", "c"])
    ev.y_true[ev.y_true == 2] = 0
    fig = plots.confusion_figure(ev)
    assert [t.get_text() for t in fig.axes[1].texts][6:] == ["–"] * 3
    plots.pyplot().close(fig)


def test_embedding_and_training_figures_use_the_model_name_not_the_file(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(plots.utils, "atomic_savefig",
                        lambda fig, path, **k: titles.append(" ".join(
                            [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""])))
    ev = evaluated(CXR14[:3], name="from scratch")
    plots.plot_embedding(ev.features[:, :2], ev, "t-SNE", str(tmp_path / "tsne.png"))
    plots.plot_confusion(ev, str(tmp_path / "cm.png"))
    assert all("from scratch" in t and "best_finetuned_model" not in t for t in titles)
