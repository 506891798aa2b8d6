"""Views per second of SimCLR pretraining steps, three ways, interleaved in one process so the ratios
are fair on a shared or throttling machine:

  (a) model   the limit: forward + NT-Xent + backward + Adam step on ready normalised tensors
  (b) batch   our path: in-memory ImageStore (decoded once) -> BatchLoader -> BatchAugment x 2 -> (a)
  (c) pil     the classic path: PILTwoViewDataset (decode + torchvision per image) in a DataLoader -> (a)
  (d) stream  our path for data over --cache_gb: workers decode uint8 batches -> BatchAugment x 2 -> (a)

    python benchmarks/ssl_throughput.py                                   # 64 and 224 px, about 4 min on 2 idle cores
    python benchmarks/ssl_throughput.py --sizes 64 --steps 30 --precision both
    python benchmarks/ssl_throughput.py --sizes 224 --steps 5 --warmup 1 --num_workers 0 1 2
    python benchmarks/ssl_throughput.py --sizes 64 --profile               # where the augmentation time goes

The last line holds key=value pairs (ratio_b_over_a_64=..., ratio_b_over_c_64=..., ...). b/c uses the
fastest worker count measured for (c); best_stream_workers is the fastest count for (d), to compare
with default_stream_workers, the count train_ssl.py picks on this machine. augment_share / pil_share are the milliseconds of the two views of
one batch (BatchAugment, or PIL in-process), measured alone, over the milliseconds of one model step:
on a machine shared with other jobs they are steadier than the throughput ratios. It writes its own
small PNGs into a temporary folder.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_loader  # noqa: E402
import utils  # noqa: E402
from model_ssl import ModelConfig, SimCLR, nt_xent_loss, use_small_stem  # noqa: E402


# ============ data ============

def write_pngs(folder: str, n: int, side: int, seed: int = 0) -> list[str]:
    """The toolkit's synthetic chest X-rays, or simple stand-ins where that generator is missing."""
    if hasattr(data_loader, "generate_images"):
        return [row[0] for row in data_loader.generate_images(folder, "", n, 3, side, seed, 0)]
    return write_simple_pngs(folder, n, side, seed)


def write_simple_pngs(folder: str, n: int, side: int, seed: int = 0) -> list[str]:
    """Grayscale 'chest-like' PNGs: a vertical gradient, two dark ellipses, noise (compresses like real scans)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    names = []
    for i in range(n):
        img = 0.3 + 0.4 * yy + 0.05 * rng.standard_normal((side, side))
        for cx in (0.3 + 0.05 * rng.standard_normal(), 0.7 + 0.05 * rng.standard_normal()):
            img -= 0.25 * (((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
        names.append(f"img_{i:04d}.png")
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(os.path.join(folder, names[-1]))
    return names


def cycle_batch_loader(loader):
    """BatchLoader batches forever, a new shuffle each epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ============ the model step shared by (a), (b), (c) ============

class ModelStep:
    """One SimCLR optimisation step, as train_ssl.py takes it: one forward over both views."""

    def __init__(self, backbone: str, image_size: int, device, autocast_dtype, optimizer: str = "adam"):
        torch.manual_seed(0)
        self.model = SimCLR(ModelConfig(backbone=backbone, small_stem=use_small_stem(image_size)))
        self.model = self.model.to(device).to(memory_format=torch.channels_last).train()
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        else:                                       # as train_ssl.py builds it; lars_loop: one parameter at a time
            self.optimizer = utils.LARS(utils.split_decay_groups(self.model, 1e-6), lr=0.1,
                                        foreach=False if optimizer == "lars_loop" else None)
        self.device, self.autocast_dtype = device, autocast_dtype

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        x = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            z1, z2 = self.model(x).float().chunk(2)
            loss = nt_xent_loss(z1, z2, 0.5)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()  # no host sync per step, as utils.train_one_epoch (timed() syncs at the end)


