"""The dependency rule of a pipeline action, in one place.

Layout: rank r of p holds the chunks c = 0..v-1 of global stage g = c * p + r (Megatron-LM's
interleaved layout, `actions.global_stage`; v = 1: stage == rank). Rule (the data dependencies
of Huang et al. 2019, GPipe; Narayanan et al. 2021, Sec. 2.2):

- F(g, i) needs the activation of F(g - 1, i); the first stage's F needs nothing,
- B(g, i) needs F(g, i) on its own rank and the gradient of B(g + 1, i); the last stage's B
  needs only its own F (the loss is computed there).

So activations flow from stage g to g + 1 and gradients from g to g - 1 (`_FLOW`); a need
crosses ranks when the neighbouring stage lives on another rank (p > 1). `needs` lists what must
have run first, `receives` / `produces` the messages that cross ranks: the simulators, the
exchange plan and the executor all ask this module. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from modelpar.schedules.actions import BACKWARD, FORWARD, Action, global_stage

ACTIVATION, GRADIENT = "activation", "gradient"

Key = tuple[str, int, int]  # (kind "F"/"B", global stage, micro-batch) of an action

_FLOW = {FORWARD: 1, BACKWARD: -1}  # an action's output goes to stage + flow, its input comes from stage - flow
_MESSAGE_KIND = {FORWARD: ACTIVATION, BACKWARD: GRADIENT}
_ACTION_KIND = {ACTIVATION: FORWARD, GRADIENT: BACKWARD}


class PipelineDeadlock(RuntimeError):
    """No rank can start its next action although actions remain: the schedule order is invalid."""


class Need(NamedTuple):
    """An action that must have run first: its key, and whether it runs on another rank (its
    output arrives as a message)."""

    key: Key
    remote: bool


@dataclass(frozen=True)
class Message:
    """A tensor crossing ranks: the activation consumed by F(stage, micro_batch) or the gradient
    consumed by B(stage, micro_batch); `sender` and `receiver` are pipeline ranks."""

    kind: str
    stage: int
    micro_batch: int
    sender: int
    receiver: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.stage, self.micro_batch)

    def consumer(self, num_stages: int) -> Action:
        """The receiver's action that needs this message."""
        return Action(_ACTION_KIND[self.kind], self.stage // num_stages, self.micro_batch)

    @property
    def source_stage(self) -> int:
        """The global stage whose action produces this message."""
        return self.stage - _FLOW[_ACTION_KIND[self.kind]]

    def producer(self, num_stages: int) -> Action:
        """The sender's action that produces this message."""
        return Action(_ACTION_KIND[self.kind], self.source_stage // num_stages, self.micro_batch)

    def __str__(self) -> str:
        return (f"{self.kind} of micro-batch {self.micro_batch} for stage {self.stage} "
                f"(rank {self.sender} -> {self.receiver})")


def key_of(action: Action, rank: int, num_stages: int) -> Key:
    """(kind, global stage, micro-batch) of `action` on pipeline rank `rank`."""
    return (action.kind, global_stage(rank, action.chunk, num_stages), action.micro_batch)


def stage_needs(kind: str, stage: int, num_global_stages: int) -> tuple[tuple[str, int], ...]:
    """(kind, global stage) of the actions on the same micro-batch that an action of `kind` on
    global stage `stage` needs (module rule): a backward's own forward first, then the
    neighbouring stage's action whose output it consumes."""
    source = stage - _FLOW[kind]
    neighbour = ((kind, source),) if 0 <= source < num_global_stages else ()
    return ((FORWARD, stage),) + neighbour if kind == BACKWARD else neighbour


def needs(action: Action, rank: int, num_stages: int, num_global_stages: int) -> tuple[Need, ...]:
    """The actions that must have run before `action` on pipeline rank `rank` (`stage_needs`), each
    with whether it runs on another rank."""
    i = action.micro_batch
    return tuple([Need((kind, stage, i), stage % num_stages != rank) for kind, stage in
                  stage_needs(action.kind, global_stage(rank, action.chunk, num_stages), num_global_stages)])


def chunk_needs(num_stages: int, num_chunks: int) -> dict[tuple[int, str, int], tuple[tuple[str, int, bool], ...]]:
    """`needs` of every (rank, kind, chunk) as (kind, global stage, remote), each on the action's
    own micro-batch (the rule never crosses micro-batches): a table for loops that ask per action."""
    num_global = num_stages * num_chunks
    return {(rank, kind, chunk): tuple((needed_kind, stage, remote) for (needed_kind, stage, _), remote in
                                       needs(Action(kind, chunk, 0), rank, num_stages, num_global))
            for rank in range(num_stages) for kind in (FORWARD, BACKWARD) for chunk in range(num_chunks)}


def receives(action: Action, rank: int, num_stages: int, num_global_stages: int) -> Message | None:
    """The message `action` on pipeline rank `rank` must receive: its need on another rank (None:
    first-stage F, last-stage B, or a producer on the same rank)."""
    for (kind, stage, i), remote in needs(action, rank, num_stages, num_global_stages):
        if remote:
            return Message(_MESSAGE_KIND[kind], global_stage(rank, action.chunk, num_stages), i, stage % num_stages,
                           rank)
    return None


def produces(action: Action, rank: int, num_stages: int, num_global_stages: int) -> Message | None:
    """The message `action` on pipeline rank `rank` sends to another rank (None if none): at most
    one, the output that the neighbouring stage's action of the same kind needs."""
    target = global_stage(rank, action.chunk, num_stages) + _FLOW[action.kind]
    if not 0 <= target < num_global_stages or target % num_stages == rank:
        return None
    return Message(_MESSAGE_KIND[action.kind], target, action.micro_batch, rank, target % num_stages)
