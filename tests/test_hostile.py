"""A hostile user's matrix (issue 22): bad flags, bad label files, bad data folders, runs into folders that
hold other runs, locked folders, disagreeing checkpoints, across data_loader.py, train_ssl.py, fine_tune.py
and evaluate.py. Every case ends with exit 0 and the right files, or exit 2 and one `error:` line naming the
problem and the fix; never a traceback, never a half-written or lost file. docs/errors.md has a row per case.

Cases run in-process through utils.run_cli on shared module-scoped fixtures: 24 PNGs of 32 px, one SSL
checkpoint and one fine-tuned checkpoint (1 epoch each, trained at 40 px with the standard stem, ~3x cheaper
than the small stem at 32). Two cases run as subprocesses to show the top level prints no traceback.
"""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import data_loader  # noqa: E402
import data_splits  # noqa: E402
import evaluate  # noqa: E402
import fine_tune  # noqa: E402
import label_tables  # noqa: E402
import scoring  # noqa: E402
import train_ssl  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from tiny_data import write_tiny_dataset  # noqa: E402

SCRIPTS = {"data_loader": data_loader, "train_ssl": train_ssl, "fine_tune": fine_tune, "evaluate": evaluate}
RUNTIME = "--device cpu --precision fp32"
SSL = f"--data_dir {{data}} --output_dir {{out}} --image_size 40 --batch_size 8 --num_epochs 1 --warmup_epochs 0 {RUNTIME}"
FT = (f"--data_dir {{data}} --label_file {{labels}}/good.csv --output_dir {{out}} --image_size 40 --batch_size 8 "
      f"--num_epochs 1 {RUNTIME}")
FT_SSL = FT + " --ssl_checkpoint {ssl}/best_ssl_model.pth"
EV = f"--data_dir {{data}} --label_file {{labels}}/good.csv --output_dir {{out}} --bootstrap 10 {RUNTIME}"
EV_FT = EV + " --checkpoint {ft}/best_finetuned_model.pth"
GEN = "--output_dir {out} --num_images 4 --num_classes 2 --image_size 32"


# ============ shared fixtures ============

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def _multilabel_files(folder: str) -> None:
    """Multi-label files over the 24 images (split column: 16 train, 4 val, 4 test), each with one flaw."""
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4

    def write(name, header, cells):
        rows = [f"img{i:03d}.png,{s}," + ",".join(map(str, cells(i))) for i, s in enumerate(splits)]
        with open(os.path.join(folder, name), "w") as f:
            f.write(f"filename,split,{header}\n" + "\n".join(rows) + "\n")
    write("ml_all_uncertain.csv", "Effusion,Nodule", lambda i: (i % 2, -1))
    write("ml_blank.csv", "Effusion,Nodule", lambda i: (i % 2, 1 if i % 3 == 0 else ""))
    write("ml_words.csv", "Effusion,Nodule", lambda i: (i % 2, "yes" if i % 3 == 0 else "no"))
    write("ml_all_positive_test.csv", "Effusion,Nodule", lambda i: (1 if i >= 20 else i % 2, (i + 1) % 2))
    write("ml_same_header.csv", "Effusion,Effusion,Nodule", lambda i: (i % 2, i % 2, (i + 1) % 2))
    write("ml_unnamed.csv", "Effusion,,Nodule", lambda i: (i % 2, 0, (i + 1) % 2))


