"""Step-time model: compute-only cases by hand, pipeline pieces, data parallelism, memory errors."""

from __future__ import annotations

import pytest

from modelpar.caching import clear_caches
from modelpar.planner import compute, flops
from modelpar.planner.constants import MATMUL_EFFICIENCY
from modelpar.planner.cost import check_fits, estimate, pipeline_profile
from modelpar.schedules.simulate import closed_form_bubble_fraction, simulate
from modelpar.schedules.actions import build_schedule
from modelpar.specs.cluster import CLUSTER_PRESETS, ClusterSpec, DeviceSpec
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS, ModelSpec
from modelpar.specs.plan import ParallelPlan

DGX = CLUSTER_PRESETS["dgx-a100-80gb"]
# Memory and network so fast that only arithmetic is left.
IDEAL = ClusterSpec(
    "ideal", DeviceSpec("flops-only", peak_tflops=100.0, memory_gib=1000, memory_bandwidth_gb_per_s=1e12),
    devices_per_node=8, intra_node_bandwidth_gb_per_s=1e12, inter_node_bandwidth_gb_per_s=1e12,
    intra_node_latency_us=0.0, inter_node_latency_us=0.0,
)


def gpt(layers=4, hidden=1024, heads=16, seq=1024, vocab=32000, **changes) -> ModelSpec:
    fields = dict(name="gpt", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                  ffn_hidden_size=4 * hidden, vocab_size=vocab, seq_length=seq)
    fields.update(changes)
    return ModelSpec(**fields)


def plan(t=1, p=1, d=1, v=1, b=1, batch=8, sp=False, recompute="none", zero=0, schedule="1f1b") -> ParallelPlan:
    return ParallelPlan(t, p, d, 1, v, b, batch, sp, recompute, zero, schedule)


@pytest.fixture
def no_kernel_overhead(monkeypatch):
    monkeypatch.setattr(compute, "KERNEL_OVERHEAD_S", 0.0)
    clear_caches()
    yield
    clear_caches()




def test_compute_only_step_is_flops_over_peak_times_efficiency(no_kernel_overhead):
    model = gpt()
    step = estimate(model, IDEAL, 1, plan(b=2, batch=8))
    rate = IDEAL.device.peak_tflops * 1e12 * MATMUL_EFFICIENCY
    tokens = 8 * model.seq_length
    attention = model.num_layers * flops.attention_core_forward_flops(model, tokens)
    # flops.py counts the attention core 3x (forward + 2x backward) over the full s x s; the
    # causal flash kernel computes half the blocks, 1x forward + 2.5x backward.
    expected = flops.model_flops_per_iteration(model, 8) - 3 * attention + 0.5 * 3.5 * attention
    assert step.breakdown["compute_s"] == pytest.approx(expected / rate, rel=1e-6)
    assert step.step_time_s == pytest.approx(expected / rate, rel=1e-6)


def test_full_recompute_adds_one_forward(no_kernel_overhead):
    model = gpt()
    none = estimate(model, IDEAL, 1, plan(batch=4))
    full = estimate(model, IDEAL, 1, plan(batch=4, recompute="full"))
    rate = IDEAL.device.peak_tflops * 1e12 * MATMUL_EFFICIENCY
    tokens = 4 * model.seq_length
    attention = model.num_layers * flops.attention_core_forward_flops(model, tokens)
    extra = flops.recompute_flops_per_iteration(model, 4, "full") - 0.5 * attention
    assert full.step_time_s - none.step_time_s == pytest.approx(extra / rate, rel=1e-6)
    assert full.breakdown["recompute_s"] == pytest.approx(extra / rate, rel=1e-6)


def test_step_is_the_sum_of_its_parts():
    step = estimate(MODEL_PRESETS["gpt3-175b"], DGX, 512, plan(8, 8, 8, 3, 1, 512, True, "selective", 1, "interleaved"))
    parts = ("compute_s", "tensor_parallel_comm_s", "bubble_s", "pipeline_p2p_s", "data_parallel_comm_s", "optimizer_s")
    assert step.step_time_s == pytest.approx(sum(step.breakdown[key] for key in parts), rel=1e-12)
    assert step.breakdown["recompute_s"] < step.breakdown["compute_s"]
    assert step.mfu == pytest.approx(flops.mfu(MODEL_PRESETS["gpt3-175b"], 512, step.step_time_s, 512, 312.0))
    assert step.hfu > step.mfu
    assert step.energy_per_step_j == pytest.approx(400.0 * 512 * step.step_time_s)
    assert step.energy_per_token_j == pytest.approx(step.energy_per_step_j / (512 * 2048))
    assert step.tokens_per_s == pytest.approx(512 * 2048 / step.step_time_s)


def test_bubble_matches_the_schedule():
    model = gpt(layers=8, vocab=64)  # a tiny head keeps the stages uniform
    step = estimate(model, DGX, 4, plan(p=4, batch=8, schedule="1f1b"))
    busy = step.breakdown["compute_s"] + step.breakdown["tensor_parallel_comm_s"]
    assert step.breakdown["bubble_fraction"] == pytest.approx(3 / 11)
    # 3/8 of the busy time for uniform stages; the first stage's embedding makes them slightly uneven
    assert step.breakdown["bubble_s"] / busy == pytest.approx(3 / 8, rel=0.05)
    interleaved = estimate(model, DGX, 4, plan(p=4, v=2, batch=8, schedule="interleaved"))
    assert interleaved.breakdown["bubble_s"] < step.breakdown["bubble_s"]
    assert interleaved.breakdown["pipeline_p2p_s"] > step.breakdown["pipeline_p2p_s"]


