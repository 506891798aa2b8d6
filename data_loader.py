"""Images on disk -> tensors: readers, label files, splits, the decoded-image store, batch loaders,
augmentations, and the synthetic chest X-ray generator.

    python data_loader.py                                   # 500 synthetic images + labels.csv in ./data/medical_images
    python data_loader.py --num_images 200 --num_unlabeled 2000 --image_size 64 --output_dir ./data/small
    python data_loader.py --from_npz breastmnist.npz --output_dir ./data/breastmnist   # a MedMNIST file (README)
    python data_loader.py --multi_label --output_dir ./data/multilabel   # several findings per image

Unlabelled folders: `list_readable_images(data_dir)` (corrupt files skipped with one warning).
Labelled data: `read_label_table(...)` then `ImageStore(...)`, where a corrupt file is an error.
"""
import argparse
import csv
import os
import posixpath
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from utils import HelpFormatter, UserError, locks_output_dir, sha256_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


# ============ readers ============

def read_pixels(path: str) -> np.ndarray:
    """The stored pixel values of an image file: (H, W) or (H, W, 3).

    Bitmaps keep their own dtype (uint8, uint16 for 16-bit PNG/TIFF, int32 or float32 for 32-bit
    TIFF); alpha is dropped and palettes are expanded. DICOM returns the modality-rescaled,
    VOI-windowed image as float32 in [0, 1] (MONOCHROME1 inverted), or uint8 RGB for colour.
    """
    if path.lower().endswith(".dcm"):
        return _read_dicom(path)
    try:
        with Image.open(path) as im:
            im.seek(0)                      # first page of a multi-page TIFF
            return _pil_pixels(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({_reason(e)}); re-export it or remove it from the data")


def _pil_pixels(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I;16"):
        return np.array(im).astype(np.uint16)
    if im.mode in ("I", "F", "L"):
        return np.array(im)
    if im.mode in ("1", "LA", "La"):
        return np.array(im.convert("L"))
    if im.mode == "P":
        im = im.convert("RGBA")         # expands the palette, with its transparency if any
        if _palette_is_gray(im):
            return np.array(im.convert("L"))
    return np.array(im.convert("RGB"))


def _palette_is_gray(im: Image.Image) -> bool:
    """A palette image whose colours are all grays reads as (H, W), like the grayscale it is."""
    rgb = np.asarray(im)[..., :3]
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all())


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:120]


def _read_dicom(path: str) -> np.ndarray:
    """Modality LUT, then the stored window (else a 0.5-99.5 percentile one); colour stays RGB."""
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut  # noqa: F401  (pydicom >= 3 needed)
    except ImportError:
        raise UserError(f"{path}: reading DICOM needs pydicom; run `pip install pydicom`")
    try:
        return _dicom_pixels(pydicom.dcmread(path))
    except Exception as e:  # pydicom raises many types for truncated, compressed or non-DICOM files,
        # and a damaged header (frame count, LUT, window) fails in numpy or float() instead
        raise UserError(f"{path}: not a readable DICOM image ({_reason(e)}); re-export it or remove it "
                        f"from the data (compressed files may need `pip install pylibjpeg`)")


def _dicom_pixels(ds) -> np.ndarray:
    """The decoded frame (the middle one of several), LUTs and window applied."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[len(pixels) // 2]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:                   # pydicom already converted YBR to RGB
        return to_uint8(pixels)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    lo, hi = _dicom_window(ds, values)
    x = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if photometric == "MONOCHROME1":       # 0 means white in MONOCHROME1
        x = 1.0 - x
    return x.astype(np.float32)


def _dicom_window(ds, values: np.ndarray) -> tuple:
    """(low, high) from WindowCenter/WindowWidth (first of several), else robust percentiles."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c, w = _first_value(center), _first_value(width)
        if w > 0:
            return c - w / 2, c + w / 2
    lo, hi = np.percentile(values, [0.5, 99.5])
    return (float(lo), float(hi)) if hi > lo else (float(values.min()), float(values.max()))


def _first_value(v) -> float:
    return float(v[0]) if isinstance(v, Sequence) else float(v)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Any pixel array as uint8: floats in [0, 1] (windowed DICOM) map to 0-255; other wider data
    is stretched to its own min..max, so 16-bit images use the full range instead of clipping at 255."""
    if pixels.dtype == np.uint8:
        return pixels
    x = pixels.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.all():                   # float TIFFs may hold NaN/inf: range from the finite pixels,
        if not finite.any():               # NaN shown as black, +inf white, -inf black
            return np.zeros(pixels.shape, np.uint8)
        lo, hi = float(x[finite].min()), float(x[finite].max())
        x = np.where(np.isnan(x), lo, np.clip(x, lo, hi))
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(pixels.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    if hi <= lo:
        return np.zeros(pixels.shape, np.uint8)
    return np.round((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def load_image(path: str) -> np.ndarray:
    """Any supported file as uint8, (H, W) for grayscale or (H, W, 3) for colour."""
    return to_uint8(read_pixels(path))


def list_images(data_dir: str) -> list[str]:
    """Every supported image under `data_dir`, recursively, as sorted relative paths ('/'-separated).

    Hidden files (editor and macOS `._` droppings) and this tool's own preview.png are left out."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir}: no such folder; check the path")
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and name != "preview.png" and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(root, name), data_dir).replace(os.sep, "/"))
    if not found:
        raise UserError(f"--data_dir {data_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        f"in it and its subfolders)")
    return sorted(found)


def filter_readable(root: str, filenames: list, quiet: bool = False) -> tuple[list, list]:
    """(readable, skipped) filenames, decoding each once; prints one warning naming the skipped ones.

    For unlabelled folders, where a corrupt file should not stop pretraining. Labelled data must not
    be filtered silently: ImageStore raises a UserError naming the file instead."""
    kept, skipped = [], []
    for name in filenames:
        try:
            check_image_size(load_image(os.path.join(root, name)), name)
            kept.append(name)
        except UserError:
            skipped.append(name)
    if skipped and not quiet:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} unreadable image(s) under {root}: {shown}", file=sys.stderr)
    return kept, skipped


def list_readable_images(data_dir: str) -> list[str]:
    """The unlabelled dataset: every readable image under `data_dir` (corrupt ones skipped with a warning)."""
    kept, _ = filter_readable(data_dir, list_images(data_dir))
    if not kept:
        raise UserError(f"--data_dir {data_dir}: none of the images could be read; check the files")
    return kept


# ============ label files and splits ============

@dataclass
class LabelTable:
    filenames: list          # relative to data_dir
    labels: np.ndarray       # (N,) int64 in [0, num_classes)
    splits: np.ndarray       # (N,) 'train' | 'val' | 'test'
    patient_ids: np.ndarray  # (N,) str; one id per image when the file has no patient_id column
    class_names: list
    sha256: str
    task = "multiclass"      # a class attribute, not a field: MultiLabelTable says "multilabel"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str) -> np.ndarray:
        if split == "all":
            return np.arange(len(self.filenames))
        return np.flatnonzero(self.splits == split)


LABEL_COLUMNS = ("filename", "label", "split", "patient_id")
MAX_CLASSES = 10_000  # an integer label above this is a typo or an id column, not a class index
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}


