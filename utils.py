"""What two or more scripts share: errors, seeding, devices and precision, checkpoints, the
training loop, history files, schedules, feature extraction and kNN, and the setup both trainers
run (Runtime, resume_run, RunFiles).

Nothing here reads `args`; every function takes explicit parameters. The CLIs import it:

    from utils import UserError, save_checkpoint, load_checkpoint, train_one_epoch
"""
import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = 1
CHECKPOINT_KINDS = ("ssl", "classifier")


class UserError(Exception):
    """A problem the user can fix (bad path, bad file, bad flag): reported as one line, exit 2."""


# ============ command line ============

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help, and the docstring's commands kept as written."""

    def _get_help_string(self, action):
        if re.search(r"\(default\b", action.help or ""):   # the help already says it, in words
            return action.help
        return super()._get_help_string(action)


def common_parser() -> argparse.ArgumentParser:
    """Flags shared by the three CLIs (passed as `parents=`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=42, help="random seed (initialisation, augmentation, label subsets)")
    g.add_argument("--split_seed", type=int, default=42,
                   help="seed of the train/val/test split when the label file has no split column; kept apart "
                        "from --seed so every phase and every training seed sees the same held-out test images")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA that supports it (else fp16), bf16 on a CPU "
                        "with native bf16 instructions, fp32 otherwise")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="shorthand: --no-amp forces fp32, --amp means --precision auto")
    g.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader worker processes when images stream from disk (default: chosen from the "
                        "CPU count; 0 when images are cached in memory)")
    g.add_argument("--cache_gb", type=float, default=4.0,
                   help="memory budget in GiB for decoded images kept in RAM; larger datasets stream from disk")
    return p


def training_parser() -> argparse.ArgumentParser:
    """Flags shared by the two training CLIs (train_ssl.py, fine_tune.py)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("training runtime")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training model: faster steps after a slow first epoch (pretraining on a 2-core CPU: "
                        "about 1.6x; a CPU needs a C++ compiler, else a warning and no compile)")
    g.add_argument("--sync_bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch instead of each "
                        "process's --batch_size (SyncBatchNorm)")
    g = p.add_argument_group("split (a label file without a split column; give both trainers the same)")
    g.add_argument("--val_fraction", type=float, default=0.15, help="val share of the patients")
    g.add_argument("--test_fraction", type=float, default=0.15,
                   help="test share of the patients: left out of pretraining and fine-tuning")
    return p


def task_parser(uncertain: bool = True) -> argparse.ArgumentParser:
    """--task (and --uncertain) for the scripts that read a label file that may be multi-label."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("labels")
    g.add_argument("--task", default="auto", choices=["auto", "multiclass", "multilabel"],
                   help="auto: multi-label when the label file's header has a `labels` (or `Finding Labels`) column "
                        "or one column per finding, else one class per image (docs/multilabel.md)")
    if uncertain:
        g.add_argument("--uncertain", default="ignore", choices=["ignore", "zero", "one"],
                       help="multi-label files: what an uncertain (-1) cell means; ignore leaves it out of the loss "
                            "and the metrics, zero counts it absent, one present (blank cells are absent)")
    return p


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
              "PATH; training uncompiled (about 1.6x slower on a CPU)", file=sys.stderr)
        return model
    return torch.compile(model)


# ============ named recipes (--recipe) ============

RECIPE_NAMES = ("spec", "tuned")
_UNSET = object()           # marks a flag the command line did not give
KEEP_DEFAULT = object()     # a recipe rule's answer when the parser's default stays (e.g. a flag it yields to was given)


class RecipeParser(argparse.ArgumentParser):
    """An ArgumentParser with `--recipe {spec,tuned}`: parse_args gives every flag that `recipes[name]` names
    the recipe's value unless the command line gave the flag (in any form: --flag v, --flag=v, an
    abbreviation), and records in `args.value_sources` where each recipe-controlled value came from
    ('flag', 'recipe tuned' or 'default'). `spec` names no values: it is the parser's defaults.

    A recipe value is a constant or a rule `f(args, given) -> value or KEEP_DEFAULT`, evaluated after the
    constants (so it sees them), e.g. a warm-up that is a tenth of --num_epochs."""

    def __init__(self, *a, recipes: dict, **kw):
        super().__init__(*a, **kw)
        self.recipes = {"spec": {}, **recipes}
        assert set(self.recipes) == set(RECIPE_NAMES), self.recipes.keys()
        shown = "; ".join(f"{k}={_recipe_text(v)}" for k, v in self.recipes["tuned"].items())
        self.add_argument_group("recipe").add_argument(
            "--recipe", default="spec", choices=RECIPE_NAMES,
            help=f"spec: the seed README's table, i.e. every default below; tuned: the measured recipe of "
                 f"benchmarks/label_efficiency.py ({shown}). Flags given explicitly win over the recipe "
                 f"(docs/design.md, Recipes)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if namespace is None:                  # a caller's namespace: its preset values are not ours to change
            apply_recipe(parsed, self.recipes, self._given(args))
        return parsed, extras

    def _given(self, argv) -> set:
        """The dests the command line set: parse again with every default replaced by a sentinel (argparse
        only fills in defaults for attributes the namespace lacks)."""
        probe = argparse.Namespace(**{a.dest: _UNSET for a in self._actions if a.default is not argparse.SUPPRESS})
        seen, _ = super().parse_known_args(argv, probe)
        return {k for k, v in vars(seen).items() if v is not _UNSET}


def _recipe_text(value) -> str:
    """A constant as written, a rule by its docstring (for --help)."""
    return (value.__doc__ or value.__name__) if callable(value) else str(value)


def apply_recipe(args, recipes: dict, given: set) -> None:
    """Set the values of recipe `args.recipe` that the command line did not give; fill `args.value_sources`."""
    values = recipes[args.recipe]
    sources = {}
    controlled = list(dict.fromkeys(k for r in recipes.values() for k in r))
    rules_last = sorted(controlled, key=lambda k: callable(values.get(k)))
    for name in rules_last:
        value = values.get(name, KEEP_DEFAULT)
        if name in given:
            sources[name] = "flag"
            continue
        if callable(value):
            value = value(args, given)
        if value is KEEP_DEFAULT:
            sources[name] = "default" if name not in values else f"default (recipe {args.recipe} leaves it here)"
        else:
            setattr(args, name, value)
            sources[name] = f"recipe {args.recipe}"
    args.value_sources = {k: sources[k] for k in controlled}


def run_cli(main, parser: argparse.ArgumentParser, argv=None):
    """Parse, run main(args), and turn a UserError into one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:       # a training run's TrainingInterrupted names the epoch it saved
        print(str(e) or "interrupted: every file written is complete (none half-written); run the command again",
              file=sys.stderr)
        sys.exit(130)


