"""The statistics behind every interval: the patient (cluster) bootstrap, Wilson intervals at the patients'
effective sample size, the minimum of usable resamples, Holm's adjustment, and one ground truth for every
multi-label model."""
import types

import numpy as np
import pytest
from sklearn import metrics as skm

import classification_metrics as cm
import tasks
import verdicts
from evaluated_model import Evaluated, ModelInfo
from test_multilabel import chexpert_csv


def predictions(n, k=3, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, prob


def width(entry, index=None):
    low, high = (entry[key] if index is None else entry[key][index] for key in ("low", "high"))
    return float(high - low)


def test_one_patient_per_image_is_the_image_bootstrap_draw_for_draw():
    """Patients numbered by first appearance: with one image each, the same seed draws the same weights."""
    ids = [f"p{i:03d}" for i in range(90)][::-1]                   # sorted order differs from image order
    images = np.concatenate(list(cm.bootstrap_weights(90, 250, seed=3, chunk=64)))
    patients = np.concatenate(list(cm.bootstrap_weights(90, 250, seed=3, chunk=64, groups=ids)))
    np.testing.assert_array_equal(images, patients)
    y, prob = predictions(90)
    a, b = cm.compute_metrics(y, prob, 3, 250, 3), cm.compute_metrics(y, prob, 3, 250, 3, groups=ids)
    assert (a["roc_auc_macro"]["low"], a["roc_auc_macro"]["high"]) == (b["roc_auc_macro"]["low"], b["roc_auc_macro"]["high"])
    assert a["resampling"] == b["resampling"] == {"unit": "image", "units": 90, "images": 90}


def test_a_patient_brings_all_its_images_and_the_weights_stay_sklearn_sample_weights():
    groups = np.repeat(np.arange(40), 3)[np.random.default_rng(1).permutation(120)]
    w = np.concatenate(list(cm.bootstrap_weights(120, 50, seed=0, chunk=16, groups=groups)))
    assert (w.sum(1) == 120).all()                                  # 40 patients of 3 images drawn per resample
    for g in range(40):                                             # a patient's images are drawn together
        assert (w[:, groups == g] == w[:, groups == g][:, :1]).all()
    y, prob = predictions(120, seed=7)
    m = {key: v[0] for key, v in cm.all_metrics(w[:1], y, prob, 3, np.ones(3, bool)).items()}
    pred, sw = prob.argmax(1), w[0]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred, sample_weight=sw))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", sample_weight=sw))
    for c in range(3):
        assert m["roc_auc_per_class"][c] == pytest.approx(skm.roc_auc_score(y == c, prob[:, c], sample_weight=sw))


def test_duplicated_images_of_one_patient_do_not_narrow_the_interval():
    """Each image copied 3 times: as one patient the interval stays as wide as the originals'; counted as
    independent images it narrows by about sqrt(3), which is the error the patient bootstrap prevents."""
    y, prob = predictions(150, seed=2)
    y3, prob3, ids = np.repeat(y, 3), np.repeat(prob, 3, axis=0), np.repeat(np.arange(150), 3)
    alone = cm.compute_metrics(y, prob, 3, 400, seed=0)
    as_patients = cm.compute_metrics(y3, prob3, 3, 400, seed=0, groups=ids)
    as_images = cm.compute_metrics(y3, prob3, 3, 400, seed=0)
    assert as_patients["resampling"] == {"unit": "patient", "units": 150, "images": 450}
    for key in ("accuracy", "balanced_accuracy", "roc_auc_macro"):
        assert width(as_patients[key]) == pytest.approx(width(alone[key]), rel=0.2), key
        assert width(as_images[key]) < 0.75 * width(alone[key]), key         # 1/sqrt(3) = 0.58 expected
    for key in ("recall", "specificity", "precision"):                       # Wilson at the effective n
        for c in range(3):
            assert width(as_patients[key], c) == pytest.approx(width(alone[key], c), rel=1e-9), key
            assert width(as_images[key], c) < 0.7 * width(alone[key], c), key
    paired = [cm.paired_accuracy_difference(y3, prob3, np.roll(prob3, 1, 1), 400, 0, groups) for groups in (ids, None)]
    assert paired[0]["resampling"]["unit"] == "patient" and paired[1]["resampling"]["unit"] == "image"
    assert paired[0]["high"] - paired[0]["low"] > 1.4 * (paired[1]["high"] - paired[1]["low"])


