"""Differentiable collectives in dual pairs (Shoeybi et al. 2019, Sec. 3, Fig. 3; Korthikanti et al. 2022, Sec. 4.2.2).

Each forward collective's backward is its dual, and every function takes its ``group`` explicitly:

    copy_to_tensor_region     identity   / all-reduce       (Megatron's f)
    reduce_from_tensor_region all-reduce / identity         (Megatron's g)
    reduce_from_tensor_region_in_place   the same, reducing a fresh temporary in place
    scatter_last_dim          take chunk / all-gather       (split a replicated tensor's last dim)
    gather_last_dim           all-gather / take chunk
    all_gather_sequence       all-gather / reduce-scatter   along dim 1 (sequence parallel g)
    reduce_scatter_sequence   reduce-scatter / all-gather   along dim 1 (sequence parallel g-bar)

On a group of size 1 every function is the identity. Outputs never alias inputs that autograd
may still hold, at the price of a copy, except `reduce_from_tensor_region_in_place`, which is for
callers whose input is a fresh temporary (a row-parallel matmul's output) and saves that copy.

The ``start_*`` helpers launch a collective with ``async_op=True`` and return a `PendingCollective`
whose ``wait()`` gives the result, so that a backward pass can compute while the communication
runs (Megatron-LM's overlap of the tensor-parallel collectives with the weight-gradient GEMM).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1


def _size(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


class PendingCollective:
    """A launched collective: ``wait()`` blocks until it is done and returns its result."""

    def __init__(self, work, finish: Callable[[], torch.Tensor]) -> None:
        self._work, self._finish = work, finish

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        return self._finish()


def start_all_reduce(x: torch.Tensor, group) -> PendingCollective:
    """Sum ``x`` over the group IN PLACE, asynchronously (``x`` must be contiguous and owned by the
    caller: it is the result once ``wait()`` returns)."""
    return PendingCollective(dist.all_reduce(x, group=group, async_op=True), lambda: x)


def start_all_gather(x: torch.Tensor, dim: int, group) -> PendingCollective:
    """All ranks' ``x`` concatenated along ``dim`` in rank order, asynchronously."""
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(_size(group))]
    work = dist.all_gather(parts, x.contiguous(), group=group, async_op=True)
    return PendingCollective(work, lambda: torch.cat(parts, dim=dim))


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return start_all_gather(x, dim, group).wait()


def _chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split evenly over {world} ranks")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def start_reduce_scatter(x: torch.Tensor, dim: int, group) -> PendingCollective:
    """This rank's chunk along ``dim`` of the sum of every rank's ``x``, asynchronously."""
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split evenly over {world} ranks")
    chunks = [c.contiguous() for c in x.chunk(world, dim=dim)]
    out = torch.empty_like(chunks[0])
    try:
        work = dist.reduce_scatter(out, chunks, group=group, async_op=True)
    except (RuntimeError, NotImplementedError) as error:  # older gloo builds lack reduce_scatter
        if "support" not in str(error).lower():
            raise
        reduced = _chunk(_all_reduce(x, group), dim, group)
        return PendingCollective(None, lambda: reduced)
    return PendingCollective(work, lambda: out)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return start_reduce_scatter(x, dim, group).wait()


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


class _ReduceFromTensorRegionInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)
        dist.all_reduce(x, group=group)
        return x

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


def reduce_from_tensor_region_in_place(x: torch.Tensor, group) -> torch.Tensor:
    """g on a fresh temporary: all-reduce (sum) ``x`` in place forward, identity backward.

    Only for an ``x`` that nothing else reads afterwards and that its own autograd node did not
    save (a matmul's or a masked fill's output): the reduction overwrites it, saving the clone of
    `reduce_from_tensor_region`. ``x`` must be contiguous; otherwise the copying version is used.
    """
    if _size(group) == 1:
        return x
    if not x.is_contiguous():
        return _ReduceFromTensorRegion.apply(x, group)
    return _ReduceFromTensorRegionInPlace.apply(x, group)


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
