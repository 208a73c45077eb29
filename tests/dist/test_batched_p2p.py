"""The batched (NCCL-style) point-to-point path, forced on gloo, trains every schedule exactly like
the serial GPT.

MODELPAR_P2P=batched makes the pipeline executor issue one tag-0 `batch_isend_irecv` per lockstep
round and wait for it at once, as it does on NCCL. gloo's sends are rendezvous (a send completes
only once its receive is posted) and, with one tag, a pair's messages match in posting order: so
this runs the NCCL path's matching and its freedom from hangs, on CPU. The cases cover gpipe,
1f1b (m > p and m < p) and interleaved (v = 2, p = 4: the ring wraps from the last rank to rank
0; p = 2: the previous and next rank are the same peer), with tensor and data parallelism,
recompute, ZeRO-1 and bf16 messages. One launch of 4 gloo ranks, the machinery of
test_equivalence (3 AdamW steps, losses, step-1 gradients and final weights against the serial model).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch.distributed as dist

from modelpar.runtime.mesh import ParallelContext, ParallelDims
from modelpar.runtime.pipeline import P2P_ENV
from modelpar.train import RankTrainer, TrainConfig

from .harness import dict_mismatches, relative_mismatch, run_ranks
from .test_equivalence import (BF16_LOSS_RTOL, GPT, GRAD_ATOL, GRAD_RTOL, LLAMA, LOSS_RTOL, SEED, STEPS,
                               WEIGHT_ATOL, WEIGHT_RTOL, Case, _initial_state, _plan, serial_reference)

pytestmark = pytest.mark.dist

WORLD = 4
CASES = [
    Case("batched-t1p4d1-gpipe", LLAMA, _plan(1, 4, 1, "gpipe", b=1, m=6)),
    Case("batched-t1p4d1-1f1b-m6", GPT, _plan(1, 4, 1, "1f1b", b=1, m=6)),
    Case("batched-t1p4d1-1f1b-m2", GPT, _plan(1, 4, 1, "1f1b", b=1, m=2)),
    Case("batched-t1p4d1-interleaved-v2", GPT, _plan(1, 4, 1, "interleaved", v=2, b=1, m=4)),
    Case("batched-t1p2d2-interleaved-v2-full", GPT, _plan(1, 2, 2, "interleaved", v=2, b=1, m=4, recompute="full")),
    Case("batched-t2p2d1-1f1b-sp", LLAMA, _plan(2, 2, 1, "1f1b", b=1, m=3, sp=True)),
    Case("batched-t1p2d2-bf16-zero1", LLAMA, _plan(1, 2, 2, "1f1b", b=1, m=2, zero=1), dtype="bf16"),
]


def _run_batched_cases(rank: int, world_size: int, cases: list[Case], store_dir: str) -> dict:
    """Every case on the ranks it needs (a fresh default group each, as in test_equivalence)."""
    os.environ[P2P_ENV] = "batched"
    dist.barrier()
    dist.destroy_process_group()
    results = {}
    for index, case in enumerate(cases):
        size = case.plan.world_size
        if rank >= size:
            continue
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/case{index}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=120))
        ctx = ParallelContext(ParallelDims.from_plan(case.plan))
        config = TrainConfig(case.model, case.plan, STEPS, SEED, case.dtype, "synthetic", progress=False)
        trainer = RankTrainer(config, ctx, initial_state=_initial_state(case))
        fp32 = case.dtype == "fp32"
        initial_state = trainer.full_state_dict() if fp32 else None
        losses = [trainer.forward_backward(0)]
        kinds = sorted({event.kind for event in trainer.timeline.events})
        grads = trainer.full_gradients() if fp32 else None
        trainer.optimizer_step()
        losses += [trainer.step(step) for step in range(1, STEPS)]
        state = trainer.full_state_dict() if fp32 else None
        modes = [None] * size
        dist.all_gather_object(modes, (trainer.executor.p2p_mode, kinds))
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            results[case.name] = {"losses": losses, "grads": grads, "state": state, "initial_state": initial_state,
                                  "modes": modes}
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/final", rank=rank, world_size=world_size)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as store_dir:
        return run_ranks(_run_batched_cases, WORLD, CASES, store_dir, timeout_s=300)[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_batched_p2p_matches_serial(runs, case):
    got, want = runs[case.name], serial_reference(case)
    problems = []
    for rank, (mode, kinds) in enumerate(got["modes"]):
        if mode != "batched":
            problems.append(f"rank {rank} ran p2p mode {mode!r}, not 'batched'")
        if not {"compute", "send", "recv"} <= set(kinds):
            problems.append(f"rank {rank}: timeline kinds {kinds} lack compute, send or recv")
    if case.dtype == "fp32":
        for step, (a, b) in enumerate(zip(got["losses"], want["losses"])):
            problems += relative_mismatch(f"loss of step {step}", a, b, LOSS_RTOL)
        problems += dict_mismatches("initial weight ", got["initial_state"], want["initial_state"], 0.0, 0.0)
        problems += dict_mismatches("grad ", got["grads"], want["grads"], GRAD_RTOL, GRAD_ATOL)
        problems += dict_mismatches("weight ", got["state"], want["state"], WEIGHT_RTOL, WEIGHT_ATOL)
    else:
        for step, (a, b) in enumerate(zip(got["losses"], want["losses"])):
            problems += relative_mismatch(f"bf16 loss of step {step}", a, b, BF16_LOSS_RTOL)
    assert not problems, "\n".join(problems[:12])


def test_cases_cover_every_schedule():
    assert {c.plan.schedule for c in CASES} == {"gpipe", "1f1b", "interleaved"}
    assert {c.plan.pipeline_parallel for c in CASES} == {2, 4}
    assert any(c.plan.virtual_stages == 2 and c.plan.pipeline_parallel == 4 for c in CASES)
    assert any(c.plan.num_micro_batches < c.plan.pipeline_parallel for c in CASES)
    assert all(c.plan.world_size <= WORLD for c in CASES)
