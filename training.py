"""The training loop both trainers share: one epoch over a loader with the task's loss injected, the
captured (CUDA-graph-ready) step, the gradient scaler, and the shared training flags and torch.compile.

    stats = train_one_epoch(model, loader, optimizer, loss_fn, device=device, scaler=scaler)
"""
import argparse
import math
import os
import shutil
import sys
import time

import torch
import torch.nn as nn

from tensorboard_log import summary_writer_class
from utils import EXISTING_FILE, Bound, UserError, autocast, bounded, check_flag, check_flags, check_split_shares


def training_parser() -> argparse.ArgumentParser:
    """Flags shared by the two training CLIs (train_ssl.py, fine_tune.py)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training runtime")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training model: faster steps after a slow first epoch (docs/performance.md; "
                        "a CPU needs a C++ compiler, else a warning and no compile)")
    g.add_argument("--sync_bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch instead of each "
                        "process's --batch_size (SyncBatchNorm)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log each epoch's scalars for TensorBoard under OUTPUT_DIR/tensorboard/<run> "
                        "(needs `pip install tensorboard`); view with: tensorboard --logdir OUTPUT_DIR")
    g = p.add_argument_group("split (a label file without a split column; give both trainers the same)")
    share = Bound(float, 0, 1, hi_open=True)
    bounded(g.add_argument("--val_fraction", type=float, default=0.15, help="val share of the patients"), share)
    bounded(g.add_argument("--test_fraction", type=float, default=0.15,
                           help="test share of the patients: left out of pretraining and fine-tuning"), share)
    g = p.add_argument_group("resuming and replacing")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a last_*_checkpoint.pth (no value: this run's one in --output_dir)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a best model in --output_dir that another run (other data, label file or settings) "
                        "wrote")
    return p


def check_training_flags(args, parser: argparse.ArgumentParser) -> None:
    """What both trainers check before any work: every flag's rule, the --resume file when one is named, and
    that the split shares leave training images."""
    check_flags(args, parser)
    if args.tensorboard:
        summary_writer_class()
    if args.resume not in (None, "auto"):
        check_flag("resume", args.resume, EXISTING_FILE)
    check_split_shares(args.val_fraction, args.test_fraction)


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile needs for CPU kernels ($CXX, g++, clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def maybe_compile(model: nn.Module, enabled: bool, device: torch.device | None = None) -> nn.Module:
    """torch.compile the module used for training steps; checkpoints keep saving the plain module. On a CPU
    without a C++ compiler, torch.compile would fail at the first step: warn and train uncompiled."""
    if not enabled:
        return model
    if device is not None and device.type == "cpu" and cpu_compiler() is None:
        print("warning: --compile needs a C++ compiler (g++ or clang++, or $CXX) for CPU kernels and none is on "
              "PATH; training uncompiled (slower)", file=sys.stderr)
        return model
    return torch.compile(model)


class NonFiniteLossError(UserError):
    pass


HOST_SYNC_EVERY = 20  # steps between reads of the loss on the host (each read waits for the GPU)


def train_one_epoch(model, loader, optimizer, loss_fn, *, device, scaler, autocast_dtype=None,
                    scheduler=None, epoch: int = 0, num_epochs: int = 0, desc: str = "train",
                    show_progress: bool = True, step_fn=None) -> dict:
    """One pass over `loader`; `loss_fn(model, batch) -> (loss, num_images)` holds the task.

    `step_fn(batch) -> (loss, num_images)`, when given, takes the whole optimisation step instead
    (forward, backward and optimizer, e.g. a `CapturedStep`); the scheduler and the loss reads stay here.
    Returns {'loss': mean loss per image, 'lr': last learning rate, 'images_per_sec': throughput}.
    """
    from tqdm import tqdm

    model.train()
    loss_sum, total_images, start = torch.zeros((), device=device), 0, time.perf_counter()
    quiet = not show_progress or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")  # log files
    bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{num_epochs}", leave=False, disable=quiet, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for step, batch in enumerate(bar, 1):
        if step_fn is not None:
            loss, n = step_fn(batch)
        else:
            with autocast(device.type, autocast_dtype):
                loss, n = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * n   # stays on the device: no wait for the GPU in every step
        total_images += n
        if step % HOST_SYNC_EVERY == 0:
            mean_loss = _finite_mean_loss(loss_sum, total_images, epoch)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{float(optimizer.param_groups[0]['lr']):.2e}",
                            img_s=f"{total_images / max(1e-9, time.perf_counter() - start):.0f}")
    mean_loss = _finite_mean_loss(loss_sum, total_images, epoch)
    _check_finite_weights(model, epoch)
    elapsed = max(1e-9, time.perf_counter() - start)
    return {"loss": mean_loss, "lr": float(optimizer.param_groups[0]["lr"]),     # a tensor under lr_on_device
            "images_per_sec": total_images / elapsed}


def _finite_mean_loss(loss_sum: torch.Tensor, images: int, epoch: int) -> float:
    """This process's mean loss so far (one device sync). A NaN or inf in any step so far, in any
    process, stops every process: the check is a collective, so no process waits forever in the
    next all-gather for one that has stopped (every process reaches it at the same step)."""
    value, bad, where = loss_sum.item() / max(1, images), None, ""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        total = loss_sum.clone()
        torch.distributed.all_reduce(total)       # every process, also one whose own loss is already NaN
        bad, where = total.item(), " (in another process)"
    if not math.isfinite(value):
        bad, where = value, ""
    if bad is not None and not math.isfinite(bad):
        raise NonFiniteLossError(
            f"the loss became {bad} in epoch {epoch + 1}{where}; lower --lr, try --precision fp32, and "
            f"check the images for blank or corrupt files (the last good checkpoint is kept)")
    return value


@torch.no_grad()
def _check_finite_weights(model: nn.Module, epoch: int) -> None:
    """A finite last loss can still leave NaN weights (a NaN gradient in the last step): never save them."""
    tensors = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])    # one device sync, not one per tensor
    if not finite.all():
        name = tensors[int((~finite).nonzero()[0])][0]
        raise NonFiniteLossError(
            f"the weights became NaN or inf in epoch {epoch + 1} ({name}); lower --lr, try --precision fp32, "
            f"and check the images for blank or corrupt files (the last good checkpoint is kept)")


class CapturedStep:
    """A training step with static shapes, run as it is or replayed from a CUDA graph.

    `body(inputs) -> tuple of tensors` takes one whole step (forward, backward, optimizer.step) on a
    device batch; it must not read a tensor on the host (.item(), `if tensor`, nonzero), must draw its
    random numbers from the generators passed here, and must leave the gradients to be zeroed here.
    capture=False (CPU, MPS): zero the gradients, run `body`. capture=True (CUDA): the first `warmup`
    calls run as they are on a side stream (cuDNN's algorithm search, the optimizer's lazily made state),
    the next is captured into one graph, and from then on a call copies its batch into the graph's
    input buffer and replays augmentation, forward, backward and optimizer as one launch. The outputs
    are the graph's own buffers, overwritten by the next call: read or copy them before it.
    Learning rates must be tensors by then (`lr_on_device`), and autocast must run with
    cache_enabled=False inside `body` (its weight cache would hold tensors of the capture)."""

    def __init__(self, body, optimizer, capture: bool = False, generators=(), warmup: int = 3):
        self.body, self.optimizer, self.capture, self.generators = body, optimizer, capture, tuple(generators)
        self.warmup, self.calls = warmup, 0
        self.graph = self.static_input = self.static_output = None

    def __call__(self, inputs: torch.Tensor) -> tuple:
        self.calls += 1
        if not self.capture:
            self.optimizer.zero_grad(set_to_none=True)
            return self.body(inputs)
        if self.graph is None and self.calls <= self.warmup:
            return self._side_stream_step(inputs)
        if self.graph is None:
            self._capture(inputs)
        elif inputs.shape != self.static_input.shape or inputs.dtype != self.static_input.dtype:
            raise RuntimeError(f"the captured step takes batches of {tuple(self.static_input.shape)} "
                               f"{self.static_input.dtype}, got {tuple(inputs.shape)} {inputs.dtype}: the "
                               f"loader must drop the last partial batch")
        self.static_input.copy_(inputs, non_blocking=True)
        self.graph.replay()
        return self.static_output

    def _side_stream_step(self, inputs: torch.Tensor) -> tuple:
        """Warm-up steps on a side stream, as capture wants (lazy initialisation never lands in a graph)."""
        side = torch.cuda.Stream(device=inputs.device)
        side.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            out = self.body(inputs)
        torch.cuda.current_stream(inputs.device).wait_stream(side)
        return out

    def _capture(self, inputs: torch.Tensor) -> None:
        self.static_input = inputs.clone()
        self.graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            self.graph.register_generator_state(generator)
        # the gradients are made inside the graph, from its memory pool, and overwritten at each replay
        self.optimizer.zero_grad(set_to_none=True)
        # thread_local: a DataLoader's pin-memory thread (data streamed from disk) may allocate meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_output = self.body(self.static_input)


def make_grad_scaler(device: torch.device, autocast_dtype):
    """A real scaler only for fp16; a pass-through otherwise, so there is one backward path. torch.amp's
    device-generic GradScaler, or on releases without one (before 2.3) the CUDA one, which fp16 needs."""
    enabled = autocast_dtype == torch.float16
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")
