"""evaluate.py: metrics against scikit-learn, bootstrap intervals, calibration, and end-to-end runs on
tiny images (a classifier, two classifiers compared, an SSL checkpoint, and the user errors)."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

import checkpoints
import data_splits
import evaluate
import image_io
import label_tables
import classification_metrics
import plots
import probes
import reports
import single_label_reports
import scoring
import utils
import verdicts
from model_ssl import Classifier, ModelConfig, SimCLR

CLASS_NAMES = ["normal", "pneumonia", "effusion"]
PER_CLASS = {"train": 8, "val": 2, "test": 4}           # images per class and split: 42 in all
MODEL_FILES = ["metrics.json", "classification_report.txt", "predictions.csv", "confusion_matrix.png",
               "roc_curves.png", "pr_curves.png", "reliability.png", "tsne.png", "umap.png", "report.md"]
CLASSIFIER_FILES = MODEL_FILES + ["gradcam.png"]


# ============ metrics on hand-made predictions ============

def random_predictions(n, k, seed, signal=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    logits = np.round(logits, 1)                                     # ties, which sklearn handles specially
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, prob


def point(y, prob):
    k = prob.shape[1]
    return {key: v[0] for key, v in classification_metrics.all_metrics(np.ones((1, len(y))), y, prob, k, np.ones(k, bool)).items()}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_metrics_match_sklearn(k):
    y, prob = random_predictions(200, k, seed=k)
    pred, m = prob.argmax(1), point(y, prob)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    np.testing.assert_allclose(m["precision"], skm.precision_score(y, pred, average=None))
    np.testing.assert_allclose(m["recall"], skm.recall_score(y, pred, average=None))
    if k == 2:
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, prob[:, 1]))
        assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, prob[:, 1]))
    else:
        assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    for c in range(k):
        assert m["roc_auc_per_class"][c] == pytest.approx(skm.roc_auc_score(y == c, prob[:, c]))
        assert m["pr_auc_per_class"][c] == pytest.approx(skm.average_precision_score(y == c, prob[:, c]))


def test_bootstrap_weights_equal_sklearn_sample_weights():
    """A resample is a weighting of the images; each metric must agree with sklearn's sample_weight."""
    y, prob = random_predictions(150, 3, seed=7)
    w = next(classification_metrics.bootstrap_weights(150, 1, seed=0, chunk=1))
    m = {key: v[0] for key, v in classification_metrics.all_metrics(w, y, prob, 3, np.ones(3, bool)).items()}
    pred, sw = prob.argmax(1), w[0]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred, sample_weight=sw))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", sample_weight=sw))
    for c in range(3):
        assert m["roc_auc_per_class"][c] == pytest.approx(skm.roc_auc_score(y == c, prob[:, c], sample_weight=sw))
        assert m["pr_auc_per_class"][c] == pytest.approx(
            skm.average_precision_score(y == c, prob[:, c], sample_weight=sw))


def test_specificity_and_counts_by_hand():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 2, 2])
    m = classification_metrics.count_metrics(classification_metrics.confusion_matrices(np.ones((1, 6)), y, pred, 3))
    # class 0: tn = images not 0 and not predicted 0 = 3, fp = 0; class 1: tn = 2, fp = 2; class 2: tn = 4, fp = 1
    np.testing.assert_allclose(m["specificity"][0], [3 / 3, 2 / 4, 4 / 5])
    np.testing.assert_allclose(m["recall"][0], [1 / 3, 1 / 2, 1 / 1])
    np.testing.assert_allclose(m["precision"][0], [1 / 1, 1 / 3, 1 / 2])