def read_label_table(label_file: str, data_dir: str, num_classes: int | None = None, seed: int = 42,
                     val_fraction: float = 0.15, test_fraction: float = 0.15) -> LabelTable:
    """Read `filename,label[,split][,patient_id]` (header optional) and assign splits.

    Labels are integers or class names (sorted names become 0..K-1). A `split` column wins;
    otherwise `assign_splits` makes a seeded, stratified split grouped by patient. Every problem in
    the file is a UserError naming it."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir}: no such folder; check the path")
    df = _read_label_csv(label_file)
    labels, class_names = _parse_labels(df["label"], label_file, num_classes)
    filenames = _check_filenames(df["filename"], label_file, data_dir, df.attrs["first_line"])
    patients = _check_patients(df, label_file) if "patient_id" in df else np.array(filenames, dtype=str)
    if "split" in df:
        splits = _parse_splits(df["split"], label_file)
        _check_patients_in_one_split(patients, splits, label_file, df.attrs["first_line"], "patient_id" in df)
    else:
        splits = assign_splits(labels, patients, seed, val_fraction, test_fraction)
    _check_split_coverage(splits, labels, class_names, label_file)
    return LabelTable(filenames, labels, splits.astype(str), patients.astype(str), class_names,
                      sha256_file(label_file))


def _read_label_csv(label_file: str):
    """The label CSV as strings with named columns; a header is recognised by a `filename` or `label` cell."""
    import pandas as pd

    if not os.path.isfile(label_file):
        raise UserError(f"--label_file {label_file}: no such file; check the path")
    try:
        with open(label_file, encoding="utf-8-sig", newline="") as f:
            line = f.readline()
        # csv, not str.split: R and Excel quote header cells ("Filename","Label")
        first = [c.strip().lower() for c in next(csv.reader([line]), [])]
        has_header = "filename" in first or "label" in first
        df = pd.read_csv(label_file, header=0 if has_header else None, dtype=str, encoding="utf-8-sig",
                         skipinitialspace=True, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"--label_file {label_file}: the file is empty; write rows `filename,label`")
    except UnicodeDecodeError as e:
        where = "UTF-16" if e.object[:2] in (b"\xff\xfe", b"\xfe\xff") else \
            f"byte {e.object[e.start]:#04x} at offset {e.start}"
        raise UserError(f"--label_file {label_file}: not UTF-8 text ({where}); save it as UTF-8 "
                        f"(Excel: 'CSV UTF-8'; R: write.csv(..., fileEncoding = 'UTF-8'))")
    except (pd.errors.ParserError, csv.Error) as e:
        raise UserError(f"--label_file {label_file}: not a readable CSV ({_reason(e)}); write rows `filename,label`")
    df.attrs["first_line"] = 1 + has_header       # line number of the first data row, for messages
    if has_header:
        df.columns = [str(c).strip().lower() for c in df.columns]
        if "filename" not in df or "label" not in df:
            raise UserError(f"--label_file {label_file}: the header {','.join(df.columns)} lacks a filename or "
                            f"label column; name them `filename,label[,split][,patient_id]`")
    elif len(df.columns) > len(LABEL_COLUMNS):
        raise UserError(f"--label_file {label_file}: {len(df.columns)} columns and no header; add a header line "
                        f"naming them (filename,label,split,patient_id)")
    else:
        df.columns = list(LABEL_COLUMNS[: len(df.columns)])
    if df.empty:
        raise UserError(f"--label_file {label_file}: no rows; add lines `filename,label`")
    if "label" not in df:
        semicolons = ";" in line
        raise UserError(f"--label_file {label_file}: only one column; each row needs `filename,label`" +
                        (" (the columns are separated by ';': save it comma-separated)" if semicolons else ""))
    df = df.apply(lambda col: col.str.strip())
    blank = np.flatnonzero((df["filename"] == "").to_numpy() | (df["label"] == "").to_numpy())
    if len(blank):
        raise UserError(f"--label_file {label_file}: row {blank[0] + 1 + has_header} has an empty filename or "
                        f"label; fill it in or delete the row")
    return df


def _parse_labels(raw, label_file: str, num_classes: int | None) -> tuple[np.ndarray, list]:
    """(labels int64 (N,), class names): integers are taken as indices, anything else as sorted names."""
    if raw.str.fullmatch(r"-?\d+(\.0*)?").all():
        values = [int(s.split(".")[0]) for s in raw]       # int() takes any size (a float cast would wrap)
        n = num_classes if num_classes is not None else max(values) + 1
        bad = [v for v in values if not 0 <= v < n]
        if bad:
            raise UserError(f"--label_file {label_file}: label {bad[0]} is outside [0, {n}); "
                            f"fix the row or set --num_classes")
        if num_classes is None and n > MAX_CLASSES:
            raise UserError(f"--label_file {label_file}: label {max(values)} makes {n} classes; integer labels "
                            f"are class indices 0..K-1 (K <= {MAX_CLASSES}); renumber them or use class names")
        labels = np.array(values, dtype=np.int64)
        missing = sorted(set(range(n)) - set(values)) if n <= MAX_CLASSES else []
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            print(f"warning: {label_file}: no image has label {shown} of the {n} classes", file=sys.stderr)
        return labels, [str(i) for i in range(n)]
    class_names = sorted(raw.unique())
    if num_classes is not None and len(class_names) != num_classes:
        raise UserError(f"--label_file {label_file}: the labels name {len(class_names)} classes "
                        f"({', '.join(class_names[:6])}) but --num_classes is {num_classes}; make them agree")
    labels = raw.map({c: i for i, c in enumerate(class_names)}).to_numpy().astype(np.int64)
    return labels, class_names


def _check_filenames(col, label_file: str, data_dir: str, first_line: int = 1) -> list:
    """Filenames ('/'-separated, relative to data_dir, normalised) of existing files inside data_dir, each
    image once.

    A name may be relative, './'-prefixed, absolute or go through '..', as long as it stays inside
    --data_dir (a symlink inside it may point elsewhere). Two rows that reach the same file, under any
    names or through symlinks, are refused with both rows named: one image with two labels could land
    in train and in test. Normalised names compare equal to `list_images` names (train_ssl.py leaves
    the test split out by name)."""
    root = os.path.abspath(data_dir)
    filenames, first_row_of = [], {}
    for i, raw in enumerate(col.tolist()):
        row = i + first_line
        path = os.path.normpath(os.path.join(root, raw.replace("\\", "/")))
        if os.path.commonpath([root, path]) != root:
            raise UserError(f"--label_file {label_file}: row {row} names {raw!r}, which is outside --data_dir "
                            f"{data_dir}; give paths inside it (relative to it) or move the image there")
        name = os.path.relpath(path, root).replace(os.sep, "/")
        if not os.path.isfile(path):
            missing = sum(not os.path.isfile(os.path.join(root, f)) for f in col.tolist()[i:])
            raise UserError(f"--label_file {label_file}: {missing} file(s) not found under {data_dir}, first "
                            f"{name!r} (row {row}); fix the path (relative to --data_dir) or remove the row")
        real = os.path.realpath(path)
        if real in first_row_of:
            j = first_row_of[real]
            raise UserError(f"--label_file {label_file}: rows {j + first_line} ({col.iloc[j]!r}) and {row} ({raw!r}) "
                            f"name the same image; keep one row per image")
        first_row_of[real] = i
        filenames.append(name)
    return filenames


def _check_patients(df, label_file: str) -> np.ndarray:
    """patient_id cells, none blank: blank cells pooled into one pseudo-patient would put unrelated images
    in one group, and leaving them out would drop labelled images silently."""
    patients = df["patient_id"].to_numpy(str)
    blank = np.flatnonzero(patients == "") + df.attrs["first_line"]
    if len(blank):
        shown = ", ".join(map(str, blank[:5])) + (f" and {len(blank) - 5} more" if len(blank) > 5 else "")
        raise UserError(f"--label_file {label_file}: {len(blank)} row(s) have an empty patient_id (row {shown}); "
                        f"fill them in (an image of unknown patient can get an id of its own, e.g. its filename)")
    return patients


def _check_patients_in_one_split(patients, splits, label_file: str, first_line: int, by_patient: bool) -> None:
    """A patient with images in two splits leaks between training and testing: refuse, naming the rows."""
    import pandas as pd

    if not by_patient:
        return
    per_patient = pd.Series(splits).groupby(patients).nunique()     # one pass: label files of 100k rows
    straddling = per_patient[per_patient > 1]
    if len(straddling):
        patient = straddling.index[0]
        rows = np.flatnonzero(patients == patient)
        where = ", ".join(f"row {r + first_line} {splits[r]}" for r in rows[:4])
        raise UserError(f"--label_file {label_file}: patient {str(patient)!r} has images in {straddling.iloc[0]} "
                        f"splits ({where}); put all of a patient's images in one split")


def _parse_splits(col, label_file: str) -> np.ndarray:
    splits = col.str.lower().map(lambda s: SPLIT_ALIASES.get(s, s)).to_numpy(str)
    unknown = [str(s) for s in splits if s not in SPLITS]
    if unknown:
        raise UserError(f"--label_file {label_file}: unknown split {unknown[0]!r}; use train, val or test")
    return splits


def _check_split_coverage(splits: np.ndarray, labels: np.ndarray, class_names: list, label_file: str) -> None:
    """No train split is an error; an empty val/test split or a class absent from train is a warning."""
    if not (splits == "train").any():
        raise UserError(f"--label_file {label_file}: the train split is empty; mark some rows `train`")
    for split in ("val", "test"):
        if not (splits == split).any():
            print(f"warning: {label_file}: the {split} split is empty", file=sys.stderr)
    absent = sorted(set(np.unique(labels)) - set(np.unique(labels[splits == "train"])))
    if absent:
        names = ", ".join(class_names[c] for c in absent)
        print(f"warning: {label_file}: class(es) {names} have no training image", file=sys.stderr)


def read_class_names(label_file: str, class_names: list) -> list:
    """Readable names for `class_names`: integer labels take their names from classes.txt beside the label
    file (lines `index<TAB>name[: description]`, or one name per line in class order); names stay as they are."""
    names = [str(c) for c in class_names]
    path = os.path.join(os.path.dirname(os.path.abspath(label_file)), "classes.txt")
    if not all(n.lstrip("-").isdigit() for n in names) or not os.path.isfile(path):
        return names
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError):
        return names
    found = {}
    for i, line in enumerate(lines):
        index, sep, rest = line.partition("\t")
        key, text = (index.strip(), rest) if sep and index.strip().isdigit() else (str(i), line)
        found[key] = text.split(":")[0].strip() or key
    return [found.get(n, n) for n in names]


def read_findings(data_dir: str) -> dict | None:
    """{filename: [(x0, y0, x1, y1), ...]} from findings.csv in `data_dir` (the synthetic generator writes
    it: pixel boxes of where each finding was drawn, ends exclusive), or None when the folder has none."""
    import pandas as pd

    path = os.path.join(data_dir, FINDINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        df = pd.read_csv(path, dtype={"filename": str})
        boxes = {}
        for row in df.itertuples(index=False):
            boxes.setdefault(posixpath.normpath(row.filename), []).append(
                (int(row.x0), int(row.y0), int(row.x1), int(row.y1)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, AttributeError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable findings file ({_reason(e)}); expected "
                        f"filename,finding,x0,y0,x1,y1 rows, or delete it")
    return boxes


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


# ============ multi-label label files (several findings per image) ============
#
# Two layouts, told apart by the header (a multi-label file needs one):
#   pipe:    filename,labels[,split][,patient_id]   labels = finding names joined by '|', 'No Finding' = none
#            (ChestX-ray14's Data_Entry_2017.csv also reads: Image Index, Finding Labels, Patient ID)
#   columns: filename,<finding 1>,<finding 2>,...    one cell per finding: 1, 0, -1 (uncertain) or blank
#            (CheXpert's train.csv also reads: Path, Sex, Age, Frontal/Lateral, AP/PA are skipped)
# Targets are float32 (N, K): 1 present, 0 absent, IGNORED for a cell left out of the loss and the metrics.

TASKS = ("auto", "multiclass", "multilabel")
UNCERTAIN_POLICIES = ("ignore", "zero", "one")   # what a CheXpert -1 becomes: masked out, absent, present
IGNORED = -1.0
NO_FINDING = "no finding"
FILENAME_HEADERS = ("filename", "path", "image index")          # ours, CheXpert's, ChestX-ray14's
LABELS_HEADERS = ("labels", "finding labels")
PATIENT_HEADERS = ("patient_id", "patient id")
METADATA_HEADERS = ("sex", "age", "frontal/lateral", "ap/pa", "view position", "follow-up #", "patient age",
                    "patient gender", "study", "study_id", "view")   # columns of public files that are no finding
# a blank CheXpert cell means the report did not mention the finding: negative, as in CheXpert's own baselines
FINDING_CELLS = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": 0.0, "-1": None, "-1.0": None}
UNCERTAIN_VALUE = {"ignore": IGNORED, "zero": 0.0, "one": 1.0}


@dataclass
class MultiLabelTable(LabelTable):
    """A LabelTable whose `labels` are float32 targets (N, K) over the findings `class_names`."""
    label_format: str = "pipe"   # "pipe" or "columns"
    uncertain: str = "ignore"
    task = "multilabel"


def label_file_format(label_file: str) -> str:
    """'classes' (one label per image), 'pipe' or 'columns' (multi-label), from the header alone."""
    import csv

    try:
        with open(label_file, encoding="utf-8-sig", newline="") as f:
            header = [c.strip().lower() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError):
        return "classes"                     # read_label_table names the problem
    if any(h in LABELS_HEADERS for h in header):
        return "pipe"
    if "label" in header or not any(h in FILENAME_HEADERS for h in header):
        return "classes"
    # two or more: a `filename,class` file is a one-label file with a misnamed column, not one finding
    return "columns" if len(_finding_columns(header)) >= 2 else "classes"


def _finding_columns(header: list) -> list:
    skip = FILENAME_HEADERS + LABELS_HEADERS + PATIENT_HEADERS + METADATA_HEADERS + ("split", "label")
    return [i for i, h in enumerate(header) if h.strip().lower() not in skip and h.strip()]


def load_label_table(label_file: str, data_dir: str, task: str = "auto", uncertain: str = "ignore",
                     num_classes: int | None = None, seed: int = 42, val_fraction: float = 0.15,
                     test_fraction: float = 0.15) -> LabelTable:
    """read_label_table for one-label files, read_multilabel_table for multi-label ones; `task` forces."""
    fmt = label_file_format(label_file)
    if task == "multiclass" and fmt != "classes":
        raise UserError(f"--label_file {label_file}: its header makes it a multi-label file ({fmt} layout) but "
                        f"--task is multiclass; drop --task or write one `label` per row")
    if task == "multiclass" or (task == "auto" and fmt == "classes"):
        return read_label_table(label_file, data_dir, num_classes, seed, val_fraction, test_fraction)
    table = read_multilabel_table(label_file, data_dir, uncertain, seed, val_fraction, test_fraction)
    if num_classes is not None and num_classes != table.num_classes:
        raise UserError(f"--num_classes {num_classes}: {label_file} names {table.num_classes} findings "
                        f"({', '.join(table.class_names[:6])}); make them agree or drop --num_classes")
    return table


def describe_table(table: LabelTable) -> str:
    """One line for the log: what kind of label file was detected."""
    if table.task != "multilabel":
        return f"labels: one class per image, {table.num_classes} classes"
    layout = ("a |-separated list of findings per row (ChestX-ray14 style)" if table.label_format == "pipe"
              else "one 1/0/-1 column per finding (CheXpert style)")
    counted = table.labels != IGNORED
    prevalence = ", ".join(f"{n} {100 * (table.labels[:, k] == 1).mean():.0f}%"
                           for k, n in enumerate(table.class_names))
    uncertain = int((~counted).sum())
    return (f"labels: multi-label, {layout}; {table.num_classes} findings ({prevalence} of images); "
            f"--uncertain {table.uncertain}" + (f": {uncertain} cells ignored" if uncertain else ""))


def read_multilabel_table(label_file: str, data_dir: str, uncertain: str = "ignore", seed: int = 42,
                          val_fraction: float = 0.15, test_fraction: float = 0.15) -> MultiLabelTable:
    """A multi-label file of either layout, with splits grouped by patient (assign_multilabel_splits).
    Every problem is a UserError naming the row and column."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir}: no such folder; check the path")
    df, fmt, findings = _read_multilabel_csv(label_file)
    if fmt == "pipe":
        targets, names = _parse_finding_lists(df["labels"], label_file, findings[0])
    else:
        targets, names = _parse_finding_columns(df, findings, label_file, uncertain)
    df.attrs.setdefault("first_line", 2)                               # the header is line 1
    filenames = _check_filenames(df["filename"], label_file, data_dir, df.attrs["first_line"])
    patients = _check_patients(df, label_file) if "patient_id" in df else _patients_from_paths(filenames)
    if "split" in df:
        splits = _parse_splits(df["split"], label_file)
        _check_patients_in_one_split(patients, splits, label_file, df.attrs["first_line"], True)
    else:
        # from the certain cells only: --uncertain must not move images between splits (train_ssl.py, which
        # has no --uncertain, leaves the test split out of pretraining)
        certain = targets if fmt == "pipe" or uncertain == "ignore" else \
            _parse_finding_columns(df, findings, label_file, "ignore")[0]
        splits = assign_multilabel_splits(certain, patients, seed, val_fraction, test_fraction)
    _check_finding_coverage(splits, targets, names, label_file)
    return MultiLabelTable(filenames, targets, splits.astype(str), patients.astype(str), names,
                           sha256_file(label_file), fmt, uncertain)