@pytest.mark.parametrize("schedule,p,m,v", [
    ("gpipe", 4, 6, 1), ("1f1b", 4, 8, 1), ("1f1b", 5, 3, 1), ("interleaved", 4, 8, 2), ("interleaved", 3, 6, 4),
    ("interleaved", 8, 8, 3),
])
def test_pipeline_profile_matches_the_simulation(schedule, p, m, v):
    simulation = simulate(build_schedule(schedule, p, m, v), 1.0, 2.0)
    bubble, in_flight = pipeline_profile(schedule, p, m, v)
    assert bubble == pytest.approx(simulation.bubble_fraction, abs=1e-12)
    assert in_flight == simulation.peak_in_flight


def test_closed_form_bubble_the_search_uses_equals_the_simulation():
    """The search ranks with closed-form bubbles; they must be what the action lists give."""
    shapes = [("gpipe", p, m, 1) for p in range(2, 7) for m in range(1, 13)]
    shapes += [("1f1b", p, m, 1) for p in range(2, 7) for m in range(1, 13)]
    shapes += [("interleaved", p, m, v) for p in range(2, 6) for m in range(p, 13, p) for v in (2, 3, 4)]
    shapes += [("1f1b", 16, 64, 1), ("interleaved", 16, 64, 4), ("gpipe", 8, 40, 1)]
    for schedule, p, m, v in shapes:
        simulated = simulate(build_schedule(schedule, p, m, v), 1.0, 2.0).bubble_fraction
        closed = closed_form_bubble_fraction(schedule, p, m, v)
        assert closed == pytest.approx(simulated, abs=1e-12), (schedule, p, m, v)
        assert pipeline_profile(schedule, p, m, v, simulate=False)[0] == pytest.approx(simulated, abs=1e-12)


def test_data_parallel_reduction_hides_behind_the_last_backward():
    model = MODEL_PRESETS["gpt3-175b"]
    step = estimate(model, DGX, 1024, plan(8, 8, 16, 1, 1, 1024, True, "selective", 1, "1f1b"))
    assert step.breakdown["overlapped_comm_s"] > 0
    # A longer last backward (bigger micro-batch) hides more of the same reduction.
    longer = estimate(model, DGX, 1024, plan(8, 8, 16, 1, 4, 1024, True, "full", 1, "1f1b"))
    assert longer.breakdown["data_parallel_comm_s"] < step.breakdown["data_parallel_comm_s"]
    total = step.breakdown["data_parallel_comm_s"] + step.breakdown["overlapped_comm_s"]
    assert total == pytest.approx(longer.breakdown["data_parallel_comm_s"] + longer.breakdown["overlapped_comm_s"])
    # ZeRO-3 moves more: the weights are gathered for every forward and backward.
    zero3 = estimate(model, DGX, 1024, plan(8, 8, 16, 1, 1, 1024, True, "selective", 3, "1f1b"))
    assert (zero3.breakdown["data_parallel_comm_s"] + zero3.breakdown["overlapped_comm_s"]
            > step.breakdown["data_parallel_comm_s"] + step.breakdown["overlapped_comm_s"])
    single = estimate(model, DGX, 64, plan(8, 8, 1, 1, 1, 64, True, "selective", 0, "1f1b"))
    assert single.breakdown["data_parallel_comm_s"] == 0.0


def test_tensor_parallel_communication_with_and_without_sequence_parallelism():
    model = MODEL_PRESETS["megatron-1t"]
    plain = estimate(model, DGX, 512, plan(8, 64, 1, 1, 1, 512, False, "full", 0, "1f1b"))
    split = estimate(model, DGX, 512, plan(8, 64, 1, 1, 1, 512, True, "full", 0, "1f1b"))
    # all-reduce == reduce-scatter + all-gather: same communication time...
    assert split.breakdown["tensor_parallel_comm_s"] == pytest.approx(plain.breakdown["tensor_parallel_comm_s"])
    # ...but the norms and residual adds are split over t, and the p2p is not re-gathered.
    assert split.breakdown["compute_s"] < plain.breakdown["compute_s"]
    assert split.breakdown["pipeline_p2p_s"] < plain.breakdown["pipeline_p2p_s"]


def test_korthikanti_1t_plan_fits_and_a_too_big_one_does_not():
    model = MODEL_PRESETS["megatron-1t"]
    published = estimate(model, DGX, 512, plan(8, 64, 1, 1, 1, 512, True, "selective", 0, "1f1b"))
    assert published.memory.fits
    check_fits(published)  # no error
    assert 0.45 < published.mfu < 0.65  # Korthikanti et al. 2022 Table 5: 56.3%
    too_big = estimate(MODEL_PRESETS["gpt3-175b"], DGX, 64, plan(8, 8, 1, 1, 4, 64, False, "none", 0, "1f1b"))
    assert not too_big.memory.fits
    with pytest.raises(SpecError, match=r"GiB per device on A100-SXM4-80GB .*activations .* are the largest; try"):
        check_fits(too_big)


def test_estimate_rejects_plans_that_cannot_run():
    model = MODEL_PRESETS["gpt3-175b"]
    with pytest.raises(SpecError, match="not set"):
        estimate(model, DGX, 64, ParallelPlan(tensor_parallel=8))
    with pytest.raises(SpecError, match="does not divide"):
        estimate(model, DGX, 56, plan(7, 8, 1, 1, 1, 8))
    with pytest.raises(SpecError, match="multiple of"):
        estimate(model, DGX, 64, plan(8, 8, 1, 2, 1, 12, schedule="interleaved"))
    with pytest.raises(SpecError, match="virtual_stages >= 2"):
        estimate(model, DGX, 64, plan(8, 8, 1, 1, 1, 16, schedule="interleaved"))
