"""The checkpoint files, the one hand-off between the phases: saving (atomic), loading (weights_only,
checked), and the guard against replacing another run's model.

    from checkpoints import save_checkpoint, load_checkpoint
    ckpt = load_checkpoint("checkpoints/best_ssl_model.pth", kind="ssl", flag="--ssl_checkpoint")
"""
import io
import os
import random

import numpy as np
import torch
import torch.nn as nn

from utils import UserError, _atomic_write, _is_folder_of_checkpoints

CHECKPOINT_FORMAT = 1

CHECKPOINT_KINDS = ("ssl", "classifier")


def not_left_out_of_pretraining(ssl_ckpt: dict, filenames: list) -> list | None:
    """Those of `filenames` an SSL checkpoint did not leave out of pretraining (it records the test images it
    left out when given the label file); None when it records none."""
    excluded = set(ssl_ckpt.get("excluded_files") or [])
    return [f for f in filenames if f not in excluded] if excluded else None


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


def default_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
