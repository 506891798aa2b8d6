"""Several findings per image (issue 24): ChestX-ray14- and CheXpert-style label files, the masked BCE
against a hand computation, iterative stratification, the multi-label synthetic cohort and MedMNIST
import, and the synthetic data end to end: pretraining, SSL and scratch fine-tuning, the comparison
report with per-finding AUCs and intervals, and the label-efficiency benchmark's multi-label mode."""
import json
import math
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

import data_loader as dl
import checkpoints
import data_splits
import evaluate
import fine_tune
import label_tables
import medmnist_npz
import plots
import synthetic
import tasks
import train_ssl
import utils
from model_ssl import masked_bce_with_logits
from utils import UserError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def write_images(folder, names, size=8):
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.full((size, size), 100, np.uint8)).save(path)


def write_csv(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


# ============ label files ============

def chestxray14_csv(tmp_path, rows):
    write_images(tmp_path, [r.split(",")[0] for r in rows])
    return write_csv(tmp_path / "Data_Entry.csv", ["Image Index,Finding Labels,Follow-up #,Patient ID"] + rows)


def test_chestxray14_style_file_loads_as_multilabel_grouped_by_patient(tmp_path):
    findings = ["Effusion|Cardiomegaly", "No Finding", "Nodule", "Effusion", "Cardiomegaly|Effusion|Nodule"]
    rows = [f"{i:05d}_{j}.png,{findings[(i + j) % 5]},{j},{i}" for i in range(30) for j in range(2)]
    csv = chestxray14_csv(tmp_path, rows)
    assert label_tables.label_file_format(csv) == "pipe"
    table = label_tables.load_label_table(csv, str(tmp_path), seed=0)
    assert table.task == "multilabel" and table.class_names == ["Cardiomegaly", "Effusion", "Nodule"]
    assert table.labels.dtype == np.float32 and table.labels.shape == (60, 3)
    assert table.labels[0].tolist() == [1, 1, 0] and table.labels[1].tolist() == [0, 0, 0]   # rows 0 and 1
    for split in ("val", "test"):                       # whole patients, every finding in every split
        assert not set(table.patient_ids[table.indices(split)]) & set(table.patient_ids[table.indices("train")])
        assert (table.labels[table.indices(split)] == 1).any(0).all()
    assert "ChestX-ray14 style" in label_tables.describe_table(table)
    again = label_tables.load_label_table(csv, str(tmp_path), seed=0)
    assert (again.splits == table.splits).all()


@pytest.mark.parametrize("cell, message", [("No Finding|Effusion", "'No Finding' together with a finding"),
                                           ("Effusion||Nodule", "empty finding")])
def test_a_bad_finding_list_names_its_row_and_column(tmp_path, cell, message):
    csv = chestxray14_csv(tmp_path, ["a.png,Effusion,0,1", f"b.png,{cell},0,2"])
    with pytest.raises(UserError, match=f"row 3, column 'Finding Labels'.*{message}"):
        label_tables.load_label_table(csv, str(tmp_path))


CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema,Pleural Effusion"


def chexpert_csv(tmp_path, n=40):
    """CheXpert's layout: 1.0 / 0.0 / -1.0 (uncertain) / blank (not mentioned); patients in the paths."""
    cells = ["1.0", "0.0", "-1.0", "", "1", "0"]
    rows, names = [], []
    for i in range(n):
        name = f"train/patient{i // 2:05d}/study1/view{i % 2 + 1}_frontal.png"
        names.append(name)
        findings = [cells[(i + 2 * k) % 6] for k in range(4)]
        findings[1 + i % 3] = "1.0"                                   # every finding has positives
        rows.append(",".join([name, "Female", "60", "Frontal", "AP"] + findings))
    write_images(tmp_path, names)
    return write_csv(tmp_path / "train.csv", [CHEXPERT_HEADER] + rows)


def test_chexpert_style_file_with_uncertain_cells_loads_under_each_policy(tmp_path):
    csv = chexpert_csv(tmp_path)
    assert label_tables.label_file_format(csv) == "columns"
    tables = {p: label_tables.load_label_table(csv, str(tmp_path), uncertain=p, seed=1) for p in label_tables.UNCERTAIN_POLICIES}
    ignore = tables["ignore"]
    assert ignore.class_names == ["No Finding", "Cardiomegaly", "Edema", "Pleural Effusion"]   # metadata skipped
    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)[ignore.class_names].to_numpy()
    uncertain, blank = np.isin(raw, ["-1.0", "-1"]), raw == ""
    assert uncertain.any() and blank.any()
    assert (ignore.labels[uncertain] == label_tables.IGNORED).all() and (ignore.labels[blank] == 0).all()
    assert (tables["zero"].labels[uncertain] == 0).all() and (tables["one"].labels[uncertain] == 1).all()
    assert (tables["zero"].labels[~uncertain] == ignore.labels[~uncertain]).all()
    assert all((t.splits == ignore.splits).all() for t in tables.values())      # the policy moves no image
    assert ignore.patient_ids[0] == ignore.patient_ids[1] == "patient00000"
    assert f"--uncertain ignore: {int(uncertain.sum())} cells ignored" in label_tables.describe_table(ignore)


