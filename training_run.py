"""Setting up and finishing a training run, the same way for train_ssl.py and fine_tune.py: the resolved
runtime (device, precision, workers), the run's files (settings, history, curves, best and last
checkpoints), --resume, and Ctrl-C turned into a resumable stop.
"""
import contextlib
import dataclasses
import math
import os
import time

import torch

from checkpoints import (CHECKPOINT_CLASSES, Checkpoint, TrainingState, load_checkpoint, load_state_strict,
                         set_rng_states)
from distributed import Dist, init_distributed, restore_rank_rng
from tensorboard_log import ScalarLog, run_log_dir
from training_history import History, plot_history_throttled
from utils import (UserError, configure_cpu_threads, default_num_workers, device_note, print_settings,
                   resolve_precision, seed_everything, write_settings)

# With a few dozen labels a fine-tuning epoch is one step of a fraction of a second, and a small pretraining
# epoch on a GPU is shorter than writing its checkpoint: writing the resumable checkpoint (weights and optimizer
# state, fsynced) every epoch dominated such runs (docs/performance.md). The last checkpoint is written after
# the first epoch, then when this many seconds have passed since the last write, and after the last epoch: an
# interrupted run loses at most this much training.
LAST_CHECKPOINT_EVERY_S = 30.0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a training run; the message says what the resumable checkpoint holds."""


class LastCheckpoint:
    """The resumable `last_*_checkpoint.pth` of a training run: weights plus a TrainingState, written
    after the first epoch, at most every LAST_CHECKPOINT_EVERY_S seconds, and after the last epoch.
    `saved_epoch`: the completed epochs the file on disk holds (a resumed run starts with its own)."""

    def __init__(self, path: str, saved_epoch: int = 0):
        self.path, self.saved_at, self.saved_epoch = path, -math.inf, saved_epoch

    @contextlib.contextmanager
    def on_interrupt(self, num_epochs: int, is_main: bool = True):
        """Turn Ctrl-C into a TrainingInterrupted that names the epoch saved (the throttled file can be
        several epochs behind the one that was running). Other torchrun processes save nothing to name."""
        try:
            yield
        except KeyboardInterrupt as e:
            if isinstance(e, TrainingInterrupted) or not is_main:
                raise
            name = os.path.basename(self.path)
            raise TrainingInterrupted(
                f"interrupted: {name} holds epoch {self.saved_epoch} of {num_epochs}; continue from there with "
                f"--resume" if self.saved_epoch else
                "interrupted before the first epoch ended: nothing resumable was saved; start again without "
                "--resume") from None

    def save_if_due(self, ckpt: Checkpoint, epoch: int, num_epochs: int, optimizer, scheduler, scaler, best_metric,
                    rngs=None, augment_rng=None) -> None:
        """After epoch `epoch` (0-based); `rngs`: every process's RNG states under torchrun, or None;
        `augment_rng`: the state of the augmentation's own generator (--cuda_graphs on), or None."""
        if epoch + 1 < num_epochs and time.monotonic() - self.saved_at < LAST_CHECKPOINT_EVERY_S:
            return
        state = TrainingState.capture(optimizer, scheduler, scaler, best_metric)
        state.rng_per_rank, state.augment_rng = rngs, augment_rng
        ckpt.save(self.path, state)
        self.saved_at, self.saved_epoch = time.monotonic(), epoch + 1


def restore_training_state(raw: dict, state: TrainingState, modules: dict, optimizer, scheduler, scaler,
                           path: str) -> None:
    """Load the weights of `modules` ({checkpoint key: module}, strictly) and the full training state."""
    for key, module in modules.items():
        load_state_strict(module, raw.get(key), key, path)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    scaler.load_state_dict(state.scaler)
    set_rng_states(state.rng)


def check_epochs_left(done: int, num_epochs: int, path: str) -> None:
    """A resumed run with no epoch left would end by reporting the old best model as if it had trained."""
    if done >= num_epochs:
        raise UserError(f"--resume {path}: that run already completed {done} epoch(s), and --num_epochs is "
                        f"{num_epochs}; nothing to train (its models are unchanged). Raise --num_epochs to train longer")