def test_wilson_interval_by_hand_and_never_zero_width_from_few_positives():
    low, high = cm.wilson_interval(np.array([1.0, 0.0, 0.3]), np.array([4.0, 10.0, 100.0]))
    z2 = 1.959963984540054 ** 2
    assert low[0] == pytest.approx(4 / (4 + z2)) and high[0] == 1.0            # x = n: lower limit n / (n + z^2)
    assert low[1] == 0.0 and high[1] == pytest.approx(z2 / (10 + z2))
    assert (low[2], high[2]) == pytest.approx((0.2189, 0.3959), abs=1e-4)     # Wilson 30/100, as statsmodels
    # 4 positives, all found, two images per patient: the bootstrap would say [1.000, 1.000]
    y = np.array([1] * 4 + [0] * 40)
    prob = np.stack([1 - np.r_[np.full(4, 0.9), np.linspace(0, 0.6, 40)], np.r_[np.full(4, 0.9), np.linspace(0, 0.6, 40)]], 1)
    r = cm.compute_metrics(y, prob, 2, 300, 0, groups=np.arange(44) // 2)
    assert r["recall"]["value"][1] == 1.0 and r["recall"]["high"][1] == 1.0
    assert r["recall"]["low"][1] == pytest.approx(2 / (2 + z2))                # 2 patients' worth of evidence
    single = cm.compute_metrics(y, prob, 2, 300, 0)
    assert r["recall"]["low"][1] < single["recall"]["low"][1] < 0.6


def test_design_effect_is_one_for_independent_images_and_bounded_by_the_cluster_sizes():
    rng = np.random.default_rng(0)
    success, counted = rng.random((300, 1)) < 0.4, np.ones((300, 1), bool)
    assert cm.design_effect(success, counted, np.arange(300))[0] == 1.0
    alike = np.repeat(rng.random((100, 1)) < 0.4, 3, axis=0)                 # three identical images a patient
    assert cm.design_effect(alike, counted, np.repeat(np.arange(100), 3))[0] == pytest.approx(3.0)


def test_too_few_usable_resamples_give_no_interval_and_say_so():
    y, prob = predictions(60)
    r = cm.compute_metrics(y, prob, 3, cm.MIN_VALID_RESAMPLES - 1, 0)
    assert np.isnan(r["accuracy"]["low"]) and int(r["accuracy"]["valid"]) == cm.MIN_VALID_RESAMPLES - 1
    assert cm.with_ci(r["accuracy"]).endswith(f"[n/a: only {cm.MIN_VALID_RESAMPLES - 1} usable resamples]")
    assert cm.with_ci(cm.compute_metrics(y, prob, 3, 0, 0)["accuracy"]) == cm.fmt(r["accuracy"]["value"])
    assert np.isfinite(cm.compute_metrics(y, prob, 3, cm.MIN_VALID_RESAMPLES, 0)["accuracy"]["low"])


def test_holm_adjustment_by_hand_and_secondary_metrics_use_it():
    np.testing.assert_allclose(cm.holm_adjusted([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(cm.holm_adjusted([0.01, np.nan])[1]) and cm.holm_adjusted([0.01, np.nan])[0] == 0.01
    y, good = predictions(300, seed=8, signal=3.0)
    d = cm.paired_metric_differences(y, good, np.roll(good, 1, 1), 3, 300, 0)
    assert d["balanced_accuracy"]["primary"] and "p_holm" not in d["balanced_accuracy"]
    assert all(d[k]["p_holm"] >= d[k]["p"] for k in ("accuracy", "f1_macro", "roc_auc_macro", "brier"))
    assert d["accuracy"]["detected"] and d["accuracy"]["p_holm"] < 0.05
    same = cm.paired_metric_differences(y, good, good, 3, 300, 0)
    assert all(v["p"] == 1.0 and not v["detected"] for v in same.values())


def test_every_multilabel_model_is_scored_on_the_same_certain_cells(tmp_path):
    """Checkpoints trained with --uncertain zero and one read the same test labels: uncertain cells left out."""
    csv = chexpert_csv(tmp_path)
    args = types.SimpleNamespace(label_file=csv, data_dir=str(tmp_path))
    ckpts = [types.SimpleNamespace(uncertain=u, split_seed=1, val_fraction=0.15, test_fraction=0.15)
             for u in ("zero", "one", "ignore")]
    tables = [tasks.MULTI_LABEL.scoring_table(args, c) for c in ckpts]
    for t in tables[1:]:
        np.testing.assert_array_equal(t.labels, tables[0].labels)
        np.testing.assert_array_equal(t.splits, tables[0].splits)
    assert (tables[0].labels == -1).any()                                   # uncertain cells stay out
    rows = tables[0].indices("all")
    y = tables[0].labels[rows]
    rng = np.random.default_rng(0)
    models = [Evaluated(name, name, "multi-label classifier", list(np.asarray(tables[0].filenames)[rows]), y,
                        rng.random(y.shape), np.zeros((len(y), 2)), tables[0].class_names,
                        ModelInfo("all", "label file", "classifier", task="multilabel", uncertain=c.uncertain,
                                  thresholds=[0.5] * 4), patient_ids=tables[0].patient_ids[rows])
              for name, c in zip(("a", "b"), ckpts)]
    paired = tasks.MULTI_LABEL.paired(models[0], models[1], 200, 0)
    assert paired["resampling"] == {"unit": "patient", "units": 20, "images": 40}   # two views a patient
    by_hand = [skm.roc_auc_score(y[y[:, k] >= 0, k], m.prob[y[:, k] >= 0, k]) for m in models for k in [1]]
    assert paired["difference"][1] == pytest.approx(by_hand[0] - by_hand[1])
    metrics = tasks.MULTI_LABEL.compute_metrics(models[1], 200, 0)
    assert metrics["ignored"].sum() == (y == -1).sum() > 0
    assert "uncertain cells left out" in "\n".join(tasks.MULTI_LABEL.report_head(models[1], metrics,
                                                                             types.SimpleNamespace(
                                                                                 label_file=csv, bootstrap=200, seed=0)))


def test_small_split_and_val_split_warnings_in_both_tasks():
    y, prob = predictions(40)
    info = ModelInfo("val", "recorded in the checkpoint", "classifier")
    ev = Evaluated("m", "m.pth", "classifier", [str(i) for i in range(40)], y, prob, np.zeros((40, 2)),
                   ["a", "b", "c"], info, patient_ids=np.arange(40) // 2)
    warnings = tasks.SINGLE_LABEL.small_split_warnings(ev, cm.compute_metrics(y, prob, 3, 0, 0, ev.patient_ids))
    assert warnings[0] == verdicts.VAL_SPLIT_WARNING
    assert warnings[1].startswith("only 20 val patients (40 images)") and "few images of a class" in warnings[2]
    yk = (np.random.default_rng(0).random((40, 2)) < 0.2).astype(np.float32)
    ml = Evaluated("m", "m.pth", "multi-label classifier", ev.filenames, yk, prob[:, :2], ev.features, ["x", "y"],
                   ModelInfo("test", "recorded in the checkpoint", "classifier", task="multilabel",
                             thresholds=[0.5, 0.5]))
    warnings = tasks.MULTI_LABEL.small_split_warnings(ml, cm.compute_multilabel_metrics(yk, prob[:, :2], [0.5] * 2, 0, 0))
    assert warnings[0].startswith("only 40 test images") and f"x positives ({int(yk[:, 0].sum())})" in warnings[1]
    ml.info.small_split = warnings
    head = tasks.MULTI_LABEL.report_head(ml, cm.compute_multilabel_metrics(yk, prob[:, :2], [0.5] * 2, 0, 0),
                                         types.SimpleNamespace(label_file="l.csv", bootstrap=0, seed=0))
    assert head[0] == f"> **Caution:** {warnings[0]}" and "- no intervals (--bootstrap 0)" in head


def test_auc_score_interval_matches_the_wald_interval_when_large_and_keeps_width_at_the_boundary():
    """Newcombe's score interval: near Hanley-McNeil's Wald interval for a mid-range AUC on many patients, and
    a real width where the AUC is 1 (the Wald and percentile intervals have none there)."""
    low, high = cm.auc_score_interval(np.array([0.8]), np.array([400.0]), np.array([400.0]))
    half = cm.Z95 * np.sqrt(cm._auc_variance(0.8, 400, 400))
    assert low[0] == pytest.approx(0.8 - half, abs=0.003) and high[0] == pytest.approx(0.8 + half, abs=0.003)
    low, high = cm.auc_score_interval(np.array([1.0, 1.0, 0.0]), np.array([4.0, 40.0, 4.0]), np.array([60.0] * 3))
    assert high[0] == 1.0 and 0.5 < low[0] < 0.95 and low[0] < low[1] < 1.0       # fewer positives, wider
    assert low[2] == 0.0 and 0.05 < high[2] < 0.5


def test_all_positives_ranked_first_give_a_score_interval_not_a_zero_width_one():
    """A finding whose 4 positive patients all rank first: every resample gives AUC 1 and AP 1, so the
    percentile interval is [1, 1]; the score intervals over the patients take its place, and say so."""
    rng = np.random.default_rng(0)
    y = np.zeros(120, int)
    y[:8] = 1                                                       # 8 positive images of 4 patients
    prob1 = np.where(y == 1, 0.9 + 0.01 * rng.random(120), 0.5 * rng.random(120))
    prob = np.stack([1 - prob1, prob1], 1)
    groups = [f"p{i // 2}" for i in range(120)]
    out = cm.compute_metrics(y, prob, 2, 300, 0, groups=groups)
    for key in ("roc_auc", "pr_auc"):
        assert out[key]["value"] == 1.0 and out[key]["high"] == 1.0 and out[key]["low"] < 0.95, key
        assert cm.interval_kind(out[key]).startswith("score")
    assert out["pr_auc"]["low"] == pytest.approx(4 / (4 + cm.Z95 ** 2))         # Wilson over 4 positive patients
    assert cm.interval_kind(out["roc_auc_per_class"], 1).startswith("score")
    notes = cm.score_notes(out["roc_auc_per_class"], "ROC-AUC", ["normal", "nodule"], "patient")
    assert len(notes) == 2 and "its 4 positive patients" in notes[1] and "56 negative ones" in notes[1]
    # multi-label: the same finding beside an ordinary one
    y2 = np.stack([y, rng.integers(0, 2, 120)], 1)
    p2 = np.stack([prob1, rng.random(120)], 1)
    ml = cm.compute_multilabel_metrics(y2, p2, [0.5, 0.5], 300, 0, groups=groups)
    assert ml["roc_auc"]["low"][0] < 0.95 and ml["average_precision"]["low"][0] < 0.95
    assert width(ml["roc_auc"], 1) > 0 and not ml["roc_auc"]["score"][1]


def test_brier_by_hand_ece_without_interval_and_knn_without_either():
    y = np.array([0, 1, 1, 0])
    prob = np.array([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1], [0.5, 0.5]])
    brier = cm.brier_score(np.ones((1, 4)), y, prob)[0]
    assert brier == pytest.approx((0.08 + 0.32 + 1.62 + 0.5) / 4)
    yy, pp = predictions(200)
    out = cm.compute_metrics(yy, pp, 3, 300, 0)
    assert np.isnan(out["ece"]["low"]) and cm.interval_kind(out["ece"]) == "none"
    assert cm.with_ci(out["ece"]) == cm.fmt(out["ece"]["value"])
    assert out["brier"]["low"] <= out["brier"]["value"] <= out["brier"]["high"]
    ev = types.SimpleNamespace(y_true=yy, prob=pp, class_names=["a", "b", "c"], patient_ids=None, kind="kNN",
                               info=types.SimpleNamespace(split="test"))
    knn = tasks.SingleLabel().compute_metrics(ev, 300, 0)
    assert np.isnan(knn["ece"]["value"]) and np.isnan(knn["brier"]["value"]) and cm.with_ci(knn["ece"]) == "n/a"
    assert any("not probabilities" in n for n in tasks.SingleLabel().metric_notes(ev, knn, 300))


def test_the_paired_paragraph_leads_with_the_primary_metric_not_accuracy():
    paired = {"model_a": "SSL init", "model_b": "from scratch", "difference": 0.20, "low": 0.10, "high": 0.30,
              "excludes_zero": True, "num_images": 318,
              "resampling": {"unit": "patient", "units": 107, "images": 318},
              "metrics": {"balanced_accuracy": {"difference": 0.05, "low": -0.02, "high": 0.12,
                                                "excludes_zero": False, "primary": True},
                          "accuracy": {"difference": 0.20, "low": 0.10, "high": 0.30, "excludes_zero": True,
                                       "p_holm": 0.004, "detected": True}}}
    lead = verdicts.paired_sentences(paired)[0]
    assert lead.startswith("Balanced accuracy of **SSL init** minus **from scratch** on the 107 patients")
    assert "**+0.050**" in lead and "includes zero: no difference detected" in lead
    del paired["metrics"]                                   # an older comparison: accuracy is all there is
    assert verdicts.paired_sentences(paired)[0].startswith("Accuracy of **SSL init**")
