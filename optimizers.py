"""Optimizers and schedules of the two trainers: LARS (SimCLR's), the warm-up + cosine schedule, weight-decay
groups, and learning rates kept on the device for a captured step.
"""
import math

import torch
import torch.nn as nn


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
    loop makes more operator calls a step for ResNet-18 + projector than the model's forward and backward,
    each a kernel launch, and steps of a few dozen small images are launch-bound (docs/performance.md).
    On a CPU the loop is kept (`foreach=None` chooses): there foreach falls back to a slower loop of its
    own (docs/performance.md). Both give bit-identical results on the CPU (tests).

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
