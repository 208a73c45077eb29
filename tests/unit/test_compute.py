"""Kernel-level compute model: GEMM roofline, memory-bound kernels, one transformer layer."""

from __future__ import annotations

import dataclasses

import pytest

from modelpar.planner import compute, flops
from modelpar.planner.constants import KERNEL_OVERHEAD_S, MATMUL_EFFICIENCY, MEMORY_BANDWIDTH_EFFICIENCY
from modelpar.specs.cluster import A100_80GB, H100_SXM, DeviceSpec
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS, ModelSpec

# A device whose memory is so fast that only the FLOP term and the per-kernel cost remain.
FLOPS_ONLY = DeviceSpec("flops-only", peak_tflops=100.0, memory_gib=80, memory_bandwidth_gb_per_s=1e12)


def gpt(layers=2, hidden=1024, heads=16, seq=1024, **changes) -> ModelSpec:
    fields = dict(name="gpt", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                  ffn_hidden_size=4 * hidden, vocab_size=50000, seq_length=seq)
    fields.update(changes)
    return ModelSpec(**fields)


def test_gemm_time_by_hand():
    # 4096 x 4096 x 4096 on an A100: 2 * 4096^3 FLOPs and 3 * 4096^2 * 2 bytes.
    flops_term = 2 * 4096**3 / (312e12 * MATMUL_EFFICIENCY)
    bytes_term = 3 * 4096**2 * 2 / (2039e9 * MEMORY_BANDWIDTH_EFFICIENCY)
    expected = flops_term + bytes_term + KERNEL_OVERHEAD_S
    assert compute.gemm_time(A100_80GB, 4096, 4096, 4096) == pytest.approx(expected, rel=1e-12)


def test_narrow_gemm_runs_at_a_lower_fraction_of_peak():
    def efficiency(device, m, n, k):
        return 2 * m * n * k / compute.gemm_time(device, m, n, k) / (device.peak_tflops * 1e12)

    square = efficiency(A100_80GB, 8192, 8192, 8192)
    narrow = efficiency(A100_80GB, 8192, 8192, 128)  # a head_dim-wide inner dimension
    assert narrow < 0.7 * square
    assert square < MATMUL_EFFICIENCY
    # The same GEMM reaches a smaller share of the H100's peak: more FLOPs per byte of bandwidth.
    assert efficiency(H100_SXM, 8192, 2048, 8192) < efficiency(A100_80GB, 8192, 2048, 8192)


def test_gemm_rejects_empty_dimensions():
    with pytest.raises(SpecError):
        compute.gemm_time(A100_80GB, 0, 10, 10)


def test_memory_bound_time_by_hand():
    expected = 1e9 / (2039e9 * MEMORY_BANDWIDTH_EFFICIENCY) + 3 * KERNEL_OVERHEAD_S
    assert compute.memory_bound_time(A100_80GB, 1e9, kernels=3) == pytest.approx(expected, rel=1e-12)


def test_layer_matmul_time_is_flops_over_rate():
    """With unlimited memory bandwidth the four projections take their FLOPs / (peak x efficiency)."""
    model = gpt()
    layer = compute.layer_compute(model, FLOPS_ONLY, 2, 1, False, "none")
    tokens = 2 * model.seq_length
    projection_flops = 2.0 * tokens * flops.matmul_weights_per_layer(model)
    rate = FLOPS_ONLY.peak_tflops * 1e12 * MATMUL_EFFICIENCY
    assert layer.matmul_forward_s == pytest.approx(projection_flops / rate + 4 * KERNEL_OVERHEAD_S, rel=1e-6)
    # Backward: input and weight gradients, twice the forward FLOPs, eight kernels.
    assert layer.matmul_backward_s == pytest.approx(2 * projection_flops / rate + 8 * KERNEL_OVERHEAD_S, rel=1e-6)
    # Attention core: causal half of 4 tokens s q, forward; 2.5x that backward.
    core = 0.5 * flops.attention_core_forward_flops(model, tokens)
    assert layer.attention_forward_s == pytest.approx(core / rate + KERNEL_OVERHEAD_S, rel=1e-6)
    assert layer.attention_backward_s == pytest.approx(2.5 * core / rate + KERNEL_OVERHEAD_S, rel=1e-6)


def test_recompute_modes():
    model = gpt()
    none = compute.layer_compute(model, A100_80GB, 1, 2, False, "none")
    full = compute.layer_compute(model, A100_80GB, 1, 2, False, "full")
    selective = compute.layer_compute(model, A100_80GB, 1, 2, False, "selective")
    assert none.recompute_s == 0.0
    assert full.recompute_s == pytest.approx(full.forward_s)
    assert selective.recompute_s == pytest.approx(selective.attention_forward_s)
    assert 0 < selective.recompute_s < full.recompute_s
    with pytest.raises(SpecError):
        compute.layer_compute(model, A100_80GB, 1, 2, False, "sometimes")


def test_backward_costs_about_twice_the_forward():
    layer = compute.layer_compute(MODEL_PRESETS["gpt3-175b"], A100_80GB, 1, 8, True, "none")
    assert 1.9 < layer.backward_s / layer.forward_s < 2.4


def test_tensor_parallelism_splits_the_work():
    model = MODEL_PRESETS["gpt3-175b"]
    one = compute.layer_compute(model, A100_80GB, 1, 1, False, "none")
    eight = compute.layer_compute(model, A100_80GB, 1, 8, False, "none")
    assert one.matmul_forward_s / 8 < eight.matmul_forward_s < one.matmul_forward_s / 6
    # Without sequence parallelism the norms and residual adds are replicated on every rank.
    assert eight.elementwise_forward_s > one.elementwise_forward_s / 8 * 2
    split = compute.layer_compute(model, A100_80GB, 1, 8, True, "none")
    assert split.elementwise_forward_s < eight.elementwise_forward_s


def test_swiglu_and_gqa_change_the_shapes():
    dense = gpt(hidden=2048, heads=16)
    swiglu = dataclasses.replace(dense, activation="swiglu", ffn_hidden_size=4096, num_query_groups=4)
    a = compute.layer_compute(dense, FLOPS_ONLY, 1, 1, False, "none")
    b = compute.layer_compute(swiglu, FLOPS_ONLY, 1, 1, False, "none")
    rate = FLOPS_ONLY.peak_tflops * 1e12 * MATMUL_EFFICIENCY
    tokens = dense.seq_length
    expected = 2.0 * tokens * flops.matmul_weights_per_layer(swiglu) / rate + 4 * KERNEL_OVERHEAD_S
    assert b.matmul_forward_s == pytest.approx(expected, rel=1e-6)
    assert b.matmul_forward_s != pytest.approx(a.matmul_forward_s)


def test_head_and_embedding():
    model = MODEL_PRESETS["megatron-1t"]
    forward, backward = compute.head_compute(model, A100_80GB, 1, 8, False)
    logits = 2.0 * model.seq_length * model.hidden_size * model.vocab_size / 8
    assert forward > logits / (312e12 * MATMUL_EFFICIENCY)
    assert backward > forward
    embed_fwd, embed_bwd = compute.embedding_compute(model, A100_80GB, 1, 8, False)
    assert 0 < embed_fwd < forward


def test_optimizer_time_by_hand():
    expected = 1e9 * 34 / (2039e9 * MEMORY_BANDWIDTH_EFFICIENCY) + 4 * KERNEL_OVERHEAD_S
    assert compute.optimizer_time(A100_80GB, 1e9) == pytest.approx(expected, rel=1e-12)
