"""Peak host memory of pretraining, and how much of it the image cache adds.

    python benchmarks/peak_memory.py                           # 5,000 synthetic images at 224 px, CPU
    python benchmarks/peak_memory.py --num_images 1000 --seconds 60

Runs train_ssl.py twice as a child process, on the full dataset and on a small one (--small_images
images) with the same batch, model and settings, and samples the child's peak resident memory
(VmHWM) until it has trained for --seconds after its cache is built (or finishes). The difference of
the two peaks is what the data adds; it should stay below twice the cache's bytes
(images x channels x side x side, uint8). Prints both peaks, the cache, the model and optimizer
state, and on the last line key=value pairs. Linux only (reads /proc).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data_loader  # noqa: E402
import image_io  # noqa: E402
import synthetic  # noqa: E402
import utils  # noqa: E402
from model_ssl import ModelConfig, SimCLR  # noqa: E402

MiB = 2 ** 20


def peak_rss(args, data_dir: str, out: str) -> tuple[float, float]:
    """(peak resident MiB, seconds run) of one train_ssl.py child."""
    cmd = [sys.executable, os.path.join(ROOT, "train_ssl.py"), "--data_dir", data_dir, "--output_dir", out,
           "--image_size", str(args.image_size), "--batch_size", str(args.batch_size), "--num_epochs", "1",
           "--warmup_epochs", "0", "--device", args.device]
    start = time.perf_counter()
    log_path = os.path.join(out + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log_file:
        child = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    peak, training_since = 0, None
    while child.poll() is None:
        peak = max(peak, vm_hwm_kib(child.pid))
        if training_since is None and "SimCLR pretraining" in read(log_path):
            training_since = time.perf_counter()
        if training_since and time.perf_counter() - training_since > args.seconds:
            child.kill()
            break
        time.sleep(0.1)
    child.wait()
    if training_since is None:
        raise SystemExit(f"train_ssl.py stopped before training:\n{read(log_path)[-2000:]}")
    return peak / 1024, time.perf_counter() - start


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def dataset(folder: str, n: int, side: int) -> str:
    if not os.path.isfile(os.path.join(folder, "labels.csv")):
        print(f"writing {n} synthetic images at {side} px to {folder} ...", flush=True)
        synthetic.generate_dataset(folder, n, 3, side, 42, 0)
    return folder


def main(args):
    if not os.path.exists("/proc/self/status"):
        raise utils.UserError("peak_memory.py reads /proc and runs on Linux only")
    big = dataset(args.data_dir, args.num_images, args.image_size)
    small = dataset(args.data_dir + f"_small{args.small_images}", args.small_images, args.image_size)
    names = image_io.list_images(big)
    n_images = len(names)
    store_channels = data_loader.ImageStore(big, names[:16], args.image_size).channels
    cache_mib = n_images * store_channels * args.image_size ** 2 / MiB
    params = sum(p.numel() for p in SimCLR(ModelConfig()).parameters())
    state_mib = params * 4 * 4 / MiB  # weights, gradients, Adam's two moments, fp32
    with tempfile.TemporaryDirectory() as out:
        peak_big, sec_big = peak_rss(args, big, os.path.join(out, "big"))
        peak_small, sec_small = peak_rss(args, small, os.path.join(out, "small"))
    added = peak_big - peak_small
    print(f"{n_images} images x {store_channels} channel(s) at {args.image_size} px: cache {cache_mib:.0f} MiB; "
          f"model + gradients + Adam state {state_mib:.0f} MiB")
    print(f"peak resident memory: {peak_big:.0f} MiB with {n_images} images ({sec_big:.0f} s), "
          f"{peak_small:.0f} MiB with {args.small_images} ({sec_small:.0f} s); the data adds {added:.0f} MiB "
          f"= {added / cache_mib:.2f} x the cache")
    print(f"cache_mib={cache_mib:.1f} state_mib={state_mib:.1f} peak_mib={peak_big:.1f} peak_small_mib={peak_small:.1f} "
          f"added_mib={added:.1f} added_over_cache={added / cache_mib:.3f}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--data_dir", default="./data/peak_memory", help="synthetic dataset (written if absent)")
    p.add_argument("--num_images", type=int, default=5000, help="images of the full run")
    p.add_argument("--small_images", type=int, default=128, help="images of the reference run")
    p.add_argument("--image_size", type=int, default=224, help="side in pixels")
    p.add_argument("--batch_size", type=int, default=32, help="images per step")
    p.add_argument("--seconds", type=float, default=45, help="training seconds sampled after the cache is built")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
