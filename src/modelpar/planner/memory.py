"""Memory per device: model states (weights, gradients, Adam) and stored activations.

Model states (Rajbhandari et al. 2020, "ZeRO", Sec. 3.1 and Fig. 1). Mixed-precision Adam keeps
2 bytes of 16-bit weights, 2 bytes of 16-bit gradients and 12 bytes of optimizer state (fp32
master weights, momentum, variance) per parameter: 16 bytes, the figure Narayanan et al. 2021 and
Korthikanti et al. 2022 use too. That is the default (`MIXED_PRECISION`). Megatron-LM's bf16
default accumulates gradients into fp32 `main_grad` buffers, 18 bytes per parameter
(`MEGATRON_BF16`, Megatron docs/distrib_optimizer.md). ZeRO shards over the d data-parallel
replicas: stage 1 (= Megatron's distributed optimizer) the optimizer states, 2 + 2 + 12/d;
stage 2 also the gradients, 2 + (2 + 12)/d; stage 3 also the weights, (2 + 2 + 12)/d.
Transient buckets and all-gather buffers of ZeRO/FSDP are not counted.

Parameters of a pipeline stage: its l/p layers (sharded over t: QKV, output projection and MLP
weights and the column-parallel biases; norms and row-parallel biases replicated); the first
stage adds the word embedding (vocab-parallel, V h / t) and a learned position table
(replicated, s h); the last stage adds the final norm and the output head (vocab-parallel,
V h / t) when it is untied, or when it is tied but p > 1: Megatron then keeps a copy of the word
embedding on the last stage, with its own gradient and optimizer state.

Activations (Korthikanti et al. 2022, Sec. 4 and Table 2): see `activation_terms`. Per device:

    in_flight_chunks x layers_per_chunk x activation_bytes_per_layer
    + the working set of recomputing one layer (full: that layer's activations without
      recomputation; selective: its attention core)
    + buffers (`embedding_and_logits`): the embedding dropout mask of each in-flight micro-batch
      on the first stage (the embedding output itself is the first layer's input, already
      counted), and on the last stage the final-norm input, the output-projection input and the
      logits in fp32 for the cross-entropy (b s V / t x 4 bytes; Megatron casts the logits to
      fp32), for one micro-batch (1F1B, interleaved) or all in flight (GPipe).

Not counted: activation gradients and other transients of the backward pass, communication
buffers, the CUDA context and allocator fragmentation (typically a few GB on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from modelpar.specs.errors import SpecError
from modelpar.specs.model import ModelSpec
from modelpar.specs.plan import RECOMPUTE_MODES, ZERO_STAGES, ParallelPlan


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter for weights, gradients and optimizer states, and per activation value."""

    weight_bytes: float
    gradient_bytes: float
    optimizer_bytes: float
    activation_bytes: int

    @property
    def bytes_per_parameter(self) -> float:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes


MIXED_PRECISION = Precision(weight_bytes=2, gradient_bytes=2, optimizer_bytes=12, activation_bytes=2)
"""16-bit weights and gradients, fp32 Adam (master, m, v): 16 bytes/parameter (ZeRO Sec. 3.1)."""
MEGATRON_BF16 = Precision(weight_bytes=2, gradient_bytes=4, optimizer_bytes=12, activation_bytes=2)
"""Megatron-LM bf16 with fp32 main gradients: 18 bytes/parameter."""
FULL_FP32 = Precision(weight_bytes=4, gradient_bytes=4, optimizer_bytes=8, activation_bytes=4)
"""fp32 weights, gradients and Adam m, v (no master copy): 16 bytes/parameter, fp32 activations."""
PRECISIONS = {"mixed": MIXED_PRECISION, "megatron-bf16": MEGATRON_BF16, "fp32": FULL_FP32}
"""The recipes by name (`modelpar estimate --precision`)."""
RUNTIME_PRECISION = {"fp32": FULL_FP32, "bf16": MEGATRON_BF16}
"""The recipe `modelpar train --dtype` runs (`runtime.precision`: bf16 keeps fp32 main gradients)."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one device, by kind, and the device's capacity."""

    parameters: float
    gradients: float
    optimizer_states: float
    activations: float
    embedding_and_logits: float  # embedding dropout masks; final norm/head inputs and fp32 logits
    total: float
    capacity: float

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def shortfall(self) -> float:
        """Bytes missing (total - capacity), 0 when it fits."""
        return max(0.0, self.total - self.capacity)

    def largest_component(self) -> tuple[str, float]:
        components = (
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer_states", self.optimizer_states),
            ("activations", self.activations),
            ("embedding_and_logits", self.embedding_and_logits),
        )
        return max(components, key=lambda item: item[1])


