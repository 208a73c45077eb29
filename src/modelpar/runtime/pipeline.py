"""Pipeline parallelism: stage chunks cut from a GPT, and an interpreter of schedule action lists.

Layout (Narayanan et al. 2021, Sec. 2.2; Megatron-LM's interleaved layout): the L layers are
cut into p * v global stages of L / (p v) consecutive layers; pipeline rank r holds the v chunks
whose global stage is c * p + r (`schedules.actions.global_stage`). The embedding belongs to
global stage 0 and the head (final norm, logits, loss) to global stage p v - 1.

The interpreter runs one rank's row of the schedule (`schedules.actions.Action`s) in order,
receiving and sending what `schedules.dependencies` says. The first stage's forward reads the
micro-batch's tokens; the last stage's returns the micro-batch's loss divided by m, so that the
accumulated gradient over the m micro-batches is the gradient of the mean loss of the batch.

Point-to-point, two modes (`p2p`; `modelpar train --p2p`):

- "tagged" (gloo's default): sends are non-blocking (`isend`; an activation's send is waited for
  at that micro-batch's backward, when it has surely arrived, the others at the end of the step)
  and the receive of the next action that needs one is posted ahead (`irecv`), so a rank only
  ever blocks on data it needs now. Messages carry a tag naming (direction, stage, micro-batch)
  and gloo matches on it, so the order in which two ranks post them does not matter. NCCL ignores
  tags and serialises a pair's operations on one stream, so this mode is refused there.
- "batched" (NCCL's default; selectable on gloo to test it): the exchange programs of
  `schedules.p2p` (Megatron-LM's and torch.distributed.pipelining's scheme, built from the whole
  schedule with no collective and checked when the executor is built): after each lockstep
  round ONE `batch_isend_irecv` with tag 0, waited for at once. gloo's sends are rendezvous too,
  so running this mode on gloo exercises the same matching and deadlock-freedom.

Once sent, a stage output's values are freed (`deallocate_output_data`, Megatron-LM's
``deallocate_output_tensor``): only its autograd node is needed until the backward pass, so a
stage holds one [b, s, h] tensor less per micro-batch in flight.

Every action is timed: compute, receive waits and send launches are separate `TimelineEvent`s,
for the predicted-vs-measured timeline. On CUDA the spans are CUDA events on the current stream
(a CPU clock would only see kernel launches), converted to the same perf_counter clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from modelpar.schedules.dependencies import ACTIVATION, Message, produces, receives
from modelpar.schedules.p2p import P2P_MODES, Exchange, check_exchange_programs, exchange_programs
from modelpar.schedules.actions import BACKWARD, FORWARD, Action, global_stage
from modelpar.runtime.timeline import Timeline
from modelpar.schedules.events import BACKWARD_KIND, FORWARD_KIND, RECV_KIND, SEND_KIND, SEND_WAIT_KIND
from modelpar.specs import plan as rules
from modelpar.specs.errors import SpecError
from modelpar.specs.plan import ParallelPlan



# --- layout -------------------------------------------------------------------------------------


def stage_layer_ranges(num_layers: int, num_stages: int, virtual_stages: int = 1) -> list[range]:
    """Layers of each global stage: L / (p v) consecutive layers each (the plan checks divisibility)."""
    model = SimpleNamespace(num_layers=num_layers, name="the model")
    reason = rules.layers_rule(model, num_stages, virtual_stages)
    if reason is not None:
        raise SpecError(rules.explain(reason, ParallelPlan(pipeline_parallel=num_stages, virtual_stages=virtual_stages),
                                      model))
    total = num_stages * virtual_stages
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
    """Where this rank sits in its pipeline: its pipeline rank, p, v, the global rank of every
    pipeline rank of its pipeline (same data and tensor coordinates), and the process group of
    those ranks (`group`; None: the default group, which must then be exactly the pipeline)."""

    pipeline_rank: int
    num_stages: int
    virtual_stages: int
    pipeline_global_ranks: tuple[int, ...]
    group: object = field(default=None, compare=False, repr=False)

    @property
    def num_global_stages(self) -> int:
        return self.num_stages * self.virtual_stages

    def global_stage(self, chunk: int) -> int:
        return global_stage(self.pipeline_rank, chunk, self.num_stages)

    @classmethod
    def from_context(cls, ctx, virtual_stages: int = 1) -> "PipelineTopology":
        if ctx.dims.pipeline == 1:
            return cls(ctx.pipeline_rank, 1, virtual_stages, (ctx.rank,))
        ranks = dist.get_process_group_ranks(ctx.pipeline_group)
        return cls(ctx.pipeline_rank, ctx.dims.pipeline, virtual_stages, tuple(ranks), ctx.pipeline_group)


# --- interpreter ---------------------------------------------------------------------------------


def deallocate_output_data(output: torch.Tensor) -> None:
    """Free a sent stage output's values, keeping its autograd node (Megatron-LM's
    ``deallocate_output_tensor``): the backward pass starts from the node with the received
    gradient and never reads the output's values (an op that needs its own output saved a
    reference of its own). The values are swapped for one element expanded to the output's
    shape, so that `torch.autograd.backward` still sees matching shapes. The send keeps the
    payload alive until it completes. Views are left alone (their base would stay anyway)."""
    if output._base is None:
        output.data = torch.empty(1, dtype=output.dtype, device=output.device).expand(output.shape)


def resolve_p2p_mode(requested: str | None, backend: str) -> str:
    """The point-to-point mode: `requested`, else "batched" on NCCL and "tagged" otherwise.
    "tagged" on NCCL is refused: NCCL ignores tags (module docstring)."""
    mode = requested or ("batched" if "nccl" in backend else "tagged")
    if mode not in P2P_MODES:
        raise SpecError(f"pipeline p2p mode {mode!r} (--p2p) is unknown; use one of {', '.join(P2P_MODES)}")
    if mode == "tagged" and "nccl" in backend:
        raise SpecError(f"pipeline p2p mode 'tagged' needs gloo's tag matching but the backend is {backend}; "
                        "use 'batched' (--p2p batched, the NCCL default)")
    return mode


class PipelineExecutor:
    """Runs this rank's actions for one step.

    `schedule`: every pipeline rank's action list (`schedules.actions.build_schedule`); this rank
    runs row `topology.pipeline_rank`, the batched exchanges are planned from all of them.
    `activation_shape`: the hidden-state tensor that crosses stages ([b, s, h], or [b, s/t, h]
    with sequence parallelism); `activation_dtype`: its dtype (the compute dtype).
    `loss_fn(loss) -> loss` converts a last-stage loss before scaling (fp32 in mixed precision).
    `grad_reducers[c]` (optional): a `GradientReducer` for chunk c, told to reduce during the
    last backward of that chunk in the step only. `p2p`: "tagged" or "batched" (module
    docstring; None: `resolve_p2p_mode`).
    """

    def __init__(
        self,
        chunks: Sequence[PipelineChunk],
        topology: PipelineTopology,
        schedule: Sequence[Sequence[Action]],
        num_micro_batches: int,
        activation_shape: tuple[int, ...],
        activation_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        grad_reducers: Sequence | None = None,
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        timeline: Timeline | None = None,
        p2p: str | None = None,
    ) -> None:
        self.chunks = list(chunks)
        self.topology = topology
        if len(schedule) != topology.num_stages:
            raise ValueError(f"the schedule has {len(schedule)} rank lists for {topology.num_stages} pipeline stages")
        self.actions = list(schedule[topology.pipeline_rank])
        self.num_micro_batches = num_micro_batches
        self.activation_shape = tuple(activation_shape)
        self.activation_dtype = activation_dtype
        self.device = torch.device(device)
        self.grad_reducers = list(grad_reducers) if grad_reducers is not None else None
        self.loss_fn = loss_fn or (lambda loss: loss)
        self.timeline = timeline if timeline is not None else Timeline()
        if self.device.type == "cuda":
            self.timeline.use_cuda(self.device)
        self._last_backward = {a.chunk: k for k, a in enumerate(self.actions) if a.kind == BACKWARD}
        self._where = (topology.pipeline_rank, topology.num_stages, topology.num_global_stages)
        self._receives = [receives(a, *self._where) for a in self.actions]  # per action: Message or None
        self._produces = [produces(a, *self._where) for a in self.actions]
        self._check_actions()
        if topology.num_stages == 1 and len(self.chunks) > 1:
            raise ValueError("virtual stages need pipeline_parallel > 1 (one rank would send to itself)")
        self.p2p_mode = "none"
        self._program: list | None = None  # batched mode: this rank's steps (action indices and Exchanges)
        if topology.num_stages > 1:
            self.p2p_mode = resolve_p2p_mode(p2p, str(dist.get_backend(topology.group)))
            if self.p2p_mode == "batched":
                programs = exchange_programs(schedule)
                check_exchange_programs(schedule, programs)
                self._program = programs[topology.pipeline_rank]

    def _check_actions(self) -> None:
        expected = {(kind, c, i) for kind in (FORWARD, BACKWARD) for c in range(len(self.chunks))
                    for i in range(self.num_micro_batches)}
        got = [(a.kind, a.chunk, a.micro_batch) for a in self.actions]
        if len(got) != len(expected) or set(got) != expected:
            raise ValueError(f"pipeline rank {self.topology.pipeline_rank}: the action list does not run every "
                             f"(F/B, chunk, micro-batch) exactly once for {len(self.chunks)} chunks and "
                             f"{self.num_micro_batches} micro-batches")

    # -- communication helpers --
    def _tag(self, kind: str, stage: int, micro_batch: int) -> int:
        direction = 0 if kind == ACTIVATION else 1
        return 1 + (direction * self.topology.num_global_stages + stage) * self.num_micro_batches + micro_batch

    def _empty_message(self) -> torch.Tensor:
        return torch.empty(self.activation_shape, dtype=self.activation_dtype, device=self.device)

    def _post_recv(self, message: Message):
        buffer = self._empty_message()
        peer = self.topology.pipeline_global_ranks[message.sender]
        return dist.irecv(buffer, src=peer, tag=self._tag(*message.key)), buffer

    def _send(self, tensor: torch.Tensor, message: Message, action: Action) -> None:
        payload = tensor.detach().to(self.activation_dtype).contiguous()
        if self._program is not None:  # batched: goes out with this round's exchange
            self._outbox[message.key] = payload
            return
        with self.timeline.span(SEND_KIND, action=action, stage=self.topology.global_stage(action.chunk)):
            work = dist.isend(payload, dst=self.topology.pipeline_global_ranks[message.receiver],
                              tag=self._tag(*message.key))
        self._pending_sends[message.key] = (work, payload)

    def _finish_activation_send(self, action: Action) -> None:
        """Tagged mode, at B(c, i): the activation F(c, i) sent has arrived (the received gradient
        was computed from it), so waiting for its send returns at once and releases the payload now
        rather than at the end of the step (gloo reports a send complete only through wait())."""
        sent = produces(Action(FORWARD, action.chunk, action.micro_batch), *self._where)
        pending = self._pending_sends.pop(sent.key, None)
        if pending is not None:
            pending[0].wait()

    def _tagged_receive(self, index: int, action: Action, receiving: list[int], posted: dict) -> torch.Tensor | None:
        """Keep the receives of the next two receiving actions (from this one on) posted; wait for this one's."""
        start = bisect.bisect_left(receiving, index)
        for k in receiving[start: start + 2]:
            if k not in posted:
                posted[k] = self._post_recv(self._receives[k])
        if index not in posted:
            return None
        work, buffer = posted.pop(index)
        with self.timeline.span(RECV_KIND, action=action, stage=self.topology.global_stage(action.chunk)):
            work.wait()
        return buffer

    def _exchange(self, exchange: Exchange) -> None:
        """One batch_isend_irecv with every send and receive of this round, waited for at once
        (Megatron-LM's default; on NCCL the wait only orders the compute stream after it)."""
        ranks, group, p = self.topology.pipeline_global_ranks, self.topology.group, self.topology.num_stages
        ops, arrivals = [], []
        for message in exchange.sends:
            ops.append(dist.P2POp(dist.isend, self._outbox.pop(message.key), ranks[message.receiver], group))
        for message in exchange.recvs:
            buffer = self._empty_message()
            ops.append(dist.P2POp(dist.irecv, buffer, ranks[message.sender], group))
            arrivals.append((message.key, buffer))
        works = None
        if exchange.sends:
            producer = exchange.sends[0].producer(p)
            with self.timeline.span(SEND_KIND, action=producer, stage=self.topology.global_stage(producer.chunk)):
                works = dist.batch_isend_irecv(ops)
        action, kind = ((exchange.recvs[0].consumer(p), RECV_KIND) if exchange.recvs
                        else (exchange.sends[0].producer(p), SEND_WAIT_KIND))
        with self.timeline.span(kind, action=action, stage=self.topology.global_stage(action.chunk)):
            for work in works if works is not None else dist.batch_isend_irecv(ops):
                work.wait()
        self._inbox.update(arrivals)

    # -- the step --
    def run(self, batches: Sequence, dropout_keys: Sequence | None = None) -> torch.Tensor | None:
        """Execute the step on this rank's micro-batches (`batches[i].tokens`, `.targets`), with
        `dropout_keys[i]` the dropout key of micro-batch i (None: no keyed dropout).
        Returns the sum over micro-batches of loss / m on ranks holding the last stage, else None."""
        if len(batches) != self.num_micro_batches:
            raise ValueError(f"expected {self.num_micro_batches} micro-batches, got {len(batches)}")
        self._dropout_keys = list(dropout_keys) if dropout_keys is not None else [None] * self.num_micro_batches
        self._pending_sends: dict[tuple[str, int, int], tuple] = {}  # tagged: message key -> (work, payload)
        self._outbox: dict[tuple[str, int, int], torch.Tensor] = {}
        self._inbox: dict[tuple[str, int, int], torch.Tensor] = {}
        self._inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}
        steps = self._program if self._program is not None else range(len(self.actions))
        receiving = [k for k, message in enumerate(self._receives) if message is not None]
        posted: dict[int, tuple] = {}  # tagged: action index -> (work, buffer) of its posted receive
        loss_sum = None
        for step in steps:
            if isinstance(step, Exchange):
                self._exchange(step)
                continue
            index, action = step, self.actions[step]
            if self._program is not None:  # batched: the input arrived in an earlier exchange
                message = self._receives[index]
                received = self._inbox.pop(message.key) if message is not None else None
            else:
                received = self._tagged_receive(index, action, receiving, posted)
            if action.kind == FORWARD:
                loss = self._forward(index, action, batches[action.micro_batch], received)
                if loss is not None:
                    loss_sum = loss if loss_sum is None else loss_sum + loss
            else:
                self._backward(index, action, received)
        if self._program is None:
            with self.timeline.span(SEND_WAIT_KIND, name="step"):
                for work, _ in self._pending_sends.values():
                    work.wait()
            self._pending_sends.clear()
        if self._outbox or self._inbox:
            raise RuntimeError(f"pipeline rank {self.topology.pipeline_rank}: messages left over after the step "
                               f"(unsent {sorted(self._outbox)[:3]}, unused {sorted(self._inbox)[:3]})")
        return loss_sum

    def _forward(self, index: int, action: Action, batch, received: torch.Tensor | None) -> torch.Tensor | None:
        chunk = self.chunks[action.chunk]
        key = (action.chunk, action.micro_batch)
        if chunk.is_first:
            inputs = batch.tokens.to(self.device)
            self._inputs[key] = None
        else:
            inputs = received.requires_grad_(True)
            self._inputs[key] = inputs
        with self.timeline.span(FORWARD_KIND, action=action, stage=chunk.stage):
            output = chunk(inputs, batch.targets.to(self.device) if chunk.is_last else None,
                           self._dropout_keys[action.micro_batch])
            if chunk.is_last:
                output = self.loss_fn(output) / self.num_micro_batches
        self._outputs[key] = output
        if chunk.is_last:
            return output.detach()
        self._send(output, self._produces[index], action)
        deallocate_output_data(output)
        return None

    def _backward(self, index: int, action: Action, received: torch.Tensor | None) -> None:
        chunk = self.chunks[action.chunk]
        key = (action.chunk, action.micro_batch)
        if self.grad_reducers is not None:
            self.grad_reducers[action.chunk].set_sync(index == self._last_backward[action.chunk])
        output = self._outputs.pop(key)
        inputs = self._inputs.pop(key)
        with self.timeline.span(BACKWARD_KIND, action=action, stage=chunk.stage):
            if chunk.is_last:
                output.backward()
            else:
                torch.autograd.backward(output, grad_tensors=received.to(output.dtype))
        if not chunk.is_last and self._program is None:
            self._finish_activation_send(action)
        if not chunk.is_first:
            self._send(inputs.grad, self._produces[index], action)
