"""The checkpoint files, the one hand-off between the phases (docs/checkpoints.md). The file is a dict of
plain types and tensors, written atomically and read with weights_only=True, then checked; the phases read
it as a typed class per kind (SSLCheckpoint, ClassifierCheckpoint, and TrainingState for --resume), whose
reader also opens files written before a field existed. Also here: the guard against replacing another
run's model, and the RNG states a resumable checkpoint carries.

    ssl = SSLCheckpoint.load("checkpoints/best_ssl_model.pth", flag="--ssl_checkpoint")
    ssl.image_size, ssl.model_config, ssl.excluded_files
    ckpt = read_checkpoint(path, ("classifier", "ssl"))          # whichever kind the file is
"""
import io
import os
import random
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn

from image_io import IMAGENET_MEAN, IMAGENET_STD
from model_ssl import FEATURE_DIMS, Classifier, ModelConfig
from utils import UserError, _atomic_write, _is_folder_of_checkpoints

CHECKPOINT_FORMAT = 1

CHECKPOINT_KINDS = ("ssl", "classifier")


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
                "overwrite", "compile", "sync_bn", "tensorboard", "device_obj", "data_dir", "label_file",
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
    if ckpt["kind"] == "classifier":
        _check_temperature(ckpt.get("temperature", 1.0), ckpt["num_classes"], where)
    conv1, small = ckpt["encoder"].get("conv1.weight"), config.get("small_stem", False)
    k = ModelConfig(**config).stem_kernel_size
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] != k:
        raise UserError(f"{where}: model_config says small_stem={small} (a {k}x{k} first convolution) but the "
                        f"encoder's conv1.weight is {tuple(conv1.shape)}; the file was edited or mixed from two runs")


def _check_temperature(t, num_classes: int, where: str) -> None:
    """A positive finite float, or a list of num_classes of them (multi-label)."""
    values = t if isinstance(t, list) else [t]
    ok = (not isinstance(t, list) or len(t) == num_classes) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0 for v in values)
    if not ok:
        raise UserError(f"{where}: temperature {str(t)[:80]}; expected a positive number or a list of "
                        f"{num_classes} (one per finding)")


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


def default_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


# ============ the typed checkpoints the phases read ============
# The file stays a dict of plain types and tensors (docs/checkpoints.md); these classes are its one reader and
# writer. `from_dict` also reads files written before a field existed: such a value is then taken from the
# run's recorded settings (`args`), as those versions of the trainers recorded it there.

def _run_setting(d: dict, key: str, default=None):
    """A value a checkpoint carries at the top level, or (files written before it did) in its run's settings."""
    if key in d:
        return d[key]
    return (d.get("args") or {}).get(key, default)


@dataclass
class TrainingState:
    """What --resume needs beyond the weights: optimizer, schedule, scaler, RNGs, the best metric so far, and
    (torchrun, --cuda_graphs on) every process's RNGs and the augmentation generator."""
    optimizer: dict
    scheduler: dict
    scaler: dict
    rng: dict
    best_metric: object = None
    rng_per_rank: list | None = None
    augment_rng: torch.Tensor | None = None

    KEYS = ("optimizer", "scheduler", "scaler", "rng")

    @classmethod
    def capture(cls, optimizer, scheduler, scaler, best_metric) -> "TrainingState":
        return cls(optimizer.state_dict(), scheduler.state_dict(), scaler.state_dict(), rng_states(), best_metric)

    @classmethod
    def from_dict(cls, d: dict, path: str) -> "TrainingState":
        missing = [k for k in cls.KEYS if k not in d]
        if missing:
            raise UserError(f"--resume {path}: has no training state ({', '.join(missing)}); resume from a "
                            f"last_*_checkpoint.pth, not a best_* model")
        return cls(*(d[k] for k in cls.KEYS), d.get("best_metric"), d.get("rng_per_rank"), d.get("augment_rng"))

    def to_dict(self) -> dict:
        out = {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler, "rng": self.rng,
               "best_metric": self.best_metric}
        if self.rng_per_rank is not None:
            out["rng_per_rank"] = self.rng_per_rank
        if self.augment_rng is not None:
            out["augment_rng"] = self.augment_rng
        return out


