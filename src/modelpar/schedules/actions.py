"""Pipeline schedules as data: per pipeline rank, the ordered list of forward/backward actions.

A schedule is a pure function of (stages p, micro-batches m, chunks per rank v). The runtime
interprets the lists (receive inputs, compute, send outputs) and the planner simulates the very
same lists (`modelpar.schedules.simulate.simulate`) to measure bubbles, peak in-flight activations
and to prove that the order cannot deadlock. Nothing here imports torch.

Layout of the model: there are p * v global stages; rank r holds the chunks c = 0..v-1 whose
global stage is ``c * p + r`` (Megatron-LM's interleaved layout; with v = 1 stage == rank).

What each action needs before it runs is `modelpar.schedules.dependencies` (the one rule the
simulator, the p2p plan and the runtime use); which combinations are legal is `specs.plan`'s
`schedule_rule`.

Each schedule's docstring draws a small case as `modelpar.schedules.simulate.render_timeline`
simulates it (forward = backward = one time slot, no p2p time; a test keeps them in sync):
``F3`` / ``B3`` is the forward / backward of micro-batch 3; with several chunks a letter names
the chunk (``F3a`` chunk 0, ``F3b`` chunk 1); ``.`` is an idle slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelpar.specs.errors import SpecError
from modelpar.specs.plan import SCHEDULES as SCHEDULE_NAMES
from modelpar.specs.plan import VIRTUAL_SCHEDULE, full_micro_batch_groups, schedule_rule

FORWARD = "F"
BACKWARD = "B"


@dataclass(frozen=True, slots=True)
class Action:
    """One compute step of a pipeline rank: forward or backward of one chunk on one micro-batch."""

    kind: str          # "F" (forward) or "B" (backward)
    chunk: int         # model chunk on this rank, 0..v-1; global stage = chunk * p + rank
    micro_batch: int   # 0..m-1

    def __str__(self) -> str:
        return f"{self.kind}(chunk {self.chunk}, micro-batch {self.micro_batch})"


def global_stage(rank: int, chunk: int, num_stages: int) -> int:
    """Global stage index of `chunk` on pipeline `rank`: chunk * p + rank (Megatron-LM's layout)."""
    return chunk * num_stages + rank


def build_schedule(
    schedule: str, num_stages: int, num_micro_batches: int, virtual_stages: int = 1
) -> list[list[Action]]:
    """Per pipeline rank (list index = rank), the actions that rank executes, in order.

    `schedule` is 'gpipe', '1f1b' or 'interleaved'. Raises SpecError naming the value and the
    fix for a bad combination: unknown schedule, a count below 1, virtual_stages > 1 without
    'interleaved', or 'interleaved' with num_micro_batches not a multiple of num_stages.
    """
    if schedule not in SCHEDULE_NAMES:
        raise SpecError(f"schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {schedule!r}")
    _check_counts(num_stages, num_micro_batches, virtual_stages)
    if schedule == "interleaved":
        return interleaved_one_f_one_b(num_stages, num_micro_batches, virtual_stages)
    if schedule_rule(schedule, num_stages, virtual_stages) == VIRTUAL_SCHEDULE:
        raise SpecError(
            f"virtual_stages={virtual_stages} needs schedule 'interleaved', got {schedule!r}; "
            "use schedule 'interleaved' or virtual_stages 1"
        )
    if schedule == "gpipe":
        return gpipe(num_stages, num_micro_batches)
    return one_f_one_b(num_stages, num_micro_batches)


def gpipe(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """GPipe: every rank runs all m forwards, then all m backwards (Huang et al. 2019, Fig. 2c).

    Peak in-flight micro-batches = m on every rank; with forward time f, backward time b and no
    p2p time the step takes (m + p - 1)(f + b), a bubble fraction of (p - 1)/(m + p - 1).
    p = 3, m = 4::

        rank 0 | F0 F1 F2 F3 .  .  .  .  B0 B1 B2 B3
        rank 1 | .  F0 F1 F2 F3 .  .  B0 B1 B2 B3 .
        rank 2 | .  .  F0 F1 F2 F3 B0 B1 B2 B3 .  .
    """
    _check_counts(num_stages, num_micro_batches, 1)
    forwards = [Action(FORWARD, 0, i) for i in range(num_micro_batches)]
    backwards = [Action(BACKWARD, 0, i) for i in range(num_micro_batches)]
    return [forwards + backwards for _ in range(num_stages)]


def one_f_one_b(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """1F1B (PipeDream-Flush; Narayanan et al. 2021, Sec. 2.2.1, Fig. 4 top; Megatron-LM's
    non-interleaved schedule).

    Rank r runs w = min(p - r - 1, m) warm-up forwards, then alternates one forward and one
    backward, then drains the remaining w backwards. Same bubble as GPipe, (p - 1)/(m + p - 1),
    but at most min(p - r, m) micro-batches are in flight on rank r instead of m.
    p = 3, m = 4::

        rank 0 | F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3
        rank 1 | .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .
        rank 2 | .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .
    """
    _check_counts(num_stages, num_micro_batches, 1)
    forwards = [Action(FORWARD, 0, i) for i in range(num_micro_batches)]
    backwards = [Action(BACKWARD, 0, i) for i in range(num_micro_batches)]
    return [
        _warmup_steady_cooldown(forwards, backwards, min(num_stages - rank - 1, num_micro_batches))
        for rank in range(num_stages)
    ]


def interleaved_one_f_one_b(num_stages: int, num_micro_batches: int, virtual_stages: int) -> list[list[Action]]:
    """Interleaved 1F1B (Narayanan et al. 2021, Sec. 2.2.2, Fig. 4 bottom; Megatron-LM's
    interleaved schedule, also torch.distributed.pipelining.ScheduleInterleaved1F1B).

    Each rank holds v chunks (global stage c * p + r). Forwards visit the m * v (chunk,
    micro-batch) pairs in groups of p micro-batches: micro-batches 0..p-1 on chunk 0, the same
    ones on chunk 1, ..., chunk v-1, then micro-batches p..2p-1 on chunk 0, and so on.
    Backwards visit the same order with the chunks reversed (v-1 first). Rank r runs
    w = min((p - r - 1) * 2 + (v - 1) * p, m * v) warm-up forwards, then alternates one forward
    and one backward, then drains the rest. The bubble shrinks by v:
    (p - 1)/(v m + p - 1) of the step (bubble / (ideal + bubble), Narayanan eq. in Sec. 2.2.2),
    at the price of v times more p2p messages. Needs m % p == 0 (Megatron's rule: the groups of
    p micro-batches must be full). p = 2, m = 4, v = 2::

        rank 0 | F0a F1a F0b F1b F2a B0b F3a B1b F2b B0a F3b B1a .   B2b .   B3b B2a B3a
        rank 1 | .   F0a F1a F0b B0b F1b B1b F2a B0a F3a B1a F2b B2b F3b B3b B2a B3a .
    """
    _check_counts(num_stages, num_micro_batches, virtual_stages)
    if not full_micro_batch_groups(num_micro_batches, num_stages):
        lower = num_micro_batches - num_micro_batches % num_stages
        upper = lower + num_stages
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise SpecError(
            f"interleaved schedule needs num_micro_batches ({num_micro_batches}) to be a multiple of "
            f"num_stages ({num_stages}); use {hint} micro-batches or schedule '1f1b'"
        )
    order = [  # (chunk, micro-batch) in forward order: groups of p micro-batches, chunk-major inside a group
        (chunk, group_start + offset)
        for group_start in range(0, num_micro_batches, num_stages)
        for chunk in range(virtual_stages)
        for offset in range(num_stages)
    ]
    forwards = [Action(FORWARD, chunk, i) for chunk, i in order]
    backwards = [Action(BACKWARD, virtual_stages - 1 - chunk, i) for chunk, i in order]
    total = num_micro_batches * virtual_stages
    return [
        _warmup_steady_cooldown(
            forwards, backwards, min((num_stages - rank - 1) * 2 + (virtual_stages - 1) * num_stages, total)
        )
        for rank in range(num_stages)
    ]


def _warmup_steady_cooldown(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """`warmup` forwards, then (forward, backward) pairs, then the remaining backwards."""
    steady = len(forwards) - warmup
    actions = list(forwards[:warmup])
    for k in range(steady):
        actions.append(forwards[warmup + k])
        actions.append(backwards[k])
    actions.extend(backwards[steady:])
    return actions


def _check_counts(num_stages: int, num_micro_batches: int, virtual_stages: int) -> None:
    for name, value in (("num_stages", num_stages), ("num_micro_batches", num_micro_batches),
                        ("virtual_stages", virtual_stages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{name} must be a positive integer, got {value!r}; use 1 or more")
