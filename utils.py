"""What every script shares: the user error and the CLI runner, the shared flags and each flag's allowed
values (`bounded`, `check_flags`), the output-folder lock, seeding, devices and precision, atomic files.

Apart from the flag checks, nothing here reads `args`; every function takes explicit parameters. The CLIs
import it:

    from utils import UserError, atomic_write_json, resolve_device
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import secrets
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch


class UserError(Exception):
    """A problem the user can fix (bad path, bad file, bad flag): reported as one line, exit 2."""


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
    bounded(g.add_argument("--seed", type=int, default=42,
                           help="random seed (initialisation, augmentation, label subsets)"), UINT)
    bounded(g.add_argument("--split_seed", type=int, default=42,
                           help="seed of the train/val/test split when the label file has no split column; kept "
                                "apart from --seed so every phase and every training seed sees the same held-out "
                                "test images"), UINT)
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA that supports it (else fp16), bf16 on a CPU "
                        "with native bf16 instructions, fp32 otherwise")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="shorthand: --no-amp forces fp32, --amp means --precision auto")
    bounded(g.add_argument("--num_workers", type=int, default=None,
                           help="DataLoader worker processes when images stream from disk (default: chosen from "
                                "the CPU count; 0 when images are cached in memory)"), UINT)
    bounded(g.add_argument("--cache_gb", type=float, default=4.0,
                           help="memory budget in GiB for decoded images kept in RAM; larger datasets stream from "
                                "disk"), Bound(float, 0, 1 << 20, hint="GiB of RAM; 0 streams every image from disk"))
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

FRACTION = Bound(float, 0, 1, lo_open=True)


def bounded(action: argparse.Action, rule) -> argparse.Action:
    """Attach a flag's allowed values (a Bound or a path kind) to the Action `add_argument` returned; check_flags
    reads them from the parser. Every numeric and path flag of the four CLIs has one."""
    action.rule = rule
    return action


def flag_rules(parser: argparse.ArgumentParser) -> dict:
    """{dest: rule} of the flags of `parser` (parents included) that `bounded` gave a rule."""
    return {a.dest: a.rule for a in parser._actions if getattr(a, "rule", None) is not None}


def check_split_shares(val_fraction: float, test_fraction: float) -> None:
    """--val_fraction + --test_fraction must leave images for training."""
    if val_fraction + test_fraction >= 1:
        raise UserError(f"--val_fraction {val_fraction} + --test_fraction {test_fraction} leave no training images; "
                        f"keep their sum below 1 (e.g. 0.15 and 0.15)")


def check_flags(args, parser: argparse.ArgumentParser, skip=()) -> None:
    """Check every flag of `args` that has a rule in `parser` (except those in `skip`), in the order of `args`,
    before any work: the first bad one is a UserError naming the flag, its value and what is allowed. None
    means "not given" and passes."""
    rules = flag_rules(parser)
    for name, value in vars(args).items():
        rule = rules.get(name)
        if rule is None or value is None or name in skip:
            continue
        for v in value if isinstance(value, list) else [value]:
            check_flag(name, v, rule)


def check_flag(name: str, v, rule) -> None:
    """One value of --name against its rule: a UserError saying what is wrong and what is allowed."""
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
        self.created_folder = False
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
            existed = os.path.isdir(self.folder)
            os.makedirs(self.folder, exist_ok=True)
            self.created_folder = self.created_folder or not existed
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
            if self.created_folder:          # a run refused before writing anything leaves no empty folder
                try:
                    os.rmdir(self.folder)        # only succeeds when the folder is empty
                except OSError:
                    pass

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


def autocast(device_type: str, autocast_dtype, **kwargs):
    """torch.autocast at `autocast_dtype` (from resolve_precision), or no autocast when it is None (fp32).
    Not `torch.autocast(enabled=False)` with a placeholder dtype: torch before 2.3 checks the dtype even then."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=autocast_dtype, **kwargs)


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


def write_settings(path: str, settings: dict) -> None:
    atomic_write_json(path, settings)


def print_settings(title: str, settings: dict) -> None:
    print(f"== {title} ==")
    for k, v in settings.items():
        print(f"  {k:<22} {v}")
