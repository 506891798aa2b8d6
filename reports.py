"""Writing an evaluation: the same steps for every task, the task's own metrics, files and figures supplied
by its object (tasks.SingleLabel, tasks.MultiLabel). Per model: predictions.csv, metrics.json, figures and
report.md (in its own folder when several are compared); for several models comparison.csv/.md, report.md
and the paired difference of the first two; for single-label classifiers Grad-CAM and the pointing game.

    result = reports.report(evaluated, tasks.of_models(evaluated), args, device, settings)
"""
import os
import re

import torch

import calibration
import label_tables
import utils
from evaluated_model import Evaluated
from gradcam import plot_pointing_game, pointing_game, pointing_sentences, write_gradcam_figure
from plots import ProjectionSkipped, project_embedding


def report(evaluated: list, task, args, device, settings: dict) -> dict:
    """Metrics with bootstrap intervals, the pointing game, every file and figure, and the printed summary."""
    task.check_comparable(evaluated)
    print(f"bootstrap: {args.bootstrap} resamples per model ...")
    results = [task.compute_metrics(ev, args.bootstrap, args.seed) for ev in evaluated]
    findings = label_tables.read_findings(args.data_dir) if task.explains else None
    pointing = pointing_game(evaluated, findings, args, device) if task.explains and args.gradcam else []

    single = len(evaluated) == 1
    folders = [args.output_dir] if single else [os.path.join(args.output_dir, f) for f in folder_names(evaluated)]
    projections = embedding_projections(evaluated, args.seed)
    for ev, metrics, folder in zip(evaluated, results, folders):
        write_model_outputs(ev, metrics, folder, args, projections[ev.checkpoint], task, device, findings,
                            pointing if single else ())
    paired = None
    if not single:
        paired = task.paired(evaluated[0], evaluated[1], args.bootstrap, args.seed)
        task.write_comparison(evaluated, results, folders, paired, args, pointing)
    if pointing:
        utils.atomic_write_json(os.path.join(args.output_dir, "pointing_game.json"), pointing)
    utils.write_settings(os.path.join(args.output_dir, "evaluation_settings.json"), settings)
    task.print_summary(evaluated, results, os.path.join(args.output_dir, "report.md"))
    task.print_verdict(evaluated, results, paired, pointing)
    return {"models": [ev.name for ev in evaluated], "folders": folders, "metrics": results, "paired": paired,
            "pointing": pointing}


def write_model_outputs(ev: Evaluated, metrics: dict, folder: str, args, projections: dict, task, device=None,
                        findings=None, pointing=()) -> None:
    """One model's predictions.csv, the task's own files and figures, metrics.json and report.md."""
    ev.notes.extend(task.metric_notes(ev, metrics, args.bootstrap))
    ev.info.small_split = task.small_split_warnings(ev, metrics)
    for w in ev.info.small_split:
        print(f"warning: {ev.name}: {w}")
    task.write_predictions(ev, os.path.join(folder, "predictions.csv"))
    task.write_model_files(ev, metrics, folder)
    figures = task.write_figures(ev, metrics, folder, projections)
    if task.explains:
        figures |= write_explanations(ev, folder, args, device, findings, pointing)
    document, calibrated = task.metrics_document(ev, metrics, args), calibration.ece_before_after(ev, task)
    if calibrated is not None:
        document["calibration"] = calibrated
    utils.atomic_write_json(os.path.join(folder, "metrics.json"), document)
    write_model_report(ev, metrics, figures, args, os.path.join(folder, "report.md"), task, pointing, calibrated)


def write_model_report(ev: Evaluated, metrics: dict, figures: dict, args, path: str, task, pointing=(),
                       calibrated=None) -> None:
    lines = [f"# Evaluation: {ev.name}", ""] + task.report_head(ev, metrics, args)
    if calibrated is not None:
        lines.append(calibration.report_line(calibrated))
    lines += ["", "## Metrics", ""] + task.metrics_table(ev, metrics)
    if ev.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in ev.notes]
    if pointing:
        lines += ["", "## Grad-CAM pointing game", ""] + pointing_sentences(pointing)
    lines += ["", "## Figures", ""]
    for file, caption in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    lines += [task.report_files]
    utils.atomic_write_text(path, "\n".join(lines) + "\n")


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
            print(f"{method} of {len(ev.features)} embeddings ({ev.name}) ...")
            try:
                by_checkpoint[ev.checkpoint][method] = project_embedding(ev.features, method, seed)
            except ProjectionSkipped as e:
                by_checkpoint[ev.checkpoint][method] = str(e)
    return by_checkpoint
