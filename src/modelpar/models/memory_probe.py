"""Measure the activation memory a transformer layer keeps for its backward pass.

"Saved bytes" (the definition the planner's `modelpar.planner.memory.activation_terms` follows):
the bytes of the distinct tensor *storages* that the autograd graph of one layer's forward keeps
alive until the backward pass, parameters and buffers excluded. A storage is counted once however
many saved views point into it, and whole, even when the saved views cover only part of it: that
is the memory the backward pass pins. (The runtime is written so no saved view pins a larger
buffer than itself, so this equals the sum of the saved logical tensors, the planner's terms.)

How: the forward runs under `torch.autograd.graph.saved_tensors_hooks`, whose pack hook files
(a detached alias of) every tensor autograd saves under a handle that the graph keeps instead. Once the forward has
returned, the handles still alive are exactly those the graph holds (nodes of branches whose
outputs were dropped have been freed, and their handles with them). Recomputation (`torch.utils.checkpoint`, non-reentrant) nests its own hooks
inside the checkpointed region: saves there become placeholders (never reach this hook, correctly:
they are freed and recomputed), and the region's inputs, which checkpoint does save, reach this
hook as ordinary saved tensors. So full recomputation counts the layer input and selective
recomputation the attention core's Q, K, V.

`measure_activation_bytes_per_layer` builds one layer of a model spec (serial or tensor-/sequence-
parallel, with the recompute mode applied), feeds it one micro-batch and returns the saved bytes:
cheap enough for a training run to report next to the planner's prediction.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from modelpar.models.gpt import DropoutKey, TransformerLayer
from modelpar.models.gpt_parallel import parallelize
from modelpar.runtime.precision import PrecisionPolicy
from modelpar.runtime.recompute import apply_recompute
from modelpar.specs.errors import SpecError
from modelpar.specs.model import ModelSpec
from modelpar.specs.plan import RECOMPUTE_MODES


@dataclass(frozen=True)
class SavedStorage:
    """One storage kept alive for the backward pass: the shape and dtype of (the first) saved view
    into it, and the storage's size in bytes."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass(frozen=True)
class SavedActivations:
    """The storages one forward pass saved for backward, largest first."""

    storages: tuple[SavedStorage, ...]

    @property
    def total_bytes(self) -> int:
        return sum(storage.nbytes for storage in self.storages)


class _SavedHandle:
    """What the graph stores in place of a saved tensor while the probe runs."""

    __slots__ = ("__weakref__",)


def saved_activations(module: nn.Module, *args, exclude: Iterable[torch.Tensor] = (), **kwargs) -> SavedActivations:
    """Run ``module(*args, **kwargs)`` and return the storages its autograd graph keeps for backward.

    Storages of ``module``'s parameters and buffers, and of the tensors in ``exclude``, are not
    activations and are left out. The graph is released before returning (no backward runs).
    """
    # The graph holds a handle, this table a detached alias (same storage, no grad_fn) for as
    # long as the handle lives. Holding the tensor itself would let a saved output keep its own
    # grad_fn, hence the handle, alive: a cycle that would outlive a dropped branch.
    saved: weakref.WeakKeyDictionary[_SavedHandle, torch.Tensor] = weakref.WeakKeyDictionary()

    def pack(tensor: torch.Tensor) -> _SavedHandle:
        handle = _SavedHandle()
        saved[handle] = tensor.detach()
        return handle

    with torch.autograd.graph.saved_tensors_hooks(pack, saved.__getitem__):
        output = module(*args, **kwargs)
    not_activations = {tensor.untyped_storage().data_ptr()
                       for tensor in (*module.parameters(), *module.buffers(), *exclude)}
    storages: dict[int, SavedStorage] = {}
    for tensor in list(saved.values()):  # the saves of nodes freed during the forward are gone
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in not_activations or pointer in storages or storage.nbytes() == 0:
            continue
        storages[pointer] = SavedStorage(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."),
                                         storage.nbytes())
    del output
    return SavedActivations(tuple(sorted(storages.values(), key=lambda storage: -storage.nbytes)))


