"""Compute time of a transformer layer on one device, operator by operator.

Two kinds of kernels (a roofline, Williams, Waterman & Patterson 2009, with the two terms added
because a kernel rarely hides all of one behind the other):

- matrix multiplies: an (M x K) @ (K x N) product, `batch` times, does F = 2 M N K batch FLOPs and
  moves Q = 2 batch (M K + K N + M N) bytes of 16-bit operands:

      t = F / (peak x MATMUL_EFFICIENCY) + Q / (HBM x MEMORY_BANDWIDTH_EFFICIENCY) + KERNEL_OVERHEAD_S

  so a GEMM whose arithmetic intensity F / Q is low -- a narrow tensor-parallel shard, the
  attention core with its head_dim-wide inner dimension, a device with high FLOP/byte ratio --
  runs at a smaller fraction of peak, with no per-shape table;
- memory-bound kernels (norms, GELU/SwiGLU, dropout, bias + dropout + residual add, layout
  copies, cross-entropy, embedding lookup, the optimizer step): t = bytes /
  (HBM x MEMORY_BANDWIDTH_EFFICIENCY) + KERNEL_OVERHEAD_S per kernel.

The layer is Megatron-LM's GPT layer on one tensor-parallel rank: pre-norm; QKV and MLP-in
column-parallel (N / t), output projection and MLP-out row-parallel (K / t), heads split over t;
fused bias-GELU (or SwiGLU) and fused bias-dropout-add. The norms, residual adds and their
dropouts act on the whole [s, b, h] activation on every tensor rank, or on 1/t of it with
sequence parallelism.

The attention core is a fused, memory-efficient kernel (FlashAttention, Dao et al. 2022; Dao
2023): the s x s scores never reach memory, so it costs its FLOPs at the matmul rate plus reading
Q, K, V and writing O (backward: 2.5x the forward FLOPs, reading Q, K, V, O, dO and writing dQ,
dK, dV); with a causal mask only half of the score blocks are computed. This is what current
Megatron-LM (Transformer Engine), DeepSpeed and PyTorch SDPA run. Runs from before it (Megatron
2021-22 with its fused softmax, which writes the scores to memory) took longer on models with a
large s / h; the validation report shows it on the smallest Narayanan et al. 2021 models.

Backward: each GEMM becomes two (input gradient and weight gradient) of the same FLOPs; each
memory-bound kernel reads the saved input and the output gradient and writes the input gradient,
twice the traffic of its forward (which reads one tensor and writes one).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from modelpar.planner.constants import (
    ADAM_BYTES_PER_PARAMETER,
    KERNEL_OVERHEAD_S,
    MATMUL_EFFICIENCY,
    MEMORY_BANDWIDTH_EFFICIENCY,
)
from modelpar.specs.cluster import DeviceSpec
from modelpar.specs.errors import SpecError
from modelpar.specs.model import ModelSpec

VALUE_BYTES = 2  # 16-bit activations and weights
MASK_BYTES = 1  # dropout masks (Korthikanti et al. 2022 Sec. 4.1)
LOGIT_BYTES_PER_ELEMENT = 28
"""Cross-entropy over vocab-parallel logits, forward + backward, bytes per logit: cast to fp32
(read 2, write 4), max/exp/sum (read 4, write 4), normalise (read 4, write 4), gradient (read 4,
write 2)."""
CAUSAL_FRACTION = 0.5
"""Share of the s x s score blocks a causal attention kernel computes (the rest is masked)."""
FLASH_BACKWARD_FLOP_RATIO = 2.5
"""FlashAttention's backward recomputes Q K^T and P and then does four products: 5 against the
forward's 2 (Dao 2023, FlashAttention-2, Sec. 3.1.2)."""
BACKWARD_TRAFFIC_FACTOR = 2.0  # backward of a memory-bound kernel vs its forward (module docstring)


def _matmul_rate(device: DeviceSpec) -> float:
    return device.peak_tflops * 1e12 * MATMUL_EFFICIENCY


