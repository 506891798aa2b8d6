"""The capture-friendly pretraining step (train_ssl.py --cuda_graphs on, issue 23): on the CPU, its
augmentation draws, its deferred loss read, its static shapes, its resume and that nothing in it
reads a tensor on the host; on a GPU, the captured step itself (skipped without CUDA).

    python -m pytest tests/test_gpu_step.py -q
"""
import contextlib
import os

import numpy as np
import pytest
import torch
from scipy import stats

import augmentations
import distributed
import image_io
import optimizers
import train_ssl
import training
import training_history
import training_run
import utils
from augmentations import SSL_AUGMENT, AugmentConfig, BatchAugment
from model_ssl import ModelConfig, SimCLR
from tiny_data import write_tiny_dataset

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU; this machine has none")


@pytest.fixture
def no_plots(monkeypatch):
    """The curves cost a second a run on a small CPU and are tested elsewhere."""
    monkeypatch.setattr(training_history, "plot_history", lambda *a, **k: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("gpu_step"), n=8, size=20)


def ssl_args(data_dir, out, *extra, device="cpu"):
    return train_ssl.get_args_parser().parse_args([
        "--data_dir", data_dir, "--output_dir", str(out), "--image_size", "16", "--batch_size", "4",
        "--num_epochs", "2", "--warmup_epochs", "1", "--lr", "0.3", "--optimizer", "lars", "--device", device,
        "--precision", "fp32", "--seed", "3", *extra])


def history_losses(out) -> list:
    import pandas as pd
    return pd.read_csv(os.path.join(out, "ssl_history.csv"))["loss"].tolist()


# ============ the augmentation's random numbers ============

@pytest.mark.parametrize("config", [SSL_AUGMENT, AugmentConfig(gamma=0.4, rotation=0.0)], ids=["ssl", "gamma"])
def test_a_generator_draws_exactly_what_the_global_stream_draws(config):
    """The device generator runs the very code of the global-RNG path: on a CPU, a generator holding the
    global state gives the same parameters and the same views, and leaves the global stream alone."""
    x = torch.randint(0, 256, (6, 1, 24, 24), dtype=torch.uint8)
    augment = BatchAugment(config, 16)
    torch.manual_seed(11)
    generator = torch.Generator().set_state(torch.get_rng_state())
    expected = augment.sample_params(6, 24, 24)
    drawn = augment.sample_params(6, 24, 24, generator)
    assert set(drawn) == set(expected) and all(torch.equal(drawn[k], expected[k]) for k in expected)
    global_before = torch.get_rng_state()
    views = augment(x, generator)
    assert torch.equal(torch.get_rng_state(), global_before)           # only the generator moved
    torch.set_rng_state(generator.get_state())
    assert not torch.equal(views, augment(x, generator=None))           # it moved on: the next views differ


def test_parameters_drawn_on_a_generator_stay_on_its_device_and_the_apply_reads_no_host_copy(monkeypatch):
    augment = BatchAugment(SSL_AUGMENT, 16)
    params = augment.sample_params(5, 16, 16, torch.Generator().manual_seed(0))
    assert all(v.device.type == "cpu" and v.shape == (5,) for v in params.values())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda *a: pytest.fail("parameters were copied"))
    assert augmentations._to_device(params, torch.device("cpu")) is params


@needs_cuda
def test_cuda_generator_draws_the_same_distributions_as_the_cpu():
    """Moments and KS distances of every parameter, 4000 draws each (a different stream, the same law)."""
    augment = BatchAugment(AugmentConfig(gamma=0.3), 224)
    cpu = augment.sample_params(4000, 224, 224, torch.Generator().manual_seed(1))
    gpu = augment.sample_params(4000, 224, 224, torch.Generator("cuda").manual_seed(1))
    assert all(v.device.type == "cuda" for v in gpu.values())
    for key in cpu:
        a, b = cpu[key].double().numpy(), gpu[key].cpu().double().numpy()
        assert stats.ks_2samp(a, b).pvalue > 0.001, key
        assert abs(a.mean() - b.mean()) <= 0.1 * a.std() + 1e-9 and b.min() >= a.min() - 1e-6 - 0.02 * np.ptp(a)
        assert b.max() <= a.max() + 1e-6 + 0.02 * np.ptp(a), key


# ============ no host read inside the step ============

@contextlib.contextmanager
def host_reads_forbidden():
    """Every Python-level way a step could wait for the device (on a GPU) raises while inside."""
    names = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_nonzero = torch.nonzero

    def refuse(name):
        def method(*a, **k):
            raise AssertionError(f"Tensor.{name} inside the step: a host read, which waits for the GPU")
        return method
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        torch.nonzero = refuse("nonzero")
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.nonzero = saved_nonzero


