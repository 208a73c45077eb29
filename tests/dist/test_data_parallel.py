"""Data parallelism on gloo ranks: bucketed overlapped all-reduce, no sync during accumulation,
ZeRO-1 equal to plain data-parallel AdamW, and the AdamW update against torch.optim.AdamW.

One launch of 4 ranks runs every distributed case; each returns mismatch messages.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from modelpar.runtime.data_parallel import GradientReducer, all_reduce_gradients
from modelpar.runtime.zero import AdamW, ZeroOneAdamW

from .harness import mismatch, run_ranks

pytestmark = pytest.mark.dist

WORLD = 4
ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 5 * 7 + 7 + 7 * 3 + 3 + 3 = 69 parameters: not a multiple of 4 (ZeRO pads the flat vector)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3, elementwise_affine=False),
                         nn.Linear(3, 1, bias=False))


def _loss(model: nn.Module, rank: int, micro_batch: int, step: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + micro_batch)
    x = torch.randn(4, 5, generator=generator)
    return model(x).square().mean()


def _reducer_case(rank: int) -> list[str]:
    problems = []
    model, reference = _model(), _model()
    params = list(model.parameters())
    reducer = GradientReducer(params, dist.group.WORLD, bucket_bytes=16)  # tiny buckets: 4 for this model
    if reducer.num_buckets < 3:
        problems.append(f"expected several buckets, got {reducer.num_buckets}")
    reducer.set_sync(False)  # accumulation: no communication, local gradients only
    _loss(model, rank, 0).backward()
    local = [p.grad.clone() for p in params]
    _loss(reference, rank, 0).backward()
    for name, a, b in zip(range(len(params)), local, reference.parameters()):
        problems += mismatch(f"accumulation grad {name} stays local", a, b.grad, 0.0, 0.0)
    if any(bucket.launched for bucket in reducer.buckets):
        problems.append("a bucket was launched while sync was disabled")
    reducer.set_sync(True)  # last micro-batch: buckets launch from the hooks during backward
    _loss(model, rank, 1).backward()
    if not all(bucket.launched for bucket in reducer.buckets):
        problems.append("not every bucket was launched by the end of backward (no overlap)")
    reducer.finish()
    _loss(reference, rank, 1).backward()
    expected = [p.grad.clone() for p in reference.parameters()]
    for grad in expected:
        dist.all_reduce(grad)
        grad.div_(WORLD)
    for index, (param, want) in enumerate(zip(params, expected)):
        problems += mismatch(f"reduced grad {index}", param.grad, want, 1e-6, 1e-7)
    # the reducer resets: a second step works the same way
    for p in params:
        p.grad = None
    reducer.set_sync(True)
    _loss(model, rank, 2).backward()
    reducer.finish()
    check = [p.grad.clone() for p in params]
    all_reduce_gradients(params, dist.group.WORLD)  # mean of identical values: unchanged
    for index, (param, want) in enumerate(zip(params, check)):
        problems += mismatch(f"second-step grad {index} identical on every rank", param.grad, want, 1e-6, 1e-7)
    return problems


def _zero_case(rank: int) -> list[str]:
    """ZeRO-1 (reduce-scatter, sharded AdamW, all-gather) == bucketed all-reduce + AdamW, 3 steps."""
    problems = []
    plain, sharded = _model(), _model()
    plain_params, sharded_params = list(plain.parameters()), list(sharded.parameters())
    reducer = GradientReducer(plain_params, dist.group.WORLD, bucket_bytes=100)
    plain_optimizer = AdamW(plain_params, **ADAMW)
    zero = ZeroOneAdamW(sharded_params, dist.group.WORLD, **ADAMW)
    numel = sum(p.numel() for p in sharded_params)
    if zero.shard_numel != -(-numel // WORLD) or zero.optimizer_state_bytes() != 12 * zero.shard_numel:
        problems.append(f"shard of {zero.shard_numel} elements / {zero.optimizer_state_bytes()} bytes "
                        f"for {numel} params")
    for step in range(3):
        reducer.set_sync(True)
        _loss(plain, rank, 0, step).backward()
        reducer.finish()
        plain_optimizer.step()
        plain_optimizer.zero_grad()
        _loss(sharded, rank, 0, step).backward()
        zero.step()
        zero.zero_grad()
    for index, (a, b) in enumerate(zip(sharded_params, plain_params)):
        problems += mismatch(f"ZeRO-1 param {index} after 3 steps", a, b, 1e-6, 1e-7)
    gathered = [torch.empty_like(sharded_params[0]) for _ in range(WORLD)]
    dist.all_gather(gathered, sharded_params[0].detach())
    for other, tensor in enumerate(gathered):
        problems += mismatch(f"ZeRO-1 param 0 on rank {other} equals rank {rank}'s", tensor, sharded_params[0],
                             0.0, 0.0)
    return problems


def _subgroup_case(rank: int) -> list[str]:
    """Two data groups of 2 ({0, 2} and {1, 3}): each reduces only over its own members."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[rank % 2]
    model = _model()
    params = list(model.parameters())
    reducer = GradientReducer(params, group)
    reducer.set_sync(True)
    _loss(model, rank, 0).backward()
    reducer.finish()
    problems = []
    peer = (rank + 2) % 4
    reference = _model()
    _loss(reference, peer, 0).backward()
    mine = _model()
    _loss(mine, rank, 0).backward()
    for index, (p, a, b) in enumerate(zip(params, mine.parameters(), reference.parameters())):
        problems += mismatch(f"subgroup grad {index}", p.grad, (a.grad + b.grad) / 2, 1e-6, 1e-7)
    return problems


def _worker(rank: int, world_size: int) -> dict[str, list[str]]:
    return {"reducer": _reducer_case(rank), "zero": _zero_case(rank), "subgroup": _subgroup_case(rank)}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, WORLD, timeout_s=120)


@pytest.mark.parametrize("case", ["reducer", "zero", "subgroup"])
def test_data_parallel_case(results, case):
    problems = [f"rank {rank}: {message}" for rank, result in enumerate(results) for message in result[case]]
    assert not problems, "\n".join(problems[:10])


def test_adamw_matches_torch():
    """`adamw_update_` (used by AdamW and ZeRO-1) is torch.optim.AdamW's arithmetic, bit for bit."""
    torch.manual_seed(3)
    ours = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(9))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    flat = [nn.Parameter(p.detach().clone()) for p in ours]
    optimizers = [AdamW(ours, **ADAMW), torch.optim.AdamW(theirs, foreach=False, **ADAMW),
                  ZeroOneAdamW(flat, None, **ADAMW)]
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        for params in (ours, theirs, flat):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        for optimizer in optimizers:
            optimizer.step()
    for a, b, c in zip(ours, theirs, flat):
        assert torch.equal(a, b)
        assert torch.equal(c, b)


def test_zero_master_weights_stay_fp32_for_bf16_params():
    """bf16 mode: the flat master is fp32 and the bf16 parameters are its rounded copy."""
    torch.manual_seed(4)
    params = [nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(5))]
    optimizer = ZeroOneAdamW(params, None, **ADAMW)
    for p in params:
        p.data = p.data.to(torch.bfloat16)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.master_shard.dtype == torch.float32
    offset = 0
    for p in params:
        master = optimizer.master_shard[offset: offset + p.numel()].view_as(p)
        assert torch.equal(p, master.to(torch.bfloat16))
        offset += p.numel()
