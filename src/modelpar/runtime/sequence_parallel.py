"""Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", Sec. 4.2.2): norms, dropouts and residual adds run on [b, s/t, h] shards of
the sequence instead of on t replicated copies of [b, s, h].

The serial norm modules work unchanged on a shard (they act per token), and the parallel layers
place their dropout masks with the shard's sequence offset (`sequence_offset`). What changes is
the gradient of parameters replicated across the tensor group but applied to only one shard on
each rank (norm weights and biases, the row-parallel output biases, learned positions): each rank
holds the gradient of its own tokens, so the training loop must sum them over the tensor group
after backward, `allreduce_sequence_parallel_grads` (Megatron's
``_allreduce_layernorm_grads`` / ``param.sequence_parallel`` tag).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

SEQUENCE_PARALLEL_ATTRIBUTE = "sequence_parallel"


def mark_sequence_parallel(param: nn.Parameter) -> nn.Parameter:
    """Tag a replicated parameter whose gradient is partial (this rank's sequence shard only)."""
    setattr(param, SEQUENCE_PARALLEL_ATTRIBUTE, True)
    return param


def mark_module_sequence_parallel(module: nn.Module) -> nn.Module:
    """Tag every parameter of a replicated module that runs on sequence shards (e.g. a norm)."""
    for param in module.parameters():
        mark_sequence_parallel(param)
    return module


def is_sequence_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, SEQUENCE_PARALLEL_ATTRIBUTE, False))


def sequence_parallel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tagged parameters, in named_parameters order (identical on every tensor rank)."""
    return [param for param in model.parameters() if is_sequence_parallel(param)]


def allreduce_sequence_parallel_grads(model: nn.Module, group) -> None:
    """Sum the gradients of sequence-parallel parameters over the tensor group, in one flat all-reduce.

    Call once after the step's backward passes (before the optimizer, in any order relative to the
    data-parallel gradient reduction: both are sums). A no-op on a group of size 1.
    """
    if dist.get_world_size(group) == 1:
        return
    grads = [param.grad for param in sequence_parallel_parameters(model) if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def sequence_offset(local_length: int, group, sequence_parallel: bool) -> int:
    """Global position of this rank's first token: tensor_rank * s/t under sequence parallelism, else 0."""
    return dist.get_rank(group) * local_length if sequence_parallel else 0
