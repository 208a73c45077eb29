"""Tensor-parallel layers (Shoeybi et al. 2019, "Megatron-LM", Sec. 3) with optional sequence
parallelism (Korthikanti et al. 2022, Sec. 4.2.2).

A column-parallel linear Y_i = X A_i keeps output rows (columns of A) ``rows[i]`` of the serial
weight on tensor rank i; a row-parallel linear Y = sum_i X_i B_i keeps input columns and sums the
partial products. Without sequence parallelism the input of a column layer enters through f
(identity / all-reduce) and a row layer leaves through g (all-reduce / identity); with it they
become all-gather / reduce-scatter along the sequence.

Every sharded parameter records a `ShardLayout` (which global indices along which dim each rank
holds), so any layout can be gathered back into the serial state dict and re-sliced
(`full_state_dict`, `load_full_state_dict`). Layers are built from the serial modules by slicing their
weights; the GPT's blocks made of them are `modelpar.models.gpt_parallel`.

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

from modelpar.runtime.collectives import (SEQUENCE_DIM, _all_gather, gather_last_dim,
                                          reduce_from_tensor_region_in_place, reduce_scatter_sequence,
                                          start_all_gather, start_all_reduce, start_reduce_scatter)
from modelpar.runtime.data_parallel import default_grad_of
from modelpar.runtime.mesh import ParallelContext
from modelpar.runtime.sequence_parallel import mark_sequence_parallel
from modelpar.specs.errors import SpecError


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


def shard_layouts(model: nn.Module) -> dict[str, ShardLayout]:
    """{parameter name: ShardLayout} for every tensor-parallel parameter (names as in state_dict)."""
    layouts = {}
    for module_name, module in model.named_modules():
        for param_name, layout in getattr(module, "shard_layouts", {}).items():
            layouts[f"{module_name}.{param_name}" if module_name else param_name] = layout
    return layouts


def shard_layouts_by_parameter(model: nn.Module) -> dict[int, ShardLayout]:
    """{id(parameter): ShardLayout} for every tensor-parallel parameter (a tied weight appears once)."""
    layouts = {}
    for module in model.modules():
        for param_name, layout in getattr(module, "shard_layouts", {}).items():
            layouts[id(getattr(module, param_name))] = layout
    return layouts


def _gather(local: torch.Tensor, layout: ShardLayout, group) -> torch.Tensor:
    """The serial tensor (vocabulary padding dropped) from every tensor rank's shard. Collective."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return layout.assemble(parts)


@torch.no_grad()
def full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """The serial model's state dict (CPU tensors), gathered over the tensor group. Collective: call
    on every tensor rank. Keys are those of the (sub-)model passed in."""
    layouts = shard_layouts(model)
    state = {}
    for name, tensor in model.state_dict().items():
        full = _gather(tensor, layouts[name], ctx.tensor_group) if name in layouts else tensor
        state[name] = full.detach().cpu().clone()
    return state


@torch.no_grad()
def full_grads(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Gradients of the serial parameters (CPU), gathered over the tensor group; call after
    `sync_tensor_parallel_grads`. Shared (tied) parameters appear once, under their first name.
    bf16 training: the fp32 ``main_grad`` (`data_parallel.default_grad_of`)."""
    layouts = shard_layouts(model)
    grads = {}
    for name, param in model.named_parameters():
        grad = default_grad_of(param)
        if grad is None:
            continue
        full = _gather(grad, layouts[name], ctx.tensor_group) if name in layouts else grad
        grads[name] = full.detach().cpu().clone()
    return grads


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], ctx: ParallelContext) -> None:
    """Load a serial state dict into any layout, slicing each sharded tensor for this tensor rank."""
    layouts = shard_layouts(model)
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise SpecError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                        f"load a checkpoint of the same model spec")
    for name, target in own.items():
        source = state[name]
        if name in layouts:
            source = layouts[name].shard(source, ctx.tensor_rank)
        target.copy_(source.to(target.device, target.dtype))
