"""Differentiable collectives in dual pairs (Shoeybi et al. 2019, Sec. 3, Fig. 3; Korthikanti et al. 2022, Sec. 4.2.2).

Each forward collective's backward is its dual, and every function takes its ``group`` explicitly:

    copy_to_tensor_region     identity   / all-reduce       (Megatron's f)
    reduce_from_tensor_region all-reduce / identity         (Megatron's g)
    scatter_last_dim          take chunk / all-gather       (split a replicated tensor's last dim)
    gather_last_dim           all-gather / take chunk
    all_gather_sequence       all-gather / reduce-scatter   along dim 1 (sequence parallel g)
    reduce_scatter_sequence   reduce-scatter / all-gather   along dim 1 (sequence parallel g-bar)

On a group of size 1 every function is the identity. Outputs never alias inputs that autograd
may still hold, at the price of a copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1


def _size(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split evenly over {world} ranks")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split evenly over {world} ranks")
    chunks = [c.contiguous() for c in x.chunk(world, dim=dim)]
    out = torch.empty_like(chunks[0])
    try:
        dist.reduce_scatter(out, chunks, group=group)
    except (RuntimeError, NotImplementedError) as error:  # older gloo builds lack reduce_scatter
        if "support" not in str(error).lower():
            raise
        out = _chunk(_all_reduce(x, group), dim, group)
    return out


class _CopyToTensorRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _chunk(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _chunk(grad, -1, ctx.group), None


class _AllGatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQUENCE_DIM, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQUENCE_DIM, ctx.group), None


def copy_to_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    """f: identity forward, all-reduce (sum) of the gradient backward. Enters a column-parallel region."""
    return x if _size(group) == 1 else _CopyToTensorRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    """g: all-reduce (sum) forward, identity backward. Leaves a row-parallel region."""
    return x if _size(group) == 1 else _ReduceFromTensorRegion.apply(x, group)


def scatter_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather the gradient backward."""
    return x if _size(group) == 1 else _ScatterLastDim.apply(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather chunks along the last dim forward (rank order); keep this rank's gradient chunk backward."""
    return x if _size(group) == 1 else _GatherLastDim.apply(x, group)


def all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s/t, h] -> [b, s, h] forward; reduce-scatter (sum) of the gradient backward."""
    return x if _size(group) == 1 else _AllGatherSequence.apply(x, group)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s/t, h] reduced shard forward; all-gather of the gradient backward."""
    return x if _size(group) == 1 else _ReduceScatterSequence.apply(x, group)


def split_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's chunk of dim 1 (no communication, not differentiable-dual: for inputs and tests)."""
    return x if _size(group) == 1 else _chunk(x, SEQUENCE_DIM, group)