def test_absent_class_is_nan_not_a_crash():
    y, prob = random_predictions(60, 3, seed=1)
    y[y == 2] = 0                                                    # class 2 absent from the split
    r = classification_metrics.compute_metrics(y, prob, 3, resamples=50, seed=0)
    assert r["support"][2] == 0
    assert np.isnan(r["recall"]["value"][2]) and np.isnan(r["roc_auc_per_class"]["value"][2])
    expected = np.mean([skm.roc_auc_score(y == c, prob[:, c]) for c in (0, 1)])
    assert r["roc_auc_macro"]["value"] == pytest.approx(expected)   # macro over the classes present
    assert r["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, prob.argmax(1)))


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_images():
    widths = []
    for n in (60, 1000):
        y, prob = random_predictions(n, 3, seed=3)
        r = classification_metrics.compute_metrics(y, prob, 3, resamples=300, seed=0)
        for key in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc_macro", "brier"):
            assert r[key]["low"] <= r[key]["value"] <= r[key]["high"], key
        widths.append(r["accuracy"]["high"] - r["accuracy"]["low"])
    assert widths[1] < 0.5 * widths[0]                               # ~ 1/sqrt(n): 4x narrower expected


def test_bootstrap_is_deterministic_for_a_seed():
    y, prob = random_predictions(80, 3, seed=4)
    a, b, c = (classification_metrics.compute_metrics(y, prob, 3, 200, seed=s)["roc_auc_macro"] for s in (5, 5, 6))
    assert (a["low"], a["high"]) == (b["low"], b["high"])
    assert (a["low"], a["high"]) != (c["low"], c["high"])


def test_ece_is_zero_when_calibrated_and_the_gap_when_overconfident():
    y = np.array([0] * 3 + [1] + [1] * 4)                # first 4: confidence 0.75, 3 of 4 right
    prob = np.array([[0.75, 0.25]] * 4 + [[0.1, 0.9]] * 4)
    prob[4:] = [[0.0, 1.0]] * 4                          # last 4: confidence 1.0, all right
    assert classification_metrics.expected_calibration_error(np.ones((1, 8)), y, prob)[0] == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 20000)                  # sampled calibration: right with probability conf
    correct = rng.uniform(size=20000) < conf
    y = np.where(correct, 0, 1)
    prob = np.stack([conf, 1 - conf], 1)
    assert classification_metrics.expected_calibration_error(np.ones((1, 20000)), y, prob)[0] < 0.02
    overconfident = np.tile([[0.9, 0.1]], (10, 1))       # 90% confident, 50% right -> ECE 0.4
    assert classification_metrics.expected_calibration_error(np.ones((1, 10)), np.array([0, 1] * 5), overconfident)[0] == \
        pytest.approx(0.4)


def test_projection_of_too_few_images_is_skipped_with_a_reason():
    with pytest.raises(plots.ProjectionSkipped, match="at least 5 images"):
        plots.project_embedding(np.random.default_rng(0).normal(size=(3, 8)), "t-SNE", seed=0)
    coords = plots.project_embedding(np.random.default_rng(0).normal(size=(6, 8)), "t-SNE", seed=0)
    assert coords.shape == (6, 2) and np.isfinite(coords).all()


def test_paired_difference():
    y, prob = random_predictions(300, 3, seed=5, signal=3.0)
    same = classification_metrics.paired_accuracy_difference(y, prob, prob, 200, seed=0)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0 and not same["excludes_zero"]
    worse = np.roll(prob, 1, axis=1)                     # always wrong where the first is right
    d = classification_metrics.paired_accuracy_difference(y, prob, worse, 200, seed=0)
    assert d["difference"] > 0.5 and d["low"] > 0 and d["excludes_zero"]


# ============ end to end on tiny images ============

