"""Checkpoints in the serial layout: save from any (t, p, d) layout, load into any other.

A checkpoint is the serial GPT's state dict (`models.gpt.GPT.state_dict()` keys, fp32 CPU
tensors), so a run on t2 x p2 x d2 can resume on t4 x p2 or on one process. Saving gathers
tensor-parallel shards with `models.parallelize.full_state_dict` (collective over each tensor
group), renames each pipeline chunk's local layer indices back to global ones
(`PipelineChunk.serial_name`), and gathers the stages of data replica 0 to global rank 0.
Loading builds the serial model, loads the state dict, and lets `parallelize` + `build_chunks`
slice it like a fresh initialisation (`train.RankTrainer(initial_state=...)`).

In bf16 mode the saved weights are the bf16 compute copy cast to fp32 (the fp32 master shards
of the optimizer are not saved; nor are the Adam moments: a loaded checkpoint restarts the
optimizer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from modelpar.models.parallelize import full_grads, full_state_dict
from modelpar.runtime.pipeline import PipelineChunk
from modelpar.specs.errors import SpecError

TIED_HEAD_WEIGHT = "head.output.weight"
TIED_EMBEDDING_WEIGHT = "embedding.token.weight"


def _gather_to_rank0(ctx, local: dict | None) -> dict | None:
    """Merge the dicts of every rank that contributes one into a dict on global rank 0."""
    gathered = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if ctx.rank != 0:
        return None
    merged: dict = {}
    for part in gathered:
        if part:
            merged.update(part)
    return merged


@torch.no_grad()
def gather_full_state_dict(chunks: Sequence[PipelineChunk], ctx) -> dict[str, torch.Tensor] | None:
    """The serial state dict (fp32, CPU) on global rank 0, None elsewhere. Collective: every rank calls it."""
    local = {}
    for chunk in chunks:
        for name, tensor in full_state_dict(chunk, ctx).items():
            local[chunk.serial_name(name)] = tensor.float() if tensor.is_floating_point() else tensor
    keep = ctx.data_rank == 0 and ctx.tensor_rank == 0
    return _gather_to_rank0(ctx, local if keep else None)


@torch.no_grad()
def gather_full_gradients(chunks: Sequence[PipelineChunk], ctx, tied: bool) -> dict[str, torch.Tensor] | None:
    """The serial model's gradients (fp32, CPU, `named_parameters` names) on global rank 0, after
    the step's gradient synchronisation. With tied embeddings the head's copy is reported under
    the embedding's name (both copies hold the same summed gradient). Collective."""
    local = {}
    for chunk in chunks:
        for name, grad in full_grads(chunk, ctx).items():
            serial = chunk.serial_name(name)
            if tied and serial == TIED_HEAD_WEIGHT:
                serial = TIED_EMBEDDING_WEIGHT
            local[serial] = grad.float()
    keep = ctx.data_rank == 0 and ctx.tensor_rank == 0
    return _gather_to_rank0(ctx, local if keep else None)


def save_checkpoint(path: str | os.PathLike, chunks: Sequence[PipelineChunk], ctx,
                    metadata: dict | None = None) -> None:
    """Gather the serial state dict and write it (with `metadata`) from global rank 0. Collective."""
    state = gather_full_state_dict(chunks, ctx)
    if ctx.rank == 0:
        torch.save({"model": state, "metadata": dict(metadata or {})}, path)
    dist.barrier()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(serial state dict, metadata) from a file written by `save_checkpoint`."""
    if not os.path.isfile(path):
        raise SpecError(f"checkpoint {path}: no such file")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "model" not in payload:
        raise SpecError(f"checkpoint {path}: not a modelpar checkpoint (no 'model' entry)")
    return payload["model"], payload.get("metadata", {})
