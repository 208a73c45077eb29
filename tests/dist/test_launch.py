"""spawn(): return values by rank, and failures that name the rank instead of hanging."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from modelpar.runtime.launch import RankFailure, free_port, spawn
from modelpar.specs.errors import SpecError

pytestmark = pytest.mark.dist

FAILURE_DEADLINE_S = 60.0


def _sum_of_ranks(rank: int, world_size: int, scale: int) -> dict:
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return {"rank": rank, "world": world_size, "sum": scale * value.item()}


def _rank_one_raises(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # the others wait for rank 1 forever


def _rank_one_exits(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(1)
    dist.barrier()


def _rank_zero_hangs(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(3600)


def test_spawn_returns_each_ranks_value():
    values = spawn(_sum_of_ranks, 3, (10,), timeout_s=120)
    assert values == [{"rank": r, "world": 3, "sum": 30.0} for r in range(3)]


def test_rank_that_raises_is_named_and_others_are_stopped():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 of 3 failed: ValueError: boom from rank one") as info:
        spawn(_rank_one_raises, 3, timeout_s=300)
    assert info.value.rank == 1
    assert time.monotonic() - start < FAILURE_DEADLINE_S


def test_rank_that_dies_is_named():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 of 2 died with exit code 1") as info:
        spawn(_rank_one_exits, 2, timeout_s=300)
    assert info.value.rank == 1
    assert time.monotonic() - start < FAILURE_DEADLINE_S


def test_hang_past_timeout_names_the_running_ranks():
    # rank 1 returns at once; on a loaded machine it may not have reported yet, so only rank 0 is required
    with pytest.raises(RankFailure, match=r"ranks \[0(, 1)?\] of 2 still running after 8 s") as info:
        spawn(_rank_zero_hangs, 2, timeout_s=8)
    assert info.value.rank is None


def test_bad_world_size_is_a_spec_error():
    with pytest.raises(SpecError, match="world_size"):
        spawn(_sum_of_ranks, 0, (1,))


def test_under_torchrun_runs_only_this_rank(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.delenv("MODELPAR_SPAWNED", raising=False)
    try:
        assert spawn(_sum_of_ranks, 1, (2,)) == [{"rank": 0, "world": 1, "sum": 0.0}]
        with pytest.raises(SpecError, match="torchrun started 1 ranks"):
            spawn(_sum_of_ranks, 4, (2,))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
