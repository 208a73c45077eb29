"""Plan search: partial plans, rejections by reason, ranking, the published 1T plan."""

from __future__ import annotations

import itertools

import pytest

from modelpar.planner import search as search_module
from modelpar.planner.cost import estimate, pipeline_profile, usable_memory_bytes
from modelpar.planner.memory import memory_per_device
from modelpar.planner.search import REASON_MEMORY, explain_losers, explain_rejections, search
from modelpar.specs.cluster import CLUSTER_PRESETS
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS, ModelSpec
from modelpar.specs.plan import INTERLEAVED_M as REASON_INTERLEAVED_M
from modelpar.specs.plan import PP_LAYERS as REASON_PP_LAYERS
from modelpar.specs.plan import TP_HEADS as REASON_TP_HEADS
from modelpar.specs.plan import TP_NODE as REASON_TP_NODE
from modelpar.specs.plan import ParallelPlan

DGX = CLUSTER_PRESETS["dgx-a100-80gb"]


def small_model(layers=6, heads=12, hidden=768) -> ModelSpec:
    return ModelSpec(name="small", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     ffn_hidden_size=4 * hidden, vocab_size=50257, seq_length=1024)


def test_partial_plan_only_varies_the_unknowns():
    partial = ParallelPlan(tensor_parallel=8, pipeline_parallel=8, recompute="selective", global_batch_size=512)
    result = search(MODEL_PRESETS["gpt3-175b"], DGX, 512, partial, top=20)
    assert result.plans
    for step in result.plans:
        assert (step.plan.tensor_parallel, step.plan.pipeline_parallel, step.plan.recompute) == (8, 8, "selective")
        assert step.plan.data_parallel == 8 and step.plan.global_batch_size == 512
    varied = {(s.plan.micro_batch_size, s.plan.virtual_stages, s.plan.sequence_parallel) for s in result.plans}
    assert len(varied) > 1  # the unknowns do vary


def test_rejections_are_counted_by_reason():
    result = search(small_model(), DGX, 16, global_batch_size=32, top=5)
    # t in divisors of 16: 8 and 16 do not divide 12 heads.
    assert result.rejected[REASON_TP_HEADS] == 2
    # For t = 1, 2, 4 the stage counts {1, 2, 4} are tried; 4 does not divide 6 layers.
    assert result.rejected[REASON_PP_LAYERS] == 3
    assert result.searched >= sum(result.rejected.values()) + len(result.plans)
    text = explain_rejections(result)
    assert REASON_TP_HEADS in text and str(result.searched) in text


def test_out_of_memory_and_schedule_rules_are_rejected():
    result = search(MODEL_PRESETS["gpt3-175b"], DGX, 64, global_batch_size=64, top=3)
    assert result.rejected[REASON_MEMORY] > 0
    assert result.rejected[REASON_INTERLEAVED_M] > 0
    for step in result.plans:
        assert step.memory.fits


def test_tensor_parallelism_stays_inside_a_node_unless_fixed():
    model = small_model(layers=8, heads=16, hidden=1024)
    free = search(model, DGX, 32, global_batch_size=64, top=50)
    assert free.rejected[REASON_TP_NODE] >= 1
    assert all(step.plan.tensor_parallel <= 8 for step in free.plans)
    fixed = search(model, DGX, 32, ParallelPlan(tensor_parallel=16), global_batch_size=64, top=3)
    assert fixed.plans and all(step.plan.tensor_parallel == 16 for step in fixed.plans)


