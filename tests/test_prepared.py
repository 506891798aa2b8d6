"""Prepared folders (data_loader.py --prepare): the same files, bytes, splits and numbers as the source folder;
an interrupted preparation continues; unreadable files listed; a changed source detected."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import data_loader
import evaluate
import fine_tune
import image_io
import label_tables
import prepared_images
import train_ssl
from tiny_data import write_tiny_dataset
from utils import UserError

SIDE = 32


def make_source(folder, n=14):
    """Tiny grayscale images with labels.csv, one colour image, one broken file and one too small."""
    write_tiny_dataset(folder, n=n, size=40, splits=(8, 3))
    rng = np.random.default_rng(1)
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (30, 50, 3)).astype(np.uint8)).save(os.path.join(folder, "sub", "col.png"))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not a png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(os.path.join(folder, "tiny.png"))
    return str(folder)


def prepare(src, out, chunk_size=4):
    return prepared_images.prepare(src, str(out), SIDE, workers=1, chunk_size=chunk_size)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    src = make_source(root / "src")
    prepare(src, root / "prep")
    return src, str(root / "prep")


def test_a_prepared_folder_lists_reads_and_labels_like_its_source(folders):
    src, prep = folders
    names = image_io.list_images(src)
    assert image_io.list_images(prep) == names
    assert image_io.filter_readable(prep, names, quiet=True) == image_io.filter_readable(src, names, quiet=True)
    for channels in (None, 1, 3):
        a = data_loader.ImageStore(src, names, SIDE, channels=channels, skip_unreadable=True)
        b = data_loader.ImageStore(prep, names, SIDE, channels=channels, skip_unreadable=True)
        assert b.filenames == a.filenames and b.channels == a.channels and b.images is None
        idx = torch.arange(len(a))
        assert torch.equal(b.batch(idx), a.batch(idx)) and torch.equal(b[3], a[3])
    assert data_loader.ImageStore(prep, ["sub/col.png", "img000.png"], SIDE).channels == 3
    for task_table in (label_tables.load_label_table(os.path.join(prep, "labels.csv"), prep),
                       label_tables.load_label_table(os.path.join(src, "labels.csv"), prep)):
        table = label_tables.load_label_table(os.path.join(src, "labels.csv"), src)
        assert task_table.filenames == table.filenames and (task_table.splits == table.splits).all()
    assert open(os.path.join(prep, "labels.csv")).read() == open(os.path.join(src, "labels.csv")).read()
    assert image_io.source_sizes(prep, ["sub/col.png"]) == [(50, 30)]


def test_without_pread_the_memory_map_gives_the_same_images(folders, monkeypatch):
    src, prep = folders
    names = image_io.filter_readable(src, image_io.list_images(src), quiet=True)[0]
    expected = data_loader.ImageStore(src, names, SIDE, channels=3).batch(torch.arange(len(names)))
    monkeypatch.delattr(os, "preadv")
    prepared = prepared_images.PreparedImages(prep, json.load(open(os.path.join(prep, "manifest.json"))))
    assert np.array_equal(prepared.read(prepared.positions(names), 3), expected.numpy())


def test_a_label_file_naming_an_image_the_prepared_folder_lacks_is_refused(folders, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\nimg000.png,0\nimg001.png,1\ngone.png,2\n")
    with pytest.raises(UserError, match="1 file\\(s\\) not found under .*first 'gone.png' \\(row 4\\)"):
        label_tables.load_label_table(str(labels), folders[1])


def test_unreadable_files_are_listed_and_refused_as_labelled_data(folders, capsys):
    src, prep = folders
    manifest = json.load(open(os.path.join(prep, "manifest.json")))
    assert [u["file"] for u in manifest["unreadable"]] == ["broken.png", "tiny.png"]
    assert manifest["images"] == 15 and manifest["channels"] == 3 and len(manifest["files"]) == 17
    with pytest.raises(UserError, match="broken.png: not a readable image"):
        data_loader.ImageStore(prep, ["img000.png", "broken.png"], SIDE)
    prepare(src, os.path.join(os.path.dirname(prep), "again"))
    assert "2 unreadable image(s)" in capsys.readouterr().err


def test_an_interrupted_preparation_continues_where_it_stopped(tmp_path, monkeypatch, folders):
    src = make_source(tmp_path / "src")
    out = tmp_path / "prep"
    store_chunk, calls = prepared_images._store_chunk, []

    def killed_after_first(*a):
        if calls:
            raise KeyboardInterrupt
        calls.append(a[2])
        return store_chunk(*a)
    monkeypatch.setattr(prepared_images, "_store_chunk", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out)
    assert os.listdir(out / "progress") == ["00000.json"] and not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="did not finish; continue it with python data_loader.py --prepare"):
        image_io.list_images(str(out))

    def counted(*a):
        calls.append(a[2])
        return store_chunk(*a)
    monkeypatch.setattr(prepared_images, "_store_chunk", counted)
    prepare(src, out)
    assert calls == [0, 1, 2, 3, 4]                          # 17 files in chunks of 4: chunk 0 was not redone
    reference = folders[1]
    assert (out / "images.npy").read_bytes() == open(os.path.join(reference, "images.npy"), "rb").read()
    assert (out / "index.csv").read_text() == open(os.path.join(reference, "index.csv")).read()


@pytest.mark.parametrize("change", ["added", "removed", "modified", "touched"])
def test_a_changed_source_is_detected_with_the_command_that_refreshes_it(tmp_path, change):
    src = make_source(tmp_path / "src", n=6)
    prepare(src, tmp_path / "prep")
    path = os.path.join(src, "img001.png")
    if change == "added":
        shutil.copyfile(path, os.path.join(src, "new.png"))
    elif change == "removed":
        os.remove(path)
    elif change == "modified":
        Image.fromarray(np.zeros((40, 60), np.uint8)).save(path)
    else:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(UserError, match=f"1 {change if change != 'touched' else 'modified'}.*"
                                        f"python data_loader.py --prepare --data_dir {src}"):
        image_io.list_images(str(tmp_path / "prep"))


def test_another_side_and_the_pil_pipeline_are_refused(folders, tmp_path):
    src, prep = folders
    with pytest.raises(UserError, match="prepared at 32 px, this run reads them at 48 px"):
        data_loader.ImageStore(prep, ["img000.png"], 48)
    args = train_ssl.get_args_parser().parse_args(["--data_dir", prep, "--output_dir", str(tmp_path / "o"),
                                                   "--image_size", "32", "--augment", "pil", "--device", "cpu"])
    with pytest.raises(UserError, match="--augment pil decodes the image files"):
        train_ssl.main(args)
    with pytest.raises(UserError, match="is --data_dir itself"):
        prepared_images.prepare(src, src, SIDE)


def test_the_cli_prepares_and_names_the_folder(tmp_path, capsys):
    src = make_source(tmp_path / "src", n=6)
    args = data_loader.get_args_parser().parse_args(["--prepare", "--data_dir", src, "--output_dir",
                                                     str(tmp_path / "p"), "--image_size", "32", "--num_workers", "1"])
    manifest = data_loader.main(args)
    assert manifest["images"] == 7 and "prepared 7 images at 32 px" in capsys.readouterr().out
    with pytest.raises(UserError, match="--data_dir .* is read by --prepare only"):
        data_loader.main(data_loader.get_args_parser().parse_args(["--data_dir", src, "--output_dir", str(tmp_path)]))
    with pytest.raises(UserError, match="--prepare reads the folder named by --data_dir; give it"):
        data_loader.main(data_loader.get_args_parser().parse_args(["--prepare", "--output_dir", str(tmp_path)]))


def run_phases(data_dir, out):
    """train_ssl (kNN monitor on), fine_tune from it, evaluate on the test split: the metrics.json."""
    labels = os.path.join(data_dir, "labels.csv")
    torch.set_num_threads(1)           # as the other run had it: evaluate's t-SNE and UMAP change the thread pools
    common = ["--data_dir", data_dir, "--label_file", labels, "--device", "cpu", "--image_size", str(SIDE)]
    train_ssl.main(train_ssl.get_args_parser().parse_args(
        common + ["--output_dir", str(out / "ssl"), "--batch_size", "8", "--num_epochs", "2", "--warmup_epochs", "1",
                  "--eval_every", "1", "--seed", "3"]))
    fine_tune.main(fine_tune.get_args_parser().parse_args(
        common + ["--output_dir", str(out / "ft"), "--ssl_checkpoint", str(out / "ssl" / "best_ssl_model.pth"),
                  "--batch_size", "4", "--num_epochs", "2", "--seed", "1"]))
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(out / "ft" / "best_finetuned_model.pth"), "--data_dir", data_dir, "--label_file", labels,
         "--output_dir", str(out / "eval"), "--bootstrap", "20", "--device", "cpu"]))
    return json.loads((out / "eval" / "metrics.json").read_text())


def test_every_phase_gives_the_same_numbers_from_the_prepared_folder(tmp_path, one_torch_thread):
    src = write_tiny_dataset(tmp_path / "src", n=24, size=40, splits=(12, 6))
    prepare(src, tmp_path / "prep", chunk_size=10)
    a = run_phases(src, tmp_path / "from_source")
    b = run_phases(str(tmp_path / "prep"), tmp_path / "from_prepared")
    assert a["num_images"] == b["num_images"] == 6
    assert a["metrics"] == b["metrics"]
    for run in ("ssl/ssl_history.csv", "ft/finetuned_history.csv"):
        a, b = (pd.read_csv(tmp_path / d / run).drop(columns="images_per_sec")
                for d in ("from_source", "from_prepared"))
        pd.testing.assert_frame_equal(a, b)                  # every epoch's loss, lr and val numbers


def test_torchrun_processes_pretrain_the_same_from_the_prepared_folder(tmp_path):
    """Two gloo processes on the CPU: the same loss every epoch from either folder."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = write_tiny_dataset(tmp_path / "src", n=16, size=40, classes=2)
    prepare(src, tmp_path / "prep")
    losses = []
    for data in (src, str(tmp_path / "prep")):
        out = tmp_path / f"out_{os.path.basename(data)}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(root, "train_ssl.py"), "--data_dir", data, "--output_dir", str(out), "--image_size",
               str(SIDE), "--num_epochs", "2", "--batch_size", "4", "--device", "cpu", "--warmup_epochs", "1"]
        proc = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses.append(pd.read_csv(out / "ssl_history.csv")[["loss", "embedding_std"]])
        assert json.loads((out / "ssl_settings.json").read_text())["prepared_folder"] == (data != src)
    pd.testing.assert_frame_equal(*losses)
