"""The files of an evaluation of one-label models: per model predictions.csv, classification_report.txt,
metrics.json, figures and report.md; for several models comparison.csv/.md and report.md.
"""
import csv
import io
import os
import re
import warnings

import numpy as np
import torch

import training_history
import utils
from checkpoints import default_name
from classification_metrics import (COMPARISON_METRICS, PER_CLASS_METRICS, SCALAR_METRICS, paired_accuracy_difference,
                                    paired_metric_differences, plain, with_ci)
from evaluated_model import Evaluated
from gradcam import plot_pointing_game, pointing_sentences, write_gradcam_figure
from plots import (ProjectionSkipped, plot_confusion, plot_embedding, plot_pr, plot_reliability, plot_roc,
                   plot_roc_comparison, project_embedding)
from verdicts import headline_sentence, paired_sentences, provenance_lines, small_split_warnings, verdict_lines


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
        training_history.plot_history(ev.history_csv, os.path.join(folder, "training_curves.png"),
                           f"Training curves: {ev.name} ({default_name(ev.checkpoint)})",
                           best_epoch=ev.info.epoch, chance=1 / len(ev.class_names))
        if os.path.isfile(os.path.join(folder, "training_curves.png")):
            figures["training_curves.png"] = "Training curves (from the history file beside the checkpoint)"
    return figures


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
