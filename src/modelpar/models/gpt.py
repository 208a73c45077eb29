"""Serial reference GPT: the model every parallel layout must reproduce exactly.

nanoGPT-sized and deliberately plain (Radford et al. 2019, GPT-2; Touvron et al. 2023 for the
Llama variants): pre-norm transformer layers, explicit attention softmax(QK^T / sqrt(d) + causal)V,
GELU or SwiGLU MLP, learned or rotary positions, tied or untied output head, mean cross-entropy.
There is no parallel code here; `modelpar.models.gpt_parallel` swaps tensor-parallel modules in.

Structure (the names are the state-dict keys every layout shares):

    GPT
      embedding: Embedding         token (+ position) embedding + dropout
      layers:    ModuleList[TransformerLayer]
                   attention_norm, attention (qkv, core, proj), mlp_norm, mlp (fc1, fc2)
      head:      LMHead            final norm + output projection + cross-entropy

Layout of fused weights: ``attention.qkv`` rows are [Q heads | K heads | V heads] (each head
``head_dim`` rows); ``mlp.fc1`` rows for SwiGLU are [gate | up].

Dropout is *keyed*: every mask is a pure function of (DropoutKey, layer, site, global element
coordinates), so a tensor-/sequence-/data-parallel run drops exactly the elements the serial run
drops, each rank computing only its own slice (see `keyed_dropout`). The key is an explicit
forward argument (``dropout_key``), never module state, so recomputation in the backward pass
reproduces the same masks. With ``dropout_key=None`` dropout falls back to torch's RNG
(statistically correct, not reproducible across layouts).

What a layer keeps for its backward pass is exactly what the planner's activation model counts
(`modelpar.planner.memory.activation_terms`, Korthikanti et al. 2022 Sec. 4.1; measured by
`modelpar.models.memory_probe`): 1-byte dropout masks, the softmax output once in the activation
dtype (`causal_softmax`), K/V once per KV head, no view pinning the fused QKV buffer
(`attention_inputs`), an RMSNorm that keeps only its input and 1/rms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import nn

from modelpar.specs.errors import SpecError
from modelpar.specs.model import ModelSpec

INIT_STD = 0.02
ROPE_BASE = 10000.0
NORM_EPS = 1e-5

# ------------------------------------------------------------------------------------------------
# Keyed dropout
# ------------------------------------------------------------------------------------------------


class DropoutSite(IntEnum):
    """Where a dropout mask is applied; part of the mask's hash so sites draw independent masks."""

    EMBEDDING = 1
    ATTENTION_PROBS = 2
    ATTENTION_OUTPUT = 3
    MLP_OUTPUT = 4


@dataclass(frozen=True)
class DropoutKey:
    """Identifies one forward pass's dropout masks.

    seed: the run's seed. step: the optimizer step. sample_offset: index, in the step's global
    batch, of this forward's first sequence (micro-batch i of data-parallel replica r with micro
    batch b and m micro-batches per replica: (r * m + i) * b). Because the batch coordinate of a
    mask is ``sample_offset + row``, the masks of a step do not depend on how its global batch is
    split into micro-batches or replicas.
    """

    seed: int
    step: int
    sample_offset: int = 0

    def for_samples(self, sample_offset: int) -> "DropoutKey":
        return replace(self, sample_offset=sample_offset)


_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B1


