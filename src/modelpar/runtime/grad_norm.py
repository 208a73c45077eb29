"""The global gradient norm over a tensor x pipeline x data layout, and clipping by it.

The norm is the serial model's, ||g|| = sqrt(sum over its parameters p of sum(g_p^2)), computed
from the pieces the ranks hold without gathering them, each serial element counted exactly once.
Each rank sums the squares of its gradient elements, weighted by `norm_ranges`:

- tensor-sharded parameters (`ShardLayout`): weight 1, except indices held by c > 1 tensor
  ranks (K/V heads replicated when t > KV groups), weight 1 / c on each holder;
- parameters replicated over the tensor group (norm weights, row-parallel biases, learned
  positions; identical on every tensor rank once `sync_tensor_parallel_grads` ran): weight 1 on
  tensor rank 0, 0 elsewhere;
- the tied word embedding's copy on the last pipeline stage (p > 1; equal to the first stage's
  after the embedding-group all-reduce): weight 0;
- vocabulary padding rows count, but their gradient is exactly zero.

The weighted sums are then all-reduced: over the model group (t x p ranks of one data replica)
when the data replicas hold identical, already averaged gradients; over the whole world with
ZeRO-1, where data rank k holds shard k of the averaged gradient (the shards are disjoint).
This is Megatron-LM's ``get_grad_norm_fp32`` (which skips tensor-parallel duplicates with
``param_is_not_tensor_parallel_duplicate`` and the shared embedding copy), generalised to
replicated KV heads.

Clipping by global norm (Pascanu et al. 2013, "On the difficulty of training recurrent neural
networks", Sec. 3.2; Megatron's ``clip_grad_by_total_norm_fp32``, torch's ``clip_grad_norm_``):
g <- g * max_norm / (||g|| + 1e-6) when that factor is below 1.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

CLIP_EPSILON = 1e-6


@dataclass(frozen=True)
class WeightedRange:
    """Elements [start, end) of the concatenation of a rank's parameters (flattened, in order),
    each counted `weight` times in the global sum of squares."""

    start: int
    end: int
    weight: float


def _element_weights(param: torch.Tensor, layout, tensor_rank: int) -> torch.Tensor | None:
    """Per-element weights of a sharded parameter with replicated indices (None: all 1)."""
    if layout is None or layout.replicated.numel() == 0:
        return None
    counts = torch.bincount(torch.cat(layout.indices), minlength=layout.full_size)
    mine = layout.indices[tensor_rank]
    along = torch.ones(param.shape[layout.dim], dtype=torch.float64)
    along[: len(mine)] = 1.0 / counts[mine].double()
    shape = [1] * param.dim()
    shape[layout.dim] = -1
    return along.view(shape).expand(param.shape).reshape(-1)


def _runs(weights: torch.Tensor, offset: int) -> list[WeightedRange]:
    """Run-length encoding of a weight vector into WeightedRanges starting at `offset`."""
    changes = torch.nonzero(weights[1:] != weights[:-1]).flatten().add(1).tolist()
    bounds = [0, *changes, weights.numel()]
    return [WeightedRange(offset + a, offset + b, float(weights[a])) for a, b in zip(bounds, bounds[1:])]


def norm_ranges(params: Sequence[torch.Tensor], layouts: dict[int, object], tensor_rank: int,
                excluded: Iterable[torch.Tensor] = ()) -> tuple[WeightedRange, ...]:
    """The counting weights (module docstring) of `params` on this rank, as sorted, disjoint ranges
    of their concatenation (zero-weight elements are left out). `layouts`: {id(param): ShardLayout}
    of the tensor-sharded ones; `excluded`: parameters counted on another rank (tied copies)."""
    excluded_ids = {id(param) for param in excluded}
    ranges: list[WeightedRange] = []
    offset = 0
    for param in params:
        layout = layouts.get(id(param))
        if id(param) in excluded_ids or (layout is None and tensor_rank != 0):
            pieces = []
        else:
            weights = _element_weights(param, layout, tensor_rank)
            pieces = [WeightedRange(offset, offset + param.numel(), 1.0)] if weights is None else _runs(weights, offset)
        for piece in pieces:
            if ranges and ranges[-1].end == piece.start and ranges[-1].weight == piece.weight:
                ranges[-1] = WeightedRange(ranges[-1].start, piece.end, piece.weight)
            else:
                ranges.append(piece)
        offset += param.numel()
    return tuple(ranges)


def weighted_square_sum(pieces: Iterable[tuple[int, torch.Tensor]], ranges: Sequence[WeightedRange]) -> torch.Tensor:
    """sum over ranges of weight * sum(values^2), for gradient `pieces` given as (flat offset, 1-D
    values) of the same concatenation; fp64 scalar (each range's sum is taken in fp32)."""
    starts = [r.start for r in ranges]
    total = None
    for offset, values in pieces:
        end = offset + values.numel()
        first = max(0, bisect.bisect_right(starts, offset) - 1)
        for r in ranges[first:]:
            if r.start >= end:
                break
            lo, hi = max(r.start, offset) - offset, min(r.end, end) - offset
            if hi <= lo:
                continue
            segment = values[lo:hi].float()
            term = torch.dot(segment, segment).double() * r.weight
            total = term if total is None else total + term
        if total is None:
            total = torch.zeros((), dtype=torch.float64, device=values.device)
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def global_grad_norm(pieces: Iterable[tuple[int, torch.Tensor]], ranges: Sequence[WeightedRange], group,
                     device) -> float:
    """sqrt of the all-reduced weighted sum of squares over `group` (None: the whole world). Collective."""
    total = weighted_square_sum(pieces, ranges).reshape(1).to(device)
    dist.all_reduce(total, group=group)
    return math.sqrt(float(total.item()))


def clip_factor(norm: float, max_norm: float) -> float:
    """The factor that clips a gradient of global norm `norm` to `max_norm` (1.0: no clipping)."""
    return min(1.0, max_norm / (norm + CLIP_EPSILON))
