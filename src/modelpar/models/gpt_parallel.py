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

from modelpar.models.gpt import MLP, Embedding, LMHead, SelfAttention
from modelpar.runtime.mesh import ParallelContext
from modelpar.runtime.data_parallel import all_reduce_gradients, default_grad_of
from modelpar.runtime.sequence_parallel import mark_module_sequence_parallel, sequence_parallel_parameters
from modelpar.runtime.tensor_parallel import (ParallelAttention, ParallelEmbedding, ParallelLMHead, ParallelMLP,
                                              ShardLayout, allreduce_replicated_grads)
from modelpar.specs import plan as rules
from modelpar.specs.errors import SpecError
from modelpar.specs.plan import ParallelPlan
from modelpar.specs.model import ModelSpec

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
