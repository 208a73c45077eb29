"""Pipeline parallelism: stage chunks cut from a GPT, and an interpreter of schedule action lists.

Layout (Narayanan et al. 2021, Sec. 2.2; Megatron-LM's interleaved layout): the L layers are
cut into p * v global stages of L / (p v) consecutive layers; pipeline rank r holds the v chunks
whose global stage is c * p + r (`schedules.global_stage`). The embedding belongs to global
stage 0 and the head (final norm, logits, loss) to global stage p v - 1.

The interpreter runs one rank's list of `schedules.Action` in order, with the dependencies the
schedule module states:

- F(c, i): global stage g = c p + r. Input: the micro-batch's tokens (g = 0) or the activation
  received from the rank holding stage g - 1. Output: sent to the rank holding g + 1, or, on the
  last stage, the micro-batch's loss divided by m, so that the accumulated gradient over the m
  micro-batches is the gradient of the mean loss of the whole batch.
- B(c, i): the output gradient is received from the rank holding g + 1 (or is d(loss)/d(loss)
  on the last stage); backward through the chunk; the input gradient is sent to g - 1.

Sends are non-blocking (`isend`, waited for at the end of the step) and the receive of the next
action that needs one is posted ahead (`irecv`), so a rank only ever blocks on data it needs now:
any action list that the planner's simulator runs without deadlock runs here without deadlock.
Messages carry a tag naming (direction, stage, micro-batch); gloo matches on it, so the order in
which two ranks post their sends and receives does not matter. (NCCL ignores tags and matches
each pair's messages in posting order; that holds for gpipe and 1f1b, and the interleaved
schedule on NCCL is untested here.)

Every action is timed: compute, receive waits and send launches are separate `TimelineEvent`s,
for the predicted-vs-measured timeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from modelpar.runtime.schedules import BACKWARD, FORWARD, Action, global_stage
from modelpar.specs.errors import SpecError


# --- layout -------------------------------------------------------------------------------------


def stage_layer_ranges(num_layers: int, num_stages: int, virtual_stages: int = 1) -> list[range]:
    """Layers of each global stage: L / (p v) consecutive layers each (the plan checks divisibility)."""
    total = num_stages * virtual_stages
    if num_layers % total:
        raise SpecError(
            f"num_layers {num_layers} is not divisible by pipeline_parallel {num_stages} x virtual_stages "
            f"{virtual_stages} = {total}; choose stages that divide {num_layers}"
        )
    per_stage = num_layers // total
    return [range(g * per_stage, (g + 1) * per_stage) for g in range(total)]


class PipelineChunk(nn.Module):
    """The layers of one global stage, plus the embedding (first stage) and the head (last stage).

    forward(inputs, targets, dropout_key): tokens [b, s] on the first stage, else hidden states;
    returns the hidden states, or the loss (a scalar) on the last stage. `dropout_key`
    (`models.gpt.DropoutKey` of the micro-batch) makes dropout masks layout-independent.
    Parameter names are the serial model's with local layer indices; `serial_name` maps them back.
    """

    def __init__(self, stage: int, num_global_stages: int, layer_indices: range, layers: Sequence[nn.Module],
                 embedding: nn.Module | None = None, head: nn.Module | None = None) -> None:
        super().__init__()
        self.stage = stage
        self.num_global_stages = num_global_stages
        self.layer_indices = layer_indices
        self.embedding = embedding
        self.layers = nn.ModuleList(layers)
        self.head = head

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_global_stages - 1

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None, dropout_key=None) -> torch.Tensor:
        hidden = self.embedding(inputs, dropout_key) if self.embedding is not None else inputs
        for layer in self.layers:
            hidden = layer(hidden, dropout_key)
        if self.head is not None:
            return self.head(hidden, targets)
        return hidden

    def serial_name(self, local_name: str) -> str:
        """'layers.1.mlp.fc.weight' -> 'layers.<first + 1>.mlp.fc.weight'; others unchanged."""
        if local_name.startswith("layers."):
            _, index, rest = local_name.split(".", 2)
            return f"layers.{self.layer_indices[int(index)]}.{rest}"
        return local_name


def build_chunks(model: nn.Module, pipeline_rank: int, num_stages: int, virtual_stages: int = 1) -> list[PipelineChunk]:
    """This rank's chunks (chunk c = global stage c * p + rank) cut from `model` (a GPT or its
    tensor-parallel version: anything with .embedding, .layers and .head). The modules are shared
    with `model`, not copied."""
    ranges = stage_layer_ranges(len(model.layers), num_stages, virtual_stages)
    total = num_stages * virtual_stages
    chunks = []
    for chunk in range(virtual_stages):
        stage = global_stage(pipeline_rank, chunk, num_stages)
        chunks.append(PipelineChunk(
            stage, total, ranges[stage], [model.layers[i] for i in ranges[stage]],
            embedding=model.embedding if stage == 0 else None,
            head=model.head if stage == total - 1 else None,
        ))
    return chunks


def tied_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters that the embedding and the head share (the tied word embedding), as
    (name in the embedding, parameter), sorted by name. With p > 1 the first and the last stage
    each hold their own copy and must sum their gradients (Shoeybi et al. 2019; Megatron's
    embedding group)."""
    head_ids = {id(p) for _, p in model.head.named_parameters(remove_duplicate=False)}
    return sorted((name, p) for name, p in model.embedding.named_parameters() if id(p) in head_ids)