# ============ flag validation: one table for every script ============

@dataclass(frozen=True)
class Bound:
    """The allowed values of a numeric flag: an int or a finite float in [lo, hi] (open ends optional)."""
    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""

    def allows(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
            return False
        if not math.isfinite(v):
            return False
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        lo, hi = (None if b is None else str(int(b)) if float(b).is_integer() else f"{b:g}" for b in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            span = f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            span = f"{'>' if self.lo_open else '>='} {lo}"
        elif self.hi is not None:
            span = f"{'<' if self.hi_open else '<='} {hi}"
        else:
            span = "(finite)"
        return f"{what} {span}" + (f" ({self.hint})" if self.hint else "")


# path kinds: the thing must exist as a file / a folder; an output folder must not be a file
EXISTING_FILE, EXISTING_DIR, OUTPUT_DIR, FILE_NAME = "file", "folder", "output folder", "file name"
UINT = Bound(int, 0)
POSITIVE_INT = Bound(int, 1)
FRACTION = Bound(float, 0, 1, lo_open=True)

# Every numeric and path flag of data_loader.py, train_ssl.py, fine_tune.py and evaluate.py, by name. A flag
# means the same in every script that has it; a script passes `overrides` where its range differs.
FLAG_RULES = {
    "seed": UINT, "split_seed": UINT, "num_workers": UINT,
    "cache_gb": Bound(float, 0, 1 << 20, hint="GiB of RAM; 0 streams every image from disk"),
    "batch_size": Bound(int, 1, 1 << 16), "num_epochs": Bound(int, 1, 1 << 20),
    "image_size": Bound(int, 8, 4096, hint="pixels; 32 or less uses the small-image stem"),
    "lr": Bound(float, 0, 100, lo_open=True, hint="e.g. 3e-4"), "weight_decay": Bound(float, 0, 10),
    "warmup_epochs": UINT, "temperature": Bound(float, 1e-3, 100, hint="NT-Xent temperature, e.g. 0.5"),
    "projection_dim": Bound(int, 1, 1 << 16), "crop_min_scale": FRACTION,
    "rotation": Bound(float, 0, 180, hint="degrees"), "jitter": Bound(float, 0, 1), "gamma": Bound(float, 0, 10),
    "eval_every": Bound(int, 1, hint="epochs between kNN evaluations"),
    "num_classes": Bound(int, 2, 10_000), "encoder_lr_scale": Bound(float, 0, 100),
    "unfreeze_after_epoch": UINT, "num_steps": Bound(int, 0, 1 << 30, hint="optimizer steps; 0: use --num_epochs"),
    "frozen_steps": Bound(int, 0, 1 << 30, hint="optimizer steps with the encoder frozen; 0: off"),
    "head_prefit_steps": Bound(int, 0, 1_000_000),
    "label_fraction": Bound(float, 0, 1, lo_open=True, hint="e.g. 0.1 for 10% of the labels"),
    "val_fraction": Bound(float, 0, 1, hi_open=True), "test_fraction": Bound(float, 0, 1, hi_open=True),
    "bootstrap": Bound(int, 0, 100_000, hint="resamples; 0 for no intervals"),
    "num_images": Bound(int, 1, 10_000_000), "num_unlabeled": Bound(int, 0, 10_000_000),
    "data_dir": EXISTING_DIR, "label_file": EXISTING_FILE, "ssl_checkpoint": EXISTING_FILE,
    "checkpoint": EXISTING_FILE, "from_npz": EXISTING_FILE, "images": EXISTING_DIR, "output_dir": OUTPUT_DIR, "output_name": FILE_NAME,
}


def not_left_out_of_pretraining(ssl_ckpt: dict, filenames: list) -> list | None:
    """Those of `filenames` an SSL checkpoint did not leave out of pretraining (it records the test images it
    left out when given the label file); None when it records none."""
    excluded = set(ssl_ckpt.get("excluded_files") or [])
    return [f for f in filenames if f not in excluded] if excluded else None


def check_split_shares(val_fraction: float, test_fraction: float) -> None:
    """--val_fraction + --test_fraction must leave images for training."""
    if val_fraction + test_fraction >= 1:
        raise UserError(f"--val_fraction {val_fraction} + --test_fraction {test_fraction} leave no training images; "
                        f"keep their sum below 1 (e.g. 0.15 and 0.15)")


def check_flags(args, overrides: dict | None = None) -> None:
    """Check every flag of `args` that FLAG_RULES (or `overrides`) names, before any work: the first bad one
    is a UserError naming the flag, its value and what is allowed. None means "not given" and passes."""
    rules = {**FLAG_RULES, **(overrides or {})}
    for name, value in vars(args).items():
        rule = rules.get(name)
        if rule is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            _check_flag(name, v, rule)


def _check_flag(name: str, v, rule) -> None:
    flag = f"--{name}"
    if isinstance(rule, Bound):
        if not rule.allows(v):
            raise UserError(f"{flag} {v}: must be {rule.describe()}")
    elif rule == EXISTING_FILE and not os.path.isfile(v):
        if os.path.isdir(v):
            raise UserError(f"{flag} {v}: is a folder, not a file{_is_folder_of_checkpoints(flag, v)}")
        raise UserError(f"{flag} {v}: no such file; check the path")
    elif rule == EXISTING_DIR and not os.path.isdir(v):
        what = "is a file, not a folder" if os.path.exists(v) else "no such folder"
        raise UserError(f"{flag} {v}: {what}; check the path")
    elif rule == OUTPUT_DIR and os.path.exists(v) and not os.path.isdir(v):
        raise UserError(f"{flag} {v}: is a file, not a folder; choose a folder (it is created if missing)")
    elif rule == FILE_NAME and (not v or os.path.basename(v) != v or v in (".", "..")):
        raise UserError(f"{flag} {v}: must be a plain file name such as my_model.pth (the folder is --output_dir)")


def _is_folder_of_checkpoints(flag: str, path: str) -> str:
    """For a file flag given a folder: name the .pth files in it, the likely intended argument."""
    try:
        inside = sorted(f for f in os.listdir(path) if f.endswith(".pth") and not f.startswith("."))
    except OSError:
        inside = []
    return f"; pass a file in it, e.g. {flag} {os.path.join(path, inside[0])}" if inside else "; check the path"


# ============ one run per output folder ============

LOCK_NAME = re.compile(r"\..+\.lock")      # what OutputLock names its file (hidden: never listed as output)


class OutputLock:
    """`<folder>/.<name>.lock` while a run writes there: a second run of the same kind into the folder is
    refused with one line naming the first (pid, host, start, command).

    The lock is an flock on the file, which the kernel drops when its process dies however it dies, so a
    lock file left by a killed run is taken over (with a note naming that run), never waited on. The file
    is deleted on release; a run that opened it just before then finds, once locked, that the path no
    longer names its file, and opens it again."""

    def __init__(self, folder: str, name: str):
        self.folder, self.path, self.fd = folder, os.path.join(folder, f".{name}.lock"), None
        assert LOCK_NAME.fullmatch(os.path.basename(self.path)), name

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:                  # Windows: no flock; runs are not locked there
            return self
        while self.fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise UserError(f"--output_dir {self.folder} is in use by another run ({holder}); wait for it to "
                                f"finish or choose another --output_dir")
            if self._still_at_path(fd):
                self.fd = fd
            else:
                os.close(fd)                 # released and deleted between our open and our flock: again
        previous = _lock_holder(self.fd)
        if previous:
            print(f"note: {self.path} was left by a run that is no longer running ({previous}); taking it over",
                  file=sys.stderr)
        me = {"pid": os.getpid(), "host": _hostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(me) + "\n").encode(), 0)
        return self

    def _open(self) -> int:
        try:
            os.makedirs(self.folder, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot write to {self.folder}: {e.strerror or e}; choose a writable --output_dir")

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)         # while still locked: no one can be holding this file
            except OSError:
                pass
            os.close(self.fd)                # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _hostname() -> str:
    import socket
    return socket.gethostname()


def _lock_holder(fd: int) -> str:
    """'process 123 on host h, started T: python x.py ...' from a lock file, or '' when it is empty."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
    except ValueError:
        return "a process that left an unreadable lock file"
    if not isinstance(info, dict):
        return ""
    return (f"process {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")


def locks_output_dir(check, name):
    """Decorate a script's main(args): run `check(args)` (flag validation) first, then hold an OutputLock
    named `name` (or `name(args)`) on args.output_dir while main runs. Under torchrun only rank 0 locks."""
    import functools

    def wrap(main):
        @functools.wraps(main)
        def locked_main(args):
            check(args)
            if os.environ.get("RANK", "0") != "0":
                return main(args)
            with OutputLock(args.output_dir, name(args) if callable(name) else name):
                return main(args)
        return locked_main
    return wrap


# ============ reproducibility, devices, precision ============

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name ({e}); use auto, cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 arithmetic (AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(requested: str, amp, device: torch.device):
    """Returns (autocast dtype or None for fp32, a sentence saying why)."""
    if amp is False:
        return None, "fp32 (--no-amp)"
    if requested == "fp32":
        return None, "fp32 (asked for)"
    if requested == "bf16":
        return torch.bfloat16, "bf16 (asked for)"
    if requested == "fp16":
        if device.type == "cpu":
            raise UserError("--precision fp16 is not supported on CPU; use bf16 or fp32")
        return torch.float16, "fp16 (asked for)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 (auto: this GPU supports bf16)"
        return torch.float16, "fp16 (auto: this GPU has no bf16)"
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16, "bf16 (auto: this CPU has native bf16 instructions)"
    return None, f"fp32 (auto: no native bf16 on this {device.type})"


def device_note(requested: str, device: torch.device, distributed: bool) -> str:
    """The device a run uses and why, for its log and settings file (never just 'auto')."""
    if distributed:
        return f"{device} (torchrun: {'the GPU of LOCAL_RANK' if device.type == 'cuda' else 'gloo on the CPU'})"
    if requested != "auto":
        return f"{device} (asked for)"
    return {"cuda": f"{device} (auto: a CUDA GPU is visible)", "mps": f"{device} (auto: Apple MPS, no CUDA GPU)"
            }.get(device.type, f"{device} (auto: no CUDA GPU or Apple MPS)")


def configure_cpu_threads(device: torch.device, num_workers: int) -> None:
    """Leave one core per DataLoader worker so workers never fight the model for cores."""
    if device.type == "cpu" and num_workers > 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))


def default_num_workers(device: torch.device, streaming: bool) -> int:
    """No workers for in-memory data; for streaming, a few on a GPU machine, at most one on a small CPU."""
    cores = os.cpu_count() or 1
    if not streaming:
        return 0
    if device.type == "cpu":
        return 1 if cores >= 4 else 0
    return min(8, max(1, cores - 1))


# ============ atomic files ============

def _atomic_write(path: str, write_fn, binary: bool) -> None:
    """Write through `write_fn(fileobj)` into a temporary file beside `path`, fsync, then rename.

    A reader, or a run killed at any moment, sees the old file or the new one, never a part. The
    temporary is `.<name>.<pid>.<random>.tmp` (hidden, so never listed as data or output); those
    left in the folder by killed writers are removed after each successful write."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        # 0o666 minus the umask, like open(); mkstemp's owner-only files could not be shared with a team
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror or e}; choose a writable --output_dir")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {e.strerror or e}; the previous file, if any, is intact")
        raise
    _remove_stale_temporaries(folder)


