"""Activation recomputation (gradient checkpointing): none, selective or full.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models":

- 'full' (Sec. 4, Chen et al. 2016): every transformer layer keeps only its input; the backward
  pass re-runs the layer's forward (one more forward of all layers, about +33% FLOPs).
- 'selective' (Sec. 4.1): only the attention core softmax(QK^T/sqrt(d))V -- the s^2 part of the
  activations (5 a s / h of the 34 + 5 a s / h bytes per element of Table 2) -- is recomputed,
  for a few percent more FLOPs.

Implementation: the chosen module's `forward` is replaced, on that instance only, by one that
calls `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`. Parameter names and the state
dict are untouched, so checkpoints load into any recompute mode. Recomputed collectives
(tensor-parallel all-reduces inside a layer) run again in the backward on every tensor rank in
the same order, so they stay matched.

Dropout inside a recomputed region replays the same mask: the model's dropout is keyed (a pure
function of the `DropoutKey` forward argument and global coordinates, `models.gpt.keyed_dropout`),
and torch's own RNG state is also restored (`preserve_rng_state=True`) for the unkeyed fallback.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.utils.checkpoint import checkpoint

from modelpar.specs.errors import SpecError

RECOMPUTE_MODES = ("none", "selective", "full")


def checkpoint_module(module: nn.Module) -> None:
    """Make `module` recompute its forward during backward (idempotent)."""
    if getattr(module, "_modelpar_checkpointed", False):
        return
    inner_forward = module.forward

    def forward(*args, **kwargs):
        if not module.training:
            return inner_forward(*args, **kwargs)
        return checkpoint(inner_forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    module.forward = forward
    module._modelpar_checkpointed = True


def attention_cores(layer: nn.Module) -> list[nn.Module]:
    """The attention-core modules of a layer (`attention.core`, serial or tensor-parallel)."""
    attention = getattr(layer, "attention", None)
    core = getattr(attention, "core", None) if attention is not None else None
    if core is None:
        raise SpecError(f"recompute 'selective': layer {type(layer).__name__} has no attention.core module; "
                        "use recompute 'full' or 'none'")
    return [core]


def apply_recompute(layers: Iterable[nn.Module], mode: str) -> int:
    """Apply recompute `mode` to transformer `layers`; returns how many modules were wrapped."""
    if mode not in RECOMPUTE_MODES:
        raise SpecError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
    wrapped = 0
    for layer in layers:
        if mode == "full":
            checkpoint_module(layer)
            wrapped += 1
        elif mode == "selective":
            for core in attention_cores(layer):
                checkpoint_module(core)
                wrapped += 1
    return wrapped
