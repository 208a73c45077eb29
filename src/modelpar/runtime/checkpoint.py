"""Checkpoints in the serial layout: save from any (t, p, d, v, ZeRO) layout, load into any other.

A checkpoint holds what a run needs to continue as if it had not stopped, every tensor in the
serial GPT's layout (fp32, CPU, padded vocabulary rows dropped), so a run on t2 x p2 x d2 can
resume on t4 x p2, with or without ZeRO-1, or on one process. The file (`torch.save`):

    {"format": "modelpar-checkpoint", "version": 2,
     "model":          serial state dict (`GPT.state_dict()` keys): the weights the model computes
                       with (in bf16 runs the bf16 copy, as fp32),
     "master_weights": {parameter name: fp32 master weight} of a bf16 run, else None,
     "optimizer":      {"exp_avg": {parameter name: m}, "exp_avg_sq": {parameter name: v},
                        "steps": AdamW steps taken (the bias corrections' t)},
     "completed_steps": training steps done: the next step's batch, dropout key and learning rate,
     "metadata":       {"model", "plan", "steps", "seed", "dtype"} of the run that wrote it}

Parameter names are the serial `GPT.named_parameters()` ones (a tied head weight is stored once,
under the embedding's name). A version-1 file (only "model" and "metadata": weights) still
loads; its run starts a fresh optimizer at step 0.

Saving gathers tensor-parallel shards over each tensor group (`ShardLayout.assemble`, padding
dropped), renames each pipeline chunk's local layer indices to global ones
(`PipelineChunk.serial_name`), takes ZeRO-1's Adam moments and master weights whole by an
all-gather over the data group (`runtime.zero`), and gathers the stages of data replica 0 to
global rank 0, which writes. Loading (`train.RankTrainer`) puts the weights (the master weights
when there are some) into the serial model before `parallelize` + `build_chunks` slice it like a
fresh initialisation, so the optimizer's fp32 master copy is the saved one; each rank then cuts
its parameters' moments from the serial ones (`shard_parameter_tensors`: tensor slice, zero
vocabulary padding) and the optimizer keeps its ZeRO-1 slice of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from modelpar.runtime.pipeline import PipelineChunk
from modelpar.runtime.tensor_parallel import ShardLayout, full_grads, full_state_dict, shard_layouts
from modelpar.specs.errors import SpecError

FORMAT = "modelpar-checkpoint"
VERSION = 2

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
    return _gather_to_rank0(ctx, local if _keeps(ctx) else None)


def _keeps(ctx) -> bool:
    """Whether this rank's gathered tensors go into the checkpoint: one per pipeline stage (data
    replica 0, tensor rank 0; the others hold copies)."""
    return ctx.data_rank == 0 and ctx.tensor_rank == 0


def serial_parameter_name(chunk: PipelineChunk, local_name: str, tied: bool) -> str:
    """The serial `named_parameters` name of a chunk's parameter; with tied embeddings the last
    stage's copy of the word embedding (the head's weight) is named as the embedding."""
    serial = chunk.serial_name(local_name)
    return TIED_EMBEDDING_WEIGHT if tied and serial == TIED_HEAD_WEIGHT else serial


@torch.no_grad()
def gather_full_gradients(chunks: Sequence[PipelineChunk], ctx, tied: bool) -> dict[str, torch.Tensor] | None:
    """The serial model's gradients (fp32, CPU, `named_parameters` names) on global rank 0, after
    the step's gradient synchronisation. With tied embeddings the head's copy is reported under
    the embedding's name (both copies hold the same summed gradient). Collective."""
    local = {}
    for chunk in chunks:
        for name, grad in full_grads(chunk, ctx).items():
            local[serial_parameter_name(chunk, name, tied)] = grad.float()
    return _gather_to_rank0(ctx, local if _keeps(ctx) else None)


