"""Views per second of SimCLR pretraining steps, three ways, interleaved in one process so the ratios
are fair on a shared or throttling machine:

  (a) model   the limit: forward + NT-Xent + backward + Adam step on ready normalised tensors
  (b) batch   our path: in-memory ImageStore (decoded once) -> BatchLoader -> BatchAugment x 2 -> (a)
  (c) pil     the classic path: PILTwoViewDataset (decode + torchvision per image) in a DataLoader -> (a)
  (d) stream  our path for data over --cache_gb: workers decode uint8 batches -> BatchAugment x 2 -> (a)
  (e) prepared  with --prepared: a prepared folder (no cache, no decoding) -> BatchLoader -> BatchAugment x 2 -> (a)

    python benchmarks/ssl_throughput.py                                   # 64 and 224 px, about 4 min on 2 idle cores
    python benchmarks/ssl_throughput.py --sizes 64 --steps 30 --precision both
    python benchmarks/ssl_throughput.py --sizes 224 --steps 5 --warmup 1 --num_workers 0 1 2
    python benchmarks/ssl_throughput.py --sizes 64 --profile               # where the augmentation time goes
    python benchmarks/ssl_throughput.py --sizes 128 --prepared_dir ./data/bench_100k_prepared_128   # (e) at scale
    python benchmarks/ssl_throughput.py --train_step --sizes 64 --batches 64 256 --precision both \
        --optimizer lars --cuda_graphs off on --profile_md step_profile.md   # issue 23, on a GPU

--train_step measures train_ssl.py's own step instead: its model, optimizer, schedule, BatchAugment and
step (--cuda_graphs off: training.train_one_epoch's; on: the capture-friendly step, replayed from a CUDA graph
on a GPU) over full epochs of an in-memory BatchLoader, loss read every training.HOST_SYNC_EVERY steps and at
the end of each epoch, against (a) at the same batch (images per step), precision and optimizer; it prints
step_over_model_<graphs>_<batch>_<precision> ratios, and with --profile_md a torch.profiler table of one
eager step's parts (augmentation, forward, backward, optimizer, loss read) and of the captured step.

The last line holds key=value pairs (ratio_b_over_a_64=..., ratio_b_over_c_64=..., ...). b/c uses the
fastest worker count measured for (c); best_stream_workers is the fastest count for (d), to compare
with default_stream_workers, the count train_ssl.py picks on this machine. augment_share / pil_share are the milliseconds of the two views of
one batch (BatchAugment, or PIL in-process), measured alone, over the milliseconds of one model step:
on a machine shared with other jobs they are steadier than the throughput ratios. It writes its own
small PNGs into a temporary folder.
"""
import argparse
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augmentations  # noqa: E402
import data_loader  # noqa: E402
import distributed  # noqa: E402
import optimizers  # noqa: E402
import prepared_images  # noqa: E402
import synthetic  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from model_ssl import ModelConfig, SimCLR, nt_xent_loss, use_small_stem  # noqa: E402


# ============ data ============