def test_korthikanti_1t_plan_is_feasible_and_found():
    """Korthikanti et al. 2022 Table 3: 1T, t8 p64 d1, b1, B512, sequence parallel + selective."""
    partial = ParallelPlan(tensor_parallel=8, pipeline_parallel=64, data_parallel=1, micro_batch_size=1,
                           global_batch_size=512, sequence_parallel=True, recompute="selective")
    result = search(MODEL_PRESETS["megatron-1t"], DGX, 512, partial, top=5)
    assert result.plans
    best = result.plans[0]
    assert best.memory.fits
    assert (best.plan.tensor_parallel, best.plan.pipeline_parallel, best.plan.data_parallel) == (8, 64, 1)
    assert best.plan.sequence_parallel and best.plan.recompute == "selective"
    assert best.step_time_s == pytest.approx(71.49, rel=0.15)  # measured 71.49 s (Table 5)
    published = ParallelPlan(8, 64, 1, 1, 1, 1, 512, True, "selective", 0, "1f1b")
    assert published in {step.plan for step in result.plans}


def test_ranking_is_sorted_and_matches_estimate():
    model = MODEL_PRESETS["gpt3-175b"]
    result = search(model, DGX, 256, global_batch_size=256, top=8)
    times = [step.step_time_s for step in result.plans]
    assert times == sorted(times)
    for step in result.plans:
        assert estimate(model, DGX, 256, step.plan).step_time_s == pytest.approx(step.step_time_s, rel=1e-12)


def test_equal_time_duplicates_are_listed_once():
    result = search(MODEL_PRESETS["gpt3-175b"], DGX, 256, global_batch_size=256, top=30)
    keys = [(s.plan.tensor_parallel, s.plan.pipeline_parallel, s.plan.virtual_stages, s.plan.micro_batch_size,
             s.plan.sequence_parallel, s.plan.recompute) for s in result.plans]
    assert len(keys) == len(set(keys))  # no two differ only in ZeRO stage or gpipe vs 1f1b


def test_fixed_zero_stage_is_kept():
    partial = ParallelPlan(zero_stage=2, global_batch_size=256)
    result = search(MODEL_PRESETS["gpt3-175b"], DGX, 256, partial, top=5)
    assert result.plans and all(step.plan.zero_stage == 2 for step in result.plans)


def test_fast_memory_total_equals_memory_per_device():
    model = MODEL_PRESETS["gpt3-175b"]
    for t, p, v, b, sp, recompute, zero, schedule in itertools.product(
        (2, 8), (4, 8), (1, 3), (1, 2), (False, True), ("none", "selective", "full"), (0, 1, 3),
        ("1f1b", "gpipe", "interleaved"),
    ):
        if (schedule == "interleaved") != (v > 1):
            continue
        d = 4
        batch = 8 * b * d
        plan = ParallelPlan(t, p, d, 1, v, b, batch, sp, recompute, zero, schedule)
        m = plan.num_micro_batches
        in_flight = pipeline_profile(schedule, p, m, v)[1]
        states = search_module._StateMemory(model, t, p, d)
        per_layer, working = search_module._activation_memory(model, t, b, sp, recompute)
        fast = search_module._memory_total(model, t, p, v, b, sp, schedule, in_flight, per_layer, working,
                                           states.by_zero[zero], states.ranks)
        real = memory_per_device(model, plan, usable_memory_bytes(DGX), in_flight).total
        assert fast == pytest.approx(real, rel=1e-12), plan.describe()


def test_global_batch_is_required_and_consistent():
    with pytest.raises(SpecError, match="global_batch_size"):
        search(small_model(), DGX, 8)
    with pytest.raises(SpecError, match="given twice"):
        search(small_model(), DGX, 8, ParallelPlan(global_batch_size=16), global_batch_size=32)
    with pytest.raises(SpecError):
        search(small_model(), DGX, 0, global_batch_size=8)


def test_explain_losers_names_the_bigger_component():
    result = search(MODEL_PRESETS["gpt3-175b"], DGX, 256, global_batch_size=256, top=4)
    lines = explain_losers(result)
    assert len(lines) == len(result.plans) - 1
    assert all("% slower" in line for line in lines)


def test_no_feasible_plan_gives_an_empty_list():
    result = search(MODEL_PRESETS["megatron-1t"], DGX, 8, global_batch_size=8, top=3)
    assert result.plans == []
    assert result.rejected[REASON_MEMORY] > 0
