"""Turn a serial GPT into its tensor(-and-sequence)-parallel form by swapping modules from a plan.

The plan is data, ``{module name: style}`` (torchtitan's ``parallelize_module`` pattern); each style
builds the parallel module from the serial one by slicing its weights, so the same weights load
into any layout, and `full_state_dict` gathers any layout back into the serial state dict.

    embedding                  -> "vocab_parallel_embedding"  (ParallelEmbedding)
    layers.<i>.attention       -> "parallel_attention"        (ParallelAttention: heads / KV groups)
    layers.<i>.mlp             -> "parallel_mlp"              (ParallelMLP: column then row)
    head                       -> "vocab_parallel_head"       (ParallelLMHead + vocab-parallel CE)
    any norm (sequence parallel only) -> "sequence_parallel_norm" (tag: grads all-reduced after backward)

After backward, the training loop calls `sync_tensor_parallel_grads(model, ctx)` once per step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from modelpar.models.gpt import (MLP, AttentionCore, DropoutSite, Embedding, LMHead, SelfAttention, attention_inputs,
                                 keyed_dropout, merge_heads, mlp_activation)
from modelpar.runtime.mesh import ParallelContext
from modelpar.runtime.data_parallel import all_reduce_gradients
from modelpar.runtime.sequence_parallel import mark_module_sequence_parallel, sequence_offset, sequence_parallel_parameters
from modelpar.runtime.collectives import gather_last_dim
from modelpar.runtime.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                              allreduce_replicated_grads, chunk_indices, padded_chunk_layout,
                                              vocab_parallel_cross_entropy)
from modelpar.specs import plan as rules
from modelpar.specs.errors import SpecError
from modelpar.specs.plan import ParallelPlan
from modelpar.specs.model import ModelSpec

# --- the GPT's tensor-parallel blocks ----------------------------------------------------------


class ParallelEmbedding(nn.Module):
    """Embedding with a vocab-parallel token table; replicated learned positions; keyed dropout.
    Output [b, s, h] replicated, or [b, s/t, h] shards under sequence parallelism."""

    def __init__(self, token: VocabParallelEmbedding, position: nn.Embedding | None, dropout: float, group,
                 sequence_parallel: bool):
        super().__init__()
        self.token = token
        self.position = position
        self.dropout = dropout
        self.group = group
        self.sequence_parallel = sequence_parallel
        if position is not None and sequence_parallel:
            mark_module_sequence_parallel(position)

    @classmethod
    def from_serial(cls, embedding: Embedding, group, sequence_parallel: bool) -> "ParallelEmbedding":
        token = VocabParallelEmbedding.from_embedding(embedding.token, group, sequence_parallel)
        return cls(token, embedding.position, embedding.dropout, group, sequence_parallel)

    def forward(self, tokens: torch.Tensor, dropout_key=None) -> torch.Tensor:
        hidden = self.token(tokens)
        offset = sequence_offset(hidden.shape[1], self.group, self.sequence_parallel)
        if self.position is not None:
            hidden = hidden + self.position.weight[offset: offset + hidden.shape[1]]
        return keyed_dropout(hidden, self.dropout, dropout_key, -1, DropoutSite.EMBEDDING, self.training,
                             offsets=(0, offset, 0))


def kv_heads_of_rank(num_heads: int, num_kv_heads: int, world: int, rank: int) -> list[int]:
    """K/V heads a tensor rank needs: kv/t consecutive heads, or, when t > kv (t % kv == 0), the one
    head shared by its query heads (replicated on t / kv ranks, as Megatron does)."""
    if num_kv_heads >= world:
        per_rank = num_kv_heads // world
        return list(range(rank * per_rank, (rank + 1) * per_rank))
    return [rank * num_kv_heads // world]


def qkv_rows(num_heads: int, num_kv_heads: int, head_dim: int, world: int) -> tuple[torch.Tensor, ...]:
    """Per rank, the rows of the fused [Q | K | V] weight it keeps: its query heads, then its K and V heads."""
    heads_per_rank = num_heads // world
    rows = []
    for rank in range(world):
        q_heads = range(rank * heads_per_rank, (rank + 1) * heads_per_rank)
        kv = kv_heads_of_rank(num_heads, num_kv_heads, world, rank)
        k_base, v_base = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
        index = [h * head_dim + j for h in q_heads for j in range(head_dim)]
        index += [k_base + h * head_dim + j for h in kv for j in range(head_dim)]
        index += [v_base + h * head_dim + j for h in kv for j in range(head_dim)]
        rows.append(torch.tensor(index, dtype=torch.int64))
    return tuple(rows)


class ParallelAttention(nn.Module):
    """Self-attention split by heads: this rank computes heads [r a/t, (r+1) a/t) with their K/V heads,
    then the row-parallel output projection sums over ranks."""

    def __init__(self, qkv: ColumnParallelLinear, core: AttentionCore, proj: RowParallelLinear, num_heads: int,
                 num_kv_heads: int, head_dim: int, rope: bool, dropout: float, layer_index: int, group,
                 sequence_parallel: bool):
        super().__init__()
        self.qkv, self.core, self.proj = qkv, core, proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope, self.dropout, self.layer_index = rope, dropout, layer_index
        self.group, self.sequence_parallel = group, sequence_parallel

    @classmethod
    def from_serial(cls, attention: SelfAttention, group, sequence_parallel: bool) -> "ParallelAttention":
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        qkv = ColumnParallelLinear.from_linear(attention.qkv, group, qkv_rows(heads, kv_heads, head_dim, world),
                                               sequence_parallel)
        proj = RowParallelLinear.from_linear(attention.proj, group, sequence_parallel=sequence_parallel)
        core = AttentionCore(attention.core.dropout, attention.layer_index, head_offset=rank * heads // world,
                             fused=attention.core.fused)
        local_kv = len(kv_heads_of_rank(heads, kv_heads, world, rank))
        return cls(qkv, core, proj, heads // world, local_kv, head_dim, attention.rope, attention.dropout,
                   attention.layer_index, group, sequence_parallel)

    def forward(self, x: torch.Tensor, dropout_key=None) -> torch.Tensor:
        q, k, v = attention_inputs(self.qkv(x), self.num_heads, self.num_kv_heads, self.head_dim, self.rope)
        y = self.proj(merge_heads(self.core(q, k, v, dropout_key)))
        offset = sequence_offset(y.shape[1], self.group, self.sequence_parallel)
        return keyed_dropout(y, self.dropout, dropout_key, self.layer_index, DropoutSite.ATTENTION_OUTPUT,
                             self.training, offsets=(0, offset, 0))


class ParallelMLP(nn.Module):
    """Column-parallel fc1 (for SwiGLU: this rank's gate rows then its up rows), activation, row-parallel fc2."""

    def __init__(self, fc1: ColumnParallelLinear, fc2: RowParallelLinear, activation: str, dropout: float,
                 layer_index: int, group, sequence_parallel: bool):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.activation, self.dropout, self.layer_index = activation, dropout, layer_index
        self.group, self.sequence_parallel = group, sequence_parallel

    @classmethod
    def from_serial(cls, mlp: MLP, group, sequence_parallel: bool) -> "ParallelMLP":
        world = dist.get_world_size(group)
        ffn = mlp.fc2.in_features
        rows = chunk_indices(ffn, world)
        if mlp.activation == "swiglu":
            rows = tuple(torch.cat([chunk, chunk + ffn]) for chunk in rows)
        fc1 = ColumnParallelLinear.from_linear(mlp.fc1, group, rows, sequence_parallel)
        fc2 = RowParallelLinear.from_linear(mlp.fc2, group, sequence_parallel=sequence_parallel)
        return cls(fc1, fc2, mlp.activation, mlp.dropout, mlp.layer_index, group, sequence_parallel)

    def forward(self, x: torch.Tensor, dropout_key=None) -> torch.Tensor:
        y = self.fc2(mlp_activation(self.fc1(x), self.activation))
        offset = sequence_offset(y.shape[1], self.group, self.sequence_parallel)
        return keyed_dropout(y, self.dropout, dropout_key, self.layer_index, DropoutSite.MLP_OUTPUT, self.training,
                             offsets=(0, offset, 0))


class ParallelLMHead(nn.Module):
    """Final norm (on sequence shards under SP), vocab-parallel output projection (padded
    vocabulary: `padded_chunk_layout`), vocab-parallel cross-entropy; the full logits are never
    materialised. ``targets`` are the full [b, s]."""

    def __init__(self, norm: nn.Module, output: ColumnParallelLinear, group):
        super().__init__()
        self.norm, self.output, self.group = norm, output, group

    @property
    def vocab_start(self) -> int:
        return dist.get_rank(self.group) * self.output.weight.shape[0]  # contiguous equal chunks

    @property
    def vocab_size(self) -> int:
        """The unpadded vocabulary V."""
        return self.output.shard_layouts["weight"].full_size

    @classmethod
    def from_serial(cls, head: LMHead, group, sequence_parallel: bool) -> "ParallelLMHead":
        layout = padded_chunk_layout(head.output.out_features, dist.get_world_size(group))
        output = ColumnParallelLinear(layout.shard(head.output.weight, dist.get_rank(group)), None, group, layout,
                                      sequence_parallel)
        return cls(head.norm, output, group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits [b, s, V] (gathered, padding dropped; for evaluation and sampling only)."""
        return gather_last_dim(self.output(self.norm(hidden)), self.group)[..., : self.vocab_size]

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.norm(hidden))
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_start, self.group, self.vocab_size).mean()


ParallelStyle = Callable[[nn.Module, object, bool], nn.Module]

STYLES: dict[str, ParallelStyle] = {
    "vocab_parallel_embedding": ParallelEmbedding.from_serial,
    "parallel_attention": ParallelAttention.from_serial,
    "parallel_mlp": ParallelMLP.from_serial,
    "vocab_parallel_head": ParallelLMHead.from_serial,
    "sequence_parallel_norm": lambda module, group, sequence_parallel: mark_module_sequence_parallel(module),
}

_STYLE_OF_TYPE = ((Embedding, "vocab_parallel_embedding"), (SelfAttention, "parallel_attention"),
                  (MLP, "parallel_mlp"), (LMHead, "vocab_parallel_head"))


def check_tensor_parallel(spec: ModelSpec, tensor_parallel: int, sequence_parallel: bool) -> None:
    """Raise SpecError when the model cannot be split t ways (the plan's tensor and sequence rules,
    `specs.plan`). Any vocabulary splits: one that t does not divide is padded
    (`tensor_parallel.padded_chunk_layout`)."""
    t = tensor_parallel
    reason = rules.tensor_rule(spec, t) or (rules.sequence_rule(spec, t, sequence_parallel) if t > 1 else None)
    if reason is not None:
        raise SpecError(rules.explain(reason, ParallelPlan(tensor_parallel=t), spec))


def tensor_parallel_plan(model: nn.Module, sequence_parallel: bool) -> dict[str, str]:
    """{module name: style} for every swappable module present (works on a pipeline stage's sub-model)."""
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        for module_type, style in _STYLE_OF_TYPE:
            if isinstance(module, module_type):
                plan[name] = style
        if sequence_parallel and isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            plan[name] = "sequence_parallel_norm"
    return plan


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def parallelize(model: nn.Module, ctx: ParallelContext, sequence_parallel: bool,
                plan: dict[str, str] | None = None) -> nn.Module:
    """Swap tensor-parallel modules into ``model`` in place, slicing the serial weights; return it on ctx.device.

    The forward signatures are unchanged: embedding(tokens, key) -> hidden, layer(hidden, key) ->
    hidden, head(hidden, targets) -> loss, where hidden is [b, s/t, h] under sequence parallelism.
    With tied embeddings the head's vocabulary shard shares the embedding's. t = 1 returns the
    model unchanged (moved to the device).
    """
    spec = getattr(model, "spec", None)
    t = ctx.dims.tensor
    if spec is not None:
        check_tensor_parallel(spec, t, sequence_parallel)
    if t == 1:
        return model.to(ctx.device)
    plan = tensor_parallel_plan(model, sequence_parallel) if plan is None else plan
    for name, style in plan.items():
        if style not in STYLES:
            raise SpecError(f"parallelize: unknown style {style!r} for {name!r}; use one of {', '.join(STYLES)}")
        _set_submodule(model, name, STYLES[style](model.get_submodule(name), ctx.tensor_group, sequence_parallel))
    embedding, head = getattr(model, "embedding", None), getattr(model, "head", None)
    if spec is not None and spec.tied_embeddings and isinstance(embedding, ParallelEmbedding) \
            and isinstance(head, ParallelLMHead):
        head.output.weight = embedding.token.weight
    model.sequence_parallel = sequence_parallel
    return model.to(ctx.device)


def sync_tensor_parallel_grads(model: nn.Module, ctx: ParallelContext) -> None:
    """After backward: sum sequence-parallel partial gradients (one flat fp32 all-reduce) and
    replicated K/V-head gradients over the tensor group, making every rank's gradient equal to
    the serial model's slice. Works on ``main_grad`` in bf16 training (`data_parallel.default_grad_of`)."""
    if ctx.dims.tensor == 1:
        return
    all_reduce_gradients(sequence_parallel_parameters(model), ctx.tensor_group, average=False)
    allreduce_replicated_grads(model, ctx.tensor_group)