def write_dataset(root):
    """42 grayscale 32 px PNGs whose brightness depends on the class, and labels.csv with a split column."""
    rng = np.random.default_rng(0)
    rows = []
    for c in range(3):
        for split, count in PER_CLASS.items():
            for i in range(count):
                name = f"img_{c}_{split}_{i}.png"
                pixels = np.clip(rng.normal(60 + 70 * c, 25, (32, 32)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / name)
                rows.append(f"{name},{CLASS_NAMES[c]},{split}")
    (root / "labels.csv").write_text("filename,label,split\n" + "\n".join(rows) + "\n")


def common_state(model, table):
    return {"model_config": model.config.to_dict(), "image_size": 32, "channels": 1,
            "normalization": {"mean": list(image_io.IMAGENET_MEAN), "std": list(image_io.IMAGENET_STD)},
            "encoder": model.encoder.state_dict(), "args": {"seed": 42, "num_epochs": 5}, "epoch": 3,
            "label_file_sha256": table.sha256}


def save_classifier(path, table, seed, init):
    torch.manual_seed(seed)
    model = Classifier(ModelConfig(small_stem=True), 3)
    splits = {s: [f for f, sp in zip(table.filenames, table.splits) if sp == s] for s in data_splits.SPLITS}
    history = "finetuned_history.csv" if init == "ssl" else "baseline_history.csv"
    checkpoints.save_checkpoint(common_state(model, table) | {
        "kind": "classifier", "head": model.head.state_dict(), "num_classes": 3, "class_names": table.class_names,
        "init": init, "ssl_checkpoint": None, "split_seed": 42, "val_fraction": 0.15, "test_fraction": 0.15,
        "splits": splits, "train_files": splits["train"][::2], "label_fraction": 0.5,
        "val_metrics": {"balanced_accuracy": 0.4, "accuracy": 0.4, "loss": 1.1}, "history_file": history}, str(path))
    (path.parent / history).write_text("epoch,train_loss,val_loss,val_balanced_accuracy\n"
                                       "1,1.10,1.08,0.33\n2,0.95,1.01,0.40\n3,0.90,0.99,0.45\n")


def save_ssl(path, table):
    torch.manual_seed(1)
    model = SimCLR(ModelConfig(small_stem=True))
    test = [f for f, sp in zip(table.filenames, table.splits) if sp == "test"]
    checkpoints.save_checkpoint(common_state(model, table) | {
        "kind": "ssl", "projector": model.projector.state_dict(), "loss": 5.0, "knn_accuracy": None,
        "excluded_files": test}, str(path))
    (path.parent / "ssl_history.csv").write_text("epoch,loss,lr,knn_accuracy\n1,5.1,0.0003,0.4\n2,4.8,0.0002,0.5\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "images"
    data.mkdir()
    write_dataset(data)
    table = label_tables.read_label_table(str(data / "labels.csv"), str(data))
    (root / "ssl_run").mkdir()
    (root / "scratch_run").mkdir()
    save_classifier(root / "best_finetuned_model.pth", table, seed=0, init="ssl")
    save_classifier(root / "scratch_run" / "best_baseline_model.pth", table, seed=1, init="scratch")
    save_ssl(root / "ssl_run" / "best_ssl_model.pth", table)
    return {"root": root, "data": data, "table": table, "finetuned": root / "best_finetuned_model.pth",
            "baseline": root / "scratch_run" / "best_baseline_model.pth",
            "ssl": root / "ssl_run" / "best_ssl_model.pth"}


def run_evaluate(world, out, *checkpoints, extra=()):
    argv = [a for c in checkpoints for a in ("--checkpoint", str(c))]
    argv += ["--data_dir", str(world["data"]), "--output_dir", str(out), "--bootstrap", "200", "--device", "cpu",
             *extra]
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


def assert_model_files(folder, skipped=(), files=MODEL_FILES):
    for name in [f for f in files + ["training_curves.png"] if f not in skipped]:
        path = folder / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, name
            assert f"]({name})" in (folder / "report.md").read_text(), f"report.md does not show {name}"


def read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def single_run(world):
    out = world["root"] / "out_single"
    run_evaluate(world, out, world["finetuned"], extra=["--num_classes", "3"])
    return out


def test_classifier_run_writes_every_file(single_run):
    assert_model_files(single_run, files=CLASSIFIER_FILES)
    assert (single_run / "evaluation_settings.json").is_file()
    doc = json.loads((single_run / "metrics.json").read_text())
    assert doc["split"] == "test" and doc["num_images"] == 12 and doc["kind"] == "classifier"
    assert doc["per_class"]["support"] == {"effusion": 4, "normal": 4, "pneumonia": 4}
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc", "pr_auc", "brier", "ece"):
        assert key in doc["metrics"] and len(doc["metrics"][key]["ci95"]) == 2
    report = (single_run / "report.md").read_text()
    assert "95% CI" in report and "| normal | 4 |" in report
    first = report.splitlines()
    assert first[0] == "# Evaluation: SSL init"                      # named by its init, not its file name
    assert first[2].startswith("**Summary:** on 12 test images, SSL init has balanced accuracy")
    assert "best epoch 3 of 5" in report
    # 12 images, 4 per class: the report says the intervals mean little, and how many images would do
    assert "> **Caution:** only 12 test images" in report and "about 97 images give +-0.10" in report
    assert "few images of a class: effusion (4), normal (4), pneumonia (4)" in report


def test_predictions_are_the_recorded_test_split_and_never_trained_on(world, single_run):
    ckpt = checkpoints.load_checkpoint(str(world["finetuned"]))
    rows = read_predictions(single_run / "predictions.csv")
    files = [r["filename"] for r in rows]
    assert sorted(files) == sorted(ckpt["splits"]["test"])
    assert not set(files) & set(ckpt["train_files"])
    assert list(rows[0]) == ["filename", "true", "predicted"] + [f"prob_{c}" for c in world["table"].class_names]
    probs = np.array([[float(r[f"prob_{c}"]) for c in world["table"].class_names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert all(r["true"] == CLASS_NAMES[int(r["filename"].split("_")[1])] for r in rows)   # names, not indices


def skip_figures(monkeypatch):
    """For tests about which images are scored: the figures are checked elsewhere and cost seconds."""
    monkeypatch.setattr(single_label_reports.SingleLabelReports, "write_figures", lambda *a, **k: {})
    monkeypatch.setattr(reports, "write_gradcam_figure", lambda *a, **k: None)
    monkeypatch.setattr(reports, "embedding_projections",
                        lambda evaluated, seed: {e.checkpoint: {} for e in evaluated})


def test_comparison_mode(world, single_run, monkeypatch):
    out = world["root"] / "out_compare"
    skip_figures(monkeypatch)                   # per-model figures are checked by the single and SSL runs
    result = run_evaluate(world, out, world["finetuned"], world["baseline"], extra=["--names", "SSL", "scratch"])
    for folder in ("SSL", "scratch"):
        for name in ("metrics.json", "classification_report.txt", "predictions.csv", "report.md"):
            assert (out / folder / name).stat().st_size > 0, name
    for name in ("comparison.csv", "comparison.md", "roc_comparison.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_predictions(out / "comparison.csv")
    assert [r["model"] for r in rows] == ["SSL", "scratch"] and rows[0]["init"] == "ssl"
    assert {"accuracy_ci_low", "roc_auc_macro", "ece_ci_high", "label_fraction"} <= set(rows[0])
    assert rows[0]["bootstrap_unit"] == "image" and rows[0]["bootstrap_units"] == "12"   # no patient_id column
    md = (out / "comparison.md").read_text()
    assert "Paired differences" in md and ("excludes zero" in md or "includes zero" in md)
    verdict = md.splitlines()[2]
    assert verdict.startswith("**Verdict** (primary metric: balanced accuracy): this SSL-initialised model (SSL) vs "
                              "this from-scratch model (scratch) on these 12 test images: ")
    assert "paired bootstrap over the images, 95% CI" in verdict and "label-efficiency benchmark" in md
    assert "| balanced accuracy |" in md and "> **Caution:** only 12 test images" in md
    assert result["paired"]["num_images"] == 12
    assert "SSL/report.md" in (out / "report.md").read_text()
    # deterministic: the same checkpoint, seed and split give the same numbers in both runs
    alone = json.loads((single_run / "metrics.json").read_text())["metrics"]
    again = json.loads((out / "SSL" / "metrics.json").read_text())["metrics"]
    assert alone == again


def test_ssl_checkpoint_is_scored_by_linear_probe_and_knn(world, monkeypatch):
    out = world["root"] / "out_ssl"
    project = plots.project_embedding

    def no_umap(features, method, seed):        # a projection that cannot be made is skipped and explained
        if method == "UMAP":
            raise plots.ProjectionSkipped("UMAP skipped by the test")
        return project(features, method, seed)

    monkeypatch.setattr(reports, "project_embedding", no_umap)
    result = run_evaluate(world, out, world["ssl"])
    assert result["models"] == ["SSL encoder linear probe", "SSL encoder kNN"]
    for folder in result["folders"]:
        folder = out / os.path.basename(folder)
        knn = "kNN" in folder.name              # vote shares: no reliability diagram, ECE or Brier score
        assert_model_files(folder, skipped=("umap.png", "reliability.png") if knn else ("umap.png",))
        assert not (folder / "umap.png").exists()
        assert (folder / "reliability.png").exists() != knn
        if knn:
            text = (folder / "report.md").read_text()
            assert "no reliability.png: a kNN's vote shares are not probabilities" in text
            assert json.loads((folder / "metrics.json").read_text())["metrics"]["ece"]["value"] is None
        assert "no umap.png: UMAP skipped by the test" in (folder / "report.md").read_text()
        assert "no Grad-CAM: a " in (folder / "report.md").read_text()
        doc = json.loads((folder / "metrics.json").read_text())
        assert doc["num_images"] == 12 and doc["fit_images"] == 24 and doc["checkpoint_kind"] == "ssl"
        if "linear" in folder.name:                                  # the probe says which C it chose, and where
            assert doc["probe_C"] in probes.PROBE_C_GRID and "chosen on" in (folder / "report.md").read_text()
        assert 0 <= doc["metrics"]["accuracy"]["value"] <= 1
    assert (out / "comparison.csv").is_file() and (out / "roc_comparison.png").is_file()


def test_wrong_num_classes_is_a_user_error(world, tmp_path):
    with pytest.raises(utils.UserError, match="--num_classes 4"):
        run_evaluate(world, tmp_path, world["finetuned"], extra=["--num_classes", "4"])


def test_changed_label_file_warns_and_scores_the_recorded_files_still_listed(world, tmp_path, capsys, monkeypatch):
    skip_figures(monkeypatch)
    lines = (world["data"] / "labels.csv").read_text().splitlines()
    dropped = [l for l in lines if "_test_0.png" in l]                # one test image per class removed
    changed = tmp_path / "labels_changed.csv"
    changed.write_text("\n".join(l for l in lines if l not in dropped) + "\n")
    run_evaluate(world, tmp_path / "out", world["finetuned"], extra=["--label_file", str(changed), "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert "not the label file" in err and "SHA-256" in err
    files = [r["filename"] for r in read_predictions(tmp_path / "out" / "predictions.csv")]
    assert len(files) == 9 and not any("_test_0.png" in f for f in files)
    notes = json.loads((tmp_path / "out" / "metrics.json").read_text())["notes"]
    assert any("not the label file" in n for n in notes)


def test_label_file_without_the_recorded_test_images_is_an_error(world, tmp_path):
    lines = (world["data"] / "labels.csv").read_text().splitlines()
    no_test = tmp_path / "no_test.csv"
    no_test.write_text("\n".join(l for l in lines if "_test_" not in l) + "\n")
    with pytest.raises(utils.UserError, match="none of the 12 test-split images"):
        run_evaluate(world, tmp_path, world["finetuned"], extra=["--label_file", str(no_test)])


def test_test_image_in_train_files_is_refused(world, tmp_path):
    ckpt = checkpoints.load_checkpoint(str(world["finetuned"]))
    ckpt["train_files"] = ckpt["train_files"] + ckpt["splits"]["test"][:1]
    leaky = tmp_path / "leaky.pth"
    checkpoints.save_checkpoint(ckpt, str(leaky))
    with pytest.raises(utils.UserError, match="among its training images"):
        run_evaluate(world, tmp_path, leaky)


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path / "missing.pth"), "--data_dir", str(world["data"])]
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(evaluate.main, evaluate.get_args_parser(), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


# ============ predictions on a folder, class names, verdicts ============

@pytest.fixture(scope="module")
def scans(world):
    """A folder of new images: an 8-bit PNG and the same pixels as a 16-bit TIFF, a test-split image in a
    subfolder, a DICOM from pydicom's test files, and a broken file."""
    from pydicom.data import get_testdata_file
    import shutil

    folder = world["root"] / "new_scans"
    (folder / "ward_b").mkdir(parents=True)
    pixels = np.random.default_rng(3).integers(0, 256, (40, 40)).astype(np.uint8)
    pixels[0, 0], pixels[0, 1] = 0, 255                         # full range: the 16-bit copy maps back exactly
    Image.fromarray(pixels).save(folder / "a.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "a16.tif")
    assert Image.open(folder / "a16.tif").mode.startswith("I;16")
    test_file = world["table"].filenames[list(world["table"].splits).index("test")]
    shutil.copy(world["data"] / test_file, folder / "ward_b" / test_file)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder, test_file


def test_images_folder_predictions(world, scans, single_run, tmp_path):
    folder, test_file = scans
    argv = ["--checkpoint", str(world["finetuned"]), "--images", str(folder), "--output_dir", str(tmp_path),
            "--device", "cpu", "--batch_size", "2"]
    result = utils.run_cli(evaluate.main, evaluate.get_args_parser(), argv)
    assert result["skipped"] == ["broken.png"]
    rows = {r["filename"]: r for r in read_predictions(tmp_path / "predictions.csv")}
    assert sorted(rows) == ["a.png", "a16.tif", "ct.dcm", f"ward_b/{test_file}"]
    names = world["table"].class_names
    assert list(next(iter(rows.values()))) == ["filename", "predicted"] + [f"prob_{c}" for c in names]
    prob = {f: np.array([float(r[f"prob_{c}"]) for c in names]) for f, r in rows.items()}
    np.testing.assert_allclose([p.sum() for p in prob.values()], 1.0, atol=1e-5)
    assert all(r["predicted"] == names[int(prob[f].argmax())] for f, r in rows.items())
    np.testing.assert_allclose(prob["a.png"], prob["a16.tif"], atol=1e-6)       # 16 bits read as 8 bits would
    scored = {r["filename"]: r for r in read_predictions(single_run / "predictions.csv")}[test_file]
    # the checkpoint's own preprocessing: as scored in the test split (bf16 autocast on some CPUs: not to 1e-6)
    np.testing.assert_allclose(prob[f"ward_b/{test_file}"], [float(scored[f"prob_{c}"]) for c in names], atol=3e-3)
    summary = (tmp_path / "summary.md").read_text()
    assert "4 image(s) scored" in summary and "`broken.png`" in summary and "](gradcam.png)" in summary
    assert (tmp_path / "gradcam.png").stat().st_size > 5000


def test_images_with_an_ssl_checkpoint_is_a_one_line_error(world, scans, tmp_path, capsys):
    argv = ["--checkpoint", str(world["ssl"]), "--images", str(scans[0]), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli(evaluate.main, evaluate.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "is an SSL encoder, which predicts no class" in err[0] and "best_finetuned_model.pth" in err[0]


def test_class_names_come_from_classes_txt_beside_integer_labels(tmp_path):
    label_file = tmp_path / "labels.csv"
    label_file.write_text("filename,label\n")
    assert label_tables.read_class_names(str(label_file), ["0", "1"]) == ["0", "1"]          # no classes.txt
    (tmp_path / "classes.txt").write_text("0\tnormal: clear lungs\n1\tpleural effusion: fluid\n")
    assert label_tables.read_class_names(str(label_file), ["0", "1"]) == ["normal", "pleural effusion"]
    assert label_tables.read_class_names(str(label_file), ["cat", "dog"]) == ["cat", "dog"]  # names stay
    ckpt = {"class_names": ["0", "1"], "num_classes": 2, "args": {"label_file": str(label_file)}}
    read = checkpoints.ClassifierCheckpoint.from_dict
    assert scoring.classifier_class_names(read(ckpt), None) == ["normal", "pleural effusion"]
    assert scoring.classifier_class_names(read(ckpt | {"class_display_names": ["a", "b"]}), None) == ["a", "b"]


def test_models_are_named_by_their_init():
    args = evaluate.get_args_parser().parse_args(["--checkpoint", "run1/best_finetuned_model.pth", "--checkpoint",
                                                  "best_baseline_model.pth", "--checkpoint", "b/x.pth"])
    ckpts = [checkpoints.from_dict(c) for c in ({"kind": "classifier", "init": "ssl"},
                                                {"kind": "classifier", "init": "scratch"},
                                                {"kind": "classifier", "init": "ssl"})]
    assert evaluate.display_names(args, ckpts) == ["SSL init (best_finetuned_model)", "from scratch", "SSL init (x)"]
    encoder = checkpoints.from_dict({"kind": "ssl"})
    assert evaluate.display_names(args, ckpts[:2] + [encoder]) == ["SSL init", "from scratch", "SSL encoder"]


def test_verdict_in_words():
    y, good = random_predictions(400, 3, seed=8, signal=3.0)
    bad = np.roll(good, 1, axis=1)
    base = {"num_images": 400, "split": "test", "init_a": "ssl", "init_b": "scratch"}
    helped = verdicts.verdict_lines(base | {"model_a": "SSL init", "model_b": "from scratch", "metrics":
                                            classification_metrics.paired_metric_differences(y, good, bad, 3, 200, seed=0)})
    assert helped[0].startswith("**Verdict** (primary metric: balanced accuracy): this SSL-initialised model (SSL "
                                "init) vs this from-scratch model (from scratch) on these 400 test images: **SSL init** "
                                "is better, SSL init minus from scratch +0.")
    assert "Holm-adjusted" in helped[4] and "- accuracy: **SSL init** is better" in "\n".join(helped)
    same = classification_metrics.paired_metric_differences(y, good, good, 3, 200, seed=0)
    assert all(d["difference"] == 0 and not d["excludes_zero"] for d in same.values())
    lines = verdicts.verdict_lines(base | {"model_a": "SSL init", "model_b": "from scratch", "metrics": same})
    assert "**no difference detected**" in lines[0] and "- accuracy: no difference detected (SSL init minus" in lines[6]
    assert "Holm-adjusted p 1.000" in lines[6]
    hurt = classification_metrics.paired_metric_differences(y, bad, good, 3, 200, seed=0)
    lines = verdicts.verdict_lines(base | {"model_a": "SSL init", "model_b": "from scratch", "metrics": hurt})
    assert "**from scratch** is better" in lines[0]
    # the accuracy difference agrees with the accuracy-only helper, interval included
    acc = classification_metrics.paired_accuracy_difference(y, good, bad, 200, seed=0)
    d = classification_metrics.paired_metric_differences(y, good, bad, 3, 200, seed=0)["accuracy"]
    assert d["difference"] == pytest.approx(acc["difference"]) and d["low"] == pytest.approx(acc["low"])
