"""Property-based tests of the label-file readers (label_tables.py): any bytes as a labels.csv (one label per
image, multi-label in either layout, with or without a split column) give a clean UserError or a table that
round-trips: written back as a CSV of the same layout and read again, it is the same table. Any bytes as
classes.txt give one readable name per class."""
import csv
import io
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import label_tables  # noqa: E402
import utils  # noqa: E402

FILES = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "sub/g.png", "ü.png"]
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    os.makedirs(root / "sub")
    for name in FILES:
        (root / name).write_bytes(b"")             # the readers check that a file exists, not its pixels
    return str(root)


def field(good: list, bad, clean: bool):
    """A cell strategy: a clean file draws only `good` values; another draws a bad one one time in five."""
    good = st.sampled_from(good)
    return good if clean else st.integers(0, 4).flatmap(lambda i: good if i else bad)


NAMES = (FILES, st.sampled_from(["./a.png", "sub/../b.png", "sub\\g.png", "missing.png", "", " c.png ", "sub",
                                 '"d.png"', "/abs.png", "..", "a.png\x00"]) | st.text(max_size=6))
CELL = (["0", "1", "-1", "1.0", "0.0", "-1.0", "", " 1", "1 "],
        st.sampled_from(["2", "x", "nan", "NA", "None", "1e0", '"1"', "1|", "|", "٣", "\t"]) | st.text(max_size=4))
CLASS = (["0", "1", "2", "007", "1.0", "cat", "dog", "nan", "a,b", 'q"t', "x\ny", " 3 ", "٣", "NA", "None", "Label"],
         st.sampled_from(["", "-1", "99999999999999999999999"]) | st.text(max_size=5))
SPLIT = (["train", "train", "train", "val", "test", "Training", "VALID", "TEST ", "testing"],
         st.sampled_from(["", "holdout"]) | st.text(max_size=4))
PATIENT = (["P1", "P2", "P3", "P4", "P5", " P1", "p1"], st.just("") | st.text(max_size=3))
FINDINGS = (["Effusion", "Nodule", "Mass", "No Finding", "Atelectasis", "finding_1", "finding_2", "Pleural Effusion",
             "x,y", 'q"t'], st.sampled_from(["effusion", "Efusion", "", " ", "a|b"]) | st.text(max_size=6))


def csv_bytes(rows: list, newline: str = "\n") -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator=newline).writerows(rows)
    return buf.getvalue().encode("utf-8", "surrogatepass")