TEMPORARY_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")   # what _atomic_write names its temporaries


def _remove_stale_temporaries(folder: str) -> None:
    """Delete our temporaries whose writer is no longer running on this machine (killed mid-save)."""
    if os.name != "posix":          # os.kill(pid, 0) would signal the process on Windows
        return
    try:
        entries = [(e, TEMPORARY_NAME.fullmatch(e)) for e in os.listdir(folder)]
    except OSError:
        return
    for entry, m in entries:
        if m and int(m.group(1)) != os.getpid() and not _pid_running(int(m.group(1))):
            try:
                os.unlink(os.path.join(folder, entry))
            except OSError:
                pass


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                 # exists but belongs to someone else
        return True
    return True


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_savefig(fig, path: str, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"), binary=True)
    plt.close(fig)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ============ checkpoints ============

def save_checkpoint(state: dict, path: str) -> None:
    """Atomically save a dict of plain types and tensors (loadable with weights_only=True).

    The bytes are built in memory first: torch.save into a file turns a full disk (ENOSPC) into an
    opaque RuntimeError, while a plain write reports it as the OSError it is."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _atomic_write(path, lambda f: f.write(buffer.getbuffer()), binary=True)


def load_checkpoint(path: str, kind: str | tuple | None = None, flag: str = "--checkpoint") -> dict:
    """Load a checkpoint safely (weights_only=True), check it is one of ours, of the expected kind,
    with a valid model_config and state dicts of tensors (their shapes: `load_state_strict`)."""
    if path and os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder, not a file{_is_folder_of_checkpoints(flag, path)}")
    if not path or not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    ckpt = _load_weights_only(path, flag)
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in CHECKPOINT_KINDS or "model_config" not in ckpt:
        raise UserError(f"{flag} {path}: not a checkpoint written by this toolkit (expected a dict with "
                        f"'kind' in {CHECKPOINT_KINDS} and 'model_config')")
    expected = (kind,) if isinstance(kind, str) else kind
    if expected and ckpt["kind"] not in expected:
        hint = {"ssl": "train_ssl.py writes best_ssl_model.pth",
                "classifier": "fine_tune.py writes best_finetuned_model.pth / best_baseline_model.pth"}
        raise UserError(f"{flag} {path}: is a {ckpt['kind']!r} checkpoint, expected {' or '.join(expected)!r} "
                        f"({'; '.join(hint[k] for k in expected)})")
    _check_contents(ckpt, f"{flag} {path}")
    return ckpt


# settings that change where and how fast a run computes, not what it learns: a model trained with other values
# of these is the same experiment (the label file's and the checkpoint's paths are compared by content instead)
RUNTIME_ARGS = ("device", "precision", "amp", "num_workers", "cache_gb", "output_dir", "output_name", "resume",
                "overwrite", "compile", "sync_bn", "device_obj", "data_dir", "label_file",
                "recipe", "value_sources")     # a recipe is a name for values: the values decide


def refuse_replacing_another_run(path: str, args, label_sha256, overwrite: bool) -> None:
    """A fresh run is about to write `path`: refuse when the file there holds a model trained on another
    label file or with other settings, unless `overwrite`; replacing it would silently lose that run."""
    if overwrite or not os.path.exists(path):
        return
    fix = "pass --overwrite to replace it, or choose another --output_dir"
    try:
        old = load_checkpoint(path, flag="--output_dir holds")
    except UserError as e:
        raise UserError(f"{e} (not a model this run could replace safely); {fix}")
    now = {k: v for k, v in vars(args).items() if k not in RUNTIME_ARGS and v is not None}   # None: not given
    saved = old.get("args") or {}
    diff = [f"--{k} {saved[k]} then, {now[k]} now" for k in now
            if k in saved and not _same_setting(k, saved[k], now[k])]
    if old.get("label_file_sha256") != label_sha256:
        diff.insert(0, "another label file" if label_sha256 and old.get("label_file_sha256") else
                    "with a label file" if old.get("label_file_sha256") else "without a label file")
    if diff:
        raise UserError(f"{path} holds the model of another run ({'; '.join(diff[:2])}); {fix}")


def _same_setting(key: str, then, now) -> bool:
    """Equal values; a checkpoint path also when it names the same file (./c/x.pth and /abs/c/x.pth)."""
    if then == now:
        return True
    return key == "ssl_checkpoint" and isinstance(then, str) and os.path.realpath(then) == os.path.realpath(now)


def _load_weights_only(path: str, flag: str):
    """torch.load that cannot run code; each way it can fail becomes one line saying which."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # torch warns about the pickle protocol before refusing
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code, truncated zip, not a torch file at all
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) and ("Unsupported global" in text or "GLOBAL" in text):
            raise UserError(f"{flag} {path}: refused, the file contains objects other than tensors and plain "
                            f"types, and loading it could run code (only checkpoints written by this toolkit load)")
        with open(path, "rb") as f:
            head = f.read(4)
        # the weights-only unpickler stops at the first opcode a checkpoint never uses (junk, or a pickle
        # of other objects): name that opcode, not torch's banner
        lines = [ln.strip() for ln in text.split("WeightsUnpickler error:")[-1].splitlines() if ln.strip()]
        first = lines[0][:80] if lines else type(e).__name__
        reason = ("the file is empty" if not head else
                  "damaged or truncated, e.g. an interrupted copy; copy it again" if head == b"PK\x03\x04" else
                  f"not a file written by torch.save: {first}")
        raise UserError(f"{flag} {path}: not a readable PyTorch checkpoint ({reason})")


