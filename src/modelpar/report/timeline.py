"""Pipeline timelines as pictures and traces: Gantt charts (PNG) and Chrome traces (JSON).

Both the predicted timeline (`schedules.simulate.simulate` of the schedule's action lists, see
`events_from_simulation` and `planner.prediction.predict_schedule`) and the measured one (the runtime's
per-rank spans, see `events_from_runtime`) are lists of `schedules.events.TimelineEvent`, so the
same drawing serves both and the two can be put side by side (`side_by_side_png`).

Bubble fraction of a timeline (`timeline_bubble_fraction`): 1 - max_r busy_r / makespan, busy_r
the forward + backward time of rank r and makespan the span from the first forward/backward start
to the last end over all ranks; the definition of `schedules.simulate.PipelineSimulation`, so a
simulated timeline reproduces its `bubble_fraction` exactly.

The Chrome trace format (Trace Event Format, "X" complete events with microsecond timestamps)
opens in https://ui.perfetto.dev or chrome://tracing: one process per rank (pid = rank), named by
"M" metadata events, with thread 0 for compute and thread 1 for communication.

matplotlib is imported inside the drawing functions (Agg backend), never at module import.
"""

from __future__ import annotations

import colorsys
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelpar.report.figures import TIME_UNITS, format_with_unit, pyplot, readable_unit, save_figure
from modelpar.schedules.events import (ALLREDUCE_KIND, BACKWARD_KIND, COMPUTE_KINDS, FORWARD_KIND, GRAD_SYNC_KIND,
                                       RECV_KIND, SEND_KIND, SEND_WAIT_KIND, TimelineEvent, action_label)

COMMUNICATION_KINDS = (RECV_KIND, SEND_KIND, SEND_WAIT_KIND)  # drawn as a thin strip under the compute boxes
RUNTIME_KIND_NAMES = {GRAD_SYNC_KIND: ALLREDUCE_KIND}  # runtime span kind -> drawn kind

# Forward (light) / backward (dark) fill of the first model chunks; further chunks get their own
# pairs from `chunk_colours` (golden-angle hues), so no two chunks share a colour.
CHUNK_COLOURS = (
    ("#9ecae1", "#2166ac"),  # blue
    ("#a1d99b", "#1b7837"),  # green
    ("#fdd0a2", "#d94801"),  # orange
    ("#cbc9e2", "#54278f"),  # purple
    ("#fcbba1", "#a50f15"),  # red
    ("#99d8c9", "#00665e"),  # teal
)
CHUNK_LIGHTNESS = (0.80, 0.30)  # (forward, backward) HLS lightness of the generated pairs
CHUNK_SATURATION = 0.65
GOLDEN_HUE_STEP = 0.3819660112501051  # 1 - 1/golden ratio: consecutive hues far apart, never repeating
OTHER_COLOURS = {
    "recv": "#bdbdbd",
    "send": "#737373",
    "send_wait": "#d9d9d9",
    "allreduce": "#e7298a",
    "optimizer": "#525252",
}
FALLBACK_COLOUR = "#8c6d31"
IDLE_COLOUR = "#f4f4f4"
MIN_EDGED_BOX_PIXELS = 8.0  # narrower boxes (median) are drawn without white separators
FIGURE_WIDTH_IN = 13.0
LEGEND_NAMES = {
    "recv": "recv (waiting for input)",
    "send": "send (launch)",
    "send_wait": "send wait (end of step)",
    "allreduce": "gradient all-reduce",
    "optimizer": "optimizer step",
}
THREAD_NAMES = ("compute", "communication")  # Chrome trace tid 0, 1


# --- building events --------------------------------------------------------------------------


def events_from_runtime(spans_by_rank: Mapping[Any, Iterable] | Sequence[Iterable]) -> list[TimelineEvent]:
    """The runtime's events (`runtime.timeline`) as drawn: `TimelineEvent`s or their dicts
    (`TimelineEvent.to_dict`, as in the `timeline` of a `modelpar train --json` summary).

    `spans_by_rank`: {rank: events} (keys may be strings) or a list indexed by rank; the key is
    the row. Forward/backward boxes are named from their action ('F3', 'F3a' with several chunks,
    as `events_from_simulation`), other events of an action '<kind> <name>'; 'grad_sync' becomes
    'allreduce'. Times are kept as given (the drawings start each picture at its earliest event).
    """
    items = spans_by_rank.items() if isinstance(spans_by_rank, Mapping) else enumerate(spans_by_rank)
    events = [replace(span if isinstance(span, TimelineEvent) else TimelineEvent(**span), rank=int(rank))
              for rank, spans in items for span in spans]
    several_chunks = any(event.chunk for event in events)
    drawn = []
    for event in events:
        kind, name = RUNTIME_KIND_NAMES.get(event.kind, event.kind), event.name
        if kind in COMPUTE_KINDS:
            name = action_label(kind, event.micro_batch, event.chunk, several_chunks)
        elif event.micro_batch is not None:
            name = f"{kind} {name}"
        drawn.append(replace(event, kind=kind, name=name))
    return drawn