def timed(next_views, step, warmup: int, steps: int, device) -> tuple[int, float]:
    """(views, seconds) of `steps` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step(*next_views())
    sync(device)
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        v1, v2 = next_views()
        step(v1, v2)
        n += v1.shape[0] + v2.shape[0]
    sync(device)
    return n, time.perf_counter() - start


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ============ the three paths ============

def path_model(images_per_step: int, size: int, device):
    g = torch.Generator().manual_seed(0)
    ready = [torch.randn(images_per_step, 3, size, size, generator=g).to(device).contiguous(
        memory_format=torch.channels_last) for _ in range(2)]
    return lambda: ready


def path_batch(store, images_per_step: int, size: int, device, num_workers: int = 0):
    """Our path: BatchLoader batches of uint8 images (slices of the in-memory cache, or decoded by
    `num_workers` DataLoader workers when streaming) -> BatchAugment x 2 on the device."""
    loader = data_loader.BatchLoader(store, np.arange(len(store)), batch_size=images_per_step, shuffle=True,
                                     drop_last=True, num_workers=num_workers, pin_memory=device.type == "cuda")
    batches = cycle_batch_loader(loader)
    augment = data_loader.BatchAugment(data_loader.SSL_AUGMENT, size, channels_last=True)

    def next_views():
        images = next(batches)[0].to(device, non_blocking=True)
        return augment(images), augment(images)
    return next_views, augment


def path_stream(root: str, names: list, images_per_step: int, size: int, device, num_workers: int):
    """Our path for data larger than --cache_gb, as train_ssl.py streams it: nothing cached."""
    store = data_loader.ImageStore(root, names, size, cache_gb=0, channels=1)
    return path_batch(store, images_per_step, size, device, num_workers)


def path_pil(root: str, names: list, images_per_step: int, size: int, device, num_workers: int):
    """A fresh DataLoader per measurement: idle workers would otherwise keep decoding during (a) and (b)."""
    dataset = data_loader.PILTwoViewDataset(root, names, data_loader.build_pil_transform(data_loader.SSL_AUGMENT,
                                                                                           size))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10 ** 9)
    loader = torch.utils.data.DataLoader(dataset, batch_size=images_per_step, sampler=sampler,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    it = iter(loader)

    def next_views():
        v1, v2 = next(it)
        return v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
    return next_views, it


def augment_ms(augment, store, images_per_step: int, device, reps: int = 10) -> float:
    """Milliseconds for the two views of one batch (loader slice + 2 x BatchAugment), without the model."""
    images = store.images[:images_per_step].to(device)
    for _ in range(2):
        augment(images), augment(images)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        augment(images), augment(images)
    sync(device)
    return (time.perf_counter() - start) / reps * 1000


def pil_ms(root: str, names: list, images_per_step: int, size: int, reps: int = 2) -> float:
    """Milliseconds for the two views of one batch made per image with PIL in this process, without the model."""
    views, it = path_pil(root, names, images_per_step, size, torch.device("cpu"), 0)
    views()
    start = time.perf_counter()
    for _ in range(reps):
        views()
    return (time.perf_counter() - start) / reps * 1000


def profile_augment(augment, store, images_per_step: int, device) -> None:
    images = store.images[:images_per_step].to(device)
    augment(images)
    with torch.profiler.profile() as prof:
        for _ in range(5):
            augment(images), augment(images)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ============ one image size ============

def bench_size(args, size: int, steps: int, warmup: int, rounds: int, root: str, names: list, device,
               threads: int) -> dict:
    """(a), (b) and (c) in turn, `rounds` times, so a change in the machine's load hits them alike."""
    images_per_step = args.batch_size // 2
    store = data_loader.ImageStore(root, names, size, channels=1)
    per_round = -(-steps // rounds)
    rows = {}
    for precision in precisions(args.precision):
        dtype = torch.bfloat16 if precision == "bf16" else None
        step = ModelStep(args.backbone, size, device, dtype, args.optimizer)
        tag = f"{precision}_{size}"
        batch_views, augment = path_batch(store, images_per_step, size, device)
        model_views = path_model(images_per_step, size, device)
        totals = {}
        for r in range(rounds):
            first = warmup if r == 0 else 0
            add(totals, "a", timed(model_views, step, first, per_round, device))
            add(totals, "b", timed(batch_views, step, first, per_round, device))
            for workers in args.num_workers:
                # workers get cores of their own, as utils.configure_cpu_threads does in the trainer
                torch.set_num_threads(max(1, threads - workers) if device.type == "cpu" and workers else threads)
                views, it = path_pil(root, names, images_per_step, size, device, workers)
                add(totals, f"c{workers}", timed(views, step, max(1, warmup), per_round, device))
                del it, views   # shuts the workers down before the next path runs
                views, it = path_stream(root, names, images_per_step, size, device, workers)
                add(totals, f"d{workers}", timed(views, step, max(1, warmup), per_round, device))
                del it, views
                torch.set_num_threads(threads)
        rows.update({f"{k}_{tag}": n / sec for k, (n, sec) in totals.items()})
        rows[f"aug_ms_{tag}"] = augment_ms(augment, store, images_per_step, device)
        rows[f"pil_ms_{tag}"] = pil_ms(root, names, images_per_step, size)
        rows[f"step_ms_{tag}"] = 1000 * args.batch_size / rows[f"a_{tag}"]
        if args.profile:
            profile_augment(augment, store, images_per_step, device)
        print_rows(args, size, precision, rows)
    return rows


def add(totals: dict, key: str, measured: tuple) -> None:
    n, sec = totals.get(key, (0, 0.0))
    totals[key] = (n + measured[0], sec + measured[1])


def precisions(choice: str) -> list[str]:
    return ["fp32", "bf16"] if choice == "both" else [choice]


def print_rows(args, size, precision, rows):
    tag = f"{precision}_{size}"
    cells = "  ".join(f"{k}(workers={w}) {rows[f'{k}{w}_{tag}']:8.1f}" for k in "cd" for w in args.num_workers)
    print(f"{size:>4} px  {precision:<4}  a {rows[f'a_{tag}']:8.1f}  b {rows[f'b_{tag}']:8.1f}  {cells}   "
          f"per step: model {rows[f'step_ms_{tag}']:.0f} ms, BatchAugment x2 {rows[f'aug_ms_{tag}']:.1f} ms, "
          f"PIL x2 {rows[f'pil_ms_{tag}']:.0f} ms  "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)


def summary(args, rows: dict) -> str:
    pairs = []
    both = args.precision == "both"
    for size in args.sizes:
        for precision in precisions(args.precision):
            tag, suffix = f"{precision}_{size}", f"_{precision}" if both else ""
            a, b = rows[f"a_{tag}"], rows[f"b_{tag}"]
            best_c = max(rows[f"c{w}_{tag}"] for w in args.num_workers)
            pairs += [f"views_per_s_a_{size}{suffix}={a:.1f}", f"views_per_s_b_{size}{suffix}={b:.1f}",
                      f"views_per_s_c_{size}{suffix}={best_c:.1f}",
                      f"ratio_b_over_a_{size}{suffix}={b / a:.3f}", f"ratio_b_over_c_{size}{suffix}={b / best_c:.3f}",
                      f"views_per_s_d_{size}{suffix}={max(rows[f'd{w}_{tag}'] for w in args.num_workers):.1f}",
                      f"best_stream_workers_{size}{suffix}={max(args.num_workers, key=lambda w: rows[f'd{w}_{tag}'])}",
                      f"augment_share_{size}{suffix}={rows[f'aug_ms_{tag}'] / rows[f'step_ms_{tag}']:.3f}",
                      f"pil_share_{size}{suffix}={rows[f'pil_ms_{tag}'] / rows[f'step_ms_{tag}']:.3f}"]
        if both:
            for path in "ab":
                pairs.append(f"ratio_bf16_over_fp32_{path}_{size}="
                             f"{rows[f'{path}_bf16_{size}'] / rows[f'{path}_fp32_{size}']:.3f}")
    return " ".join(pairs)


# ============ main ============

def main(args):
    device = utils.resolve_device(args.device)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.precision == "auto":
        dtype, why = utils.resolve_precision("auto", None, device)
        args.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        print(f"precision: {why}")
    steps, warmups, rounds = (per_size(v, args.sizes, i) for i, v in enumerate((args.steps, args.warmup, args.rounds)))
    print(f"device {device}, torch {torch.__version__}, {os.cpu_count()} cores, {threads} threads for (a)/(b), "
          f"(c) workers {args.num_workers} with threads-workers threads, backbone {args.backbone}, "
          f"optimizer {args.optimizer}, "
          f"{args.batch_size} views/step ({args.batch_size // 2} images), PNGs {args.png_size} px, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        names = write_pngs(root, args.num_images, args.png_size)
        for size in args.sizes:
            rows.update(bench_size(args, size, steps[size], warmups[size], rounds[size], root, names, device,
                                   threads))
    print(f"default_stream_workers={utils.default_num_workers(device, streaming=True)} " + summary(args, rows))


SMALL, LARGE = (16, 2, 2), (3, 1, 1)  # default (steps, warmup, rounds): a 224 px fp32 step takes seconds on a CPU


def per_size(values, sizes: list, field: int) -> dict:
    """One value per size, the last repeated; the SMALL/LARGE defaults where none were given."""
    if not values:
        return {s: (SMALL if s <= 128 else LARGE)[field] for s in sizes}
    return {s: values[min(i, len(values) - 1)] for i, s in enumerate(sizes)}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image sides in pixels")
    p.add_argument("--batch_size", type=int, default=128, help="views per step (two per image)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help=f"timed steps per path, one value per size, the last repeated (default {SMALL[0]} up to "
                        f"128 px, {LARGE[0]} above)")
    p.add_argument("--warmup", type=int, nargs="+", default=None,
                   help=f"untimed steps before timing, per size; (c) repeats them each round for its workers' start "
                        f"(default {SMALL[1]} / {LARGE[1]})")
    p.add_argument("--rounds", type=int, nargs="+", default=None,
                   help=f"times (a), (b), (c) take turns, per size; the timed steps are split over the rounds "
                        f"(default {SMALL[2]} / {LARGE[2]})")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "both"],
                   help="autocast of the model step; auto as the trainer chooses it")
    p.add_argument("--num_workers", type=int, nargs="+", default=[0, 1],
                   help="DataLoader workers for (c) and (d); each count is measured, b/c uses the fastest")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"], help="encoder")
    p.add_argument("--optimizer", default="adam", choices=["adam", "lars", "lars_loop"],
                   help="the model step's optimizer: lars as the pretraining recipe uses it (multi-tensor on a GPU), "
                        "lars_loop the same one parameter at a time")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--num_images", type=int, default=256, help="synthetic PNGs written to a temp folder")
    p.add_argument("--png_size", type=int, default=256, help="side of the synthetic PNGs in pixels")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of BatchAugment")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
