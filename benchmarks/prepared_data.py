"""What decoding costs, what preparing a folder costs, and what a train_ssl.py run gains from a prepared folder.

  1. decode   ms per image on one core (image_io.decode_to_tensor at --image_size) of a 1024x1024 8-bit PNG,
              a 16-bit PNG and a 2048x2048 12-bit DICOM, written into a temporary folder
  2. prepare  images/s of data_loader.py --prepare over --data_dir (every core)
  3. runs     train_ssl.py on the source folder and on the prepared folder, with one and with two torchrun
              processes (gloo on the CPU): start-up (launch to its settings file, written just before the first
              step), peak memory of each training process (Rss, Pss, Pss_Anon, Pss_File from
              /proc/PID/smaps_rollup, sampled every 0.5 s) and pretraining images/s (all processes) over
              --steps steps after --warmup, read from its progress bar; then the run is stopped (Ctrl-C)
  3b. store   in this process: what opening each folder and reading one shuffled epoch through BatchLoader
              adds to its smaps_rollup values (the source folder's RAM cache against the prepared folder's reads)
  4. litdata  with --litdata and litdata installed: litdata.optimize then StreamingDataset over the same
              images, against the prepared folder (one shuffled epoch in batches of 64)

    python benchmarks/prepared_data.py --data_dir ./data/bench_300 --num_images 300 --steps 10 --warmup 3
    python benchmarks/prepared_data.py --data_dir ./data/bench_100k --num_images 100000 --steps 100 --warmup 10
    python benchmarks/prepared_data.py --data_dir ./data/bench_1k --num_images 1000 --only decode prepare litdata \
        --litdata

--data_dir is generated (synthetic.generate_dataset at --image_size, --num_images images) when it holds no
images, and prepared into DATA_DIR_prepared_<side> unless that is prepared already. Linux only (/proc, pty).
"""
import argparse
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_io  # noqa: E402
import prepared_images  # noqa: E402
import synthetic  # noqa: E402

MiB = 2 ** 20
SMAPS_KEYS = ("Rss", "Pss", "Pss_Anon", "Pss_File")


# ============ 1. decoding cost ============

