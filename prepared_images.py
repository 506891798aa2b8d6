"""A prepared image folder: every readable image of a source folder decoded once, resized to one side and kept
as uint8 in a memory-mapped .npy file, then read back by position, without decoding, by every script that takes
--data_dir.

    python data_loader.py --prepare --data_dir ./data/medical_images --output_dir ./data/prepared --image_size 128
    python train_ssl.py --data_dir ./data/prepared --image_size 128      # read like the source folder

The folder:
    manifest.json        format and version, source folder, side, channels, reader settings, every source file's
                         size and modification time, the unreadable files and why (written last: its presence
                         means the folder is complete)
    index.csv            filename,row,is_colour,colour_row,width,height: one line per image file of the source in
                         list_images order; row -1 for an unreadable file
    images.npy           uint8 (N, 1, S, S): every readable image converted to one channel, then resized
    colour_NNNNN.npy     uint8 (M, 3, S, S): chunk NNNNN's colour images at three channels (colour_row)
    progress/NNNNN.json  one finished chunk (written atomically), so a killed preparation continues
    prepare_plan.json    the source files and side being prepared; another plan starts over
    labels.csv, classes.txt, findings.csv   copied from the source when present

Every image is resized by image_io.resize_pixels, the function ImageStore decodes with, so the bytes are those
a run on the source folder holds: one channel for every image, three for colour ones, and a grayscale image at
three channels is its one channel repeated (what converting it to RGB before the resize gives).
"""
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat

import numpy as np

from image_io import check_image_size, list_images, load_image, resize_pixels
from utils import UserError, atomic_write_json, atomic_write_text

FORMAT = "simclr-medical prepared images"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "prepare_plan.json"
INDEX = "index.csv"
IMAGES = "images.npy"
PROGRESS = "progress"
CHUNK_SIZE = 1024             # images per chunk: the work a killed preparation can lose
COPIED = ("labels.csv", "classes.txt", "findings.csv")
READER = {"decode": "image_io.load_image (16-bit stretched to its min..max, DICOM modality LUT and window)",
          "resize": "PIL bilinear to S x S after conversion to L (and RGB for colour images)",
          "min_side": "image_io.MIN_IMAGE_SIDE"}


# ============ preparing ============

def _source_facts(source: str, files: list) -> list:
    """[[name, size in bytes, modification time in ns], ...] of the source files."""
    facts = []
    for name in files:
        st = os.stat(os.path.join(source, name))
        facts.append([name, st.st_size, st.st_mtime_ns])
    return facts


def _decode_one(path: str, image_size: int):
    """(gray (1, S, S) or None, rgb (3, S, S) or None, is_colour, width, height, reason unreadable or None)."""
    try:
        pixels = load_image(path)
    except UserError as e:
        return None, None, False, 0, 0, str(e)
    h, w = pixels.shape[:2]
    colour = is_colour(pixels)
    try:
        check_image_size(pixels, path)
    except UserError as e:
        return None, None, colour, w, h, str(e)
    rgb = resize_pixels(pixels, image_size, 3) if colour else None
    return resize_pixels(pixels, image_size, 1), rgb, colour, w, h, None


def is_colour(pixels: np.ndarray) -> bool:
    """(H, W, 3) pixels whose channels differ somewhere (ImageStore's test for real colour)."""
    return pixels.ndim == 3 and not (np.array_equal(pixels[..., 0], pixels[..., 1])
                                     and np.array_equal(pixels[..., 0], pixels[..., 2]))