# --- model states ------------------------------------------------------------------------------


def model_state_bytes_per_parameter(
    zero_stage: int, data_parallel: int, precision: Precision = MIXED_PRECISION
) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per parameter on one device after ZeRO sharding.

    ZeRO-1 divides the optimizer states by d, ZeRO-2 also the gradients, ZeRO-3 also the weights
    (Rajbhandari et al. 2020, Fig. 1: 7.5B parameters, d = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB).
    """
    if zero_stage not in ZERO_STAGES:
        raise SpecError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    d = data_parallel
    weight, gradient, optimizer = precision.weight_bytes, precision.gradient_bytes, precision.optimizer_bytes
    return (
        weight / d if zero_stage >= 3 else weight,
        gradient / d if zero_stage >= 2 else gradient,
        optimizer / d if zero_stage >= 1 else optimizer,
    )


def _kv_width_per_device(model: ModelSpec, tensor_parallel: int) -> float:
    """Key (or value) width one tensor-parallel rank holds: kv_heads/t heads, at least one head
    (with fewer KV groups than ranks each group is replicated, as in Megatron)."""
    return max(model.kv_heads / tensor_parallel, 1.0) * model.attention_head_dim


def layer_parameters_per_device(model: ModelSpec, tensor_parallel: int) -> float:
    """Parameters of one layer on one tensor-parallel rank (equals parameters_per_layer at t = 1).

    Column-parallel QKV and MLP-in weights and biases, row-parallel output projection and MLP-out
    weights are split over t; their biases and the norms are replicated.
    """
    t, h = tensor_parallel, model.hidden_size
    q = model.attention_width / t
    qkv = q + 2 * _kv_width_per_device(model, t)
    f = model.ffn_hidden_size / t
    matrices = model.mlp_matrices
    attention = h * qkv + qkv + q * h + h
    mlp = matrices * h * f + f * (matrices - 1) + h
    norms = 2 * h if model.normalization == "rmsnorm" else 4 * h
    return attention + mlp + norms


def stage_parameters(model: ModelSpec, tensor_parallel: int, pipeline_parallel: int, stage: int) -> float:
    """Parameters held by one device of pipeline rank `stage` (all its chunks), before ZeRO."""
    t, p, h = tensor_parallel, pipeline_parallel, model.hidden_size
    params = model.num_layers / p * layer_parameters_per_device(model, t)
    word_embedding = model.vocab_size * h / t
    if stage == 0:
        params += word_embedding
        if model.position_embedding == "learned":
            params += model.seq_length * h
    if stage == p - 1:
        params += h if model.normalization == "rmsnorm" else 2 * h
        if not model.tied_embeddings or p > 1:
            params += word_embedding
    return params


# --- activations -------------------------------------------------------------------------------


def _check_activation_args(recompute: str, bytes_per_value: int, tensor_parallel: int, micro_batch_size: int) -> None:
    if recompute not in RECOMPUTE_MODES:
        raise SpecError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {recompute!r}")
    if bytes_per_value not in (2, 4):
        raise SpecError(f"bytes_per_value must be 2 (bf16/fp16) or 4 (fp32), got {bytes_per_value!r}")
    if tensor_parallel < 1 or micro_batch_size < 1:
        raise SpecError(
            f"tensor_parallel and micro_batch_size must be positive, got {tensor_parallel!r}, {micro_batch_size!r}"
        )


def activation_terms(
    model: ModelSpec,
    micro_batch_size: int,
    tensor_parallel: int,
    sequence_parallel: bool,
    recompute: str,
    bytes_per_value: int = 2,
    dropout_mask_bytes: int = 1,
) -> dict[str, float]:
    """Bytes one device stores for the backward pass of one layer and one micro-batch, by tensor.

    A pre-norm layer x -> x + Drop(Proj(Attn(Norm(x)))) -> ... + Drop(MLP(Norm(.))), with
    attention softmax(Q K^T / sqrt(d)) V and dropout on the probabilities (Korthikanti et al.
    2022, Sec. 4.1). Notation: s sequence, b micro-batch, h hidden, q = heads x head_dim,
    k = kv_heads x head_dim, f MLP width, a heads, B = `bytes_per_value`, M = `dropout_mask_bytes`.
    Terms inside the tensor-parallel region (marked TP) are divided by t (heads and the MLP width
    are split; K/V keep at least one head per rank); the others by t only with sequence
    parallelism, otherwise every rank holds them whole.

    - attention_norm_input      B s b h     norm input (the layer input x)
    - qkv_input                 B s b h     norm output, input of the QKV projection
    - query_key (TP)            B s b (q+k) Q and K, the operands of Q K^T
    - softmax_output (TP)       B a s^2 b   needed by the softmax backward
    - attention_dropout_mask    M a s^2 b   (TP; only if dropout > 0)
    - attention_dropout_output  B a s^2 b   (TP; only if dropout > 0) left operand of the product
                                            with V (with no dropout it is the softmax output)
    - value (TP)                B s b k     right operand of the product with V
    - rope_tables               2 B s d     (rotary positions only) the cos and sin tables [s, d]
                                            that multiply Q and K, not split by b or t
    - output_projection_input   B s b q     (TP) attention output, input of the row-parallel proj.
    - attention_residual_dropout_mask  M s b h  (only if dropout > 0)
    - mlp_norm_input            B s b h
    - mlp_input                 B s b h     input of the MLP's first projection(s)
    GELU:   gelu_input (TP) B s b f;  mlp_output_projection_input (TP) B s b f (the GELU output)
    SwiGLU: gate_output (TP) B s b f (the SiLU input), up_output (TP) B s b f, silu_output (TP)
            B s b f (both factors of the product are saved), mlp_output_projection_input (TP)
            B s b f. (Megatron's fused SwiGLU recomputes the SiLU and saves 3 B s b f.)
    - mlp_residual_dropout_mask M s b h     (only if dropout > 0)

    For GPT (q = k = h, f = 4h, GELU, dropout > 0, B = 2, M = 1) the sum is Korthikanti Table 2:
    s b h (34 + 5 a s / h) at t = 1; s b h (10 + 24/t + 5 a s / (h t)) with tensor parallelism;
    s b h / t (34 + 5 a s / h) with sequence parallelism.

    recompute 'selective' drops the attention core (softmax output, its dropout mask and output;
    Q, K, V stay stored as its inputs): s b h (10 + 24/t) resp. 34 s b h / t. 'full' keeps only
    the layer input, {'layer_input': B s b h} (/ t with sequence parallelism).

    What "stored" means (measured by `modelpar.models.memory_probe`): the bytes of the distinct
    storages the autograd graph keeps alive from forward to backward, parameters excluded; a
    storage counts once, and whole. The runtime (`modelpar.models.gpt`, `runtime.tensor_parallel`)
    saves exactly these tensors: 1-byte bool dropout masks (also in fp32, so pass M = 1 there),
    the GELU input (its output is the fc2 input), the softmax output once in the activation dtype
    (fp32 math inside, no causal mask kept), K and V once per KV head (GQA without repeating
    them), Q K V as separate contiguous tensors (no view pinning the fused QKV buffer), an RMSNorm
    that keeps only its input, and under sequence parallelism only the sequence shard of each
    column-parallel input (re-gathered in backward). Measured and predicted agree within 1% for
    gpt-tiny and llama-tiny shapes (s = 64) at t = 1, 2, 4, with and without sequence parallelism,
    for every recompute mode, in bf16 and fp32 (tests/unit and tests/dist test_activation_memory*).

    Not counted: the per-token statistics of the two norms (LayerNorm mean and 1/std, RMSNorm
    1/rms: at most 16 bytes per token, below 1/h of the rest and device-dependent in dtype), as in
    the paper; they are the whole measured excess.
    """
    _check_activation_args(recompute, bytes_per_value, tensor_parallel, micro_batch_size)
    t = tensor_parallel
    tokens = model.seq_length * micro_batch_size
    value = tokens * bytes_per_value  # bytes per unit of width, all tokens
    h = model.hidden_size
    replicated = 1.0 / t if sequence_parallel else 1.0  # share of a non-TP tensor one rank holds
    if recompute == "full":
        return {"layer_input": value * h * replicated}

    has_dropout = model.dropout > 0.0
    q = model.attention_width / t
    kv = _kv_width_per_device(model, t)
    f = model.ffn_hidden_size / t
    scores = tokens * model.seq_length * model.num_attention_heads / t  # a s^2 b / t elements
    mask = tokens * h * dropout_mask_bytes * replicated

    terms: dict[str, float] = {
        "attention_norm_input": value * h * replicated,
        "qkv_input": value * h * replicated,
        "query_key": value * (q + kv),
    }
    if recompute == "none":
        terms["softmax_output"] = scores * bytes_per_value
        if has_dropout:
            terms["attention_dropout_mask"] = scores * dropout_mask_bytes
            terms["attention_dropout_output"] = scores * bytes_per_value
    terms["value"] = value * kv
    if model.position_embedding == "rope":
        terms["rope_tables"] = 2 * model.seq_length * model.attention_head_dim * bytes_per_value
    terms["output_projection_input"] = value * q
    if has_dropout:
        terms["attention_residual_dropout_mask"] = mask
    terms["mlp_norm_input"] = value * h * replicated
    terms["mlp_input"] = value * h * replicated
    if model.activation == "swiglu":
        terms["gate_output"] = value * f
        terms["up_output"] = value * f
        terms["silu_output"] = value * f
    else:
        terms["gelu_input"] = value * f
    terms["mlp_output_projection_input"] = value * f
    if has_dropout:
        terms["mlp_residual_dropout_mask"] = mask
    return terms


def activation_bytes_per_layer(
    model: ModelSpec,
    micro_batch_size: int,
    tensor_parallel: int,
    sequence_parallel: bool,
    recompute: str,
    bytes_per_value: int = 2,
    dropout_mask_bytes: int = 1,
) -> float:
    """Stored activation bytes of one layer for one micro-batch on one device.

    Korthikanti et al. 2022 Table 2 (16-bit values, 1-byte dropout masks): without sequence
    parallelism s b h (10 + 24/t + 5 a s / (h t)); with it s b h / t (34 + 5 a s / h); selective
    recomputation drops the 5 a s / h term; full recomputation keeps 2 s b h (/ t with sequence
    parallelism). Generalised to GQA, SwiGLU, rotary positions, dropout = 0 and head_dim != h/a:
    the sum of `activation_terms`, which documents each tensor and what the runtime saves.
    """
    return sum(
        activation_terms(model, micro_batch_size, tensor_parallel, sequence_parallel, recompute, bytes_per_value,
                         dropout_mask_bytes).values()
    )


# --- per device --------------------------------------------------------------------------------


def memory_per_device(
    model: ModelSpec,
    plan: ParallelPlan,
    device_memory_bytes: float,
    in_flight_chunks: int | Sequence[int],
    stage: int | None = None,
    precision: Precision = MIXED_PRECISION,
) -> MemoryBreakdown:
    """Memory of one device of pipeline rank `stage`, or of the fullest rank when `stage` is None.

    `in_flight_chunks`: (model chunk, micro-batch) pairs whose forward ran and backward has not,
    at the peak (from the schedule simulation): one number for every rank, or one per rank. 1F1B
    gives p - r on rank r, GPipe m, interleaving (v + 1) p - 1 on rank 0 (Korthikanti Sec. 4.3:
    l (1 + (p - 1)/(p v)) layers). See the module docstring for what is counted and the
    `precision` presets for bytes per parameter.
    """
    plan.check(model)
    p = plan.pipeline_parallel
    if isinstance(in_flight_chunks, Sequence):
        per_stage = tuple(in_flight_chunks)
        if len(per_stage) != p or min(per_stage) < 1:
            raise SpecError(f"in_flight_chunks must give {p} positive counts (one per pipeline rank), got {per_stage!r}")
    else:
        per_stage = None
        if in_flight_chunks < 1:
            raise SpecError(f"in_flight_chunks must be a positive integer, got {in_flight_chunks!r}")
    if stage is not None and not (isinstance(stage, int) and 0 <= stage < p):
        raise SpecError(f"stage must be a pipeline rank in 0..{p - 1}, got {stage!r}")

    t, b, sp = plan.tensor_parallel, plan.micro_batch_size, plan.sequence_parallel
    act = precision.activation_bytes
    per_layer = activation_bytes_per_layer(model, b, t, sp, plan.recompute, act)
    working_set = 0.0
    if plan.recompute != "none":
        working_set = activation_bytes_per_layer(model, b, t, sp, "none", act) - per_layer
    layers_per_chunk = model.num_layers // (p * plan.virtual_stages)
    weight_b, grad_b, optim_b = model_state_bytes_per_parameter(plan.zero_stage, plan.data_parallel, precision)

    def breakdown(rank: int) -> MemoryBreakdown:
        in_flight = in_flight_chunks if per_stage is None else per_stage[rank]
        params = stage_parameters(model, t, p, rank)
        activations = in_flight * layers_per_chunk * per_layer + working_set
        buffers = _buffer_bytes(model, plan, rank, in_flight, act)
        parameters, gradients, optimizer = params * weight_b, params * grad_b, params * optim_b
        total = parameters + gradients + optimizer + activations + buffers
        return MemoryBreakdown(parameters, gradients, optimizer, activations, buffers, total, float(device_memory_bytes))

    if stage is not None:
        return breakdown(stage)
    # Middle ranks hold the same parameters and no buffers, so only the one with the most
    # micro-batches in flight can beat ranks 0 and p - 1 (none can with one count for all).
    ranks = {0, p - 1}
    if per_stage is not None and p > 2:
        ranks.add(max(range(1, p - 1), key=per_stage.__getitem__))
    return max((breakdown(rank) for rank in ranks), key=lambda memory: memory.total)


def _buffer_bytes(model: ModelSpec, plan: ParallelPlan, rank: int, in_flight: int, bytes_per_value: int) -> float:
    """Embedding dropout masks on the first rank; final-norm/head inputs and fp32 logits on the last."""
    t, p = plan.tensor_parallel, plan.pipeline_parallel
    tokens = model.seq_length * plan.micro_batch_size
    replicated = 1.0 / t if plan.sequence_parallel else 1.0
    total = 0.0
    if rank == 0 and model.dropout > 0.0:
        micro_batches = math.ceil(in_flight / plan.virtual_stages)  # only chunk 0 holds the embedding
        total += micro_batches * tokens * model.hidden_size * replicated  # 1-byte masks
    if rank == p - 1:
        micro_batches = in_flight if plan.schedule == "gpipe" else 1
        head_inputs = 2 * tokens * model.hidden_size * bytes_per_value * replicated
        logits = 4.0 * tokens * model.vocab_size / t
        total += micro_batches * (head_inputs + logits)
    return total
