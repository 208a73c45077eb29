"""Event-driven simulation of pipeline schedules: makespan, bubbles, in-flight activations, deadlock.

The simulator runs the very action lists that the runtime executes
(`modelpar.schedules.actions.build_schedule`): each rank executes its list strictly in order; an
action starts once its rank is free and its dependencies are done, plus `p2p_time` for a
dependency computed on another rank (a list scheduler, Graham 1966). The dependencies are
`modelpar.schedules.dependencies.needs` (Huang et al. 2019 / Narayanan et al. 2021).

`bubble_fraction` (cached) is what the cost model calls, through `planner.cost.pipeline_profile`;
`peak_in_flight_chunks` counts in-flight activations from the lists without simulating (only
the tests call it: the cost model uses the closed forms of `pipeline_profile`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import Callable, Sequence, Union

from modelpar.caching import memo
from modelpar.schedules.actions import BACKWARD, FORWARD, Action, build_schedule, global_stage
from modelpar.schedules.dependencies import Message, PipelineDeadlock, produces, receives, stage_needs
from modelpar.specs.errors import SpecError

Duration = Union[float, Callable[[int, Action], float]]

_KIND_BIT = {"F": 0, "B": 1}
_MAX_RANKS_NAMED = 8


@dataclass(frozen=True, slots=True)
class TimedAction:
    """An action placed in time on its rank."""

    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class PipelineSimulation:
    """Result of `simulate`. All times are in the units of the given durations."""

    makespan: float                    # time from first action start to last action end
    busy_time: tuple[float, ...]       # per rank, sum of action durations
    bubble_fraction: float             # 1 - max(busy)/makespan (idle share of the busiest rank)
    peak_in_flight: tuple[int, ...]    # per rank: max (chunk, micro-batch) pairs whose F ran and B not yet
    # Raw results; `timeline` builds the TimedAction objects on first access (making ~10^5 of
    # them would dominate the simulation time, and the planner only needs the numbers above).
    _actions: tuple[tuple[Action, ...], ...] = field(repr=False, compare=False)
    _codes: tuple[tuple[int, ...], ...] = field(repr=False, compare=False)   # per rank, code of each action
    _began: tuple[tuple[float, ...], ...] = field(repr=False, compare=False)  # per rank, start per code
    _ended: tuple[tuple[float, ...], ...] = field(repr=False, compare=False)  # per rank, end per code

    @functools.cached_property
    def timeline(self) -> tuple[tuple[TimedAction, ...], ...]:
        """Per rank, the actions with their start and end times, in execution order."""
        return tuple(
            tuple(TimedAction(rank, action, began[code], ended[code]) for action, code in zip(actions, codes))
            for rank, (actions, codes, began, ended) in enumerate(
                zip(self._actions, self._codes, self._began, self._ended)
            )
        )


def simulate(
    actions: Sequence[Sequence[Action]],
    forward_time: Duration,
    backward_time: Duration,
    p2p_time: float = 0.0,
) -> PipelineSimulation:
    """Place every action of every rank in time (list scheduling, each rank in list order).

    `forward_time` / `backward_time`: a number, or a callable (rank, action) -> duration.
    `p2p_time` is added on each dependency edge between different ranks. This also models the
    runtime's blocking receives: a receive completes only once the action that sends it has
    finished, so a list that simulates without deadlock cannot hang the runtime (sends are
    asynchronous). Raises PipelineDeadlock naming the stuck ranks and their next action, and
    ValueError for a malformed list (unknown kind, negative index, an action missing or twice).
    """
    num_ranks = len(actions)
    if num_ranks == 0:
        raise ValueError("simulate: the schedule has no ranks")
    if p2p_time < 0:
        raise ValueError(f"simulate: p2p_time must be >= 0, got {p2p_time}")
    rank_actions = [tuple(row) for row in actions]
    layout = _Layout.of(rank_actions)
    rank_codes = [layout.codes(row) for row in rank_actions]
    num_codes = layout.num_codes
    duration = _durations(rank_actions, rank_codes, num_codes, forward_time, backward_time)

    ended = [[-1.0] * num_codes for _ in range(num_ranks)]  # per rank and code: end time, -1 = not run yet
    began = [[0.0] * num_codes for _ in range(num_ranks)]
    waiter = [[-1] * num_codes for _ in range(num_ranks)]  # rank blocked until this (rank, code) has run
    blocked_on: list[tuple[int, int]] = [(-1, -1)] * num_ranks
    free_at = [-1.0] * num_ranks  # end of the rank's last action; -1 while it has not finished
    ready = list(range(num_ranks - 1, -1, -1))
    programs = [
        _rank_program(rank, rank_codes[rank], duration[rank], layout, ended, began, waiter, ready,
                      float(p2p_time) if num_ranks > 1 else 0.0, free_at)
        for rank in range(num_ranks)
    ]
    while ready:
        rank = ready.pop()
        missing = next(programs[rank], None)
        if missing is not None:
            owner, code = missing
            waiter[owner][code] = rank
            blocked_on[rank] = missing

    stuck = [rank for rank in range(num_ranks) if free_at[rank] < 0]
    if stuck:
        raise PipelineDeadlock(_deadlock_message(stuck, rank_actions, rank_codes, ended, blocked_on, layout))
    _check_complete(rank_actions, ended, layout)

    makespan = max(free_at) - min(began[rank][codes[0]] for rank, codes in enumerate(rank_codes) if codes)
    busy = tuple(float(sum(map(duration[rank].__getitem__, codes))) for rank, codes in enumerate(rank_codes))
    return PipelineSimulation(
        makespan=makespan,
        busy_time=busy,
        bubble_fraction=1.0 - max(busy) / makespan if makespan > 0 else 0.0,
        peak_in_flight=_peak_in_flight(rank_codes, num_codes),
        _actions=tuple(rank_actions),
        _codes=tuple(tuple(codes) for codes in rank_codes),
        _began=tuple(tuple(row) for row in began),
        _ended=tuple(tuple(row) for row in ended),
    )


def check_runtime_order(actions: Sequence[Sequence[Action]]) -> None:
    """Raise PipelineDeadlock if the runtime could hang executing `actions`.

    The runtime's convention per action: receive the inputs (blocking), compute, send the outputs
    (asynchronous, batched isend). A receive therefore completes only once the action that sends
    the tensor has finished, which is exactly the dependency rule of `simulate`: the lists are
    simulated with unit durations and a deadlock there is a hang at run time.

    Also checks that messages between two ranks are consumed in the order they are sent
    (point-to-point messages between a pair of ranks match first-in first-out, NCCL ignores
    tags): for every ordered pair (sender, receiver) the receiver's list must need the tensors in
    the order the sender's list produces them, otherwise a receive waits for the wrong message
    (a hang with tag matching, a wrong tensor without). Raises PipelineDeadlock naming the pair.
    """
    simulate(actions, 1.0, 1.0)
    num_ranks = len(actions)
    if num_ranks == 1:
        return
    num_global = num_ranks * (1 + max(action.chunk for row in actions for action in row))
    sent: dict[tuple[int, int], list[Message]] = {}  # (sender, receiver) -> messages in order
    received: dict[tuple[int, int], list[Message]] = {}
    for rank, row in enumerate(actions):
        for action in row:
            for table, message in ((received, receives(action, rank, num_ranks, num_global)),
                                   (sent, produces(action, rank, num_ranks, num_global))):
                if message is not None:
                    table.setdefault((message.sender, message.receiver), []).append(message)
    for pair in sorted(set(sent) | set(received)):
        out, into = sent.get(pair, []), received.get(pair, [])
        if out != into:
            index = next((k for k, (a, b) in enumerate(zip(out, into)) if a != b), min(len(out), len(into)))
            raise PipelineDeadlock(
                f"rank {pair[0]} -> rank {pair[1]}: message {index} is sent as "
                f"{_describe_message(out, index)} but received as {_describe_message(into, index)}; "
                "reorder the receiver's actions to match the sender's"
            )


@memo(4096)
def bubble_fraction(
    schedule: str,
    num_stages: int,
    num_micro_batches: int,
    virtual_stages: int = 1,
    backward_to_forward: float = 2.0,
) -> float:
    """Simulated bubble fraction, 1 - busy/makespan, with forward time 1 and backward time
    `backward_to_forward` per action and no p2p time (cached: the search calls it per plan)."""
    actions = build_schedule(schedule, num_stages, num_micro_batches, virtual_stages)
    return simulate(actions, 1.0, float(backward_to_forward)).bubble_fraction


@memo(4096)
def peak_in_flight_chunks(schedule: str, num_stages: int, num_micro_batches: int, virtual_stages: int = 1) -> int:
    """Most (chunk, micro-batch) activations any rank holds at once (cached). Each holds the
    activations of one chunk, i.e. num_layers / (p * v) layers.

    Depends only on the order of each rank's list (forwards minus backwards so far), not on
    timing, so it is counted without simulating; the tests simulate every schedule's lists.
    """
    actions = build_schedule(schedule, num_stages, num_micro_batches, virtual_stages)
    return max(max(accumulate(1 if action.kind == "F" else -1 for action in row)) for row in actions)


def closed_form_bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Bubble / (ideal + bubble) from the papers (unit-free, any forward/backward ratio).

    GPipe and 1F1B: (p - 1)/(m + p - 1) (Huang et al. 2019; Narayanan et al. 2021 Sec. 2.2.1,
    bubble time (p - 1)(t_f + t_b) against m (t_f + t_b) of work). Interleaved with v chunks:
    the bubble shrinks by v, (p - 1)/(v m + p - 1) (Narayanan et al. 2021 Sec. 2.2.2).
    """
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    raise SpecError(f"schedule must be one of gpipe, 1f1b, interleaved, got {schedule!r}")