def _check_contents(ckpt: dict, where: str) -> None:
    """What a later phase rebuilds the network from: model_config, image_size, channels, state dicts."""
    from dataclasses import fields

    from model_ssl import FEATURE_DIMS, ModelConfig

    config, known = ckpt["model_config"], [f.name for f in fields(ModelConfig)]
    if not isinstance(config, dict) or not set(config) <= set(known):
        raise UserError(f"{where}: model_config is {str(config)[:80]}; expected a dict with keys {known}")
    if config.get("backbone", ModelConfig.backbone) not in FEATURE_DIMS:
        raise UserError(f"{where}: backbone {config.get('backbone')!r} is not one of {sorted(FEATURE_DIMS)}")
    if not isinstance(config.get("small_stem", False), bool) or not _positive_int(config.get("projection_dim", 1)):
        raise UserError(f"{where}: model_config has small_stem={config.get('small_stem')!r}, projection_dim="
                        f"{config.get('projection_dim')!r}; expected a bool and a positive int")
    if not _positive_int(ckpt.get("image_size")) or ckpt.get("channels", 3) not in (1, 3):
        raise UserError(f"{where}: image_size {ckpt.get('image_size')!r}, channels {ckpt.get('channels')!r}; "
                        f"expected the training resolution in pixels and 1 or 3 (see docs/checkpoints.md)")
    for part in ("encoder", "head") if ckpt["kind"] == "classifier" else ("encoder",):
        _check_state_dict(ckpt.get(part), part, where)
    if ckpt["kind"] == "classifier" and not _positive_int(ckpt.get("num_classes")):
        raise UserError(f"{where}: num_classes {ckpt.get('num_classes')!r}; expected a positive int")
    conv1, small = ckpt["encoder"].get("conv1.weight"), config.get("small_stem", False)
    k = 3 if small else 7
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] != k:
        raise UserError(f"{where}: model_config says small_stem={small} (a {k}x{k} first convolution) but the "
                        f"encoder's conv1.weight is {tuple(conv1.shape)}; the file was edited or mixed from two runs")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_state_dict(state, what: str, where: str) -> None:
    if state is None:
        raise UserError(f"{where}: has no {what!r} weights; expected a state dict of tensors (see docs/checkpoints.md)")
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{where}: {what!r} is not a state dict of tensors (parameter name -> tensor)")