def write_pngs(folder: str, n: int, side: int, seed: int = 0) -> list[str]:
    """The toolkit's synthetic chest X-rays, or simple stand-ins where that generator is missing."""
    if hasattr(data_loader, "generate_images"):
        return [row[0] for row in synthetic.generate_images(folder, "", n, 3, side, seed, 0)]
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
            self.optimizer = optimizers.LARS(optimizers.split_decay_groups(self.model, 1e-6), lr=0.1,
                                        foreach=False if optimizer == "lars_loop" else None)
        self.device, self.autocast_dtype = device, autocast_dtype

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        x = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
        with utils.autocast(self.device.type, self.autocast_dtype):
            z1, z2 = self.model(x).float().chunk(2)
            loss = nt_xent_loss(z1, z2, 0.5)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()  # no host sync per step, as training.train_one_epoch (timed() syncs at the end)


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
    augment = augmentations.BatchAugment(augmentations.SSL_AUGMENT, size, channels_last=True)

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
    dataset = augmentations.PILTwoViewDataset(root, names, augmentations.build_pil_transform(augmentations.SSL_AUGMENT,
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
    prepared_root, prepared_names = None, names
    if args.prepared_dir:
        prepared_root = args.prepared_dir
        prepared_names = prepared_images.open_prepared(prepared_root).filenames
    elif args.prepared:
        prepared_root = tempfile.mkdtemp()
        prepared_images.prepare(root, prepared_root, size, workers=1)
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
            if args.prepared:
                prepared_views, _ = path_batch(data_loader.ImageStore(prepared_root, prepared_names, size, channels=1),
                                               images_per_step, size, device)
                add(totals, "e", timed(prepared_views, step, first, per_round, device))
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
    if prepared_root and not args.prepared_dir:
        shutil.rmtree(prepared_root)
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
            if args.prepared:
                pairs += [f"views_per_s_e_{size}{suffix}={rows[f'e_{tag}']:.1f}",
                          f"ratio_e_over_a_{size}{suffix}={rows[f'e_{tag}'] / a:.3f}"]
        if both:
            for path in "ab":
                pairs.append(f"ratio_bf16_over_fp32_{path}_{size}="
                             f"{rows[f'{path}_bf16_{size}'] / rows[f'{path}_fp32_{size}']:.3f}")
    return " ".join(pairs)


# ============ --train_step: train_ssl.py's own step against (a) ============

class TiledStore:
    """An in-memory ImageStore's images repeated to `n`: long epochs of the real loader without decoding
    thousands of PNGs."""

    def __init__(self, store, n: int):
        reps = -(-n // len(store))
        self.images, self.in_memory, self.channels = store.images.repeat(reps, 1, 1, 1)[:n], True, store.channels

    def __len__(self):
        return len(self.images)

    def batch(self, idx):
        return self.images[idx]


def build_real_step(args, store, size: int, batch: int, precision: str, graphs: str, device, steps: int):
    """train_ssl.py's model, optimizer, schedule, augmentation and step, built by its own functions."""
    import train_ssl

    one_process = distributed.Dist(distributed=False, rank=0, world_size=1, is_main=True, device=device)
    targs = train_ssl.get_args_parser().parse_args([
        "--image_size", str(size), "--batch_size", str(batch), "--optimizer", args.optimizer,
        "--lr", "0.3" if args.optimizer == "lars" else "1e-4", "--precision", precision, "--cuda_graphs", graphs,
        "--num_epochs", "1000", "--warmup_epochs", "1", "--seed", "0", "--device", str(device)])
    dtype, _ = utils.resolve_precision(precision, None, device)
    torch.manual_seed(0)
    model = train_ssl.build_model(targs).to(device).to(memory_format=torch.channels_last)
    optimizer, scheduler = train_ssl.build_optimizer(targs, model, steps)
    augment = augmentations.BatchAugment(train_ssl.ssl_augment_config(targs), size, channels_last=True)
    static_step, _, _ = train_ssl.build_static_step(targs, model, augment, optimizer, device, dtype, one_process)
    optimizers.lr_on_device(optimizer, device if static_step is not None else None)
    loader = data_loader.BatchLoader(TiledStore(store, batch * steps), np.arange(batch * steps), batch_size=batch,
                                     shuffle=True, drop_last=True, pin_memory=device.type == "cuda")
    collapse = []
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, augment=augment, loader=loader, dtype=dtype,
                static_step=static_step, temperature=targs.temperature, collapse=collapse,
                loss_fn=train_ssl.make_loss_fn(augment, device, targs.temperature, collapse, one_process),
                step_fn=None if static_step is None else lambda b: static_step(b, collapse))


def real_epoch(real: dict, device, epoch: int) -> tuple[int, float]:
    """(views, seconds) of one epoch of training.train_one_epoch, the loop train_ssl.py runs."""
    real["loader"].set_epoch(epoch)
    real["collapse"].clear()
    sync(device)
    start = time.perf_counter()
    stats = training.train_one_epoch(real["model"], real["loader"], real["optimizer"], real["loss_fn"], device=device,
                                  scaler=training.make_grad_scaler(device, real["dtype"]), autocast_dtype=real["dtype"],
                                  scheduler=real["scheduler"], epoch=epoch, show_progress=False,
                                  step_fn=real["step_fn"])
    sync(device)
    assert math.isfinite(stats["loss"])
    return 2 * len(real["loader"]) * real["loader"].batch_size, time.perf_counter() - start


def bench_train_step(args, store, size: int, batch: int, precision: str, device, steps: int, rounds: int) -> dict:
    """Views/s of (a) and of the real step for each --cuda_graphs value, interleaved over `rounds`."""
    dtype, _ = utils.resolve_precision(precision, None, device)
    model_step = ModelStep(args.backbone, size, device, dtype, args.optimizer)
    model_views = path_model(batch, size, device)
    reals = {g: build_real_step(args, store, size, batch, precision, g, device, steps) for g in args.cuda_graphs}
    totals, epoch = {}, 0
    warm_steps = 5 if device.type == "cuda" else 1        # cuDNN's search, the optimizer's state, the capture
    for g, real in reals.items():
        for _ in range(-(-warm_steps // steps)):
            real_epoch(real, device, epoch)
            epoch += 1
    timed(model_views, model_step, 3 if device.type == "cuda" else 0, 1, device)
    for _ in range(rounds):
        add(totals, "a", timed(model_views, model_step, 0, steps, device))
        for g, real in reals.items():
            add(totals, g, real_epoch(real, device, epoch))
        epoch += 1
    rates = {k: n / sec for k, (n, sec) in totals.items()}
    tag = f"{batch}_{precision}"
    row = {f"views_per_s_model_{tag}": rates["a"]}
    for g in args.cuda_graphs:
        row[f"views_per_s_step_{g}_{tag}"] = rates[g]
        row[f"step_over_model_{g}_{tag}"] = rates[g] / rates["a"]
    print(f"{size:>4} px  batch {batch:>4}  {precision:<4}  model {rates['a']:9.1f} views/s  " + "  ".join(
        f"step(graphs {g}) {rates[g]:9.1f} = {rates[g] / rates['a']:.3f} x model" for g in args.cuda_graphs)
        + f"  (load average {os.getloadavg()[0]:.1f})", flush=True)
    if args.profile_md:
        real = reals.get("off") or build_real_step(args, store, size, batch, precision, "off", device, steps)
        graphed = reals.get("on")
        profile_rows(args, real, graphed, batch, precision, device, size)
    return row


PARTS = ("augmentation", "forward", "backward", "optimizer", "loss read")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync")
PROFILE_ROWS: list = []
GRAPHED = "whole step, --cuda_graphs on"


def eager_parts(real: dict, images: torch.Tensor, device) -> None:
    """One step of train_ssl.py's eager path, each part in a profiler range (the loss read, done once per
    training.HOST_SYNC_EVERY steps in training, is shown as what one read costs)."""
    from model_ssl import nt_xent_loss
    rf = torch.profiler.record_function
    with utils.autocast(device.type, real["dtype"]):
        with rf("augmentation"):
            v1, v2 = real["augment"](images), real["augment"](images)
        with rf("forward"):
            x = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
            z1, z2 = real["model"](x).float().chunk(2)
            loss = nt_xent_loss(z1, z2, real["temperature"])
    with rf("backward"):
        real["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
    with rf("optimizer"):
        real["optimizer"].step()
        real["scheduler"].step()
    with rf("loss read"):
        loss.item()


def profile_rows(args, real: dict, graphed, batch: int, precision: str, device, size: int) -> None:
    """Per step: host (CPU) ms, device ms, kernel launches and top-level operator calls of each part, and
    of the whole --cuda_graphs on step (on a GPU one graph replay; on a CPU the same step without a graph)."""
    reps = 5 if device.type == "cuda" else 1
    images = next(iter(real["loader"]))[0].to(device)
    eager_parts(real, images, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            eager_parts(real, images, device)
        if graphed is not None and graphed["static_step"] is not None:
            for _ in range(reps):
                with torch.profiler.record_function(GRAPHED):
                    graphed["static_step"]((images,), graphed["collapse"])
                    graphed["scheduler"].step()
        sync(device)
    events = list(prof.events())
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]     # kernels run on GPU clocks
    labels = PARTS + ((GRAPHED,) if graphed is not None and graphed["static_step"] is not None else ())
    for label in labels:
        ranges = [e for e in events if e.name == label]
        inside = [e for r in ranges for e in host if e.thread == r.thread and e is not r
                  and r.time_range.start <= e.time_range.start and e.time_range.end <= r.time_range.end]
        ops = [e for e in inside if e.name.startswith("aten::")
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
        n = max(1, len(ranges))
        PROFILE_ROWS.append({"size": size, "batch": batch, "precision": precision, "part": label,
                             "cpu_ms": sum(r.cpu_time_total for r in ranges) / n / 1000,
                             "device_ms": sum(getattr(r, "device_time_total", 0) for r in ranges) / n / 1000,
                             "launches": sum(e.name in LAUNCHES for e in inside) / n, "ops": len(ops) / n})


def write_profile_md(path: str, header: str) -> None:
    lines = [header, "", "| px | batch | precision | part | host ms/step | device ms/step | launches/step | "
             "operator calls/step |", "|---|---|---|---|---|---|---|---|"]
    for r in PROFILE_ROWS:
        lines.append(f"| {r['size']} | {r['batch']} | {r['precision']} | {r['part']} | {r['cpu_ms']:.2f} | "
                     f"{r['device_ms']:.2f} | {r['launches']:.0f} | {r['ops']:.0f} |")
    utils.atomic_write_text(path, "\n".join(lines) + "\n")


def main_train_step(args, device, threads: int) -> None:
    if args.optimizer == "lars_loop":
        raise SystemExit("--train_step builds train_ssl.py's optimizer: --optimizer adam or lars")
    steps, rounds = per_size(args.steps, args.sizes, 0), per_size(args.rounds, args.sizes, 2)
    header = (f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{threads} threads'}), "
              f"torch {torch.__version__}, backbone {args.backbone}, optimizer {args.optimizer}, train_ssl.py's "
              f"step at batches {args.batches} (images; two views each), --cuda_graphs {args.cuda_graphs}")
    print(header, flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        names = write_pngs(root, args.num_images, args.png_size)
        for size in args.sizes:
            store = data_loader.ImageStore(root, names, size, channels=1)
            for batch in args.batches:
                for precision in precisions(args.precision):
                    rows.update({f"{k}_{size}": v for k, v in bench_train_step(
                        args, store, size, batch, precision, device, steps[size], rounds[size]).items()})
                    if args.profile_md:       # after each setting: a run cut by a deadline keeps what it measured
                        write_profile_md(args.profile_md, f"`{' '.join(sys.argv)}`  \n{header}")
    print(" ".join(f"{k}={v:.3f}" for k, v in rows.items()))


# ============ main ============

def main(args):
    device = utils.resolve_device(args.device)
    if args.prepared_dir:
        args.prepared = True
        opened = prepared_images.open_prepared(args.prepared_dir)
        if opened is None:
            raise SystemExit(f"--prepared_dir {args.prepared_dir} is not a prepared folder (data_loader.py --prepare)")
        side = opened.image_size
        if args.sizes != [side]:
            raise SystemExit(f"--prepared_dir {args.prepared_dir} holds {side} px images: pass --sizes {side}")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.train_step:
        if args.precision == "auto":
            args.precision = "bf16" if utils.resolve_precision("auto", None, device)[0] == torch.bfloat16 else "fp32"
        return main_train_step(args, device, threads)
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
    p.add_argument("--prepared", action="store_true",
                   help="also (e): the same PNGs prepared (data_loader.py --prepare) at each size, read through "
                        "BatchLoader -> BatchAugment x 2 -> (a); prints ratio_e_over_a")
    p.add_argument("--prepared_dir", default=None,
                   help="(e) reads this prepared folder (every image of it, at its own side: --sizes must be that "
                        "side) instead of preparing the temporary PNGs; implies --prepared")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of BatchAugment")
    g = p.add_argument_group("--train_step: train_ssl.py's own step (issue 23)")
    g.add_argument("--train_step", action="store_true",
                   help="measure train_ssl.py's step (augmentation + forward + backward + optimizer + loss reads) "
                        "against (a) instead of the paths (a)-(d)")
    g.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="images per step (two views each)")
    g.add_argument("--cuda_graphs", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="train_ssl.py --cuda_graphs values to measure (on without CUDA: the step without a graph)")
    g.add_argument("--profile_md", default=None,
                   help="write a markdown table of one step's parts (host ms, device ms, launches, operator calls)")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
