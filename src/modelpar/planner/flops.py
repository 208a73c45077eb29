"""Floating-point operations of one training step, and the utilisations derived from them.

Only matrix multiplications are counted (2 FLOPs per multiply-accumulate); norms, softmax,
activations and residual additions are a fraction of a percent at the sizes this planner targets,
and every paper below leaves them out too. Attention is counted over the full s x s score matrix
(no causal halving), as in all three papers and Megatron-LM's `num_floating_point_operations`.

Forward FLOPs of one transformer layer per token (h hidden, q = heads x head_dim the query width,
k = kv_heads x head_dim the key/value width, f the MLP width, s the sequence length):

    2 [h (q + 2k) + q h + m h f] + 4 s q          (m = 2 MLP matrices for GELU, 3 for SwiGLU)
     ^ QKV, output projection, MLP    ^ QK^T (2 s q) and attention over values (2 s q)

For standard GPT (q = k = h, f = 4h, m = 2) this is 24 h^2 + 4 s h. The backward pass costs
twice the forward, so one step over B sequences costs, with the logits layer (2 h V per token):

    model FLOPs = 3 B s [l (24 h^2 + 4 s h) + 2 h V] = 72 B s l h^2 (1 + s/(6h) + V/(12 l h))

which is exactly Korthikanti et al. 2022 (arXiv 2205.05198) eq. 7. Full activation recomputation
runs every layer's forward once more (not the logits): 96 B s l h^2 (1 + s/(6h) + V/(16 l h)),
Narayanan et al. 2021 (arXiv 2104.04473) eq. 3.

Selective recomputation re-runs only the attention core, QK^T and attention over values:
4 B s^2 h per layer, i.e. 72 B s l h^2 (1 + 2s/(9h) + V/(12 l h)). Korthikanti eq. 8 prints
s/(3h) instead of 2s/(9h); the authors confirmed the printed equation is wrong
(NVIDIA/Megatron-LM issue #523: "there are 16 BL(s**2)h FLOPs, not 24, so the second term should
be 2/9 not 1/3"). The paper's HFU column (Table 5) and its 2.7% / 1.6% overhead figures were
computed with the printed form; the unit tests reproduce them from it and show the difference.
"""

from __future__ import annotations

from modelpar.specs.errors import SpecError
from modelpar.specs.model import ModelSpec
from modelpar.specs.plan import RECOMPUTE_MODES


def matmul_weights_per_layer(model: ModelSpec) -> int:
    """Weights of one layer that take part in a matrix multiply (no biases, no norms):
    h (q + 2k) for QKV, q h for the output projection, m h f for the MLP."""
    h = model.hidden_size
    q = model.attention_width
    kv = model.kv_heads * model.attention_head_dim
    return h * (q + 2 * kv) + q * h + model.mlp_matrices * h * model.ffn_hidden_size


def attention_core_forward_flops(model: ModelSpec, tokens: int) -> float:
    """QK^T and attention over values for `tokens` tokens: 2 * 2 * tokens * s * q.

    Independent of the number of key/value heads (every query head still scores s keys).
    """
    return 4.0 * tokens * model.seq_length * model.attention_width


def forward_flops_per_layer(model: ModelSpec, tokens: int) -> float:
    """Matmul + attention FLOPs of one layer's forward over `tokens` tokens (2 FLOPs per MAC).

    2 tokens [h (q + 2k) + q h + m h f] + 4 tokens s q; for GPT with f = 4h and multi-head
    attention, 24 tokens h^2 + 4 tokens s h (Narayanan et al. 2021, Appendix; Korthikanti et al.
    2022, Sec. 6). `tokens` are whole sequences of `model.seq_length`.
    """
    return 2.0 * tokens * matmul_weights_per_layer(model) + attention_core_forward_flops(model, tokens)


def logits_forward_flops(model: ModelSpec, tokens: int) -> float:
    """The output projection onto the vocabulary: 2 tokens h V."""
    return 2.0 * tokens * model.hidden_size * model.vocab_size


