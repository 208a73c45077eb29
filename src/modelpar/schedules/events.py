"""The one record of a timed interval on a rank (`TimelineEvent`): what the runtime's `Timeline`
records, what the planner's predicted step is made of (`planner.prediction.predict_schedule`), what a
`modelpar train` summary stores (`to_dict`) and what the comparison (`report.comparison`) and the
drawings (`report.timeline`) read; with its kinds. Pure Python, like the rest of `schedules`.

Kinds: forward / backward (a schedule action's compute), recv (waiting for an action's input),
send (launching its output), send_wait (end of step, waiting for the sends), grad_sync (the
gradient synchronisation after the schedule; drawn and predicted as allreduce), optimizer,
collective (a torch.distributed collective, or the wait of an asynchronous one) and
collective_launch (zero-length: an asynchronous collective is launched).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from modelpar.schedules.actions import FORWARD, global_stage

FORWARD_KIND = "forward"
BACKWARD_KIND = "backward"
RECV_KIND = "recv"
SEND_KIND = "send"
SEND_WAIT_KIND = "send_wait"
GRAD_SYNC_KIND = "grad_sync"
ALLREDUCE_KIND = "allreduce"
OPTIMIZER_KIND = "optimizer"
COLLECTIVE_KIND = "collective"
LAUNCH_KIND = "collective_launch"
COMPUTE_KINDS = (FORWARD_KIND, BACKWARD_KIND)


@dataclass(frozen=True)
class TimelineEvent:
    """One interval on one rank's row, in seconds (the runtime: `time.perf_counter()`, one clock
    per machine; a simulation: from the step's start).

    `micro_batch`, `chunk` and `stage` (the global pipeline stage) name the schedule action the
    event belongs to (its compute, or the transfer it receives or sends), None otherwise.
    `name`: for a collective the label that is equal on every member rank
    (`runtime.instrument.timed_collectives`), else free text (the runtime names an action's events
    `str(action)`, 'F(chunk 0, micro-batch 3)'; the drawings name compute boxes from the fields,
    `action_label`).
    """

    rank: int
    name: str
    kind: str
    start_s: float
    end_s: float
    micro_batch: int | None = None
    chunk: int | None = None
    stage: int | None = None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict; `TimelineEvent(**d)` reads it back."""
        return asdict(self)


def action_label(kind: str, micro_batch: int, chunk: int, several_chunks: bool) -> str:
    """'F3' / 'B3' for micro-batch 3 ('F' or 'B' `kind`, or the event kinds), with a chunk letter
    when ranks hold several ('F3a', 'F3b'), as in `schedules.simulate.render_timeline`."""
    suffix = chr(ord("a") + chunk) if several_chunks else ""
    return f"{kind[0].upper()}{micro_batch}{suffix}"


def events_from_simulation(simulation) -> list[TimelineEvent]:
    """The forward/backward events of a `schedules.simulate.PipelineSimulation`, 2 m v per rank."""
    timeline = simulation.timeline
    several_chunks = any(timed.action.chunk > 0 for row in timeline for timed in row)
    events = []
    for row in timeline:
        for timed in row:
            action = timed.action
            events.append(TimelineEvent(timed.rank, action_label(action.kind, action.micro_batch, action.chunk,
                                                                 several_chunks),
                                        FORWARD_KIND if action.kind == FORWARD else BACKWARD_KIND, timed.start,
                                        timed.end, action.micro_batch, action.chunk,
                                        global_stage(timed.rank, action.chunk, len(timeline))))
    return events
