"""Reliability and security (issue 10): runs killed with SIGKILL and resumed, checkpoints that would run
code or do not fit, non-finite losses, unwritable folders and full disks, run-to-run determinism, and
fuzzed label files and image bytes. docs/errors.md maps each bad input to its message and its test here.

Runs are tiny (20 PNGs of 40 px, batch 8, 2-3 epochs; the standard stem at 40 px, which is ~3x
cheaper than the small stem at 32 px) and use one thread, in this process and in the subprocesses,
so that their weights can be compared bit for bit.
"""
import errno
import json
import os
import posixpath
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import checkpoints  # noqa: E402
import data_loader  # noqa: E402
import data_splits  # noqa: E402
import evaluate  # noqa: E402
import fine_tune  # noqa: E402
import image_io  # noqa: E402
import label_tables  # noqa: E402
import train_ssl  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from model_ssl import ModelConfig, SimCLR  # noqa: E402
from tiny_data import write_tiny_dataset  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
REFUSED = "refused, the file contains objects other than tensors and plain types, and loading it could run code"


# ============ helpers ============

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), n=20, classes=2)


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    """Eight images: one SimCLR step per epoch at batch 8."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data8"), n=8, classes=2)


def ssl_argv(data_dir, out, epochs=3, *extra):
    return ["--data_dir", str(data_dir), "--output_dir", str(out), "--image_size", "40", "--batch_size", "8",
            "--num_epochs", str(epochs), "--warmup_epochs", "1", "--lr", "1e-3", "--device", "cpu",
            "--precision", "fp32", "--seed", "5", *extra]


def ft_argv(data_dir, out, epochs=2, *extra):
    return ["--data_dir", str(data_dir), "--label_file", os.path.join(data_dir, "labels.csv"),
            "--output_dir", str(out), "--image_size", "40", "--batch_size", "8", "--num_epochs", str(epochs),
            "--device", "cpu", "--precision", "fp32", "--seed", "7", *extra]


def start(script, argv, log):
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *argv], cwd=REPO, env=ENV,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def kill_when(proc, condition, timeout=300, poll=0.002) -> bool:
    """SIGKILL `proc` the moment `condition()` holds; False when it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    proc.kill()
    proc.wait()
    raise AssertionError("the run neither reached the kill point nor exited")


def temporaries(folder, name=""):
    """Our in-flight temporaries (of `name` when given) that already hold bytes."""
    found = []
    for entry in os.listdir(folder):
        if utils.TEMPORARY_NAME.fullmatch(entry) and entry.startswith(f".{name}"):
            try:
                if os.path.getsize(os.path.join(folder, entry)) > 0:
                    found.append(entry)
            except OSError:
                pass
    return found


def assert_outputs_readable(folder):
    """Every output parses; the only other entries are our hidden temporaries and the lock file of a killed
    run, never read as outputs."""
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith("."):
            assert utils.TEMPORARY_NAME.fullmatch(entry) or utils.LOCK_NAME.fullmatch(entry), entry
        elif entry.endswith(".pth"):
            checkpoints.load_checkpoint(path)                             # weights_only=True, then validated
        elif entry.endswith(".csv"):
            epochs = pd.read_csv(path)["epoch"].tolist()
            assert epochs == list(range(1, len(epochs) + 1)), (entry, epochs)
        elif entry.endswith(".png"):
            with Image.open(path) as im:
                im.load()
        elif entry.endswith(".json"):
            with open(path) as f:
                json.load(f)
        else:
            raise AssertionError(f"unexpected output {entry}")


def epoch_of(path):
    return checkpoints.load_checkpoint(str(path))["epoch"]


def assert_same_weights(a_path, b_path, parts):
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    assert a["epoch"] == b["epoch"]
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def history_without_speed(path):
    return pd.read_csv(path).drop(columns=["images_per_sec"])


