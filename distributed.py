"""torchrun support: joining the process group, DDP and SyncBatchNorm, gathering embeddings with their
gradients, averaging values over the processes and keeping each process's random stream.
"""
import dataclasses
import os

import torch
import torch.nn as nn

from checkpoints import rng_states, set_rng_states
from utils import UserError, resolve_device, seed_everything


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


def restore_rank_rng(per_rank: list | None, dist_info: Dist, fallback_seed: int) -> None:
    """After every process was given rank 0's RNGs on resume, give each its own stream back (`per_rank`: the
    saved states of every process, or None)."""
    if not dist_info.distributed:
        return
    if per_rank is not None and len(per_rank) == dist_info.world_size:
        set_rng_states(per_rank[dist_info.rank])
    elif dist_info.rank > 0:
        seed_everything(fallback_seed + dist_info.rank)


def reduce_epoch_stats(stats: dict, dist: Dist):
    """An epoch's loss and speed over all processes, and every process's RNG states for rank 0's checkpoint."""
    stats["loss"] = all_reduce_mean(stats["loss"], dist)
    stats["images_per_sec"] = all_reduce_mean(stats["images_per_sec"], dist) * dist.world_size
    return stats, gather_rng_states(dist)