def chest_like(side: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient with two dark fields and noise in [0, 1]: compresses like a radiograph, not like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    img = 0.3 + 0.4 * yy + 0.03 * rng.standard_normal((side, side))
    for cx in (0.3, 0.7):
        img -= 0.25 * (((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    return np.clip(img, 0, 1)


def write_dicom(path: str, pixels: np.ndarray) -> None:
    """A 12-bit MONOCHROME2 radiograph-like DICOM (uncompressed, explicit VR little endian, a stored window),
    written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "bench"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.WindowCenter, ds.WindowWidth = 2048, 4096          # a stored window, as radiographs usually carry
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def decode_costs(image_size: int, repeats: int) -> dict:
    """{kind: ms per decode_to_tensor on one core}, each file decoded `repeats` times after one warm-up."""
    import torch

    torch.set_num_threads(1)
    costs = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"png8_1024": os.path.join(tmp, "a.png"), "png16_1024": os.path.join(tmp, "b.png"),
                 "dicom_2048": os.path.join(tmp, "c.dcm")}
        Image.fromarray((chest_like(1024) * 255).astype(np.uint8)).save(files["png8_1024"])
        Image.fromarray((chest_like(1024, 1) * 65535).astype(np.uint16)).save(files["png16_1024"])
        write_dicom(files["dicom_2048"], chest_like(2048, 2) * 4095)
        for kind, path in files.items():
            image_io.decode_to_tensor(path, image_size, 1)
            start = time.process_time()
            for _ in range(repeats):
                image_io.decode_to_tensor(path, image_size, 1)
            costs[kind] = 1000 * (time.process_time() - start) / repeats
            print(f"decode {kind} ({os.path.getsize(path) / MiB:.1f} MiB) -> {image_size} px: {costs[kind]:.1f} ms of "
                  f"one core per image")
    return costs


# ============ 2. preparation ============

def source_folder(args) -> str:
    if not (os.path.isdir(args.data_dir) and os.listdir(args.data_dir)):
        start = time.perf_counter()
        synthetic.generate_dataset(args.data_dir, args.num_images, 3, args.image_size, 42, 0)
        print(f"generated {args.num_images} images at {args.image_size} px in {time.perf_counter() - start:.0f} s "
              f"-> {args.data_dir}")
    return args.data_dir


def prepare_rate(source: str, prepared: str, image_size: int) -> float:
    """images/s of a preparation from scratch (an earlier one is reused and not timed)."""
    if prepared_images.is_prepared(prepared):
        print(f"{prepared}: prepared already (delete it to time the preparation)")
        return float("nan")
    start = time.perf_counter()
    manifest = prepared_images.prepare(source, prepared, image_size)
    took = time.perf_counter() - start
    rate = len(manifest["files"]) / took
    print(f"prepare {len(manifest['files'])} images at {image_size} px on {os.cpu_count()} cores: {took:.1f} s, "
          f"{rate:.0f} images/s, {os.path.getsize(os.path.join(prepared, prepared_images.IMAGES)) / MiB:.0f} MiB")
    return rate


# ============ 3. train_ssl.py runs ============

def smaps(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith("0"))
    except OSError:
        return None
    return {k: int(fields[k].split()[0]) * 1024 for k in SMAPS_KEYS if k in fields}


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class MemorySampler(threading.Thread):
    """Peak smaps_rollup values of the training processes: the launched one, or torchrun's children."""

    def __init__(self, root_pid: int, torchrun: bool):
        super().__init__(daemon=True)
        self.root_pid, self.torchrun, self.peak, self.stop = root_pid, torchrun, {}, threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            for pid in children(self.root_pid) if self.torchrun else [self.root_pid]:
                now = smaps(pid)
                if now:
                    peak = self.peak.setdefault(pid, dict.fromkeys(SMAPS_KEYS, 0))
                    for k, v in now.items():
                        peak[k] = max(peak[k], v)


BAR = re.compile(r"pretrain (\d+)/\d+:[^\r\n]*?\s(\d+)/(\d+) \[")


def read_bar(fd: int, steps: int, warmup: int, deadline: float) -> tuple:
    """(seconds, steps) between the first bar position at or past `warmup` global steps and the first at or past
    `warmup + steps`, from the run's progress bar on `fd`; None when the run ends or the deadline passes first."""
    text, first = "", None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536).decode(errors="replace")
        except OSError:
            return None
        if not chunk:
            return None
        text = (text + chunk)[-4096:]
        for epoch, step, per_epoch in BAR.findall(text):
            done = (int(epoch) - 1) * int(per_epoch) + int(step)
            if first is None and done >= warmup:
                first = (time.monotonic(), done)
            elif first is not None and done >= warmup + steps:
                return time.monotonic() - first[0], done - first[1]
        text = text[-300:]
    return None


def train_run(data_dir: str, processes: int, args, out: str) -> dict:
    """One train_ssl.py run on `data_dir` with `processes` processes, stopped after its measured steps."""
    cmd = [os.path.join(ROOT, "train_ssl.py"), "--data_dir", data_dir, "--output_dir", out, "--image_size",
           str(args.image_size), "--batch_size", str(args.batch_size), "--num_epochs", "100000", "--warmup_epochs", "0",
           "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *cmd] \
        if processes > 1 else [sys.executable, *cmd]
    master, slave = pty.openpty()                   # a terminal: the bar then updates every 0.5 s
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))   # tqdm draws nothing at 0 columns
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, start_new_session=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))})
    os.close(slave)
    sampler = MemorySampler(proc.pid, processes > 1)
    sampler.start()
    try:
        measured = read_bar(master, args.steps, args.warmup, time.monotonic() + args.timeout)
    finally:
        sampler.stop.set()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    settings = os.path.join(out, "ssl_settings.json")
    startup = os.path.getmtime(settings) - launched if os.path.isfile(settings) else float("nan")
    rate = measured[1] * args.batch_size * processes / measured[0] if measured else float("nan")
    return {"startup_s": startup, "images_per_s": rate, "memory": list(sampler.peak.values())}


def report_run(name: str, processes: int, run: dict) -> None:
    mem = "; ".join(" ".join(f"{k} {m[k] / MiB:.0f}" for k in SMAPS_KEYS) for m in run["memory"]) or "not sampled"
    print(f"{name:9s} x{processes}: start-up {run['startup_s']:.1f} s, {run['images_per_s']:.1f} images/s, "
          f"peak MiB per process: {mem}", flush=True)


# ============ 3b. one process, one epoch ============