def run_cli_exit(main, parser, argv, capsys):
    """(exit code, last stderr line) of `run_cli`; asserts the user saw no traceback."""
    with pytest.raises(SystemExit) as e:
        utils.run_cli(main, parser, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err.strip().splitlines()[-1]


# ============ SIGKILL and --resume ============

def test_sigkill_at_any_moment_keeps_files_readable_and_resume_matches_an_uninterrupted_run(data, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    reference = start("train_ssl.py", ssl_argv(data, ref), tmp_path / "ref.log")      # runs alongside
    last = cut / "last_ssl_checkpoint.pth"

    # killed right after the first epoch's checkpoint landed (the history and plot were written before it)
    proc = start("train_ssl.py", ssl_argv(data, cut), tmp_path / "cut1.log")
    assert kill_when(proc, lambda: last.exists())
    assert epoch_of(last) == 1
    assert_outputs_readable(cut)

    # resumed, then killed while the next last checkpoint is being written
    proc = start("train_ssl.py", ssl_argv(data, cut, 3, "--resume"), tmp_path / "cut2.log")
    assert kill_when(proc, lambda: temporaries(cut, "last_ssl_checkpoint.pth"))
    assert temporaries(cut, "last_ssl_checkpoint.pth"), "the cut save left its temporary"
    assert epoch_of(last) == 1                                    # the half-written file replaced nothing
    assert_outputs_readable(cut)

    # resumed to the end: the same weights and history as the run that was never interrupted
    train_ssl.main(train_ssl.get_args_parser().parse_args(ssl_argv(data, cut, 3, "--resume")))
    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    assert_same_weights(ref / "last_ssl_checkpoint.pth", last, ("encoder", "projector"))
    pd.testing.assert_frame_equal(history_without_speed(ref / "ssl_history.csv"),
                                  history_without_speed(cut / "ssl_history.csv"))
    assert not [e for e in os.listdir(cut) if e.startswith(".")], "stale temporaries were not cleaned"
    assert_outputs_readable(cut)
    assert oct(os.stat(last).st_mode & 0o044) == oct(0o044 & ~_umask())  # readable by the team, like open()


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_fine_tune_is_bit_identical_run_to_run_and_after_a_sigkill_and_resume(data, tmp_path):
    cut = tmp_path / "cut"
    proc = start("fine_tune.py", ft_argv(data, cut), tmp_path / "cut.log")
    killed = {}
    watcher = threading.Thread(target=lambda: killed.setdefault(
        "ok", kill_when(proc, lambda: (cut / "last_baseline_checkpoint.pth").exists())))
    watcher.start()
    parser = fine_tune.get_args_parser()
    fine_tune.main(parser.parse_args(ft_argv(data, tmp_path / "a")))     # alongside the run being killed
    fine_tune.main(parser.parse_args(ft_argv(data, tmp_path / "b")))
    watcher.join()
    assert killed["ok"], (tmp_path / "cut.log").read_text()[-2000:]
    assert epoch_of(cut / "last_baseline_checkpoint.pth") == 1
    assert_outputs_readable(cut)
    fine_tune.main(parser.parse_args(ft_argv(data, cut, 2, "--resume")))

    a = tmp_path / "a"
    for other in (tmp_path / "b", cut):
        assert_same_weights(a / "last_baseline_checkpoint.pth", other / "last_baseline_checkpoint.pth",
                            ("encoder", "head"))
        assert_same_weights(a / "best_baseline_model.pth", other / "best_baseline_model.pth", ("encoder", "head"))
        pd.testing.assert_frame_equal(history_without_speed(a / "baseline_history.csv"),
                                      history_without_speed(other / "baseline_history.csv"))
    metrics = [torch.load(p / "best_baseline_model.pth", weights_only=True)["val_metrics"]
               for p in (a, tmp_path / "b", cut)]
    assert metrics[0] == metrics[1] == metrics[2]


# ============ checkpoints that would run code ============

class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def crafted(path, marker, how):
    obj = {"kind": "ssl", "model_config": {}, "image_size": 40, "encoder": Payload(marker)}
    if how == "zip":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        import pickle
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(how[-1]))
    return str(path)


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle0", "pickle2", "pickle5"])
def test_a_checkpoint_whose_unpickling_runs_code_is_refused_in_every_format(how, tmp_path, capfd):
    """Protocols 0 and 5 stop at an opcode no checkpoint uses, before the payload's global is even read."""
    marker = tmp_path / "PAYLOAD_RAN"
    path = crafted(tmp_path / "evil.pth", marker, how)
    expected = (r"not a readable PyTorch checkpoint \(not a file written by torch.save: Unsupported operand \d+\)"
                if how in ("pickle0", "pickle5") else REFUSED)
    with pytest.raises(utils.UserError, match=expected):
        checkpoints.load_checkpoint(path, "ssl", "--ssl_checkpoint")
    assert not marker.exists()
    assert capfd.readouterr().err == ""                          # no torch warning around the one line


def test_train_ssl_resume_refuses_a_code_checkpoint_with_one_line_and_exit_2(data8, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = crafted(tmp_path / "evil.pth", marker, "zip")
    r = subprocess.run([sys.executable, "train_ssl.py", *ssl_argv(data8, tmp_path / "out", 2, "--resume", evil)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: --resume {evil}: {REFUSED} (only checkpoints written " \
                                                f"by this toolkit load)"
    assert "Traceback" not in r.stderr
    assert not marker.exists()


def test_fine_tune_and_evaluate_refuse_a_code_checkpoint_with_exit_2(data8, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = crafted(tmp_path / "evil.pth", marker, "zip")
    code, line = run_cli_exit(fine_tune.main, fine_tune.get_args_parser(),
                              ft_argv(data8, tmp_path / "ft", 1, "--ssl_checkpoint", evil), capsys)
    assert code == 2 and line.startswith(f"error: --ssl_checkpoint {evil}: {REFUSED}")
    code, line = run_cli_exit(evaluate.main, evaluate.get_args_parser(),
                              ["--checkpoint", evil, "--data_dir", data8, "--output_dir", str(tmp_path / "ev"),
                               "--device", "cpu"], capsys)
    assert code == 2 and line.startswith(f"error: --checkpoint {evil}: {REFUSED}")
    assert not marker.exists()


# ============ checkpoints that do not fit ============

@pytest.fixture(scope="module")
def ssl_state():
    torch.manual_seed(0)
    model = SimCLR(ModelConfig(small_stem=False))
    return {"kind": "ssl", "model_config": model.config.to_dict(), "image_size": 40, "channels": 1,
            "encoder": model.encoder.state_dict(), "projector": model.projector.state_dict(), "epoch": 1}


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def _encoder_with(state, key, value):
    return {**state, "encoder": {**state["encoder"], key: value}}


BROKEN_CHECKPOINTS = {
    "no_kind": (lambda s: _without(s, "kind"),
                r"not a checkpoint written by this toolkit \(expected a dict with 'kind' in \('ssl', 'classifier'\)"),
    "not_a_dict": (lambda s: [s["encoder"]["conv1.weight"]], "not a checkpoint written by this toolkit"),
    "unknown_backbone": (lambda s: {**s, "model_config": {**s["model_config"], "backbone": "resnet999"}},
                         r"backbone 'resnet999' is not one of \['resnet18', 'resnet50'\]"),
    "stem_mismatch": (lambda s: {**s, "model_config": {**s["model_config"], "small_stem": True}},
                      r"model_config says small_stem=True \(a 3x3 first convolution\) but the encoder's "
                      r"conv1.weight is \(64, 3, 7, 7\)"),
    "bad_image_size": (lambda s: {**s, "image_size": "big"}, "image_size 'big', channels 1; expected the training"),
    "no_encoder": (lambda s: _without(s, "encoder"), "has no 'encoder' weights; expected a state dict of tensors"),
    "encoder_not_tensors": (lambda s: {**s, "encoder": {"conv1.weight": [1, 2]}},
                            "'encoder' is not a state dict of tensors"),
    "missing_key": (lambda s: {**s, "encoder": _without(s["encoder"], "layer4.1.bn2.running_var")},
                    r"the encoder weights do not fit the model built from its config "
                    r"\(missing \['layer4.1.bn2.running_var'\]\)"),
    "wrong_shape": (lambda s: _encoder_with(s, "layer1.0.conv1.weight", torch.zeros(64, 64, 1, 1)),
                    r"shape of layer1.0.conv1.weight is \(64, 64, 1, 1\), expected \(64, 64, 3, 3\)"),
    "nan_weights": (lambda s: _encoder_with(s, "layer2.0.bn1.weight", torch.full((128,), float("nan"))),
                    r"the encoder weights contain NaN or inf \(first in layer2.0.bn1.weight\)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_fine_tune_refuses_a_checkpoint_that_does_not_fit_saying_what_was_expected(case, ssl_state, data8, tmp_path):
    mutate, message = BROKEN_CHECKPOINTS[case]
    path = str(tmp_path / f"{case}.pth")
    torch.save(mutate(ssl_state), path)
    with pytest.raises(utils.UserError, match=message):
        fine_tune.main(fine_tune.get_args_parser().parse_args(
            ft_argv(data8, tmp_path / "out", 1, "--ssl_checkpoint", path)))
    assert not os.path.exists(tmp_path / "out" / "best_finetuned_model.pth")


@pytest.mark.parametrize("cut", ["half", "empty"])
def test_a_truncated_or_empty_checkpoint_is_named_as_such(cut, ssl_state, tmp_path):
    whole = tmp_path / "whole.pth"
    checkpoints.save_checkpoint(ssl_state, str(whole))
    data = whole.read_bytes()
    broken = tmp_path / "broken.pth"
    broken.write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    expected = "damaged or truncated, e.g. an interrupted copy" if cut == "half" else "the file is empty"
    with pytest.raises(utils.UserError, match=f"not a readable PyTorch checkpoint \\({expected}"):
        checkpoints.load_checkpoint(str(broken), "ssl", "--ssl_checkpoint")


def test_resuming_from_a_best_model_without_training_state_is_refused(ssl_state, data8, tmp_path):
    best = tmp_path / "best_ssl_model.pth"
    checkpoints.save_checkpoint(ssl_state, str(best))
    with pytest.raises(utils.UserError, match=r"has no training state \(optimizer, scheduler, scaler, rng\); "
                                              r"resume from a last_\*_checkpoint.pth"):
        train_ssl.main(train_ssl.get_args_parser().parse_args(ssl_argv(data8, tmp_path / "o", 2, "--resume", str(best))))


# ============ non-finite losses ============

def test_a_nan_loss_stops_the_run_with_advice_exit_2_and_keeps_the_last_good_checkpoint(
        data8, tmp_path, monkeypatch, capsys):
    last = tmp_path / "last_ssl_checkpoint.pth"
    real, seen = train_ssl.nt_xent_loss, {}

    def loss_turning_nan_in_epoch_2(z1, z2, *a, **k):           # one step per epoch: call 2 is epoch 2
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 2:
            seen["sha"] = utils.sha256_file(str(last))
            return real(z1, z2, *a, **k) * float("nan")
        return real(z1, z2, *a, **k)

    monkeypatch.setattr(train_ssl, "nt_xent_loss", loss_turning_nan_in_epoch_2)
    code, line = run_cli_exit(train_ssl.main, train_ssl.get_args_parser(), ssl_argv(data8, tmp_path, 3), capsys)
    assert code == 2
    assert line == ("error: the loss became nan in epoch 2; lower --lr, try --precision fp32, and check the images "
                    "for blank or corrupt files (the last good checkpoint is kept)")
    assert utils.sha256_file(str(last)) == seen["sha"] and epoch_of(last) == 1


def test_nan_weights_behind_a_finite_loss_are_never_saved(data8, tmp_path, monkeypatch):
    """A NaN gradient in an epoch's last step leaves the loss finite and the weights NaN."""
    real, seen = train_ssl.nt_xent_loss, {"calls": 0}

    def nan_gradient_in_epoch_2(z1, z2, *a, **k):
        seen["calls"] += 1
        loss = real(z1, z2, *a, **k)
        if seen["calls"] != 2:
            return loss
        s = z1.sum()                                  # where() picks 0, but sqrt(<0)'s gradient NaN leaks through
        return loss + torch.where(s > float("inf"), torch.sqrt(-s.abs() - 1), torch.zeros_like(s))

    monkeypatch.setattr(train_ssl, "nt_xent_loss", nan_gradient_in_epoch_2)
    with pytest.raises(training.NonFiniteLossError, match=r"the weights became NaN or inf in epoch 2 \(.*\); lower --lr"):
        train_ssl.main(train_ssl.get_args_parser().parse_args(ssl_argv(data8, tmp_path, 2)))
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "last_ssl_checkpoint.pth"))
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["encoder"].values() if v.is_floating_point())


# ============ unwritable folders and full disks ============

def test_an_output_dir_that_cannot_be_created_is_one_clear_error(data8, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    code, line = run_cli_exit(train_ssl.main, train_ssl.get_args_parser(), ssl_argv(data8, out, 1), capsys)
    assert code == 2
    assert line == f"error: cannot write to {out}: Not a directory; choose a writable --output_dir"


class FullDisk:
    """A file whose device fills up after `room` bytes: the write that crosses it stores what fits, then fails."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = data if isinstance(data, str) else bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


WRITERS = {
    "checkpoint": lambda p, v: checkpoints.save_checkpoint({"kind": "ssl", "w": torch.full((50_000,), float(v))}, p),
    "history_csv": lambda p, v: utils.atomic_write_text(p, "epoch,loss\n" + f"1,{v}\n" * 5000),
    "settings_json": lambda p, v: utils.atomic_write_json(p, {"lr": v, "pad": "x" * 50_000}),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("failure", ["disk_full_mid_write", "fsync_io_error"])
def test_a_failed_save_leaves_the_previous_file_byte_identical(writer, failure, tmp_path, monkeypatch):
    path = str(tmp_path / "out.file")
    WRITERS[writer](path, 1.0)
    before = open(path, "rb").read()
    if failure == "disk_full_mid_write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k), len(before) // 2))
        reason = "No space left on device"
    else:
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))))
        reason = "Input/output error"
    with pytest.raises(utils.UserError, match=f"could not write {re.escape(path)}: {reason}; the previous file, "
                                              f"if any, is intact"):
        WRITERS[writer](path, 2.0)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["out.file"]                  # the partial temporary is gone too


# ============ fuzzing the label file ============

@pytest.fixture(scope="module")
def label_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    os.makedirs(root / "sub")
    for name in ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "sub/g.png", "ü.png"]:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / name)
    return str(root)


NAMES = st.sampled_from(["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "sub/g.png", "ü.png", "./a.png",
                         "sub/../b.png", "sub\\g.png", "missing.png", "", " c.png ", "sub", '"d.png"']) | st.text(max_size=8)
LABELS = st.sampled_from(["0", "1", "2", "-1", "1.0", "7", "99999999999999999999999", "cat", "dog", "", "٣",
                          "1e3", "nan", "NA"]) | st.integers(-3, 10**12).map(str) | st.text(max_size=5)
SPLIT_VALUES = st.sampled_from(["train", "val", "test", "Training", "VALID", "", "holdout"]) | st.text(max_size=4)
HEADERS = st.sampled_from(["filename,label", "filename,label,split", "label,filename", " Filename , Label ,split",
                           "filename,label,split,patient_id", "file,lab", "filename", ""])


@st.composite
def label_files(draw):
    kind = draw(st.sampled_from(["rows", "rows", "rows", "text", "bytes"]))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    header = draw(HEADERS)
    rows = draw(st.lists(st.tuples(NAMES, LABELS, SPLIT_VALUES, st.text(max_size=3)), min_size=0, max_size=10))
    width = draw(st.integers(1, 4))
    lines = ([header] if header else []) + [",".join(r[:width]) for r in rows]
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines).encode("utf-8", "surrogatepass")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=label_files())
def test_any_label_file_gives_a_consistent_table_or_a_user_error(content, label_dir):
    path = os.path.join(label_dir, "labels.csv")
    with open(path, "wb") as f:
        f.write(content)
    try:
        t = label_tables.read_label_table(path, label_dir, seed=0)
    except utils.UserError as e:
        assert str(e) and "\n" not in str(e)
        return
    n = len(t.filenames)
    assert n > 0 and len(t.labels) == len(t.splits) == len(t.patient_ids) == n
    assert t.labels.dtype == np.int64 and t.labels.min() >= 0 and t.labels.max() < t.num_classes
    assert set(t.splits) <= set(data_splits.SPLITS) and "train" in set(t.splits)
    assert len(set(t.filenames)) == n                             # also after './a.png' -> 'a.png'
    for f in t.filenames:
        assert f == posixpath.normpath(f) and os.path.isfile(os.path.join(label_dir, f)), f


def test_the_same_image_named_two_ways_is_a_duplicate(label_dir, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("filename,label\na.png,0\n./a.png,1\nb.png,1\n")
    with pytest.raises(utils.UserError, match=r"rows 2 \('a.png'\) and 3 \('./a.png'\) name the same image"):
        label_tables.read_label_table(str(path), label_dir)


def test_a_label_file_that_is_not_utf8_text_is_named_as_such(label_dir, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("filename,label\na.png,0\n".encode("utf-16"))
    with pytest.raises(utils.UserError, match=r"not UTF-8 text \(UTF-16\); save it as UTF-8"):
        label_tables.read_label_table(str(path), label_dir)


def test_a_label_implying_millions_of_classes_is_an_error_not_a_hang(label_dir, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("filename,label\na.png,0\nb.png,100000000\n")
    with pytest.raises(utils.UserError, match=r"label 100000000 makes 100000001 classes"):
        label_tables.read_label_table(str(path), label_dir)


# ============ fuzzing image bytes ============

def _real_files():
    """Bytes of a small real file of each kind the reader supports, by name."""
    import io

    rng = np.random.default_rng(0)
    samples = {
        "gray.png": Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)),
        "rgb.jpg": Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)),
        "deep.png": Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)),
        "float.tif": Image.fromarray(np.array([[np.nan, 0.5], [np.inf, -np.inf]], np.float32)),
        "palette.bmp": Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).convert("P"),
    }
    out = {}
    for name, im in samples.items():
        buffer = io.BytesIO()
        im.save(buffer, format={"png": "PNG", "jpg": "JPEG", "tif": "TIFF", "bmp": "BMP"}[name.split(".")[1]])
        out[name] = buffer.getvalue()
    try:
        from pydicom.data import get_testdata_file
        with open(get_testdata_file("CT_small.dcm"), "rb") as f:
            out["ct.dcm"] = f.read()
    except Exception:                                    # pydicom-data not installed: no DICOM seed
        pass
    return out


REAL = _real_files()
EXTENSIONS = st.sampled_from([".png", ".jpg", ".dcm", ".tif", ".bmp"])


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["random", "truncated", "mutated", "renamed"]))
    if kind == "random":
        return draw(st.binary(max_size=600)), draw(EXTENSIONS)
    name = draw(st.sampled_from(sorted(REAL)))
    data = REAL[name]
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))], os.path.splitext(name)[1]
    if kind == "mutated":                                 # flip bytes, mostly in the header
        data = bytearray(data)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, min(len(data), 2048) - 1), st.integers(0, 255)),
                                        min_size=1, max_size=8)):
            data[pos] = value
        return bytes(data), os.path.splitext(name)[1]
    return data, draw(EXTENSIONS)                         # a real file under another extension


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample=image_bytes())
def test_any_image_bytes_decode_to_uint8_or_a_user_error(sample, tmp_path_factory):
    data, ext = sample
    path = os.path.join(str(tmp_path_factory.getbasetemp()), "fuzz" + ext)
    with open(path, "wb") as f:
        f.write(data)
    try:
        arr = image_io.load_image(path)
    except utils.UserError as e:
        assert path in str(e) and "\n" not in str(e)
        return
    assert arr.dtype == np.uint8 and arr.size > 0
    assert arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)


def test_a_float_image_with_nan_and_inf_keeps_its_finite_pixels_in_range(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[np.nan, 0.25], [np.inf, -np.inf], [0.0, 1.0]], np.float32)).save(path)
    arr = image_io.load_image(str(path))
    assert arr.tolist() == [[0, 64], [255, 0], [0, 255]]


def test_a_png_named_jpg_is_read_by_its_content(tmp_path):
    Image.fromarray(np.full((5, 6), 77, np.uint8)).save(tmp_path / "x.png")
    os.rename(tmp_path / "x.png", tmp_path / "x.jpg")
    assert image_io.load_image(str(tmp_path / "x.jpg")).tolist() == np.full((5, 6), 77).tolist()


def test_image_store_skips_unreadable_files_with_one_warning(tmp_path, capsys):
    write_tiny_dataset(tmp_path, n=3, classes=2)
    (tmp_path / "noise.png").write_bytes(os.urandom(300))
    (tmp_path / "half.png").write_bytes((tmp_path / "img000.png").read_bytes()[:60])
    (tmp_path / "junk.dcm").write_bytes(b"DICM" * 40)
    files = image_io.list_images(str(tmp_path))
    store = data_loader.ImageStore(str(tmp_path), files, 32, skip_unreadable=True)
    assert sorted(store.filenames) == ["img000.png", "img001.png", "img002.png"]
    assert tuple(store.images.shape) == (3, 1, 32, 32) and store.images.dtype == torch.uint8
    err = capsys.readouterr().err
    assert err.count("warning: skipped 3 unreadable image(s)") == 1
    with pytest.raises(utils.UserError, match=r"half.png: not a readable image"):
        data_loader.ImageStore(str(tmp_path), files, 32)          # labelled data: an error, never a silent drop
