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

Both optimizers share the interface the training loop drives each step: `reduce_gradients()`
(ZeRO: steps 1-2 above; plain AdamW: nothing), `gradient_pieces()` (the gradient this rank holds,
as flat slices of the concatenated parameters, for the global norm: `runtime.grad_norm`),
`scale_gradients(factor)` (clipping), `lr` (set from the schedule), `step()`, `zero_grad()`, and
for checkpoints `export_state()` / `import_state(state)` (an `OptimizerState`: the moments of
each whole local parameter, whatever the sharding; ZeRO-1 all-gathers them over the data group)
and, for the fp32 master weights of bf16 training, `ZeroOneAdamW.master_weights()`.
Weight decay is applied only to parameters for which `decays(param)` is true (`decay_matrices`:
Megatron-LM's and nanoGPT's rule, no decay on biases and norm weights; default: every parameter).

The AdamW update itself (`adamw_update_`) is written out here rather than taken from
torch.optim: the same elementwise arithmetic as torch's single-tensor AdamW, but without
torch.optim's first-use import of torch._dynamo (seconds per spawned rank on a small CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from modelpar.runtime.data_parallel import MAIN_GRAD, default_grad_of

GradientPiece = tuple[int, torch.Tensor]
"""(flat offset, 1-D gradient values): a slice of the concatenation of the optimizer's parameters."""


@dataclass(frozen=True)
class OptimizerState:
    """The Adam state of an optimizer's parameters, for checkpoints: one fp32 tensor per parameter,
    shaped like it, in the optimizer's parameter order; `steps`: AdamW steps taken (t of the bias
    corrections 1 - b^t)."""

    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    steps: int

    def check(self, params: Sequence[torch.Tensor]) -> None:
        for name, tensors in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
                raise ValueError(f"optimizer state: {name} does not match the parameters' shapes")


def decay_matrices(param: torch.Tensor) -> bool:
    """Weight decay for weight matrices and embeddings only, not for biases and norm weights (any
    parameter of fewer than 2 dims): Megatron-LM's default ``no_weight_decay_cond`` and nanoGPT's
    ``configure_optimizers``."""
    return param.dim() >= 2


def decay_everything(param: torch.Tensor) -> bool:
    return True


