"""Serial reference GPT and keyed dropout (no process group)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from modelpar.models.gpt import (GPT, INIT_STD, AttentionCore, DropoutKey, DropoutSite, apply_rope, dropout_keep_mask,
                                 init_gpt, keyed_dropout)
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS

TINY = ["gpt-tiny", "llama-tiny", "gpt-small-cpu"]


def _batch(spec, batch=2, seq=None, seed=0):
    seq = seq or spec.seq_length
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, spec.vocab_size, (batch, seq + 1), generator=generator)
    return data[:, :-1], data[:, 1:]


@pytest.mark.parametrize("name", TINY)
def test_parameter_count_matches_spec(name):
    spec = MODEL_PRESETS[name]
    model = init_gpt(spec, seed=0)
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters()


def test_parameter_count_matches_spec_for_gqa_head_dim_and_untied():
    spec = dataclasses.replace(MODEL_PRESETS["llama-tiny"], head_dim=24, num_query_groups=2, num_layers=2)
    model = GPT(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters()
    assert model.layers[0].attention.qkv.out_features == (8 + 2 * 2) * 24


def test_init_is_deterministic_and_leaves_global_rng_alone():
    spec = MODEL_PRESETS["gpt-tiny"]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second, other = init_gpt(spec, 1), init_gpt(spec, 1), init_gpt(spec, 2)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
        if "weight" in name and "norm" not in name:
            assert not torch.equal(a, c), name


def test_init_statistics_follow_gpt2():
    spec = MODEL_PRESETS["gpt-small-cpu"]
    model = init_gpt(spec, 0)
    layer = model.layers[0]
    assert layer.attention.qkv.weight.std().item() == pytest.approx(INIT_STD, rel=0.05)
    residual = INIT_STD / math.sqrt(2 * spec.num_layers)
    assert layer.mlp.fc2.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert layer.attention.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.all(layer.attention.qkv.bias == 0) and torch.all(layer.attention_norm.weight == 1)


def test_tied_and_untied_heads():
    tied, untied = init_gpt(MODEL_PRESETS["gpt-tiny"], 0), init_gpt(MODEL_PRESETS["llama-tiny"], 0)
    assert tied.head.output.weight is tied.embedding.token.weight
    assert untied.head.output.weight is not untied.embedding.token.weight


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_initial_loss_is_near_log_vocab_and_backward_reaches_every_parameter(name):
    spec = MODEL_PRESETS[name]
    model = init_gpt(spec, 0)
    tokens, targets = _batch(spec)
    loss = model(tokens, targets, DropoutKey(0, 0))
    assert loss.item() == pytest.approx(math.log(spec.vocab_size), rel=0.02)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_attention_is_causal(name):
    spec = dataclasses.replace(MODEL_PRESETS[name], dropout=0.0)
    model = init_gpt(spec, 0).eval()
    tokens, _ = _batch(spec)
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % spec.vocab_size
    hidden = [model.head.logits(_run_layers(model, t)) for t in (tokens, changed)]
    assert torch.allclose(hidden[0][:, :20], hidden[1][:, :20], atol=1e-6)
    assert not torch.allclose(hidden[0][:, 20:], hidden[1][:, 20:])


def _run_layers(model, tokens):
    hidden = model.embedding(tokens)
    for layer in model.layers:
        hidden = layer(hidden)
    return hidden


def test_fused_attention_flag_matches_explicit_without_dropout():
    spec = dataclasses.replace(MODEL_PRESETS["llama-tiny"], dropout=0.0)
    tokens, targets = _batch(spec)
    explicit, fused = init_gpt(spec, 0), init_gpt(spec, 0, fused_attention=True)
    assert torch.allclose(explicit(tokens, targets), fused(tokens, targets), rtol=1e-5)


def test_grouped_query_core_equals_repeated_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    core = AttentionCore(dropout=0.0, layer_index=0)
    expected = core(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1))
    assert torch.allclose(core(q, k, v), expected)
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert torch.allclose(expected, reference, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8)
    rq, rk = apply_rope(q, k)
    scores = rq[0, 0] @ rk[0, 0].T
    assert torch.allclose(scores[3, 1], scores[4, 2], atol=1e-5) and torch.allclose(scores[5, 5], scores[0, 0], atol=1e-5)
    assert not torch.allclose(scores[3, 1], scores[3, 2])
    shifted_q, shifted_k = apply_rope(q, k, position_offset=2)
    assert torch.allclose(shifted_q[0, 0, 0], rq[0, 0, 2], atol=1e-6)


def test_sequence_longer_than_spec_is_spec_error():
    spec = MODEL_PRESETS["gpt-tiny"]
    tokens, targets = _batch(spec, seq=spec.seq_length + 1)
    with pytest.raises(SpecError, match="exceeds seq_length"):
        init_gpt(spec, 0)(tokens, targets)


# --- keyed dropout ---------------------------------------------------------------------------------


def test_keep_fraction_is_one_minus_p():
    for p in (0.1, 0.5):
        keep = dropout_keep_mask((64, 8, 32, 32), p, DropoutKey(3, 1), layer=2, site=DropoutSite.ATTENTION_PROBS)
        assert keep.float().mean().item() == pytest.approx(1 - p, abs=0.005)


def test_masks_differ_across_keys_layers_and_sites_and_are_uncorrelated():
    shape, p = (4, 32, 64), 0.5
    base = dropout_keep_mask(shape, p, DropoutKey(1, 1), 0, DropoutSite.MLP_OUTPUT).float()
    others = [dropout_keep_mask(shape, p, DropoutKey(2, 1), 0, DropoutSite.MLP_OUTPUT),
              dropout_keep_mask(shape, p, DropoutKey(1, 2), 0, DropoutSite.MLP_OUTPUT),
              dropout_keep_mask(shape, p, DropoutKey(1, 1), 1, DropoutSite.MLP_OUTPUT),
              dropout_keep_mask(shape, p, DropoutKey(1, 1), 0, DropoutSite.ATTENTION_OUTPUT)]
    for other in others:
        agreement = (base == other.float()).float().mean().item()
        assert agreement == pytest.approx(0.5, abs=0.03)
    assert torch.equal(base, dropout_keep_mask(shape, p, DropoutKey(1, 1), 0, DropoutSite.MLP_OUTPUT).float())


def test_local_slice_of_mask_equals_slice_of_global_mask():
    key, shape = DropoutKey(7, 3), (4, 8, 16, 16)
    full = dropout_keep_mask(shape, 0.3, key, 5, DropoutSite.ATTENTION_PROBS)
    heads = dropout_keep_mask((4, 2, 16, 16), 0.3, key, 5, DropoutSite.ATTENTION_PROBS, offsets=(0, 6, 0, 0))
    assert torch.equal(heads, full[:, 6:8])
    sequence = dropout_keep_mask((4, 8, 4, 16), 0.3, key, 5, DropoutSite.ATTENTION_PROBS, offsets=(0, 0, 12, 0))
    assert torch.equal(sequence, full[:, :, 12:16])


def test_sample_offset_makes_masks_independent_of_micro_batching():
    key, shape = DropoutKey(7, 3), (6, 10, 8)
    whole = dropout_keep_mask(shape, 0.2, key, 0, DropoutSite.EMBEDDING)
    parts = [dropout_keep_mask((2, 10, 8), 0.2, key.for_samples(start), 0, DropoutSite.EMBEDDING) for start in (0, 2, 4)]
    assert torch.equal(torch.cat(parts), whole)


def test_keyed_dropout_scales_kept_values_and_is_off_in_eval():
    x = torch.ones(4, 16, 32)
    y = keyed_dropout(x, 0.25, DropoutKey(0, 0), 0, DropoutSite.MLP_OUTPUT, training=True)
    assert torch.equal(torch.unique(y), torch.tensor([0.0, 1 / 0.75]))
    assert keyed_dropout(x, 0.25, DropoutKey(0, 0), 0, DropoutSite.MLP_OUTPUT, training=False) is x
    assert keyed_dropout(x, 0.0, DropoutKey(0, 0), 0, DropoutSite.MLP_OUTPUT, training=True) is x


def test_model_loss_is_a_function_of_the_key():
    spec = MODEL_PRESETS["gpt-tiny"]
    model = init_gpt(spec, 0).train()
    tokens, targets = _batch(spec)
    same = [model(tokens, targets, DropoutKey(1, 5)).item() for _ in range(2)]
    assert same[0] == same[1]
    assert model(tokens, targets, DropoutKey(1, 6)).item() != same[0]
    model.eval()
    assert model(tokens, targets, DropoutKey(1, 5)).item() == model(tokens, targets, DropoutKey(1, 6)).item()
