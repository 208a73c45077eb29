"""Tensor-parallel layers (Shoeybi et al. 2019, "Megatron-LM", Sec. 3) with optional sequence
parallelism (Korthikanti et al. 2022, Sec. 4.2.2).

A column-parallel linear Y_i = X A_i keeps output rows (columns of A) ``rows[i]`` of the serial
weight on tensor rank i; a row-parallel linear Y = sum_i X_i B_i keeps input columns and sums the
partial products. Without sequence parallelism the input of a column layer enters through f
(identity / all-reduce) and a row layer leaves through g (all-reduce / identity); with it they
become all-gather / reduce-scatter along the sequence.

Every sharded parameter records a `ShardLayout` (which global indices along which dim each rank
holds), so any layout can be gathered back into the serial state dict and re-sliced
(`modelpar.models.gpt_parallel`). Layers are built from the serial modules by slicing their weights.

Vocabulary padding (Megatron-LM's ``--make-vocab-size-divisible-by``): a vocabulary V that t does
not divide is padded to t ceil(V / t) rows (`padded_chunk_layout`). The padding rows of the
embedding and output weights are zeros that no token looks up; the cross-entropy sets their
logits to -inf, so they take no probability, the loss is the unpadded serial loss, and their
gradients are exactly zero. Gathering drops them: checkpoints keep the unpadded serial layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modelpar.models.gpt import (AttentionCore, DropoutSite, Embedding, LMHead, MLP, SelfAttention, attention_inputs,
                                 keyed_dropout, merge_heads, mlp_activation)
from modelpar.runtime.collectives import (SEQUENCE_DIM, _all_gather, gather_last_dim,
                                          reduce_from_tensor_region_in_place, reduce_scatter_sequence,
                                          start_all_gather, start_all_reduce, start_reduce_scatter)
from modelpar.runtime.data_parallel import default_grad_of
from modelpar.runtime.sequence_parallel import mark_module_sequence_parallel, mark_sequence_parallel, sequence_offset


@dataclass(frozen=True, eq=False)
class ShardLayout:
    """Local parameter = full.index_select(dim, indices[tensor_rank]); full has ``full_size`` along dim.

    An index held by several ranks (replicated K/V heads when t > kv_heads) is *replicated*: its
    gradient is the sum of the replicas' gradients (`allreduce_replicated_grads`).

    ``local_size`` (padded layouts only): every rank's length along ``dim``; rank r's indices fill
    its first ``len(indices[r])`` entries and the rest is zero padding (None: no padding).
    """

    dim: int
    indices: tuple[torch.Tensor, ...]
    full_size: int
    local_size: int | None = None

    def local_length(self, rank: int) -> int:
        """Length along ``dim`` of rank `rank`'s tensor, padding included."""
        return self.local_size if self.local_size is not None else len(self.indices[rank])

    def shard(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s tensor cut from the serial tensor `full` (a new tensor; padding is zero)."""
        local = full.detach().index_select(self.dim, self.indices[rank].to(full.device))
        padding = self.local_length(rank) - local.shape[self.dim]
        if padding:
            shape = list(local.shape)
            shape[self.dim] = padding
            local = torch.cat([local, local.new_zeros(shape)], dim=self.dim)
        return local  # index_select made a new tensor

    def assemble(self, parts) -> torch.Tensor:
        """The serial tensor from every rank's tensor (in rank order), padding dropped."""
        first = parts[0]
        shape = list(first.shape)
        shape[self.dim] = self.full_size
        full = torch.empty(shape, dtype=first.dtype, device=first.device)
        for indices, part in zip(self.indices, parts):
            full.index_copy_(self.dim, indices.to(first.device), part.narrow(self.dim, 0, len(indices)))
        return full

    @cached_property
    def replicated(self) -> torch.Tensor:
        """Sorted global indices held by more than one rank."""
        counts = torch.bincount(torch.cat(self.indices), minlength=self.full_size)
        return torch.nonzero(counts > 1).flatten()


def chunk_indices(size: int, world: int) -> tuple[torch.Tensor, ...]:
    """Contiguous equal chunks [r * size / world, (r + 1) * size / world) for each rank r."""
    if size % world:
        raise ValueError(f"size {size} does not split evenly over {world} tensor ranks")
    return tuple(torch.arange(size).chunk(world))


def padded_chunk_layout(size: int, world: int, dim: int = 0) -> ShardLayout:
    """Contiguous chunks of n = ceil(size / world) along `dim`: rank r holds [r n, (r + 1) n) of the
    size padded to n * world, the indices past `size` being padding (Megatron-LM's vocabulary
    padding, with make-vocab-size-divisible-by = 1). Without padding this is `chunk_indices`."""
    per_rank = -(-size // world)
    indices = tuple(torch.arange(min(r * per_rank, size), min((r + 1) * per_rank, size)) for r in range(world))
    return ShardLayout(dim, indices, size, per_rank if per_rank * world != size else None)


def _rank(group) -> int:
    return dist.get_rank(group)


def _slice(tensor: torch.Tensor, dim: int, indices: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().index_select(dim, indices.to(tensor.device)).clone())


def _weight_and_bias_grads(ctx, grad: torch.Tensor, inputs: torch.Tensor | None):
    """dW = dY^T X and db = sum over tokens of dY, with tokens flattened ([.., out] x [.., in])."""
    grad_rows = grad.reshape(-1, grad.shape[-1])
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[1]:
        grad_weight = grad_rows.t().mm(inputs.reshape(-1, inputs.shape[-1]))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_rows.sum(0)
    return grad_weight, grad_bias


class _ColumnParallelLinear(torch.autograd.Function):
    """y = x W^T + b entered through f (identity forward, all-reduce of dX backward), with the
    all-reduce of dX = dY W launched asynchronously and the weight and bias gradients computed
    while it runs (Megatron-LM's async tensor-model-parallel all-reduce,
    LinearWithGradAccumulationAndAsyncCommunication; Narayanan et al. 2021, Sec. 4.2). Saves what
    F.linear saves: the input x (the weight is a parameter)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        pending = start_all_reduce(grad.matmul(weight), ctx.group) if ctx.needs_input_grad[0] else None
        grad_weight, grad_bias = _weight_and_bias_grads(ctx, grad, x)
        return (pending.wait() if pending is not None else None), grad_weight, grad_bias, None


class _SequenceParallelLinear(torch.autograd.Function):
    """y = all_gather_sequence(x) W^T + b that saves only the sequence shard x [b, s/t, in] and
    all-gathers it again in the backward pass for the weight gradient (Korthikanti et al. 2022,
    Sec. 4.2.2; Megatron's LinearWithGradAccumulationAndAsyncCommunication): the gathered
    [b, s, in] input is not kept between forward and backward, so the stored activation is s b h / t.
    The input gradient is reduce-scattered back to the shard (the dual of the all-gather).

    Backward overlaps as Megatron does: the re-gather of x runs while dX = dY W is computed, and
    the reduce-scatter of dX runs while dW and db are computed."""

    @staticmethod
    def forward(ctx, shard, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(shard, weight)
        return F.linear(_all_gather(shard, SEQUENCE_DIM, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        shard, weight = ctx.saved_tensors
        gathering = start_all_gather(shard, SEQUENCE_DIM, ctx.group) if ctx.needs_input_grad[1] else None
        grad_full = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        gathered = gathering.wait() if gathering is not None else None
        scattering = start_reduce_scatter(grad_full, SEQUENCE_DIM, ctx.group) if grad_full is not None else None
        grad_weight, grad_bias = _weight_and_bias_grads(ctx, grad, gathered)
        return (scattering.wait() if scattering is not None else None), grad_weight, grad_bias, None


class ColumnParallelLinear(nn.Module):
    """y_local = x W[rows]^T + b[rows] (output features ``rows[tensor_rank]`` of the serial linear).

    Input: replicated [.., in] (enters through f), or a sequence shard [b, s/t, in] when
    ``sequence_parallel`` (all-gathered along the sequence; only the shard is saved for backward,
    `_SequenceParallelLinear`). Output: [.., len(rows)] on this rank,
    or all ranks' outputs concatenated in rank order when ``gather_output``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, layout: ShardLayout,
                 sequence_parallel: bool = False, gather_output: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.gather_output = gather_output
        self.shard_layouts = {"weight": layout}
        if bias is not None:
            self.shard_layouts["bias"] = ShardLayout(0, layout.indices, layout.full_size)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, rows: tuple[torch.Tensor, ...] | None = None,
                    sequence_parallel: bool = False, gather_output: bool = False) -> "ColumnParallelLinear":
        rows = rows if rows is not None else chunk_indices(linear.out_features, dist.get_world_size(group))
        mine = rows[_rank(group)]
        bias = _slice(linear.bias, 0, mine).data if linear.bias is not None else None
        return cls(_slice(linear.weight, 0, mine).data, bias, group, ShardLayout(0, rows, linear.out_features),
                   sequence_parallel, gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dist.get_world_size(self.group) == 1:
            y = F.linear(x, self.weight, self.bias)
        elif self.sequence_parallel:
            y = _SequenceParallelLinear.apply(x, self.weight, self.bias, self.group)
        else:
            y = _ColumnParallelLinear.apply(x, self.weight, self.bias, self.group)
        return gather_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = sum_ranks x_local W[:, cols]^T + b (input features ``cols[tensor_rank]`` of the serial linear).

    Input: this rank's chunk of the features [.., len(cols)]. Output: replicated [.., out]
    (all-reduce), or a sequence shard [b, s/t, out] (reduce-scatter) when ``sequence_parallel``;
    the replicated bias is added after the reduction (and is then sequence-parallel-tagged).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, layout: ShardLayout,
                 sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.shard_layouts = {"weight": layout}
        if self.bias is not None and sequence_parallel:
            mark_sequence_parallel(self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, cols: tuple[torch.Tensor, ...] | None = None,
                    sequence_parallel: bool = False) -> "RowParallelLinear":
        cols = cols if cols is not None else chunk_indices(linear.in_features, dist.get_world_size(group))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(_slice(linear.weight, 1, cols[_rank(group)]).data, bias, group,
                   ShardLayout(1, cols, linear.in_features), sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # a fresh temporary: reduced in place
        if self.sequence_parallel:
            y = reduce_scatter_sequence(y, self.group)
        else:
            y = reduce_from_tensor_region_in_place(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the (padded) embedding table on each rank (`padded_chunk_layout`);
    tokens outside give 0, then the ranks' outputs are summed (all-reduce, or reduce-scatter to
    sequence shards under sequence parallelism)."""

    def __init__(self, weight: torch.Tensor, group, layout: ShardLayout, sequence_parallel: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.shard_layouts = {"weight": layout}
        self.vocab_start = _rank(group) * weight.shape[0]  # contiguous equal chunks

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group, sequence_parallel: bool = False) -> "VocabParallelEmbedding":
        layout = padded_chunk_layout(embedding.num_embeddings, dist.get_world_size(group))
        return cls(layout.shard(embedding.weight, _rank(group)), group, layout, sequence_parallel)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(hidden, self.group)
        return reduce_from_tensor_region_in_place(hidden, self.group)  # hidden: a fresh temporary


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = log sum_v exp(z_v - m) - (z_target - m) with m, the sum and z_target each one all-reduce;
    gradient softmax(z) - onehot(target), computed locally (Shoeybi et al. 2019, Sec. 3). Columns at
    or past ``vocab_size`` (vocabulary padding) get z = -inf: probability 0, gradient 0."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, vocab_size):
        ctx.input_dtype = logits.dtype
        logits = logits.float()
        width = logits.shape[-1]
        valid = width if vocab_size is None else max(0, min(width, vocab_size - vocab_start))
        if valid < width:
            padding = torch.arange(width, device=logits.device) >= valid
            logits = logits.masked_fill(padding, float("-inf"))
        maximum = logits.max(dim=-1).values
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - maximum.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local = targets - vocab_start
        inside = (local >= 0) & (local < valid)
        local = local.masked_fill(~inside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp, local, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, inside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy (fp32, shape of targets) from vocab-sharded logits [.., V/t], never
    gathering the full logits. ``vocab_start`` is this rank's first vocabulary row; ``vocab_size``
    the unpadded vocabulary (columns past it are padding; None: no padding)."""
    if dist.get_world_size(group) == 1:
        if vocab_size is not None and logits.shape[-1] > vocab_size:
            logits = logits[..., :vocab_size]
        flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return flat.view_as(targets)
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, group, vocab_size)


# ------------------------------------------------------------------------------------------------
# Transformer blocks
# ------------------------------------------------------------------------------------------------


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
        world, rank = dist.get_world_size(group), _rank(group)
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
        return _rank(self.group) * self.output.weight.shape[0]  # contiguous equal chunks

    @property
    def vocab_size(self) -> int:
        """The unpadded vocabulary V."""
        return self.output.shard_layouts["weight"].full_size

    @classmethod
    def from_serial(cls, head: LMHead, group, sequence_parallel: bool) -> "ParallelLMHead":
        layout = padded_chunk_layout(head.output.out_features, dist.get_world_size(group))
        output = ColumnParallelLinear(layout.shard(head.output.weight, _rank(group)), None, group, layout,
                                      sequence_parallel)
        return cls(head.norm, output, group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits [b, s, V] (gathered, padding dropped; for evaluation and sampling only)."""
        return gather_last_dim(self.output(self.norm(hidden)), self.group)[..., : self.vocab_size]

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.norm(hidden))
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_start, self.group, self.vocab_size).mean()


@torch.no_grad()
def allreduce_replicated_grads(model: nn.Module, group, grad_of=default_grad_of) -> None:
    """Sum, over the ranks holding it, the gradient of every replicated shard index (K/V heads kept by
    several ranks when t > kv_heads): each replica saw only its own query heads' contribution.
    `grad_of(param)`: the gradient to sync (default: ``main_grad`` in bf16 training, else ``.grad``)."""
    rank = _rank(group)
    for module in model.modules():
        for name, layout in getattr(module, "shard_layouts", {}).items():
            grad = grad_of(getattr(module, name))
            replicated = layout.replicated
            if grad is None or replicated.numel() == 0:
                continue
            mine = layout.indices[rank]
            local_positions = torch.nonzero(torch.isin(mine, replicated)).flatten()
            slots = torch.searchsorted(replicated, mine[local_positions])
            device = grad.device
            local_positions, slots = local_positions.to(device), slots.to(device)
            shape = list(grad.shape)
            shape[layout.dim] = replicated.numel()
            buffer = torch.zeros(shape, dtype=grad.dtype, device=device)
            buffer.index_add_(layout.dim, slots, grad.index_select(layout.dim, local_positions))
            dist.all_reduce(buffer, group=group)
            grad.index_copy_(layout.dim, local_positions, buffer.index_select(layout.dim, slots))
