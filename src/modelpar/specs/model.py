"""Transformer model specification and presets.

Every preset cites the paper its shape comes from. Where the seed review's table disagrees with the
primary paper, the paper's numbers are used (e.g. Megatron-8.3B is 72 layers x 3072 hidden, not
24 x 4096).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelpar.specs.errors import SpecError
from modelpar.specs.fields import check_fields

ACTIVATIONS = ("gelu", "swiglu")
NORMALIZATIONS = ("layernorm", "rmsnorm")
POSITION_EMBEDDINGS = ("learned", "rope")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (GPT family), as the planner and the runtime see it."""

    name: str = field(metadata={"doc": "Preset or user name, used in reports."})
    num_layers: int = field(metadata={"doc": "Number of transformer layers (L)."})
    hidden_size: int = field(metadata={"doc": "Model width (h)."})
    num_attention_heads: int = field(metadata={"doc": "Query heads (a)."})
    ffn_hidden_size: int = field(metadata={"doc": "MLP inner width (4h for GPT; about 8h/3 for SwiGLU)."})
    vocab_size: int = field(metadata={"doc": "Vocabulary size (V), before any padding."})
    seq_length: int = field(metadata={"doc": "Training sequence length (s)."})
    num_query_groups: int | None = field(
        default=None,
        metadata={"doc": "Key/value heads for grouped-query attention; None means multi-head (= heads)."},
    )
    head_dim: int | None = field(
        default=None,
        metadata={"doc": "Width of one attention head; None means hidden_size / heads (PaLM uses 256 with 48 heads)."},
    )
    activation: str = field(default="gelu", metadata={"choices": ACTIVATIONS, "doc": "'gelu' (2-matrix MLP) or 'swiglu' (3-matrix MLP)."})
    normalization: str = field(default="layernorm", metadata={"choices": NORMALIZATIONS, "doc": "'layernorm' or 'rmsnorm'."})
    position_embedding: str = field(default="learned", metadata={"choices": POSITION_EMBEDDINGS, "doc": "'learned' absolute table or 'rope'."})
    tied_embeddings: bool = field(default=True, metadata={"doc": "Output head shares the input embedding."})
    dropout: float = field(default=0.1, metadata={"doc": "Dropout probability (attention and residual).",
                                                  "bound": "non_negative"})

    def __post_init__(self) -> None:
        check_fields(self, f"model '{self.name}'")
        if self.dropout >= 1.0:
            raise SpecError(f"model '{self.name}': dropout must be in [0, 1), got {self.dropout!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise SpecError(
                f"model '{self.name}': hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.kv_heads:
            raise SpecError(
                f"model '{self.name}': num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.kv_heads}"
            )

    @property
    def attention_head_dim(self) -> int:
        """Width of one head: head_dim, or hidden_size / heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def attention_width(self) -> int:
        """Query/output projection width: heads x head width (= hidden_size for standard GPT)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads: num_query_groups, or all heads for multi-head attention."""
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices in the MLP: 2 for GELU, 3 for SwiGLU (gate, up, down)."""
        return 3 if self.activation == "swiglu" else 2

    def parameters_per_layer(self) -> int:
        """Weights and biases of one layer: QKV + output projection + MLP + two norms.

        QKV is h x (h + 2 * kv_heads * head_dim); for multi-head attention the layer is the
        familiar 12h^2 + 13h (Narayanan et al. 2021, Sec. 5.1).
        """
        h, q = self.hidden_size, self.attention_width
        kv = 2 * self.kv_heads * self.attention_head_dim
        attention = h * (q + kv) + (q + kv) + q * h + h
        mlp = self.mlp_matrices * h * self.ffn_hidden_size + self.ffn_hidden_size * (self.mlp_matrices - 1) + h
        norms = 2 * h if self.normalization == "rmsnorm" else 4 * h
        return attention + mlp + norms

    def embedding_parameters(self) -> int:
        """Token embedding (+ learned positions) (+ the untied output head) + the final norm."""
        h = self.hidden_size
        params = self.vocab_size * h
        if self.position_embedding == "learned":
            params += self.seq_length * h
        if not self.tied_embeddings:
            params += self.vocab_size * h
        params += h if self.normalization == "rmsnorm" else 2 * h
        return params

    def num_parameters(self) -> int:
        return self.num_layers * self.parameters_per_layer() + self.embedding_parameters()


def _gpt(name: str, layers: int, hidden: int, heads: int, vocab: int = 51200, seq: int = 2048, **kw) -> ModelSpec:
    return ModelSpec(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=kw.pop("ffn_hidden_size", 4 * hidden),
        vocab_size=vocab,
        seq_length=seq,
        **kw,
    )


MODEL_PRESETS: dict[str, ModelSpec] = {
    # Shoeybi et al. 2019, "Megatron-LM", Table 1: 72 layers, h=3072, 32 heads, seq 1024,
    # vocab 50257 padded to 51200 (Sec. 5).
    "megatron-8.3b": _gpt("megatron-8.3b", 72, 3072, 32, seq=1024),
    # Narayanan et al. 2021 Table 1 / Smith et al. 2022 (MT-NLG): 105 layers, h=20480, 128 heads.
    "megatron-530b": _gpt("megatron-530b", 105, 20480, 128),
    # Narayanan et al. 2021 Table 1, last row: 128 layers, h=25600, 160 heads.
    "megatron-1t": _gpt("megatron-1t", 128, 25600, 160),
    # Brown et al. 2020 (GPT-3) Table 2.1: 96 layers, h=12288, 96 heads, seq 2048, vocab 50257.
    "gpt3-175b": _gpt("gpt3-175b", 96, 12288, 96, vocab=50257),
    # Rae et al. 2021 (Gopher) Table 1: 80 layers, d_model 16384, 128 heads, key/value size 128,
    # seq 2048, SentencePiece vocab 32000; RMSNorm and relative positions (modelled as rope).
    "gopher-280b": _gpt(
        "gopher-280b", 80, 16384, 128, vocab=32000, normalization="rmsnorm", position_embedding="rope",
        tied_embeddings=False,
    ),
    # Chowdhery et al. 2022 (PaLM) Table 1: 118 layers, d_model 18432, 48 heads (head 256),
    # multi-query attention with head width 256, SwiGLU with ffn = 4 d_model, vocab 256k, seq 2048
    # (540.35B parameters; PaLM has no biases, which this spec counts as a negligible 0.01%).
    "palm-540b": _gpt(
        "palm-540b", 118, 18432, 48, vocab=256000, ffn_hidden_size=4 * 18432, num_query_groups=1, head_dim=256,
        activation="swiglu", normalization="layernorm", position_embedding="rope", dropout=0.0,
    ),
    # Touvron et al. 2023 (Llama 2) 70B: 80 layers, h=8192, 64 heads, 8 KV heads (GQA),
    # SwiGLU ffn 28672, RMSNorm, RoPE, vocab 32000, seq 4096, untied head.
    "llama2-70b": _gpt(
        "llama2-70b", 80, 8192, 64, vocab=32000, seq=4096, ffn_hidden_size=28672, num_query_groups=8,
        activation="swiglu", normalization="rmsnorm", position_embedding="rope", tied_embeddings=False,
        dropout=0.0,
    ),
    # Llama 2 7B: 32 layers, h=4096, 32 heads, SwiGLU 11008.
    "llama2-7b": _gpt(
        "llama2-7b", 32, 4096, 32, vocab=32000, seq=4096, ffn_hidden_size=11008,
        activation="swiglu", normalization="rmsnorm", position_embedding="rope", tied_embeddings=False,
        dropout=0.0,
    ),
    # Radford et al. 2019 (GPT-2 small): 12 layers, h=768, 12 heads, seq 1024, vocab 50257.
    "gpt2-small": _gpt("gpt2-small", 12, 768, 12, vocab=50257, seq=1024),
    # Small models for the CPU runtime and its tests.
    "gpt-tiny": _gpt("gpt-tiny", 8, 64, 8, vocab=256, seq=32, dropout=0.1),
    "llama-tiny": _gpt(
        "llama-tiny", 8, 64, 8, vocab=256, seq=32, ffn_hidden_size=176, num_query_groups=4,
        activation="swiglu", normalization="rmsnorm", position_embedding="rope", tied_embeddings=False,
        dropout=0.0,
    ),
    "gpt-small-cpu": _gpt("gpt-small-cpu", 8, 256, 8, vocab=256, seq=128, dropout=0.1),
}
