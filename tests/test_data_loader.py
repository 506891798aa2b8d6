"""data_loader: readers on real DICOM and bitmap files, the synthetic generator, the MedMNIST import,
label files, splits and every bad input's one-line message. Small images, CPU, a few seconds."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data_loader as dl  # noqa: E402
import data_splits  # noqa: E402
import image_io  # noqa: E402
import label_tables  # noqa: E402
import medmnist_npz  # noqa: E402
import synthetic as synth  # noqa: E402
from utils import UserError  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
BREASTMNIST = SHARED_DATA / "breastmnist.npz"


def dicom_file(name: str) -> str:
    """Only names that pydicom / pydicom-data ship: any other name starts a slow download attempt."""
    from pydicom.data import get_testdata_file
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return path


def generator_args(output_dir, **overrides) -> argparse.Namespace:
    args = dl.get_args_parser().parse_args(["--output_dir", str(output_dir)])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def write_csv(path: Path, lines: list) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def make_folder(root: Path, names: list, size: int = 8) -> Path:
    """Tiny grayscale PNGs at the given relative paths."""
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size), i * 7 % 256, np.uint8)).save(root / name)
    return root


# ============ DICOM readers on real files ============

@pytest.fixture(scope="module")
def radiograph():
    import pydicom
    path = dicom_file("RG1_UNCR.dcm")
    return path, pydicom.dcmread(path)


def test_chest_radiograph_is_windowed_and_monochrome1_inverted(radiograph):
    path, ds = radiograph
    raw = ds.pixel_array.astype(np.float64)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and raw.max() > 255       # 15-bit data
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 1.0 - np.clip((raw - (c - w / 2)) / w, 0, 1)
    got = image_io.read_pixels(path)
    assert got.dtype == np.float32 and got.shape == raw.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)
    u8 = image_io.load_image(path)
    assert u8.dtype == np.uint8 and len(np.unique(u8)) > 200     # not clipped to a handful of levels


def test_sixteen_bit_png_and_tiff_read_back_exactly(radiograph, tmp_path):
    _, ds = radiograph
    raw = ds.pixel_array
    assert raw.dtype == np.uint16
    for ext in ("png", "tif"):
        path = tmp_path / f"rg1.{ext}"
        Image.fromarray(raw).save(path)
        back = image_io.read_pixels(str(path))
        assert back.dtype == np.uint16
        np.testing.assert_array_equal(back, raw)
    u8 = image_io.load_image(str(tmp_path / "rg1.png"))
    assert u8.min() == 0 and u8.max() == 255                     # stretched to the full range
    expected = np.round((raw - raw.min()) / (raw.max() - raw.min()) * 255)
    np.testing.assert_array_equal(u8, expected.astype(np.uint8))


def test_ct_rescale_then_percentile_window():
    import pydicom
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = np.percentile(hu, [0.5, 99.5])
    np.testing.assert_allclose(image_io.read_pixels(path), np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_mr_stored_window_and_monochrome1_inversion(tmp_path):
    import pydicom
    path = dicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    mono2 = image_io.read_pixels(path)
    np.testing.assert_allclose(mono2, np.clip((ds.pixel_array - (c - w / 2)) / w, 0, 1), atol=1e-5)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    np.testing.assert_allclose(image_io.read_pixels(str(tmp_path / "mono1.dcm")), 1.0 - mono2, atol=1e-6)


def test_multiframe_and_colour_dicom():
    frames = image_io.read_pixels(dicom_file("rtdose.dcm"))
    assert frames.ndim == 2 and 0.0 <= frames.min() <= frames.max() <= 1.0
    rgb = image_io.load_image(dicom_file("US1_UNCR.dcm"))
    assert rgb.dtype == np.uint8 and rgb.shape == (480, 640, 3)
    tensor = image_io.decode_to_tensor(dicom_file("MR_small.dcm"), 32, 3)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8


# ============ bitmap readers ============

def test_bitmap_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((16, 16), 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(image_io.read_pixels(str(tmp_path / "rgba.png")), rgb)      # alpha dropped

    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(image_io.read_pixels(str(tmp_path / "la.png")), gray)

    palette = Image.fromarray(rgb).quantize(8)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(image_io.read_pixels(str(tmp_path / "palette.png")), np.array(palette.convert("RGB")))
    Image.fromarray(gray).convert("P").save(tmp_path / "gray_palette.png")
    assert image_io.read_pixels(str(tmp_path / "gray_palette.png")).ndim == 2

    for ext in ("bmp", "tif"):
        Image.fromarray(rgb).save(tmp_path / f"rgb.{ext}")
        np.testing.assert_array_equal(image_io.read_pixels(str(tmp_path / f"rgb.{ext}")), rgb)
        Image.fromarray(gray).save(tmp_path / f"gray.{ext}")
        np.testing.assert_array_equal(image_io.read_pixels(str(tmp_path / f"gray.{ext}")), gray)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=95)
    assert image_io.load_image(str(tmp_path / "rgb.jpg")).shape == (16, 16, 3)
    assert image_io.load_image(str(tmp_path / "gray.jpg")).shape == (16, 16)


def test_to_uint8_maps_windowed_floats_without_stretching():
    x = np.array([[0.25, 0.5]], np.float32)
    np.testing.assert_array_equal(image_io.to_uint8(x), [[64, 128]])
    np.testing.assert_array_equal(image_io.to_uint8(np.array([[1000, 3000]], np.uint16)), [[0, 255]])
    assert image_io.to_uint8(np.full((2, 2), 300, np.uint16)).max() == 0


@pytest.mark.parametrize("name,content", [("broken.png", b"not an image at all"),
                                          ("broken.dcm", b"\x00" * 200)])
def test_unreadable_file_names_itself(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=name):
        image_io.load_image(str(tmp_path / name))


def test_truncated_png_is_a_user_error(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:2000])
    with pytest.raises(UserError, match="cut.png"):
        image_io.load_image(str(tmp_path / "cut.png"))


# ============ folders and unlabelled data ============

def test_list_images_recursive_sorted_and_skips_preview_and_hidden(tmp_path):
    make_folder(tmp_path, ["b.png", "a/c.png", "a/b.jpg", "preview.png", ".hidden.png"])
    (tmp_path / "notes.txt").write_text("x")
    assert image_io.list_images(str(tmp_path)) == ["a/b.jpg", "a/c.png", "b.png"]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        image_io.list_images(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no images found"):
        image_io.list_images(str(tmp_path))


def test_unreadable_images_in_unlabelled_folder_are_skipped_with_one_warning(tmp_path, capsys):
    make_folder(tmp_path, ["ok1.png", "sub/ok2.png"])
    (tmp_path / "bad1.png").write_bytes(b"junk")
    (tmp_path / "sub" / "bad2.jpg").write_bytes(b"junk")
    assert image_io.list_readable_images(str(tmp_path)) == ["ok1.png", "sub/ok2.png"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2" in err[0] and "bad1.png" in err[0] and "sub/bad2.jpg" in err[0]

    store = dl.ImageStore(str(tmp_path), image_io.list_images(str(tmp_path)), 16, skip_unreadable=True)
    assert store.filenames == ["ok1.png", "sub/ok2.png"] and store.images.shape == (2, 1, 16, 16)
    for image, name in zip(store.images, store.filenames):      # the rows moved with their files
        assert torch.equal(image, image_io.decode_to_tensor(str(tmp_path / name), 16, 1))


def test_no_readable_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="none of the images could be read"):
        image_io.list_readable_images(str(tmp_path))


def test_labelled_store_names_an_unreadable_file(tmp_path):
    make_folder(tmp_path, ["ok.png"])
    (tmp_path / "bad.png").write_bytes(b"junk")
    csv = write_csv(tmp_path / "labels.csv", ["filename,label", "ok.png,0", "bad.png,1"])
    table = label_tables.read_label_table(csv, str(tmp_path))
    with pytest.raises(UserError, match="bad.png"):
        dl.ImageStore(str(tmp_path), table.filenames, 16)


def test_store_and_batches_shapes(tmp_path):
    make_folder(tmp_path, [f"{i}.png" for i in range(5)])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + np.uint8([255, 0, 0])).save(tmp_path / "red.png")
    store = dl.ImageStore(str(tmp_path), image_io.list_images(str(tmp_path)), 16)
    assert store.channels == 3 and store.in_memory
    batches = list(dl.BatchLoader(store, np.arange(6), np.arange(6), batch_size=4))
    assert [b[0].shape for b in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert batches[0][0].dtype == torch.uint8


def test_streaming_workers_give_the_in_memory_batches_in_every_epoch(tmp_path):
    make_folder(tmp_path, [f"{i}.png" for i in range(10)])
    names = image_io.list_images(str(tmp_path))
    cached, streamed = (dl.ImageStore(str(tmp_path), names, 16, cache_gb=gb) for gb in (4.0, 0))
    assert cached.in_memory and not streamed.in_memory
    a, b = (dl.BatchLoader(store, np.arange(10), np.arange(10), batch_size=4, shuffle=True, seed=5, num_workers=w)
            for store, w in ((cached, 0), (streamed, 2)))
    orders = []
    for epoch in range(3):                      # the workers live on across epochs; the order still changes
        a.set_epoch(epoch), b.set_epoch(epoch)
        pairs = list(zip(a, b))
        assert len(pairs) == 3
        for (x, y, i), (x2, y2, i2) in pairs:
            assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)
        orders.append(torch.cat([i for _, _, i in b]).tolist())
    assert orders[0] != orders[1] != orders[2]


# ============ synthetic chest X-rays ============

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    dl.main(generator_args(out, num_images=60, num_unlabeled=7, image_size=32, seed=3))
    return out


def test_generator_writes_images_labels_classes_and_preview(synthetic):
    import pandas as pd
    df = pd.read_csv(synthetic / "labels.csv", dtype={"patient_id": str})
    assert list(df.columns) == ["filename", "label", "patient_id"] and len(df) == 60
    assert sorted(df.label.unique()) == [0, 1, 2]
    unlabeled = sorted(os.listdir(synthetic / "unlabeled"))
    assert len(unlabeled) == 7 and not set(df.filename) & {f"unlabeled/{f}" for f in unlabeled}
    assert len((synthetic / "classes.txt").read_text().splitlines()) == 3
    assert (synthetic / "preview.png").stat().st_size > 1000
    image = np.array(Image.open(synthetic / df.filename[0]))
    assert image.dtype == np.uint8 and image.shape == (32, 32)
    assert len(image_io.list_images(str(synthetic))) == 67            # preview.png is not data


def test_several_images_per_patient_sharing_a_class(synthetic):
    import pandas as pd
    df = pd.read_csv(synthetic / "labels.csv", dtype={"patient_id": str})
    per_patient = df.groupby("patient_id").size()
    assert per_patient.iloc[:-1].between(*synth.IMAGES_PER_PATIENT).all() and per_patient.max() >= 3
    assert (df.groupby("patient_id").label.nunique() == 1).all()
    table = label_tables.read_label_table(str(synthetic / "labels.csv"), str(synthetic), num_classes=3)
    for p in np.unique(table.patient_ids):
        assert len(set(table.splits[table.patient_ids == p])) == 1


def test_generator_is_byte_identical_for_a_seed(synthetic, tmp_path):
    dl.main(generator_args(tmp_path / "same", num_images=60, num_unlabeled=7, image_size=32, seed=3))
    dl.main(generator_args(tmp_path / "other", num_images=60, num_unlabeled=7, image_size=32, seed=4))
    names = ["labels.csv"] + image_io.list_images(str(synthetic))
    for name in names:
        assert (synthetic / name).read_bytes() == (tmp_path / "same" / name).read_bytes(), name
    common = sorted(set(names[1:]) & set(image_io.list_images(str(tmp_path / "other"))))
    assert len(common) > 40
    assert all((synthetic / n).read_bytes() != (tmp_path / "other" / n).read_bytes() for n in common)


@pytest.mark.parametrize("size", [32, 64])
def test_every_finding_changes_the_image(size):
    """Same patient, same image draws: only the label differs, and the finding is visible."""
    for label in range(1, synth.MAX_SYNTHETIC_CLASSES):
        normal, sick = (synth.render_chest_xray(synth._patient_anatomy(np.random.default_rng([5, label]), y), y,
                                             np.random.default_rng(9), size) for y in (0, label))
        diff = np.abs(sick.astype(int) - normal.astype(int))
        assert (diff > 12).sum() >= 4, f"class {label} at {size} px"


def test_findings_csv_names_a_box_for_every_drawn_finding(synthetic):
    import pandas as pd
    labels = pd.read_csv(synthetic / "labels.csv")
    findings = pd.read_csv(synthetic / "findings.csv")
    assert list(findings.columns) == ["filename", "finding", "x0", "y0", "x1", "y1"]
    boxes = label_tables.read_findings(str(synthetic))
    assert set(boxes) == set(labels.filename[labels.label > 0])        # normal images have no finding
    assert set(findings.finding) == {"consolidation", "nodules"}
    assert ((findings.x0 >= 0) & (findings.x0 < findings.x1) & (findings.x1 <= 32)).all()
    assert ((findings.y0 >= 0) & (findings.y0 < findings.y1) & (findings.y1 <= 32)).all()
    assert not any(f.startswith("unlabeled/") for f in boxes)


@pytest.mark.parametrize("label", range(1, synth.MAX_SYNTHETIC_CLASSES))
def test_finding_boxes_hold_what_the_finding_added(label, monkeypatch):
    """Before exposure (which renormalises the whole image) the finding adds density: most of it lies in
    its boxes, which cover a small part of the image. Asking for the boxes draws nothing differently."""
    args = lambda y: (synth._patient_anatomy(np.random.default_rng([5, label]), y), y)     # noqa: E731
    boxes = []
    plain = synth.render_chest_xray(*args(label), np.random.default_rng(9), 64)
    assert np.array_equal(plain, synth.render_chest_xray(*args(label), np.random.default_rng(9), 64, boxes))
    monkeypatch.setattr(synth, "_expose", lambda rng, density: density)
    added = np.abs(synth.render_chest_xray(*args(label), np.random.default_rng(9), 64)
                   - synth.render_chest_xray(*args(0), np.random.default_rng(9), 64))
    inside = np.zeros((64, 64), bool)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
    assert boxes and (added * inside).sum() > 0.7 * added.sum() and inside.mean() < 0.2, (label, boxes)


def test_class_is_not_predictable_from_global_intensity(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    rows = synth.generate_images(str(tmp_path), "", 400, 5, 32, seed=1, stream=0)
    pixels = np.stack([np.array(Image.open(tmp_path / f), dtype=np.float64) for f, _, _ in rows])
    features = np.stack([pixels.mean(axis=(1, 2)), pixels.std(axis=(1, 2))], axis=1)
    labels = np.array([y for _, y, _ in rows])
    accuracy = cross_val_score(LogisticRegression(), (features - features.mean(0)) / features.std(0), labels,
                               cv=5).mean()
    assert accuracy < 0.32, accuracy                       # chance is 0.2 for 5 balanced classes


@pytest.mark.parametrize("multi_label", [False, True])
def test_split_shares_written_as_a_column_every_script_reads(tmp_path, multi_label):
    """--test_fraction writes the split the scripts would draw with those shares, by patient, as a column."""
    import pandas as pd
    out = tmp_path / "data"
    dl.main(generator_args(out, num_images=120, image_size=32, test_fraction=0.4, multi_label=multi_label))
    df = pd.read_csv(out / "labels.csv", dtype=str, keep_default_na=False)
    assert list(df.columns[:2]) == ["filename", "split"]
    table = label_tables.load_label_table(str(out / "labels.csv"), str(out), seed=7)        # the column wins over a seed
    assert (table.splits == df.split.to_numpy()).all()
    counts = {s: (table.splits == s).sum() for s in data_splits.SPLITS}
    assert 0.3 * 120 < counts["test"] < 0.5 * 120 and 0.08 * 120 < counts["val"] < 0.22 * 120, counts
    assert df.groupby("patient_id").split.nunique().max() == 1


def test_split_column_matches_the_scripts_own_split(tmp_path):
    """The shares 0.15/0.15 written as a column give the split the scripts draw from a file without one."""
    out = tmp_path / "data"
    dl.main(generator_args(out, num_images=90, image_size=32))
    before = label_tables.read_label_table(str(out / "labels.csv"), str(out)).splits
    dl.write_split_column(str(out / "labels.csv"), str(out), 42, 0.15, 0.15)
    assert (label_tables.read_label_table(str(out / "labels.csv"), str(out), seed=5).splits == before).all()
    with pytest.raises(UserError, match="already has a split column"):
        dl.write_split_column(str(out / "labels.csv"), str(out), 42, 0.15, 0.15)


@pytest.mark.parametrize("overrides,message", [
    (dict(val_fraction=0.5, test_fraction=0.5), "leave no training images"),
    (dict(from_npz=__file__, test_fraction=0.3), "brings its own train/val/test split"),
    (dict(num_classes=1), "--num_classes 1"),
    (dict(num_classes=6), "--num_classes 6"),
    (dict(num_images=2), "--num_images 2"),
    (dict(image_size=16), "--image_size 16"),
    (dict(num_unlabeled=-1), "--num_unlabeled -1"),
])
def test_generator_rejects_bad_flags(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        dl.main(generator_args(tmp_path, **overrides))


# ============ MedMNIST import ============

def write_npz(path: Path, **overrides) -> str:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.skipif(not BREASTMNIST.is_file(), reason=f"{BREASTMNIST} is absent (shared real-data folder)")
def test_breastmnist_import_keeps_the_official_split(tmp_path):
    rows = dl.main(generator_args(tmp_path, from_npz=str(BREASTMNIST)))
    table = label_tables.read_label_table(str(tmp_path / "labels.csv"), str(tmp_path), num_classes=2)
    assert [len(table.indices(s)) for s in data_splits.SPLITS] == [546, 78, 156]
    npz = np.load(BREASTMNIST)
    assert (table.labels[table.indices("test")] == npz["test_labels"].ravel()).all()
    first_test = rows[546 + 78][0]
    np.testing.assert_array_equal(image_io.load_image(str(tmp_path / first_test)), npz["test_images"][0])


def test_npz_rgb_and_column_labels(tmp_path):
    npz = write_npz(tmp_path / "rgb.npz")
    medmnist_npz.import_npz(npz, str(tmp_path / "out"))
    table = label_tables.read_label_table(str(tmp_path / "out" / "labels.csv"), str(tmp_path / "out"))
    assert table.num_classes == 2 and len(table.indices("val")) == 2
    assert image_io.load_image(str(tmp_path / "out" / table.filenames[0])).shape == (8, 8, 3)


def test_npz_missing_key(tmp_path):
    with pytest.raises(UserError, match="'val_labels' is missing"):
        medmnist_npz.import_npz(write_npz(tmp_path / "bad.npz", val_labels=None), str(tmp_path / "out"))
    with pytest.raises(UserError, match="no such file"):
        medmnist_npz.import_npz(str(tmp_path / "absent.npz"), str(tmp_path / "out"))


# ============ label files ============

@pytest.fixture
def folder(tmp_path):
    names = [f"img{i}.png" for i in range(4)] + ["sub/img4.png", "sub/img5.png"]
    return make_folder(tmp_path / "data", names)


def test_header_optional_and_subfolders(folder, tmp_path):
    rows = ["img0.png,0", "img1.png,1", "img2.png,0", "img3.png,1", "sub/img4.png,0", "sub/img5.png,1"]
    with_header = label_tables.read_label_table(write_csv(tmp_path / "a.csv", ["filename,label"] + rows), str(folder))
    without = label_tables.read_label_table(write_csv(tmp_path / "b.csv", rows), str(folder))
    assert with_header.filenames == without.filenames and (with_header.labels == without.labels).all()
    assert with_header.class_names == ["0", "1"]


def test_class_names_are_sorted_and_kept(folder, tmp_path):
    csv = write_csv(tmp_path / "l.csv", ["filename,label", "img0.png,pneumonia", "img1.png,normal",
                                         "img2.png,covid", "img3.png,normal"])
    table = label_tables.read_label_table(csv, str(folder), num_classes=3)
    assert table.class_names == ["covid", "normal", "pneumonia"]
    assert table.labels.tolist() == [2, 1, 0, 1]


def test_split_and_patient_columns_positional_and_by_header(folder, tmp_path):
    positional = write_csv(tmp_path / "p.csv", ["img0.png,0,train,A", "img1.png,1,Validation,B",
                                                "img2.png,0,test,C", "img3.png,1,train,A"])
    table = label_tables.read_label_table(positional, str(folder))
    assert table.splits.tolist() == ["train", "val", "test", "train"]
    assert table.patient_ids.tolist() == ["A", "B", "C", "A"]
    by_header = write_csv(tmp_path / "h.csv", ["patient_id,split,label,filename", "A,train,0,img0.png",
                                               "B,val,1,img1.png", "C,test,1,img2.png"])
    assert label_tables.read_label_table(by_header, str(folder)).splits.tolist() == ["train", "val", "test"]


@pytest.mark.parametrize("lines,num_classes,message", [
    ([], None, "empty"),
    (["filename,label"], None, "no rows"),
    (["name,label", "img0.png,0"], None, "lacks a filename or label column"),
    (["img0.png"], None, "only one column"),
    (["filename,label", "img0.png,0", "gone.png,1"], None, "not found .* 'gone.png'"),
    (["filename,label", "img0.png,0", "img0.png,1"], None, r"rows 2 \('img0.png'\) and 3 \('img0.png'\) name the same image"),
    (["filename,label", "img0.png,0", "img1.png,3"], 3, r"label 3 is outside \[0, 3\)"),
    (["filename,label", "img0.png,-1"], None, "label -1 is outside"),
    (["filename,label", "img0.png,a", "img1.png,b", "img2.png,c", "img3.png,d"], 3, "name 4 classes.*--num_classes is 3"),
    (["filename,label,split", "img0.png,0,train", "img1.png,1,holdout"], None, "unknown split 'holdout'"),
    (["filename,label,split", "img0.png,0,val", "img1.png,1,test"], None, "train split is empty"),
    (["filename,label", "img0.png,"], None, "row 2 has an empty filename or label"),
])
def test_bad_label_files(folder, tmp_path, lines, num_classes, message):
    csv = write_csv(tmp_path / "bad.csv", lines) if lines else str(tmp_path / "empty.csv")
    if not lines:
        Path(csv).write_text("")
    with pytest.raises(UserError, match=message) as info:
        label_tables.read_label_table(csv, str(folder), num_classes=num_classes)
    assert "\n" not in str(info.value)


def test_missing_label_file_and_data_dir(folder, tmp_path):
    with pytest.raises(UserError, match="--label_file .*no such file"):
        label_tables.read_label_table(str(tmp_path / "none.csv"), str(folder))
    csv = write_csv(tmp_path / "l.csv", ["img0.png,0"])
    with pytest.raises(UserError, match="--data_dir .*no such folder"):
        label_tables.read_label_table(csv, str(tmp_path / "nowhere"))


def test_empty_val_split_is_a_warning(folder, tmp_path, capsys):
    csv = write_csv(tmp_path / "l.csv", ["filename,label,split", "img0.png,0,train", "img1.png,1,train",
                                         "img2.png,1,test"])
    label_tables.read_label_table(csv, str(folder))
    assert "val split is empty" in capsys.readouterr().err


# ============ splits and label subsets ============

def test_splits_deterministic_stratified_and_row_order_free():
    labels = np.repeat([0, 1, 2], [200, 100, 40])
    groups = np.arange(len(labels)).astype(str)
    a, b = data_splits.assign_splits(labels, groups, seed=7), data_splits.assign_splits(labels, groups, seed=7)
    assert (a == b).all() and (a != data_splits.assign_splits(labels, groups, seed=8)).any()
    for c, n in ((0, 200), (1, 100), (2, 40)):
        fractions = [np.mean(a[labels == c] == s) for s in data_splits.SPLITS]
        np.testing.assert_allclose(fractions, [0.7, 0.15, 0.15], atol=1.5 / n + 0.01)
    order = np.random.default_rng(0).permutation(len(labels))
    assert (data_splits.assign_splits(labels[order], groups[order], seed=7) == a[order]).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 25)), min_size=1, max_size=120), st.integers(0, 99))
def test_split_property_patients_never_straddle_and_train_has_every_class(rows, seed):
    groups = np.array([f"p{g}" for _, g in rows])
    labels = np.array([y for y, _ in rows])
    splits = data_splits.assign_splits(labels, groups, seed)
    assert set(splits) <= set(data_splits.SPLITS)
    for g in np.unique(groups):
        assert len(set(splits[groups == g])) == 1
    majority = {g: np.bincount(labels[groups == g]).argmax() for g in np.unique(groups)}
    assert set(majority.values()) <= set(labels[splits == "train"])


def test_stratified_subset():
    labels = np.repeat([0, 1, 2], [80, 15, 5])
    train = np.arange(100)
    small = data_splits.stratified_subset(labels, train, 0.1, seed=1)
    assert (small == data_splits.stratified_subset(labels, train, 0.1, seed=1)).all()
    assert np.bincount(labels[small]).tolist() == [8, 2, 1]            # at least one of the rare class
    assert set(small) <= set(data_splits.stratified_subset(labels, train, 0.3, seed=1))   # nested
    assert np.bincount(labels[data_splits.stratified_subset(labels, train, per_class=3, seed=1)]).tolist() == [3, 3, 3]
    assert len(data_splits.stratified_subset(labels, train, 1.0, seed=1)) == 100
    with pytest.raises(UserError, match="outside"):
        data_splits.stratified_subset(labels, train, 0.0, seed=1)


# ============ command line ============

def test_cli_error_is_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "data_loader.py", "--num_classes", "9", "--output_dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: --num_classes 9")
