"""torchrun on CPU with gloo and 2 processes: the global NT-Xent is exact, a frozen encoder stays frozen
under DDP, and both scripts run and write one set of outputs.

The exactness tests run one step of a small linear model on 2 x N embeddings in two processes and compare
the loss and every gradient with one single-process step on the 2N images; two naive ports (local negatives
only, and a gather that drops the other processes' gradients) must fail the same comparison.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import distributed
import training
from model_ssl import nt_xent_loss
from tiny_data import write_tiny_dataset

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD, N, D_IN, D, TEMPERATURE = 2, 4, 6, 5, 0.5
VARIANTS = ("exact", "local_negatives", "gather_without_grad")


# ============ one step, single process and distributed ============

def make_problem():
    """Two views (x1, x2) of WORLD * N inputs and a linear projection, identical in every process."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(WORLD * N, D_IN, generator=g), torch.randn(WORLD * N, D_IN, generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return x1, x2, nn.Linear(D_IN, D)


def one_step(model, x1, x2, loss_of):
    """Forward both views at once (as train_ssl does), backward; returns loss and gradients."""
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)
    z1.retain_grad()
    z2.retain_grad()
    loss = loss_of(z1, z2)
    loss.backward()
    params = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"loss": loss.item(), "z1_grad": z1.grad.clone(), "z2_grad": z2.grad.clone(),
            "weight_grad": params.weight.grad.clone(), "bias_grad": params.bias.grad.clone()}


def gather_without_grad(z, rank):
    """A common port's gather: other processes' rows arrive as constants, only this process's keep a graph."""
    parts = [torch.empty_like(z) for _ in range(WORLD)]
    dist.all_gather(parts, z.detach().contiguous())
    parts[rank] = z
    return torch.cat(parts)


def distributed_loss(variant, rank):
    def loss_of(z1, z2):
        if variant == "local_negatives":
            return nt_xent_loss(z1, z2, TEMPERATURE)
        gather = distributed.all_gather_with_grad if variant == "exact" else (lambda z: gather_without_grad(z, rank))
        return nt_xent_loss(z1, z2, TEMPERATURE, gather(z1), gather(z2), offset=rank * N)
    return loss_of


