"""The overlapped and in-place tensor-parallel collectives on 2 gloo ranks.

`reduce_from_tensor_region_in_place` must sum in place (no copy) and fall back to a copy for a
non-contiguous input; the column-parallel linear, whose backward all-reduces the input gradient
asynchronously while it computes the weight gradient (and, under sequence parallelism, re-gathers
its input while it computes the input gradient), must give nn.Linear's gradients for every
combination of which inputs need a gradient, with and without bias.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpar.runtime.collectives import reduce_from_tensor_region_in_place, split_sequence
from modelpar.runtime.tensor_parallel import ColumnParallelLinear

from .harness import make_context, mismatch, run_ranks

pytestmark = pytest.mark.dist

WORLD = 2
RTOL, ATOL = 1e-5, 1e-6


def _in_place_cases(ctx) -> list[str]:
    group, rank = ctx.tensor_group, ctx.tensor_rank
    torch.manual_seed(3)
    base, weight = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    leaf = base.clone().requires_grad_()
    temporary = leaf * (rank + 1)  # a fresh non-leaf, as a matmul's output is
    address = temporary.data_ptr()
    y = reduce_from_tensor_region_in_place(temporary, group)
    (y * weight).sum().backward()
    problems = mismatch("in-place forward", y, base * 3, RTOL, ATOL)
    problems += mismatch("in-place backward", leaf.grad, weight * (rank + 1), RTOL, ATOL)
    if y.data_ptr() != address:
        problems.append("reduce_from_tensor_region_in_place copied a contiguous input")

    strided = (base * (rank + 1)).transpose(1, 2)
    before = strided.clone()
    y = reduce_from_tensor_region_in_place(strided, group)
    problems += mismatch("non-contiguous forward", y, base.transpose(1, 2) * 3, RTOL, ATOL)
    problems += mismatch("non-contiguous input left alone", strided, before, 0.0, 0.0)
    return problems


def _column_cases(ctx) -> list[str]:
    group, world, rank = ctx.tensor_group, ctx.dims.tensor, ctx.tensor_rank
    problems = []
    for sequence_parallel in (False, True):
        for bias in (True, False):
            for input_grad, weight_grad in ((True, True), (False, True), (True, False)):
                name = f"sp={sequence_parallel} bias={bias} dx={input_grad} dW={weight_grad}"
                torch.manual_seed(17)
                serial = nn.Linear(8, 12, bias=bias)
                x = torch.randn(2, 6, 8)
                column = ColumnParallelLinear.from_linear(serial, group, sequence_parallel=sequence_parallel)
                for module in (serial, column):
                    module.weight.requires_grad_(weight_grad)
                x_serial = x.clone().requires_grad_(input_grad)
                x_local = (split_sequence(x, group) if sequence_parallel else x.clone()).requires_grad_(input_grad)
                grad_output = torch.randn(2, 6, 12)
                (serial(x_serial) * grad_output).sum().backward()
                (column(x_local) * grad_output.chunk(world, -1)[rank]).sum().backward()
                rows = torch.arange(12).chunk(world)[rank]
                if input_grad and x_local.grad is None:
                    problems.append(f"{name}: no input grad")
                elif input_grad:
                    want = split_sequence(x_serial.grad, group) if sequence_parallel else x_serial.grad
                    problems += mismatch(f"{name}: input grad", x_local.grad, want, RTOL, ATOL)
                elif x_local.grad is not None:
                    problems.append(f"{name}: an input grad appeared")
                if weight_grad:
                    problems += mismatch(f"{name}: weight grad", column.weight.grad, serial.weight.grad[rows],
                                         RTOL, ATOL)
                elif column.weight.grad is not None:
                    problems.append(f"{name}: a weight grad appeared")
                if bias:
                    problems += mismatch(f"{name}: bias grad", column.bias.grad, serial.bias.grad[rows], RTOL, ATOL)
    return problems


def _worker(rank: int, world_size: int) -> dict[str, list[str]]:
    ctx = make_context(tensor=world_size)
    return {"in_place": _in_place_cases(ctx), "column": _column_cases(ctx)}


@pytest.fixture(scope="module")
def rank_results():
    return run_ranks(_worker, WORLD)


@pytest.mark.parametrize("case", ["in_place", "column"])
def test_case(rank_results, case):
    problems = [f"rank {rank}: {message}" for rank, results in enumerate(rank_results) for message in results[case]]
    assert not problems, "; ".join(problems)
