"""Exact memory model: the bytes a layer saves for backward, measured, equal the planner's model.

Serial (t = 1) part; tests/dist/test_activation_memory_tp.py covers t = 2, 4 with and without
sequence parallelism. The only bytes the planner leaves out are the norms' per-token statistics
(`norm_statistics_bytes`), so measured - predicted lies in [0, that bound], and within 2%.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modelpar.models.gpt import AttentionCore, RMSNorm, causal_softmax
from modelpar.planner.memory import activation_bytes_per_layer, activation_terms
from modelpar.models.memory_probe import (measure_activation_bytes_per_layer, norm_statistics_bytes,
                                           saved_activations)
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS, ModelSpec

RECOMPUTE = ("none", "selective", "full")
DTYPES = {"bf16": 2, "fp32": 4}
MICRO_BATCH = 2
MODELS = {
    # gelu, multi-head attention, layernorm, learned positions, dropout 0.1
    "gpt-tiny": dataclasses.replace(MODEL_PRESETS["gpt-tiny"], seq_length=64),
    # swiglu, GQA (4 KV heads of 8), rmsnorm, rope, dropout 0
    "llama-tiny": dataclasses.replace(MODEL_PRESETS["llama-tiny"], seq_length=64),
}
# Korthikanti et al. 2022's configuration: q = k = h, f = 4h, GELU, LayerNorm, dropout > 0, 16 bits.
STANDARD_GPT = ModelSpec(name="gpt-standard", num_layers=1, hidden_size=128, num_attention_heads=8,
                         ffn_hidden_size=512, vocab_size=256, seq_length=128, dropout=0.1)


def korthikanti(model: ModelSpec, b: int, recompute: str) -> float:
    """Korthikanti et al. 2022 Table 2, t = 1: s b h (34 + 5 a s / h); selective 34 s b h; full 2 s b h."""
    s, h, a = model.seq_length, model.hidden_size, model.num_attention_heads
    if recompute == "full":
        return 2 * s * b * h
    return s * b * h * (34 + (5 * a * s / h if recompute == "none" else 0))


def assert_measured_matches_planner(measured: float, predicted: float, unmodelled_bound: float) -> None:
    assert abs(measured / predicted - 1) <= 0.02, (measured, predicted)
    assert 0 <= measured - predicted <= unmodelled_bound, (measured, predicted, unmodelled_bound)


# --- the probe: what "saved bytes" means ---------------------------------------------------------


class _SavesKnownTensors(nn.Module):
    """x [8, 4] fp32 -> output; saves: x (twice, one storage), a column view of a [8, 16] buffer
    (pins the whole buffer), a bool mask; a dropped branch's saves are freed; the weight is a parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        first, second = x.sin(), x.cos()  # both save x
        wide = x @ self.weight  # saves x (again) and the weight (a parameter: not counted)
        column = wide[:, :1].exp()  # exp saves its output: a new [8, 1] tensor
        pinned = wide[:, 1:2].sin()  # saves a view into `wide`: all 8 x 16 floats stay alive
        keep = x > 0
        masked = x.masked_fill(keep, 0.0)  # saves the bool mask, 1 byte per element
        (x * 3).exp()  # a dropped branch: its saved output dies with it
        return first + second + column + pinned + masked


def test_probe_counts_each_storage_once_and_whole_and_skips_parameters_and_dropped_branches():
    x = torch.randn(8, 4, requires_grad=True)
    saved = saved_activations(_SavesKnownTensors(), x)
    expected = {
        ((8, 4), "float32", 8 * 4 * 4),  # x, saved by sin, cos and the matmul
        ((8, 1), "float32", 8 * 4),  # exp's output
        ((8, 1), "float32", 8 * 16 * 4),  # a column view of the [8, 16] product: the whole product
        ((8, 4), "bool", 8 * 4),  # the mask
    }
    assert {(s.shape, s.dtype, s.nbytes) for s in saved.storages} == expected
    assert saved.total_bytes == sum(nbytes for _, _, nbytes in expected)


def test_probe_counts_only_the_inputs_of_a_checkpointed_region():
    def region(x):
        return (x.sin() * x.cos()).exp().tanh()  # would save 4 tensors of x's size without recompute

    x = torch.randn(16, 8, requires_grad=True)

    class Checkpointed(nn.Module):
        def forward(self, inputs):
            return checkpoint(region, inputs * 2.0, use_reentrant=False)

    class Plain(nn.Module):
        def forward(self, inputs):
            return region(inputs * 2.0)

    assert saved_activations(Checkpointed(), x).total_bytes == 16 * 8 * 4  # the region's input only
    assert saved_activations(Plain(), x).total_bytes == 5 * 16 * 8 * 4  # x, sin, cos, exp and tanh outputs
    Checkpointed()(x).sum().backward()  # the probe's hooks leave recomputation working
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_probe_arguments_are_checked():
    model = MODELS["gpt-tiny"]
    with pytest.raises(SpecError, match="recompute"):
        measure_activation_bytes_per_layer(model, 1, recompute="some")
    with pytest.raises(SpecError, match="ParallelContext"):
        measure_activation_bytes_per_layer(model, 1, tensor_parallel=2)
    with pytest.raises(SpecError, match="sequence_parallel"):
        measure_activation_bytes_per_layer(model, 1, sequence_parallel=True)
    with pytest.raises(SpecError, match="dtype"):
        measure_activation_bytes_per_layer(model, 1, dtype="fp8")
    with pytest.raises(SpecError, match="micro_batch_size"):
        measure_activation_bytes_per_layer(model, 0)


