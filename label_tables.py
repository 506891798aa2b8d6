"""Label files -> a LabelTable: one class per image (`filename,label[,split][,patient_id]`) or several
findings per image (ChestX-ray14's |-separated lists, CheXpert's 1/0/-1 columns), every problem a
one-line error naming the row; the splits are taken from the file or drawn by patient (data_splits.py).

    table = load_label_table("data/labels.csv", "data")       # LabelTable or MultiLabelTable
"""
import csv
import os
import posixpath
import sys
from dataclasses import dataclass

import numpy as np

from data_splits import SPLITS, assign_multilabel_splits, assign_splits
from image_io import _reason, prepared_folder
from utils import UserError, sha256_file


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

    def describe(self) -> str:
        return f"labels: one class per image, {self.num_classes} classes"


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
    prepared = prepared_folder(data_dir)
    if prepared is not None:                # the images are rows of its file: a name is a file when indexed
        def isfile(p):
            return os.path.relpath(p, root).replace(os.sep, "/") in prepared.position
    else:
        isfile = os.path.isfile
    filenames, first_row_of = [], {}
    for i, raw in enumerate(col.tolist()):
        row = i + first_line
        path = os.path.normpath(os.path.join(root, raw.replace("\\", "/")))
        if os.path.commonpath([root, path]) != root:
            raise UserError(f"--label_file {label_file}: row {row} names {raw!r}, which is outside --data_dir "
                            f"{data_dir}; give paths inside it (relative to it) or move the image there")
        name = os.path.relpath(path, root).replace(os.sep, "/")
        if not isfile(path):
            missing = sum(not isfile(os.path.normpath(os.path.join(root, f))) for f in col.tolist()[i:])
            raise UserError(f"--label_file {label_file}: {missing} file(s) not found under {data_dir}, first "
                            f"{name!r} (row {row}); fix the path (relative to --data_dir) or remove the row")
        real = path if prepared is not None else os.path.realpath(path)
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

    def describe(self) -> str:
        layout = ("a |-separated list of findings per row (ChestX-ray14 style)" if self.label_format == "pipe"
                  else "one 1/0/-1 column per finding (CheXpert style)")
        counted = self.labels != IGNORED
        prevalence = ", ".join(f"{n} {100 * (self.labels[:, k] == 1).mean():.0f}%"
                               for k, n in enumerate(self.class_names))
        uncertain = int((~counted).sum())
        return (f"labels: multi-label, {layout}; {self.num_classes} findings ({prevalence} of images); "
                f"--uncertain {self.uncertain}" + (f": {uncertain} cells ignored" if uncertain else ""))


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
    return table.describe()


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
    if fmt == "columns":
        _check_header_names(label_file)
        check_distinct_findings(findings, label_file)
    if df.empty:
        raise UserError(f"--label_file {label_file}: no rows; add one line per image")
    df = df.rename(columns=rename).apply(lambda col: col.str.strip())
    return df, fmt, findings


def _check_header_names(label_file: str) -> None:
    """Every column of a one-column-per-finding header has a name of its own: the reader would call an unnamed
    one 'Unnamed: 3' and a repeated one 'Effusion.1', each then a finding of its own. (A |-separated file reads
    only its named columns: ChestX-ray14's Data_Entry_2017.csv ends with an unnamed one.)"""
    with open(label_file, encoding="utf-8-sig", newline="") as f:
        header = [c.strip() for c in next(csv.reader(f), [])]
    for i, name in enumerate(header):
        if not name:
            raise UserError(f"--label_file {label_file}: column {i + 1} of the header has no name; name it or delete "
                            f"the column (R: write.csv(..., row.names = FALSE))")
        if name in header[:i]:
            raise UserError(f"--label_file {label_file}: the header names column {name!r} twice (columns "
                            f"{header.index(name) + 1} and {i + 1}); give each column one name")


def check_distinct_findings(names: list, label_file: str) -> None:
    """Two names of one finding would become two outputs, each positive of one counted as absent in the other:
    refuse names that differ only in case, spaces, '_' or '-', or by one letter (a typo; digits may differ:
    finding_1, finding_2)."""
    def key(name: str) -> str:
        return "".join(c for c in name.lower() if c not in " _-")

    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ka, kb = key(a), key(b)
            if ka == kb:
                why = "differ only in case, spaces, '_' or '-'"
            elif min(len(ka), len(kb)) >= 5 and _one_letter_apart(ka, kb):
                why = "differ by one letter (a typo?)"
            else:
                continue
            raise UserError(f"--label_file {label_file}: findings {a!r} and {b!r} {why}; give each finding one "
                            f"name (two names would be two outputs, each marking the other's positives absent)")


def _one_letter_apart(a: str, b: str) -> bool:
    """One letter inserted, deleted or replaced (not a digit: numbered findings are different findings)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        same = a[i + 1:] == b[i + 1:]
        return same and not (a[i].isdigit() and b[i].isdigit())
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return longer[i + 1:] == shorter[i:] and not longer[i].isdigit()


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
    check_distinct_findings(names, label_file)
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


def check_counted(targets: np.ndarray, names: list, label_file: str) -> None:
    """A finding whose every cell is left out (-1 under --uncertain ignore) has nothing to learn or score
    (fine_tune.py checks it: it has --uncertain)."""
    unknown = [n for k, n in enumerate(names) if (targets[:, k] == IGNORED).all()]
    if unknown:
        raise UserError(f"--label_file {label_file}: finding {unknown[0]!r} has no certain cell (every one is -1), so "
                        f"with --uncertain ignore there is nothing to learn or score; drop the column, or count the "
                        f"uncertain cells with --uncertain zero or one")


def _patients_from_paths(filenames: list) -> np.ndarray:
    """CheXpert paths name the patient (…/patient00001/study1/…); otherwise one patient per image."""
    import re

    ids = [re.search(r"(?:^|/)(patient\d+)/", f) for f in filenames]
    return np.array([m.group(1) if m else f for m, f in zip(ids, filenames)], dtype=str)


def _check_finding_coverage(splits, targets, names: list, label_file: str) -> None:
    """No train split is an error; a finding with no positive image in a split, or with no counted negative in
    train (the model cannot learn to tell it apart), is a warning."""
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
        always = [n for k, n in enumerate(names) if not (targets[rows, k] == 0).any()]
        if always:
            print(f"warning: {label_file}: no {split} image is counted without finding(s) {', '.join(always)} "
                  f"(every cell is 1 or uncertain)" + (": the model cannot learn to tell them apart"
                                                       if split == "train" else "; their AUC there is undefined"),
                  file=sys.stderr)


FINDINGS_FILE = "findings.csv"   # beside labels.csv: filename,finding,x0,y0,x1,y1 per drawn region