def _start_or_continue(output_dir: str, plan: dict) -> dict:
    """{chunk: record} of the chunks already finished under this plan; a new plan starts over."""
    plan_path = os.path.join(output_dir, PLAN)
    progress = os.path.join(output_dir, PROGRESS)
    n, side = len(plan["files"]), plan["image_size"]
    if os.path.isfile(plan_path) and os.path.isfile(os.path.join(output_dir, IMAGES)):
        with open(plan_path) as f:
            if json.load(f) == plan:
                done = {}
                for name in os.listdir(progress) if os.path.isdir(progress) else []:
                    if name.endswith(".json"):
                        with open(os.path.join(progress, name)) as f:
                            done[int(name[:-5])] = json.load(f)
                return done
        print(f"{output_dir}: the source files or the side changed since the last preparation; starting over")
    for name in os.listdir(output_dir):
        if name == MANIFEST or name.startswith("colour_"):
            os.remove(os.path.join(output_dir, name))
    shutil.rmtree(progress, ignore_errors=True)
    os.makedirs(progress)
    np.lib.format.open_memmap(os.path.join(output_dir, IMAGES), mode="w+", dtype=np.uint8,
                              shape=(n, 1, side, side)).flush()
    atomic_write_json(plan_path, plan)
    return {}


def _store_chunk(output_dir: str, images: np.memmap, chunk: int, start: int, results: list) -> dict:
    """Write one chunk's images, then its record (atomically, last): the record says the rows are on disk."""
    colour_images, files = [], []
    for j, (gray, rgb, colour, w, h, reason) in enumerate(results):
        if gray is not None:
            images[start + j] = gray
        files.append([int(colour), len(colour_images) if rgb is not None else -1, w, h, reason])
        if rgb is not None:
            colour_images.append(rgb)
    images.flush()
    if colour_images:
        path = os.path.join(output_dir, f"colour_{chunk:05d}.npy")
        np.save(path + ".tmp.npy", np.stack(colour_images))
        os.replace(path + ".tmp.npy", path)
    record = {"chunk": chunk, "start": start, "files": files}
    atomic_write_json(os.path.join(output_dir, PROGRESS, f"{chunk:05d}.json"), record)
    return record