def render_timeline(simulation: PipelineSimulation, slot: float | None = None) -> str:
    """ASCII table of a simulation: one row per rank, one column per time slot.

    `slot` defaults to the shortest action; an action longer than a slot repeats its label.
    Labels: ``F3`` / ``B3`` for micro-batch 3, with a chunk letter when ranks hold several chunks
    (``F3a`` chunk 0, ``F3b`` chunk 1); ``.`` is idle.
    """
    timeline = simulation.timeline
    placed = [timed for row in timeline for timed in row]
    if not placed:
        return ""
    slot = slot or min(timed.end - timed.start for timed in placed) or 1.0
    origin = min(timed.start for timed in placed)
    several_chunks = max(timed.action.chunk for timed in placed) > 0

    def label(action: Action) -> str:
        suffix = chr(ord("a") + action.chunk) if several_chunks else ""
        return f"{action.kind}{action.micro_batch}{suffix}"

    num_slots = round(simulation.makespan / slot)
    width = max(len(label(timed.action)) for timed in placed)
    lines = []
    for rank, row in enumerate(timeline):
        cells = ["."] * num_slots
        for timed in row:
            first, last = round((timed.start - origin) / slot), round((timed.end - origin) / slot)
            for column in range(first, last):
                cells[column] = label(timed.action)
        lines.append(f"rank {rank} | " + " ".join(cell.ljust(width) for cell in cells).rstrip())
    return "\n".join(lines)