def check_resume_compatible(ckpt: Checkpoint, args, keys: tuple, path: str) -> None:
    """Refuse to resume a run with settings that change the network or the data it sees."""
    saved = ckpt.args
    then, now = saved.get("recipe", "spec"), getattr(args, "recipe", "spec")   # runs before recipes were spec
    recipe = f" (that run used --recipe {then}, this one --recipe {now})" if then != now else ""
    for k in keys:
        if k in saved and saved[k] != getattr(args, k):
            raise UserError(f"--resume {path}: was run with --{k} {saved[k]}, now --{k} {getattr(args, k)}{recipe}; "
                            f"use the same value or start a new --output_dir")


def check_resume_world_size(ckpt: Checkpoint, dist_info: Dist, path: str) -> None:
    """The global batch and the schedule depend on the number of processes: resume with the same number."""
    saved = ckpt.world_size
    if saved != dist_info.world_size:
        raise UserError(f"--resume {path}: was run on {saved} process(es), now {dist_info.world_size}; resume "
                        f"with the same torchrun --nnodes x --nproc_per_node, or start a new --output_dir")


@dataclasses.dataclass
class Runtime:
    """What a training run resolved from --device, --precision and --num_workers, each with its reason:
    the log and the settings file show what ran, never 'auto'."""
    dist: Dist
    autocast_dtype: torch.dtype | None
    device_note: str
    precision_note: str
    workers_note: str = "0"

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def choose_workers(self, requested: int | None, streaming: bool) -> int:
        """DataLoader workers (--num_workers, or chosen from the CPU count when None) and the torch threads
        left beside them; in-memory data needs none."""
        workers = default_num_workers(self.device, streaming) if requested is None else requested
        how = "asked for" if requested is not None else \
            f"auto: {'streaming from disk' if streaming else 'images in memory or a prepared folder'}, {os.cpu_count()} CPU cores"
        self.workers_note = f"{workers} ({how})"
        configure_cpu_threads(self.device, workers)
        return workers

    def settings(self, flags: dict, **facts) -> dict:
        """The resolved runtime and `facts` first, then every flag as given (the resolved ones replaced)."""
        resolved = {"device": self.device_note, "precision": self.precision_note, "num_workers": self.workers_note,
                    "world_size": self.dist.world_size, **facts}
        return {**resolved, **{k: v for k, v in flags.items() if k not in resolved}}