def model_flops_per_iteration(model: ModelSpec, global_batch_size: int) -> float:
    """FLOPs the model needs per step, without recomputation: 3 x (l layer forwards + logits).

    Korthikanti et al. 2022 eq. 7, 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) for standard GPT,
    generalised to GQA/MQA, SwiGLU and head_dim != h/a. Equals Megatron-LM's
    `num_floating_point_operations` and Narayanan eq. 3 with factor 3 instead of 4.
    """
    tokens = global_batch_size * model.seq_length
    forward = model.num_layers * forward_flops_per_layer(model, tokens) + logits_forward_flops(model, tokens)
    return 3.0 * forward


def recompute_flops_per_iteration(model: ModelSpec, global_batch_size: int, recompute: str) -> float:
    """Extra forward FLOPs that recomputation adds per step.

    full: one more forward of every layer (Narayanan eq. 3's fourth pass);
    selective: QK^T and attention over values of every layer, 4 B s^2 q l (Korthikanti Sec. 5,
    with the eq. 8 erratum described in the module docstring); none: 0.
    """
    if recompute not in RECOMPUTE_MODES:
        raise SpecError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {recompute!r}")
    tokens = global_batch_size * model.seq_length
    if recompute == "full":
        return model.num_layers * forward_flops_per_layer(model, tokens)
    if recompute == "selective":
        return model.num_layers * attention_core_forward_flops(model, tokens)
    return 0.0


def hardware_flops_per_iteration(model: ModelSpec, global_batch_size: int, recompute: str) -> float:
    """FLOPs the hardware executes per step: model FLOPs + recomputed forward FLOPs.

    full, standard GPT: 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) (Narayanan et al. 2021 eq. 3);
    selective: 72 B s l h^2 (1 + 2s/(9h) + V/(12 l h)) (Korthikanti et al. 2022 eq. 8 as
    corrected by its authors; the paper prints s/(3h)).
    """
    return model_flops_per_iteration(model, global_batch_size) + recompute_flops_per_iteration(
        model, global_batch_size, recompute
    )


def palm_model_flops_per_token(model: ModelSpec) -> float:
    """PaLM's model FLOPs per token, 6 N + 12 L H Q T (Chowdhery et al. 2022, Appendix B).

    H heads of width Q, T the sequence length. N counts every weight used in a matrix multiply:
    the layers plus the output projection onto the vocabulary. PaLM's N = 540.35B includes its
    input/output embedding, which it shares with that projection; with this N the paper's 46.2%
    MFU at 238.3K tokens/s on 6144 TPU v4 chips is reproduced (without the embedding, 45.8%).
    A learned position table and an untied input embedding (lookups, not matmuls) are excluded.
    Unlike `model_flops_per_iteration` this counts the spec's biases and norm weights (< 0.01%).
    """
    n = model.num_layers * model.parameters_per_layer() + model.vocab_size * model.hidden_size
    attention = 12.0 * model.num_layers * model.num_attention_heads * model.attention_head_dim * model.seq_length
    return 6.0 * n + attention


def _utilisation(flops: float, step_time_s: float, num_devices: int, peak_tflops: float) -> float:
    if step_time_s <= 0 or num_devices <= 0 or peak_tflops <= 0:
        raise SpecError(
            f"utilisation needs positive step time, devices and peak TFLOP/s; got {step_time_s!r}, "
            f"{num_devices!r}, {peak_tflops!r}"
        )
    return flops / (step_time_s * num_devices * peak_tflops * 1e12)


def mfu(model: ModelSpec, global_batch_size: int, step_time_s: float, num_devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: model FLOPs per step / (step time x devices x peak FLOP/s)
    (Chowdhery et al. 2022, Sec. 4.1 / App. B; Korthikanti et al. 2022, Sec. 6.3)."""
    return _utilisation(model_flops_per_iteration(model, global_batch_size), step_time_s, num_devices, peak_tflops)


def hfu(
    model: ModelSpec, global_batch_size: int, recompute: str, step_time_s: float, num_devices: int, peak_tflops: float
) -> float:
    """Hardware FLOPs utilisation: like `mfu`, but counting the recomputed forward FLOPs."""
    return _utilisation(
        hardware_flops_per_iteration(model, global_batch_size, recompute), step_time_s, num_devices, peak_tflops
    )