# --- helpers --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """Dense numbering of a rank's actions: code = chunk * 2m + 2 * micro_batch + (1 for backward)
    (`_code_rule` turns the dependencies into code shifts)."""

    num_ranks: int
    num_chunks: int
    num_micro_batches: int
    code_of: dict[int, int]  # id(action) -> code: schedules reuse one Action object on every rank

    @property
    def chunk_stride(self) -> int:
        return 2 * self.num_micro_batches

    @property
    def num_codes(self) -> int:
        return self.num_chunks * self.chunk_stride

    @classmethod
    def of(cls, rank_actions: list[tuple[Action, ...]]) -> "_Layout":
        flat = list(chain.from_iterable(rank_actions))
        if not flat:
            raise ValueError("simulate: the schedule has no actions")
        distinct = dict(zip(map(id, flat), flat))  # read each distinct object's fields once
        chunks = [action.chunk for action in distinct.values()]
        micro_batches = [action.micro_batch for action in distinct.values()]
        if min(chunks) < 0 or min(micro_batches) < 0:
            raise ValueError("simulate: chunk and micro_batch must be >= 0")
        stride = 2 * (max(micro_batches) + 1)
        try:
            code_of = {
                key: action.chunk * stride + 2 * action.micro_batch + _KIND_BIT[action.kind]
                for key, action in distinct.items()
            }
        except KeyError as error:
            raise ValueError(f"simulate: action kind must be 'F' or 'B', got {error.args[0]!r}") from None
        return cls(len(rank_actions), max(chunks) + 1, max(micro_batches) + 1, code_of)

    def codes(self, row: tuple[Action, ...]) -> list[int]:
        return list(map(self.code_of.__getitem__, map(id, row)))

    def describe(self, rank: int, code: int) -> str:
        chunk, rest = divmod(code, self.chunk_stride)
        kind = "B" if rest & 1 else "F"
        return f"{kind}(stage {global_stage(rank, chunk, self.num_ranks)}, micro-batch {rest // 2})"


def _rank_program(rank, codes, duration, layout, ended, began, waiter, ready, lag, free_at):
    """One rank's list, run in order: a generator that yields (rank, code) of a dependency not yet run.

    The driver resumes it once that action has run (`waiter`). Keeping each rank's state in its
    own generator frame makes a block-and-resume cost about as much as one action.
    """
    # F(code) needs ended[forward_rank][code - forward_shift] when code >= forward_from (not the first
    # stage), B(code) its own forward code - 1 and ended[backward_rank][code - backward_shift] when
    # code < backward_to (not the last stage): `dependencies.stage_needs` in codes (`_code_rule`)
    stride = layout.chunk_stride
    (forward_rank, forward_shift, forward_from), (backward_rank, backward_shift, backward_to), remote = _code_rule(
        rank, layout.num_ranks, layout.num_chunks)
    forward_shift, forward_from = forward_shift * stride, forward_from * stride
    backward_shift, backward_to = backward_shift * stride, backward_to * stride
    lag = lag if remote else 0.0
    own, own_began, own_waiter = ended[rank], began[rank], waiter[rank]
    forward_ended, backward_ended = ended[forward_rank], ended[backward_rank]
    t = 0.0
    for code in codes:
        start = t
        if code & 1:  # backward: needs the own forward (run earlier here, so done by t), then the gradient
            if own[code - 1] < 0:
                yield rank, code - 1  # the forward comes later in this same list: never resumed, a deadlock
            neighbour, neighbour_ended, needed = backward_rank, backward_ended, code - backward_shift
            needs_neighbour = code < backward_to
        else:  # forward: needs the previous stage's activation
            neighbour, neighbour_ended, needed = forward_rank, forward_ended, code - forward_shift
            needs_neighbour = code >= forward_from
        if needs_neighbour:  # not the first stage's forward nor the last stage's backward
            done = neighbour_ended[needed]
            if done < 0:
                yield neighbour, needed
                done = neighbour_ended[needed]
            done += lag
            if done > start:
                start = done
        t = start + duration[code]
        own_began[code] = start
        own[code] = t
        blocked = own_waiter[code]
        if blocked >= 0:
            ready.append(blocked)
    free_at[rank] = t


@memo(4096)
def _code_rule(rank: int, num_ranks: int, num_chunks: int) -> tuple:
    """`dependencies.stage_needs` of `rank`'s actions in the shape `_rank_program` runs, in chunks:
    per kind, (rank, shift, bound): the forward of chunk c >= bound needs the forward of chunk
    c - shift on that rank; a backward needs its own forward and, for c < bound, the backward of
    chunk c - shift there; then whether those ranks are other ranks. Read off the rule, then
    checked against it on every chunk (NotImplementedError for a rule of another shape)."""
    p, num_global = num_ranks, num_ranks * num_chunks
    stages = range(rank, num_global, p)  # chunk c holds global stage c * p + rank
    rule, remote = [], set()
    for kind in (FORWARD, BACKWARD):
        needed = [stage_needs(kind, stage, num_global) for stage in stages]
        own = kind == BACKWARD  # a backward's first need is its own forward
        having = [chunk for chunk, needs in enumerate(needed) if len(needs) > own]  # a neighbour stage too
        neighbour = needed[having[0]][-1][1] if having else rank  # the stage the first of them needs
        other, shift = neighbour % p, (having[0] if having else 0) - neighbour // p
        bound = len(having) if own else (having[0] if having else num_chunks)
        run = range(bound) if own else range(bound, num_chunks)
        remote |= {other != rank} if having else set()
        if needed != [((FORWARD, stage),) * own + ((kind, (chunk - shift) * p + other),) * (chunk in run)
                      for chunk, stage in enumerate(stages)]:
            raise NotImplementedError(f"simulate: the {kind} needs on rank {rank} are not of a shape it runs")
        rule.append((other, shift, bound))
    if len(remote) > 1:
        raise NotImplementedError(f"simulate: rank {rank} needs actions both on itself and on other ranks")
    return rule[0], rule[1], remote == {True}


def _durations(rank_actions, rank_codes, num_codes: int, forward_time: Duration, backward_time: Duration):
    """Per rank, the duration of each code (forward codes are even, backward codes odd)."""
    if not callable(forward_time) and not callable(backward_time):
        pair = [float(forward_time), float(backward_time)]
        if min(pair) < 0:
            raise ValueError(f"simulate: action durations must be >= 0, got {min(pair)}")
        return [pair * (num_codes // 2)] * len(rank_actions)  # one shared table
    tables = []
    for rank, (row, codes) in enumerate(zip(rank_actions, rank_codes)):
        table = [0.0] * num_codes
        for action, code in zip(row, codes):
            given = backward_time if code & 1 else forward_time
            table[code] = float(given(rank, action) if callable(given) else given)
        if table and min(table) < 0:
            raise ValueError(f"simulate: action durations must be >= 0, got {min(table)} on rank {rank}")
        tables.append(table)
    return tables


def _peak_in_flight(rank_codes: list[list[int]], num_codes: int) -> tuple[int, ...]:
    """Per rank, the running maximum of (forwards - backwards) along its list."""
    step = [1, -1] * (num_codes // 2)  # +1 at a forward code (even), -1 at a backward code (odd)
    return tuple(max(0, max(accumulate(map(step.__getitem__, codes)), default=0)) for codes in rank_codes)


def _deadlock_message(stuck, rank_actions, rank_codes, ended, blocked_on, layout: _Layout) -> str:
    parts = []
    for rank in stuck[:_MAX_RANKS_NAMED]:
        # a stuck rank ran its list in order up to the first action that has not run
        position = next(i for i, code in enumerate(rank_codes[rank]) if ended[rank][code] < 0)
        parts.append(f"rank {rank} at {rank_actions[rank][position]} waits for {layout.describe(*blocked_on[rank])}")
    more = f"; and {len(stuck) - _MAX_RANKS_NAMED} more ranks" if len(stuck) > _MAX_RANKS_NAMED else ""
    return "pipeline deadlock: " + "; ".join(parts) + more


def _check_complete(rank_actions, ended, layout: _Layout) -> None:
    """Every (stage, micro-batch) ran F and B exactly once (all ran + count matches = no duplicate)."""
    total = sum(len(row) for row in rank_actions)
    if total == layout.num_ranks * layout.num_codes and min(map(min, ended)) >= 0:
        return
    for rank, row in enumerate(rank_actions):
        seen: set[Action] = set()
        for action in row:
            if action in seen:
                raise ValueError(f"simulate: rank {rank} runs {action} twice")
            seen.add(action)
    rank, code = next((rank, code) for rank, row in enumerate(ended) for code, done in enumerate(row) if done < 0)
    raise ValueError(f"simulate: the schedule never runs {layout.describe(rank, code)} (on rank {rank})")


def _describe_message(messages: list[Message], index: int) -> str:
    if index >= len(messages):
        return "nothing"
    message = messages[index]
    return f"the {message.kind} of stage {message.source_stage}, micro-batch {message.micro_batch}"