def load_state_strict(module: nn.Module, state: dict, what: str, path: str) -> None:
    """load_state_dict(strict=True) with a one-line message naming the first mismatch or non-finite tensor."""
    _check_state_dict(state, what, path)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise UserError(f"{path}: the {what} weights do not fit the model built from its config ({detail})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: the {what} weights contain NaN or inf (first in {bad[0]}); the run that wrote "
                        f"them diverged, use an earlier checkpoint")
    module.load_state_dict(state, strict=True)


def rng_states() -> dict:
    """Every RNG a run draws from, as tensors and plain types (weights_only-loadable)."""
    states = {"torch": torch.get_rng_state(), "numpy": _numpy_state_to_plain(np.random.get_state()),
              "python": _python_state_to_plain(random.getstate())}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(_plain_to_numpy_state(states["numpy"]))
    random.setstate(_plain_to_python_state(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state_to_plain(s):
    return {"name": s[0], "keys": torch.from_numpy(s[1].astype(np.int64)), "pos": int(s[2]),
            "has_gauss": int(s[3]), "cached": float(s[4])}


def _plain_to_numpy_state(d):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _python_state_to_plain(s):
    return {"version": s[0], "state": torch.tensor(s[1], dtype=torch.int64), "gauss": s[2]}


def _plain_to_python_state(d):
    return (d["version"], tuple(int(v) for v in d["state"].tolist()), d["gauss"])


# ============ optimisation ============

def warmup_cosine(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero, stepped once per optimizer step."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as SimCLR uses it: SGD with momentum, where parameters in groups with
    `lars_exclude=True` (biases and BatchNorm) get neither the trust ratio nor weight decay.

    On a GPU each group is updated with multi-tensor (`torch._foreach_*`) operations: the per-parameter
    loop makes 440 operator calls a step for ResNet-18 + projector, each a kernel launch, more than the
    model's forward and backward (about 250), and steps of a few dozen small images are launch-bound.
    On a CPU the loop is kept (`foreach=None` chooses): there foreach falls back to a slower loop of its
    own (52 against 27 ms a step here). Both give bit-identical results on the CPU (tests).

    The learning rate may be a 0-dim tensor (`lr_on_device`): a step captured in a CUDA graph then reads
    the scheduler's current value at each replay instead of the number it was captured with. Nothing
    in a step depends on a tensor's value on the host, so a step never waits for the GPU."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False, foreach=foreach))

    def __setstate__(self, state):
        super().__setstate__(state)
        for g in self.param_groups:                # checkpoints written before the foreach option
            g.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if params:
                foreach = g["foreach"] if g["foreach"] is not None else params[0].is_cuda
                (self._update_foreach if foreach else self._update_each)(g, params)
        return loss

    def _update_each(self, g, params):
        for p in params:
            d_p = p.grad
            if not g["lars_exclude"]:
                d_p = d_p.add(p, alpha=g["weight_decay"])
                p_norm, g_norm = torch.norm(p), torch.norm(d_p)
                trust = torch.where((p_norm > 0) & (g_norm > 0), g["eta"] * p_norm / g_norm, torch.ones_like(p_norm))
                d_p = d_p.mul(trust)
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                self.state[p]["momentum_buffer"] = torch.clone(d_p).detach()
            else:
                buf.mul_(g["momentum"]).add_(d_p)
            if isinstance(g["lr"], torch.Tensor):
                p.sub_(self.state[p]["momentum_buffer"] * g["lr"])
            else:
                p.add_(self.state[p]["momentum_buffer"], alpha=-g["lr"])

    def _update_foreach(self, g, params):
        updates = [p.grad for p in params]
        if not g["lars_exclude"]:
            updates = torch._foreach_add(updates, params, alpha=g["weight_decay"])
            p_norm, u_norm = (torch.stack(torch._foreach_norm(t)) for t in (params, updates))
            trust = torch.where((p_norm > 0) & (u_norm > 0), g["eta"] * p_norm / u_norm, torch.ones_like(p_norm))
            updates = torch._foreach_mul(updates, list(trust.unbind()))
        started = [i for i, p in enumerate(params) if "momentum_buffer" in self.state[p]]
        if started:
            buffers = [self.state[params[i]]["momentum_buffer"] for i in started]
            torch._foreach_mul_(buffers, g["momentum"])
            torch._foreach_add_(buffers, [updates[i] for i in started])
        for i in set(range(len(params))) - set(started):         # a parameter's first step: the update
            self.state[params[i]]["momentum_buffer"] = updates[i].clone()
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        if isinstance(g["lr"], torch.Tensor):
            torch._foreach_sub_(params, torch._foreach_mul(buffers, g["lr"]))
        else:
            torch._foreach_add_(params, buffers, alpha=-g["lr"])


def lr_on_device(optimizer: torch.optim.Optimizer, device: torch.device | None) -> None:
    """Learning rates as 0-dim float32 tensors on `device`, or as Python floats with device None.

    A CUDA graph replays the numbers it was captured with: a float learning rate would stay at its
    value of the capture, a tensor one is read from memory, and the scheduler writes it in place
    (LambdaLR fills tensor learning rates; its base rates stay floats, so that costs no host read).
    AdamW's `capturable` follows, with its step counts on the parameters' device; call this after
    the scheduler is built and after a resume has loaded the optimizer's state."""
    for g in optimizer.param_groups:
        lr = float(g["lr"])
        g["lr"] = torch.tensor(lr, dtype=torch.float32, device=device) if device is not None else lr
        if "capturable" in g:
            g["capturable"] = device is not None and device.type == "cuda"
            for p in g["params"]:
                state = optimizer.state.get(p, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(p.device if g["capturable"] else "cpu", torch.float32)


def split_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Biases and normalisation parameters (1-D tensors) get no weight decay and no LARS adaptation."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


# ============ the training loop ============

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
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
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


def make_grad_scaler(device: torch.device, autocast_dtype) -> torch.amp.GradScaler:
    """A real scaler only for fp16; a pass-through otherwise, so there is one backward path."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)


# ============ history files and curves ============

class History:
    """Rows of per-epoch metrics in a CSV, rewritten atomically each epoch; `--resume` reloads it."""

    def __init__(self, path: str, resume: bool = False):
        self.path = path
        self.rows = []
        if resume and os.path.isfile(path):
            with open(path, newline="") as f:
                self.rows = [dict(r) for r in csv.DictReader(f)]

    def truncate(self, num_epochs: int) -> None:
        self.rows = [r for r in self.rows if int(r["epoch"]) <= num_epochs]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        lines = [",".join(fields)]
        for r in self.rows:
            lines.append(",".join(_fmt(r.get(k, "")) for k in fields))
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


PLOT_EVERY_S = 30.0      # redraw training curves at most this often (and after the last epoch)
_last_plotted: dict = {}


def plot_history_throttled(csv_path: str, png_path: str, title: str, last_epoch: bool, **plot_args) -> None:
    """plot_history after the first and the last epoch, and in between at most every PLOT_EVERY_S
    seconds. Drawing the figure takes about a second on a small CPU: each epoch of a fine-tuning on a
    few dozen images, or 10% of a 64 px pretraining epoch. The CSV is written every epoch regardless.
    `plot_args` (best_epoch, chance) go to plot_history."""
    now = time.monotonic()
    if not last_epoch and now - _last_plotted.get(png_path, -math.inf) < PLOT_EVERY_S:
        return
    plot_history(csv_path, png_path, title, **plot_args)
    _last_plotted[png_path] = time.monotonic()


# The panels of the training-curve figure: (title, history columns drawn together, y label). Other columns
# (images/s, the encoder-frozen flag) are for the CSV: a reader of the figure needs loss, quality and lr.
HISTORY_PANELS = (
    ("loss", ("train_loss", "val_loss", "loss"), "loss per image"),
    ("validation", ("val_balanced_accuracy", "val_accuracy", "knn_accuracy", "val_mean_auc"), "accuracy"),
    ("learning rate", ("lr",), "learning rate"),
    ("embedding spread (collapse if near 0)", ("embedding_std",), "std of normalised embeddings"),
)


def best_history_epoch(df):
    """The epoch the trainers keep, by their own rules: fine-tuning the highest val balanced accuracy (ties:
    lower val loss, then the earlier epoch); pretraining the highest kNN accuracy (ties: the later epoch),
    else the lowest loss. None when the history has none of these columns."""
    if "val_balanced_accuracy" in df and df["val_balanced_accuracy"].notna().any():
        d = df.dropna(subset=["val_balanced_accuracy"])
        loss = d["val_loss"] if "val_loss" in d else 0
        ranked = d.assign(_neg_loss=-loss).sort_values(["val_balanced_accuracy", "_neg_loss"], ascending=False,
                                                       kind="stable")
        return int(ranked["epoch"].iloc[0])
    if "val_mean_auc" in df and df["val_mean_auc"].notna().any():     # multi-label: the first best mean AUC
        d = df.dropna(subset=["val_mean_auc"])
        return int(d["epoch"][d["val_mean_auc"] == d["val_mean_auc"].max()].iloc[0])
    if "knn_accuracy" in df and df["knn_accuracy"].notna().any():
        d = df.dropna(subset=["knn_accuracy"])
        return int(d["epoch"][d["knn_accuracy"] == d["knn_accuracy"].max()].iloc[-1])
    if "loss" in df and df["loss"].notna().any():
        return int(df["epoch"][df["loss"].idxmin()])
    return None


def plot_history(csv_path: str, png_path: str, title: str, best_epoch: int | None = None,
                 chance: float | None = None) -> None:
    """A compact grid of the training curves that matter (loss, validation accuracy, lr, embedding spread),
    epochs on a shared x axis, the kept epoch marked (`best_epoch`, else found by the trainers' rules) and
    the accuracy `chance` level (1 / classes) drawn when given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import pandas as pd

    df = pd.read_csv(csv_path)
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    panels = [(t, [c for c in cols if c in numeric], y) for t, cols, y in HISTORY_PANELS]
    if "val_mean_auc" in numeric:                      # a multi-label run's validation panel holds its mean AUC
        panels = [(t, c, "mean ROC-AUC" if t == "validation" else y) for t, c, y in panels]
    panels = [p for p in panels if p[1]]
    if not panels or "epoch" not in df:
        return
    best_epoch = best_epoch if best_epoch is not None else best_history_epoch(df)
    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False)
    for ax, (panel_title, cols, ylabel) in zip(axes.flat, panels):
        for col in cols:
            d = df[["epoch", col]].dropna()
            ax.plot(d["epoch"], d[col], marker="o", ms=3 if len(d) < 40 else 0, label=col.replace("_", " "))
        if panel_title == "validation":
            ax.set_ylim(0, 1.02)                  # accuracies on one scale, so a flat curve looks flat
            if chance is not None:
                ax.axhline(chance, color="grey", ls=":", lw=1, label=f"chance ({chance:.2f})")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:red", ls="--", lw=1, label=f"kept: epoch {best_epoch}")
        ax.set(title=panel_title, ylabel=ylabel, xlabel="epoch", xlim=(0.5, max(1, df["epoch"].max()) + 0.5))
        values = df[cols].to_numpy(float)
        if panel_title == "loss" and np.nanmin(values) > 0 and np.nanmax(values) > 30 * np.nanmin(values):
            ax.set_yscale("log")                  # a first-epoch val loss of 100 would flatten the rest
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, png_path)


def write_settings(path: str, settings: dict) -> None:
    atomic_write_json(path, settings)


def print_settings(title: str, settings: dict) -> None:
    print(f"== {title} ==")
    for k, v in settings.items():
        print(f"  {k:<22} {v}")


# ============ features and kNN ============

@torch.no_grad()
def extract_features(encoder: nn.Module, loader, prepare, device: torch.device, autocast_dtype=None):
    """Encoder features for every batch of `loader`; `prepare(uint8_batch) -> normalised float batch`.

    Returns (features (N, D) float32 on CPU, labels (N,) int64, indices (N,) int64)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels, indices = [], [], []
    for images, y, idx in loader:
        x = prepare(images.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            f = encoder(x)
        feats.append(f.float().cpu())
        labels.append(y)
        indices.append(idx)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


def knn_predict(train_features, train_labels, query_features, num_classes: int, k: int = 20,
                temperature: float = 0.1) -> torch.Tensor:
    """Weighted kNN on cosine similarity (Wu et al. 2018); returns class scores (Q, num_classes)."""
    train = F.normalize(train_features, dim=1)
    query = F.normalize(query_features, dim=1)
    k = min(k, train.shape[0])
    sim, idx = (query @ train.T).topk(k, dim=1)                         # (Q, k)
    weights = (sim / temperature).exp()
    votes = torch.zeros(query.shape[0], num_classes)
    votes.scatter_add_(1, train_labels[idx], weights)
    return votes / votes.sum(dim=1, keepdim=True)


# ============ resumable training state ============

def training_state(optimizer, scheduler, scaler, best_metric) -> dict:
    """What `--resume` needs beyond the weights: optimizer, schedule, scaler, RNGs, best so far."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_states(), "best_metric": best_metric}


# With a few dozen labels a fine-tuning epoch is one step of a fraction of a second, and writing the
# resumable checkpoint (weights and optimizer state, fsynced) every epoch took 40% of a 30-epoch run. A
# pretraining epoch of 423 images at 64 px took 0.19 s on an H100; writing its 92 MB checkpoint takes
# 0.4-0.6 s on our CPU machine. The last checkpoint is written after the first epoch, then when this many
# seconds have passed since the last write, and after the last epoch: an interrupted run loses at most
# this much training.
LAST_CHECKPOINT_EVERY_S = 30.0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a training run; the message says what the resumable checkpoint holds."""


class LastCheckpoint:
    """The resumable `last_*_checkpoint.pth` of a training run: weights plus `training_state`, written
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

    def save_if_due(self, ckpt: dict, epoch: int, num_epochs: int, optimizer, scheduler, scaler, best_metric,
                    rngs=None) -> None:
        """After epoch `epoch` (0-based); `rngs`: every process's RNG states under torchrun, or None."""
        if epoch + 1 < num_epochs and time.monotonic() - self.saved_at < LAST_CHECKPOINT_EVERY_S:
            return
        state = training_state(optimizer, scheduler, scaler, best_metric)
        if rngs is not None:
            state["rng_per_rank"] = rngs
        save_checkpoint({**ckpt, **state}, self.path)
        self.saved_at, self.saved_epoch = time.monotonic(), epoch + 1


def restore_training_state(ckpt: dict, modules: dict, optimizer, scheduler, scaler, path: str):
    """Load weights (strictly) and the full training state saved by `training_state`; returns best_metric."""
    missing = [k for k in ("optimizer", "scheduler", "scaler", "rng") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path}: has no training state ({', '.join(missing)}); resume from a "
                        f"last_*_checkpoint.pth, not a best_* model")
    for key, module in modules.items():
        load_state_strict(module, ckpt.get(key), key, path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    return ckpt["best_metric"]


def check_epochs_left(done: int, num_epochs: int, path: str) -> None:
    """A resumed run with no epoch left would end by reporting the old best model as if it had trained."""
    if done >= num_epochs:
        raise UserError(f"--resume {path}: that run already completed {done} epoch(s), and --num_epochs is "
                        f"{num_epochs}; nothing to train (its models are unchanged). Raise --num_epochs to train longer")


def check_resume_compatible(ckpt: dict, args, keys: tuple, path: str) -> None:
    """Refuse to resume a run with settings that change the network or the data it sees."""
    saved = ckpt.get("args", {})
    then, now = saved.get("recipe", "spec"), getattr(args, "recipe", "spec")   # runs before recipes were spec
    recipe = f" (that run used --recipe {then}, this one --recipe {now})" if then != now else ""
    for k in keys:
        if k in saved and saved[k] != getattr(args, k):
            raise UserError(f"--resume {path}: was run with --{k} {saved[k]}, now --{k} {getattr(args, k)}{recipe}; "
                            f"use the same value or start a new --output_dir")


# ============ distributed (torchrun) ============

@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (one process, rank 0, without torchrun)."""
    distributed: bool
    rank: int
    world_size: int
    is_main: bool
    device: torch.device


def init_distributed(device_name: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU); a no-op otherwise.

    Under torchrun each process takes the GPU of its LOCAL_RANK, so `device_name` only chooses GPUs
    (auto, cuda) or the CPU (cpu).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    requested = resolve_device(device_name)
    if world_size <= 1:
        return Dist(distributed=False, rank=0, world_size=1, is_main=True, device=requested)
    import datetime
    import torch.distributed as dist

    if requested.type == "mps" and device_name != "auto":
        raise UserError("--device mps cannot run under torchrun (no distributed backend for MPS); use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started more processes on this node than the {torch.cuda.device_count()} "
                            f"visible GPU(s); use --nproc_per_node {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # rank 0 alone evaluates and writes while the others wait in their next collective: give it the
        # 30 minutes gloo allows by default rather than NCCL's 10
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank()
    return Dist(distributed=True, rank=rank, world_size=dist.get_world_size(), is_main=rank == 0, device=device)


def cleanup_distributed(dist_info: Dist) -> None:
    if dist_info.distributed:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def convert_sync_bn(model: nn.Module, sync_bn: bool, dist_info: Dist) -> nn.Module:
    """BatchNorm -> SyncBatchNorm under torchrun when asked (a no-op on one process)."""
    if not sync_bn or not dist_info.distributed:
        return model
    if dist_info.device.type != "cuda":
        raise UserError("--sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation); leave it out on CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, dist_info: Dist, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel under torchrun (its constructor broadcasts rank 0's weights); else `model`.

    DDP only tracks parameters that require grad when it is built: build it before freezing any, and
    pass find_unused_parameters=True when some are frozen for a while (their grads then stay None).
    """
    if not dist_info.distributed:
        return model
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each part's gradient over the processes and returns this rank's."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)                                 # (world * N, ...)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad)                                          # sum of every process's loss gradient
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every process) along dim 0 in rank order, keeping the autograd graph.

    Backward sums the incoming gradients across processes, so each process's part receives the gradient
    of the sum of all processes' losses; with DDP's gradient averaging the parameter gradients then equal
    the single-process gradients of the mean loss over the global batch.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


def all_reduce_mean(value: float, dist_info: Dist) -> float:
    if not dist_info.distributed:
        return value
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64,
                     device=dist_info.device if dist_info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return (t / dist_info.world_size).item()


def gather_rng_states(dist_info: Dist) -> list | None:
    """Every process's RNG states in rank order (for rank 0's checkpoint); None on one process."""
    if not dist_info.distributed:
        return None
    import torch.distributed as dist
    states = [None] * dist_info.world_size
    dist.all_gather_object(states, rng_states())
    return states


def restore_rank_rng(ckpt: dict, dist_info: Dist, fallback_seed: int) -> None:
    """After `restore_training_state` gave every process rank 0's RNGs, give each its own stream back."""
    if not dist_info.distributed:
        return
    per_rank = ckpt.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == dist_info.world_size:
        set_rng_states(per_rank[dist_info.rank])
    elif dist_info.rank > 0:
        seed_everything(fallback_seed + dist_info.rank)


def check_resume_world_size(ckpt: dict, dist_info: Dist, path: str) -> None:
    """The global batch and the schedule depend on the number of processes: resume with the same number."""
    saved = ckpt.get("world_size", 1)
    if saved != dist_info.world_size:
        raise UserError(f"--resume {path}: was run on {saved} process(es), now {dist_info.world_size}; resume "
                        f"with the same torchrun --nnodes x --nproc_per_node, or start a new --output_dir")


# ============ setting up a training run (train_ssl.py and fine_tune.py) ============

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
            f"auto: {'streaming from disk' if streaming else 'images cached in memory'}, {os.cpu_count()} CPU cores"
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


def resume_run(path: str | None, kind: str, args, keys: tuple, dist: Dist, modules: dict, optimizer, scheduler,
               scaler, seed: int):
    """--resume: restore weights and training state from `path` after checking it fits this run and has
    epochs left to train. Returns (completed epochs, best metric so far, the checkpoint for what else the
    trainer restores); (0, None, None) when `path` is None."""
    if path is None:
        return 0, None, None
    ckpt = load_checkpoint(path, kind, "--resume")
    check_resume_compatible(ckpt, args, keys, path)
    check_resume_world_size(ckpt, dist, path)
    check_epochs_left(ckpt["epoch"], args.num_epochs, path)
    best = restore_training_state(ckpt, modules, optimizer, scheduler, scaler, path)
    restore_rank_rng(ckpt, dist, seed + 1000 * ckpt["epoch"])
    return ckpt["epoch"], best, ckpt


class RunFiles:
    """What a training run writes: its settings at the start, then after every epoch the history row, the
    curves, the best model when it improved, and last the resumable checkpoint. Written last, a run killed
    before it redoes the epochs since, and --resume drops the history rows after the checkpoint's epoch, so
    no row is ever missing or doubled."""

    def __init__(self, paths: RunPaths, title: str, start_epoch: int, resumed_from: str | None):
        self.paths, self.title = paths, title
        self.history = History(paths.history, resume=start_epoch > 0)
        self.history.truncate(start_epoch)
        same_file = resumed_from is not None and os.path.abspath(resumed_from) == os.path.abspath(paths.last)
        self.last = LastCheckpoint(paths.last, saved_epoch=start_epoch if same_file else 0)

    def write_settings(self, heading: str, settings: dict, dist: Dist) -> None:
        if dist.is_main:
            print_settings(heading, settings)
            write_settings(self.paths.settings, settings)

    def end_epoch(self, epoch: int, num_epochs: int, row: dict, ckpt: dict, improved: bool, optimizer, scheduler,
                  scaler, best_metric, rngs=None, chance: float | None = None, resumable: dict | None = None) -> None:
        """After epoch `epoch` (0-based), on the main process. `chance`: the curves' chance line; `resumable`:
        what only the last checkpoint carries besides `ckpt` (e.g. the augmentation generator's state)."""
        self.history.append(row)
        plot_history_throttled(self.paths.history, self.paths.plot, self.title, last_epoch=epoch + 1 == num_epochs,
                               chance=chance)
        if improved:
            save_checkpoint(ckpt, self.paths.best)
        self.last.save_if_due({**ckpt, **(resumable or {})}, epoch, num_epochs, optimizer, scheduler, scaler,
                              best_metric, rngs)


def reduce_epoch_stats(stats: dict, dist: Dist):
    """An epoch's loss and speed over all processes, and every process's RNG states for rank 0's checkpoint."""
    stats["loss"] = all_reduce_mean(stats["loss"], dist)
    stats["images_per_sec"] = all_reduce_mean(stats["images_per_sec"], dist) * dist.world_size
    return stats, gather_rng_states(dist)