# --- serial runtime == planner -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("recompute", RECOMPUTE)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_measured_saved_bytes_equal_the_planner_model(name, recompute, dtype):
    model = MODELS[name]
    measured = measure_activation_bytes_per_layer(model, MICRO_BATCH, recompute=recompute, dtype=dtype)
    # dropout masks are 1-byte bools in fp32 too
    predicted = activation_bytes_per_layer(model, MICRO_BATCH, 1, False, recompute, bytes_per_value=DTYPES[dtype],
                                           dropout_mask_bytes=1)
    assert_measured_matches_planner(measured, predicted, norm_statistics_bytes(model, MICRO_BATCH, recompute=recompute))


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_standard_gpt_reduces_to_korthikanti_sbh_34_plus_5as_over_h(recompute):
    """Table 2 (t = 1): the planner's terms sum to s b h (34 + 5 a s / h) exactly, for any shape, and
    the runtime's measured bytes equal it up to the norm statistics."""
    for s, b, h, a in ((128, 2, 128, 8), (2048, 1, 12288, 96), (1024, 4, 768, 12), (64, 3, 256, 2)):
        model = dataclasses.replace(STANDARD_GPT, seq_length=s, hidden_size=h, num_attention_heads=a,
                                    ffn_hidden_size=4 * h)
        assert activation_bytes_per_layer(model, b, 1, False, recompute) == pytest.approx(
            korthikanti(model, b, recompute), rel=1e-12)
    measured = measure_activation_bytes_per_layer(STANDARD_GPT, MICRO_BATCH, recompute=recompute, dtype="bf16")
    assert_measured_matches_planner(measured, korthikanti(STANDARD_GPT, MICRO_BATCH, recompute),
                                    norm_statistics_bytes(STANDARD_GPT, MICRO_BATCH, recompute=recompute))


def test_standard_gpt_coefficients_are_34_and_5():
    """The same identity coefficient by coefficient: bytes / (s b h) = 34 + 5 (a s / h) is affine in
    a s / h with intercept 34 and slope 5 (16-bit values, 1-byte masks)."""
    ratios = []
    for heads in (2, 4, 8, 16):
        model = dataclasses.replace(STANDARD_GPT, num_attention_heads=heads)
        s, h = model.seq_length, model.hidden_size
        ratios.append((heads * s / h, activation_bytes_per_layer(model, 1, 1, False, "none") / (s * h)))
    (x0, y0), (x1, y1) = ratios[0], ratios[-1]
    slope = (y1 - y0) / (x1 - x0)
    assert slope == pytest.approx(5, rel=1e-12) and y0 - slope * x0 == pytest.approx(34, rel=1e-12)
    assert all(y == pytest.approx(34 + 5 * x, rel=1e-12) for x, y in ratios)


def test_rope_tables_are_the_only_position_dependent_term():
    llama = MODELS["llama-tiny"]
    learned = dataclasses.replace(llama, position_embedding="learned")
    with_rope = activation_terms(llama, 2, 1, False, "none")
    assert with_rope["rope_tables"] == 2 * llama.seq_length * llama.attention_head_dim * 2  # cos and sin, [s, d]
    assert activation_terms(learned, 2, 1, False, "none") == {k: v for k, v in with_rope.items() if k != "rope_tables"}
    assert "rope_tables" not in activation_terms(llama, 2, 1, False, "full")


# --- the runtime pieces that make it so ----------------------------------------------------------


def test_rmsnorm_matches_torch_and_saves_only_input_and_inverse_rms():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64, dtype=torch.float64, requires_grad=True)
    norm, reference = RMSNorm(64, eps=1e-5).double(), nn.RMSNorm(64, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        reference.weight.copy_(norm.weight)
    grad = torch.randn_like(x)
    ours = torch.autograd.grad(norm(x), (x, norm.weight), grad)
    theirs = torch.autograd.grad(reference(x), (x, reference.weight), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bf16 = x.detach().bfloat16().requires_grad_()
    saved = saved_activations(norm.bfloat16(), bf16, exclude=(bf16,))
    assert [(s.shape, s.dtype) for s in saved.storages] == [((2, 16, 1), "float32")]  # 1/rms; x is excluded


def test_causal_softmax_matches_masked_softmax_and_saves_its_output_in_the_input_dtype():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    future = torch.ones(8, 8, dtype=torch.bool).triu(1)
    grad = torch.randn_like(scores)
    ours = torch.autograd.grad(causal_softmax(scores), scores, grad)[0]
    reference = torch.autograd.grad(torch.softmax(scores.masked_fill(future, float("-inf")), -1), scores, grad)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)

    class Softmax(nn.Module):
        def forward(self, s):
            return causal_softmax(s)

    storages = saved_activations(Softmax(), scores.detach().bfloat16().requires_grad_()).storages
    assert [(s.shape, s.dtype) for s in storages] == [((2, 3, 8, 8), "bfloat16")]


def test_grouped_query_core_gradients_equal_repeated_heads():
    """K/V heads are shared by stacking each group's query rows, never repeated; gradients are those
    of the repeated-heads reference (which sums the repeated copies' gradients)."""
    torch.manual_seed(0)
    q = torch.randn(2, 8, 16, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 16, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 16, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 8, 16, 4, dtype=torch.float64)
    ours = torch.autograd.grad(AttentionCore(dropout=0.0, layer_index=0)(q, k, v), (q, k, v), grad)
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    theirs = torch.autograd.grad(reference, (q, k, v), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
