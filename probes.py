"""Frozen-feature evaluation of an encoder: feature extraction, the weighted kNN classifier (the pretraining
monitor) and the logistic-regression linear probe with its regularisation chosen on val.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError, autocast


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, prepare, device: torch.device, autocast_dtype=None):
    """Encoder features for every batch of `loader`; `prepare(uint8_batch) -> normalised float batch`.

    Returns (features (N, D) float32 on CPU, labels (N,) int64, indices (N,) int64)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels, indices = [], [], []
    for images, y, idx in loader:
        x = prepare(images.to(device, non_blocking=True))
        with autocast(device.type, autocast_dtype):
            f = encoder(x)
        feats.append(f.float().cpu())
        labels.append(y)
        indices.append(idx)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


def knn_predict(train_features, train_labels, query_features, num_classes: int, k: int = 20,
                temperature: float = 0.1) -> torch.Tensor:
    """Weighted kNN on cosine similarity (Wu et al. 2018); returns class scores (Q, num_classes)."""
    train = F.normalize(train_features, dim=1)
    query = F.normalize(query_features, dim=1)
    k = min(k, train.shape[0])
    sim, idx = (query @ train.T).topk(k, dim=1)                         # (Q, k)
    weights = (sim / temperature).exp()
    votes = torch.zeros(query.shape[0], num_classes)
    votes.scatter_add_(1, train_labels[idx], weights)
    return votes / votes.sum(dim=1, keepdim=True)


PROBE_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)   # inverse L2 strength, on standardised features


@dataclass
class Probe:
    prob: np.ndarray        # (N, K) probabilities on the scored images (0 for classes unseen in training)
    C: float                # the inverse regularisation strength used
    chosen_by: str          # how C was chosen, in words


def _logistic(train_x, train_y, C: float, seed: int, notes: list):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(train_x, train_y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.append(f"the linear probe's solver (C={C:g}) stopped at max_iter=2000 before converging")
    return model


def _probabilities(model, x, k: int) -> np.ndarray:
    prob = np.zeros((len(x), k))
    prob[:, model.classes_] = model.predict_proba(x)
    return prob


def _val_log_loss(y, prob, k: int) -> float:
    """Val cross-entropy of the probe's probabilities (a class it never saw gets probability 0, clipped)."""
    from sklearn.metrics import log_loss

    prob = np.clip(prob, 1e-15, 1)
    return float(log_loss(y, prob / prob.sum(1, keepdims=True), labels=np.arange(k)))


def fit_linear_probe(train_x, train_y, eval_x, k: int, seed: int, notes: list, val_x=None, val_y=None) -> Probe:
    """Logistic regression on standardised frozen features. With val features, the L2 strength is the one of
    PROBE_C_GRID with the lowest val log-loss (the SSL literature's linear evaluation chooses it on val too): a
    fixed C can hide what a few labels get out of good features, and log-loss scores the probabilities the
    reports read, not only their ranking. Without val features C is 1."""
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        raise UserError("the linear probe needs at least two classes among the train-split images; "
                        "check the label file's split column")
    scaler = StandardScaler().fit(train_x)
    train_x = scaler.transform(train_x)
    C, chosen_by = 1.0, "fixed (no val split to choose it on)"
    if val_x is not None and len(val_y) > 0:
        val_x = scaler.transform(val_x)
        losses = {c: _val_log_loss(val_y, _probabilities(_logistic(train_x, train_y, c, seed, []), val_x, k), k)
                  for c in PROBE_C_GRID}
        C = min(losses, key=lambda c: (losses[c], c))                # ties: the stronger regularisation
        chosen_by = f"chosen on {len(val_y)} val images (val log-loss {losses[C]:.3f}) from {list(PROBE_C_GRID)}"
    model = _logistic(train_x, train_y, C, seed, notes)
    return Probe(_probabilities(model, scaler.transform(eval_x), k), C, chosen_by)