def test_the_static_step_reads_nothing_on_the_host(monkeypatch):
    """What the CUDA graph will hold, run on the CPU: augmentation (with the GPU's masked blur), forward,
    NT-Xent, backward and LARS with a tensor learning rate."""
    monkeypatch.setattr(BatchAugment, "_blur_subset", BatchAugment._blur_masked)      # the GPU's blur
    torch.manual_seed(0)
    model = SimCLR(ModelConfig(small_stem=True, projection_dim=16)).to(memory_format=torch.channels_last)
    optimizer = optimizers.LARS(optimizers.split_decay_groups(model, 1e-6), lr=0.1)
    optimizers.lr_on_device(optimizer, torch.device("cpu"))
    augment = BatchAugment(AugmentConfig(gamma=0.3, blur_p=0.9), 16, channels_last=True)
    step = train_ssl.make_static_step(model, augment, optimizer, torch.Generator().manual_seed(0), 0.5,
                                      torch.device("cpu"), None, capture=False)
    batch = (torch.randint(0, 256, (4, 1, 20, 20), dtype=torch.uint8),)
    before = [p.detach().clone() for p in model.parameters()]
    collapse = []
    step(batch, collapse)                        # the first step makes LARS's momentum buffers
    with host_reads_forbidden():
        loss, n = step(batch, collapse)
    assert n == 4 and loss.dim() == 0 and len(collapse) == 2 and torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_lars_with_a_tensor_learning_rate_follows_the_float_one():
    torch.manual_seed(0)
    a = [torch.randn(8, 4), torch.randn(6)]
    b = [p.clone() for p in a]
    groups = lambda ps: [{"params": ps[:1], "lars_exclude": False}, {"params": ps[1:], "lars_exclude": True}]  # noqa
    for foreach in (False, True):
        opt_f = optimizers.LARS(groups(a), lr=0.5, foreach=foreach)
        opt_t = optimizers.LARS(groups(b), lr=0.5, foreach=foreach)
        sched = optimizers.warmup_cosine(opt_t, 2, 6)
        optimizers.lr_on_device(opt_t, torch.device("cpu"))
        lr_tensor = opt_t.param_groups[0]["lr"]
        sched_f = optimizers.warmup_cosine(opt_f, 2, 6)
        for _ in range(4):
            for p, q in zip(a, b):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            opt_f.step(), opt_t.step(), sched_f.step(), sched.step()
            assert opt_t.param_groups[0]["lr"] is lr_tensor                  # written in place, never replaced
            assert float(lr_tensor) == pytest.approx(opt_f.param_groups[0]["lr"], rel=1e-6)
            for p, q in zip(a, b):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ============ the loss read ============

def test_the_deferred_loss_read_gives_the_loss_read_after_every_step(monkeypatch):
    """train_one_epoch reads the device-side sum every HOST_SYNC_EVERY steps and at the end: the same
    epoch loss as reading (and averaging per image) every step's loss on the host."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = [torch.randn(n, 3) for n in (5, 5, 5, 2, 5, 5, 3)]          # one odd-sized: weights by images
    read = []

    def loss_fn(m, batch):
        loss = (m(batch) - 1).pow(2).mean()
        read.append((loss.item(), len(batch)))
        return loss, len(batch)
    monkeypatch.setattr(training, "HOST_SYNC_EVERY", 3)
    stats_ = training.train_one_epoch(model, batches, optimizer, loss_fn, device=torch.device("cpu"),
                                   scaler=training.make_grad_scaler(torch.device("cpu"), None))
    every_step = sum(v * n for v, n in read) / sum(n for _, n in read)
    assert stats_["loss"] == pytest.approx(every_step, rel=1e-6) and isinstance(stats_["lr"], float)


# ============ static shapes ============

@pytest.mark.parametrize("images, batch, expected", [(8, 3, [3, 3]), (8, 4, [4, 4]), (8, 16, [8])])
def test_the_pretraining_loader_gives_full_batches_only(data, tmp_path, images, batch, expected):
    """The last partial batch is dropped (SimCLR wants full batches, and a graph has one shape); with
    fewer images than a batch, the one batch of all of them, the same every epoch."""
    args = ssl_args(data, tmp_path, "--batch_size", str(batch))
    args.num_workers = 0
    files = image_io.list_images(data)[:images]
    one_process = distributed.Dist(distributed=False, rank=0, world_size=1, is_main=True, device=torch.device("cpu"))
    _, loader = train_ssl.build_loader(args, files, training_run.Runtime(one_process, None, "cpu", "fp32"))
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert [len(b[0]) for b in loader] == expected


# ============ train_ssl.py --cuda_graphs on, on the CPU ============

def test_the_static_step_pretrains_as_the_eager_step_does(data, tmp_path, no_plots):
    """On a CPU the generator continues the global stream, so the capture-friendly step sees the eager
    step's views: the same losses, up to LARS's tensor learning rate's rounding."""
    train_ssl.main(ssl_args(data, tmp_path / "eager", "--num_epochs", "1"))
    train_ssl.main(ssl_args(data, tmp_path / "static", "--num_epochs", "1", "--cuda_graphs", "on"))
    assert history_losses(tmp_path / "static") == pytest.approx(history_losses(tmp_path / "eager"), rel=1e-5)
    settings = (tmp_path / "static" / "ssl_settings.json").read_text()
    assert "no CUDA on cpu: the capture-friendly step runs without a graph" in settings