def gemm_time(device: DeviceSpec, m: float, n: float, k: float, batch: float = 1.0) -> float:
    """Seconds for `batch` products (m x k) @ (k x n) in 16-bit: FLOP term + operand traffic term."""
    if min(m, n, k, batch) <= 0:
        raise SpecError(f"GEMM dimensions must be positive, got m={m}, n={n}, k={k}, batch={batch}")
    flops = 2.0 * m * n * k * batch
    traffic = VALUE_BYTES * batch * (m * k + k * n + m * n)
    return (
        flops / _matmul_rate(device)
        + traffic / (device.memory_bandwidth_gb_per_s * 1e9 * MEMORY_BANDWIDTH_EFFICIENCY)
        + KERNEL_OVERHEAD_S
    )


def gemm_with_backward_time(
    device: DeviceSpec, m: float, n: float, k: float, batch: float = 1.0
) -> tuple[float, float]:
    """(forward, backward) seconds of Y = X W with X (m x k), W (k x n): the backward computes
    dX = dY W^T (m x n @ n x k) and dW = X^T dY (k x m @ m x n)."""
    forward = gemm_time(device, m, n, k, batch)
    backward = gemm_time(device, m, k, n, batch) + gemm_time(device, k, n, m, batch)
    return forward, backward


def memory_bound_time(device: DeviceSpec, num_bytes: float, kernels: int = 1) -> float:
    """Seconds for `kernels` memory-bound kernels moving `num_bytes` in total."""
    bandwidth = device.memory_bandwidth_gb_per_s * 1e9 * MEMORY_BANDWIDTH_EFFICIENCY
    return num_bytes / bandwidth + kernels * KERNEL_OVERHEAD_S


@dataclass(frozen=True)
class LayerCompute:
    """Seconds one transformer layer takes on one device for one micro-batch (no communication).

    `recompute_s` is the forward work the backward pass redoes: the whole forward with full
    recomputation, the attention core (the fused QK^T, softmax, dropout, attention over V) with
    selective.
    """

    matmul_forward_s: float
    attention_forward_s: float  # the fused attention core (FlashAttention)
    elementwise_forward_s: float  # norms, activation function, residual adds, dropouts, transposes
    matmul_backward_s: float
    attention_backward_s: float
    elementwise_backward_s: float
    recompute_s: float

    @property
    def forward_s(self) -> float:
        return self.matmul_forward_s + self.attention_forward_s + self.elementwise_forward_s

    @property
    def backward_s(self) -> float:
        return self.matmul_backward_s + self.attention_backward_s + self.elementwise_backward_s