def _read_multilabel_csv(label_file: str):
    """(strings with canonical filename/labels/split/patient_id columns, layout, finding column names).
    A `label` column counts as a `labels` one: only --task multilabel sends such a file here."""
    import pandas as pd

    if not os.path.isfile(label_file):
        raise UserError(f"--label_file {label_file}: no such file; check the path")
    try:
        df = pd.read_csv(label_file, header=0, dtype=str, encoding="utf-8-sig", skipinitialspace=True,
                         keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"--label_file {label_file}: not a readable CSV ({_reason(e)})")
    df.columns = columns = [str(c).strip() for c in df.columns]
    lower = [c.lower() for c in columns]
    rename = {}
    for canonical, aliases in (("filename", FILENAME_HEADERS), ("labels", LABELS_HEADERS + ("label",)),
                               ("split", ("split",)), ("patient_id", PATIENT_HEADERS)):
        hits = [c for c, low in zip(columns, lower) if low in aliases]
        if hits:
            rename[hits[0]] = canonical
    if "filename" not in rename.values():
        raise UserError(f"--label_file {label_file}: no filename column in the header {','.join(columns)}; "
                        f"name it filename (or Path, Image Index)")
    fmt = "pipe" if "labels" in rename.values() else "columns"
    findings = ([c for c, v in rename.items() if v == "labels"] if fmt == "pipe"
                else [columns[i] for i in _finding_columns(lower)])
    if not findings:
        raise UserError(f"--label_file {label_file}: no finding columns; add one 1/0 column per finding or a "
                        f"`labels` column of |-separated findings")
    if df.empty:
        raise UserError(f"--label_file {label_file}: no rows; add one line per image")
    df = df.rename(columns=rename).apply(lambda col: col.str.strip())
    return df, fmt, findings


def _parse_finding_lists(col, label_file: str, column: str) -> tuple[np.ndarray, list]:
    """'Effusion|Cardiomegaly' cells -> (targets (N, K) float32, sorted finding names)."""
    lists = []
    for row, cell in enumerate(col.tolist()):
        parts = [p.strip() for p in cell.split("|")]
        where = f"--label_file {label_file}: row {row + 2}, column {column!r}"
        if cell == "" or "" in parts:
            raise UserError(f"{where} has an empty finding ({cell!r}); write the names joined by '|', or "
                            f"'No Finding' for an image without findings")
        named = [p for p in parts if p.lower() != NO_FINDING]
        if named and len(named) < len(parts):
            raise UserError(f"{where} is {cell!r}: 'No Finding' together with a finding; keep one of them")
        lists.append(named)
    names = sorted({p for parts in lists for p in parts})
    if not names:
        raise UserError(f"--label_file {label_file}: every row is 'No Finding'; a multi-label file needs findings")
    index = {n: k for k, n in enumerate(names)}
    targets = np.zeros((len(lists), len(names)), dtype=np.float32)
    for i, parts in enumerate(lists):
        targets[i, [index[p] for p in parts]] = 1.0
    return targets, names


def _parse_finding_columns(df, findings: list, label_file: str, uncertain: str) -> tuple[np.ndarray, list]:
    """One 1/0/-1/blank column per finding -> (targets (N, K) float32, names in file order)."""
    values = df[findings].to_numpy(str)
    bad = ~np.isin(values, list(FINDING_CELLS))
    if bad.any():
        row, k = np.argwhere(bad)[0]
        raise UserError(f"--label_file {label_file}: row {row + 2}, column {findings[k]!r} holds "
                        f"{str(values[row, k])!r}; a finding cell is 1, 0, -1 (uncertain) or empty (not mentioned), "
                        f"or drop that column")
    lookup = {s: (UNCERTAIN_VALUE[uncertain] if v is None else v) for s, v in FINDING_CELLS.items()}
    targets = np.vectorize(lookup.get, otypes=[np.float32])(values)
    return targets.reshape(len(df), len(findings)), list(findings)


def _patients_from_paths(filenames: list) -> np.ndarray:
    """CheXpert paths name the patient (…/patient00001/study1/…); otherwise one patient per image."""
    import re

    ids = [re.search(r"(?:^|/)(patient\d+)/", f) for f in filenames]
    return np.array([m.group(1) if m else f for m, f in zip(ids, filenames)], dtype=str)


def _check_finding_coverage(splits, targets, names: list, label_file: str) -> None:
    """No train split is an error; a finding with no positive image in train or val is a warning."""
    if not (splits == "train").any():
        raise UserError(f"--label_file {label_file}: the train split is empty; mark some rows `train`")
    for split in ("train", "val", "test"):
        rows = splits == split
        if not rows.any():
            print(f"warning: {label_file}: the {split} split is empty", file=sys.stderr)
            continue
        absent = [n for k, n in enumerate(names) if not (targets[rows, k] == 1).any()]
        if absent:
            print(f"warning: {label_file}: no {split} image has finding(s) {', '.join(absent)}"
                  + ("; their AUC there is undefined" if split != "train" else ""), file=sys.stderr)


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

# ============ decoded images and batches ============

MIN_IMAGE_SIDE = 8   # pixels: a smaller "image" (a 1x1 placeholder, an icon) upsampled is a flat square


def check_image_size(pixels: np.ndarray, path: str) -> np.ndarray:
    """`pixels` when both sides are at least MIN_IMAGE_SIDE, else a UserError naming the file."""
    h, w = pixels.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise UserError(f"{path}: the image is {w}x{h} pixels, too small to learn from (at least {MIN_IMAGE_SIDE} "
                        f"px a side); remove it from the data (a placeholder or an icon?)")
    return pixels


