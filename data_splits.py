"""Train/val/test splits of whole patients, stratified by class (assign_splits) or by findings with
iterative stratification (assign_multilabel_splits), and the stratified label subsets of --label_fraction.
"""
import numpy as np

from utils import UserError

SPLITS = ("train", "val", "test")


def assign_splits(labels: np.ndarray, groups: np.ndarray, seed: int, val_fraction: float = 0.15,
                  test_fraction: float = 0.15) -> np.ndarray:
    """Stratified train/val/test split of whole groups (patients), deterministic for a seed.

    Groups are stratified by their majority label; every class with a group keeps at least one
    group in train. The result does not depend on the row order."""
    rng = np.random.default_rng(seed)
    labels, groups = np.asarray(labels), np.asarray(groups).astype(str)
    splits = np.empty(len(labels), dtype=object)
    group_ids, group_of = np.unique(groups, return_inverse=True)
    group_label = np.array([np.bincount(labels[group_of == g]).argmax() for g in range(len(group_ids))])
    for c in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == c))
        n_test = min(int(round(len(members) * test_fraction)), len(members) - 1)
        n_val = max(0, min(int(round(len(members) * val_fraction)), len(members) - 1 - n_test))
        for split, part in (("test", members[:n_test]), ("val", members[n_test:n_test + n_val]),
                            ("train", members[n_test + n_val:])):
            splits[np.isin(group_of, part)] = split
    return splits.astype(str)


def stratified_subset(labels: np.ndarray, indices: np.ndarray, fraction: float = 1.0, seed: int = 0,
                      per_class: int | None = None) -> np.ndarray:
    """A stratified, seeded subset of `indices`: `fraction` of each class, or `per_class` images of
    each; at least one image of every class present. Smaller fractions are nested in larger ones."""
    if per_class is None and not 0.0 < fraction <= 1.0:
        raise UserError(f"label fraction {fraction} is outside (0, 1]; pass e.g. 0.1 for 10% of the labels")
    if per_class is not None and per_class < 1:
        raise UserError(f"per-class label count {per_class} must be at least 1")
    indices = np.asarray(indices)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels[indices]):
        members = rng.permutation(np.sort(indices[labels[indices] == c]))
        n = per_class if per_class is not None else int(round(len(members) * fraction))
        chosen.append(members[: max(1, n)])
    return np.sort(np.concatenate(chosen)) if chosen else indices[:0]


def iterative_stratified_subset(targets: np.ndarray, indices, fraction: float, seed: int = 0) -> np.ndarray:
    """`fraction` of `indices` keeping each finding's prevalence: iterative stratification (Sechidis,
    Tsoumakas and Vlahavas 2011) into two folds, the subset and the rest; then, for any finding the pool
    has but the subset lost, one random image with it moved in, so every finding keeps a positive.
    Deterministic for a seed; unlike stratified_subset, smaller fractions are not nested in larger ones."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"label fraction {fraction} is outside (0, 1]; pass e.g. 0.1 for 10% of the labels")
    indices = np.sort(np.asarray(indices))
    if fraction == 1.0 or len(indices) == 0:
        return indices
    rng = np.random.default_rng(seed)
    positive = targets[indices] == 1                                   # (n, K); ignored cells are not positives
    chosen = iterative_folds(positive.astype(float), np.ones(len(indices)), [fraction, 1 - fraction], rng) == 0
    for k in np.flatnonzero(positive.any(0) & ~positive[chosen].any(0)):
        chosen[rng.choice(np.flatnonzero(positive[:, k]))] = True
    if not chosen.any():
        chosen[rng.integers(len(indices))] = True
    return indices[chosen]


def iterative_folds(counts: np.ndarray, sizes: np.ndarray, ratios, rng: np.random.Generator) -> np.ndarray:
    """Sechidis et al.'s iterative stratification: the fold (0..F-1) of each of n units (images, or patients
    whose `counts` (n, K) sum their images' positives and `sizes` (n,) their images), filling folds to `ratios`.

    The finding with the fewest units still to place goes first; each of its units joins the fold that most
    lacks that finding (ties: the fold that lacks most images, then at random). Units without findings fill
    the folds to size last."""
    ratios = np.asarray(ratios, dtype=float)
    want = ratios[:, None] * counts.sum(0)[None, :]                    # (F, K) positives each fold still lacks
    want_size = ratios * sizes.sum()
    fold = np.full(len(counts), -1)
    has = counts > 0
    while ((fold < 0) & has.any(1)).any():
        left = (has & (fold < 0)[:, None]).sum(0)
        finding = int(np.where(left > 0, left, np.iinfo(np.int64).max).argmin())
        for i in rng.permutation(np.flatnonzero((fold < 0) & has[:, finding])):
            fold[i] = _neediest_fold(want[:, finding], want_size, rng)
            want[fold[i]] -= counts[i]
            want_size[fold[i]] -= sizes[i]
    for i in rng.permutation(np.flatnonzero(fold < 0)):
        fold[i] = _neediest_fold(want_size, want_size, rng)
        want_size[fold[i]] -= sizes[i]
    return fold


def _neediest_fold(need: np.ndarray, size_need: np.ndarray, rng) -> int:
    best = np.flatnonzero(need == need.max())
    if len(best) > 1:
        best = best[size_need[best] == size_need[best].max()]
    return int(rng.choice(best)) if len(best) > 1 else int(best[0])


def assign_multilabel_splits(targets: np.ndarray, groups: np.ndarray, seed: int, val_fraction: float = 0.15,
                             test_fraction: float = 0.15) -> np.ndarray:
    """Train/val/test of whole patients by iterative stratification over their findings, deterministic for a
    seed and independent of the row order. A finding held by 3 or more patients then gets one in val and
    in test if stratification left them without (moved from train, which keeps at least one)."""
    rng = np.random.default_rng(seed)
    group_ids, group_of = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    positive = (targets == 1).astype(float)
    counts = np.zeros((len(group_ids), targets.shape[1]))
    np.add.at(counts, group_of, positive)
    sizes = np.bincount(group_of, minlength=len(group_ids)).astype(float)
    ratios = [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]
    fold = iterative_folds(counts, sizes, ratios, rng)
    for k in range(counts.shape[1]):
        for f in (1, 2):
            holders = np.flatnonzero(counts[:, k] > 0)
            in_train = holders[fold[holders] == 0]
            if ratios[f] > 0 and len(holders) >= 3 and not (fold[holders] == f).any() and len(in_train) > 1:
                fold[rng.choice(in_train)] = f
    return np.array(SPLITS)[fold][group_of]
