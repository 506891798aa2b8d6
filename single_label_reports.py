"""What an evaluation reports of models with one class per image: bootstrap metrics per class and their
macro averages, predictions.csv, classification_report.txt, the confusion matrix, ROC, precision-recall and
calibration figures, metrics.json and the report's metric table; for two or more models the paired
differences, comparison.csv/.md and report.md. The methods of tasks.SingleLabel that reports.py calls.
"""
import csv
import io
import os
import warnings

import numpy as np

import training_history
import utils
from classification_metrics import (COMPARISON_METRICS, PER_CLASS_METRICS, SCALAR_METRICS, compute_metrics, fmt,
                                    interval_kind, score_notes,
                                    paired_accuracy_difference, paired_metric_differences, plain, with_ci)
from evaluated_model import Evaluated
from gradcam import plot_pointing_game, pointing_sentences, signed_with_ci
from plots import plot_confusion, plot_embedding, plot_pr, plot_reliability, plot_roc, plot_roc_comparison
from verdicts import (bootstrap_document, headline_sentence, interval_text, paired_sentences, provenance_lines,
                      small_split_warnings, units_text, verdict_lines)


KNN_UNDEFINED = ("ece", "brier")     # need probabilities; a kNN's class shares are neighbour votes


class SingleLabelReports:
    """Report methods of the single-label task."""

    def check_comparable(self, evaluated: list) -> None:
        """Any single-label models can be compared on the images they share."""

    def compute_metrics(self, ev: Evaluated, resamples: int, seed: int) -> dict:
        out = compute_metrics(ev.y_true, ev.prob, len(ev.class_names), resamples, seed, ev.patient_ids)
        if ev.kind == "kNN":            # vote shares of the k neighbours: no probabilities to calibrate or score
            for key in KNN_UNDEFINED:
                out[key] = out[key] | {"value": np.nan, "low": np.nan, "high": np.nan}
        return out

    def small_split_warnings(self, ev: Evaluated, metrics: dict) -> list:
        return small_split_warnings(ev, metrics)

    def metrics_document(self, ev: Evaluated, metrics: dict, args) -> dict:
        scalars = {key: {"value": plain(metrics[key]["value"]), "ci95": [plain(metrics[key]["low"]),
                                                                         plain(metrics[key]["high"])],
                         "resamples_used": int(metrics[key]["valid"]), "interval": interval_kind(metrics[key])}
                   for key in SCALAR_METRICS}
        per_class = {key: {name: {"value": plain(metrics[key]["value"][c]),
                                  "ci95": [plain(metrics[key]["low"][c]), plain(metrics[key]["high"][c])],
                                  "interval": interval_kind(metrics[key], c)}
                           for c, name in enumerate(ev.class_names)} for key in PER_CLASS_METRICS}
        per_class["support"] = {name: int(n) for name, n in zip(ev.class_names, metrics["support"])}
        return {"model": ev.name, "checkpoint": os.path.abspath(ev.checkpoint), "kind": ev.kind, **ev.info.as_dict(),
                "num_images": len(ev.y_true), "class_names": ev.class_names, "label_file": os.path.abspath(args.label_file),
                "bootstrap": bootstrap_document(metrics["resampling"], args),
                "metrics": scalars, "per_class": per_class, "notes": ev.notes}

    def metric_notes(self, ev: Evaluated, metrics: dict, resamples: int) -> list:
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
        if ev.kind == "kNN":
            notes.append("no ECE or Brier score: a kNN's class shares are votes of its neighbours, not probabilities")
        for key, label in (("roc_auc_per_class", "ROC-AUC"), ("pr_auc_per_class", "PR-AUC")):
            notes += score_notes(metrics[key], label, ev.class_names, metrics["resampling"]["unit"])
        return notes

    def write_predictions(self, ev: Evaluated, path: str) -> None:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["filename", "true", "predicted"] + [f"prob_{c}" for c in ev.class_names])
        for f, t, p in zip(ev.filenames, ev.y_true, ev.prob):
            w.writerow([f, ev.class_names[t], ev.class_names[int(p.argmax())]] + [f"{v:.9f}" for v in p])
        utils.atomic_write_text(path, out.getvalue())

    def write_model_files(self, ev: Evaluated, metrics: dict, folder: str) -> None:
        """classification_report.txt: scikit-learn's report and every metric with its interval."""
        from sklearn.metrics import classification_report

        path, k = os.path.join(folder, "classification_report.txt"), len(ev.class_names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = classification_report(ev.y_true, ev.prob.argmax(1), labels=list(range(k)),
                                         target_names=ev.class_names, digits=3, zero_division=0)
        lines = [f"{ev.name}: {ev.info.split} split, {units_text(metrics['resampling'])}", "", text, "",
                 interval_text(metrics["resampling"], metrics["accuracy"]["resamples"]) + ":", ""]
        lines += [f"  {label:<48} {with_ci(metrics[key])}" for key, label in self.headline_metrics(ev.class_names).items()]
        for c, name in enumerate(ev.class_names):
            lines += ["", f"  class {name} (n={int(metrics['support'][c])})"]
            lines += [f"    {label:<46} {with_ci(metrics[key], c)}" for key, label in PER_CLASS_METRICS.items()]
        utils.atomic_write_text(path, "\n".join(lines) + "\n")

    def write_figures(self, ev: Evaluated, metrics: dict, folder: str, projections: dict) -> dict:
        """Every figure of one model; returns {file name: caption}, with a reason in place of a skipped one."""
        figures = {"confusion_matrix.png": "Confusion matrix (counts and row-normalised)",
                   "roc_curves.png": "ROC curves", "pr_curves.png": "Precision-recall curves"}
        plot_confusion(ev, os.path.join(folder, "confusion_matrix.png"))
        plot_roc(ev, metrics, os.path.join(folder, "roc_curves.png"))
        plot_pr(ev, metrics, os.path.join(folder, "pr_curves.png"))
        if ev.kind == "kNN":
            ev.notes.append("no reliability.png: a kNN's vote shares are not probabilities")
        else:
            plot_reliability(ev, metrics, os.path.join(folder, "reliability.png"))
            figures["reliability.png"] = "Reliability diagram and confidence histogram"
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
                                          f"Training curves: {ev.name}",
                                          best_epoch=ev.info.epoch, chance=1 / len(ev.class_names))
            if os.path.isfile(os.path.join(folder, "training_curves.png")):
                figures["training_curves.png"] = "Training curves (from the history file beside the checkpoint)"
        return figures

    @staticmethod
    def headline_metrics(class_names: list) -> dict:
        """The rows a reader needs: AUCs of the positive class when binary, their macro averages otherwise."""
        rows = {key: SCALAR_METRICS[key] for key in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted")}
        if len(class_names) == 2:
            rows["roc_auc"] = f"ROC-AUC (positive class: {class_names[1]})"
            rows["pr_auc"] = f"PR-AUC (average precision, positive class: {class_names[1]})"
        else:
            rows["roc_auc_macro"] = SCALAR_METRICS["roc_auc_macro"]
            rows["pr_auc_macro"] = "PR-AUC (macro average precision)"
        return rows | {"brier": f"{SCALAR_METRICS['brier']} (lower is better)",
                       "ece": f"{SCALAR_METRICS['ece']}, no interval (docs/design.md)"}

    def metrics_table(self, ev: Evaluated, metrics: dict) -> list:
        lines = ["| metric | value [95% CI] |", "|---|---|"]
        lines += [f"| {label} | {with_ci(metrics[key])} |" for key, label in self.headline_metrics(ev.class_names).items()]
        header = " | ".join(PER_CLASS_METRICS.values())
        lines += ["", f"| class | images | {header} |", "|---|---:|" + "---|" * len(PER_CLASS_METRICS)]
        for c, name in enumerate(ev.class_names):
            cells = " | ".join(with_ci(metrics[key], c) for key in PER_CLASS_METRICS)
            lines.append(f"| {name} | {int(metrics['support'][c])} | {cells} |")
        return lines

    def paired(self, a: Evaluated, b: Evaluated, resamples: int, seed: int):
        """The paired accuracy difference of two models on the images both scored, or None with no overlap."""
        rows_b = {f: i for i, f in enumerate(b.filenames)}
        common = [(i, rows_b[f]) for i, f in enumerate(a.filenames) if f in rows_b]
        if not common:
            return None
        ia, ib = np.array(common).T
        groups = None if a.patient_ids is None else a.patient_ids[ia]
        result = paired_accuracy_difference(a.y_true[ia], a.prob[ia], b.prob[ib], resamples, seed, groups)
        skip = KNN_UNDEFINED if "kNN" in (a.kind, b.kind) else ()
        result["metrics"] = paired_metric_differences(a.y_true[ia], a.prob[ia], b.prob[ib], len(a.class_names),
                                                      resamples, seed, groups, skip)
        return result | {"model_a": a.name, "model_b": b.name, "init_a": a.info.init,
                         "init_b": b.info.init, "split": a.info.split}

    def comparison_rows(self, evaluated: list, results: list, folders: list) -> list:
        rows = []
        for ev, m, folder in zip(evaluated, results, folders):
            row = {"model": ev.name, "checkpoint": os.path.abspath(ev.checkpoint), "kind": ev.kind,
                   "init": ev.info.init or "", "label_fraction": ev.info.label_fraction,
                   "split": ev.info.split, "num_images": len(ev.y_true), "bootstrap_unit": m["resampling"]["unit"],
                   "bootstrap_units": m["resampling"]["units"], "folder": os.path.basename(folder)}
            for key in COMPARISON_METRICS:
                row |= {key: plain(m[key]["value"]), f"{key}_ci_low": plain(m[key]["low"]),
                        f"{key}_ci_high": plain(m[key]["high"])}
            rows.append(row)
        return rows

    def write_comparison(self, evaluated, results, folders, paired, args, pointing=()) -> None:
        out = args.output_dir
        rows = self.comparison_rows(evaluated, results, folders)
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
        lines += [f"Values with 95% bootstrap intervals ({args.bootstrap} resamples of the "
                  f"{results[0]['resampling']['unit']}s, seed {args.seed}). "
                  f"ROC-AUC: the macro one-vs-rest average (with two classes, the positive class's AUC); "
                  f"Brier score and ECE (expected calibration error): lower is better; the ECE has no interval "
                  f"(its resampled values are biased upward).", ""] + table
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

    def report_head(self, ev: Evaluated, metrics: dict, args) -> list:
        """The report's lines above its metric table: the summary, cautions, and where the numbers came from."""
        lines = [headline_sentence(ev, metrics), ""]
        for w in ev.info.small_split:
            lines += [f"> **Caution:** {w}", ""]
        return lines + provenance_lines(ev, metrics, args)

    report_files = ("Files: [metrics.json](metrics.json), [classification_report.txt](classification_report.txt), "
                    "[predictions.csv](predictions.csv)")

    def print_summary(self, evaluated: list, results: list, report: str) -> None:
        width = max(len(ev.name) for ev in evaluated) + 2
        labels = ("accuracy", "bal. acc", "macro F1", "ROC-AUC", "Brier", "ECE")
        keys = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "brier", "ece")
        print(f"{'model':<{width}}{'split':<7}{'images':>7}  " + "".join(f"{label:>10}" for label in labels))
        for ev, m in zip(evaluated, results):
            print(f"{ev.name:<{width}}{ev.info.split:<7}{len(ev.y_true):>7}  "
                  + "".join(f"{fmt(m[k]['value']):>10}" for k in keys))
        print(f"report: {report}")

    def print_verdict(self, evaluated: list, results: list, paired, pointing) -> None:
        lines = verdict_lines(paired) if paired is not None else [headline_sentence(evaluated[0], results[0])]
        for line in lines:
            if line:
                print(line.replace("**", ""))
        for r in pointing:
            print(f"pointing game, {r['model']}: {with_ci(r)} ({r['hits']}/{r['images']}); permutation baseline "
                  f"{fmt(r['permutation_baseline'])}, hits minus baseline {signed_with_ci(r['above_baseline'])}; "
                  f"area share {r['chance']:.3f}")