@st.composite
def one_label_files(draw):
    kind = draw(st.sampled_from(["clean", "clean", "dirty", "dirty", "text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    clean = kind == "clean"
    header = draw(st.sampled_from([["filename", "label"], ["filename", "label", "split"], ["Label", "Filename"],
                                   ["filename", "label", "split", "patient_id"], ["filename", "label", "patient_id"],
                                   [" Filename ", "LABEL"], []]))
    width = len(header) or draw(st.integers(1 if not clean else 2, 5))
    cells = st.tuples(*(field(*f, clean) for f in (NAMES, CLASS, SPLIT, PATIENT, CELL)))
    rows = draw(st.lists(cells.map(lambda r: list(r[:width])), min_size=1, max_size=10,
                         unique_by=lambda r: r[0].strip()))
    if header[:1] == ["Label"]:
        rows = [r[::-1] for r in rows]
    return csv_bytes(([header] if header else []) + rows, draw(st.sampled_from(["\n", "\r\n"])))


@st.composite
def multi_label_files(draw):
    kind = draw(st.sampled_from(["pipe", "pipe", "columns", "columns", "columns", "bytes"]))
    if kind == "bytes":
        return b"filename,labels\n" + draw(st.binary(max_size=150))
    clean = draw(st.booleans())
    extra = draw(st.sampled_from([[], ["split"], ["split", "patient_id"], ["Patient ID"], ["Sex"]]))
    names = draw(st.lists(field(*NAMES, clean), min_size=1, max_size=8, unique_by=str.strip))
    if kind == "pipe":
        header = [draw(st.sampled_from(["filename", "Image Index"])), draw(st.sampled_from(["labels", "Finding Labels"]))]
        lists = st.lists(field(*FINDINGS, clean), min_size=1, max_size=3, unique=True).map("|".join)
        rows = [[name, draw(lists)] for name in names]
    else:
        findings = draw(st.lists(field(*FINDINGS, clean), min_size=1, max_size=4, unique=True))
        header = [draw(st.sampled_from(["filename", "Path"]))] + findings
        rows = [[name] + [draw(field(*CELL, clean)) for _ in findings] for name in names]
    fill = {"split": SPLIT, "patient_id": PATIENT, "Patient ID": PATIENT, "Sex": (["F", "M", ""], st.just("X"))}
    rows = [row + [draw(field(*fill[e], clean)) for e in extra] for row in rows]
    return csv_bytes([header + extra] + rows)


def write(path: str, content: bytes) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return path


def write_back(table, path: str) -> str:
    """The table as a label file of its own layout, with explicit split and patient_id columns."""
    if table.task == "multiclass":
        rows = [[f, table.class_names[y], s, p]
                for f, y, s, p in zip(table.filenames, table.labels, table.splits, table.patient_ids)]
        return write(path, csv_bytes([["filename", "label", "split", "patient_id"]] + rows))
    cell = {1.0: "1", 0.0: "0", label_tables.IGNORED: "-1"}
    if table.label_format == "pipe":
        values = [["|".join(n for n, v in zip(table.class_names, t) if v == 1) or "No Finding"] for t in table.labels]
        header = ["filename", "split", "patient_id", "labels"]
    else:
        values = [[cell[float(v)] for v in t] for t in table.labels]
        header = ["filename", "split", "patient_id"] + list(table.class_names)
    rows = [[f, s, p] + v for f, s, p, v in zip(table.filenames, table.splits, table.patient_ids, values)]
    return write(path, csv_bytes([header] + rows))


def assert_same(a, b) -> None:
    assert type(a) is type(b) and a.class_names == b.class_names and a.filenames == b.filenames
    assert np.array_equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype
    assert list(a.splits) == list(b.splits) and list(a.patient_ids) == list(b.patient_ids)
    assert getattr(a, "label_format", None) == getattr(b, "label_format", None)


def read_or_user_error(path: str, data_dir: str, **kw):
    try:
        return label_tables.load_label_table(path, data_dir, seed=0, **kw)
    except utils.UserError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))   # one line
        event("a user error")
        return None


@SETTINGS
@given(content=one_label_files())
def test_any_one_label_file_is_a_user_error_or_a_table_that_round_trips(content, data_dir, tmp_path_factory):
    folder = str(tmp_path_factory.getbasetemp())
    table = read_or_user_error(write(os.path.join(folder, "labels.csv"), content), data_dir)
    if table is not None:
        event("a table")
        again = label_tables.load_label_table(write_back(table, os.path.join(folder, "again.csv")), data_dir, seed=0)
        assert_same(table, again)


@SETTINGS
@given(content=multi_label_files(), uncertain=st.sampled_from(label_tables.UNCERTAIN_POLICIES))
def test_any_multi_label_file_is_a_user_error_or_a_table_that_round_trips(content, uncertain, data_dir,
                                                                         tmp_path_factory):
    folder = str(tmp_path_factory.getbasetemp())
    path = write(os.path.join(folder, "multi.csv"), content)
    table = read_or_user_error(path, data_dir, task="multilabel", uncertain=uncertain)
    if table is not None:
        event("a table")
        assert table.labels.shape == (len(table.filenames), table.num_classes)
        assert set(np.unique(table.labels)) <= {0.0, 1.0, label_tables.IGNORED}
        again = label_tables.load_label_table(write_back(table, os.path.join(folder, "again_multi.csv")), data_dir,
                                              task="multilabel", uncertain=uncertain, seed=0)
        assert_same(table, again)


@SETTINGS
@given(content=st.binary(max_size=120) | st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass")),
       n=st.integers(1, 6))
def test_any_classes_txt_gives_one_name_per_class(content, n, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("classes", numbered=True))
    write(os.path.join(folder, "classes.txt"), content)
    names = label_tables.read_class_names(os.path.join(folder, "labels.csv"), [str(i) for i in range(n)])
    assert len(names) == n and all(isinstance(x, str) and x and "\n" not in x for x in names)