def prepare(source: str, output_dir: str, image_size: int, workers: int | None = None,
            chunk_size: int = CHUNK_SIZE) -> dict:
    """Decode every image of `source` once into `output_dir` (see the module docstring), in parallel over
    `workers` processes (default: every core), continuing a killed preparation. Returns the manifest."""
    from tqdm import tqdm

    if os.path.realpath(source) == os.path.realpath(output_dir):
        raise UserError(f"--output_dir {output_dir} is --data_dir itself; give the prepared images a folder of "
                        f"their own")
    if is_prepared(source):
        raise UserError(f"--data_dir {source} is a prepared folder already; prepare from its source folder")
    files = list_images(source)
    plan = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": os.path.abspath(source),
            "image_size": image_size, "chunk_size": chunk_size, "files": _source_facts(source, files)}
    os.makedirs(output_dir, exist_ok=True)
    done = _start_or_continue(output_dir, plan)
    chunks = range(0, len(files), chunk_size)
    if done:
        print(f"continuing: {len(done)} of {len(chunks)} chunks were prepared already")
    images = np.load(os.path.join(output_dir, IMAGES), mmap_mode="r+")
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(files), initial=sum(len(r["files"]) for r in done.values()), unit="img",
                 desc="prepare", dynamic_ncols=True) as bar:
        for k, start in enumerate(chunks):
            if k in done:
                continue
            paths = [os.path.join(source, f) for f in files[start:start + chunk_size]]
            results = list(pool.map(_decode_one, paths, repeat(image_size),
                                    chunksize=max(1, len(paths) // (4 * workers))))
            done[k] = _store_chunk(output_dir, images, k, start, results)
            bar.update(len(paths))
    del images
    return _finish(source, output_dir, plan, [done[k] for k in range(len(chunks))], files)


def _finish(source: str, output_dir: str, plan: dict, records: list, files: list) -> dict:
    """The index, the copied label files and, last, the manifest; the unreadable files named on screen."""
    rows, unreadable = ["filename,row,is_colour,colour_row,width,height"], []
    for record in records:
        for j, (colour, colour_row, w, h, reason) in enumerate(record["files"]):
            i = record["start"] + j
            rows.append(f"{_csv_cell(files[i])},{-1 if reason else i},{colour},{colour_row},{w},{h}")
            if reason:
                unreadable.append({"file": files[i], "reason": reason})
    atomic_write_text(os.path.join(output_dir, INDEX), "\n".join(rows) + "\n")
    copied = [n for n in COPIED if os.path.isfile(os.path.join(source, n))]
    for name in copied:
        shutil.copyfile(os.path.join(source, name), os.path.join(output_dir, name))
    colour = any(int(r[0]) for rec in records for r in rec["files"])
    manifest = {**{k: v for k, v in plan.items() if k != "files"}, "channels": 3 if colour else 1,
                "reader": READER, "images": len(files) - len(unreadable), "copied": copied,
                "unreadable": unreadable, "files": plan["files"]}
    atomic_write_json(os.path.join(output_dir, MANIFEST), manifest)
    if unreadable:
        print(f"warning: {len(unreadable)} unreadable image(s) left out (listed in {MANIFEST}):", file=sys.stderr)
        for u in unreadable[:20]:
            print(f"  {u['reason']}", file=sys.stderr)
        if len(unreadable) > 20:
            print(f"  and {len(unreadable) - 20} more", file=sys.stderr)
    return manifest


def _csv_cell(name: str) -> str:
    return '"' + name.replace('"', '""') + '"' if any(c in name for c in ',"\n') else name


# ============ reading ============

def _read_manifest(root: str) -> dict | None:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_prepared(root: str) -> bool:
    """`root` holds a complete prepared folder (its manifest says so)."""
    return _read_manifest(root) is not None


class PreparedImages:
    """An opened prepared folder: the source's file list, which are unreadable and why, and `read`, which
    copies images out of images.npy by position (pread: the pages stay in the page cache, shared by every
    process, and out of this process's resident memory)."""

    def __init__(self, root: str, manifest: dict):
        import pandas as pd

        self.root, self.manifest = root, manifest
        self.image_size, self.source = manifest["image_size"], manifest["source"]
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"--data_dir {root}: prepared in format version {manifest.get('format_version')}, this "
                            f"version reads {FORMAT_VERSION}; {self.refresh_hint()}")
        index = pd.read_csv(os.path.join(root, INDEX), dtype={"filename": str}, keep_default_na=False)
        self.filenames = index["filename"].tolist()
        self.position = {f: i for i, f in enumerate(self.filenames)}
        self.row = index["row"].to_numpy(np.int64)
        self.is_colour = index["is_colour"].to_numpy(bool)
        self.colour_row = index["colour_row"].to_numpy(np.int64)
        self.sizes = list(zip(index["width"].tolist(), index["height"].tolist()))
        self.unreadable = {u["file"]: u["reason"] for u in manifest["unreadable"]}
        images = np.load(os.path.join(root, IMAGES), mmap_mode="r")
        if images.shape != (len(self.filenames), 1, self.image_size, self.image_size):
            raise UserError(f"--data_dir {root}: {IMAGES} has shape {images.shape}, the index another; "
                            f"{self.refresh_hint()}")
        self._offset, self._file, self._colour = images.offset, None, {}

    def refresh_hint(self) -> str:
        return (f"prepare it again: python data_loader.py --prepare --data_dir {self.source} --output_dir "
                f"{self.root} --image_size {self.image_size}")

    def check_source(self) -> None:
        """A UserError when the source folder gained, lost or changed a file since the preparation; a warning
        when the source folder is not there to compare with."""
        if not os.path.isdir(self.source):
            self.manifest.pop("files")
            print(f"warning: --data_dir {self.root}: its source folder {self.source} is not here; cannot check "
                  f"it for changes", file=sys.stderr)
            return
        then = {name: (size, mtime) for name, size, mtime in self.manifest.pop("files")}   # not kept: N entries
        try:
            now = list_images(self.source)
        except UserError:
            now = []
        now_set = set(now)
        added = [f for f in now if f not in then]
        gone = [f for f in then if f not in now_set]
        changed = [f for f in now if f in then and _stat_pair(os.path.join(self.source, f)) != then[f]]
        if added or gone or changed:
            first = (added + gone + changed)[0]
            raise UserError(f"--data_dir {self.root}: its source {self.source} changed since it was prepared "
                            f"({len(added)} added, {len(gone)} removed, {len(changed)} modified; first {first!r}); "
                            f"{self.refresh_hint()}")

    def check_side(self, image_size: int) -> None:
        if image_size != self.image_size:
            raise UserError(f"--data_dir {self.root} holds images prepared at {self.image_size} px, this run reads "
                            f"them at {image_size} px; run at --image_size {self.image_size} or prepare the source "
                            f"again at {image_size} (python data_loader.py --prepare --image_size {image_size})")

    def guess_channels(self, filenames: list) -> int:
        """ImageStore's rule on the source: 3 when any of the first 16 files that can be read has real colour."""
        return 3 if any(self.is_colour[self.position[f]] for f in filenames[:16] if f in self.position) else 1

    def positions(self, filenames: list) -> np.ndarray:
        missing = [f for f in filenames if f not in self.position]
        if missing:
            raise UserError(f"--data_dir {self.root}: {len(missing)} file(s) are not in this prepared folder, first "
                            f"{missing[0]!r}; check the label file, or {self.refresh_hint()}")
        return np.array([self.position[f] for f in filenames], dtype=np.int64)

    def read(self, positions, channels: int) -> np.ndarray:
        """uint8 (B, channels, S, S) of the images at `positions` (index positions of readable files)."""
        s = self.image_size
        out = np.empty((len(positions), channels, s, s), dtype=np.uint8)
        for j, i in enumerate(np.asarray(positions).tolist()):
            if self.row[i] < 0:
                raise UserError(self.unreadable[self.filenames[i]])
            if channels == 3 and self.is_colour[i]:
                out[j] = self._colour_image(i)
                continue
            self._read_row(self.row[i], out[j, 0])
            if channels == 3:
                out[j, 1:] = out[j, 0]
        return out

    def _read_row(self, row: int, into: np.ndarray) -> None:
        """One (S, S) row of images.npy into `into`: a pread where the system has one, else through the memory map
        (whose pages then count in this process's resident memory)."""
        if not hasattr(os, "preadv"):
            if self._file is None:
                self._file = np.load(os.path.join(self.root, IMAGES), mmap_mode="r")
            into[...] = self._file[row, 0]
            return
        if self._file is None:
            self._file = os.open(os.path.join(self.root, IMAGES), os.O_RDONLY)
        if os.preadv(self._file, [into], self._offset + row * into.size) != into.size:
            raise UserError(f"--data_dir {self.root}: {IMAGES} is shorter than its index; {self.refresh_hint()}")

    def _colour_image(self, i: int) -> np.ndarray:
        chunk = self.row[i] // self.manifest["chunk_size"]
        if chunk not in self._colour:
            self._colour[chunk] = np.load(os.path.join(self.root, f"colour_{chunk:05d}.npy"), mmap_mode="r")
        return self._colour[chunk][self.colour_row[i]]

    def __getstate__(self):                        # a DataLoader worker opens its own file descriptor
        return {**self.__dict__, "_file": None, "_colour": {}}


def _stat_pair(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


_OPENED: dict = {}


def open_prepared(root: str) -> PreparedImages | None:
    """The prepared folder at `root`, opened and checked against its source once per process; None when
    `root` is not a prepared folder. An unfinished preparation is a UserError saying how to finish it."""
    manifest = _read_manifest(root)
    if manifest is None:
        if os.path.isfile(os.path.join(root, PLAN)):
            with open(os.path.join(root, PLAN)) as f:
                plan = json.load(f)
            raise UserError(f"--data_dir {root}: its preparation did not finish; continue it with python "
                            f"data_loader.py --prepare --data_dir {plan.get('source')} --output_dir {root} "
                            f"--image_size {plan.get('image_size')}")
        return None
    key = (os.path.realpath(root), os.stat(os.path.join(root, MANIFEST)).st_mtime_ns)
    if key not in _OPENED:
        prepared = PreparedImages(root, manifest)
        prepared.check_source()
        _OPENED[key] = prepared
    return _OPENED[key]