class _OneLayer(nn.Module):
    """A container with the attribute names `parallelize` and `apply_recompute` expect."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList([TransformerLayer(spec, 0)])


def build_probe_layer(model_spec: ModelSpec, tensor_parallel: int = 1, sequence_parallel: bool = False,
                      recompute: str = "none", dtype: str = "bf16", ctx=None) -> nn.Module:
    """Layer 0 of ``model_spec`` as the runtime trains it: tensor-/sequence-parallel over
    ``ctx.tensor_group`` when tensor_parallel > 1, recompute applied, cast to ``dtype``, train mode."""
    if recompute not in RECOMPUTE_MODES:
        raise SpecError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {recompute!r}")
    if tensor_parallel > 1 and (ctx is None or ctx.dims.tensor != tensor_parallel):
        raise SpecError(f"tensor_parallel {tensor_parallel} needs a ParallelContext with tensor degree "
                        f"{tensor_parallel}, got {ctx!r}; pass ctx= from the running process group")
    if sequence_parallel and tensor_parallel == 1:
        raise SpecError("sequence_parallel needs tensor_parallel > 1; disable it or raise tensor_parallel")
    policy = PrecisionPolicy(dtype)
    with torch.random.fork_rng(devices=[]):  # default init; the values do not change the bytes saved
        container = _OneLayer(model_spec)
    if tensor_parallel > 1:
        parallelize(container, ctx, sequence_parallel)
    device = ctx.device if ctx is not None else torch.device("cpu")
    container.to(device)
    policy.cast_model(container)
    apply_recompute(container.layers, recompute)
    return container.layers[0].train()


def measure_activation_bytes_per_layer(model_spec: ModelSpec, micro_batch_size: int, tensor_parallel: int = 1,
                                       sequence_parallel: bool = False, recompute: str = "none", dtype: str = "bf16",
                                       ctx=None) -> float:
    """Saved-for-backward bytes of one transformer layer, one micro-batch, on this rank.

    Builds the layer (`build_probe_layer`) and runs its forward on a [b, s, h] input ([b, s/t, h]
    under sequence parallelism) that requires grad, as the previous layer's output does, with a
    dropout key (the training path). Compare with `modelpar.planner.memory.activation_bytes_per_layer`
    (bytes_per_value 2 for bf16, 4 for fp32). With tensor_parallel > 1 this is collective: every
    rank of ``ctx.tensor_group`` must call it.
    """
    if micro_batch_size < 1:
        raise SpecError(f"micro_batch_size must be positive, got {micro_batch_size!r}")
    layer = build_probe_layer(model_spec, tensor_parallel, sequence_parallel, recompute, dtype, ctx)
    tokens = model_spec.seq_length // tensor_parallel if sequence_parallel else model_spec.seq_length
    reference = next(layer.parameters())
    hidden = torch.randn(micro_batch_size, tokens, model_spec.hidden_size, dtype=reference.dtype,
                         device=reference.device, requires_grad=True)
    key = DropoutKey(seed=0, step=0)
    return float(saved_activations(layer, hidden, key).total_bytes)


def norm_statistics_bytes(model_spec: ModelSpec, micro_batch_size: int, tensor_parallel: int = 1,
                          sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Upper bound on the saved bytes the planner leaves out: the per-token statistics of a layer's
    two norms (LayerNorm mean and 1/std, RMSNorm 1/rms), at most two 4-byte values per token per
    norm, on this rank's tokens (s / t under sequence parallelism); 0 under full recomputation."""
    if recompute == "full":
        return 0.0
    tokens = micro_batch_size * model_spec.seq_length / (tensor_parallel if sequence_parallel else 1)
    return 2 * 2 * 4 * tokens


def layer_activation_bytes(model, plan, dtype: str, ctx) -> float:
    """Saved-for-backward bytes of one layer and micro-batch as `plan` trains it
    (`measure_activation_bytes_per_layer`; collective over the tensor group: every rank calls it)."""
    return measure_activation_bytes_per_layer(model, plan.micro_batch_size, plan.tensor_parallel,
                                              bool(plan.sequence_parallel) and plan.tensor_parallel > 1,
                                              plan.recompute, dtype, ctx)