# --- numbers ----------------------------------------------------------------------------------


def timeline_bubble_fraction(events: Sequence[TimelineEvent]) -> float:
    """1 - (busiest rank's forward + backward time) / makespan of the forward/backward events
    (the simulator's definition; 0 for an empty timeline)."""
    compute = [e for e in events if e.kind in COMPUTE_KINDS]
    if not compute:
        return 0.0
    makespan = max(e.end_s for e in compute) - min(e.start_s for e in compute)
    busy: dict[int, float] = defaultdict(float)
    for event in compute:
        busy[event.rank] += event.duration_s
    return 1.0 - max(busy.values()) / makespan if makespan > 0 else 0.0


def timeline_span(events: Sequence[TimelineEvent]) -> tuple[float, float]:
    """(earliest start, latest end) over all events."""
    if not events:
        return 0.0, 0.0
    return min(e.start_s for e in events), max(e.end_s for e in events)


# --- Chrome trace -----------------------------------------------------------------------------


def chrome_trace(events: Sequence[TimelineEvent], row_name: str = "rank") -> dict:
    """Chrome Trace Event Format document: one "X" event per TimelineEvent (ts and dur in
    microseconds from the earliest event), pid = rank, tid 0 compute / 1 communication, plus "M"
    metadata events naming each process '<row_name> r' and each thread."""
    origin = timeline_span(events)[0]
    trace: list[dict] = []
    threads = sorted({(e.rank, _thread_of(e)) for e in events})
    for rank in sorted({rank for rank, _ in threads}):
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"{row_name} {rank}"}})
        trace.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
    for rank, tid in threads:
        trace.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": THREAD_NAMES[tid]}})
    for event in sorted(events, key=lambda e: (e.rank, e.start_s)):
        args: dict[str, Any] = {"kind": event.kind}
        if event.micro_batch is not None:
            args["micro_batch"] = event.micro_batch
        if event.chunk is not None:
            args["chunk"] = event.chunk
        trace.append({
            "name": event.name,
            "cat": event.kind,
            "ph": "X",
            "ts": (event.start_s - origin) * 1e6,
            "dur": event.duration_s * 1e6,
            "pid": event.rank,
            "tid": _thread_of(event),
            "args": args,
        })
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def _thread_of(event: TimelineEvent) -> int:
    return 1 if event.kind in COMMUNICATION_KINDS else 0


