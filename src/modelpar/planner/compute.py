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

Measured devices (`modelpar profile`, the eager CPU runtime). A DeviceSpec may carry measured
values that replace the global constants for that device only: `matmul_efficiency`,
`memory_bandwidth_efficiency`, `kernel_overhead_us` (per eager op), `matmul_operand_bandwidth_gb_per_s`
(a CPU BLAS packs both operands and the result block by block, at a rate far below streaming
bandwidth: the operand term of the GEMM time uses it), `value_bytes` (4: fp32 training),
`dropout_ns_per_element` (the runtime's keyed-hash dropout, far dearer than a fused 1-byte mask)
and `optimizer_ns_per_parameter`, and fixed per-layer costs (`layer_forward_overhead_us`,
`layer_backward_overhead_us`, `dropout_call_overhead_us`: module calls and Python-level functions
that a tiny layer shows, `layer_fixed_overheads`). With `attention_kernel = 'explicit'` the attention core is the
textbook one the CPU runtime runs (`models.gpt.AttentionCore`): two batched GEMMs over the whole
s x s score matrix (no causal skipping) and the scale, causal mask, softmax (and dropout) as
separate kernels that each read and write the b a s^2 scores (Korthikanti et al. 2022, Sec. 4.1
count the same tensors); backward: four batched GEMMs, the softmax backward (reads P and dP,
writes dS) and the scale's. Presets carry none of these, so the GPU validation is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelpar.caching import memo
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


def value_bytes(device: DeviceSpec) -> int:
    """Bytes per activation / weight value: the device's training precision (default 16-bit)."""
    return device.value_bytes if device.value_bytes is not None else VALUE_BYTES


def kernel_overhead_s(device: DeviceSpec) -> float:
    """Fixed seconds per kernel: measured for the device, else KERNEL_OVERHEAD_S."""
    return device.kernel_overhead_us * 1e-6 if device.kernel_overhead_us is not None else KERNEL_OVERHEAD_S


def _matmul_rate(device: DeviceSpec) -> float:
    efficiency = device.matmul_efficiency if device.matmul_efficiency is not None else MATMUL_EFFICIENCY
    return device.peak_tflops * 1e12 * efficiency


def _memory_rate(device: DeviceSpec) -> float:
    efficiency = (device.memory_bandwidth_efficiency if device.memory_bandwidth_efficiency is not None
                  else MEMORY_BANDWIDTH_EFFICIENCY)
    return device.memory_bandwidth_gb_per_s * 1e9 * efficiency


def _operand_rate(device: DeviceSpec) -> float:
    if device.matmul_operand_bandwidth_gb_per_s is not None:
        return device.matmul_operand_bandwidth_gb_per_s * 1e9
    return _memory_rate(device)


def gemm_time(device: DeviceSpec, m: float, n: float, k: float, batch: float = 1.0) -> float:
    """Seconds for `batch` products (m x k) @ (k x n) in 16-bit: FLOP term + operand traffic term."""
    if min(m, n, k, batch) <= 0:
        raise SpecError(f"GEMM dimensions must be positive, got m={m}, n={n}, k={k}, batch={batch}")
    flops = 2.0 * m * n * k * batch
    traffic = value_bytes(device) * batch * (m * k + k * n + m * n)
    return flops / _matmul_rate(device) + traffic / _operand_rate(device) + kernel_overhead_s(device)


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
    return num_bytes / _memory_rate(device) + kernels * kernel_overhead_s(device)


def dropout_time(device: DeviceSpec, elements: float) -> float:
    """Extra seconds of dropout on `elements` values beyond the kernel it is fused into: a
    MASK_BYTES mask written at memory bandwidth (the fused backward reads it back: charged by the
    caller), or the measured per-element cost of the device's dropout (`dropout_ns_per_element`:
    mask generation and application as separate eager ops, forward and backward together,
    charged to the forward; recomputation charges its backward share once more)."""
    if device.dropout_ns_per_element is not None:
        return elements * device.dropout_ns_per_element * 1e-9
    return MASK_BYTES * elements / _memory_rate(device)


def layer_fixed_overheads(device: DeviceSpec, dropout: bool) -> tuple[float, float]:
    """(forward, backward) fixed seconds of one layer beyond its kernels, measured for eager
    runtimes (`modelpar profile`): module calls and Python-level autograd functions, and with
    dropout the per-layer cost of drawing the keyed masks. Zero for the presets (fused kernels)."""
    forward = (device.layer_forward_overhead_us or 0.0) * 1e-6
    if dropout:
        forward += (device.dropout_call_overhead_us or 0.0) * 1e-6
    return forward, (device.layer_backward_overhead_us or 0.0) * 1e-6


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


@memo(8192)
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

    dropout = model.dropout > 0.0
    if device.attention_kernel == "explicit":
        attention_fwd, attention_bwd = explicit_attention_time(model, device, b, t)
    else:  # one fused kernel per (sequence, head) in the forward, one in the backward
        batch = b * heads
        core_flops = 4.0 * s * s * head * batch * CAUSAL_FRACTION  # Q K^T and P V, causal blocks only
        head_io = VALUE_BYTES * batch * s * head  # bytes of one [s, head] operand over all heads
        attention_fwd = core_flops / _matmul_rate(device) + memory_bound_time(device, 4 * head_io, 1)  # Q, K, V, O
        attention_bwd = FLASH_BACKWARD_FLOP_RATIO * core_flops / _matmul_rate(device) + memory_bound_time(
            device, 8 * head_io, 1  # reads Q, K, V, O, dO; writes dQ, dK, dV
        )

    # Memory-bound kernels outside the attention core.
    vb = value_bytes(device)
    replicated = tokens * h / (t if sequence_parallel else 1)  # elements of [s, b, h] on this rank
    norms = 2 * (2 * vb) * replicated  # two norms, each reads and writes [s, b, h]
    residuals = 2 * (3 * vb) * replicated  # bias + dropout + residual add, twice
    activation = (3 if model.activation == "swiglu" else 2) * vb * tokens * f
    transpose = 2 * vb * tokens * q  # layout copy of the attention context to [s, b, q]
    elementwise_bytes = norms + residuals + activation + transpose
    elementwise_kernels = 6
    residual_dropout = 2 * dropout_time(device, replicated) if dropout else 0.0
    elementwise_fwd = memory_bound_time(device, elementwise_bytes, elementwise_kernels) + residual_dropout
    elementwise_bwd = memory_bound_time(device, BACKWARD_TRAFFIC_FACTOR * elementwise_bytes, elementwise_kernels)
    if dropout and device.dropout_ns_per_element is None:  # the fused backward kernel reads the mask back
        elementwise_bwd += BACKWARD_TRAFFIC_FACTOR * residual_dropout
    fixed_fwd, fixed_bwd = layer_fixed_overheads(device, dropout)
    elementwise_fwd += fixed_fwd
    elementwise_bwd += fixed_bwd

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


def explicit_attention_time(model: ModelSpec, device: DeviceSpec, micro_batch_size: int,
                            tensor_parallel: int) -> tuple[float, float]:
    """(forward, backward) seconds of the unfused attention core on one tensor-parallel rank
    (module docstring), with E = b a s^2 / t score elements:

    forward: S = Q K^T and O = P V (batched s x s x d GEMMs; the query heads of a KV group share
    one batched product), then scale, causal mask and softmax, each reading and writing E values
    (3 x 2 E values), and dropout on P;
    backward: the four GEMMs of dQ, dK, dP, dV; the softmax backward (reads P and dP, writes dS:
    3 E) and the scale (2 E); dropout's backward is one more pass (2 E).
    """
    b, s, t = micro_batch_size, model.seq_length, tensor_parallel
    head = model.attention_head_dim
    batch = b * model.num_attention_heads / t
    vb = value_bytes(device)
    scores = batch * s * s
    scores_fwd, scores_bwd = gemm_with_backward_time(device, s, s, head, batch)  # Q K^T
    context_fwd, context_bwd = gemm_with_backward_time(device, s, head, s, batch)  # P V
    forward = scores_fwd + context_fwd + memory_bound_time(device, 3 * (2 * vb) * scores, 4)
    backward = scores_bwd + context_bwd + memory_bound_time(device, 5 * vb * scores, 2)
    if model.dropout > 0.0:
        forward += dropout_time(device, scores)
        if device.dropout_ns_per_element is None:
            backward += memory_bound_time(device, 2 * vb * scores, 1)  # gradient times the saved mask
    return forward, backward


@memo(4096)
def head_compute(
    model: ModelSpec, device: DeviceSpec, micro_batch_size: int, tensor_parallel: int, sequence_parallel: bool
) -> tuple[float, float]:
    """(forward, backward) seconds of the last stage's head for one micro-batch: final norm,
    vocab-parallel logits GEMM (tokens x h @ h x V/t) and cross-entropy over the fp32 logits."""
    t = tensor_parallel
    tokens = micro_batch_size * model.seq_length
    vocab = model.vocab_size / t
    logits_fwd, logits_bwd = gemm_with_backward_time(device, tokens, vocab, model.hidden_size)
    norm_bytes = 2 * value_bytes(device) * tokens * model.hidden_size / (t if sequence_parallel else 1)
    loss_bytes = LOGIT_BYTES_PER_ELEMENT * tokens * vocab
    forward = logits_fwd + memory_bound_time(device, norm_bytes + loss_bytes / 2, 4)
    backward = logits_bwd + memory_bound_time(device, BACKWARD_TRAFFIC_FACTOR * norm_bytes + loss_bytes / 2, 3)
    return forward, backward


@memo(4096)
def embedding_compute(
    model: ModelSpec, device: DeviceSpec, micro_batch_size: int, tensor_parallel: int, sequence_parallel: bool
) -> tuple[float, float]:
    """(forward, backward) seconds of the first stage's embedding for one micro-batch: lookup
    (+ learned positions) + dropout writing [s, b, h]; backward accumulates rows of the fp32
    embedding gradient."""
    tokens = micro_batch_size * model.seq_length
    width = tokens * model.hidden_size
    forward = memory_bound_time(device, 3 * value_bytes(device) * width, 2)
    if model.dropout > 0:
        forward += dropout_time(device, width)
    backward_bytes = 2 * 4 * width
    return forward, memory_bound_time(device, backward_bytes, 2)


def optimizer_time(device: DeviceSpec, parameters: float) -> float:
    """Adam step over `parameters` local parameters: memory-bound, ADAM_BYTES_PER_PARAMETER each,
    or the device's measured `optimizer_ns_per_parameter`."""
    if device.optimizer_ns_per_parameter is not None:
        return parameters * device.optimizer_ns_per_parameter * 1e-9
    return memory_bound_time(device, ADAM_BYTES_PER_PARAMETER * parameters, 4)