class TinyClassifier(nn.Module):
    """The shape of model_ssl.Classifier (an encoder and a head), small enough to step in milliseconds."""

    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(D_IN, D), nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def freeze_then_unfreeze(rank, info):
    """fine_tune.py's pattern: DDP built while all parameters train, one step frozen, one step unfrozen."""
    torch.manual_seed(2)
    model, x, y = TinyClassifier(), torch.randn(WORLD * N, D_IN), torch.arange(WORLD * N) % 3
    rows = slice(rank * N, (rank + 1) * N)
    ddp = distributed.wrap_ddp(model, info, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.encoder.requires_grad_(False)
    nn.functional.cross_entropy(ddp(x[rows]), y[rows]).backward()
    optimizer.step()
    out = {"frozen_grad_is_none": model.encoder.weight.grad is None,
           "encoder_unchanged": all(torch.equal(before[k], v) for k, v in model.state_dict().items()
                                    if k.startswith("encoder")),
           "head_changed": not torch.equal(before["head.weight"], model.head.weight)}
    model.encoder.requires_grad_(True)
    optimizer.zero_grad()
    local = torch.autograd.grad(nn.functional.cross_entropy(model(x[rows]), y[rows]), model.encoder.weight)[0]
    nn.functional.cross_entropy(ddp(x[rows]), y[rows]).backward()
    return {**out, "local_encoder_grad": local, "ddp_encoder_grad": model.encoder.weight.grad.clone()}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)                       # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    info = distributed.Dist(distributed=True, rank=rank, world_size=WORLD, is_main=rank == 0, device=torch.device("cpu"))
    results = {"freeze": freeze_then_unfreeze(rank, info)}
    for variant in VARIANTS:
        x1, x2, model = make_problem()
        if rank == 1:                              # DDP must replace this with rank 0's weights
            nn.init.zeros_(model.weight)
        ddp = distributed.wrap_ddp(model, info)
        rows = slice(rank * N, (rank + 1) * N)
        r = one_step(ddp, x1[rows], x2[rows], distributed_loss(variant, rank))
        r["global_loss"] = distributed.all_reduce_mean(r["loss"], info)
        results[variant] = r
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def start(fn, args, timeout=120):
    """WORLD processes with a deadline, so a hanging collective fails the test instead of the run.

    Forked rather than spawned: a spawned child spends ~10 s importing torch and torchvision again."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {timeout} s (a collective hangs?)")


def _nan_on_one_rank(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    loss_sum = torch.tensor(float("nan") if rank == 1 else 2.0)
    try:
        training._finite_mean_loss(loss_sum, 4, epoch=2)
        message = "no error"
    except training.NonFiniteLossError as e:
        message = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_a_nan_loss_in_one_process_stops_every_process(tmp_path):
    """Otherwise the others would wait forever in the next all-gather for the one that stopped."""
    start(_nan_on_one_rank, (str(tmp_path / "rendezvous"), str(tmp_path)), timeout=60)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert messages[1].startswith("the loss became nan in epoch 3; lower --lr")
    assert messages[0].startswith("the loss became nan in epoch 3 (in another process); lower --lr")


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_step")
    start(_worker, (str(folder / "rendezvous"), str(folder)))
    per_rank = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x1, x2, model = make_problem()
    single = one_step(model, x1, x2, lambda z1, z2: nt_xent_loss(z1, z2, TEMPERATURE))
    return single, per_rank


def close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def grads_match(single, per_rank, variant):
    """Embedding grads: each process's part, divided by WORLD (its loss is a mean over 1/WORLD of the anchors,
    and the gather sums the processes' gradients), equals the single-process rows; parameters after DDP's
    averaging equal the single-process grads on every rank."""
    for rank, results in enumerate(per_rank):
        r, rows = results[variant], slice(rank * N, (rank + 1) * N)
        if not (close(r["z1_grad"] / WORLD, single["z1_grad"][rows]) and
                close(r["z2_grad"] / WORLD, single["z2_grad"][rows])):
            return False
        if not (close(r["weight_grad"], single["weight_grad"]) and close(r["bias_grad"], single["bias_grad"])):
            return False
    return True


def test_distributed_nt_xent_equals_the_single_process_loss(steps):
    single, per_rank = steps
    for results in per_rank:
        assert results["exact"]["global_loss"] == pytest.approx(single["loss"], rel=1e-6)
    # each process's loss is over its own anchors only: they differ, and only their mean is the global loss
    assert per_rank[0]["exact"]["loss"] != pytest.approx(per_rank[1]["exact"]["loss"], rel=1e-4)


def test_distributed_gradients_equal_the_single_process_gradients(steps):
    single, per_rank = steps
    assert grads_match(single, per_rank, "exact")


def test_naive_ports_are_caught_by_the_same_comparison(steps):
    single, per_rank = steps
    local = per_rank[0]["local_negatives"]["global_loss"]
    assert abs(local - single["loss"]) > 1e-3                              # fewer negatives: another loss
    assert not grads_match(single, per_rank, "local_negatives")
    no_grad = per_rank[0]["gather_without_grad"]
    assert no_grad["global_loss"] == pytest.approx(single["loss"], rel=1e-6)   # same loss ...
    assert not grads_match(single, per_rank, "gather_without_grad")        # ... wrong gradients


def test_ddp_keeps_a_frozen_encoder_frozen_and_syncs_it_once_unfrozen(steps):
    _, per_rank = steps
    r0, r1 = (results["freeze"] for results in per_rank)
    for r in (r0, r1):
        assert r["frozen_grad_is_none"] and r["encoder_unchanged"] and r["head_changed"]
    assert not torch.allclose(r0["local_encoder_grad"], r1["local_encoder_grad"])    # the shards differ ...
    mean = (r0["local_encoder_grad"] + r1["local_encoder_grad"]) / 2
    assert close(r0["ddp_encoder_grad"], mean) and close(r1["ddp_encoder_grad"], mean)  # ... DDP averages them


# ============ the scripts under torchrun ============

def torchrun(script, *args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           os.path.join(ROOT, script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_ddp"), n=16, size=32, classes=2, splits=(10, 3))


@pytest.fixture(scope="module")
def pretrained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl_ddp")
    stdout = torchrun("train_ssl.py", "--data_dir", tiny, "--output_dir", out, "--image_size", 32,
                      "--num_epochs", 2, "--batch_size", 8, "--device", "cpu", "--warmup_epochs", 1)
    return out, stdout


def test_train_ssl_under_torchrun_writes_one_set_of_outputs(pretrained):
    out, stdout = pretrained
    assert sorted(os.listdir(out)) == ["best_ssl_model.pth", "last_ssl_checkpoint.pth", "ssl_history.csv",
                                       "ssl_settings.json", "ssl_training.png"]
    assert stdout.count("== SimCLR pretraining ==") == 1 and stdout.count("epoch 2/2") == 1  # rank 0 only
    with open(out / "ssl_history.csv") as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["1", "2"]
    last = load(out / "last_ssl_checkpoint.pth")
    assert last["epoch"] == 2 and last["world_size"] == 2
    assert not any(k.startswith("module.") for part in ("encoder", "projector") for k in last[part])
    assert len(last["rng_per_rank"]) == 2                    # each process gets its own stream back on --resume
    assert not torch.equal(last["rng_per_rank"][0]["torch"], last["rng_per_rank"][1]["torch"])


def test_fine_tune_under_torchrun_freezes_then_unfreezes_and_writes_one_set(pretrained, tiny, tmp_path):
    ssl_dir, _ = pretrained
    stdout = torchrun("fine_tune.py", "--data_dir", tiny, "--label_file", os.path.join(tiny, "labels.csv"),
                      "--output_dir", tmp_path, "--ssl_checkpoint", ssl_dir / "best_ssl_model.pth", "--batch_size", 4,
                      "--num_epochs", 2, "--device", "cpu", "--freeze_encoder", "--unfreeze_after_epoch", 1)
    assert sorted(os.listdir(tmp_path)) == ["best_finetuned_model.pth", "finetuned_history.csv",
                                            "finetuned_settings.json", "finetuned_training.png",
                                            "last_finetuned_checkpoint.pth"]
    assert stdout.count("epoch 2/2") == 1 and stdout.count("done:") == 1            # rank 0 only
    last = load(tmp_path / "last_finetuned_checkpoint.pth")
    assert last["epoch"] == 2 and last["world_size"] == 2 and len(last["rng_per_rank"]) == 2
    assert not any(k.startswith("module.") for part in ("encoder", "head") for k in last[part])
    ssl = load(ssl_dir / "best_ssl_model.pth")["encoder"]
    assert not all(torch.equal(ssl[k], last["encoder"][k]) for k in ssl)   # trained once unfrozen
    with open(tmp_path / "finetuned_history.csv") as f:
        header, *rows = f.read().split()
    frozen_col = header.split(",").index("encoder_frozen")
    assert [r.split(",")[frozen_col] for r in rows] == ["1", "0"]