def setup_runtime(device_name: str, precision: str, amp, seed: int) -> Runtime:
    """Processes, device, precision and seeds, the same way for both trainers."""
    dist = init_distributed(device_name)          # under torchrun: the GPU of LOCAL_RANK, or the CPU
    autocast_dtype, precision_note = resolve_precision(precision, amp, dist.device)
    seed_everything(seed + dist.rank)             # own augmentations per process; DDP copies rank 0's init
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(dist, autocast_dtype, device_note(device_name, dist.device, dist.distributed), precision_note)


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The files of one training run in its output folder; `run` is 'ssl', 'finetuned', 'baseline', ..."""
    best: str
    last: str
    history: str
    plot: str
    settings: str

    @classmethod
    def of(cls, output_dir: str, run: str, best_name: str) -> "RunPaths":
        names = (best_name, f"last_{run}_checkpoint.pth", f"{run}_history.csv", f"{run}_training.png",
                 f"{run}_settings.json")
        return cls(*(os.path.join(output_dir, n) for n in names))


def resumes_another_folder(path: str | None, output_dir: str) -> bool:
    """--resume names a checkpoint outside --output_dir: the folder may hold another run, which the resumed one
    would replace."""
    return path is not None and os.path.realpath(os.path.dirname(os.path.abspath(path))) != \
        os.path.realpath(output_dir)


def check_resume_label_file(ckpt: Checkpoint, label_sha256: str | None, path: str) -> None:
    """A resumed run reads the label file its run read: without it, pretraining would take in the test images
    the run left out, and with another file the splits and the recorded exclusions would disagree."""
    then = ckpt.label_file_sha256
    if then == label_sha256:
        return
    if then and not label_sha256:
        raise UserError(f"--resume {path}: that run read --label_file {ckpt.label_file} (its test split left out); "
                        f"resume with the same --label_file")
    if label_sha256 and not then:
        raise UserError(f"--resume {path}: that run had no --label_file; resume without it or start a new "
                        f"--output_dir")
    raise UserError(f"--resume {path}: that run read another label file (SHA-256 {then[:12]}..., this one "
                    f"{label_sha256[:12]}...); resume with the same --label_file or start a new --output_dir")


def resume_run(path: str | None, kind: str, args, keys: tuple, dist: Dist, modules: dict, optimizer, scheduler,
               scaler, seed: int, label_sha256: str | None = None):
    """--resume: restore weights and training state from `path` after checking it fits this run (settings,
    processes, label file `label_sha256`) and has epochs left to train. Returns (completed epochs, best metric
    so far, the TrainingState for what else the trainer restores); (0, None, None) when `path` is None."""
    if path is None:
        return 0, None, None
    raw = load_checkpoint(path, kind, "--resume")
    ckpt = CHECKPOINT_CLASSES[kind].from_dict(raw, path)
    check_resume_compatible(ckpt, args, keys, path)
    check_resume_label_file(ckpt, label_sha256, path)
    check_resume_world_size(ckpt, dist, path)
    check_epochs_left(ckpt.epoch, args.num_epochs, path)
    state = TrainingState.from_dict(raw, path)
    restore_training_state(raw, state, modules, optimizer, scheduler, scaler, path)
    restore_rank_rng(state.rng_per_rank, dist, seed + 1000 * ckpt.epoch)
    return ckpt.epoch, state.best_metric, state


def tensorboard_dir(args, run: str) -> str | None:
    """Run `run`'s TensorBoard folder under --output_dir with --tensorboard, else None."""
    return run_log_dir(args.output_dir, run) if args.tensorboard else None


class RunFiles:
    """What a training run writes: its settings at the start, then after every epoch the history row (and, with
    `tensorboard_dir`, its scalars), the curves, the best model when it improved, and last the resumable checkpoint. Written last, a run killed
    before it redoes the epochs since, and --resume drops the history rows after the checkpoint's epoch, so
    no row is ever missing or doubled."""

    def __init__(self, paths: RunPaths, title: str, start_epoch: int, resumed_from: str | None,
                 tensorboard_dir: str | None = None):
        self.paths, self.title = paths, title
        self.start_epoch, self.tensorboard_dir, self.scalars = start_epoch, tensorboard_dir, None
        self.history = History(paths.history, resume=start_epoch > 0)
        self.history.truncate(start_epoch)
        same_file = resumed_from is not None and os.path.abspath(resumed_from) == os.path.abspath(paths.last)
        self.last = LastCheckpoint(paths.last, saved_epoch=start_epoch if same_file else 0)

    def write_settings(self, heading: str, settings: dict, dist: Dist) -> None:
        if dist.is_main:
            print_settings(heading, settings)
            write_settings(self.paths.settings, settings)

    def end_epoch(self, epoch: int, num_epochs: int, row: dict, ckpt: Checkpoint, improved: bool, optimizer,
                  scheduler, scaler, best_metric, rngs=None, chance: float | None = None, augment_rng=None) -> None:
        """After epoch `epoch` (0-based), on the main process. `chance`: the curves' chance line; `augment_rng`:
        the augmentation generator's state, which only the last checkpoint carries."""
        self.history.append(row)
        if self.tensorboard_dir is not None:
            self.scalars = self.scalars or ScalarLog(self.tensorboard_dir, self.start_epoch)
            self.scalars.write(row)
            if epoch + 1 == num_epochs:
                self.scalars.close()
        plot_history_throttled(self.paths.history, self.paths.plot, self.title, last_epoch=epoch + 1 == num_epochs,
                               chance=chance)
        if improved:
            ckpt.save(self.paths.best)
        self.last.save_if_due(ckpt, epoch, num_epochs, optimizer, scheduler, scaler, best_metric, rngs, augment_rng)