def test_chexpert_bad_cell_and_forced_task_errors(tmp_path):
    csv = chexpert_csv(tmp_path, n=6)
    lines = open(csv).read().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",yes"
    bad = write_csv(tmp_path / "bad.csv", lines)
    with pytest.raises(UserError, match=r"row 5, column 'Pleural Effusion' holds 'yes'"):
        label_tables.load_label_table(bad, str(tmp_path))
    with pytest.raises(UserError, match="multi-label file.*--task is multiclass"):
        label_tables.load_label_table(csv, str(tmp_path), task="multiclass")
    # a `label` column of |-separated names is multi-label only when forced
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    forced = write_csv(tmp_path / "forced.csv", ["filename,label,split", "a.png,X|Y,train", "b.png,Y,val",
                                                "c.png,No Finding,test"])
    assert label_tables.load_label_table(forced, str(tmp_path)).task == "multiclass"
    assert label_tables.load_label_table(forced, str(tmp_path), task="multilabel").labels.tolist() == [[1, 1], [0, 1], [0, 0]]


# ============ loss and subsets ============

def test_masked_bce_ignores_uncertain_cells_as_a_hand_computation_does():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]], requires_grad=True)
    targets = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    pos_weight = torch.tensor([3.0, 0.5, 2.0])

    def cell(x, y, w=1.0):                           # -[w y log s(x) + (1 - y) log(1 - s(x))]
        s = 1 / (1 + math.exp(-x))
        return -(w * y * math.log(s) + (1 - y) * math.log(1 - s))

    counted = [(0, 0), (0, 2), (1, 0), (1, 1)]
    hand = sum(cell(logits[i, j].item(), targets[i, j].item()) for i, j in counted) / 4
    assert masked_bce_with_logits(logits, targets).item() == pytest.approx(hand, rel=1e-6)
    hand_w = sum(cell(logits[i, j].item(), targets[i, j].item(), pos_weight[j].item()) for i, j in counted) / 4
    assert masked_bce_with_logits(logits, targets, pos_weight).item() == pytest.approx(hand_w, rel=1e-6)
    masked_bce_with_logits(logits, targets).backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0 and (logits.grad[targets >= 0] != 0).all()
    assert masked_bce_with_logits(logits, torch.full((2, 3), -1.0)).item() == 0.0


@pytest.mark.parametrize("rule", ["youden", "f1"])
def test_val_threshold_is_the_best_cut_off_by_its_rule(rule):
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.2).astype(np.float32)
    prob = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1), 2)   # ties, as real probabilities have
    y[:20] = label_tables.IGNORED                                                   # ignored cells play no part

    def score(t, y, p):
        pred = p >= t
        tp, fp, fn, tn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum(), \
            (~pred & (y == 0)).sum()
        return tp / (tp + fn) + tn / (tn + fp) - 1 if rule == "youden" else 2 * tp / (2 * tp + fp + fn)

    chosen = tasks.choose_threshold(y, prob, rule)
    best = max(score(t, y[20:], prob[20:]) for t in np.unique(prob[20:]))
    assert score(chosen, y[20:], prob[20:]) == pytest.approx(best)
    assert tasks.choose_threshold(np.zeros(5), np.linspace(0, 1, 5), rule) == 0.5    # no positives


def test_iterative_stratification_keeps_every_finding_and_the_prevalences():
    rng = np.random.default_rng(0)
    prevalence = np.array([0.004, 0.01, 0.05, 0.2, 0.4])
    targets = (rng.random((3000, 5)) < prevalence).astype(np.float32)
    targets[rng.random((3000, 5)) < 0.05] = label_tables.IGNORED                 # uncertain cells are not positives
    pool = np.arange(0, 3000, 2)
    for fraction in (0.01, 0.1, 0.5):
        subset = data_splits.iterative_stratified_subset(targets, pool, fraction, seed=3)
        assert set(subset) <= set(pool) and len(subset) == len(np.unique(subset))
        assert abs(len(subset) - fraction * len(pool)) <= 5             # + at most one image per lost finding
        assert (targets[subset] == 1).any(0).all()                      # every finding kept
        if fraction >= 0.1:                                             # prevalences within 1.5 points
            np.testing.assert_allclose((targets[subset] == 1).mean(0), (targets[pool] == 1).mean(0), atol=0.015)
        assert (subset == data_splits.iterative_stratified_subset(targets, pool[::-1], fraction, seed=3)).all()
    assert (data_splits.iterative_stratified_subset(targets, pool, 1.0) == pool).all()
    with pytest.raises(UserError, match="outside"):
        data_splits.iterative_stratified_subset(targets, pool, 0.0)