def _mul32(h, constant: int):
    """(h * constant) mod 2^32 for 0 <= h < 2^32 without overflowing int64 (works on ints and tensors)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (h * low + (((h * high) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer (Appleby 2008): a bijection with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _combine(h, value):
    return _fmix32(h ^ _mul32((value + 1) & _MASK32, _GOLDEN32))


def dropout_keep_mask(shape, p: float, key: DropoutKey, layer: int, site: DropoutSite,
                      offsets=None, device=None) -> torch.Tensor:
    """Boolean keep-mask for the slice ``[offsets[i] : offsets[i] + shape[i]]`` of a global tensor.

    Element (c_0, c_1, ...) of the global tensor (c_0 counted from ``key.sample_offset``) is
    kept iff hash(seed, step, layer, site, c_0, c_1, ...) >= p * 2^32, with the hash a chain of
    MurmurHash3 finalizers. Only the local slice is ever materialised; the hash is built up one
    dimension at a time so only the last step touches every element. Attention probabilities
    [b, heads, s, s] draw each (sample, head) slab from a seeded generator instead
    (`_attention_keep_mask`).
    """
    offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
    if len(offsets) != len(shape):
        raise ValueError(f"dropout offsets {offsets} do not match shape {tuple(shape)}")
    h = 0
    for part in (key.seed & _MASK32, (key.seed >> 32) & _MASK32, key.step & _MASK32, layer & _MASK32, int(site)):
        h = _combine(h, part)
    if site == DropoutSite.ATTENTION_PROBS and len(shape) == 4:
        return _attention_keep_mask(shape, p, key, h, offsets, device)
    hashed = torch.tensor(h, dtype=torch.int64, device=device)
    for dim, (size, offset) in enumerate(zip(shape, offsets)):
        start = offset + (key.sample_offset if dim == 0 else 0)
        coords = torch.arange(start, start + size, dtype=torch.int64, device=device)
        hashed = _combine(hashed.unsqueeze(-1), coords)
    threshold = int(round(p * 2**32))
    return hashed >= threshold


def _attention_keep_mask(shape, p: float, key: DropoutKey, site_hash: int, offsets, device) -> torch.Tensor:
    """Keep-mask of attention probabilities [b, heads, s_q, s_k]: one [s_q, s_k] slab per (global
    sample, global head), drawn from the device's counter-based generator seeded with
    hash(seed, step, layer, site, sample, head).

    Tensor, pipeline and data parallelism never split a slab (heads and samples are split, rows
    and keys are not), so every layout draws the same slabs as the serial model, at the cost of the
    generator (torch.rand) instead of a 20-operation integer hash per element: the attention
    probabilities hold a s / h times more values than a layer's other dropouts, and the hash made
    them most of a layer's time (BENCHMARKS.md, single GPU). A row range of a slab (offsets[2] > 0,
    never used by the runtime) is the tail of the rows drawn from 0 (a CPU generator's stream does
    not depend on how many values are drawn).
    """
    batch, heads, rows, keys = shape
    if offsets[3] != 0:
        raise ValueError(f"attention dropout masks cannot be split along the keys (offsets {offsets})")
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device if device is not None else "cpu")
    first_row = offsets[2]
    for row in range(batch):
        sample_hash = _combine(site_hash, key.sample_offset + offsets[0] + row)
        for head in range(heads):
            generator.manual_seed(_combine(sample_hash, offsets[1] + head))
            uniform = torch.rand((first_row + rows, keys), generator=generator, device=device)
            keep[row, head] = uniform[first_row:] >= p
    return keep


def keyed_dropout(x: torch.Tensor, p: float, key: DropoutKey | None, layer: int, site: DropoutSite,
                  training: bool, offsets=None) -> torch.Tensor:
    """Inverted dropout, x * keep / (1 - p), with the mask of `dropout_keep_mask`.

    ``offsets`` places ``x`` in the global tensor (e.g. (0, head_offset, 0, 0) for a rank's
    attention heads, (0, sequence_offset, 0) for a sequence-parallel shard). The serial model
    and every parallel layer call this one function, which is what makes them agree exactly.
    """
    if not training or p == 0.0:
        return x
    if key is None:
        return F.dropout(x, p, training=True)
    keep = dropout_keep_mask(x.shape, p, key, layer, site, offsets, x.device)
    return x.masked_fill(~keep, 0.0) * (1.0 / (1.0 - p))


# ------------------------------------------------------------------------------------------------
# Building blocks shared with the parallel layers
# ------------------------------------------------------------------------------------------------


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit values, else the dtype itself (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class _RMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019), in fp32 (at least), saving only the
    input x and the per-token fp32 1/rms (as Megatron's and Apex's fused RMSNorm do). torch's CPU
    rms_norm is a composite that would also save an fp32 copy of x and of x / rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(_math_dtype(x.dtype))
        inverse_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inverse_rms)
        return (x32 * inverse_rms).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, inverse_rms = ctx.saved_tensors
        normalized = x.to(inverse_rms.dtype) * inverse_rms
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normalized.to(x.dtype)).sum(dim=tuple(range(grad.dim() - 1)))
        grad_normalized = (grad * weight).to(inverse_rms.dtype)
        grad_x = inverse_rms * (grad_normalized - normalized * (grad_normalized * normalized).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) whose backward keeps only x and 1/rms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.normalized_shape != (x.shape[-1],):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.normalization == "rmsnorm":
        return RMSNorm(spec.hidden_size, eps=NORM_EPS)
    return nn.LayerNorm(spec.hidden_size, eps=NORM_EPS)


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34), rotate-half (GPT-NeoX/Llama) layout.

    q, k: [batch, heads, seq, head_dim]; position of row i is position_offset + i.
    """
    seq, dim = q.shape[-2], q.shape[-1]
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2, dtype=torch.float32, device=q.device) / dim))
    positions = torch.arange(position_offset, position_offset + seq, dtype=torch.float32, device=q.device)
    angles = torch.outer(positions, inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(q.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(q.dtype)

    def rotate(x):
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    return rotate(q), rotate(k)


def mlp_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU (exact erf form), or SwiGLU silu(gate) * up (Shazeer 2020) on x = [gate | up]."""
    if activation == "swiglu":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(x)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, s, heads * d] -> [b, heads, s, d]."""
    b, s, width = x.shape
    return x.view(b, s, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, heads, s, d] -> [b, s, heads * d]."""
    b, heads, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, heads * d)


def attention_inputs(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                     rope: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused projection output [b, s, (heads + 2 kv_heads) d] -> contiguous Q [b, heads, s, d], K, V
    [b, kv_heads, s, d], rotary positions applied to Q and K.

    Contiguous copies, so the attention core's matmuls save them as they are, and the fused
    buffer is freed after the forward instead of being pinned by a saved view (with RoPE, Q and K
    are new tensors and a view V would keep all of Q K V alive).
    """
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    q, k, v = split_heads(q, num_heads), split_heads(k, num_kv_heads), split_heads(v, num_kv_heads)
    if rope:
        q, k = apply_rope(q, k)
    return q.contiguous(), k.contiguous(), v.contiguous()


class _CausalSoftmax(torch.autograd.Function):
    """softmax over the last dim with future keys (upper triangle) masked out, in fp32 (at least),
    returned in the scores' dtype. Saves only its output, in that dtype, like Megatron's fused
    ScaledUpperTriangMaskedSoftmax (Korthikanti's 2 a s^2 b bytes at 16 bits): no mask, no fp32 copy."""

    @staticmethod
    def forward(ctx, scores):
        seq_q, seq_k = scores.shape[-2:]
        future = torch.ones(seq_q, seq_k, dtype=torch.bool, device=scores.device).triu(1)
        math_dtype = _math_dtype(scores.dtype)
        probs = torch.softmax(scores.to(math_dtype).masked_fill(future, float("-inf")), dim=-1).to(scores.dtype)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        math_dtype = _math_dtype(probs.dtype)
        # Masked entries have probability 0, so their gradient is 0 without the mask.
        grad_scores = torch._softmax_backward_data(grad.to(math_dtype), probs.to(math_dtype), -1, math_dtype)
        return grad_scores.to(grad.dtype)


def causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    """softmax(scores + causal mask) over the last dim (fp32 math); scores [..., s_q, s_k]."""
    return _CausalSoftmax.apply(scores)


class AttentionCore(nn.Module):
    """softmax(Q K^T / sqrt(d) + causal mask) V with dropout on the probabilities (Vaswani et al. 2017 eq. 1).

    The part that selective recomputation re-runs (Korthikanti et al. 2022, Sec. 4.1): its saved
    activations (scores, probabilities, mask) grow with s^2. Grouped-query attention (Ainslie et
    al. 2023): each K/V head serves ``heads / kv_heads`` consecutive query heads. ``head_offset``
    is the global index of the first query head held here (non-zero on tensor-parallel ranks), so
    the probability dropout mask matches the serial one. ``fused=True`` uses
    F.scaled_dot_product_attention instead (exact only without dropout).
    """

    def __init__(self, dropout: float, layer_index: int, head_offset: int = 0, fused: bool = False):
        super().__init__()
        self.dropout = dropout
        self.layer_index = layer_index
        self.head_offset = head_offset
        self.fused = fused

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                dropout_key: DropoutKey | None = None) -> torch.Tensor:
        batch, heads, seq, head_dim = q.shape
        kv_heads = k.shape[1]
        if self.fused:
            if heads != kv_heads:
                k = k.repeat_interleave(heads // kv_heads, dim=1)
                v = v.repeat_interleave(heads // kv_heads, dim=1)
            p = self.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        # The heads / kv_heads query heads of a group share one K/V head: stack their rows so one
        # batched matmul serves the group and K, V are used (and saved) once, never repeated.
        group_rows = heads // kv_heads * seq
        scores = q.reshape(batch, kv_heads, group_rows, head_dim) @ k.transpose(-2, -1)
        scores = scores.view(batch, heads, seq, seq) * (1.0 / math.sqrt(head_dim))
        probs = causal_softmax(scores)
        probs = keyed_dropout(probs, self.dropout, dropout_key, self.layer_index, DropoutSite.ATTENTION_PROBS,
                              self.training, offsets=(0, self.head_offset, 0, 0))
        context = probs.reshape(batch, kv_heads, group_rows, seq) @ v
        return context.view(batch, heads, seq, head_dim)


# ------------------------------------------------------------------------------------------------
# Serial modules
# ------------------------------------------------------------------------------------------------


class Embedding(nn.Module):
    """Token embedding (+ learned absolute positions) + dropout: tokens [b, s] -> hidden [b, s, h]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.token = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.position = nn.Embedding(spec.seq_length, spec.hidden_size) if spec.position_embedding == "learned" else None
        self.dropout = spec.dropout

    def forward(self, tokens: torch.Tensor, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        hidden = self.token(tokens)
        if self.position is not None:
            hidden = hidden + self.position.weight[: tokens.shape[1]]
        return keyed_dropout(hidden, self.dropout, dropout_key, -1, DropoutSite.EMBEDDING, self.training)


class SelfAttention(nn.Module):
    """Causal self-attention: qkv projection, (RoPE), AttentionCore, output projection, residual dropout."""

    def __init__(self, spec: ModelSpec, layer_index: int, fused: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_attention_heads, spec.kv_heads, spec.attention_head_dim
        self.rope = spec.position_embedding == "rope"
        self.dropout = spec.dropout
        self.layer_index = layer_index
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv = nn.Linear(spec.hidden_size, q_width + 2 * kv_width)
        self.core = AttentionCore(spec.dropout, layer_index, fused=fused)
        self.proj = nn.Linear(q_width, spec.hidden_size)

    def forward(self, x: torch.Tensor, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        q, k, v = attention_inputs(self.qkv(x), self.num_heads, self.num_kv_heads, self.head_dim, self.rope)
        y = self.proj(merge_heads(self.core(q, k, v, dropout_key)))
        return keyed_dropout(y, self.dropout, dropout_key, self.layer_index, DropoutSite.ATTENTION_OUTPUT, self.training)


class MLP(nn.Module):
    """fc1 -> GELU -> fc2, or fc1 = [gate | up] -> silu(gate) * up -> fc2 (SwiGLU); then residual dropout."""

    def __init__(self, spec: ModelSpec, layer_index: int):
        super().__init__()
        self.activation = spec.activation
        self.dropout = spec.dropout
        self.layer_index = layer_index
        inner = spec.ffn_hidden_size * (2 if spec.activation == "swiglu" else 1)
        self.fc1 = nn.Linear(spec.hidden_size, inner)
        self.fc2 = nn.Linear(spec.ffn_hidden_size, spec.hidden_size)

    def forward(self, x: torch.Tensor, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        y = self.fc2(mlp_activation(self.fc1(x), self.activation))
        return keyed_dropout(y, self.dropout, dropout_key, self.layer_index, DropoutSite.MLP_OUTPUT, self.training)


class TransformerLayer(nn.Module):
    """Pre-norm layer: h = x + Attn(Norm(x)); out = h + MLP(Norm(h)). ``layer_index`` is global (all stages)."""

    def __init__(self, spec: ModelSpec, layer_index: int, fused_attention: bool = False):
        super().__init__()
        self.layer_index = layer_index
        self.attention_norm = make_norm(spec)
        self.attention = SelfAttention(spec, layer_index, fused=fused_attention)
        self.mlp_norm = make_norm(spec)
        self.mlp = MLP(spec, layer_index)

    def forward(self, hidden: torch.Tensor, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        hidden = hidden + self.attention(self.attention_norm(hidden), dropout_key)
        return hidden + self.mlp(self.mlp_norm(hidden), dropout_key)


class LMHead(nn.Module):
    """Final norm + output projection (no bias) + mean token cross-entropy."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm = make_norm(spec)
        self.output = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(hidden))

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(hidden)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class GPT(nn.Module):
    """Decoder-only transformer built from a ModelSpec: forward(tokens [b, s], targets [b, s]) -> mean loss."""

    def __init__(self, spec: ModelSpec, fused_attention: bool = False):
        super().__init__()
        self.spec = spec
        self.embedding = Embedding(spec)
        self.layers = nn.ModuleList(TransformerLayer(spec, i, fused_attention) for i in range(spec.num_layers))
        self.head = LMHead(spec)
        if spec.tied_embeddings:
            self.head.output.weight = self.embedding.token.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, dropout_key: DropoutKey | None = None) -> torch.Tensor:
        if tokens.shape[1] > self.spec.seq_length:
            raise SpecError(
                f"model '{self.spec.name}': sequence of {tokens.shape[1]} tokens exceeds seq_length "
                f"{self.spec.seq_length}; use shorter sequences or raise seq_length"
            )
        hidden = self.embedding(tokens, dropout_key)
        for layer in self.layers:
            hidden = layer(hidden, dropout_key)
        return self.head(hidden, targets)


def is_residual_projection(name: str) -> bool:
    """Projections that write into the residual stream (GPT-2's scaled init): attention.proj, mlp.fc2."""
    return name.endswith("attention.proj") or name.endswith("mlp.fc2")


@torch.no_grad()
def initialize_parameters(model: nn.Module, num_layers: int, seed: int) -> None:
    """GPT-2 init (Radford et al. 2019, Sec. 2.3; nanoGPT): weights ~ N(0, 0.02), residual
    projections ~ N(0, 0.02 / sqrt(2 L)), biases 0, norm weights 1. Deterministic in ``seed``
    (a private CPU generator; the global RNG is untouched); modules are visited in
    ``named_modules`` order and a shared (tied) weight is drawn once.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    residual_std = INIT_STD / math.sqrt(2 * num_layers)
    seen: set[int] = set()

    def normal(param: torch.Tensor, std: float) -> None:
        if id(param) in seen:
            return
        seen.add(id(param))
        values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        param.copy_(values)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            normal(module.weight, residual_std if is_residual_projection(name) else INIT_STD)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            normal(module.weight, INIT_STD)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def init_gpt(spec: ModelSpec, seed: int, device: torch.device | str = "cpu", fused_attention: bool = False) -> GPT:
    """Build a GPT with deterministic weights: the same (spec, seed) gives bit-identical models everywhere."""
    # Built on the CPU rather than the meta device: reset_parameters() on meta tensors imports
    # torch._dynamo (about 4 s per process, paid by every spawned rank); fork_rng keeps the
    # default initialisation from consuming the global RNG.
    with torch.random.fork_rng(devices=[]):
        model = GPT(spec, fused_attention=fused_attention)
    initialize_parameters(model, spec.num_layers, seed)
    return model.to(device)