# --- topology ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineTopology:
    """Where this rank sits in its pipeline: its pipeline rank, p, v, and the global rank of every
    pipeline rank of its pipeline (same data and tensor coordinates)."""

    pipeline_rank: int
    num_stages: int
    virtual_stages: int
    pipeline_global_ranks: tuple[int, ...]

    @property
    def num_global_stages(self) -> int:
        return self.num_stages * self.virtual_stages

    def global_stage(self, chunk: int) -> int:
        return global_stage(self.pipeline_rank, chunk, self.num_stages)

    def rank_of_stage(self, stage: int) -> int:
        """Global rank holding global stage `stage`."""
        return self.pipeline_global_ranks[stage % self.num_stages]

    @classmethod
    def from_context(cls, ctx, virtual_stages: int = 1) -> "PipelineTopology":
        ranks = dist.get_process_group_ranks(ctx.pipeline_group) if ctx.dims.pipeline > 1 else [ctx.rank]
        return cls(ctx.pipeline_rank, ctx.dims.pipeline, virtual_stages, tuple(ranks))


# --- timing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineEvent:
    """One timed interval on a rank: `action` like 'F(chunk 0, micro-batch 3)', `kind` one of
    'compute', 'recv' (waiting for an input), 'send' (launching one), 'send_wait' (end of step),
    'grad_sync', 'optimizer'. Times are `time.perf_counter()` seconds (one clock per machine)."""

    action: str
    start: float
    end: float
    kind: str

    def as_tuple(self) -> tuple[str, float, float, str]:
        return (self.action, self.start, self.end, self.kind)


class Timeline:
    """Collects TimelineEvents; `span(action, kind)` is a context manager that records one."""

    def __init__(self) -> None:
        self.events: list[TimelineEvent] = []

    def span(self, action: str, kind: str) -> "_Span":
        return _Span(self, action, kind)

    def total(self, kind: str) -> float:
        return sum(e.end - e.start for e in self.events if e.kind == kind)


class _Span:
    def __init__(self, timeline: Timeline, action: str, kind: str) -> None:
        self.timeline, self.action, self.kind = timeline, action, kind

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timeline.events.append(TimelineEvent(self.action, self.start, time.perf_counter(), self.kind))


# --- interpreter ---------------------------------------------------------------------------------

_ACTIVATION, _GRADIENT = 0, 1


