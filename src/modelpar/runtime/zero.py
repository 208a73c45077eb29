"""ZeRO stage 1: AdamW whose optimizer states are sharded over the data-parallel group.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
Sec. 5.1 (P_os): with d replicas each rank keeps the fp32 master weights and the two Adam moments
of only 1/d of the parameters, cutting optimizer-state memory from 12 to 12/d bytes per parameter.

One step, per rank k of the data group:

1. flatten the local gradients into one fp32 vector G (padded to a multiple of d);
2. reduce-scatter: rank k receives slice k of sum_j G_j, divided by d (the data-parallel mean);
3. AdamW on slice k of the flat fp32 master weights (AdamW is elementwise, so stepping a slice
   is exactly stepping those elements of the full vector);
4. all-gather the updated slices and copy them into the model's parameters (cast to their dtype:
   in bf16 mode this is the bf16 compute copy of the fp32 master, Micikevicius et al. 2018).

The result equals plain data parallelism with AdamW on every rank (tested). The reduce-scatter
is not overlapped with backward here (DeepSpeed overlaps it at stage 2); with d == 1 the class
is a flat-master AdamW, which the bf16 mode uses as its fp32 master optimizer.

The AdamW update itself (`adamw_update_`) is written out here rather than taken from
torch.optim: the same elementwise arithmetic as torch's single-tensor AdamW, but without
torch.optim's first-use import of torch._dynamo (seconds per spawned rank on a small CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from modelpar.runtime.data_parallel import default_grad_of


def _reduce_scatter(output: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup) -> None:
    collective = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    collective(output, flat, group=group)


def _all_gather(output: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup) -> None:
    collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    collective(output, shard, group=group)


@torch.no_grad()
def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step in place (Loshchilov & Hutter 2019, Algorithm 2: decoupled weight decay):

        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    in the operation order of torch.optim.AdamW's single-tensor path.
    """
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denominator, value=-lr / bias_correction1)


class AdamW:
    """Plain AdamW on the parameters themselves (fp32 training without ZeRO): per-parameter
    moments, the update of `adamw_update_`. `lr` can be changed between steps."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def optimizer_state_bytes(self) -> int:
        return sum(2 * m.numel() * m.element_size() for m in self.exp_avg)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if param.grad is not None:
                adamw_update_(param, param.grad, exp_avg, exp_avg_sq, self.steps, self.lr, self.betas, self.eps,
                              self.weight_decay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _zero_grads(self.params, set_to_none)


def _zero_grads(params: Sequence[nn.Parameter], set_to_none: bool) -> None:
    for param in params:
        if set_to_none:
            param.grad = None
        elif param.grad is not None:
            param.grad.zero_()


class ZeroOneAdamW:
    """AdamW over `params` with fp32 master weights and moments sharded over `group`.

    Each rank owns the contiguous slice [k * n, (k + 1) * n) of the flattened parameters,
    n = ceil(N / d). `grad_of(param)` is the gradient to use (local, not yet averaged: this
    optimizer does the data-parallel reduction itself). `group=None` means no sharding and no
    reduction (the gradients are used as they are).
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        group: dist.ProcessGroup | None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_of: Callable[[nn.Parameter], torch.Tensor | None] = default_grad_of,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.grad_of = grad_of
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        device = self.params[0].device if self.params else torch.device("cpu")
        self.numel = sum(p.numel() for p in self.params)
        self.shard_numel = -(-self.numel // self.world_size) if self.numel else 0
        self.padded_numel = self.shard_numel * self.world_size
        full = torch.zeros(self.padded_numel, dtype=torch.float32, device=device)
        self._copy_params_into(full)
        start = self.rank * self.shard_numel
        self.master_shard = full[start: start + self.shard_numel].clone()
        self.exp_avg = torch.zeros_like(self.master_shard)
        self.exp_avg_sq = torch.zeros_like(self.master_shard)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.steps = 0

    def optimizer_state_bytes(self) -> int:
        """Bytes of fp32 master weights + Adam moments held by this rank (12 / d per parameter)."""
        return 3 * 4 * self.shard_numel

    def _copy_params_into(self, flat: torch.Tensor) -> None:
        offset = 0
        for param in self.params:
            flat[offset: offset + param.numel()].copy_(param.detach().reshape(-1))
            offset += param.numel()

    def _flat_grads(self) -> torch.Tensor:
        flat = torch.zeros(self.padded_numel, dtype=torch.float32, device=self.master_shard.device)
        offset = 0
        for param in self.params:
            grad = self.grad_of(param)
            if grad is not None:
                flat[offset: offset + param.numel()].copy_(grad.reshape(-1))
            offset += param.numel()
        return flat

    @torch.no_grad()
    def step(self) -> None:
        flat_grads = self._flat_grads()
        if self.world_size > 1:
            shard_grad = torch.empty(self.shard_numel, dtype=torch.float32, device=flat_grads.device)
            _reduce_scatter(shard_grad, flat_grads, self.group)
            shard_grad.div_(self.world_size)
        else:
            shard_grad = flat_grads
        self.steps += 1
        adamw_update_(self.master_shard, shard_grad, self.exp_avg, self.exp_avg_sq, self.steps, self.lr,
                      self.betas, self.eps, self.weight_decay)
        if self.world_size > 1:
            full = torch.empty(self.padded_numel, dtype=torch.float32, device=flat_grads.device)
            _all_gather(full, self.master_shard, self.group)
        else:
            full = self.master_shard
        offset = 0
        for param in self.params:
            param.copy_(full[offset: offset + param.numel()].view_as(param))
            offset += param.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        _zero_grads(self.params, set_to_none)