def _assemble(local: torch.Tensor, layout: ShardLayout, group) -> torch.Tensor:
    """The serial tensor (padding dropped) from every tensor rank's `local`. Collective."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return layout.assemble(parts)


@torch.no_grad()
def gather_parameter_tensors(chunks: Sequence[PipelineChunk], ctx, tensors: dict[int, torch.Tensor],
                             tied: bool) -> dict[str, torch.Tensor] | None:
    """Tensors shaped like this rank's parameters (`tensors`: {id(parameter): tensor}, e.g. Adam
    moments) in the serial layout on global rank 0, None elsewhere: gathered over the tensor
    group, padding dropped, fp32 CPU, serial parameter names. Collective."""
    local = {}
    for chunk in chunks:
        layouts = shard_layouts(chunk)
        for name, param in chunk.named_parameters():
            tensor = tensors[id(param)]
            full = _assemble(tensor, layouts[name], ctx.tensor_group) if name in layouts else tensor
            local[serial_parameter_name(chunk, name, tied)] = full.detach().float().cpu().clone()
    return _gather_to_rank0(ctx, local if _keeps(ctx) else None)


@torch.no_grad()
def shard_parameter_tensors(chunks: Sequence[PipelineChunk], ctx, serial: dict[str, torch.Tensor],
                            tied: bool) -> dict[int, torch.Tensor]:
    """The inverse of `gather_parameter_tensors` on every rank: {id(parameter): this tensor rank's
    slice of the serial tensor of the parameter's name} (fp32, zero vocabulary padding, on the
    parameter's device)."""
    local = {}
    for chunk in chunks:
        layouts = shard_layouts(chunk)
        for name, param in chunk.named_parameters():
            full = serial[serial_parameter_name(chunk, name, tied)]
            piece = layouts[name].shard(full, ctx.tensor_rank) if name in layouts else full
            local[id(param)] = piece.to(param.device, torch.float32)
    return local


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in memory; the module docstring describes each field's file entry. Without
    `exp_avg` / `exp_avg_sq` (a weights-only checkpoint) a run starts a fresh optimizer."""

    model: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    master_weights: dict[str, torch.Tensor] | None = None
    exp_avg: dict[str, torch.Tensor] | None = None
    exp_avg_sq: dict[str, torch.Tensor] | None = None
    optimizer_steps: int = 0
    completed_steps: int = 0

    @property
    def has_optimizer_state(self) -> bool:
        return self.exp_avg is not None

    @torch.no_grad()
    def load_weights(self, serial: nn.Module) -> None:
        """Put the weights into a serial GPT: the state dict, then the fp32 master weights over its
        parameters (a tied weight is one parameter, so both of its names get the master value)."""
        serial.load_state_dict(self.model)
        if self.master_weights is not None:
            for name, param in serial.named_parameters():
                param.copy_(self.master_weights[name])

    def first_mismatch(self, serial: nn.Module) -> str | None:
        """The first entry whose name or shape differs from the serial model's (None: it fits)."""
        expected = {name: tuple(t.shape) for name, t in serial.state_dict().items()}
        parameters = {name: tuple(p.shape) for name, p in serial.named_parameters()}
        for entry, want in (("model", expected), ("master_weights", parameters), ("exp_avg", parameters),
                            ("exp_avg_sq", parameters)):
            tensors = getattr(self, entry)
            if tensors is None:
                continue
            got = {name: tuple(t.shape) for name, t in tensors.items()}
            wrong = sorted(set(got) ^ set(want)) or sorted(name for name in got if got[name] != want[name])
            if wrong:
                return f"{entry} {wrong[0]}"
        return None

    def to_payload(self) -> dict:
        optimizer = None
        if self.has_optimizer_state:
            optimizer = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.optimizer_steps}
        return {"format": FORMAT, "version": VERSION, "model": self.model, "master_weights": self.master_weights,
                "optimizer": optimizer, "completed_steps": self.completed_steps, "metadata": dict(self.metadata)}

    @classmethod
    def from_payload(cls, payload, path) -> "Checkpoint":
        """Read a `to_payload` dict (or a version-1 one: model and metadata); SpecError naming
        `path` for anything else."""
        def bad(what: str) -> SpecError:
            return SpecError(f"checkpoint {path}: {what}; pass a file written by `modelpar train --save-checkpoint`")

        if not isinstance(payload, dict) or not _is_tensor_dict(payload.get("model")):
            raise bad("not a modelpar checkpoint (no 'model' state dict)")
        version = payload.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise bad(f"format version {version!r} is newer than this modelpar's ({VERSION})")
        metadata = payload.get("metadata") or {}
        if version == 1:
            return cls(payload["model"], metadata)
        master, optimizer, completed = payload.get("master_weights"), payload.get("optimizer"), \
            payload.get("completed_steps")
        if master is not None and not _is_tensor_dict(master):
            raise bad("'master_weights' is not a dict of tensors")
        if not _is_count(completed):
            raise bad(f"'completed_steps' {completed!r} is not a non-negative integer")
        if optimizer is None:
            return cls(payload["model"], metadata, master, completed_steps=completed)
        if not (isinstance(optimizer, dict) and _is_tensor_dict(optimizer.get("exp_avg"))
                and _is_tensor_dict(optimizer.get("exp_avg_sq")) and _is_count(optimizer.get("steps"))):
            raise bad("'optimizer' needs dicts of tensors 'exp_avg', 'exp_avg_sq' and an integer 'steps'")
        return cls(payload["model"], metadata, master, optimizer["exp_avg"], optimizer["exp_avg_sq"],
                   optimizer["steps"], completed)


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values())


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def gather_checkpoint(chunks: Sequence[PipelineChunk], ctx, optimizer=None, *, tied: bool = False,
                      master_weights: bool = False, completed_steps: int = 0,
                      metadata: dict | None = None) -> Checkpoint | None:
    """The whole checkpoint on global rank 0 (None elsewhere). Collective. `optimizer`: a
    `runtime.zero` optimizer over these chunks' parameters, whose state is saved (None: weights
    only); `tied`: the model ties its embeddings; `master_weights`: save the optimizer's fp32
    master weights (bf16 training)."""
    model = gather_full_state_dict(chunks, ctx)
    master = exp_avg = exp_avg_sq = None
    steps = 0
    if optimizer is not None:
        ids = [id(param) for param in optimizer.params]
        state = optimizer.export_state()
        exp_avg = gather_parameter_tensors(chunks, ctx, dict(zip(ids, state.exp_avg)), tied)
        exp_avg_sq = gather_parameter_tensors(chunks, ctx, dict(zip(ids, state.exp_avg_sq)), tied)
        steps = state.steps
        if master_weights:
            master = gather_parameter_tensors(chunks, ctx, dict(zip(ids, optimizer.master_weights())), tied)
    if ctx.rank != 0:
        return None
    return Checkpoint(model, dict(metadata or {}), master, exp_avg, exp_avg_sq, steps, completed_steps)


def save_checkpoint(path: str | os.PathLike, chunks: Sequence[PipelineChunk], ctx, metadata: dict | None = None,
                    optimizer=None, **options) -> None:
    """Gather the checkpoint (`gather_checkpoint`, with its keyword `options`) and write it from
    global rank 0. Collective."""
    checkpoint = gather_checkpoint(chunks, ctx, optimizer, metadata=metadata, **options)
    if ctx.rank == 0:
        torch.save(checkpoint.to_payload(), path)
    dist.barrier()


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint in a file written by `save_checkpoint`; SpecError (one line) when the file is
    missing, unreadable or not a checkpoint."""
    if not os.path.isfile(path):
        raise SpecError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for a bad file
        raise SpecError(f"checkpoint {path}: cannot be read as a torch file ({type(error).__name__}: corrupt or "
                        f"truncated?); pass a file written by `modelpar train --save-checkpoint`") from None
    return Checkpoint.from_payload(payload, path)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(serial state dict, metadata) from a file written by `save_checkpoint` (`read_checkpoint`
    gives everything)."""
    checkpoint = read_checkpoint(path)
    return checkpoint.model, checkpoint.metadata
