"""Ranks that time-share a host's cores: a processor-sharing simulation of one pipeline step.

On a profiled CPU host (`modelpar profile`, `ClusterSpec.host_cores`) a plan may run more ranks
than there are cores: `modelpar train` starts N single-threaded processes on C < N cores, and the
operating system shares the cores among the ranks that are computing at that moment (ranks
waiting for a message or a collective sleep and use no core). Model: processor sharing
(Kleinrock 1967), each rank one thread:

    rate of every computing rank = min(1, C / (computing ranks))

So while the pipeline is full every rank computes at C / N of its solo speed, but in the fill
and drain of a schedule, where few ranks have work, those few run at full speed: the bubble
shrinks, and a 1F1B step is close to max(total work / C, critical path), not N / C times the
unshared step. Non-pipelined plans (p = 1) have every rank computing at once: N / C times slower.

The simulation runs the schedule's real action lists (`schedules.actions.build_schedule`) of
one pipeline; the t x d ranks of the same pipeline rank (tensor-parallel peers, data-parallel
replicas) run in lockstep, so a computing pipeline rank counts as t d computing ranks. An action
is its CPU work (solo seconds, shared) followed by its communication (tensor-parallel
collectives: seconds, not shared: a rank waiting for a message uses no core); a dependency on
another pipeline rank adds `p2p_s` (the dependencies: `schedules.dependencies.chunk_needs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modelpar.caching import memo
from modelpar.schedules.actions import FORWARD, Action, build_schedule, global_stage
from modelpar.schedules.dependencies import chunk_needs, key_of

WorkFn = Callable[[int, Action], float]


@dataclass(frozen=True)
class SharedStep:
    """One step under processor sharing: its makespan and, per pipeline rank, the wall-clock
    seconds spent computing (CPU work stretched by sharing) and communicating."""

    makespan: float
    compute_wall: tuple[float, ...]
    communication: tuple[float, ...]


def simulate_shared(actions: Sequence[Sequence[Action]], work: WorkFn, communication: WorkFn, p2p_s: float,
                    ranks_per_pipeline_rank: int, cores: int) -> SharedStep:
    """Processor-sharing simulation of one step (module docstring).

    `actions[r]`: pipeline rank r's actions in order; `work(r, action)`: its solo CPU seconds;
    `communication(r, action)`: seconds of collectives after it; `ranks_per_pipeline_rank`: t x d;
    `cores`: C. Raises RuntimeError when the action lists cannot progress (an invalid schedule).
    """
    p = len(actions)
    needed = chunk_needs(p, 1 + max((a.chunk for rank in actions for a in rank), default=0))
    done: dict[tuple[str, int, int], float] = {}  # (kind, global stage, micro-batch) -> finish time
    position = [0] * p
    phase: list[str | None] = [None] * p  # None (idle), "cpu", "comm"
    remaining = [0.0] * p  # cpu: solo seconds left; comm: end time
    compute_wall = [0.0] * p
    comm_total = [0.0] * p
    now = 0.0

    def ready_at(rank: int) -> float | None:
        """When rank's next action may start (None: a dependency has not finished)."""
        action = actions[rank][position[rank]]
        start = now
        for kind, stage, remote in needed[rank, action.kind, action.chunk]:
            finished = done.get((kind, stage, action.micro_batch))
            if finished is None:
                return None
            start = max(start, finished + (p2p_s if remote else 0.0))
        return start

    while True:
        upcoming = []
        for rank in range(p):
            if phase[rank] is None and position[rank] < len(actions[rank]):
                start = ready_at(rank)
                if start is not None and start <= now:
                    phase[rank], remaining[rank] = "cpu", work(rank, actions[rank][position[rank]])
                elif start is not None:
                    upcoming.append(start)
        computing = [rank for rank in range(p) if phase[rank] == "cpu"]
        rate = min(1.0, cores / (len(computing) * ranks_per_pipeline_rank)) if computing else 1.0
        events = [now + remaining[rank] / rate for rank in computing]
        events += [remaining[rank] for rank in range(p) if phase[rank] == "comm"]
        events += upcoming
        if not events:
            if all(position[rank] == len(actions[rank]) for rank in range(p)):
                return SharedStep(now, tuple(compute_wall), tuple(comm_total))
            stuck = [rank for rank in range(p) if position[rank] < len(actions[rank])]
            raise RuntimeError(f"processor-sharing simulation: pipeline ranks {stuck} cannot progress")
        later = min(events)
        tolerance = 1e-12 * max(1.0, later)
        finishing = {rank for rank in computing if now + remaining[rank] / rate <= later + tolerance}
        finishing |= {rank for rank in range(p) if phase[rank] == "comm" and remaining[rank] <= later + tolerance}
        for rank in computing:
            compute_wall[rank] += later - now
            remaining[rank] -= (later - now) * rate
        now = later
        for rank in sorted(finishing):
            action = actions[rank][position[rank]]
            if phase[rank] == "cpu":
                seconds = communication(rank, action)
                if seconds > 0:
                    phase[rank], remaining[rank] = "comm", now + seconds
                    comm_total[rank] += seconds
                    continue
            done[key_of(action, rank, p)] = now
            position[rank] += 1
            phase[rank] = None


@memo(4096)
def step_under_sharing(stages: tuple, schedule: str, p: int, v: int, m: int, ranks_per_pipeline_rank: int,
                       p2p_s: float, cores: int) -> SharedStep:
    """Processor-sharing step of a complete plan: `stages[g]` (`cost.StageTimes`) gives each
    action's solo compute and its tensor-parallel collectives on global stage g."""

    def work(rank: int, action: Action) -> float:
        stage = stages[global_stage(rank, action.chunk, p)]
        return stage.compute_forward if action.kind == FORWARD else stage.compute_backward

    def communication(rank: int, action: Action) -> float:
        stage = stages[global_stage(rank, action.chunk, p)]
        return stage.comm_forward if action.kind == FORWARD else stage.comm_backward

    return simulate_shared(build_schedule(schedule, p, m, v), work, communication, p2p_s, ranks_per_pipeline_rank,
                           cores)
