"""What an evaluation reports of models with several findings per image: per-finding bootstrap metrics at
the thresholds chosen on val and their means, predictions.csv, the ROC grid and embedding panels by finding,
metrics.json and the report's finding table; for two or more models the paired ROC-AUC differences,
comparison.csv/.md and report.md. The methods of tasks.MultiLabel that reports.py calls.

Targets y (N, K) hold 1, 0 or -1 (an uncertain cell: left out of the test metrics for every model, whatever
--uncertain it was trained with); probabilities are sigmoids. A -1 cell gets weight 0 for its finding.
"""
import csv
import io
import os

import numpy as np

import training_history
import utils
from classification_metrics import (FINDING_METRICS, _chunk, bootstrap_p_value, bootstrap_weights,
                                    compute_multilabel_metrics, finding_metrics, fmt, holm_adjusted,
                                    interval_kind, percentile_interval, plain, resampling_unit, scorable_findings,
                                    score_notes, with_ci)
from evaluated_model import Evaluated
from plots import plot_multilabel_embedding, plot_roc_grid
from utils import UserError
from verdicts import (bootstrap_document, multilabel_verdict_lines, paired_auc_lines, provenance_lines,
                      small_split_warnings)


class MultiLabelReports:
    """Report methods of the multi-label task."""

    def check_comparable(self, evaluated: list) -> None:
        """Multi-label models are compared only with each other, on the same findings."""
        if any(ev.info.task != self.name for ev in evaluated) or \
                any(ev.class_names != evaluated[0].class_names for ev in evaluated):
            raise UserError("--checkpoint: multi-label checkpoints are compared only with multi-label checkpoints of "
                            "the same findings; evaluate the others separately")

    def compute_metrics(self, ev: Evaluated, resamples: int, seed: int) -> dict:
        return compute_multilabel_metrics(ev.y_true, ev.prob, ev.info.thresholds, resamples, seed, ev.patient_ids)

    def small_split_warnings(self, ev: Evaluated, metrics: dict) -> list:
        """The split's size, and findings with few positive or few negative images."""
        thin = [(f"{name} {kind}", metrics[kind][k]) for k, name in enumerate(ev.class_names)
                for kind in ("positives", "negatives")]
        return small_split_warnings(ev, metrics, thin, "positive or negative images of a finding")

    def write_model_files(self, ev: Evaluated, metrics: dict, folder: str) -> None:
        """Nothing beyond predictions.csv, metrics.json and report.md."""

    def write_figures(self, ev: Evaluated, metrics: dict, folder: str, projections: dict) -> dict:
        """roc_grid.png, the t-SNE/UMAP panels by finding and the training curves: {file name: caption}."""
        plot_roc_grid([ev], [metrics], os.path.join(folder, "roc_grid.png"), f"ROC per finding: {ev.name}")
        figures = {"roc_grid.png": "ROC curve per finding"}
        for method, file in (("t-SNE", "tsne.png"), ("UMAP", "umap.png")):
            if isinstance(projections[method], str):
                ev.notes.append(f"no {file}: {projections[method]}")
                continue
            plot_multilabel_embedding(projections[method], ev, method, os.path.join(folder, file))
            figures[file] = f"{method} of the encoder's embeddings, by the most frequent findings"
        if ev.history_csv:
            training_history.plot_history(ev.history_csv, os.path.join(folder, "training_curves.png"),
                                          f"Training curves: {ev.name}")
            if os.path.isfile(os.path.join(folder, "training_curves.png")):
                figures["training_curves.png"] = "Training curves (from the history file beside the checkpoint)"
        return figures

    def report_head(self, ev: Evaluated, metrics: dict, args) -> list:
        """The split's cautions, then where the numbers came from, with the findings, the uncertain cells left
        out and the thresholds."""
        cautions = [line for w in ev.info.small_split for line in (f"> **Caution:** {w}", "")]
        return cautions + provenance_lines(
            ev, metrics, args, f", {len(ev.class_names)} findings; {int(metrics['ignored'].sum())} uncertain cells "
                               f"left out of the metrics (trained with --uncertain {ev.info.uncertain})",
            [f"- thresholds: chosen per finding on val ({ev.info.threshold_rule}), recorded in the checkpoint"])

    report_files = "Files: [metrics.json](metrics.json), [predictions.csv](predictions.csv)"

    def paired(self, a: Evaluated, b: Evaluated, resamples: int, seed: int):
        """Per-finding and mean ROC-AUC of A minus B on the images both scored, paired bootstrap (the same
        resampled patients, or images, for both) on the same certain cells; the findings' p-values
        Holm-adjusted (the mean AUC is the primary metric); None without common images."""
        rows_b = {f: i for i, f in enumerate(b.filenames)}
        common = [(i, rows_b[f]) for i, f in enumerate(a.filenames) if f in rows_b]
        if not common:
            return None
        ia, ib = np.array(common).T
        y, pa, pb = a.y_true[ia], a.prob[ia], b.prob[ib]
        groups = None if a.patient_ids is None else a.patient_ids[ia]
        scorable = scorable_findings(y)

        def difference(w):
            auc_a = finding_metrics(w, y, pa, np.full(y.shape[1], 0.5))["roc_auc"]
            auc_b = finding_metrics(w, y, pb, np.full(y.shape[1], 0.5))["roc_auc"]
            diff = auc_a - auc_b                                                      # (B, K)
            mean = diff[:, scorable].mean(1, keepdims=True) if scorable.any() else np.full((len(w), 1), np.nan)
            return np.concatenate([diff, mean], 1)                                    # (B, K + 1)

        point = difference(np.ones((1, len(y))))[0]
        chunk = _chunk(len(y), 8 * y.shape[1])
        draws = [difference(w) for w in bootstrap_weights(len(y), resamples, seed, chunk, groups)]
        samples = np.concatenate(draws) if draws else np.zeros((0, len(point)))
        low, high, valid = percentile_interval(samples)
        p = np.array([bootstrap_p_value(samples[:, j]) for j in range(len(point))])
        return {"model_a": a.name, "model_b": b.name, "num_images": len(y), "findings": list(a.class_names),
                "difference": point, "low": low, "high": high, "valid": valid, "resamples": resamples,
                "p": p, "p_holm": holm_adjusted(p[:-1]), "resampling": resampling_unit(groups, len(y)),
                "init_a": a.info.init, "init_b": b.info.init, "split": a.info.split}

    def write_predictions(self, ev: Evaluated, path: str) -> None:
        """One row per image: for each finding the label (1, 0, empty if ignored), probability, thresholded call."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["filename"] + [f"{kind}_{n}" for n in ev.class_names for kind in ("true", "prob", "pred")])
        thresholds = np.asarray(ev.info.thresholds)
        for f, y, p in zip(ev.filenames, ev.y_true, ev.prob):
            cells = [[("" if t < 0 else int(t)), f"{q:.9f}", int(q >= c)] for t, q, c in zip(y, p, thresholds)]
            w.writerow([f] + [c for triple in cells for c in triple])
        utils.atomic_write_text(path, out.getvalue())

    def metrics_table(self, ev: Evaluated, metrics: dict) -> list:
        lines = [f"- mean ROC-AUC over the findings with positives and negatives: **{with_ci(metrics['mean_auc'])}**",
                 f"- mean average precision: {with_ci(metrics['mean_ap'])}", "",
                 "| finding | positives | negatives | threshold | " + " | ".join(FINDING_METRICS.values()) + " |",
                 "|---|---:|---:|---:|" + "---|" * len(FINDING_METRICS)]
        for k, name in enumerate(ev.class_names):
            cells = " | ".join(with_ci(metrics[key], k) for key in FINDING_METRICS)
            lines.append(f"| {name} | {int(metrics['positives'][k])} | {int(metrics['negatives'][k])} | "
                         f"{ev.info.thresholds[k]:.3f} | {cells} |")
        return lines

    def metric_notes(self, ev: Evaluated, metrics: dict, resamples: int) -> list:
        notes = []
        for k, name in enumerate(ev.class_names):
            if metrics["positives"][k] == 0 or metrics["negatives"][k] == 0:
                notes.append(f"finding {name!r} has no {'positive' if metrics['positives'][k] == 0 else 'negative'} "
                             f"image in the {ev.info.split} split: its AUC, AP and one of sensitivity/specificity are "
                             f"undefined (n/a) and the mean AUC leaves it out")
            if metrics["ignored"][k]:
                notes.append(f"finding {name!r}: {int(metrics['ignored'][k])} uncertain cell(s) left out of its "
                             f"metrics (certain cells only, for every model; trained with --uncertain "
                             f"{ev.info.uncertain})")
        used = int(metrics["mean_auc"]["valid"])
        if resamples and used < resamples:
            notes.append(f"the mean-AUC interval uses {used} of {resamples} resamples; the others lost a finding's "
                         f"positives or negatives")
        for key, label in (("roc_auc", "ROC-AUC"), ("average_precision", "average precision")):
            notes += score_notes(metrics[key], label, ev.class_names, metrics["resampling"]["unit"])
        return notes

    def metrics_document(self, ev: Evaluated, metrics: dict, args) -> dict:
        def entry(m, k=None):
            pick = (lambda a: a) if k is None else (lambda a: np.asarray(a)[k])
            return {"value": plain(pick(m["value"])), "ci95": [plain(pick(m["low"])), plain(pick(m["high"]))],
                    "resamples_used": int(pick(m["valid"])), "interval": interval_kind(m, k)}

        per_finding = {name: {key: entry(metrics[key], k) for key in FINDING_METRICS} |
                       {"positives": int(metrics["positives"][k]), "negatives": int(metrics["negatives"][k]),
                        "ignored": int(metrics["ignored"][k]), "threshold": float(ev.info.thresholds[k])}
                       for k, name in enumerate(ev.class_names)}
        return {"model": ev.name, "checkpoint": os.path.abspath(ev.checkpoint), "kind": ev.kind, **ev.info.as_dict(),
                "num_images": len(ev.y_true), "findings": ev.class_names, "label_file": os.path.abspath(args.label_file),
                "bootstrap": bootstrap_document(metrics["resampling"], args),
                "metrics": {"mean_auc": entry(metrics["mean_auc"]), "mean_ap": entry(metrics["mean_ap"])},
                "per_finding": per_finding, "notes": ev.notes}

    def write_comparison(self, evaluated, results, folders, paired, args, pointing=()) -> None:
        """comparison.csv (a row per model and finding), comparison.md and report.md with the paired AUC
        differences of the first two models, and roc_grid_comparison.png."""
        names = evaluated[0].class_names
        rows = []
        for ev, m, folder in zip(evaluated, results, folders):
            for k, finding in enumerate(names + ["mean"]):
                src = {key: (m[key], k) for key in FINDING_METRICS} if finding != "mean" else \
                    {"roc_auc": (m["mean_auc"], None), "average_precision": (m["mean_ap"], None)}
                row = {"model": ev.name, "folder": os.path.basename(folder), "finding": finding,
                       "init": ev.info.init or "", "label_fraction": ev.info.label_fraction,
                       "num_images": len(ev.y_true), "bootstrap_unit": m["resampling"]["unit"],
                       "bootstrap_units": m["resampling"]["units"]}
                for key, (entry, idx) in src.items():
                    pick = (lambda a: a) if idx is None else (lambda a, i=idx: np.asarray(a)[i])
                    row |= {key: plain(pick(entry["value"])), f"{key}_ci_low": plain(pick(entry["low"])),
                            f"{key}_ci_high": plain(pick(entry["high"]))}
                rows.append(row)
        import pandas as pd
        utils.atomic_write_text(os.path.join(args.output_dir, "comparison.csv"), pd.DataFrame(rows).to_csv(index=False))
        plot_roc_grid(evaluated, results, os.path.join(args.output_dir, "roc_grid_comparison.png"),
                      f"ROC per finding, {args.split} split")
        header = ["finding", "positives"] + [f"{ev.name} AUC" for ev in evaluated]
        lines = [f"# Comparison on the {args.split} split ({len(names)} findings)", ""]
        lines += multilabel_verdict_lines(paired) + [""]
        cautions = dict.fromkeys(w for ev in evaluated for w in ev.info.small_split)
        lines += [line for w in cautions for line in (f"> **Caution:** {w}", "")]
        lines += [f"ROC-AUC per finding with 95% bootstrap intervals ({args.bootstrap} resamples of the "
                 f"{results[0]['resampling']['unit']}s, seed "
                 f"{args.seed}); the mean is over the findings with positives and negatives in the split.", "",
                 "| " + " | ".join(header) + " |", "|---|---:|" + "---|" * len(evaluated)]
        for k, finding in enumerate(names):
            cells = [with_ci(m["roc_auc"], k) for m in results]
            lines.append(f"| {finding} | {int(results[0]['positives'][k])} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | | " + " | ".join(f"**{with_ci(m['mean_auc'])}**" for m in results) + " |")
        lines += ["", "## Paired ROC-AUC difference", ""] + paired_auc_lines(paired)
        utils.atomic_write_text(os.path.join(args.output_dir, "comparison.md"), "\n".join(lines) + "\n")
        report = lines + ["", "## ROC curves per finding", "", "![ROC per finding](roc_grid_comparison.png)", "",
                          "## Per-model reports", ""] + [f"- [{ev.name}]({os.path.basename(f)}/report.md)"
                                                         for ev, f in zip(evaluated, folders)]
        report[0] = f"# Evaluation report: {len(evaluated)} multi-label models on the {args.split} split"
        utils.atomic_write_text(os.path.join(args.output_dir, "report.md"), "\n".join(report) + "\n")

    def print_summary(self, evaluated: list, results: list, report: str) -> None:
        width = max(len(ev.name) for ev in evaluated) + 2
        print(f"{'model':<{width}}{'split':<7}{'images':>7}  {'mean AUC':>10}{'mean AP':>10}")
        for ev, m in zip(evaluated, results):
            print(f"{ev.name:<{width}}{ev.info.split:<7}{len(ev.y_true):>7}  {fmt(m['mean_auc']['value']):>10}"
                  f"{fmt(m['mean_ap']['value']):>10}")
        print(f"report: {report}")

    def print_verdict(self, evaluated: list, results: list, paired, pointing) -> None:
        """The verdict on the mean AUC; the per-finding differences are in the report."""
        if paired is not None:
            for line in multilabel_verdict_lines(paired):
                if line:
                    print(line.replace("**", ""))
