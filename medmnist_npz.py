"""MedMNIST .npz files (e.g. breastmnist.npz, chestmnist.npz) -> PNG files and labels.csv with their own
train/val/test split (data_loader.py --from_npz).
"""
import os
import zipfile

import numpy as np
from PIL import Image

from data_splits import SPLITS
from image_io import _reason, to_uint8
from synthetic import write_label_csv, write_preview
from utils import UserError


def import_npz(npz_path: str, out_dir: str, label_names: list | None = None) -> list:
    """A MedMNIST-style .npz -> PNG files in `out_dir`/{split}/ and labels.csv (filename,label,split).
    Multi-label files (labels (N, K), e.g. ChestMNIST) go to import_multilabel_npz."""
    arrays = _load_npz(npz_path)
    if arrays["train_labels"].ndim == 2:
        return import_multilabel_npz(arrays, npz_path, out_dir, label_names)
    if label_names:
        raise UserError(f"--label_names names the finding columns of a multi-label file, and {npz_path} has one "
                        f"label per image; drop --label_names")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"{split}/{split}_{i:05d}.png"
            Image.fromarray(to_uint8(image)).save(os.path.join(out_dir, name))
            rows.append((name, int(label), split))
    write_label_csv(os.path.join(out_dir, "labels.csv"), "filename,label,split", rows)
    num_classes = max(r[1] for r in rows) + 1
    write_preview(out_dir, [(f, y, f) for f, y, _ in rows], [str(c) for c in range(num_classes)])
    return rows


def _load_npz(npz_path: str) -> dict:
    """The six MedMNIST arrays, checked: images (N, H, W[, 1 or 3]), labels (N,) int64."""
    if not os.path.isfile(npz_path):
        raise UserError(f"--from_npz {npz_path}: no such file; check the path")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # a half-copied file is a broken zip
        raise UserError(f"--from_npz {npz_path}: not a readable .npz file ({_reason(e)})")
    out = {}
    for split in SPLITS:
        for kind in ("images", "labels"):
            if f"{split}_{kind}" not in arrays:
                raise UserError(f"--from_npz {npz_path}: key '{split}_{kind}' is missing (found "
                                f"{', '.join(sorted(arrays))}); MedMNIST files have {{train,val,test}}_{{images,labels}}")
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or labels.ndim not in (1, 2):
            raise UserError(f"--from_npz {npz_path}: {split} arrays have shapes {images.shape} and {labels.shape}; "
                            f"expected images (N, H, W) or (N, H, W, 3) and labels (N,), (N, 1) or, multi-label, "
                            f"(N, K) of 0/1 (3D MedMNIST files are not supported)")
        if len(images) != len(labels):
            raise UserError(f"--from_npz {npz_path}: {split} has {len(images)} images but {len(labels)} labels; "
                            f"the arrays must match")
        _check_values(images, labels, split, npz_path)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels.astype(np.int64)
    if not sum(len(out[f"{s}_labels"]) for s in SPLITS):
        raise UserError(f"--from_npz {npz_path}: holds no images (every split is empty); check the file")
    if len({out[f"{s}_labels"].shape[1:] for s in SPLITS}) > 1:
        raise UserError(f"--from_npz {npz_path}: the splits' label arrays have different widths "
                        f"({', '.join(str(out[f'{s}_labels'].shape) for s in SPLITS)}); they must match")
    return out


def _check_values(images: np.ndarray, labels: np.ndarray, split: str, npz_path: str) -> None:
    """Labels are class indices (non-negative integers, of any numeric dtype); images are numbers, none NaN."""
    numeric = labels.dtype == bool or np.issubdtype(labels.dtype, np.number)
    if numeric and labels.size:
        with np.errstate(invalid="ignore"):
            wrong = ~np.isfinite(labels) | (labels < 0) | (labels != np.round(labels)) \
                if np.issubdtype(labels.dtype, np.floating) else labels < 0
    else:
        wrong = np.ones(labels.shape, bool)
    if labels.size and wrong.any():
        raise UserError(f"--from_npz {npz_path}: {split}_labels holds {labels[wrong].flat[0].item()!r}, not a class "
                        f"index (MedMNIST labels are integers 0..K-1, or 0/1 per finding); check the file")
    if not (images.dtype == bool or np.issubdtype(images.dtype, np.number)):
        raise UserError(f"--from_npz {npz_path}: {split}_images has dtype {images.dtype}, not pixel values")
    if np.issubdtype(images.dtype, np.floating) and np.isnan(images).any():
        raise UserError(f"--from_npz {npz_path}: {split}_images holds NaN pixels; the file is damaged or was "
                        f"converted wrongly")


def import_multilabel_npz(arrays: dict, npz_path: str, out_dir: str, label_names: list | None) -> list:
    """Multi-label MedMNIST arrays -> PNGs and labels.csv with one 0/1 column per finding (filename,split,
    <names>); the names are `label_names` or finding_0..finding_{K-1}. Returns rows (filename, targets, split)."""
    k = arrays["train_labels"].shape[1]
    names = list(label_names) if label_names else [f"finding_{i}" for i in range(k)]
    if len(names) != k or len(set(names)) != k or any("," in n or not n.strip() for n in names):
        raise UserError(f"--label_names: {len(names)} name(s) for the {k} label columns of {npz_path}; give {k} "
                        f"distinct names without commas, in the file's column order")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for split in SPLITS:
        labels = arrays[f"{split}_labels"]
        if not np.isin(labels, (0, 1)).all():
            raise UserError(f"--from_npz {npz_path}: {split}_labels holds values other than 0 and 1; "
                            f"multi-label arrays are 0/1 per finding")
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for i, (image, target) in enumerate(zip(arrays[f"{split}_images"], labels)):
            name = f"{split}/{split}_{i:05d}.png"
            Image.fromarray(to_uint8(image)).save(os.path.join(out_dir, name))
            rows.append((name, target, split))
    write_label_csv(os.path.join(out_dir, "labels.csv"), ",".join(["filename", "split"] + names),
                    [(f, s, *map(int, t)) for f, t, s in rows])
    shown = [(f, int(c) + 1, f) for f, t, _ in rows for c in (np.flatnonzero(t) if t.any() else [-1])]
    write_preview(out_dir, shown, ["no finding"] + names)
    return rows