def flat_offsets(params: Sequence[torch.Tensor]) -> list[int]:
    """Offset of each parameter in the concatenation of `params` (flattened, in order)."""
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += param.numel()
    return offsets


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
    moments, the update of `adamw_update_`. `lr` can be changed between steps. Weight decay
    applies to the parameters for which `decays(param)` holds."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 decays: Callable[[torch.Tensor], bool] = decay_everything) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.decayed = [bool(decays(p)) for p in self.params]
        self.offsets = flat_offsets(self.params)
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def optimizer_state_bytes(self) -> int:
        return sum(2 * m.numel() * m.element_size() for m in self.exp_avg)

    def reduce_gradients(self) -> None:
        """Nothing to do: the gradients were reduced during backward (`GradientReducer`)."""

    def gradient_pieces(self) -> list[GradientPiece]:
        return [(offset, grad.reshape(-1)) for offset, grad in zip(self.offsets, map(default_grad_of, self.params))
                if grad is not None]

    @torch.no_grad()
    def scale_gradients(self, factor: float) -> None:
        for param in self.params:
            grad = default_grad_of(param)
            if grad is not None:
                grad.mul_(factor)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for param, decayed, exp_avg, exp_avg_sq in zip(self.params, self.decayed, self.exp_avg, self.exp_avg_sq):
            grad = default_grad_of(param)
            if grad is not None:
                adamw_update_(param, grad, exp_avg, exp_avg_sq, self.steps, self.lr, self.betas, self.eps,
                              self.weight_decay if decayed else 0.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _zero_grads(self.params, set_to_none)

    def export_state(self) -> OptimizerState:
        """The moments of every parameter (copied by the checkpoint's gather)."""
        return OptimizerState([m.detach().float() for m in self.exp_avg], [v.detach().float() for v in self.exp_avg_sq],
                              self.steps)

    @torch.no_grad()
    def import_state(self, state: OptimizerState) -> None:
        """Continue from `state` (moments copied into this optimizer's own tensors)."""
        state.check(self.params)
        for targets, sources in ((self.exp_avg, state.exp_avg), (self.exp_avg_sq, state.exp_avg_sq)):
            for target, source in zip(targets, sources):
                target.copy_(source)
        self.steps = state.steps


def _zero_grads(params: Sequence[nn.Parameter], set_to_none: bool) -> None:
    """Clear ``.grad`` and, in bf16 training, the fp32 ``main_grad``."""
    for param in params:
        if set_to_none:
            param.grad = None
            if hasattr(param, MAIN_GRAD):
                setattr(param, MAIN_GRAD, None)
            continue
        for grad in (param.grad, getattr(param, MAIN_GRAD, None)):
            if grad is not None:
                grad.zero_()


class ZeroOneAdamW:
    """AdamW over `params` with fp32 master weights and moments sharded over `group`.

    Each rank owns the contiguous slice [k * n, (k + 1) * n) of the flattened parameters,
    n = ceil(N / d). `grad_of(param)` is the gradient to use (local, not yet averaged: this
    optimizer does the data-parallel reduction itself; default: ``main_grad`` in bf16 training,
    else ``.grad``). `group=None` means no sharding and no reduction (the gradients are used as
    they are). Weight decay applies to the elements of parameters for which `decays(param)` holds.
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
        decays: Callable[[torch.Tensor], bool] = decay_everything,
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
        self.shard_start = self.rank * self.shard_numel
        self.master_shard = self._shard_of(self.params, device)
        self.exp_avg = torch.zeros_like(self.master_shard)
        self.exp_avg_sq = torch.zeros_like(self.master_shard)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.decayed_ranges = self._shard_ranges([decays(p) for p in self.params])
        self.steps = 0
        self._shard_grad: torch.Tensor | None = None  # this step's reduced gradient shard

    def _shard_ranges(self, selected: Sequence[bool]) -> list[tuple[int, int]]:
        """Merged [start, end) ranges, in shard coordinates, of the elements of selected parameters."""
        ranges: list[tuple[int, int]] = []
        end_of_shard = self.shard_start + self.shard_numel
        for param, offset, chosen in zip(self.params, flat_offsets(self.params), selected):
            start, end = max(offset, self.shard_start), min(offset + param.numel(), end_of_shard)
            if not chosen or end <= start:
                continue
            start, end = start - self.shard_start, end - self.shard_start
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        return ranges

    def optimizer_state_bytes(self) -> int:
        """Bytes of fp32 master weights + Adam moments held by this rank (12 / d per parameter)."""
        return 3 * 4 * self.shard_numel

    @torch.no_grad()
    def _shard_of(self, tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
        """This rank's slice (fp32) of the concatenation of `tensors` (shaped like the parameters)."""
        flat = torch.zeros(self.padded_numel, dtype=torch.float32, device=device)
        for offset, tensor in zip(flat_offsets(self.params), tensors):
            flat[offset: offset + tensor.numel()].copy_(tensor.detach().reshape(-1))
        return flat[self.shard_start: self.shard_start + self.shard_numel].clone()

    @torch.no_grad()
    def _whole(self, shard: torch.Tensor) -> list[torch.Tensor]:
        """Every parameter's part of a flat sharded vector (all-gathered over the group: collective),
        shaped like the parameter."""
        if self.world_size > 1:
            full = torch.empty(self.padded_numel, dtype=shard.dtype, device=shard.device)
            _all_gather(full, shard.contiguous(), self.group)
        else:
            full = shard
        return [full[offset: offset + param.numel()].view(param.shape).clone()
                for offset, param in zip(flat_offsets(self.params), self.params)]

    def export_state(self) -> OptimizerState:
        """The whole moments of this rank's parameters. Collective over the data group."""
        return OptimizerState(self._whole(self.exp_avg), self._whole(self.exp_avg_sq), self.steps)

    def master_weights(self) -> list[torch.Tensor]:
        """The fp32 master weights of this rank's parameters. Collective over the data group."""
        return self._whole(self.master_shard)

    @torch.no_grad()
    def import_state(self, state: OptimizerState) -> None:
        """Take this rank's slice of whole per-parameter moments (the master weights come from the
        parameters at construction)."""
        state.check(self.params)
        self.exp_avg.copy_(self._shard_of(state.exp_avg, self.exp_avg.device))
        self.exp_avg_sq.copy_(self._shard_of(state.exp_avg_sq, self.exp_avg_sq.device))
        self.steps = state.steps

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
    def reduce_gradients(self) -> torch.Tensor:
        """Steps 1-2: flatten the local gradients and reduce-scatter their data-parallel mean; this
        rank's fp32 shard is kept for `step` (idempotent within a step)."""
        if self._shard_grad is None:
            flat_grads = self._flat_grads()
            if self.world_size > 1:
                shard_grad = torch.empty(self.shard_numel, dtype=torch.float32, device=flat_grads.device)
                _reduce_scatter(shard_grad, flat_grads, self.group)
                self._shard_grad = shard_grad.div_(self.world_size)
            else:
                self._shard_grad = flat_grads
        return self._shard_grad

    def gradient_pieces(self) -> list[GradientPiece]:
        """This rank's shard of the reduced gradient (call `reduce_gradients` first), without the
        padding past the last parameter."""
        shard = self.reduce_gradients()
        return [(self.shard_start, shard[: max(0, min(self.shard_numel, self.numel - self.shard_start))])]

    @torch.no_grad()
    def scale_gradients(self, factor: float) -> None:
        self.reduce_gradients().mul_(factor)

    @torch.no_grad()
    def step(self) -> None:
        shard_grad = self.reduce_gradients()
        self._shard_grad = None
        self.steps += 1
        decay = 1 - self.lr * self.weight_decay
        for start, end in self.decayed_ranges:  # decoupled decay first, as in `adamw_update_`
            self.master_shard[start:end].mul_(decay)
        adamw_update_(self.master_shard, shard_grad, self.exp_avg, self.exp_avg_sq, self.steps, self.lr,
                      self.betas, self.eps, 0.0)
        if self.world_size > 1:
            full = torch.empty(self.padded_numel, dtype=torch.float32, device=shard_grad.device)
            _all_gather(full, self.master_shard, self.group)
        else:
            full = self.master_shard
        offset = 0
        for param in self.params:
            param.copy_(full[offset: offset + param.numel()].view_as(param))
            offset += param.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._shard_grad = None
        _zero_grads(self.params, set_to_none)
