"""3D equivalence: every (tensor x pipeline x data) layout trains exactly like the serial GPT.

For each case, the runtime (`train.RankTrainer`: tensor-parallel modules, pipeline interpreter,
bucketed data-parallel all-reduce or ZeRO-1, recompute, sequence parallel) trains 3 AdamW steps
on gloo ranks; in fp32 the 3 losses equal the serial model's on the same global batches within
1e-5 relative, every gradient of step 1 re-assembled into the serial layout matches the serial
gradient, and the final weights gathered to the serial state dict match the serial weights.
Dropout is on (gpt-tiny: 0.1) and keyed, so its masks are layout-independent.

All cases run in ONE launch of 8 ranks: for each case the ranks it needs re-initialise the default
process group (a fresh FileStore), build a ParallelContext, train, gather, and destroy the group;
the other ranks move on to the next case's rendezvous. Re-initialising a world of 8 with its
ParallelContext takes about 0.2 s on 2 cores; a fresh launch of 8 processes about 10 s.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from modelpar.data import make_token_source
from modelpar.models.gpt import DropoutKey, init_gpt
from modelpar.runtime.mesh import ParallelContext, ParallelDims
from modelpar.specs.model import MODEL_PRESETS
from modelpar.specs.plan import ParallelPlan
from modelpar.train import RankTrainer, TrainConfig

from .harness import dict_mismatches, relative_mismatch, run_ranks

pytestmark = pytest.mark.dist

STEPS = 3
SEED = 5
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
# Final weights after 3 AdamW steps: Adam maps gradient noise at elements whose true gradient is
# zero (the key biases: softmax ignores them) to updates of up to lr * noise / (noise + eps), so the
# bound is a fraction of the learning rate (3e-3); a mis-assembled shard is off by ~0.02 (init std).
WEIGHT_RTOL, WEIGHT_ATOL = 0.0, 5e-4
BF16_LOSS_RTOL = 3e-2
WORLD = 8

GPT = MODEL_PRESETS["gpt-tiny"]  # gelu, MHA, learned positions, tied embeddings, layernorm, dropout 0.1
LLAMA = dataclasses.replace(MODEL_PRESETS["llama-tiny"], dropout=0.1)  # swiglu, GQA (4 KV), rope, rmsnorm, untied
LLAMA_KV2 = dataclasses.replace(LLAMA, name="llama-tiny-kv2", num_query_groups=2)  # t = 4: K/V heads replicated


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: object
    plan: ParallelPlan
    dtype: str = "fp32"
    start_from_seed: int | None = None  # load the serial init of this seed as a checkpoint (any-layout loading)


def _plan(t, p, d, schedule="1f1b", v=1, b=2, m=4, sp=False, recompute="none", zero=0) -> ParallelPlan:
    return ParallelPlan(tensor_parallel=t, pipeline_parallel=p, data_parallel=d, virtual_stages=v, schedule=schedule,
                        micro_batch_size=b, global_batch_size=b * d * m, sequence_parallel=sp, recompute=recompute,
                        zero_stage=zero)


CASES = [
    # world 8: the largest layouts
    Case("t2p2d2-1f1b-sp-zero1", GPT, _plan(2, 2, 2, sp=True, zero=1)),
    Case("t2p2d2-interleaved-selective", LLAMA, _plan(2, 2, 2, "interleaved", v=2, b=1, m=2, recompute="selective")),
    Case("t4p2d1-gpipe-full-kv2", LLAMA_KV2, _plan(4, 2, 1, "gpipe", m=3, recompute="full")),
    Case("t2p4d1-interleaved-v2-sp-full", GPT, _plan(2, 4, 1, "interleaved", v=2, m=4, sp=True, recompute="full")),
    Case("t1p4d2-1f1b-zero1-selective", GPT, _plan(1, 4, 2, b=1, m=5, recompute="selective", zero=1)),
    Case("t4p1d2-sp-zero1", LLAMA, _plan(4, 1, 2, "gpipe", m=2, sp=True, zero=1)),
    Case("t1p2d4-gpipe-from-checkpoint", GPT, _plan(1, 2, 4, "gpipe", b=1, m=2), start_from_seed=11),
    # world 4
    Case("t1p2d2-interleaved-v2-full", GPT, _plan(1, 2, 2, "interleaved", v=2, m=4, recompute="full")),
    Case("t4p1d1-sp-selective", GPT, _plan(4, 1, 1, m=2, sp=True, recompute="selective")),
    Case("t2p1d2-1f1b-zero1-full", LLAMA, _plan(2, 1, 2, m=3, recompute="full", zero=1)),
    Case("t1p4d1-gpipe", LLAMA, _plan(1, 4, 1, "gpipe", b=1, m=6)),
    Case("t1p1d4-dp-only", GPT, _plan(1, 1, 4, b=1, m=2)),
    # world 2 and 1
    Case("t2p1d1-sp", LLAMA, _plan(2, 1, 1, m=2, sp=True)),
    Case("t1p2d1-interleaved-v4-from-checkpoint", GPT, _plan(1, 2, 1, "interleaved", v=4, m=2), start_from_seed=3),
    Case("t1p1d2-zero1", GPT, _plan(1, 1, 2, m=2, zero=1)),
    Case("t1p1d1-serial-runtime", GPT, _plan(1, 1, 1, m=3)),
    Case("t2p2d2-bf16", GPT, _plan(2, 2, 2, sp=True), dtype="bf16"),
    Case("t1p2d2-bf16-zero1-full", LLAMA, _plan(1, 2, 2, m=2, zero=1, recompute="full"), dtype="bf16"),
]


def _initial_state(case: Case):
    return init_gpt(case.model, case.start_from_seed).state_dict() if case.start_from_seed is not None else None


def _run_cases(rank: int, world_size: int, cases: list[Case], store_dir: str) -> dict:
    """On every rank: run each case whose world includes this rank; rank 0 returns the results."""
    # A barrier before every destroy: gloo's init returns on a rank before its peers have finished
    # connecting, and destroying then would close sockets they still need.
    dist.barrier()
    dist.destroy_process_group()  # the launch's world-8 group; each case makes its own
    results = {}
    for index, case in enumerate(cases):
        size = case.plan.world_size
        if rank >= size:
            continue
        started = time.perf_counter()
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/case{index}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=120))
        ctx = ParallelContext(ParallelDims.from_plan(case.plan))
        config = TrainConfig(case.model, case.plan, STEPS, SEED, case.dtype, "synthetic", progress=False)
        trainer = RankTrainer(config, ctx, initial_state=_initial_state(case))
        initial_state = trainer.full_state_dict() if case.dtype == "fp32" else None
        losses = [trainer.forward_backward(0)]
        grads = trainer.full_gradients() if case.dtype == "fp32" else None
        trainer.optimizer_step()
        losses += [trainer.step(step) for step in range(1, STEPS)]
        state = trainer.full_state_dict() if case.dtype == "fp32" else None
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            results[case.name] = {"losses": losses, "grads": grads, "state": state, "initial_state": initial_state,
                                  "seconds": time.perf_counter() - started}
    # leave a default group for the launcher to destroy
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/final", rank=rank, world_size=world_size)
    dist.barrier()
    return results


def serial_reference(case: Case) -> dict:
    """The serial GPT trained on the same batches with the same AdamW: losses, step-1 grads, final weights."""
    config = TrainConfig(case.model, case.plan, STEPS, SEED, case.dtype, "synthetic", progress=False)
    model = init_gpt(case.model, SEED)
    initial = _initial_state(case)
    if initial is not None:
        model.load_state_dict(initial)
    initial_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=config.weight_decay)
    source = make_token_source("synthetic", case.model.vocab_size, SEED)
    losses, grads = [], None
    for step in range(STEPS):
        batch = source.global_batch(step, case.plan.global_batch_size, case.model.seq_length)
        loss = model(batch[:, :-1], batch[:, 1:], DropoutKey(SEED, step, 0))
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return {"losses": losses, "grads": grads, "state": model.state_dict(), "initial_state": initial_state}


@pytest.fixture(scope="module")
def runs():
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as store_dir:
        results = run_ranks(_run_cases, WORLD, CASES, store_dir, timeout_s=480)[0]
    print(f"\nequivalence launch: {time.perf_counter() - started:.1f} s for {len(CASES)} cases "
          + ", ".join(f"{name} {r['seconds']:.1f}s" for name, r in results.items()))
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layout_matches_serial(runs, case):
    got, want = runs[case.name], serial_reference(case)
    problems = []
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


def test_cases_cover_every_option():
    """Each option value appears in at least one case (the matrix is not a full product)."""
    plans = [c.plan for c in CASES]
    assert {p.tensor_parallel for p in plans} >= {1, 2, 4}
    assert {p.pipeline_parallel for p in plans} >= {1, 2, 4}
    assert {p.data_parallel for p in plans} >= {1, 2}
    assert {p.schedule for p in plans} == {"gpipe", "1f1b", "interleaved"}
    assert {p.sequence_parallel for p in plans} == {True, False}
    assert {p.recompute for p in plans} == {"none", "selective", "full"}
    assert {p.zero_stage for p in plans} == {0, 1}
    assert {c.dtype for c in CASES} == {"fp32", "bf16"}
    assert {(p.tensor_parallel, p.pipeline_parallel, p.data_parallel) for p in plans} >= {
        (2, 2, 2), (4, 2, 1), (2, 4, 1), (1, 4, 2), (1, 2, 2)}
    assert all(p.world_size <= WORLD for p in plans)
    for plan in plans:
        plan.check(None, plan.world_size)
