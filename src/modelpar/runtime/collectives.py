"""Differentiable collectives in dual pairs (Shoeybi et al. 2019, Sec. 3, Fig. 3; Korthikanti et al. 2022, Sec. 4.2.2).

Each forward collective's backward is its dual, and every function takes its ``group`` explicitly:

    copy_to_tensor_region     identity   / all-reduce       (Megatron's f)
    reduce_from_tensor_region all-reduce / identity         (Megatron's g)
    reduce_from_tensor_region_in_place   the same, reducing a fresh temporary in place
    scatter_last_dim          take chunk / all-gather       (split a replicated tensor's last dim)
    gather_last_dim           all-gather / take chunk
    all_gather_sequence       all-gather / reduce-scatter   along dim 1 (sequence parallel g)
    reduce_scatter_sequence   reduce-scatter / all-gather   along dim 1 (sequence parallel g-bar)

Each pair is data (`_DualPair`: a forward collective, its backward, and `dual()` swapping the two)
run by one autograd Function. On a group of size 1 every function is the identity. Outputs never
alias inputs that autograd may still hold, at the price of a copy, except
`reduce_from_tensor_region_in_place`, which is for callers whose input is a fresh temporary (a
row-parallel matmul's output) and saves that copy.

The ``start_*`` helpers launch a collective with ``async_op=True`` and return a `PendingCollective`
whose ``wait()`` gives the result, so that a backward pass can compute while the communication
runs (Megatron-LM's overlap of the tensor-parallel collectives with the weight-gradient GEMM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1


def _size(group) -> int:
    return dist.get_world_size(group)


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x.view_as(x)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _all_reduce_in_place(x: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    return x


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


def _split(x: torch.Tensor, dim: int, group) -> tuple[torch.Tensor, ...]:
    """``x`` cut into one equal chunk per rank along ``dim``."""
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split evenly over {world} ranks")
    return x.chunk(world, dim=dim)


def _chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return _split(x, dim, group)[dist.get_rank(group)].contiguous()


def start_reduce_scatter(x: torch.Tensor, dim: int, group) -> PendingCollective:
    """This rank's chunk along ``dim`` of the sum of every rank's ``x``, asynchronously."""
    chunks = [c.contiguous() for c in _split(x, dim, group)]
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


@dataclass(frozen=True)
class _DualPair:
    """A collective and its dual: ``forward(x, group=group)`` on the input, ``backward(grad,
    group=group)`` on the output's gradient. ``in_place``: ``forward`` overwrites its input and
    returns it (autograd is told, so it refuses to reuse the overwritten tensor)."""

    forward: Callable[..., torch.Tensor]
    backward: Callable[..., torch.Tensor]
    in_place: bool = False

    def dual(self) -> _DualPair:
        """The same two collectives with their directions swapped (f -> g, all-gather -> reduce-scatter)."""
        return _DualPair(forward=self.backward, backward=self.forward)

    def __call__(self, x: torch.Tensor, group) -> torch.Tensor:
        return x if _size(group) == 1 else _DualFunction.apply(x, group, self)


class _DualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, pair: _DualPair):
        if pair.in_place:
            ctx.mark_dirty(x)
        ctx.group, ctx.pair = group, pair
        return pair.forward(x, group=group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.pair.backward(grad, group=ctx.group), None, None


_COPY = _DualPair(forward=_identity, backward=_all_reduce)  # f
_REDUCE = _COPY.dual()  # g
_REDUCE_IN_PLACE = _DualPair(forward=_all_reduce_in_place, backward=_identity, in_place=True)
_SCATTER_LAST_DIM = _DualPair(forward=partial(_chunk, dim=-1), backward=partial(_all_gather, dim=-1))
_GATHER_LAST_DIM = _SCATTER_LAST_DIM.dual()
_GATHER_SEQUENCE = _DualPair(forward=partial(_all_gather, dim=SEQUENCE_DIM),
                             backward=partial(_reduce_scatter, dim=SEQUENCE_DIM))
_REDUCE_SCATTER_SEQUENCE = _GATHER_SEQUENCE.dual()


def copy_to_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    """f: identity forward, all-reduce (sum) of the gradient backward. Enters a column-parallel region."""
    return _COPY(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    """g: all-reduce (sum) forward, identity backward. Leaves a row-parallel region."""
    return _REDUCE(x, group)


def reduce_from_tensor_region_in_place(x: torch.Tensor, group) -> torch.Tensor:
    """g on a fresh temporary: all-reduce (sum) ``x`` in place forward, identity backward.

    Only for an ``x`` that nothing else reads afterwards and that its own autograd node did not
    save (a matmul's or a masked fill's output): the reduction overwrites it, saving the clone of
    `reduce_from_tensor_region`. ``x`` must be contiguous; otherwise the copying version is used.
    """
    return (_REDUCE_IN_PLACE if x.is_contiguous() else _REDUCE)(x, group)


def scatter_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather the gradient backward."""
    return _SCATTER_LAST_DIM(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather chunks along the last dim forward (rank order); keep this rank's gradient chunk backward."""
    return _GATHER_LAST_DIM(x, group)


def all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s/t, h] -> [b, s, h] forward; reduce-scatter (sum) of the gradient backward."""
    return _GATHER_SEQUENCE(x, group)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s/t, h] reduced shard forward; all-gather of the gradient backward."""
    return _REDUCE_SCATTER_SEQUENCE(x, group)


def split_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's chunk of dim 1 (no communication, not differentiable-dual: for inputs and tests)."""
    return x if _size(group) == 1 else _chunk(x, SEQUENCE_DIM, group)
