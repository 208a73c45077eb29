"""The runtime on CUDA with NCCL, one GPU per rank: the equivalence cases of
tests/dist/test_equivalence.py (every case whose world fits the visible GPUs; the world-1 cases
run on a single GPU), the batched point-to-point path on NCCL for every schedule, placement of
every tensor on the rank's GPU, the allocator's peak memory, CUDA-event timelines, and a crashing
or stuck rank turning into an error within 60 s.

Skipped without CUDA (tests/conftest.py); each multi-rank case is skipped when
torch.cuda.device_count() is below its world size (NCCL cannot put two ranks on one GPU).
The reference is the serial GPT on cuda:0 (attention-dropout masks come from the device's
generator, `models.gpt._attention_keep_mask`); TF32 is off, so fp32 GPU results differ from it by
reduction order only (tolerances 10x those of the gloo suite, still 100x below a misplaced shard).
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch
import torch.distributed as dist

from dist.harness import Case, Tolerances, launch_cases, make_plan, serial_reference, training_mismatches
from dist.test_batched_p2p import CASES as BATCHED_CASES
from dist.test_equivalence import CASES, GPT
from modelpar.runtime.launch import RankFailure, spawn
from modelpar.schedules.events import COMPUTE_KINDS
from modelpar.training.run import peak_memory_bytes

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TOLERANCES = Tolerances(loss_rtol=1e-4, grad_rtol=1e-3, grad_atol=1e-5)
FAILURE_DEADLINE_S = 60.0

SINGLE_GPU_CASES = [
    Case("gpu-t1p1d1-fp32", GPT, make_plan(1, 1, 1, m=3)),
    Case("gpu-t1p1d1-bf16-full", GPT, make_plan(1, 1, 1, m=2, recompute="full"), dtype="bf16"),
]
ALL_CASES = SINGLE_GPU_CASES + CASES + [dataclasses.replace(c, name=c.name.replace("batched", "nccl"))
                                        for c in BATCHED_CASES]
RUNNABLE = [c for c in ALL_CASES if c.plan.world_size <= GPUS]


def _tensors_off_device(trainer, device) -> list[str]:
    """Parameters, gradients and optimizer states that are not on the rank's GPU."""
    wrong = [f"parameter {name}" for name, p in trainer.modules.named_parameters() if p.device != device]
    wrong += [f"grad {name}" for name, p in trainer.modules.named_parameters()
              if p.grad is not None and p.grad.device != device]
    optimizer = trainer.optimizer
    for attribute in ("master_shard", "exp_avg", "exp_avg_sq"):
        states = getattr(optimizer, attribute, None)
        for state in states if isinstance(states, list) else [states] if states is not None else []:
            if state.device != device:
                wrong.append(f"optimizer {attribute}")
    return wrong


def _inspect_on_gpu(trainer, ctx) -> dict:
    """After step 1's forward-backward: p2p mode, device, stray tensors, peak memory, CUDA-event timeline."""
    events = list(trainer.timeline.events)
    return {"mode": trainer.executor.p2p_mode, "device": str(ctx.device),
            "off_device": _tensors_off_device(trainer, ctx.device), "peak": peak_memory_bytes(ctx.device),
            "compute_s": sum(e.duration_s for e in events if e.kind in COMPUTE_KINDS),
            "bad_events": sum(e.end_s < e.start_s for e in events)}


@pytest.fixture(scope="module")
def runs():
    if not RUNNABLE:
        pytest.skip("no CUDA device")
    world = max(c.plan.world_size for c in RUNNABLE)
    return launch_cases(RUNNABLE, world, timeout_s=900, backend="nccl", inspect=_inspect_on_gpu)


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_layout_matches_serial_on_nccl(runs, case):
    if case.plan.world_size > GPUS:
        pytest.skip(f"needs {case.plan.world_size} GPUs, {GPUS} visible")
    got, want = runs[case.name], serial_reference(case, "cuda:0")
    problems = []
    for rank, report in enumerate(got["reports"]):
        expected_mode = "batched" if case.plan.pipeline_parallel > 1 else "none"
        if report["mode"] != expected_mode:
            problems.append(f"rank {rank}: p2p mode {report['mode']!r}, expected {expected_mode!r}")
        if report["device"] != f"cuda:{rank}":
            problems.append(f"rank {rank} ran on {report['device']}, expected cuda:{rank}")
        problems += [f"rank {rank}: {what} is not on cuda:{rank}" for what in report["off_device"][:3]]
        if report["peak"] <= 0:
            problems.append(f"rank {rank}: torch.cuda.max_memory_allocated reported {report['peak']}")
        if report["compute_s"] <= 0 or report["bad_events"]:
            problems.append(f"rank {rank}: CUDA-event timeline: compute {report['compute_s']} s, "
                            f"{report['bad_events']} events ending before they start")
    problems += training_mismatches(got, want, case, TOLERANCES)
    assert not problems, "\n".join(problems[:12])


# --- failures on NCCL -------------------------------------------------------------------------------


def _rank_one_exits(rank: int, world_size: int) -> None:
    value = torch.ones(1, device="cuda")
    dist.all_reduce(value)  # the communicator exists before the crash
    if rank == 1:
        os._exit(3)
    dist.all_reduce(value)
    torch.cuda.synchronize()


def _rank_one_stalls(rank: int, world_size: int) -> None:
    value = torch.ones(1, device="cuda")
    dist.all_reduce(value)
    if rank == 1:
        time.sleep(3600)  # alive but never joins: only the NCCL timeout can end rank 0's wait
    dist.all_reduce(value)
    torch.cuda.synchronize()


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_crashing_nccl_rank_is_named_within_60_s():
    started = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 of 2 died with exit code 3") as info:
        spawn(_rank_one_exits, 2, timeout_s=300, backend="nccl")
    assert info.value.rank == 1
    assert time.monotonic() - started < FAILURE_DEADLINE_S


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_stuck_nccl_collective_times_out_instead_of_hanging():
    started = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn(_rank_one_stalls, 2, timeout_s=120, backend="nccl", collective_timeout=15)
    assert info.value.rank == 0, str(info.value)  # the NCCL watchdog ended rank 0, not the spawn timeout
    assert time.monotonic() - started < FAILURE_DEADLINE_S