def decode_to_tensor(path: str, image_size: int, channels: int) -> torch.Tensor:
    """Read, convert to `channels`, resize to image_size x image_size: uint8 (C, S, S)."""
    pixels = check_image_size(load_image(path), path)
    im = Image.fromarray(pixels)
    im = im.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
    arr = np.array(im)                      # a writable copy; PIL's buffer is read-only
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class ImageStore(torch.utils.data.Dataset):
    """Images decoded once to uint8 (C, S, S); kept in RAM when they fit in `cache_gb`.

    Labelled data (the default): an unreadable file is a UserError naming it, since dropping it
    would silently shift the labels. Unlabelled data: pass `skip_unreadable=True` (or filter the
    list first with `filter_readable` / `list_readable_images`); skipped files are named in one
    warning and removed from `self.filenames`. A streaming store (larger than `cache_gb`) decodes
    lazily, so there an unreadable file raises only when it is reached."""

    def __init__(self, root: str, filenames: list, image_size: int, cache_gb: float = 4.0,
                 channels: int | None = None, skip_unreadable: bool = False):
        self.root, self.filenames, self.image_size = root, list(filenames), image_size
        self.channels = channels or self._guess_channels()
        need_gb = len(self.filenames) * self.channels * image_size * image_size / 2**30
        self.in_memory = need_gb <= cache_gb
        if not self.in_memory and skip_unreadable:
            self.filenames, _ = filter_readable(root, self.filenames)
        self.images = None
        if self.in_memory:
            self.images = self._decode_all(skip_unreadable)

    def _decode_all(self, skip_unreadable: bool) -> torch.Tensor:
        """Every image decoded straight into one preallocated uint8 tensor: the cache is never held twice."""
        images = torch.empty(len(self.filenames), self.channels, self.image_size, self.image_size, dtype=torch.uint8)

        def fill(i: int) -> bool:
            image = self._decode_or_none(i, skip_unreadable)
            if image is not None:
                images[i] = image
            return image is not None

        # PIL releases the GIL while decoding, so threads give a real speed-up on big folders
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            ok = list(pool.map(fill, range(len(self.filenames))))
        if all(ok):
            return images
        skipped = [f for f, good in zip(self.filenames, ok) if not good]
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} unreadable image(s) under {self.root}: {shown}", file=sys.stderr)
        kept = [i for i, good in enumerate(ok) if good]
        if not kept:
            raise UserError(f"{self.root}: none of the images could be used (unreadable or too small, see the "
                            f"warning above); check the files")
        self.filenames = [self.filenames[i] for i in kept]
        for j, i in enumerate(kept):  # compact in place, no second copy
            images[j] = images[i]
        return images[:len(kept)]

    def _decode_or_none(self, i: int, skip_unreadable: bool):
        try:
            return self._decode(i)
        except UserError:
            if skip_unreadable:
                return None
            raise

    def _guess_channels(self) -> int:
        """3 when any of the first readable images has real colour, else 1."""
        for name in self.filenames[:16]:
            try:
                arr = load_image(os.path.join(self.root, name))
            except UserError:
                continue
            if arr.ndim == 3 and not (np.array_equal(arr[..., 0], arr[..., 1])
                                      and np.array_equal(arr[..., 0], arr[..., 2])):
                return 3
        return 1

    def _decode(self, i: int) -> torch.Tensor:
        return decode_to_tensor(os.path.join(self.root, self.filenames[i]), self.image_size, self.channels)

    def __len__(self):
        return len(self.filenames)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i] if self.images is not None else self._decode(i)


