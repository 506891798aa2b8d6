"""The linear probe chooses its L2 strength on val by log-loss, as the SSL literature's linear evaluation chooses
it on val: a fixed C hid the whole gain of SSL features at 1% labels on a real chest X-ray set (issue 19)."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import StandardScaler

import probes


def few_labels_many_dims(seed=0, n_train=12, n_val=60, n_test=200, dims=256):
    """Two classes told apart by a weak shift along every dimension (the way SSL features spread a finding over
    many units), a few labels: an unregularised probe fits the noise of 12 images."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dims) / np.sqrt(dims)

    def draw(n):
        y = np.arange(n) % 2
        return rng.normal(size=(n, dims)) + 1.5 * np.outer(2 * y - 1, direction), y
    return draw(n_train), draw(n_val), draw(n_test)


def test_probe_picks_the_c_with_the_lowest_val_log_loss_and_records_it():
    (tx, ty), (vx, vy), (ex, ey) = few_labels_many_dims()
    probe = probes.fit_linear_probe(tx, ty, ex, 2, 0, [], vx, vy)
    scaler = StandardScaler().fit(tx)
    val_loss = {c: log_loss(vy, LogisticRegression(C=c, max_iter=2000, random_state=0)
                            .fit(scaler.transform(tx), ty).predict_proba(scaler.transform(vx)))
                for c in probes.PROBE_C_GRID}
    best = min(val_loss.values())
    assert probe.C in probes.PROBE_C_GRID and val_loss[probe.C] == pytest.approx(best)
    assert probe.C == min(c for c, v in val_loss.items() if v == pytest.approx(best))   # ties: stronger L2
    assert f"val log-loss {best:.3f}" in probe.chosen_by and probe.prob.shape == (len(ey), 2)
    assert np.allclose(probe.prob.sum(1), 1)


def test_log_loss_punishes_a_confident_probe_that_val_auc_cannot_tell_apart():
    """Two probes that rank val alike (same AUC) but one is overconfident: log-loss prefers the other."""
    y = np.array([0, 1, 0, 1])
    calm = np.array([0.4, 0.45, 0.55, 0.6])
    sharp = np.array([0.01, 0.02, 0.98, 0.99])               # the same order as calm, so the same AUC
    calm_p, sharp_p = np.stack([1 - calm, calm], 1), np.stack([1 - sharp, sharp], 1)
    assert roc_auc_score(y, calm) == roc_auc_score(y, sharp)
    assert probes._val_log_loss(y, calm_p, 2) < probes._val_log_loss(y, sharp_p, 2)
    unseen = np.array([[1.0, 0.0, 0.0]] * 3)                 # a class the probe never saw: clipped, finite
    assert np.isfinite(probes._val_log_loss(np.array([0, 1, 2]), unseen, 3))


def test_probe_without_val_keeps_c_1():
    (tx, ty), _, (ex, ey) = few_labels_many_dims(seed=1)
    probe = probes.fit_linear_probe(tx, ty, ex, 3, 0, [])
    assert probe.C == 1.0 and "no val" in probe.chosen_by
    assert probe.prob.shape == (len(ey), 3) and np.all(probe.prob[:, 2] == 0)   # a class unseen in train gets 0


def test_choosing_c_on_val_does_not_lose_to_the_fixed_c_over_seeds():
    """Over several draws the val-chosen probe scores at least as well on test as C=1 on average."""
    chosen, fixed = [], []
    for seed in range(6):
        (tx, ty), (vx, vy), (ex, ey) = few_labels_many_dims(seed=seed)
        chosen.append(roc_auc_score(ey, probes.fit_linear_probe(tx, ty, ex, 2, 0, [], vx, vy).prob[:, 1]))
        fixed.append(roc_auc_score(ey, probes.fit_linear_probe(tx, ty, ex, 2, 0, []).prob[:, 1]))
    assert np.mean(chosen) >= np.mean(fixed) - 0.005