@dataclass
class Checkpoint:
    """What every checkpoint holds: the network's config, input format and encoder weights, and its run."""
    model_config: ModelConfig
    image_size: int                  # side in pixels the network was trained at
    channels: int                    # of the decoded images (1 or 3); the network always sees 3
    normalization: dict              # {"mean": [...], "std": [...]} after scaling to [0, 1]
    encoder: dict                    # state dict of the ResNet trunk
    epoch: int                       # completed epochs of the saved model
    num_epochs: int | None           # epochs the run was asked for
    args: dict                       # the run's settings, vars(args): what --resume and the replacement guard compare
    label_file: str | None = None    # the label file the run read (None: none)
    label_file_sha256: str | None = None
    history_file: str | None = None  # the per-epoch CSV beside the checkpoint
    world_size: int = 1
    path: str = ""                   # where it was read from (not saved)

    kind = ""

    @classmethod
    def load(cls, path: str, flag: str = "--checkpoint"):
        """Read and check `path`; a checkpoint of another kind is refused with one line naming both."""
        return cls.from_dict(load_checkpoint(path, cls.kind, flag), path)

    def save(self, path: str, state: TrainingState | None = None) -> None:
        """Atomically; with `state`, the resumable form (last_*_checkpoint.pth)."""
        save_checkpoint({**self.to_dict(), **(state.to_dict() if state else {})}, path)

    @staticmethod
    def _common(d: dict, path: str) -> dict:
        return dict(model_config=ModelConfig(**(d.get("model_config") or {})), image_size=d.get("image_size", 224),
                    channels=d.get("channels", 3), normalization=d.get("normalization") or {
                        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                    encoder=d.get("encoder"), epoch=d.get("epoch", 0), num_epochs=_run_setting(d, "num_epochs"),
                    args=d.get("args") or {}, label_file=_run_setting(d, "label_file"),
                    label_file_sha256=d.get("label_file_sha256"), history_file=d.get("history_file"),
                    world_size=d.get("world_size", 1), path=path)

    def _common_dict(self) -> dict:
        return {"kind": self.kind, "model_config": self.model_config.to_dict(), "image_size": self.image_size,
                "channels": self.channels, "normalization": self.normalization, "encoder": self.encoder,
                "args": self.args, "epoch": self.epoch, "num_epochs": self.num_epochs, "label_file": self.label_file,
                "label_file_sha256": self.label_file_sha256, "history_file": self.history_file,
                "world_size": self.world_size}


@dataclass
class SSLCheckpoint(Checkpoint):
    """train_ssl.py's best_ssl_model.pth / last_ssl_checkpoint.pth."""
    projector: dict | None = None
    loss: float | None = None                 # mean NT-Xent loss of the saved epoch
    knn_accuracy: float | None = None         # on val at the saved epoch; None when not monitored
    excluded_files: list = field(default_factory=list)   # test images left out of pretraining
    split_seed: int = 42                      # how the label file's splits were drawn (no split column)
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    kind = "ssl"

    @classmethod
    def from_dict(cls, d: dict, path: str = "") -> "SSLCheckpoint":
        run = d.get("args") or {}
        return cls(**cls._common(d, path), projector=d.get("projector"), loss=d.get("loss"),
                   knn_accuracy=d.get("knn_accuracy"), excluded_files=list(d.get("excluded_files") or []),
                   # files written before train_ssl.py had --split_seed drew the split with --seed
                   split_seed=d.get("split_seed", run.get("split_seed", run.get("seed", 42))),
                   val_fraction=_run_setting(d, "val_fraction", 0.15),
                   test_fraction=_run_setting(d, "test_fraction", 0.15))

    def to_dict(self) -> dict:
        return {**self._common_dict(), "projector": self.projector, "loss": self.loss,
                "knn_accuracy": self.knn_accuracy, "excluded_files": self.excluded_files,
                "split_seed": self.split_seed, "val_fraction": self.val_fraction, "test_fraction": self.test_fraction}

    def not_left_out_of(self, filenames: list) -> list | None:
        """Those of `filenames` pretraining did not leave out (it records the test images it left out when given
        the label file); None when it records none."""
        excluded = set(self.excluded_files)
        return [f for f in filenames if f not in excluded] if excluded else None


@dataclass
class ClassifierCheckpoint(Checkpoint):
    """fine_tune.py's best_finetuned_model.pth / best_baseline_model.pth / last_<run>_checkpoint.pth."""
    head: dict | None = None
    num_classes: int = 0
    class_names: list = field(default_factory=list)        # the label space (finding names for multi-label)
    class_display_names: list | None = None                # readable names (classes.txt); None in older files
    init: str | None = None                                # "ssl" or "scratch"
    ssl_checkpoint: str | None = None                      # file name of the SSL checkpoint it started from
    split_seed: int = 42
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    splits: dict | None = None                             # {"train": [...], "val": [...], "test": [...]}
    train_files: list = field(default_factory=list)        # the images actually trained on
    label_fraction: float | None = None
    val_metrics: dict | None = None                        # of the saved epoch on the val split
    task: str = "multiclass"                               # "multiclass" or "multilabel"
    uncertain: str | None = None                           # multi-label: what an uncertain (-1) cell meant
    label_format: str | None = None                        # multi-label: "pipe" or "columns"
    thresholds: list | None = None                         # multi-label: per finding, chosen on val
    threshold_rule: str | None = None
    temperature: float | list = 1.0                        # divides the logits (per finding for multi-label),
                                                           # fitted on val; 1.0 in files written before it existed

    kind = "classifier"

    @classmethod
    def from_dict(cls, d: dict, path: str = "") -> "ClassifierCheckpoint":
        num_classes = int(d.get("num_classes") or len(d.get("class_names") or ()))
        return cls(**cls._common(d, path), head=d.get("head"), num_classes=num_classes,
                   class_names=[str(c) for c in d.get("class_names") or range(num_classes)],
                   class_display_names=d.get("class_display_names"), init=d.get("init"),
                   ssl_checkpoint=d.get("ssl_checkpoint"), split_seed=d.get("split_seed", 42),
                   val_fraction=d.get("val_fraction", 0.15), test_fraction=d.get("test_fraction", 0.15),
                   splits=d.get("splits"), train_files=list(d.get("train_files") or []),
                   label_fraction=d.get("label_fraction"), val_metrics=d.get("val_metrics"),
                   task=d.get("task", "multiclass"), uncertain=d.get("uncertain"),
                   label_format=d.get("label_format"), thresholds=d.get("thresholds"),
                   threshold_rule=d.get("threshold_rule"), temperature=d.get("temperature", 1.0))

    def to_dict(self) -> dict:
        out = {**self._common_dict(), "head": self.head, "num_classes": self.num_classes,
               "class_names": self.class_names, "class_display_names": self.class_display_names, "init": self.init,
               "ssl_checkpoint": self.ssl_checkpoint, "split_seed": self.split_seed,
               "val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "splits": self.splits,
               "train_files": self.train_files, "label_fraction": self.label_fraction,
               "val_metrics": self.val_metrics, "task": self.task, "temperature": self.temperature}
        task_entries = {"uncertain": self.uncertain, "label_format": self.label_format,
                        "thresholds": self.thresholds, "threshold_rule": self.threshold_rule}
        return out | {k: v for k, v in task_entries.items() if v is not None}     # what its task records

    def temperature_tensor(self) -> torch.Tensor:
        """The temperature as a (K,) tensor that divides logits (N, K): one value repeated for one label."""
        t = self.temperature
        return torch.tensor(t if isinstance(t, list) else [t] * self.num_classes, dtype=torch.float32)

    def build_model(self) -> Classifier:
        """The classifier with its weights, in eval mode."""
        model = Classifier(self.model_config, self.num_classes)
        load_state_strict(model.encoder, self.encoder, "encoder", self.path)
        load_state_strict(model.head, self.head, "classification head", self.path)
        return model.eval()


CHECKPOINT_CLASSES = {"ssl": SSLCheckpoint, "classifier": ClassifierCheckpoint}


def from_dict(d: dict, path: str = "") -> SSLCheckpoint | ClassifierCheckpoint:
    """A checkpoint dict (as saved) as the class of its kind."""
    return CHECKPOINT_CLASSES[d["kind"]].from_dict(d, path)


def read_checkpoint(path: str, kinds=CHECKPOINT_KINDS, flag: str = "--checkpoint") -> SSLCheckpoint | ClassifierCheckpoint:
    """A checkpoint of one of `kinds`, as the class of its kind."""
    return from_dict(load_checkpoint(path, kinds, flag), path)