def test_resume_restores_the_augmentation_generator_bit_identically(data, tmp_path, monkeypatch, no_plots):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_ssl.main(ssl_args(data, full, "--cuda_graphs", "on"))
    real_epoch = training.train_one_epoch
    seen = {}

    def stop_in_epoch_2(*a, **k):
        if k["epoch"] == 1:
            seen["generator"] = k["step_fn"] is not None
            raise KeyboardInterrupt
        return real_epoch(*a, **k)
    monkeypatch.setattr(training, "train_one_epoch", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_ssl.main(ssl_args(data, cut, "--cuda_graphs", "on"))
    monkeypatch.setattr(training, "train_one_epoch", real_epoch)
    saved = torch.load(cut / "last_ssl_checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["augment_rng"].dtype == torch.uint8 and seen["generator"]

    train_ssl.main(ssl_args(data, cut, "--cuda_graphs", "on", "--resume"))
    a, b = (torch.load(d / "last_ssl_checkpoint.pth", weights_only=True) for d in (full, cut))
    assert torch.equal(a["augment_rng"], b["augment_rng"]) and not torch.equal(a["augment_rng"],
                                                                                saved["augment_rng"])
    for part in ("encoder", "projector"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert history_losses(cut) == history_losses(full)


@pytest.mark.parametrize("extra, message", [(("--augment", "pil"), "--augment pil"), (("--compile",), "--compile")])
def test_cuda_graphs_refuses_what_it_cannot_capture(data, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        utils.run_cli(train_ssl.main, train_ssl.get_args_parser(),
                      ["--data_dir", data, "--output_dir", str(tmp_path), "--device", "cpu", "--cuda_graphs", "on",
                       "--image_size", "16", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0] and "--cuda_graphs on" in err[0]


# ============ on a GPU: the captured step ============

def graphed_and_static(steps: int, dtype):
    """Losses of `steps` steps of the same model from the same weights and generator seed, captured and not."""
    losses = {}
    images = torch.randint(0, 256, (steps, 16, 1, 40, 40), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).cuda()
    for capture in (False, True):
        torch.manual_seed(0)
        model = SimCLR(ModelConfig(small_stem=True)).cuda().to(memory_format=torch.channels_last)
        optimizer = optimizers.LARS(optimizers.split_decay_groups(model, 1e-6), lr=0.3)
        scheduler = optimizers.warmup_cosine(optimizer, 2, steps)
        optimizers.lr_on_device(optimizer, torch.device("cuda"))
        step = train_ssl.make_static_step(model, BatchAugment(SSL_AUGMENT, 32, channels_last=True), optimizer,
                                          torch.Generator("cuda").manual_seed(5), 0.5, torch.device("cuda"),
                                          dtype, capture=capture)
        out, collapse = [], []
        for i in range(steps):
            loss, _ = step((images[i],), collapse)
            out.append(loss.clone())
            scheduler.step()
        losses[capture] = torch.stack(out).cpu()
    return losses[False], losses[True]


@needs_cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_captured_step_trains_as_the_uncaptured_one(dtype):
    """The same random numbers (the generator's state advances by the graph's offsets) and the same
    arithmetic: the losses of 8 steps, 3 warm-up, 1 capture and 4 replays, agree up to cuDNN's noise."""
    static, graphed = graphed_and_static(8, dtype)
    torch.testing.assert_close(graphed, static, rtol=2e-2 if dtype else 2e-3, atol=1e-3)
    assert len(set(graphed.tolist())) == 8                         # the replays really train: losses move


@needs_cuda
def test_the_captured_step_refuses_a_batch_of_another_shape():
    step = training.CapturedStep(lambda x: (x.float().sum(),), torch.optim.SGD([torch.zeros(1, device="cuda")], lr=0.1),
                              capture=True, warmup=1)
    for _ in range(3):
        step(torch.ones(4, device="cuda"))
    with pytest.raises(RuntimeError, match="drop the last partial batch"):
        step(torch.ones(3, device="cuda"))


@needs_cuda
def test_train_ssl_with_cuda_graphs_on_a_gpu_runs_and_resumes(data, tmp_path):
    out = tmp_path / "graphs"
    train_ssl.main(ssl_args(data, out, "--cuda_graphs", "on", "--num_epochs", "3", device="cuda"))
    losses = history_losses(out)
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert "replayed from one CUDA graph" in (out / "ssl_settings.json").read_text()
    train_ssl.main(ssl_args(data, out, "--cuda_graphs", "on", "--num_epochs", "4", "--resume", device="cuda"))
    assert len(history_losses(out)) == 4