def store_growth(source: str, prepared: str, image_size: int) -> dict:
    """MiB each smaps_rollup value of this process grew by while an ImageStore on each folder was opened and
    one shuffled epoch read through BatchLoader, and the seconds that took."""
    import data_loader
    growth = {}
    for root in (prepared, source):            # warm-up: imports, the allocator, the first batch
        warm = data_loader.ImageStore(root, image_io.list_images(root)[:64], image_size, skip_unreadable=True)
        list(data_loader.BatchLoader(warm, np.arange(len(warm)), batch_size=64))
    prepared_images._OPENED.clear()              # opened again below: the index read and the source check timed
    for name, root in (("prepared", prepared), ("source", source)):
        before, start = smaps(os.getpid()), time.perf_counter()
        store = data_loader.ImageStore(root, image_io.list_images(root), image_size, skip_unreadable=True)
        for _ in data_loader.BatchLoader(store, np.arange(len(store)), batch_size=64, shuffle=True):
            pass
        took, after = time.perf_counter() - start, smaps(os.getpid())
        growth[name] = {k: (after[k] - before[k]) / MiB for k in SMAPS_KEYS}
        print(f"{name:9s} open + one epoch of {len(store)} images: {took:.1f} s, this process grew by "
              + " ".join(f"{k} {v:.0f}" for k, v in growth[name].items()) + " MiB")
        del store
    return growth


# ============ 4. LitData ============

def litdata_comparison(source: str, prepared: str, image_size: int) -> None:
    try:
        import litdata
    except ImportError:
        print("litdata: not installed (pip install litdata); skipped")
        return
    import torch

    import data_loader
    names = image_io.list_images(source)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        litdata.optimize(fn=_LitItem(source, image_size), inputs=names, output_dir=out, num_workers=os.cpu_count(),
                         chunk_bytes="64MB", mode="overwrite")
        optimize_s = time.perf_counter() - start
        loader = litdata.StreamingDataLoader(litdata.StreamingDataset(out, shuffle=True, seed=0), batch_size=64)
        start = time.perf_counter()
        n = sum(len(batch["image"]) for batch in loader)
        lit_rate = n / (time.perf_counter() - start)
    store = data_loader.ImageStore(prepared, names, image_size, skip_unreadable=True)
    batches = data_loader.BatchLoader(store, np.arange(len(store)), batch_size=64, shuffle=True)
    start = time.perf_counter()
    m = sum(len(images) for images, _, _ in batches)
    ours = m / (time.perf_counter() - start)
    print(f"litdata {litdata.__version__}: optimize {len(names)} images {len(names) / optimize_s:.0f} images/s; one "
          f"shuffled epoch {lit_rate:.0f} images/s. prepared folder: one shuffled epoch {ours:.0f} images/s "
          f"(torch {torch.__version__})")


class _LitItem:
    """litdata.optimize's fn: one file -> its name and its uint8 (1, S, S) pixels, decoded as ImageStore does."""

    def __init__(self, root: str, image_size: int):
        self.root, self.image_size = root, image_size

    def __call__(self, name: str) -> dict:
        return {"name": name, "image": image_io.decode_to_tensor(os.path.join(self.root, name), self.image_size,
                                                                 1).numpy()}


# ============ main ============

def main(args):
    results = {}
    if "decode" in args.only:
        results["decode_ms"] = decode_costs(args.image_size, args.repeats)
    source = source_folder(args)
    prepared = args.prepared_dir or f"{args.data_dir.rstrip('/')}_prepared_{args.image_size}"
    if "prepare" in args.only:
        results["prepare_images_per_s"] = prepare_rate(source, prepared, args.image_size)
    if "store" in args.only:
        results["store_growth_mib"] = store_growth(source, prepared, args.image_size)
    if "runs" in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            for processes in args.processes:
                for name, folder in (("source", source), ("prepared", prepared)):
                    run = train_run(folder, processes, args, os.path.join(tmp, f"{name}_{processes}"))
                    report_run(name, processes, run)
                    results[f"{name}_x{processes}"] = run
    if "litdata" in args.only and args.litdata:
        litdata_comparison(source, prepared, args.image_size)
    print(json.dumps(results, default=float))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="./data/bench_prepared", help="source folder (generated when empty)")
    p.add_argument("--prepared_dir", default=None, help="prepared folder (default: DATA_DIR_prepared_<side>)")
    p.add_argument("--num_images", type=int, default=300, help="images to generate when --data_dir is empty")
    p.add_argument("--image_size", type=int, default=128, help="side in pixels: generated, prepared, trained")
    p.add_argument("--repeats", type=int, default=5, help="decodes per file for the decoding cost")
    p.add_argument("--batch_size", type=int, default=64, help="train_ssl.py --batch_size (per process)")
    p.add_argument("--steps", type=int, default=10, help="measured pretraining steps per run")
    p.add_argument("--warmup", type=int, default=3, help="steps before the measured ones")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="torchrun processes per run")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a run may take before it is given up")
    p.add_argument("--only", nargs="+", default=["decode", "prepare", "store", "runs", "litdata"],
                   choices=["decode", "prepare", "store", "runs", "litdata"], help="the parts to run")
    p.add_argument("--litdata", action="store_true", help="also compare with litdata (needs pip install litdata)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
