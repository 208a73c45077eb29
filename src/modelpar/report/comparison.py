"""Measured side of predicted vs measured (`planner.prediction` defines the keys and the
predicted side), from the ranks' `schedules.events.TimelineEvent`s of each measured step, the
relative errors (predicted / measured - 1, None when the measurement is 0) and the table of a
`modelpar train` run. Pure Python (no torch)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from rich.table import Table

from modelpar.planner.prediction import COMPARED_KEYS
from modelpar.schedules.events import (COLLECTIVE_KIND, COMPUTE_KINDS, GRAD_SYNC_KIND, LAUNCH_KIND, OPTIMIZER_KIND,
                                       SEND_KIND, TimelineEvent)

BUSY_KINDS = (*COMPUTE_KINDS, OPTIMIZER_KIND)  # measured compute


def _inside(event: TimelineEvent, spans: Sequence[TimelineEvent]) -> bool:
    return any(span.start_s <= event.start_s and event.end_s <= span.end_s for span in spans)


def collective_waits(events_by_rank: Sequence[Sequence[TimelineEvent]]) -> list[dict[int, float]]:
    """For one step: per rank, {index of a 'collective' event: seconds of it spent waiting for
    the last member of its group to arrive}. Equal names on different ranks are the same
    collective (`runtime.instrument.timed_collectives`); a rank arrives when it launches the
    collective (its 'collective_launch' event for an asynchronous one, else the start of the
    span); all ranks share one clock (one machine's perf_counter)."""
    latest: dict[str, float] = {}
    for events in events_by_rank:
        arrived: dict[str, float] = {}
        for event in events:
            if event.kind == LAUNCH_KIND or (event.kind == COLLECTIVE_KIND and event.name not in arrived):
                arrived[event.name] = event.start_s
        for name, start in arrived.items():
            latest[name] = max(latest.get(name, start), start)
    return [{index: max(0.0, min(latest[event.name], event.end_s) - event.start_s)
             for index, event in enumerate(events) if event.kind == COLLECTIVE_KIND}
            for events in events_by_rank]


def step_breakdown(events: Sequence[TimelineEvent], step_time_s: float, waits: dict[int, float] | None = None
                   ) -> dict[str, float]:
    """compute_s, communication_s, bubble_s of one rank's step from its events and the waits of
    its collectives (`collective_waits`; none: no waits). Collectives nested in compute spans
    move to communication; a collective's wait for a late peer is idle time (bubble);
    collectives nested in a gradient-sync span are counted by that span, less their waits."""
    waits = waits or {}
    compute_spans = [e for e in events if e.kind in BUSY_KINDS]
    sync_spans = [e for e in events if e.kind == GRAD_SYNC_KIND]
    compute = sum(e.duration_s for e in compute_spans)
    communication = sum(e.duration_s for e in events if e.kind in (GRAD_SYNC_KIND, SEND_KIND))
    for index, event in enumerate(events):
        if event.kind != COLLECTIVE_KIND:
            continue
        wait = waits.get(index, 0.0)
        if _inside(event, sync_spans):
            communication -= wait
            continue
        if _inside(event, compute_spans):
            compute -= event.duration_s
        communication += event.duration_s - wait
    return {"compute_s": compute, "communication_s": communication,
            "bubble_s": step_time_s - compute - communication}


def rank_step_breakdowns(step_times_by_rank: Sequence[Sequence[float]],
                         events_by_rank: Sequence[Sequence[Sequence[TimelineEvent]]]) -> list[list[dict]]:
    """Per rank, per step, `step_breakdown` with cross-rank collective waits; rank r's step k
    took `step_times_by_rank[r][k]` seconds and recorded `events_by_rank[r][k]` (the same steps
    on every rank)."""
    count = min(len(steps) for steps in events_by_rank)
    result: list[list[dict]] = [[] for _ in events_by_rank]
    for step in range(count):
        events = [steps[step] for steps in events_by_rank]
        for rank, waits in enumerate(collective_waits(events)):
            result[rank].append(step_breakdown(events[rank], step_times_by_rank[rank][step], waits))
    return result


def rank_summary(step_breakdowns: Sequence[dict[str, float]], step_times_s: Sequence[float]) -> dict[str, float]:
    """Medians over a rank's measured steps (after warm-up) of its step time and breakdown."""
    if not step_times_s:
        raise ValueError("no measured steps")
    return {
        "step_time_s": statistics.median(step_times_s),
        **{key: statistics.median(b[key] for b in step_breakdowns) for key in ("compute_s", "communication_s")},
    }


def measured_times(ranks: Sequence[dict[str, float]]) -> dict[str, float]:
    """Step time of the slowest rank; compute, communication of the busiest rank (most compute),
    and its bubble = step - compute - communication (so the three add up to the step)."""
    step = max(rank["step_time_s"] for rank in ranks)
    busiest = max(ranks, key=lambda rank: rank["compute_s"])
    return {"step_time_s": step, "compute_s": busiest["compute_s"], "communication_s": busiest["communication_s"],
            "bubble_s": step - busiest["compute_s"] - busiest["communication_s"]}


def relative_errors(predicted: dict | None, measured: dict) -> dict[str, float | None] | None:
    """predicted / measured - 1 for each compared key, then any other key of `measured` (None
    where the measurement is 0 or either value is missing)."""
    if predicted is None:
        return None
    errors = {}
    for key in (*COMPARED_KEYS, *(key for key in measured if key not in COMPARED_KEYS)):
        value, reference = predicted.get(key), measured.get(key)
        errors[key] = (value / reference - 1.0) if (value is not None and reference) else None
    return errors


# --- human output ----------------------------------------------------------------------------------

_ROWS = (
    ("step time (s)", "step_time_s", lambda v: f"{v:.4f}"),
    ("  compute (s)", "compute_s", lambda v: f"{v:.4f}"),
    ("  communication (s)", "communication_s", lambda v: f"{v:.4f}"),
    ("  bubble + waits (s)", "bubble_s", lambda v: f"{v:.4f}"),
    ("peak memory, worst rank (MiB)", "peak_memory_bytes", lambda v: f"{v / 2**20:.1f}"),
    ("activations per layer (MiB)", "activation_bytes_per_layer", lambda v: f"{v / 2**20:.2f}"),
    ("tokens/s", "tokens_per_s", lambda v: f"{v:.0f}"),
    ("MFU", "mfu", lambda v: f"{v:.2%}"),
)


def print_comparison(summary: dict, console) -> None:
    """The measured / predicted / error table of a `modelpar train` summary on a rich console."""
    measured, predicted = summary["measured"], summary["predicted"]
    errors = summary.get("relative_error") or {}
    table = Table("metric", "measured", "predicted", "error")
    for name, key, fmt in _ROWS:
        prediction = predicted.get(key) if predicted else None
        error = errors.get(key)
        table.add_row(name, fmt(measured[key]), fmt(prediction) if prediction is not None else "-",
                      f"{error:+.1%}" if error is not None else "-")
    console.print(table)
    prediction_info = summary.get("prediction") or {}
    if prediction_info.get("error"):
        console.print(f"no prediction: {prediction_info['error']}")
    else:
        console.print(f"predicted on cluster '{prediction_info.get('cluster')}'; error = predicted / measured - 1; "
                      "bubble = step - compute - communication of the busiest rank")