def write_chrome_trace(events: Sequence[TimelineEvent], path: str | Path, row_name: str = "rank") -> Path:
    """Write `chrome_trace(events)` as JSON to `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(events, row_name)))
    return path


# --- Gantt charts -----------------------------------------------------------------------------


def chunk_colours(chunk: int) -> tuple[str, str]:
    """(forward, backward) fill of model chunk `chunk`: light and dark of one hue, distinct for
    chunk. The first come from CHUNK_COLOURS; later ones step the hue by the golden angle (an
    irrational fraction of the circle, so hues do not repeat) at fixed light/dark lightness; the
    8-bit colours stay distinct for the first 240 chunks (a chunk holds at least one layer, and
    an interleaved pipeline has p >= 2: 480 layers)."""
    if chunk < len(CHUNK_COLOURS):
        return CHUNK_COLOURS[chunk]
    hue = (0.13 + (chunk - len(CHUNK_COLOURS)) * GOLDEN_HUE_STEP) % 1.0
    light, dark = (_hls_hex(hue, lightness, CHUNK_SATURATION) for lightness in CHUNK_LIGHTNESS)
    return light, dark


def _hls_hex(hue: float, lightness: float, saturation: float) -> str:
    red, green, blue = colorsys.hls_to_rgb(hue, lightness, saturation)
    return "#" + "".join(f"{round(255 * channel):02x}" for channel in (red, green, blue))


def event_colour(event: TimelineEvent) -> str:
    """Forward light / backward dark, hue by model chunk; fixed colours for the other kinds."""
    if event.kind in COMPUTE_KINDS:
        light, dark = chunk_colours(event.chunk or 0)
        return light if event.kind == FORWARD_KIND else dark
    return OTHER_COLOURS.get(event.kind, FALLBACK_COLOUR)


def time_unit(seconds: float) -> tuple[float, str]:
    """(scale, unit) so that `seconds / scale` reads naturally: s, ms or µs."""
    return readable_unit(seconds, TIME_UNITS)


def format_duration(seconds: float) -> str:
    return format_with_unit(seconds, TIME_UNITS)


def describe_timeline(events: Sequence[TimelineEvent]) -> str:
    """'bubble 12.5%, pipeline 3.2 ms, step 3.4 ms': bubble fraction and span of the
    forward/backward events, and span of all events (with the all-reduce and optimizer tail)."""
    compute = [e for e in events if e.kind in COMPUTE_KINDS]
    first, last = timeline_span(events)
    text = f"bubble {timeline_bubble_fraction(events):.1%}"
    if compute:
        compute_first, compute_last = timeline_span(compute)
        text += f", pipeline {format_duration(compute_last - compute_first)}"
    return text + f", step {format_duration(last - first)}"


def gantt_png(
    events: Sequence[TimelineEvent], path: str | Path, title: str = "", row_name: str = "rank", dpi: int = 130
) -> Path:
    """Draw one row per rank (rank 0 on top): forward boxes light and backward boxes dark, in one
    hue per model chunk, labelled with the micro-batch when wide enough; transfers as a thin grey
    strip, gradient all-reduce and optimizer in their own colours; white gaps are idle time. The
    title gets the bubble fraction and makespan. Returns the path written (parent folders created;
    '.png' appended unless `path` ends in an image format, `figures.save_figure`)."""
    plt = pyplot()
    ranks = _ranks(events)
    figure, axes = plt.subplots(figsize=(FIGURE_WIDTH_IN, _panel_height(len(ranks)) + 0.9))
    origin, end = timeline_span(events)
    scale, unit = time_unit(end - origin)
    labelled = _draw_gantt(axes, events, ranks, origin, scale, (end - origin) / scale, row_name)
    axes.set_xlabel(f"time ({unit})")
    headline = describe_timeline(events)
    axes.set_title(f"{title}\n{headline}" if title else headline, fontsize=11)
    _legend(axes, [events], labelled > 0)
    return save_figure(figure, path, dpi)


def side_by_side_png(
    predicted_events: Sequence[TimelineEvent],
    measured_events: Sequence[TimelineEvent],
    path: str | Path,
    title: str = "",
    row_name: str = "rank",
    share_time_axis: bool = True,
    dpi: int = 130,
) -> Path:
    """Predicted (top) and measured (bottom) Gantt panels, each starting at its own first event,
    on one shared time axis (or, with `share_time_axis=False`, each on its own, for timelines of
    very different lengths); each panel's title gives its bubble fraction and makespan. Returns
    the path written (as `gantt_png`)."""
    plt = pyplot()
    panels = (("predicted", predicted_events), ("measured", measured_events))
    ranks = [_ranks(events) for _, events in panels]
    heights = [_panel_height(len(r)) for r in ranks]
    figure, axes_pair = plt.subplots(
        2, 1, sharex=share_time_axis, figsize=(FIGURE_WIDTH_IN, sum(heights) + 1.8),
        gridspec_kw={"height_ratios": heights, "hspace": 0.3 if share_time_axis else 0.45},
    )
    spans = [timeline_span(events) for _, events in panels]
    longest = max(end - start for start, end in spans)
    labelled = 0
    for axes, (label, events), panel_ranks, (start, end) in zip(axes_pair, panels, ranks, spans):
        length = longest if share_time_axis else end - start
        scale, unit = time_unit(length)
        labelled += _draw_gantt(axes, events, panel_ranks, start, scale, length / scale, row_name)
        axes.set_title(f"{label}: {describe_timeline(events)}", fontsize=10, loc="left")
        if not share_time_axis or axes is axes_pair[-1]:
            axes.set_xlabel(f"time ({unit})")
    if title:
        figure.suptitle(title, fontsize=12)
    _legend(axes_pair[0], [events for _, events in panels], labelled > 0)
    return save_figure(figure, path, dpi)


def _ranks(events: Sequence[TimelineEvent]) -> list[int]:
    return sorted({e.rank for e in events}) or [0]


def _panel_height(num_rows: int) -> float:
    return max(1.6, 0.55 * num_rows + 0.4)


def _draw_gantt(axes, events, ranks, origin: float, scale: float, width: float, row_name: str) -> int:
    """Boxes of `events` on `axes`, times (t - origin) / scale, x from 0 to `width`; returns the
    number of boxes labelled with their micro-batch."""
    row_of = {rank: row for row, rank in enumerate(ranks)}
    right = width * 1.005 if width > 0 else 1.0
    axes.set_xlim(0, right)
    figure = axes.figure
    pixels_per_unit = axes.get_position().width * figure.get_figwidth() * figure.dpi / right
    boxes: dict[tuple[int, str, bool], list[tuple[float, float]]] = defaultdict(list)  # (row, colour, strip)
    for event in events:
        strip = event.kind in COMMUNICATION_KINDS
        boxes[(row_of[event.rank], event_colour(event), strip)].append(
            ((event.start_s - origin) / scale, event.duration_s / scale)
        )
    compute_pixels = sorted(e.duration_s / scale * pixels_per_unit for e in events if e.kind in COMPUTE_KINDS)
    # white separators between neighbouring boxes, unless the boxes are so thin they would vanish
    edge_width = 0.6 if not compute_pixels or compute_pixels[len(compute_pixels) // 2] >= MIN_EDGED_BOX_PIXELS else 0.0
    for row in range(len(ranks)):  # a light band per row makes the idle gaps visible
        axes.axhspan(row - 0.42, row + 0.42, color=IDLE_COLOUR, zorder=0, linewidth=0)
    for (row, colour, strip), spans in boxes.items():
        y, height = (row + 0.2, 0.22) if strip else (row - 0.4, 0.8)
        axes.broken_barh(spans, (y, height), facecolors=colour, edgecolors="white", linewidth=edge_width, zorder=2)
    axes.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    axes.set_yticks(range(len(ranks)), [f"{row_name} {rank}" for rank in ranks])
    axes.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)
    axes.grid(axis="x", color="#dddddd", linewidth=0.6, zorder=1)
    axes.set_axisbelow(True)
    return _label_boxes(axes, events, row_of, origin, scale, pixels_per_unit)


def _label_boxes(axes, events, row_of, origin: float, scale: float, pixels_per_unit: float) -> int:
    """Micro-batch numbers inside the forward/backward boxes wide enough to hold them."""
    fontsize = 7.5
    char_pixels = 0.62 * fontsize * axes.figure.dpi / 72.0
    labelled = 0
    for event in events:
        if event.kind not in COMPUTE_KINDS or event.micro_batch is None:
            continue
        text = str(event.micro_batch)
        if event.duration_s / scale * pixels_per_unit < len(text) * char_pixels + 4:
            continue
        middle = (event.start_s + event.end_s) / 2
        axes.text(
            (middle - origin) / scale, row_of[event.rank], text, ha="center", va="center", fontsize=fontsize,
            color="white" if event.kind == BACKWARD_KIND else "#08306b", zorder=3, clip_on=True,
        )
        labelled += 1
    return labelled


def _legend(axes, event_lists: Sequence[Sequence[TimelineEvent]], labelled: bool) -> None:
    """One legend entry per (kind, chunk) present, forward/backward first, right of the plot."""
    from matplotlib.patches import Patch

    several_chunks = any((e.chunk or 0) > 0 for events in event_lists for e in events)
    entries: dict[tuple, tuple[str, str]] = {}  # sort key -> (label, colour)
    for events in event_lists:
        for event in events:
            if event.kind in COMPUTE_KINDS:
                key = (0, event.chunk or 0, COMPUTE_KINDS.index(event.kind), "")
                label = f"{event.kind} chunk {event.chunk}" if several_chunks else event.kind
            else:
                key, label = (1, 0, 0, event.kind), LEGEND_NAMES.get(event.kind, event.kind)
            entries.setdefault(key, (label, event_colour(event)))
    handles = [Patch(facecolor=colour, edgecolor="#999999", linewidth=0.5, label=label)
               for _, (label, colour) in sorted(entries.items())]
    handles.append(Patch(facecolor=IDLE_COLOUR, edgecolor="#999999", linewidth=0.5, label="idle"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False,
                title="numbers: micro-batch" if labelled else None, title_fontsize=8)
