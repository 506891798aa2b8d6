"""calibration.py: temperature scaling recovers a known temperature, keeps argmax and multi-label predictions,
and its ECE helpers agree with the report's top-label ECE."""
import numpy as np
import pytest
import torch

import calibration
import classification_metrics


def calibrated_logits(n, k, seed):
    """Logits whose softmax is calibrated by construction: labels drawn from it."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, k, generator=g)
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_a_known_temperature_is_recovered(scale):
    logits, labels = calibrated_logits(4000, 4, seed=int(scale * 10))
    t = calibration.fit_temperature(logits * scale, labels, multilabel=False)
    assert t == pytest.approx(scale, rel=0.1)


def test_one_temperature_per_finding_ignoring_left_out_cells():
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(4000, 3, generator=g)
    targets = torch.bernoulli(logits.sigmoid(), generator=g)
    targets[:2000, 1] = -1                                 # ignored cells: no effect on the fit
    targets[:, 2] = -1                                     # a finding without counted cells keeps 1.0
    scales = torch.tensor([0.5, 4.0, 2.0])
    t = calibration.fit_temperature(logits * scales, targets, multilabel=True)
    assert t[0] == pytest.approx(0.5, rel=0.1) and t[1] == pytest.approx(4.0, rel=0.15) and t[2] == 1.0


def test_moved_thresholds_predict_the_same_findings():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 3)) * 3
    thresholds, temps = [0.2, 0.5, 0.9], [0.4, 2.0, 7.0]
    before = 1 / (1 + np.exp(-logits)) >= thresholds
    after = 1 / (1 + np.exp(-logits / np.array(temps))) >= calibration.recalibrated_thresholds(thresholds, temps)
    np.testing.assert_array_equal(before, after)
    assert calibration.recalibrated_thresholds([0.0, 1.0], [3.0, 3.0]) == [0.0, 1.0]


def test_ece_helpers_match_the_reports_ece_and_a_hand_count():
    logits, labels = calibrated_logits(300, 3, seed=1)
    prob = (logits * 3).softmax(1).double().numpy()
    y = labels.numpy()
    report = classification_metrics.all_metrics(np.ones((1, 300)), y, prob, 3, np.ones(3, bool))["ece"][0]
    assert calibration.ece(y, prob, multilabel=False) == pytest.approx(report)
    y2, p2 = np.array([1, 0, 1, 0, -1]), np.array([0.9, 0.9, 0.1, 0.1, 0.5])
    # bins of 0.9 and 0.1: positive rate 0.5 against 0.9 and 0.1, each half of the 4 counted cells
    assert calibration.binary_ece(y2, p2) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_moved_thresholds_keep_every_val_prediction_in_float32():
    """Thresholds chosen at a val probability sit on a cell: the exact sigmoid(logit(t) / T) can land a float32
    rounding away from it, and the nudge keeps every val cell on its side."""
    rng, checked = np.random.default_rng(0), 0
    for trial in range(200):
        logits = torch.from_numpy(rng.normal(0, 3, (60, 3)).astype(np.float32))
        probs = logits.sigmoid().numpy()
        thresholds = [float(probs[rng.integers(60), k]) for k in range(3)]
        temps = list(rng.uniform(0.3, 4.0, 3))
        moved = calibration.recalibrated_thresholds(thresholds, temps)
        kept = calibration.thresholds_keeping_val_predictions(thresholds, moved, logits, temps)
        before = probs >= np.array(thresholds)
        calibrated = (logits / torch.tensor(temps, dtype=torch.float32)).sigmoid().numpy()
        after = calibrated >= np.array(kept)
        # a temperature below 1 can round two cells on either side of a threshold to the same float32 (1.0):
        # no threshold separates them, and only such findings may differ
        for k in range(3):
            if (before[:, k] == after[:, k]).all():
                continue
            assert calibrated[~before[:, k], k].max() >= calibrated[before[:, k], k].min(), (trial, k)
            checked -= 1
        checked += 3
        assert np.allclose(kept, moved, atol=1e-6)
    assert checked > 500