# ============ synthetic cohort and MedMNIST import ============

def test_synthetic_findings_co_occur_at_unequal_prevalences():
    plan = synthetic.plan_multilabel_patients(6000, seed=0)
    has = np.array([[c in f for c in synthetic.SYNTHETIC_FINDINGS] for _, f, _ in plan])   # (patients, 4)
    consolidation, nodules, effusion, cardiomegaly = has.T
    assert 0.04 < nodules.mean() < 0.1 < consolidation.mean() < effusion.mean() < cardiomegaly.mean() < 0.3
    assert effusion[cardiomegaly].mean() > 2.5 * effusion[~cardiomegaly].mean()      # more often than chance
    assert consolidation[effusion].mean() > 2 * consolidation[~effusion].mean()
    assert 0.45 < (~has.any(1)).mean() < 0.65                                          # No Finding
    assert [n for _, _, n in plan] == [n for _, _, n in synthetic.plan_patients(6000, 1, 0)]   # same patient structure


def test_multilabel_medmnist_npz_imports_with_given_or_numbered_names(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 3)) < 0.5).astype(np.uint8)
        arrays[f"{split}_labels"][0] = 1
    np.savez(tmp_path / "chest.npz", **arrays)
    medmnist_npz.import_npz(str(tmp_path / "chest.npz"), str(tmp_path / "out"), ["atelectasis", "effusion", "hernia"])
    table = label_tables.load_label_table(str(tmp_path / "out" / "labels.csv"), str(tmp_path / "out"))
    assert table.task == "multilabel" and table.class_names == ["atelectasis", "effusion", "hernia"]
    np.testing.assert_array_equal(table.labels[table.indices("val")], arrays["val_labels"])
    medmnist_npz.import_npz(str(tmp_path / "chest.npz"), str(tmp_path / "numbered"))
    assert open(tmp_path / "numbered" / "labels.csv").readline().strip() == \
        "filename,split,finding_0,finding_1,finding_2"
    with pytest.raises(UserError, match="2 name.*3 label columns"):
        medmnist_npz.import_npz(str(tmp_path / "chest.npz"), str(tmp_path / "bad"), ["a", "b"])


# ============ end to end on the synthetic multi-label cohort ============

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """data_loader --multi_label -> 1 pretraining epoch -> SSL and scratch fine-tuning -> comparison."""
    root = tmp_path_factory.mktemp("multilabel")
    data, ckpts, report = str(root / "data"), str(root / "ckpt"), str(root / "eval")
    utils.run_cli(dl.main, dl.get_args_parser(), ["--multi_label", "--num_images", "90", "--image_size", "32",
                                                  "--output_dir", data])
    common = ["--data_dir", data, "--label_file", os.path.join(data, "labels.csv"), "--output_dir", ckpts,
              "--device", "cpu", "--num_epochs", "1", "--batch_size", "16"]
    utils.run_cli(train_ssl.main, train_ssl.get_args_parser(), common + ["--image_size", "32"])
    ssl = os.path.join(ckpts, "best_ssl_model.pth")
    utils.run_cli(fine_tune.main, fine_tune.get_args_parser(), common + ["--ssl_checkpoint", ssl, "--pos_weight",
                                                                         "balanced", "--label_fraction", "0.5"])
    utils.run_cli(fine_tune.main, fine_tune.get_args_parser(),
                  common + ["--image_size", "32", "--label_fraction", "0.5"])
    project = plots.project_embedding
    with pytest.MonkeyPatch.context() as mp:     # UMAP's numba compilation alone takes 15-50 s; the figure is tested
        mp.setattr(plots, "project_embedding", lambda x, method, seed: project(x, "t-SNE", seed))
        result = utils.run_cli(evaluate.main, evaluate.get_args_parser(), [
            "--checkpoint", os.path.join(ckpts, "best_finetuned_model.pth"), "--checkpoint",
            os.path.join(ckpts, "best_baseline_model.pth"), "--names", "SSL", "scratch", "--data_dir", data,
            "--output_dir", report, "--device", "cpu", "--bootstrap", "200"])
    return {"data": data, "ckpts": ckpts, "report": report, "ssl": ssl, "result": result}


