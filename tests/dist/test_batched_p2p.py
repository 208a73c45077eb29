"""The batched (NCCL-style) point-to-point path, forced on gloo, trains every schedule exactly like
the serial GPT.

`TrainConfig.p2p = 'batched'` (`modelpar train --p2p batched`) makes the pipeline executor issue one tag-0 `batch_isend_irecv` per lockstep
round and wait for it at once, as it does on NCCL. gloo's sends are rendezvous (a send completes
only once its receive is posted) and, with one tag, a pair's messages match in posting order: so
this runs the NCCL path's matching and its freedom from hangs, on CPU. The cases cover gpipe,
1f1b (m > p and m < p) and interleaved (v = 2, p = 4: the ring wraps from the last rank to rank
0; p = 2: the previous and next rank are the same peer), with tensor and data parallelism,
recompute, ZeRO-1 and bf16 messages. One launch of 4 gloo ranks, the machinery of
test_equivalence (3 AdamW steps, losses, step-1 gradients and final weights against the serial model).
"""

from __future__ import annotations

import pytest

from modelpar.schedules.events import COMPUTE_KINDS

from .harness import Case, launch_cases, make_plan, serial_reference, training_mismatches
from .test_equivalence import GPT, LLAMA

pytestmark = pytest.mark.dist

WORLD = 4
CASES = [
    Case("batched-t1p4d1-gpipe", LLAMA, make_plan(1, 4, 1, "gpipe", b=1, m=6), p2p="batched"),
    Case("batched-t1p4d1-1f1b-m6", GPT, make_plan(1, 4, 1, "1f1b", b=1, m=6), p2p="batched"),
    Case("batched-t1p4d1-1f1b-m2", GPT, make_plan(1, 4, 1, "1f1b", b=1, m=2), p2p="batched"),
    Case("batched-t1p4d1-interleaved-v2", GPT, make_plan(1, 4, 1, "interleaved", v=2, b=1, m=4), p2p="batched"),
    Case("batched-t1p2d2-interleaved-v2-full", GPT, make_plan(1, 2, 2, "interleaved", v=2, b=1, m=4, recompute="full"),
         p2p="batched"),
    Case("batched-t2p2d1-1f1b-sp", LLAMA, make_plan(2, 2, 1, "1f1b", b=1, m=3, sp=True), p2p="batched"),
    Case("batched-t1p2d2-bf16-zero1", LLAMA, make_plan(1, 2, 2, "1f1b", b=1, m=2, zero=1), dtype="bf16", p2p="batched"),
]


def _p2p_mode_and_event_kinds(trainer, ctx) -> tuple[str, list[str]]:
    return trainer.executor.p2p_mode, sorted({"compute" if event.kind in COMPUTE_KINDS else event.kind
                                              for event in trainer.timeline.events})


@pytest.fixture(scope="module")
def runs():
    return launch_cases(CASES, WORLD, timeout_s=300, inspect=_p2p_mode_and_event_kinds)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_batched_p2p_matches_serial(runs, case):
    got = runs[case.name]
    problems = []
    for rank, (mode, kinds) in enumerate(got["reports"]):
        if mode != "batched":
            problems.append(f"rank {rank} ran p2p mode {mode!r}, not 'batched'")
        if not {"compute", "send", "recv"} <= set(kinds):
            problems.append(f"rank {rank}: timeline kinds {kinds} lack compute, send or recv")
    problems += training_mismatches(got, serial_reference(case), case)
    assert not problems, "\n".join(problems[:12])


def test_cases_cover_every_schedule():
    assert {c.plan.schedule for c in CASES} == {"gpipe", "1f1b", "interleaved"}
    assert {c.plan.pipeline_parallel for c in CASES} == {2, 4}
    assert any(c.plan.virtual_stages == 2 and c.plan.pipeline_parallel == 4 for c in CASES)
    assert any(c.plan.num_micro_batches < c.plan.pipeline_parallel for c in CASES)
    assert all(c.plan.world_size <= WORLD for c in CASES)