class PipelineExecutor:
    """Runs this rank's actions for one step.

    `activation_shape`: the hidden-state tensor that crosses stages ([b, s, h], or [b, s/t, h]
    with sequence parallelism); `activation_dtype`: its dtype (the compute dtype).
    `loss_fn(loss) -> loss` converts a last-stage loss before scaling (fp32 in mixed precision).
    `grad_reducers[c]` (optional): a `GradientReducer` for chunk c, told to reduce during the
    last backward of that chunk in the step only.
    """

    def __init__(
        self,
        chunks: Sequence[PipelineChunk],
        topology: PipelineTopology,
        actions: Sequence[Action],
        num_micro_batches: int,
        activation_shape: tuple[int, ...],
        activation_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        grad_reducers: Sequence | None = None,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        self.chunks = list(chunks)
        self.topology = topology
        self.actions = list(actions)
        self.num_micro_batches = num_micro_batches
        self.activation_shape = tuple(activation_shape)
        self.activation_dtype = activation_dtype
        self.device = torch.device(device)
        self.grad_reducers = list(grad_reducers) if grad_reducers is not None else None
        self.loss_fn = loss_fn or (lambda loss: loss)
        self.timeline = timeline if timeline is not None else Timeline()
        self._last_backward = {a.chunk: k for k, a in enumerate(self.actions) if a.kind == BACKWARD}
        self._check_actions()

    def _check_actions(self) -> None:
        expected = {(kind, c, i) for kind in (FORWARD, BACKWARD) for c in range(len(self.chunks))
                    for i in range(self.num_micro_batches)}
        got = [(a.kind, a.chunk, a.micro_batch) for a in self.actions]
        if len(got) != len(expected) or set(got) != expected:
            raise ValueError(f"pipeline rank {self.topology.pipeline_rank}: the action list does not run every "
                             f"(F/B, chunk, micro-batch) exactly once for {len(self.chunks)} chunks and "
                             f"{self.num_micro_batches} micro-batches")

    # -- communication helpers --
    def _tag(self, direction: int, stage: int, micro_batch: int) -> int:
        return 1 + (direction * self.topology.num_global_stages + stage) * self.num_micro_batches + micro_batch

    def _needs_recv(self, action: Action) -> bool:
        stage = self.topology.global_stage(action.chunk)
        if action.kind == FORWARD:
            return stage > 0
        return stage < self.topology.num_global_stages - 1

    def _post_recv(self, action: Action):
        stage = self.topology.global_stage(action.chunk)
        if action.kind == FORWARD:
            peer, tag = self.topology.rank_of_stage(stage - 1), self._tag(_ACTIVATION, stage, action.micro_batch)
        else:
            peer, tag = self.topology.rank_of_stage(stage + 1), self._tag(_GRADIENT, stage, action.micro_batch)
        buffer = torch.empty(self.activation_shape, dtype=self.activation_dtype, device=self.device)
        return dist.irecv(buffer, src=peer, tag=tag), buffer

    def _send(self, tensor: torch.Tensor, to_stage: int, direction: int, micro_batch: int, label: str) -> None:
        with self.timeline.span(label, "send"):
            payload = tensor.detach().to(self.activation_dtype).contiguous()
            work = dist.isend(payload, dst=self.topology.rank_of_stage(to_stage),
                              tag=self._tag(direction, to_stage, micro_batch))
        self._pending_sends.append((work, payload))

    # -- the step --
    def run(self, batches: Sequence, dropout_keys: Sequence | None = None) -> torch.Tensor | None:
        """Execute the step on this rank's micro-batches (`batches[i].tokens`, `.targets`), with
        `dropout_keys[i]` the dropout key of micro-batch i (None: no keyed dropout).
        Returns the sum over micro-batches of loss / m on ranks holding the last stage, else None."""
        if len(batches) != self.num_micro_batches:
            raise ValueError(f"expected {self.num_micro_batches} micro-batches, got {len(batches)}")
        self._dropout_keys = list(dropout_keys) if dropout_keys is not None else [None] * self.num_micro_batches
        self._pending_sends: list = []
        self._inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        posted: dict[int, tuple] = {}
        loss_sum = None
        receiving = [k for k, a in enumerate(self.actions) if self._needs_recv(a)]
        next_recv = 0
        for index, action in enumerate(self.actions):
            # keep the receives of the next two receiving actions (from this one on) posted
            while next_recv < len(receiving) and receiving[next_recv] < index:
                next_recv += 1
            for k in receiving[next_recv: next_recv + 2]:
                if k not in posted:
                    posted[k] = self._post_recv(self.actions[k])
            received = None
            if index in posted:
                work, buffer = posted.pop(index)
                with self.timeline.span(str(action), "recv"):
                    work.wait()
                received = buffer
            if action.kind == FORWARD:
                loss = self._forward(action, batches[action.micro_batch], received)
                if loss is not None:
                    loss_sum = loss if loss_sum is None else loss_sum + loss
            else:
                self._backward(index, action, received)
        with self.timeline.span("step", "send_wait"):
            for work, _ in self._pending_sends:
                work.wait()
        self._pending_sends.clear()
        return loss_sum

    def _forward(self, action: Action, batch, received: torch.Tensor | None) -> torch.Tensor | None:
        chunk = self.chunks[action.chunk]
        key = (action.chunk, action.micro_batch)
        if chunk.is_first:
            inputs = batch.tokens.to(self.device)
            self._inputs[key] = None
        else:
            inputs = received.requires_grad_(True)
            self._inputs[key] = inputs
        with self.timeline.span(str(action), "compute"):
            output = chunk(inputs, batch.targets.to(self.device) if chunk.is_last else None,
                           self._dropout_keys[action.micro_batch])
            if chunk.is_last:
                output = self.loss_fn(output) / self.num_micro_batches
        self._outputs[key] = output
        if chunk.is_last:
            return output.detach()
        self._send(output, chunk.stage + 1, _ACTIVATION, action.micro_batch, str(action))
        return None

    def _backward(self, index: int, action: Action, received: torch.Tensor | None) -> None:
        chunk = self.chunks[action.chunk]
        key = (action.chunk, action.micro_batch)
        if self.grad_reducers is not None:
            self.grad_reducers[action.chunk].set_sync(index == self._last_backward[action.chunk])
        output = self._outputs.pop(key)
        inputs = self._inputs.pop(key)
        with self.timeline.span(str(action), "compute"):
            if chunk.is_last:
                output.backward()
            else:
                torch.autograd.backward(output, grad_tensors=received.to(output.dtype))
        if not chunk.is_first:
            self._send(inputs.grad, chunk.stage - 1, _GRADIENT, action.micro_batch, str(action))
