"""3D equivalence: every (tensor x pipeline x data) layout trains exactly like the serial GPT.

For each case, the runtime (`train.RankTrainer`: tensor-parallel modules, pipeline interpreter,
bucketed data-parallel all-reduce or ZeRO-1, recompute, sequence parallel) trains 3 AdamW steps
on gloo ranks; in fp32 the 3 losses equal the serial model's on the same global batches within
1e-5 relative, every gradient of step 1 re-assembled into the serial layout matches the serial
gradient, and the final weights gathered to the serial state dict match the serial weights.
Dropout is on (gpt-tiny: 0.1) and keyed, so its masks are layout-independent.

All cases run in ONE launch of 8 ranks (`harness.launch_cases`): for each case the ranks it needs
re-initialise the default process group (a fresh FileStore), build a ParallelContext, train,
gather, and destroy the group; the other ranks move on to the next case's rendezvous.
Re-initialising a world of 8 with its ParallelContext takes about 0.2 s on 2 cores; a fresh
launch of 8 processes about 10 s.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from modelpar.specs.model import MODEL_PRESETS

from .harness import Case, launch_cases, make_plan, serial_reference, training_mismatches

pytestmark = pytest.mark.dist

WORLD = 8

GPT = MODEL_PRESETS["gpt-tiny"]  # gelu, MHA, learned positions, tied embeddings, layernorm, dropout 0.1
LLAMA = dataclasses.replace(MODEL_PRESETS["llama-tiny"], dropout=0.1)  # swiglu, GQA (4 KV), rope, rmsnorm, untied
LLAMA_KV2 = dataclasses.replace(LLAMA, name="llama-tiny-kv2", num_query_groups=2)  # t = 4: K/V heads replicated


CASES = [
    # world 8: the largest layouts
    Case("t2p2d2-1f1b-sp-zero1", GPT, make_plan(2, 2, 2, sp=True, zero=1)),
    Case("t2p2d2-interleaved-selective", LLAMA,
         make_plan(2, 2, 2, "interleaved", v=2, b=1, m=2, recompute="selective")),
    Case("t4p2d1-gpipe-full-kv2", LLAMA_KV2, make_plan(4, 2, 1, "gpipe", m=3, recompute="full")),
    Case("t2p4d1-interleaved-v2-sp-full", GPT, make_plan(2, 4, 1, "interleaved", v=2, m=4, sp=True, recompute="full")),
    Case("t1p4d2-1f1b-zero1-selective", GPT, make_plan(1, 4, 2, b=1, m=5, recompute="selective", zero=1)),
    Case("t4p1d2-sp-zero1", LLAMA, make_plan(4, 1, 2, "gpipe", m=2, sp=True, zero=1)),
    Case("t1p2d4-gpipe-from-checkpoint", GPT, make_plan(1, 2, 4, "gpipe", b=1, m=2), start_from_seed=11),
    # world 4
    Case("t1p2d2-interleaved-v2-full", GPT, make_plan(1, 2, 2, "interleaved", v=2, m=4, recompute="full")),
    Case("t4p1d1-sp-selective", GPT, make_plan(4, 1, 1, m=2, sp=True, recompute="selective")),
    Case("t2p1d2-1f1b-zero1-full", LLAMA, make_plan(2, 1, 2, m=3, recompute="full", zero=1)),
    Case("t1p4d1-gpipe", LLAMA, make_plan(1, 4, 1, "gpipe", b=1, m=6)),
    Case("t1p1d4-dp-only", GPT, make_plan(1, 1, 4, b=1, m=2)),
    # world 2 and 1
    Case("t2p1d1-sp", LLAMA, make_plan(2, 1, 1, m=2, sp=True)),
    Case("t1p2d1-interleaved-v4-from-checkpoint", GPT, make_plan(1, 2, 1, "interleaved", v=4, m=2), start_from_seed=3),
    Case("t1p1d2-zero1", GPT, make_plan(1, 1, 2, m=2, zero=1)),
    Case("t1p1d1-serial-runtime", GPT, make_plan(1, 1, 1, m=3)),
    Case("t2p2d2-bf16", GPT, make_plan(2, 2, 2, sp=True), dtype="bf16"),
    Case("t1p2d2-bf16-zero1-full", LLAMA, make_plan(1, 2, 2, m=2, zero=1, recompute="full"), dtype="bf16"),
]


@pytest.fixture(scope="module")
def runs():
    started = time.perf_counter()
    results = launch_cases(CASES, WORLD, timeout_s=480)
    print(f"\nequivalence launch: {time.perf_counter() - started:.1f} s for {len(CASES)} cases "
          + ", ".join(f"{name} {r['seconds']:.1f}s" for name, r in results.items()))
    return results


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layout_matches_serial(runs, case):
    problems = training_mismatches(runs[case.name], serial_reference(case), case)
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