def _npz_files(folder: str) -> None:
    """MedMNIST-style archives of every shape and dtype, 4 images a split."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)

    def save(name, images=lambda n: rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), labels=lambda n: np.arange(n) % 2,
             drop=(), sizes=(4, 4, 4)):
        arrays = {}
        for split, n in zip(("train", "val", "test"), sizes):
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images(n), labels(n)
        np.savez(os.path.join(folder, name), **{k: v for k, v in arrays.items() if k not in drop})
    save("float01.npz", images=lambda n: rng.random((n, 28, 28), dtype=np.float32))
    save("float255.npz", images=lambda n: rng.random((n, 28, 28)) * 255)
    save("rgb.npz", images=lambda n: rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8))
    save("uint16.npz", images=lambda n: rng.integers(0, 4096, (n, 28, 28), dtype=np.uint16))
    save("labels_column.npz", labels=lambda n: (np.arange(n) % 2)[:, None])
    save("multilabel.npz", labels=lambda n: np.stack([np.arange(n) % 2, (np.arange(n) + 1) % 2, np.ones(n, int)], 1))
    save("missing_key.npz", drop=("test_labels",))
    save("wrong_length.npz", labels=lambda n: np.arange(n - 1) % 2)
    save("fractional_labels.npz", labels=lambda n: np.arange(n) % 2 + 0.5)
    save("nan_labels.npz", labels=lambda n: np.full(n, np.nan))
    save("string_labels.npz", labels=lambda n: np.array(["a", "b"] * (n // 2)))
    save("volumes.npz", images=lambda n: rng.integers(0, 255, (n, 8, 28, 28), dtype=np.uint8))
    save("rgba.npz", images=lambda n: rng.integers(0, 255, (n, 28, 28, 4), dtype=np.uint8))
    save("empty.npz", sizes=(0, 0, 0))
    save("one_class.npz", labels=lambda n: np.zeros(n, int))
    save("nan_images.npz", images=lambda n: np.full((n, 28, 28), np.nan))


def _image_folders(w: dict) -> None:
    """--images inputs: files that are no images, grey and RGB together, a DICOM without pixels."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    for name in ("not_images", "mixed", "no_pixels", "dicom_only"):
        w[name] = os.path.join(os.path.dirname(w["data"]), name)
        os.makedirs(w[name])
    for name in ("notes.txt", "labels.csv"):
        with open(os.path.join(w["not_images"], name), "w") as f:
            f.write("not an image\n")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(os.path.join(w["mixed"], "grey.png"))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(os.path.join(w["mixed"], "rgb.png"))
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)).save(os.path.join(w["mixed"], "rgba.png"))
    Image.fromarray(rng.integers(0, 255, (48, 24), dtype=np.uint8)).save(os.path.join(w["mixed"], "tall.jpg"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta, ds.PatientName, ds.Modality = meta, "Nobody", "OT"
    for folder in ("no_pixels", "dicom_only"):
        ds.save_as(os.path.join(w[folder], "report.dcm"), enforce_file_format=True)
    shutil.copy(os.path.join(w["data"], "img000.png"), w["no_pixels"])
    w["seen"] = os.path.join(os.path.dirname(w["data"]), "seen")         # scans and an earlier run's outputs
    shutil.copytree(w["mixed"], w["seen"])
    os.makedirs(os.path.join(w["seen"], "predictions"))
    shutil.copy(os.path.join(w["mixed"], "rgb.png"), os.path.join(w["seen"], "predictions", "gradcam.png"))


def _label_files(folder: str, data: str) -> None:
    """Good and hostile label files over the 24 images of `data` (img000..img023, labels i % 2)."""
    rows = [(f"img{i:03d}.png", i % 2) for i in range(24)]
    plain = "\n".join(f"{f},{y}" for f, y in rows)
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4

    def write(name, text, encoding="utf-8"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(text.encode(encoding))
    os.makedirs(folder)
    write("good.csv", "filename,label\n" + plain + "\n")
    write("other.csv", "filename,label\n" + plain + "\n" + "\n")     # same rows, other bytes: another file
    write("r_quoted.csv", '"Filename","Label"\n' + "\n".join(f'"{f}","{y}"' for f, y in rows) + "\n")
    write("dup_abs.csv", "filename,label\n" + plain + f"\n{os.path.join(data, 'img000.png')},1\n")
    write("dup_dotdot.csv", "filename,label\n" + plain + f"\n../{os.path.basename(data)}/img001.png,0\n")
    write("outside.csv", "filename,label\n" + plain + "\n../elsewhere.png,0\n")
    write("blank_patient.csv", "filename,label,patient_id\n" +
          "\n".join(f"{f},{y},{'' if i in (4, 9) else f'P{i // 2}'}" for i, (f, y) in enumerate(rows)) + "\n")
    write("straddle.csv", "filename,label,split,patient_id\n" +
          "\n".join(f"{f},{y},{s},P{i // 3}" for i, ((f, y), s) in enumerate(zip(rows, splits))) + "\n")
    write("one_class.csv", "filename,label\n" + "\n".join(f"{f},normal" for f, _ in rows) + "\n")
    write("latin1.csv", "filename,label\n" + "\n".join(f"{f},{'süß' if y else 'krank'}" for f, y in rows) + "\n",
          "latin-1")
    write("utf16.csv", "filename,label\n" + plain + "\n", "utf-16")
    write("semicolons.csv", "filename;label\n" + plain.replace(",", ";") + "\n")
    write("tiny_image.csv", "filename,label,split\n" + "\n".join(f"{f},{y},{s}" for (f, y), s in zip(rows, splits)) +
          "\ntiny/px.png,1,train\n")
    write("bad_split.csv", "filename,label,split\n" + "\n".join(f"{f},{y},holdout" for f, y in rows) + "\n")
    write("header_only.csv", "filename,label\n")
    write("no_val.csv", "filename,label,split\n" + "\n".join(f"{f},{y},{'test' if i >= 20 else 'train'}"
                                                               for i, (f, y) in enumerate(rows)) + "\n")
    arrays = {f"{s}_{k}": np.zeros((4, 28, 28), np.uint8) if k == "images" else np.arange(4) % 2
              for s in ("train", "val", "test") for k in ("images", "labels")}
    _multilabel_files(folder)
    np.savez(os.path.join(folder, "whole.npz"), **arrays)
    with open(os.path.join(folder, "whole.npz"), "rb") as f:
        whole = f.read()
    with open(os.path.join(folder, "half.npz"), "wb") as f:       # a copy cut short
        f.write(whole[: len(whole) // 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Paths of the shared data, label files, odd folders and the two trained runs."""
    root = tmp_path_factory.mktemp("hostile")
    w = {k: str(root / k) for k in ("data", "labels", "ssl", "ft", "empty", "one", "pixels", "npz")}
    write_tiny_dataset(w["data"], n=24, size=32, classes=2)
    _label_files(w["labels"], w["data"])
    os.makedirs(w["empty"])
    os.makedirs(w["one"])
    shutil.copy(os.path.join(w["data"], "img000.png"), w["one"])
    os.makedirs(w["pixels"])
    for i in range(4):
        Image.fromarray(np.full((1, 1), 40 * i, np.uint8)).save(os.path.join(w["pixels"], f"{i}.png"))
    fmt = {**w, "out": w["ssl"]}
    train_ssl.main(train_ssl.get_args_parser().parse_args(shlex.split(SSL.format(**fmt))))
    fmt = {**w, "out": w["ft"]}
    fine_tune.main(fine_tune.get_args_parser().parse_args(shlex.split(FT_SSL.format(**fmt))))
    w["mlft"] = str(root / "mlft")                            # a multi-label classifier (findings Effusion, Nodule)
    fmt = {**w, "out": w["mlft"]}
    fine_tune.main(fine_tune.get_args_parser().parse_args(shlex.split(ML.replace("{ml}", "blank").format(**fmt))))
    _npz_files(w["npz"])
    _image_folders(w)
    os.makedirs(os.path.join(w["data"], "tiny"))             # after training: a 1x1 image a label file names
    Image.fromarray(np.full((1, 1), 90, np.uint8)).save(os.path.join(w["data"], "tiny", "px.png"))
    w["a_file"] = os.path.join(w["labels"], "good.csv")
    return w


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def visible_files(folder: str) -> list:
    """Files a run left in `folder` (its hidden lock file excluded)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder)
                  for f in fs if not f.startswith("."))


# ============ holding a lock from another process ============

HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "h", "started": "t", "command": "train_ssl.py --x"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder: str, name: str) -> subprocess.Popen:
    """A live process holding `<folder>/.<name>.lock`, as a concurrent run does."""
    os.makedirs(folder, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, os.path.join(folder, f".{name}.lock")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def leave_stale_lock(folder: str, name: str) -> None:
    """The lock file of a run that was killed: its content stays, its flock went with the process."""
    proc = hold_lock(folder, name)
    proc.kill()
    proc.wait()


# ============ the matrix ============

@dataclass
class Case:
    script: str
    argv: str                  # {data} {labels} {ssl} {ft} {out} {empty} {one} {pixels} {a_file} are filled in
    code: int                  # 0 or 2
    message: str               # a fragment of the last stderr line (exit 2) or of stdout+stderr (exit 0)
    exists: tuple = ()         # paths that must exist afterwards (exit 0)
    unchanged: tuple = ()      # paths whose bytes must not change (a refused run into a finished run's folder)
    setup: str = ""            # "lock:<name>" (a live holder) or "stale:<name>" (a dead one's lock) in {out};
    #                            "file:<name>" or "folder:<name>" made in {out}; "no_onnx": onnx cannot be imported
    copy: str = ""             # "ssl" or "ft": {out} starts as a copy of that finished run's folder


FT_BEST, SSL_BEST = "{ft}/best_finetuned_model.pth", "{ssl}/best_ssl_model.pth"
CASES = {
    # ---- data_loader.py (the synthetic generator and the .npz import) ----
    "gen-num_images-0": Case("data_loader", GEN + " --num_images 0", 2, "--num_images 0: must be an integer in [1,"),
    "gen-num_classes-9": Case("data_loader", GEN + " --num_classes 9", 2, "--num_classes 9: must be an integer in [2, 5]"),
    "gen-num_classes-1": Case("data_loader", GEN + " --num_classes 1", 2, "--num_classes 1: must be an integer in [2, 5]"),
    "gen-image_size-16": Case("data_loader", GEN + " --image_size 16", 2, "--image_size 16: must be an integer in [32, 2048]"),
    "gen-num_unlabeled-neg": Case("data_loader", GEN + " --num_unlabeled -1", 2, "--num_unlabeled -1: must be an integer in [0,"),
    "gen-seed-neg": Case("data_loader", GEN + " --seed -5", 2, "--seed -5: must be an integer >= 0"),
    "gen-fewer-images-than-classes": Case("data_loader", GEN + " --num_images 2 --num_classes 3", 2,
                                          "need at least one image per class (3)"),
    "gen-npz-missing": Case("data_loader", "--output_dir {out} --from_npz {out}/none.npz", 2, "--from_npz {out}/none.npz: no such file"),
    "gen-npz-folder": Case("data_loader", "--output_dir {out} --from_npz {labels}", 2, "--from_npz {labels}: is a folder, not a file"),
    "gen-npz-not-npz": Case("data_loader", "--output_dir {out} --from_npz {a_file}", 2, "not a readable .npz file"),
    "gen-npz-half-copied": Case("data_loader", "--output_dir {out} --from_npz {labels}/half.npz", 2,
                                "--from_npz {labels}/half.npz: not a readable .npz file"),
    "gen-fractions-sum": Case("data_loader", GEN + " --val_fraction 0.5 --test_fraction 0.5", 2, "leave no training images"),
    "gen-npz-fractions": Case("data_loader", "--output_dir {out} --from_npz {a_file} --test_fraction 0.3", 2,
                              "a MedMNIST file brings its own train/val/test split"),
    "gen-output-is-a-file": Case("data_loader", GEN.replace("{out}", "{a_file}"), 2, "--output_dir {a_file}: is a file, not a folder",
                                 unchanged=("{a_file}",)),
    "gen-locked": Case("data_loader", GEN, 2, "is in use by another run (process", setup="lock:generate"),
    "gen-stale-lock": Case("data_loader", GEN, 0, "was left by a run that is no longer running", setup="stale:generate",
                           exists=("{out}/labels.csv", "{out}/preview.png")),
    # ---- train_ssl.py ----
    "ssl-split-without-val": Case("train_ssl", SSL + " --label_file {labels}/no_val.csv", 0,
                                  "the val split is empty, so the kNN monitor has nothing to score; the best epoch is "
                                  "chosen by loss", exists=("{out}/best_ssl_model.pth",)),
    "ssl-fractions-sum": Case("train_ssl", SSL + " --val_fraction 0.6 --test_fraction 0.5", 2, "leave no training images"),
    "ssl-batch_size-0": Case("train_ssl", SSL + " --batch_size 0", 2, "--batch_size 0: must be an integer in [1, 65536]"),
    "ssl-eval_every-0": Case("train_ssl", SSL + " --label_file {labels}/good.csv --eval_every 0", 2,
                             "--eval_every 0: must be an integer >= 1"),
    "ssl-temperature-0": Case("train_ssl", SSL + " --temperature 0", 2, "--temperature 0.0: must be a number in [0.001, 100]"),
    "ssl-temperature-neg": Case("train_ssl", SSL + " --temperature -0.5", 2, "--temperature -0.5: must be a number in"),
    "ssl-lr-nan": Case("train_ssl", SSL + " --lr nan", 2, "--lr nan: must be a number in (0, 100]"),
    "ssl-lr-0": Case("train_ssl", SSL + " --lr 0", 2, "--lr 0.0: must be a number in (0, 100]"),
    "ssl-weight_decay-neg": Case("train_ssl", SSL + " --weight_decay -1", 2, "--weight_decay -1.0: must be a number in [0, 10]"),
    "ssl-warmup-neg": Case("train_ssl", SSL + " --warmup_epochs -1", 2, "--warmup_epochs -1: must be an integer >= 0"),
    "ssl-crop-0": Case("train_ssl", SSL + " --crop_min_scale 0", 2, "--crop_min_scale 0.0: must be a number in (0, 1]"),
    "ssl-crop-1.5": Case("train_ssl", SSL + " --crop_min_scale 1.5", 2, "--crop_min_scale 1.5: must be a number in (0, 1]"),
    "ssl-rotation-400": Case("train_ssl", SSL + " --rotation 400", 2, "--rotation 400.0: must be a number in [0, 180]"),
    "ssl-jitter-2": Case("train_ssl", SSL + " --jitter 2", 2, "--jitter 2.0: must be a number in [0, 1]"),
    "ssl-gamma-neg": Case("train_ssl", SSL + " --gamma -1", 2, "--gamma -1.0: must be a number in [0, 10]"),
    "ssl-projection_dim-0": Case("train_ssl", SSL + " --projection_dim 0", 2, "--projection_dim 0: must be an integer in [1,"),
    "ssl-image_size-4": Case("train_ssl", SSL + " --image_size 4", 2, "--image_size 4: must be an integer in [8, 4096]"),
    "ssl-num_epochs-0": Case("train_ssl", SSL + " --num_epochs 0", 2, "--num_epochs 0: must be an integer in [1,"),
    "ssl-num_workers-neg": Case("train_ssl", SSL + " --num_workers -1", 2, "--num_workers -1: must be an integer >= 0"),
    "ssl-cache_gb-nan": Case("train_ssl", SSL + " --cache_gb nan", 2, "--cache_gb nan: must be a number in [0,"),
    "ssl-split_seed-neg": Case("train_ssl", SSL + " --split_seed -1", 2, "--split_seed -1: must be an integer >= 0"),
    "ssl-data_dir-missing": Case("train_ssl", SSL.replace("{data}", "{out}/nowhere"), 2, "/nowhere: no such folder"),
    "ssl-data_dir-is-file": Case("train_ssl", SSL.replace("{data}", "{a_file}"), 2, "--data_dir {a_file}: is a file, not a folder"),
    "ssl-data_dir-empty": Case("train_ssl", SSL.replace("{data}", "{empty}"), 2, "--data_dir {empty}: no images found"),
    "ssl-data_dir-one-image": Case("train_ssl", SSL.replace("{data}", "{one}"), 2, "SimCLR needs at least 2 images, found 1"),
    "ssl-data_dir-1x1-images": Case("train_ssl", SSL.replace("{data}", "{pixels}"), 2,
                                    "none of the images could be used (unreadable or too small"),
    "ssl-label_file-missing": Case("train_ssl", SSL + " --label_file {labels}/none.csv", 2, "/none.csv: no such file"),
    "ssl-label_file-one-class": Case("train_ssl", SSL + " --label_file {labels}/one_class.csv", 2,
                                     "every image has the same label; the kNN monitor needs at least 2 classes"),
    "ssl-resume-folder": Case("train_ssl", SSL + " --resume {ssl}", 2, "--resume {ssl}: is a folder, not a file; pass a file in it"),
    "ssl-resume-nothing": Case("train_ssl", SSL + " --resume", 2, "last_ssl_checkpoint.pth: no such file"),
    "ssl-resume-finished": Case("train_ssl", SSL.replace("{out}", "{ssl}") + " --resume", 2,
                                "already completed 1 epoch(s), and --num_epochs is 1; nothing to train", unchanged=(SSL_BEST,)),
    "ssl-num_epochs-0-into-finished": Case("train_ssl", SSL.replace("{out}", "{ssl}") + " --num_epochs 0 --resume", 2,
                                           "--num_epochs 0: must be an integer in [1,", unchanged=(SSL_BEST,)),
    "ssl-another-run-in-folder": Case("train_ssl", SSL.replace("{out}", "{ssl}") + " --lr 0.01", 2,
                                      "best_ssl_model.pth holds the model of another run (--lr 0.0003 then, 0.01 now); "
                                      "pass --overwrite", unchanged=(SSL_BEST,)),
    "ssl-locked": Case("train_ssl", SSL, 2, "is in use by another run (process", setup="lock:ssl"),
    "ssl-output-is-a-file": Case("train_ssl", SSL.replace("{out}", "{a_file}"), 2, "--output_dir {a_file}: is a file",
                                 unchanged=("{a_file}",)),
    "ssl-fp16-on-cpu": Case("train_ssl", SSL + " --precision fp16", 2, "--precision fp16 is not supported on CPU"),
    # ---- fine_tune.py ----
    "ft-label_fraction-0": Case("fine_tune", FT + " --label_fraction 0", 2, "--label_fraction 0.0: must be a number in (0, 1]"),
    "ft-label_fraction-1.5": Case("fine_tune", FT + " --label_fraction 1.5", 2, "--label_fraction 1.5: must be a number in (0, 1]"),
    "ft-num_classes-1": Case("fine_tune", FT + " --num_classes 1", 2, "--num_classes 1: must be an integer in [2, 10000]"),
    "ft-num_classes-3": Case("fine_tune", FT + " --num_classes 3", 2, "has images of 2 classes; fix --num_classes"),
    "ft-fractions-sum": Case("fine_tune", FT + " --val_fraction 0.6 --test_fraction 0.5", 2, "leave no training images"),
    "ft-val_fraction-1": Case("fine_tune", FT + " --val_fraction 1", 2, "--val_fraction 1.0: must be a number in [0, 1)"),
    "ft-prefit-neg": Case("fine_tune", FT + " --head_prefit_steps -1", 2, "--head_prefit_steps -1: must be an integer in [0,"),
    "ft-encoder_lr_scale-neg": Case("fine_tune", FT + " --encoder_lr_scale -1", 2, "--encoder_lr_scale -1.0: must be a number"),
    "ft-unfreeze-neg": Case("fine_tune", FT + " --unfreeze_after_epoch -1", 2, "--unfreeze_after_epoch -1: must be an integer >= 0"),
    "ft-batch_size-0": Case("fine_tune", FT + " --batch_size 0", 2, "--batch_size 0: must be an integer in [1, 65536]"),
    "ft-output_name-path": Case("fine_tune", FT + " --output_name ../evil.pth", 2, "--output_name ../evil.pth: must be a plain file name"),
    "ft-ssl_checkpoint-folder": Case("fine_tune", FT + " --ssl_checkpoint {ssl}", 2,
                                     "is a folder, not a file; pass a file in it, e.g. --ssl_checkpoint {ssl}/best_ssl_model.pth"),
    "ft-ssl_checkpoint-classifier": Case("fine_tune", FT + " --ssl_checkpoint {ft}/best_finetuned_model.pth", 2,
                                         "is a 'classifier' checkpoint, expected 'ssl'"),
    "ft-ssl_checkpoint-csv": Case("fine_tune", FT + " --ssl_checkpoint {a_file}", 2, "not a readable PyTorch checkpoint"),
    "ft-label-dup-absolute": Case("fine_tune", FT.replace("good.csv", "dup_abs.csv"), 2,
                                  "rows 2 ('img000.png') and 26 ('{data}/img000.png') name the same image"),
    "ft-label-dup-dotdot": Case("fine_tune", FT.replace("good.csv", "dup_dotdot.csv"), 2,
                                "rows 3 ('img001.png') and 26 ('../data/img001.png') name the same image"),
    "ft-label-outside-data_dir": Case("fine_tune", FT.replace("good.csv", "outside.csv"), 2,
                                      "row 26 names '../elsewhere.png', which is outside --data_dir"),
    "ft-label-blank-patient": Case("fine_tune", FT.replace("good.csv", "blank_patient.csv"), 2,
                                   "2 row(s) have an empty patient_id (row 6, 11)"),
    "ft-label-patient-straddles": Case("fine_tune", FT.replace("good.csv", "straddle.csv"), 2,
                                       "patient 'P5' has images in 2 splits (row 17 train, row 18 val, row 19 val)"),
    "ft-label-one-class": Case("fine_tune", FT.replace("good.csv", "one_class.csv"), 2,
                               "every image has the label 'normal'; a classifier needs images of at least 2 classes"),
    "ft-label-latin1": Case("fine_tune", FT.replace("good.csv", "latin1.csv"), 2, "not UTF-8 text (byte 0xfc at offset"),
    "ft-label-utf16": Case("fine_tune", FT.replace("good.csv", "utf16.csv"), 2, "not UTF-8 text (UTF-16); save it as UTF-8"),
    "ft-label-semicolons": Case("fine_tune", FT.replace("good.csv", "semicolons.csv"), 2, "separated by ';': save it comma-separated"),
    "ft-label-1x1-image": Case("fine_tune", FT.replace("good.csv", "tiny_image.csv"), 2,
                               "the image is 1x1 pixels, too small to learn from"),
    "ft-label-unknown-split": Case("fine_tune", FT.replace("good.csv", "bad_split.csv"), 2, "unknown split 'holdout'"),
    "ft-label-header-only": Case("fine_tune", FT.replace("good.csv", "header_only.csv"), 2, "no rows; add lines"),
    "ft-label-folder": Case("fine_tune", FT.replace("{labels}/good.csv", "{labels}"), 2, "--label_file {labels}: is a folder"),
    "ft-label-r-quoted-header": Case("fine_tune", FT.replace("good.csv", "r_quoted.csv").replace("size 40", "size 8"), 0,
                                     "done: best epoch 1",
                                     exists=("{out}/best_baseline_model.pth",)),
    "ft-another-label-file": Case("fine_tune", FT_SSL.replace("{out}", "{ft}").replace("good.csv", "other.csv"), 2,
                                  "best_finetuned_model.pth holds the model of another run (another label file); "
                                  "pass --overwrite", unchanged=(FT_BEST,)),
    "ft-other-settings": Case("fine_tune", FT_SSL.replace("{out}", "{ft}") + " --lr 0.01", 2,
                              "holds the model of another run (--lr 0.001 then, 0.01 now)", unchanged=(FT_BEST,)),
    "ft-overwrite": Case("fine_tune", FT_SSL.replace("good.csv", "other.csv") + " --overwrite", 0, "done: best epoch 1",
                         copy="ft", exists=("{out}/best_finetuned_model.pth",)),
    "ft-resume-finished": Case("fine_tune", FT_SSL.replace("{out}", "{ft}") + " --resume", 2,
                               "already completed 1 epoch(s), and --num_epochs is 1; nothing to train", unchanged=(FT_BEST,)),
    "ft-num_epochs-0-into-finished": Case("fine_tune", FT_SSL.replace("{out}", "{ft}") + " --num_epochs 0", 2,
                                          "--num_epochs 0: must be an integer in [1,", unchanged=(FT_BEST,)),
    "ft-locked": Case("fine_tune", FT_SSL, 2, "is in use by another run (process", setup="lock:finetuned"),
    "ft-image_size-other-stem": Case("fine_tune", FT_SSL.replace("--image_size 40", "--image_size 16"), 2,
                                     "--image_size 16 needs the small stem"),
    # ---- evaluate.py ----
    "ev-checkpoint-folder": Case("evaluate", EV + " --checkpoint {ft}", 2,
                                 "--checkpoint {ft}: is a folder, not a file; pass a file in it, e.g. --checkpoint {ft}/"),
    "ev-checkpoint-missing": Case("evaluate", EV + " --checkpoint {ft}/none.pth", 2, "--checkpoint {ft}/none.pth: no such file"),
    "ev-checkpoint-csv": Case("evaluate", EV + " --checkpoint {a_file}", 2, "not a readable PyTorch checkpoint"),
    "ev-bootstrap-neg": Case("evaluate", EV_FT + " --bootstrap -1", 2, "--bootstrap -1: must be an integer in [0, 100000]"),
    "ev-bootstrap-huge": Case("evaluate", EV_FT + " --bootstrap 1000000000", 2, "--bootstrap 1000000000: must be an integer"),
    "ev-batch_size-0": Case("evaluate", EV_FT + " --batch_size 0", 2, "--batch_size 0: must be an integer in [1, 65536]"),
    "ev-names-count": Case("evaluate", EV_FT + " --names a b", 2, "--names gives 2 name(s) for 1 --checkpoint(s)"),
    "ev-num_classes-other": Case("evaluate", EV_FT + " --num_classes 3", 2, "was trained for 2 classes"),
    "ev-probe-one-class": Case("evaluate", EV.replace("good.csv", "one_class.csv") + " --checkpoint {ssl}/best_ssl_model.pth",
                               2, "the linear probe needs at least two classes"),
    "ev-ssl-split-train": Case("evaluate", EV + " --checkpoint {ssl}/best_ssl_model.pth --split train", 2,
                               "--split train leaves no train-split images"),
    "ev-data_dir-missing": Case("evaluate", EV_FT.replace("{data}", "{out}/nowhere"), 2, "/nowhere: no such folder"),
    "ev-output-is-a-file": Case("evaluate", EV_FT.replace("{out}", "{a_file}"), 2, "--output_dir {a_file}: is a file",
                                unchanged=("{a_file}",)),
    "ev-images-empty-folder": Case("evaluate", "--checkpoint {ft}/best_finetuned_model.pth --images {empty} "
                                   "--output_dir {out} " + RUNTIME, 2, "--images {empty}: no images found"),
    "ft-num_steps-and-num_epochs": Case("fine_tune", FT + " --num_steps 10", 2,
                                        "--num_steps 10 sets --num_epochs, which was also given (--num_epochs 1); give one"),
    "ft-tuned-num_steps-and-num_epochs": Case("fine_tune", FT + " --recipe tuned --num_steps 10", 2,
                                              "--num_steps 10 sets --num_epochs, which was also given"),
    "ft-frozen_steps-and-unfreeze": Case("fine_tune", FT_SSL + " --frozen_steps 2 --unfreeze_after_epoch 1", 2,
                                         "--frozen_steps 2 sets --unfreeze_after_epoch, which was also given"),
    "ft-unfreeze-without-freeze": Case("fine_tune", FT_SSL + " --recipe tuned --unfreeze_after_epoch 5", 2,
                                       "--unfreeze_after_epoch 5 does nothing without --freeze_encoder"),
    "ft-frozen-steps-cover-every-epoch": Case("fine_tune", FT_SSL + " --frozen_steps 4", 2,
                                              "--frozen_steps 4 (flag) covers all 1 epoch(s) of 2 step(s): the encoder "
                                              "would never train"),
    "ft-frozen-steps-never-end": Case("fine_tune", FT_SSL.replace("--num_epochs 1 ", "") + " --num_steps 4 --frozen_steps 4", 2,
                                      "--frozen_steps 4 is not below --num_steps 4: the encoder would never train"),
    "ev-locked": Case("evaluate", EV_FT, 2, "is in use by another run (process", setup="lock:evaluate"),
    "ev-label-r-quoted-header": Case("evaluate", EV_FT.replace("good.csv", "r_quoted.csv"), 0, "report:",
                                     exists=("{out}/report.md", "{out}/metrics.json")),
}

NPZ = "--output_dir {out} --from_npz {npz}/"
ML = FT.replace("{labels}/good.csv", "{labels}/ml_{ml}.csv")
IMAGES = "--checkpoint {ft}/best_finetuned_model.pth --output_dir {out} --batch_size 8 " + RUNTIME
EXPORT = "--checkpoint {ft}/best_finetuned_model.pth --export onnx --output_dir {out} --data_dir {data} " + RUNTIME
NEW_CASES = {
    # ---- resuming, and the output folder ----
    "ssl-resume-finetuned-checkpoint": Case("train_ssl", SSL + " --resume {ft}/last_finetuned_checkpoint.pth", 2,
                                            "is a 'classifier' checkpoint, expected 'ssl'"),
    "ft-resume-ssl-checkpoint": Case("fine_tune", FT_SSL + " --resume {ssl}/last_ssl_checkpoint.pth", 2,
                                     "is a 'ssl' checkpoint, expected 'classifier'"),
    "ft-resume-best-model": Case("fine_tune", FT_SSL.replace("{out}", "{ft}") + " --num_epochs 2 --resume "
                                 "{ft}/best_finetuned_model.pth", 2, "has no training state (optimizer, scheduler, scaler, rng); resume "
                                 "from a last_*_checkpoint.pth, not a best_* model",
                                 unchanged=(FT_BEST,)),
    "ssl-resume-csv": Case("train_ssl", SSL + " --resume {a_file}", 2, "not a readable PyTorch checkpoint"),
    "ssl-resume-with-overwrite": Case("train_ssl", SSL.replace("--num_epochs 1", "--num_epochs 2") + " --resume --overwrite",
                                      0, "done: best epoch", copy="ssl", exists=("{out}/best_ssl_model.pth",)),
    "ft-output-is-a-file": Case("fine_tune", FT.replace("{out}", "{a_file}"), 2, "--output_dir {a_file}: is a file",
                                unchanged=("{a_file}",)),
    "ssl-output-read-only": Case("train_ssl", SSL.replace("{out}", "/sys/kernel"), 2,
                                 "cannot write to /sys/kernel: Permission denied; choose a writable --output_dir"),
    "ssl-output-cannot-be-made": Case("train_ssl", SSL.replace("{out}", "/sys/kernel/hostile"), 2,
                                      "cannot write to /sys/kernel/hostile: Operation not permitted"),
    # ---- multi-label files and --uncertain ----
    "ml-all-uncertain-column": Case("fine_tune", ML.replace("{ml}", "all_uncertain"), 2,
                                    "finding 'Nodule' has no certain cell (every one is -1)"),
    "ml-all-uncertain-column-zero": Case("fine_tune", ML.replace("{ml}", "all_uncertain") + " --uncertain zero "
                                         "--image_size 8", 0, "no train image has finding(s) Nodule",
                                         exists=("{out}/best_baseline_model.pth",)),
    "ml-blank-cells": Case("fine_tune", ML.replace("{ml}", "blank") + " --image_size 8", 0, "done: best epoch 1",
                           exists=("{out}/best_baseline_model.pth",)),
    "ml-words-in-cells": Case("fine_tune", ML.replace("{ml}", "words"), 2,
                              "row 2, column 'Nodule' holds 'yes'; a finding cell is 1, 0, -1 (uncertain) or empty"),
    "ml-all-positive-in-test": Case("fine_tune", ML.replace("{ml}", "all_positive_test") + " --image_size 8", 0,
                                    "no test image is counted without finding(s) Effusion",
                                    exists=("{out}/best_baseline_model.pth",)),
    "ml-one-header-twice": Case("fine_tune", ML.replace("{ml}", "same_header"), 2,
                                "the header names column 'Effusion' twice (columns 3 and 4)"),
    "ml-unnamed-column": Case("fine_tune", ML.replace("{ml}", "unnamed"), 2, "column 4 of the header has no name"),
    "ml-uncertain-on-one-label-file": Case("fine_tune", FT + " --uncertain one", 2,
                                           "--uncertain is for multi-label files"),
    "ml-task-multiclass-on-multilabel": Case("fine_tune", ML.replace("{ml}", "blank") + " --task multiclass", 2,
                                             "its header makes it a multi-label file (columns layout) but --task is "
                                             "multiclass"),
    "ml-pos_weight-on-one-label-file": Case("fine_tune", FT + " --pos_weight balanced", 2,
                                            "--pos_weight is for multi-label files"),
    "ml-evaluate-with-a-one-label-file": Case("evaluate", EV + " --checkpoint {mlft}/best_baseline_model.pth", 2,
                                              "has no finding 'Effusion' of the checkpoint's Effusion, Nodule; use the "
                                              "label file it was trained with"),
    "ml-evaluate-num_classes-other": Case("evaluate", EV.replace("good.csv", "ml_blank.csv") + " --checkpoint "
                                          "{mlft}/best_baseline_model.pth --num_classes 3", 2,
                                          "was trained for 2 findings; drop the flag or pass --num_classes 2"),
    "ml-resume-as-multiclass": Case("fine_tune", ML.replace("{ml}", "blank").replace("{out}", "{mlft}")
                                    + " --num_epochs 2 --resume --task multiclass", 2,
                                    "its header makes it a multi-label file (columns layout) but --task is multiclass",
                                    unchanged=("{mlft}/best_baseline_model.pth",)),
    "ml-resume-other-uncertain": Case("fine_tune", ML.replace("{ml}", "blank").replace("{out}", "{mlft}")
                                      + " --num_epochs 2 --resume --uncertain one", 2,
                                      "was run with --uncertain ignore, now --uncertain one",
                                      unchanged=("{mlft}/best_baseline_model.pth",)),
    "ml-images": Case("evaluate", IMAGES.replace("{ft}/best_finetuned_model.pth", "{mlft}/best_baseline_model.pth")
                      + " --images {mixed}", 0, "4 image(s) scored", exists=("{out}/predictions.csv",)),
    # ---- evaluate.py --images ----
    "img-not-images": Case("evaluate", IMAGES + " --images {not_images}", 2, "--images {not_images}: no images found"),
    "img-mixed-grey-rgb": Case("evaluate", IMAGES + " --images {mixed}", 0, "4 image(s) scored",
                               exists=("{out}/predictions.csv", "{out}/summary.md")),
    "img-dicom-without-pixels": Case("evaluate", IMAGES + " --images {no_pixels}", 0, "1 unreadable file(s) skipped",
                                     exists=("{out}/predictions.csv",)),
    "img-only-dicom-without-pixels": Case("evaluate", IMAGES + " --images {dicom_only}", 2,
                                          "none of the images could be used"),
    "img-output-is-the-images-folder": Case("evaluate", IMAGES.replace("{out}", "{mixed}") + " --images {mixed}", 2,
                                            "--output_dir {mixed} is the --images folder", unchanged=("{mixed}/rgb.png",)),
    "img-earlier-outputs-inside": Case("evaluate", IMAGES.replace("{out}", "{seen}/predictions") + " --images {seen}", 0,
                                       "1 image(s) under --output_dir {seen}/predictions (inside --images) are outputs",
                                       exists=("{seen}/predictions/predictions.csv",)),
    "img-ssl-checkpoint": Case("evaluate", IMAGES.replace("{ft}/best_finetuned_model.pth", "{ssl}/best_ssl_model.pth")
                               + " --images {mixed}", 2, "is an SSL encoder, which predicts no class"),
    "img-two-checkpoints": Case("evaluate", IMAGES + " --checkpoint {ft}/best_finetuned_model.pth --images {mixed}", 2,
                                "--images takes one classifier; give one --checkpoint, not 2"),
    # ---- data_loader.py --from_npz: MedMNIST archives of every shape and dtype ----
    "npz-float-0-1": Case("data_loader", NPZ + "float01.npz", 0, "", exists=("{out}/labels.csv", "{out}/train/train_00000.png")),
    "npz-float-0-255": Case("data_loader", NPZ + "float255.npz", 0, "", exists=("{out}/labels.csv",)),
    "npz-rgb": Case("data_loader", NPZ + "rgb.npz", 0, "", exists=("{out}/labels.csv",)),
    "npz-uint16": Case("data_loader", NPZ + "uint16.npz", 0, "", exists=("{out}/labels.csv",)),
    "npz-labels-column": Case("data_loader", NPZ + "labels_column.npz", 0, "", exists=("{out}/labels.csv",)),
    "npz-multilabel": Case("data_loader", NPZ + "multilabel.npz", 0, "", exists=("{out}/labels.csv",)),
    "npz-label_names-one-label": Case("data_loader", NPZ + "float01.npz --label_names benign malignant", 2,
                                      "--label_names names the finding columns of a multi-label file, and"),
    "gen-label_names-without-npz": Case("data_loader", GEN + " --label_names a b", 2,
                                        "--label_names names the finding columns of a --from_npz file"),
    "npz-missing-key": Case("data_loader", NPZ + "missing_key.npz", 2, "key 'test_labels' is missing"),
    "npz-wrong-length": Case("data_loader", NPZ + "wrong_length.npz", 2, "train has 4 images but 3 labels"),
    "npz-fractional-labels": Case("data_loader", NPZ + "fractional_labels.npz", 2,
                                  "train_labels holds 0.5, not a class index"),
    "npz-nan-labels": Case("data_loader", NPZ + "nan_labels.npz", 2, "train_labels holds nan, not a class index"),
    "npz-string-labels": Case("data_loader", NPZ + "string_labels.npz", 2, "train_labels holds 'a', not a class index"),
    "npz-volumes": Case("data_loader", NPZ + "volumes.npz", 2, "3D MedMNIST files are not supported"),
    "npz-rgba": Case("data_loader", NPZ + "rgba.npz", 2, "expected images (N, H, W) or (N, H, W, 3)"),
    "npz-empty": Case("data_loader", NPZ + "empty.npz", 2, "holds no images"),
    "npz-one-class": Case("data_loader", NPZ + "one_class.npz", 0, "", exists=("{out}/labels.csv",)),
    "npz-nan-images": Case("data_loader", NPZ + "nan_images.npz", 2, "train_images holds NaN"),
    # ---- the ONNX export ----
    "onnx-ssl-checkpoint": Case("evaluate", EXPORT.replace("{ft}/best_finetuned_model.pth", "{ssl}/best_ssl_model.pth"),
                                2, "is an SSL encoder, which predicts no class; export the classifier"),
    "onnx-output-exists": Case("evaluate", EXPORT, 0, "model.onnx", setup="file:model.onnx", exists=("{out}/model.onnx",)),
    "onnx-output-is-a-folder": Case("evaluate", EXPORT, 2, "model.onnx: is a folder", setup="folder:model.onnx"),
    "onnx-missing": Case("evaluate", EXPORT, 2, "--export onnx needs onnx and onnxruntime: pip install -r "
                                                "requirements-export.txt", setup="no_onnx"),
    "onnx-with-images": Case("evaluate", EXPORT + " --images {mixed}", 2, "--images and --export are separate runs"),
}
CASES.update(NEW_CASES)


def run_case(case: Case, paths: dict, capsys) -> tuple:
    """(exit code, stdout, stderr) of utils.run_cli(main, parser, argv) in this process."""
    module = SCRIPTS[case.script]
    argv = shlex.split(case.argv.format(**paths))
    try:
        utils.run_cli(module.main, module.get_args_parser(), argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def without_onnx(monkeypatch) -> None:
    """`import onnx` and `import onnxruntime` fail, as where requirements-export.txt was not installed."""
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def set_up(case: Case, out: str, monkeypatch):
    """The case's setup in the output folder; a live lock holder's process, or None."""
    kind, _, name = case.setup.partition(":")
    if kind == "lock":
        return hold_lock(out, name)
    if kind == "stale":
        leave_stale_lock(out, name)
    elif kind in ("file", "folder"):
        os.makedirs(os.path.join(out, name) if kind == "folder" else out, exist_ok=True)
        if kind == "file":
            with open(os.path.join(out, name), "w") as f:
                f.write("an earlier file\n")
    elif kind == "no_onnx":
        without_onnx(monkeypatch)
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name, world, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    paths = {**world, "out": str(tmp_path / "out")}
    if case.copy:
        shutil.copytree(world[case.copy], paths["out"])
    holder = set_up(case, paths["out"], monkeypatch) if case.setup else None
    before = {p: sha(p.format(**paths)) for p in case.unchanged}
    try:
        code, out, err = run_case(case, paths, capsys)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    message = case.message.format(**paths)
    assert "Traceback" not in out + err
    assert code == case.code, (code, err[-500:])
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
        assert err.count("error:") == 1
        if not case.copy and not case.unchanged and not case.setup.startswith(("file", "folder")):
            assert visible_files(paths["out"]) == [], "a refused run wrote files"
        if not case.copy and not case.unchanged and not case.setup:
            assert not os.path.exists(paths["out"]), "a refused run left the output folder it made"
    else:
        assert message in out + err
    for p in case.exists:
        assert os.path.isfile(p.format(**paths)), p
    for p, digest in before.items():
        assert sha(p.format(**paths)) == digest, f"{p} changed"


# ============ cases with more to check than the table says ============

def test_stale_lock_is_taken_over_with_a_note_naming_the_dead_process_and_released_after(world, tmp_path, capsys):
    out = str(tmp_path / "gen")
    leave_stale_lock(out, "generate")
    code, _, err = run_case(Case("data_loader", GEN, 0, ""), {**world, "out": out}, capsys)
    assert code == 0 and "process" in err and "train_ssl.py --x" in err   # names the run that left it
    assert not os.path.exists(os.path.join(out, ".generate.lock"))      # released: nothing stale left
    code, _, err = run_case(Case("data_loader", GEN, 0, ""), {**world, "out": out}, capsys)
    assert code == 0 and "no longer running" not in err


def test_the_checkpoint_decides_the_backbone_and_everything_written_says_so(world, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, stdout, _ = run_case(Case("fine_tune", FT_SSL + " --backbone resnet50", 0, ""), {**world, "out": out}, capsys)
    assert code == 0 and "--backbone resnet50 ignored" in stdout
    with open(os.path.join(out, "finetuned_settings.json")) as f:
        assert json.load(f)["backbone"] == "resnet18"
    ckpt = torch.load(os.path.join(out, "best_finetuned_model.pth"), weights_only=True)
    assert ckpt["args"]["backbone"] == ckpt["model_config"]["backbone"] == "resnet18"


def test_an_r_quoted_header_is_a_header_not_a_class(world):
    table = label_tables.read_label_table(os.path.join(world["labels"], "r_quoted.csv"), world["data"])
    assert table.class_names == ["0", "1"] and len(table.filenames) == 24


@pytest.mark.parametrize("script,resumable", [("evaluate", False), ("train_ssl", True)])
def test_ctrl_c_says_what_is_kept_and_releases_the_lock(script, resumable, world, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    out = str(tmp_path / "o")
    if script == "evaluate":
        monkeypatch.setattr(scoring, "evaluate_checkpoint", interrupted)
        case = Case("evaluate", EV_FT, 130, "")
    else:
        monkeypatch.setattr(training, "train_one_epoch", interrupted)
        case = Case("train_ssl", SSL, 130, "")
    code, _, err = run_case(case, {**world, "out": out}, capsys)
    assert code == 130 and "Traceback" not in err
    # cut in the first epoch: the trainer says nothing resumable was saved; evaluate.py says its files are whole
    expected = "nothing resumable was saved" if resumable else "every file written is complete"
    last_line = err.strip().splitlines()[-1]                  # warnings about the data may come before it
    assert expected in last_line and last_line.startswith("interrupted")
    assert not os.path.exists(os.path.join(out, f".{'evaluate' if script == 'evaluate' else 'ssl'}.lock"))


def test_a_flag_table_entry_exists_for_every_numeric_and_path_flag():
    """A new numeric or path flag must get a range: its rule (utils.bounded) is the only validation."""
    unchecked = []
    for name, module in SCRIPTS.items():
        for action in module.get_args_parser()._actions:
            numeric = action.type in (int, float)
            pathlike = action.dest.endswith(("_dir", "_file", "checkpoint", "npz", "_name"))
            if (numeric or pathlike) and getattr(action, "rule", None) is None:
                unchecked.append(f"{name} --{action.dest}")
    assert unchecked == []


# ============ the top level, as a user runs it ============

@pytest.mark.parametrize("script,argv,message", [
    ("train_ssl.py", "--data_dir {data} --output_dir {out} --batch_size 0", "--batch_size 0: must be an integer"),
    ("data_loader.py", "--output_dir {out} --num_classes 9", "--num_classes 9: must be an integer in [2, 5]"),
])
def test_the_command_line_prints_one_line_and_no_traceback(script, argv, message, world, tmp_path):
    args = shlex.split(argv.format(**world, out=str(tmp_path / "o")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr
    assert r.stderr.startswith("error: ")


def test_the_lock_refuses_a_second_holder_and_is_gone_after_release(tmp_path):
    first = utils.OutputLock(str(tmp_path), "ssl").acquire()
    with pytest.raises(utils.UserError, match=rf"--output_dir {tmp_path} is in use by another run \(process "
                                              rf"{os.getpid()} on host .*\); wait for it"):
        utils.OutputLock(str(tmp_path), "ssl").acquire()
    with utils.OutputLock(str(tmp_path), "finetuned"):          # another kind of run: other files, other lock
        pass
    first.release()
    assert os.listdir(tmp_path) == []
    utils.OutputLock(str(tmp_path), "ssl").acquire().release()


def test_a_tiny_label_fraction_still_trains_on_every_class(world):
    """--label_fraction 0.01 of ~16 train images rounds to 0 images per class: each class keeps one instead."""
    table = label_tables.read_label_table(os.path.join(world["labels"], "good.csv"), world["data"], seed=0)
    chosen = data_splits.stratified_subset(table.labels, table.indices("train"), 0.01, seed=0)
    assert sorted(table.labels[chosen].tolist()) == [0, 1]


# ============ resuming across runs ============

def run_ssl(argv: str, capsys) -> tuple:
    return run_case(Case("train_ssl", argv, 0, ""), {}, capsys)


def test_resuming_into_a_folder_of_another_run_is_refused_and_leaves_it_intact(world, tmp_path, capsys):
    other = str(tmp_path / "other")
    assert run_ssl(SSL.format(**world, out=other) + " --seed 7", capsys)[0] == 0       # another run lives there
    before = sha(os.path.join(other, "best_ssl_model.pth"))
    argv = (SSL.replace("--num_epochs 1", "--num_epochs 2").format(**world, out=other)
            + f" --resume {world['ssl']}/last_ssl_checkpoint.pth")
    code, out, err = run_ssl(argv, capsys)
    assert code == 2 and "holds the model of another run" in err.strip().splitlines()[-1], err[-300:]
    assert sha(os.path.join(other, "best_ssl_model.pth")) == before and "Traceback" not in out + err


def test_resuming_without_the_label_file_the_run_read_is_refused(world, tmp_path, capsys):
    run = str(tmp_path / "run")
    with_labels = SSL.format(**world, out=run) + f" --label_file {world['labels']}/good.csv"
    assert run_ssl(with_labels, capsys)[0] == 0
    last = os.path.join(run, "last_ssl_checkpoint.pth")
    before = sha(last)
    code, out, err = run_ssl(SSL.replace("--num_epochs 1", "--num_epochs 2").format(**world, out=run)
                             + " --resume", capsys)
    assert code == 2 and "that run read --label_file" in err and "resume with the same --label_file" in err, err[-300:]
    assert sha(last) == before
    code, out, err = run_ssl(with_labels.replace("--num_epochs 1", "--num_epochs 2") + " --resume", capsys)
    assert code == 0, err[-300:]                          # with it, the run continues


@pytest.mark.parametrize("second, why", [("effusion", "differ only in case"), ("Efusion", "differ by one letter"),
                                         ("Effusion_", "differ only in case, spaces")])
def test_two_names_of_one_finding_are_refused_naming_both(world, tmp_path, second, why):
    """Each positive of one would count as absent in its twin; numbered findings (finding_1, finding_2) are fine."""
    rows = [f"img{i:03d}.png,{'Effusion' if i % 3 else second}|Nodule" for i in range(12)]
    pipe = tmp_path / "pipe.csv"
    pipe.write_text("filename,labels\n" + "\n".join(rows) + "\n")
    with pytest.raises(utils.UserError, match=f"findings 'Effusion' and '{second}' {why}"):
        label_tables.load_label_table(str(pipe), world["data"])
    columns = tmp_path / "columns.csv"
    columns.write_text(f"filename,Effusion,{second}\n" + "\n".join(f"img{i:03d}.png,{i % 2},0" for i in range(12)) + "\n")
    with pytest.raises(utils.UserError, match=why):
        label_tables.load_label_table(str(columns), world["data"])
    numbered = tmp_path / "numbered.csv"
    numbered.write_text("filename,finding_1,finding_2\n" + "\n".join(f"img{i:03d}.png,{i % 2},{(i + 1) % 2}"
                                                                     for i in range(12)) + "\n")
    assert label_tables.load_label_table(str(numbered), world["data"]).class_names == ["finding_1", "finding_2"]


def test_a_finding_present_in_every_train_image_is_named(world, tmp_path, capsys):
    columns = tmp_path / "columns.csv"
    columns.write_text("filename,split,Effusion,Nodule\n" + "\n".join(
        f"img{i:03d}.png,{'train' if i < 16 else 'val'},{1 if i < 16 else i % 2},{i % 2}" for i in range(24)) + "\n")
    label_tables.load_label_table(str(columns), world["data"])
    err = capsys.readouterr().err
    assert "no train image is counted without finding(s) Effusion" in err and "Nodule (every" not in err


# ============ the ONNX export ============

def test_an_export_that_disagrees_with_pytorch_is_removed_not_left_behind(world, tmp_path, capsys, monkeypatch):
    import export_onnx
    monkeypatch.setattr(export_onnx, "compare", lambda ckpt, path, images: {"max_abs_diff": 0.5, "same_argmax": 0.75,
                                                                            "images": 4})
    out = str(tmp_path / "out")
    code, _, err = run_case(Case("evaluate", EXPORT, 2, ""), {**world, "out": out}, capsys)
    assert code == 2 and "the exported model disagrees with PyTorch (max |difference| 5.00e-01" in err
    assert "so it was removed" in err and not os.path.exists(os.path.join(out, "model.onnx"))