@functools.lru_cache(maxsize=8192)
def layer_compute(
    model: ModelSpec, device: DeviceSpec, micro_batch_size: int, tensor_parallel: int, sequence_parallel: bool,
    recompute: str,
) -> LayerCompute:
    """Compute time of one layer for one micro-batch of `micro_batch_size` sequences on one of
    `tensor_parallel` ranks (see the module docstring for the operators counted)."""
    t, b, s = tensor_parallel, micro_batch_size, model.seq_length
    tokens = b * s
    h, head = model.hidden_size, model.attention_head_dim
    q = model.attention_width / t
    kv = max(model.kv_heads / t, 1.0) * head  # each rank keeps at least one key/value head
    f = model.ffn_hidden_size / t
    heads = model.num_attention_heads / t

    # Projections: (m, n, k) with n = output width, k = input width.
    projections = [
        (tokens, q + 2 * kv, h),  # QKV, column-parallel
        (tokens, h, q),  # attention output, row-parallel
        (tokens, f * (model.mlp_matrices - 1), h),  # MLP in (GELU: 1 matrix; SwiGLU: gate + up)
        (tokens, h, f),  # MLP out, row-parallel
    ]
    matmul_fwd = matmul_bwd = 0.0
    for m, n, k in projections:
        forward, backward = gemm_with_backward_time(device, m, n, k)
        matmul_fwd += forward
        matmul_bwd += backward

    # Attention core: one fused kernel per (sequence, head) in the forward, one in the backward.
    batch = b * heads
    dropout = model.dropout > 0.0
    core_flops = 4.0 * s * s * head * batch * CAUSAL_FRACTION  # Q K^T and P V, causal blocks only
    head_io = VALUE_BYTES * batch * s * head  # bytes of one [s, head] operand over all heads
    attention_fwd = core_flops / _matmul_rate(device) + memory_bound_time(device, 4 * head_io, 1)  # Q, K, V, O
    attention_bwd = FLASH_BACKWARD_FLOP_RATIO * core_flops / _matmul_rate(device) + memory_bound_time(
        device, 8 * head_io, 1  # reads Q, K, V, O, dO; writes dQ, dK, dV
    )

    # Memory-bound kernels outside the attention core.
    replicated = tokens * h / (t if sequence_parallel else 1)  # elements of [s, b, h] on this rank
    mask = MASK_BYTES if dropout else 0
    norms = 2 * (2 * VALUE_BYTES) * replicated  # two norms, each reads and writes [s, b, h]
    residuals = 2 * (3 * VALUE_BYTES + mask) * replicated  # bias + dropout + residual add, twice
    activation = (3 if model.activation == "swiglu" else 2) * VALUE_BYTES * tokens * f
    transpose = 2 * VALUE_BYTES * tokens * q  # layout copy of the attention context to [s, b, q]
    elementwise_bytes = norms + residuals + activation + transpose
    elementwise_kernels = 6
    elementwise_fwd = memory_bound_time(device, elementwise_bytes, elementwise_kernels)
    elementwise_bwd = memory_bound_time(device, BACKWARD_TRAFFIC_FACTOR * elementwise_bytes, elementwise_kernels)

    if recompute == "full":
        recompute_s = matmul_fwd + attention_fwd + elementwise_fwd
    elif recompute == "selective":
        recompute_s = attention_fwd
    elif recompute == "none":
        recompute_s = 0.0
    else:
        raise SpecError(f"recompute must be none, selective or full, got {recompute!r}")
    return LayerCompute(
        matmul_forward_s=matmul_fwd,
        attention_forward_s=attention_fwd,
        elementwise_forward_s=elementwise_fwd,
        matmul_backward_s=matmul_bwd,
        attention_backward_s=attention_bwd,
        elementwise_backward_s=elementwise_bwd,
        recompute_s=recompute_s,
    )


@functools.lru_cache(maxsize=4096)
def head_compute(
    model: ModelSpec, device: DeviceSpec, micro_batch_size: int, tensor_parallel: int, sequence_parallel: bool
) -> tuple[float, float]:
    """(forward, backward) seconds of the last stage's head for one micro-batch: final norm,
    vocab-parallel logits GEMM (tokens x h @ h x V/t) and cross-entropy over the fp32 logits."""
    t = tensor_parallel
    tokens = micro_batch_size * model.seq_length
    vocab = model.vocab_size / t
    logits_fwd, logits_bwd = gemm_with_backward_time(device, tokens, vocab, model.hidden_size)
    norm_bytes = 2 * VALUE_BYTES * tokens * model.hidden_size / (t if sequence_parallel else 1)
    loss_bytes = LOGIT_BYTES_PER_ELEMENT * tokens * vocab
    forward = logits_fwd + memory_bound_time(device, norm_bytes + loss_bytes / 2, 4)
    backward = logits_bwd + memory_bound_time(device, BACKWARD_TRAFFIC_FACTOR * norm_bytes + loss_bytes / 2, 3)
    return forward, backward


@functools.lru_cache(maxsize=4096)
def embedding_compute(
    model: ModelSpec, device: DeviceSpec, micro_batch_size: int, tensor_parallel: int, sequence_parallel: bool
) -> tuple[float, float]:
    """(forward, backward) seconds of the first stage's embedding for one micro-batch: lookup
    (+ learned positions) + dropout writing [s, b, h]; backward accumulates rows of the fp32
    embedding gradient."""
    tokens = micro_batch_size * model.seq_length
    width = tokens * model.hidden_size
    forward_bytes = (3 * VALUE_BYTES + (MASK_BYTES if model.dropout > 0 else 0)) * width
    backward_bytes = 2 * 4 * width
    return memory_bound_time(device, forward_bytes, 2), memory_bound_time(device, backward_bytes, 2)


def optimizer_time(device: DeviceSpec, parameters: float) -> float:
    """Adam step over `parameters` local parameters: memory-bound, ADAM_BYTES_PER_PARAMETER each."""
    return memory_bound_time(device, ADAM_BYTES_PER_PARAMETER * parameters, 4)