class BatchLoader:
    """Yields (images uint8 (B, C, S, S), labels int64 (B,) or float32 (B, K), indices int64 (B,)) over `indices`.

    In-memory stores are sliced directly (no per-image collation); streaming stores go through a
    DataLoader with workers. `set_epoch` reshuffles deterministically; rank/world shard the epoch.
    """

    def __init__(self, store: ImageStore, indices, labels=None, batch_size: int = 64, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        self.store, self.indices = store, torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        labels = np.asarray(labels if labels is not None else np.full(len(store), -1))
        # multi-label targets (N, K) stay float: 1, 0 and -1 for an ignored cell
        self.labels = torch.as_tensor(labels, dtype=torch.float32 if labels.dtype.kind == "f" else torch.int64)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.num_workers, self.rank, self.world_size, self.pin_memory = num_workers, rank, world_size, pin_memory
        self.epoch = 0
        self._streaming = None      # the DataLoader of a streaming store, built once: its workers outlive epochs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = order[torch.randperm(len(order), generator=g)]
        if self.world_size > 1:  # every rank gets the same number of images (pad by wrapping)
            per_rank = -(-len(order) // self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - len(order)]])
            order = order[self.rank::self.world_size]
        return order

    def _batches(self):
        order = self._order()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __len__(self):
        return len(self._batches())

    def __iter__(self):
        batches = self._batches()
        if self.store.in_memory:
            for idx in batches:
                images = self.store.images[idx]
                yield (images.pin_memory() if self.pin_memory else images), self.labels[idx], idx
            return
        if self._streaming is None:
            # persistent workers: starting them every epoch cost more than the epoch on small data and many
            # workers (the benchmark's streaming path ran at a quarter of PIL's with 12 on a GPU machine).
            # The batch sampler is read again each epoch, so set_epoch still reshuffles.
            self._streaming = torch.utils.data.DataLoader(
                self.store, batch_sampler=_EpochBatches(self), num_workers=self.num_workers,
                pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        for idx, images in zip(batches, self._streaming):
            yield images, self.labels[idx], idx


class _EpochBatches:
    """A BatchLoader's batches of its current epoch, as a DataLoader batch sampler (lists of indices)."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __iter__(self):
        return (b.tolist() for b in self.loader._batches())

    def __len__(self):
        return len(self.loader)


# ============ augmentations ============

AUGMENT_MODES = ("batch", "pil")  # --augment: whole batches on the device, or torchvision per image (reference)
ROTATION_FILLS = ("zeros", "reflection")  # what fills the corners a rotation brings in (AugmentConfig.rotation_fill)


@dataclass
class AugmentConfig:
    """Parameters of the augmentation pipelines (the spec's values are the defaults of SSL_AUGMENT)."""
    crop_scale: tuple = (0.8, 1.0)  # area fraction of the crop, uniform
    crop_ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio w/h, log-uniform
    hflip_p: float = 0.5
    rotation: float = 15.0       # degrees, uniform in [-rotation, rotation]
    rotation_fill: str = "zeros"  # corners rotated in from outside: "zeros" (RandomRotation's) or "reflection"
    brightness: float = 0.3      # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.3        # factor uniform in [1 - c, 1 + c], blended with the grayscale mean
    blur_p: float = 0.3
    blur_sigma: tuple = (0.1, 2.0)  # at 224 px; scaled with the image size
    gamma: float = 0.0           # exponent log-uniform in [1 / (1 + g), 1 + g]; 0: off (the spec has none)


SSL_AUGMENT = AugmentConfig()
SUPERVISED_AUGMENT = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=10.0, brightness=0.2,
                                   contrast=0.2, blur_p=0.0)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 crops, then falls back to a centre crop
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale, used for the contrast mean


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side (SimCLR), odd, at least 3."""
    k = max(3, int(round(image_size * 0.1)))
    return k + 1 - k % 2


def blur_sigma_range(config: AugmentConfig, image_size: int) -> tuple:
    """The spec's sigma range is for 224 px; a fixed 23 px kernel with sigma 2 erases a 32 px image,
    so the sigma scales with the side and blurs every size as much as 224 px would be blurred."""
    return tuple(s * image_size / 224.0 for s in config.blur_sigma)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (B, C, S, S), C in {1, 3} -> ImageNet-normalised float (B, 3, S, S)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std  # a 1-channel batch broadcasts to 3 channels here


class BatchAugment(nn.Module):
    """Augment a whole batch on its own device with per-sample random parameters, in the order of
    the spec's PIL pipeline (build_pil_transform) and with the same parameter distributions:

    crop (RandomResizedCrop), flip and rotation (zero fill) -> one affine warp, one grid_sample;
    brightness and contrast in a random order per sample (ColorJitter), clamped after each;
    with config.gamma > 0, a random gamma (x ** g, the grayscale stand-in for SimCLR's colour distortion);
    Gaussian blur with probability blur_p, sigma per sample; ImageNet normalisation.

    forward(images: uint8 (B, C, H, W) or float in [0, 1], C in {1, 3}, generator=None)
    -> float (B, 3, S, S). A 1-channel batch stays 1-channel until the normalisation.

    With a generator on the images' device (a CUDA one) the parameters are drawn there and never
    visit the host: nothing in the call waits for the GPU, and the call can be captured in a CUDA
    graph (train_ssl.py --cuda_graphs on). The constants it needs are made once per device.
    """

    def __init__(self, config: AugmentConfig, image_size: int, channels_last: bool = False):
        super().__init__()
        self.config, self.image_size, self.channels_last = config, image_size, channels_last
        self.kernel_size = blur_kernel_size(image_size)
        self.sigma_range = blur_sigma_range(config, image_size)
        self._constants = {}      # device -> tensors: made while capturing, a host-to-device copy would fail

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply_params(images, _to_device(params, images.device))

    def sample_params(self, b: int, height: int, width: int, generator: torch.Generator | None = None) -> dict:
        """Per-sample parameters (B,) drawn from `generator`, on its device (default: torch's global CPU
        RNG, so a seed gives the same augmentations whatever the images' device). The same code draws
        on every device: only the random stream differs between a CPU and a CUDA generator."""
        c, n = self.config, CROP_ATTEMPTS
        device = generator.device if generator is not None else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64      # MPS has no float64
        u = torch.rand(b, 2 * n + 9, generator=generator, dtype=dtype, device=device)
        off_x, off_y, flip, angle, bright, contrast, order, blur, sigma = u[:, 2 * n:].unbind(1)
        crop_w, crop_h, crop_cx, crop_cy = self._crop(u[:, :n], u[:, n:2 * n], off_x, off_y, height, width)
        extra = {}
        if c.gamma > 0:   # drawn after the others, so turning it on leaves their values for a seed as they were
            u_gamma = torch.rand(b, generator=generator, dtype=dtype, device=device)
            extra["gamma"] = torch.exp(_lerp(u_gamma, -np.log1p(c.gamma), np.log1p(c.gamma))).float()
        return dict(**extra,
            crop_w=crop_w.float(), crop_h=crop_h.float(), crop_cx=crop_cx.float(), crop_cy=crop_cy.float(),
            flip=flip < c.hflip_p,
            angle=_lerp(angle, -c.rotation, c.rotation).float(),                # degrees, counter-clockwise
            brightness=_lerp(bright, max(0.0, 1 - c.brightness), 1 + c.brightness).float(),
            contrast=_lerp(contrast, max(0.0, 1 - c.contrast), 1 + c.contrast).float(),
            contrast_first=order < 0.5,
            blur=blur < c.blur_p,
            sigma=_lerp(sigma, *self.sigma_range).float(),                      # output pixels
        )

    def _crop(self, u_scale, u_ratio, u_x, u_y, height, width):
        """RandomResizedCrop.get_params, vectorised: the first of 10 candidates (area fraction uniform,
        aspect log-uniform, sides rounded to whole pixels) that fits inside the image, else torchvision's
        centre-crop fallback; the offset is a whole pixel, uniform over every position that fits.
        Returns the crop's width, height (fractions of the side) and centre (normalised, [-1, 1])."""
        c = self.config
        area = height * width * (c.crop_scale[0] + (c.crop_scale[1] - c.crop_scale[0]) * u_scale)  # (B, 10)
        lo, hi = np.log(c.crop_ratio[0]), np.log(c.crop_ratio[1])
        ratio = torch.exp(lo + (hi - lo) * u_ratio)
        w, h = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
        in_ratio = width / height
        fallback = ((width, round(width / c.crop_ratio[0])) if in_ratio < c.crop_ratio[0] else
                    (round(height * c.crop_ratio[1]), height) if in_ratio > c.crop_ratio[1] else (width, height))
        any_ok = ok.any(dim=1)
        w = torch.where(any_ok, w.gather(1, first).squeeze(1), float(fallback[0]))
        h = torch.where(any_ok, h.gather(1, first).squeeze(1), float(fallback[1]))
        left = torch.where(any_ok, torch.floor(u_x * (width - w + 1)), (width - w) // 2)
        top = torch.where(any_ok, torch.floor(u_y * (height - h + 1)), (height - h) // 2)
        return w / width, h / height, (2 * left + w) / width - 1, (2 * top + h) / height - 1

    def apply_params(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """The augmentation with given parameters (see sample_params), on the device of `images`.
        (Not `apply`: nn.Module.apply(fn) must keep working.)
        Always fp32, also inside the trainer's autocast: bf16 keeps 8 bits, no more than the uint8 input
        it came from, and on a CPU without bf16 instructions it is slower."""
        with torch.autocast(images.device.type, enabled=False):
            scale = 1 / 255 if images.dtype == torch.uint8 else 1.0  # folded into the jitter: one pass less
            x = self._warp(images.float(), p)                               # (B, C, S, S), new tensor
            x = self._jitter(x, p, scale)
            if "gamma" in p:
                x = x.clamp_(min=1e-8).pow_(p["gamma"].view(-1, 1, 1, 1))
            if self.config.blur_p > 0:
                x = self._blur_subset(x, p)
            return self._normalize(x)

    def _warp(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Output pixel o (normalised, [-1, 1]^2) shows the cropped image at q = flip(R(-angle) o), which
        is the input at centre + (w, h) * q; q outside [-1, 1]^2 was outside the crop: zero, as
        RandomRotation fills (rotation_fill "reflection": the image there, mirrored at its edges).
        Crop, flip and rotation cost one bilinear resampling instead of three."""
        b, s = x.shape[0], self.image_size
        a = p["angle"] * (np.pi / 180)
        cos, sin = a.cos(), a.sin()
        sign = 1 - 2 * p["flip"].to(x.dtype)
        rot_t = torch.stack([cos * sign, sin, -sin * sign, cos], dim=1).view(b, 2, 2)   # (flip R)^T
        # pixel centres, as affine_grid(align_corners=False) makes them, but (S*S, 2) instead of (B, S, S, 3)
        t = (torch.arange(s, device=x.device, dtype=x.dtype) * 2 + 1) / s - 1
        base = torch.stack(torch.meshgrid(t, t, indexing="xy"), dim=-1).view(1, s * s, 2)
        q = (base @ rot_t).view(b, s, s, 2)                                # (B, S, S, 2)
        size = torch.stack([p["crop_w"], p["crop_h"]], dim=1).view(b, 1, 1, 2)
        centre = torch.stack([p["crop_cx"], p["crop_cy"]], dim=1).view(b, 1, 1, 2)
        grid = torch.addcmul(centre, q, size)
        if self.config.rotation_fill == "reflection":                     # the image mirrored at its edges
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.config.rotation > 0:
            outside = q.abs().amax(dim=-1, keepdim=True) > 1   # (linalg.vector_norm(inf) is 30x slower on CPU)
            grid.masked_fill_(outside, -2.0)                                # -2 is off the image: zero
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _jitter(self, x: torch.Tensor, p: dict, scale: float = 1.0) -> torch.Tensor:
        """ColorJitter(brightness, contrast) on scale * x: the two in a random order per sample, each
        clamped to [0, 1]. Both are x -> clamp(f * x + (1 - f) * target); brightness blends with black,
        contrast with the image's grayscale mean, so one multiply-add per step serves both orders."""
        b = x.shape[0]
        first = p["contrast_first"].view(b, 1, 1, 1)
        f1 = torch.where(first, p["contrast"].view(b, 1, 1, 1), p["brightness"].view(b, 1, 1, 1))
        f2 = torch.where(first, p["brightness"].view(b, 1, 1, 1), p["contrast"].view(b, 1, 1, 1))
        gray = self._constant("gray", x.device)
        t1 = torch.where(first, _gray_mean(x, gray) * scale, 0.0)
        x = torch.addcmul(t1 * (1 - f1), x, f1 * scale).clamp_(0, 1)
        t2 = torch.where(first, 0.0, _gray_mean(x, gray))
        return torch.addcmul(t2 * (1 - f2), x, f2, out=x).clamp_(0, 1)

    def _blur_subset(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Blur the chosen samples (a third of the batch). On a CPU only those are computed; on a GPU
        all are, and a mask keeps the chosen ones: picking them (nonzero) would wait for the device."""
        if x.device.type != "cpu":
            return self._blur_masked(x, p)
        idx = p["blur"].nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        return x.index_copy_(0, idx, gaussian_blur_batch(x.index_select(0, idx), p["sigma"][idx], self.kernel_size))

    def _blur_masked(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return torch.where(p["blur"].view(-1, 1, 1, 1), gaussian_blur_batch(x, p["sigma"], self.kernel_size), x)

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """Small constant tensors, made on each device once (not in every call, and never while capturing)."""
        if device not in self._constants:
            self._constants[device] = {
                "inv_std": torch.tensor([1 / s for s in IMAGENET_STD], device=device).view(1, 3, 1, 1),
                "shift": torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
                                      device=device).view(1, 3, 1, 1),
                "gray": torch.tensor(GRAY_WEIGHTS, device=device).view(1, 3, 1, 1)}
        return self._constants[device][name]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation as one multiply-add that also expands 1 channel to 3."""
        b, _, h, w = x.shape
        inv_std, shift = self._constant("inv_std", x.device), self._constant("shift", x.device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((b, 3, h, w), device=x.device, memory_format=fmt)
        return torch.addcmul(shift, x, inv_std, out=out)


def _to_device(params: dict, device: torch.device) -> dict:
    """The (B,) parameter tensors on `device` in one pinned copy instead of one small copy each."""
    if all(v.device == device for v in params.values()):     # on the CPU, or drawn on the device
        return params
    names = list(params)
    packed = torch.stack([params[k].float() for k in names], dim=1)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    return {k: (col > 0.5 if params[k].dtype == torch.bool else col) for k, col in zip(names, packed.unbind(1))}


def _lerp(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * t


def _gray_mean(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the grayscale image per sample: (B, C, H, W) -> (B, 1, 1, 1); `weights`: GRAY_WEIGHTS
    as a (1, 3, 1, 1) tensor on x's device, when the caller keeps one."""
    m = x.mean(dim=(2, 3), keepdim=True)
    if x.shape[1] == 3:
        if weights is None:
            weights = torch.tensor(GRAY_WEIGHTS, device=x.device).view(1, 3, 1, 1)
        m = (m * weights.to(x.dtype)).sum(1, keepdim=True)
    return m


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, separable kernel) with one sigma per sample.

    Each 1-D blur is a banded (S, S) matrix with the reflection folded in, so the two passes are
    two batched matmuls (BLAS) instead of a depthwise convolution with B*C groups.
    x: (B, C, H, W) float, sigma: (B,) -> (B, C, H, W)."""
    rows = _blur_matrix(sigma, kernel_size, x.shape[-2], x.dtype)          # (B, H, H)
    cols = rows if x.shape[-1] == x.shape[-2] else _blur_matrix(sigma, kernel_size, x.shape[-1], x.dtype)
    return rows.unsqueeze(1) @ x @ cols.transpose(1, 2).unsqueeze(1)


def _blur_matrix(sigma: torch.Tensor, k: int, n: int, dtype) -> torch.Tensor:
    """(B, n, n) matrices M with (M @ v)[i] = sum_j g_j v[reflect(i + j - k // 2)]."""
    r = k // 2
    taps = torch.arange(k, device=sigma.device, dtype=dtype) - r
    g = torch.exp(-0.5 * (taps / sigma.to(dtype).view(-1, 1)) ** 2)
    g = g / g.sum(dim=1, keepdim=True)                                     # (B, k)
    src = torch.arange(n, device=sigma.device).view(n, 1) + taps.long().view(1, k)
    src = src.abs()                                                        # reflect at 0 (no edge repeat)
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src).clamp(0, n - 1)
    m = torch.zeros(sigma.shape[0], n, n, device=sigma.device, dtype=dtype)
    return m.scatter_add_(2, src.expand(sigma.shape[0], n, k), g.view(-1, 1, k).expand(-1, n, k))


# ============ the PIL reference pipeline ============

def _three_channels(x: torch.Tensor) -> torch.Tensor:
    """(1, S, S) -> (3, S, S); a module-level function so DataLoader workers can pickle it."""
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def build_pil_transform(config: AugmentConfig, image_size: int):
    """torchvision per-image pipeline of the spec: PIL image -> normalised float (3, S, S). The reference
    that BatchAugment matches in distribution (rotation bilinear, as BatchAugment's one resampling)."""
    from torchvision import transforms as T

    if config.rotation_fill != "zeros":
        raise ValueError(f"rotation_fill {config.rotation_fill!r}: RandomRotation fills with a constant; only "
                         f"BatchAugment can reflect")
    if tuple(config.crop_scale) == (1.0, 1.0):
        steps = [T.Resize((image_size, image_size))]   # the supervised "resize to S x S"
    else:
        steps = [T.RandomResizedCrop(image_size, scale=config.crop_scale, ratio=config.crop_ratio)]
    steps += [T.RandomHorizontalFlip(config.hflip_p),
              T.RandomRotation(config.rotation, interpolation=T.InterpolationMode.BILINEAR, fill=0),
              T.ColorJitter(brightness=config.brightness, contrast=config.contrast)]
    if config.gamma > 0:
        steps.append(RandomGamma(config.gamma))
    if config.blur_p > 0:
        blur = T.GaussianBlur(blur_kernel_size(image_size), sigma=blur_sigma_range(config, image_size))
        steps.append(T.RandomApply([blur], p=config.blur_p))
    steps += [T.ToTensor(), T.Lambda(_three_channels), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class RandomGamma:
    """PIL image -> adjust_gamma(image, g), g log-uniform in [1 / (1 + strength), 1 + strength]."""

    def __init__(self, strength: float):
        self.log_range = float(np.log1p(strength))

    def sample(self) -> float:
        return float(np.exp(_lerp(torch.rand(()).item(), -self.log_range, self.log_range)))

    def __call__(self, image):
        from torchvision.transforms import functional as TF

        return TF.adjust_gamma(image, self.sample())

    def __repr__(self):
        return f"RandomGamma(strength={np.expm1(self.log_range):g})"


def eval_pil_transform(image_size: int):
    """PIL image -> resized, normalised float (3, S, S), no randomness."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Lambda(_three_channels),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class PILTwoViewDataset(torch.utils.data.Dataset):
    """The classic SimCLR data path: decode the file and augment it twice, per image, on every access.
    __getitem__(i) -> (view1, view2), each float (3, S, S)."""

    def __init__(self, root: str, filenames: list, transform):
        self.root, self.filenames, self.transform = root, list(filenames), transform

    def __len__(self):
        return len(self.filenames)

    def __getitem__(self, i: int):
        im = Image.fromarray(load_image(os.path.join(self.root, self.filenames[i])))
        return self.transform(im), self.transform(im)


# ============ synthetic chest X-rays ============
#
# A posterior-anterior chest radiograph drawn in normalised coordinates (x right, y down, both in
# [-1, 1]; the patient's left is on the image right, so the heart bulges to the right). Classes:
CLASS_DESCRIPTIONS = (
    "normal: clear lung fields, heart width under half the thorax, sharp costophrenic angles",
    "consolidation: a patchy airspace opacity filling part of one lung zone",
    "nodules: two to five small round opacities scattered in the lungs",
    "pleural effusion: fluid at one lung base, blunting the costophrenic angle with a meniscus",
    "cardiomegaly: heart wider than half the thorax (cardiothoracic ratio about 0.55-0.65)",
)
MAX_SYNTHETIC_CLASSES = len(CLASS_DESCRIPTIONS)
CLASS_NAMES = tuple(d.split(":")[0] for d in CLASS_DESCRIPTIONS)
FINDINGS_FILE = "findings.csv"   # beside labels.csv: filename,finding,x0,y0,x1,y1 per drawn region
# Scales the density every finding adds (and the heart enlargement). At 1.0 findings are visible by
# eye but small next to ribs, noise and exposure: at 64 px with 10% of the labels both a from-scratch
# ResNet-18 and one fine-tuned from a 15-epoch SimCLR encoder stayed at chance (benchmarks/
# label_efficiency.py, README "Results"). 1.8 makes them clearly visible at 64 px.
FINDING_STRENGTH = 1.8
IMAGES_PER_PATIENT = (2, 4)      # inclusive range; a patient's images share anatomy and class


def _smoothstep(edge_width: float, signed_distance: np.ndarray) -> np.ndarray:
    """A soft 0/1 mask: 1 where signed_distance < 0, with a ramp `edge_width` wide."""
    return np.clip(0.5 - signed_distance / edge_width, 0.0, 1.0)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a cells x cells grid upsampled bicubically to size x size."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _patient_anatomy(rng: np.random.Generator, label: int) -> dict:
    """Body habitus and organ geometry shared by every image of one patient."""
    lung_x = rng.uniform(0.34, 0.39)
    lung_w = rng.uniform(0.25, 0.30)
    ctr = rng.uniform(0.40, 0.49)                 # cardiothoracic ratio of a normal heart
    enlargement = rng.uniform(0.12, 0.18)         # drawn for every class so the other draws line up
    ctr += FINDING_STRENGTH * enlargement * (4 in _findings_of(label))
    return dict(
        body_w=rng.uniform(0.80, 0.95), body_h=rng.uniform(1.2, 1.4), tissue=rng.uniform(0.42, 0.55),
        lung_x=lung_x, lung_w=lung_w, apex=rng.uniform(-0.78, -0.66), dome=rng.uniform(0.42, 0.56),
        dome_lift=rng.uniform(0.03, 0.07), dome_h=rng.uniform(0.10, 0.16),
        heart_w=ctr * (lung_x + lung_w), heart_x=rng.uniform(0.11, 0.16), heart_h=rng.uniform(0.27, 0.33),
        spine_w=rng.uniform(0.06, 0.08), rib_gap=rng.uniform(0.13, 0.16), rib_bend=rng.uniform(0.45, 0.75),
        rib_phase=rng.uniform(0, 1), air=rng.uniform(0.26, 0.34),
    )


def _findings_of(label) -> tuple:
    """A class index (one label) or a tuple of them (several findings, data_loader --multi_label) as a tuple."""
    return tuple(label) if isinstance(label, (tuple, list, frozenset, set)) else (label,)


def _coordinates(rng: np.random.Generator, size: int) -> tuple:
    """The pixel grid in patient coordinates, after a per-image shift, scale and small rotation."""
    t = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)   # float32 halves the render time
    y, x = np.meshgrid(t, t, indexing="ij")
    angle = np.float32(np.deg2rad(np.clip(rng.normal(0, 3), -7, 7)))
    scale = np.float32(rng.uniform(0.92, 1.05))
    dx, dy = rng.normal(0, 0.04, size=2).astype(np.float32)
    xr = (np.cos(angle) * x + np.sin(angle) * y) * scale + dx
    yr = (-np.sin(angle) * x + np.cos(angle) * y) * scale + dy
    return xr, yr


def _lungs(a: dict, x: np.ndarray, y: np.ndarray, edge: float) -> tuple:
    """Soft masks (lungs, abdomen below the diaphragm domes) and the dome height per pixel."""
    side = (x < 0).astype(np.float32)                             # the right hemidiaphragm sits higher
    u = (np.abs(x) - a["lung_x"]) / a["lung_w"]                   # -1 medial edge, +1 lateral edge
    dome = a["dome"] - side * a["dome_lift"] - a["dome_h"] * (1 - np.clip(u + 0.2, 0, 1) ** 2)
    top, bottom = a["apex"], a["dome"] + 0.15
    v = (y - (top + bottom) / 2) / ((bottom - top) / 2)
    shape = np.sqrt(u ** 2 + np.clip(v, None, 0) ** 2 + np.clip(v, 0, None) ** 8) - 1
    lungs = _smoothstep(edge, shape * a["lung_w"]) * _smoothstep(edge, y - dome)
    abdomen = _smoothstep(edge, dome - y) * (np.abs(x) < a["body_w"])
    return lungs, abdomen, dome


def _ribs(a: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Posterior ribs as curved bands falling laterally, plus the clavicles."""
    phase = (y - a["rib_bend"] * (np.abs(x) - 0.05) ** 2) / a["rib_gap"] + a["rib_phase"]
    ribs = np.clip(np.cos(2 * np.pi * phase) - 0.2, 0, 1) ** 1.5
    ribs *= (np.abs(x) > a["spine_w"]) * (y > a["apex"] - 0.05) * (y < a["dome"])
    clavicle = np.exp(-((y - (a["apex"] + 0.04 + 0.12 * np.abs(x))) / 0.035) ** 2) * (np.abs(x) < 0.55)
    return ribs + clavicle


def _consolidation(rng, a, x, y, lungs, size):
    """A patchy opacity: thresholded smooth noise inside a blob in one lung zone."""
    side = int(rng.choice([-1, 1]))
    cx = side * (a["lung_x"] + rng.uniform(-0.4, 0.4) * a["lung_w"])
    cy = rng.uniform(a["apex"] + 0.25, a["dome"] - 0.1)
    radius = rng.uniform(0.18, 0.28)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))
    patches = np.clip(_smooth_field(rng, size, 9) * 0.8 + 0.6, 0, 1)
    return 0.26 * blob * patches * lungs


def _nodules(rng, a, x, y, lungs, size, parts=None):
    """Two to five round opacities, at least 1.5 px in radius so augmentation cannot erase them.
    `parts`, when given, receives each nodule's own field (for its box in findings.csv)."""
    out = np.zeros_like(x)
    mask = np.clip(lungs * 1.5, 0, 1)
    for _ in range(rng.integers(2, 6)):
        side = int(rng.choice([-1, 1]))
        cx = side * (a["lung_x"] + rng.uniform(-0.6, 0.6) * a["lung_w"])
        cy = rng.uniform(a["apex"] + 0.15, a["dome"] - 0.15)
        r = max(rng.uniform(0.035, 0.06), 3.0 / size)
        d2 = ((x - cx) ** 2 + (y - cy) ** 2) / r ** 2
        nodule = 0.22 * np.sqrt(np.clip(1 - d2, 0, 1))
        out += nodule
        if parts is not None:
            parts.append(nodule * mask)
    return out * mask


def _effusion(rng, a, x, y, lungs, dome):
    """Fluid filling one lung base, its surface a meniscus rising toward the lateral chest wall."""
    side = int(rng.choice([-1, 1]))
    u = np.clip((side * x - a["lung_x"]) / a["lung_w"], -1, 1)
    depth = rng.uniform(0.12, 0.22)
    surface = dome - depth - 0.10 * (u + 1) ** 2
    fluid = _smoothstep(0.04, surface - y) * (side * x > 0)
    return 0.20 * fluid * lungs


def render_chest_xray(anatomy: dict, label, rng: np.random.Generator, size: int,
                      boxes: list | None = None) -> np.ndarray:
    """One radiograph as uint8 (size, size); `rng` draws this image's position, exposure and finding(s).
    `label` is a class index, or a tuple of them for an image with several findings.

    `boxes`, when given, receives where the findings were drawn: one (x0, y0, x1, y1) pixel box per
    region (each nodule its own; x1, y1 exclusive), none for a normal image. Passing it draws nothing
    differently."""
    a = anatomy
    x, y = _coordinates(rng, size)
    edge = max(2.0 / size, 0.012)
    r = ((x / a["body_w"]) ** 4 + (y / a["body_h"]) ** 4) ** 0.25
    body = _smoothstep(edge * 3, r - 1) * np.clip(1 - r ** 2, 0.05, 1) ** 0.25
    lungs, abdomen, dome = _lungs(a, x, y, edge * 2)
    heart = _smoothstep(edge * 3, np.sqrt(((x - a["heart_x"]) / a["heart_w"]) ** 2
                                          + ((y - a["dome"] + 0.6 * a["heart_h"]) / a["heart_h"]) ** 2) - 1)
    heart *= 1 - abdomen
    trachea = _smoothstep(edge, np.abs(x) - 0.035) * _smoothstep(edge * 2, y - a["apex"] - 0.3)
    spine = _smoothstep(edge, np.abs(x) - a["spine_w"]) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.09))
    mediastinum = _smoothstep(edge * 4, np.abs(x - 0.02) - 0.11) * (y < a["dome"])
    markings = _smooth_field(rng, size, 24) * 0.04 * np.exp(-((np.abs(x) - 0.12) / 0.25) ** 2)
    density = (0.04 + body * (a["tissue"] + 0.10 * abdomen) + 0.10 * spine + 0.08 * mediastinum - 0.08 * trachea
               + 0.10 * _ribs(a, x, y) * body - a["air"] * lungs * (1 - heart) + markings * lungs
               + 0.06 * heart)
    parts = []                                    # the finding's regions, for `boxes`
    findings = {1: lambda: _consolidation(rng, a, x, y, lungs, size),
                2: lambda: _nodules(rng, a, x, y, lungs, size, parts),
                3: lambda: _effusion(rng, a, x, y, lungs, dome)}
    regions = []
    for finding in _findings_of(label):     # one label draws exactly what it drew before several could
        if finding in findings:
            parts.clear()
            field = findings[finding]()
            density = density + FINDING_STRENGTH * field * (1 - heart)
            regions += [p * (1 - heart) for p in parts] if parts else [field * (1 - heart)]
        elif finding == 4:                        # cardiomegaly: the enlarged heart is the finding
            regions.append(heart)
    if boxes is not None:
        boxes.extend(b for b in map(region_box, regions) if b is not None)
    return _expose(rng, density)


FINDING_BOX_LEVEL = 0.25   # a region's box holds the pixels above this fraction of its peak density


def region_box(field: np.ndarray):
    """(x0, y0, x1, y1) pixel box, ends exclusive, of where `field` exceeds FINDING_BOX_LEVEL of its
    peak; None where nothing was drawn (a nodule the lung mask hid)."""
    peak = float(field.max())
    if peak <= 0:
        return None
    rows, cols = np.nonzero(field >= FINDING_BOX_LEVEL * peak)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Detector response: gamma, noise, then a histogram set to a random mean and spread.

    Real CR/DR processing normalises each image's histogram; drawing the target mean and spread
    independently of the class is what makes global intensity useless as a shortcut."""
    x = np.clip(density, 0, None) ** rng.uniform(0.75, 1.35)
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(0.008, 0.03))
    x = (x - x.mean()) / (x.std() + 1e-8) * rng.uniform(0.17, 0.24) + rng.uniform(0.36, 0.52)
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def plan_patients(num_images: int, num_classes: int, seed: int, stream: int = 0) -> list:
    """(patient_id, label, image count) per patient, classes balanced over patients, deterministic."""
    rng = np.random.default_rng([seed, stream + 1])
    counts = []
    while sum(counts) < num_images:
        counts.append(int(rng.integers(IMAGES_PER_PATIENT[0], IMAGES_PER_PATIENT[1] + 1)))
    counts[-1] -= sum(counts) - num_images
    if len(counts) < num_classes:          # too few images for whole patients of every class
        counts = [1] * num_images
    labels = rng.permutation(np.arange(len(counts)) % num_classes)
    prefix = "P" if stream == 0 else "U"
    return [(f"{prefix}{i:05d}", int(labels[i]), n) for i, n in enumerate(counts)]


def generate_images(out_dir: str, subdir: str, num_images: int, num_classes: int, image_size: int,
                    seed: int, stream: int, plan: list | None = None, findings: list | None = None) -> list:
    """Render and save a cohort (`plan`: plan_patients' rows, or plan_multilabel_patients'); returns rows
    (filename, label, patient_id) in file order. `findings`, when given, receives (filename, finding, x0, y0,
    x1, y1) per drawn region of a one-label cohort."""
    rows = []
    for p, (patient, label, count) in enumerate(plan or plan_patients(num_images, num_classes, seed, stream)):
        anatomy = _patient_anatomy(np.random.default_rng([seed, stream + 1, p + 1]), label)
        for k in range(count):
            boxes = []
            image = render_chest_xray(anatomy, label, np.random.default_rng([seed, stream + 1, p + 1, k + 1]),
                                      image_size, boxes)
            name = (os.path.join(subdir, f"{patient}_{k}.png") if subdir else f"{patient}_{k}.png").replace(os.sep, "/")
            Image.fromarray(image).save(os.path.join(out_dir, name))
            rows.append((name, label, patient))
            if findings is not None:
                findings.extend((name, CLASS_NAMES[label], *box) for box in boxes)
    return rows


def write_preview(out_dir: str, rows: list, class_names: list, per_class: int = 4) -> None:
    """preview.png: one row per class, the first image of up to `per_class` different patients."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils import atomic_savefig

    fig, axes = plt.subplots(len(class_names), per_class, figsize=(2.2 * per_class, 2.4 * len(class_names)),
                             squeeze=False)
    for c, name in enumerate(class_names):
        seen, picks = set(), []
        for filename, label, group in rows:
            if label == c and group not in seen and len(picks) < per_class:
                seen.add(group)
                picks.append(filename)
        for ax, filename in zip(axes[c], picks + [None] * per_class):
            ax.axis("off")
            if filename:
                ax.imshow(load_image(os.path.join(out_dir, filename)), cmap="gray", vmin=0, vmax=255)
        axes[c][0].set_title(name, loc="left", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, os.path.join(out_dir, "preview.png"))


def write_label_csv(path: str, header: str, rows: list) -> None:
    from utils import atomic_write_text

    atomic_write_text(path, "\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")


def generate_dataset(out_dir: str, num_images: int, num_classes: int, image_size: int, seed: int,
                     num_unlabeled: int = 0) -> list:
    """Write the synthetic cohort: images, labels.csv, classes.txt, findings.csv (where each finding was
    drawn: `read_findings`), preview.png; unlabelled images
    (other patients, same class mix) under unlabeled/ with no label row. Returns the label rows."""
    _warn_foreign_images(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    findings = []
    rows = generate_images(out_dir, "", num_images, num_classes, image_size, seed, stream=0, findings=findings)
    write_label_csv(os.path.join(out_dir, FINDINGS_FILE), "filename,finding,x0,y0,x1,y1", findings)
    if num_unlabeled:
        os.makedirs(os.path.join(out_dir, "unlabeled"), exist_ok=True)
        generate_images(out_dir, "unlabeled", num_unlabeled, num_classes, image_size, seed, stream=1)
    write_label_csv(os.path.join(out_dir, "labels.csv"), "filename,label,patient_id", rows)
    names = [f"{c} {CLASS_DESCRIPTIONS[c].split(':')[0]}" for c in range(num_classes)]
    from utils import atomic_write_text
    atomic_write_text(os.path.join(out_dir, "classes.txt"),
                      "".join(f"{c}\t{CLASS_DESCRIPTIONS[c]}\n" for c in range(num_classes)))
    write_preview(out_dir, rows, names)
    return rows


def write_split_column(label_file: str, data_dir: str, seed: int, val_fraction: float, test_fraction: float) -> dict:
    """Add a `split` column to a label file without one: the stratified, patient-level split the scripts would
    otherwise draw themselves (`load_label_table`), with these shares. Every script then uses it as written,
    so one choice of shares holds for pretraining, fine-tuning and evaluation. Returns {split: images}."""
    import pandas as pd
    from utils import atomic_write_text

    table = load_label_table(label_file, data_dir, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    df = pd.read_csv(label_file, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if "split" in df:
        raise UserError(f"{label_file}: already has a split column; not rewriting it")
    if len(df) != len(table.splits):         # a header-less file: its first row was read as a header
        raise UserError(f"{label_file}: {len(table.splits)} label rows but {len(df)} data rows; give it a header")
    df.insert(1, "split", table.splits)
    atomic_write_text(label_file, df.to_csv(index=False, lineterminator="\n"))
    return {s: int((table.splits == s).sum()) for s in SPLITS}


def _warn_foreign_images(out_dir: str) -> None:
    """Old images left in the folder would join the unlabelled set of train_ssl.py: say so."""
    if not os.path.isdir(out_dir):
        return
    try:
        existing = list_images(out_dir)
    except UserError:
        return
    print(f"warning: {out_dir} already holds {len(existing)} image(s); files of the same name are overwritten, "
          f"others stay and train_ssl.py will read them too (use an empty --output_dir to avoid this)",
          file=sys.stderr)


# ============ synthetic multi-label cohort (data_loader.py --multi_label) ============
#
# The same patients and renderer, with 0 to 4 findings per patient drawn from a small chain of
# dependencies that mimics chest X-ray co-occurrence: an enlarged heart raises the odds of an
# effusion, an effusion those of a consolidation next to it, and nodules are rare and independent.
SYNTHETIC_FINDINGS = {1: "Consolidation", 2: "Nodule", 3: "Effusion", 4: "Cardiomegaly"}  # ChestX-ray14 names
MIN_POSITIVE_PATIENTS = 4        # so that a small cohort still has every finding in train, val and test


def draw_findings(rng: np.random.Generator) -> tuple:
    """One patient's findings (class indices of SYNTHETIC_FINDINGS), sorted; () for a normal chest.
    Prevalences: cardiomegaly 22%, effusion about 19% (45% with cardiomegaly, 12% without),
    consolidation about 16% (35% with an effusion, 12% without), nodules 7%."""
    cardiomegaly = rng.random() < 0.22
    effusion = rng.random() < (0.45 if cardiomegaly else 0.12)
    consolidation = rng.random() < (0.35 if effusion else 0.12)
    nodules = rng.random() < 0.07
    return tuple(c for c, present in ((1, consolidation), (2, nodules), (3, effusion), (4, cardiomegaly)) if present)


def plan_multilabel_patients(num_images: int, seed: int, stream: int = 0) -> list:
    """(patient_id, findings tuple, image count) per patient, deterministic. Image counts as plan_patients;
    a finding held by fewer than MIN_POSITIVE_PATIENTS patients is given to more (only small cohorts)."""
    counts = [n for _, _, n in plan_patients(num_images, 1, seed, stream)]
    rng = np.random.default_rng([seed, stream + 1, 99])
    findings = [set(draw_findings(rng)) for _ in counts]
    for c in SYNTHETIC_FINDINGS:
        lacking = [p for p, f in enumerate(findings) if c not in f]
        short = MIN_POSITIVE_PATIENTS - (len(findings) - len(lacking))
        if short > 0 and len(lacking) > short:
            for p in rng.choice(lacking, size=short, replace=False):
                findings[p].add(c)
    prefix = "P" if stream == 0 else "U"
    return [(f"{prefix}{i:05d}", tuple(sorted(f)), n) for i, (f, n) in enumerate(zip(findings, counts))]


def finding_names(findings: tuple) -> str:
    """'Effusion|Cardiomegaly' for a labels.csv cell, 'No Finding' for none."""
    return "|".join(SYNTHETIC_FINDINGS[c] for c in findings) or "No Finding"


def generate_multilabel_dataset(out_dir: str, num_images: int, image_size: int, seed: int,
                                num_unlabeled: int = 0) -> list:
    """The multi-label cohort: images, labels.csv (filename,labels,patient_id; ChestX-ray14's |-separated
    names), classes.txt (finding and description), preview.png (a row per finding). Returns the rows."""
    from utils import atomic_write_text

    _warn_foreign_images(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    plan = plan_multilabel_patients(num_images, seed)
    rows = generate_images(out_dir, "", num_images, 0, image_size, seed, stream=0, plan=plan)
    if num_unlabeled:
        os.makedirs(os.path.join(out_dir, "unlabeled"), exist_ok=True)
        generate_images(out_dir, "unlabeled", num_unlabeled, 0, image_size, seed, stream=1,
                        plan=plan_multilabel_patients(num_unlabeled, seed, stream=1))
    write_label_csv(os.path.join(out_dir, "labels.csv"), "filename,labels,patient_id",
                    [(f, finding_names(y), p) for f, y, p in rows])
    atomic_write_text(os.path.join(out_dir, "classes.txt"),
                      "".join(f"{name}\t{CLASS_DESCRIPTIONS[c]}\n" for c, name in SYNTHETIC_FINDINGS.items()))
    order = [0] + list(SYNTHETIC_FINDINGS)                 # preview rows: No Finding, then each finding
    shown = [(f, order.index(c), p) for f, y, p in rows for c in (y or (0,))]
    write_preview(out_dir, shown, ["No Finding"] + list(SYNTHETIC_FINDINGS.values()))
    return rows


# ============ MedMNIST import ============

def import_npz(npz_path: str, out_dir: str, label_names: list | None = None) -> list:
    """A MedMNIST-style .npz -> PNG files in `out_dir`/{split}/ and labels.csv (filename,label,split).
    Multi-label files (labels (N, K), e.g. ChestMNIST) go to import_multilabel_npz."""
    arrays = _load_npz(npz_path)
    if arrays["train_labels"].ndim == 2:
        return import_multilabel_npz(arrays, npz_path, out_dir, label_names)
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
    except (OSError, ValueError) as e:
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
        if len(images) != len(labels) or (len(labels) and labels.min() < 0):
            raise UserError(f"--from_npz {npz_path}: {split} has {len(images)} images but {len(labels)} labels "
                            f"(or a negative label); the arrays must match")
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels.astype(np.int64)
    if len({out[f"{s}_labels"].shape[1:] for s in SPLITS}) > 1:
        raise UserError(f"--from_npz {npz_path}: the splits' label arrays have different widths "
                        f"({', '.join(str(out[f'{s}_labels'].shape) for s in SPLITS)}); they must match")
    return out


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


# ============ command line ============

def _check_args(args) -> None:
    from utils import Bound, check_flags, check_split_shares
    check_flags(args, {"num_classes": Bound(int, 2, MAX_SYNTHETIC_CLASSES, hint="classes the generator draws"),
                       "image_size": Bound(int, 32, 2048, hint="pixels")})
    if not args.from_npz:
        _check_generator_args(args)
    elif args.val_fraction is not None or args.test_fraction is not None:
        raise UserError(f"--from_npz {args.from_npz}: a MedMNIST file brings its own train/val/test split; "
                        f"drop --val_fraction and --test_fraction")
    if args.val_fraction is not None or args.test_fraction is not None:
        check_split_shares(*split_shares(args))


def split_shares(args) -> tuple:
    """(val, test) shares for the split column: the scripts' 0.15 for the one not given."""
    return (0.15 if args.val_fraction is None else args.val_fraction,
            0.15 if args.test_fraction is None else args.test_fraction)


@locks_output_dir(_check_args, "generate")
def main(args):
    if args.from_npz:
        rows = import_npz(args.from_npz, args.output_dir, args.label_names)
        counts = {s: sum(r[2] == s for r in rows) for s in SPLITS}
        print(f"wrote {len(rows)} images ({', '.join(f'{s} {n}' for s, n in counts.items())}) and labels.csv "
              f"to {args.output_dir}")
        return rows
    if args.multi_label:
        rows = _generate_multilabel(args)
    else:
        rows = generate_dataset(args.output_dir, args.num_images, args.num_classes, args.image_size, args.seed,
                                args.num_unlabeled)
        patients = len({r[2] for r in rows})
        print(f"wrote {len(rows)} labelled images of {patients} patients, {args.num_unlabeled} unlabelled, "
              f"labels.csv, classes.txt and preview.png to {args.output_dir}")
        for c in range(args.num_classes):
            print(f"  class {c}: {CLASS_DESCRIPTIONS[c]}")
    if args.val_fraction is not None or args.test_fraction is not None:
        val, test = split_shares(args)
        counts = write_split_column(os.path.join(args.output_dir, "labels.csv"), args.output_dir, args.seed, val, test)
        print(f"  split column (by patient): {', '.join(f'{s} {n}' for s, n in counts.items())} images")
    return rows


def _generate_multilabel(args) -> list:
    rows = generate_multilabel_dataset(args.output_dir, args.num_images, args.image_size, args.seed,
                                       args.num_unlabeled)
    patients = {r[2]: r[1] for r in rows}
    print(f"wrote {len(rows)} labelled images of {len(patients)} patients with several findings each, "
          f"{args.num_unlabeled} unlabelled, labels.csv (|-separated findings), classes.txt and preview.png "
          f"to {args.output_dir}")
    none = sum(not f for f in patients.values())
    print(f"  No Finding: {none} patients ({100 * none / len(patients):.0f}%)")
    for c, name in SYNTHETIC_FINDINGS.items():
        n = sum(c in f for f in patients.values())
        print(f"  {name}: {n} patients ({100 * n / len(patients):.0f}%) - {CLASS_DESCRIPTIONS[c]}")
    return rows


def _check_generator_args(args) -> None:
    """What the shared range table (utils.FLAG_RULES) cannot say: flags that depend on each other."""
    if args.num_images < args.num_classes:
        raise UserError(f"--num_images {args.num_images}: need at least one image per class "
                        f"({args.num_classes}); raise --num_images")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output_dir", default="./data/medical_images", help="folder for the images and labels.csv")
    p.add_argument("--num_images", type=int, default=500, help="labelled synthetic images")
    p.add_argument("--num_unlabeled", type=int, default=0, help="extra synthetic images with no label row")
    p.add_argument("--num_classes", type=int, default=3, help="number of findings (classes)")
    p.add_argument("--image_size", type=int, default=224, help="side of the square images in pixels")
    p.add_argument("--seed", type=int, default=42, help="random seed; the same seed gives identical files")
    p.add_argument("--from_npz", default=None,
                   help="import a MedMNIST .npz (e.g. breastmnist.npz: README, Using your own data) instead of generating")
    p.add_argument("--multi_label", action="store_true",
                   help="several findings per image (consolidation, nodules, effusion, cardiomegaly at unequal, "
                        "correlated prevalences); labels.csv lists them |-separated; --num_classes is ignored")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="write a split column into labels.csv: this share of the patients for val (0.15 when only "
                        "--test_fraction is given); without either, each script splits 70/15/15 by patient itself")
    p.add_argument("--test_fraction", type=float, default=None,
                   help="write a split column into labels.csv: this share of the patients held out for testing (the "
                        "quick start's 0.4 of 800 gives 318 test images, enough to resolve a 10-point difference)")
    p.add_argument("--label_names", nargs="+", default=None,
                   help="with --from_npz of a multi-label file (labels (N, K), e.g. ChestMNIST): the K finding "
                        "names in column order (default: finding_0 ... finding_K-1)")
    return p


if __name__ == "__main__":
    from utils import run_cli
    run_cli(main, get_args_parser())