def test_multilabel_pipeline_records_the_task_and_leaves_the_test_split_out(pipeline):
    table = label_tables.load_label_table(os.path.join(pipeline["data"], "labels.csv"), pipeline["data"])
    ssl = checkpoints.load_checkpoint(pipeline["ssl"], "ssl")
    test = sorted(np.asarray(table.filenames)[table.indices("test")])
    assert ssl["excluded_files"] == test and len(test) > 0
    ckpt = checkpoints.load_checkpoint(os.path.join(pipeline["ckpts"], "best_finetuned_model.pth"), "classifier")
    assert ckpt["task"] == "multilabel" and ckpt["class_names"] == sorted(synthetic.SYNTHETIC_FINDINGS.values())
    assert len(ckpt["thresholds"]) == 4 and all(0 <= t <= 1 for t in ckpt["thresholds"])
    assert ckpt["threshold_rule"] == "youden" and ckpt["uncertain"] == "ignore"
    train = np.searchsorted(table.filenames, ckpt["train_files"])
    assert (table.labels[train] == 1).any(0).all()                       # half the labels, every finding
    history = pd.read_csv(os.path.join(pipeline["ckpts"], "finetuned_history.csv"))
    assert "val_mean_auc" in history and history.val_mean_auc.between(0, 1).all()


def test_multilabel_comparison_report_has_per_finding_aucs_with_intervals(pipeline):
    out, result = pipeline["report"], pipeline["result"]
    findings = sorted(synthetic.SYNTHETIC_FINDINGS.values())
    comparison = open(os.path.join(out, "comparison.md")).read()
    for name in findings:
        row = next(line for line in comparison.splitlines() if line.startswith(f"| {name} |"))
        assert row.count("[") >= 2                                     # both models' AUC with an interval
    assert "Paired ROC-AUC difference" in comparison and "**mean AUC**" in comparison
    verdict = comparison.splitlines()[2]
    assert verdict.startswith("**Verdict** (primary metric: mean ROC-AUC over the findings): this SSL-initialised "
                              "model (SSL) vs this from-scratch model (scratch) on these ")
    assert " test patients (" in verdict and "paired bootstrap over the patients" in verdict
    assert "Holm-adjusted p" in comparison and "> **Caution:** only " in comparison
    metrics = json.load(open(os.path.join(out, "SSL", "metrics.json")))
    assert metrics["findings"] == findings
    for name in findings:
        auc = metrics["per_finding"][name]["roc_auc"]
        if auc["ci95"][0] is None:                                     # too few resamples kept the finding's cases
            assert auc["resamples_used"] < 200 and "usable resamples]" in comparison
        else:
            assert auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
        assert set(metrics["per_finding"][name]) >= {"average_precision", "sensitivity", "specificity", "threshold"}
    # the point AUCs are scikit-learn's on the predictions written
    predictions = pd.read_csv(os.path.join(out, "SSL", "predictions.csv"))
    for name in findings:
        y = predictions[f"true_{name}"]
        if 0 < y.sum() < len(y):
            assert metrics["per_finding"][name]["roc_auc"]["value"] == pytest.approx(
                skm.roc_auc_score(y, predictions[f"prob_{name}"]), abs=1e-6)
    assert result["paired"]["difference"].shape == (5,)                 # 4 findings and the mean
    for file in ("roc_grid_comparison.png", "SSL/roc_grid.png", "SSL/tsne.png", "scratch/umap.png"):
        assert os.path.getsize(os.path.join(out, file)) > 10_000


def test_label_efficiency_multilabel_mode_reports_mean_auc_for_both_methods(pipeline, tmp_path):
    import label_efficiency

    out = str(tmp_path / "runs")
    label_efficiency.main(label_efficiency.get_args_parser().parse_args([
        "--multi_label", "--data_dir", pipeline["data"], "--output_dir", out, "--ssl_checkpoint", pipeline["ssl"],
        "--image_size", "32", "--ft_epochs", "1", "--fractions", "0.5", "--seeds", "0", "--device", "cpu"]))
    results = pd.read_csv(os.path.join(out, "results.csv"))
    assert sorted(results.method) == ["scratch", "ssl"] and results.mean_auc.between(0, 1).all()
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| label fraction | method | runs | mean_auc | mean_ap |" in summary
    assert "SSL - scratch mean ROC-AUC" in summary
    probe = pd.read_csv(os.path.join(out, "probe.csv"))
    assert sorted(probe.features) == ["random init", "ssl"] and probe.mean_auc.between(0, 1).all()
