"""Memory per pipeline stage as stacked bars (PNG), against the usable device capacity.

One bar per pipeline stage from `planner.memory.memory_per_device(..., stage=r)`: parameters,
gradients, optimizer states, stored activations and the embedding/logits buffers, in GiB, with
the capacity the plan may fill (the breakdowns' `capacity`: `planner.cost.usable_memory_bytes`,
what `modelpar estimate` checks) as a dashed limit line, optionally the device's total memory as
a fainter dotted line above it, and each bar's total above it (red when it does not fit).
matplotlib is imported inside the function (Agg backend, `report.figures`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from modelpar.report.figures import BYTE_UNITS, format_with_unit, pyplot, readable_unit, save_figure

GIB = 2**30
CAPACITY_SCALE_LIMIT = 20.0  # draw the capacity line only when the fullest stage reaches 1/20 of it
COMPONENTS = (  # (MemoryBreakdown field, legend label, colour)
    ("parameters", "parameters", "#4575b4"),
    ("gradients", "gradients", "#91bfdb"),
    ("optimizer_states", "optimizer states", "#fee090"),
    ("activations", "activations", "#fc8d59"),
    ("embedding_and_logits", "embedding / logits buffers", "#d73027"),
)


def memory_png(
    breakdowns: Sequence, path: str | Path, title: str = "", stage_labels: Sequence[str] | None = None,
    dpi: int = 130, device_bytes: float | None = None,
) -> Path:
    """Stacked bars of `breakdowns` (one `MemoryBreakdown` per pipeline stage, in order) with the
    capacity of the first (the usable limit) as a dashed line and, when `device_bytes` (the
    device's total memory) is above it, that as a faint dotted line; lines are named in the
    legend instead when the bars reach less than 1/20 of them. Returns the path written (parent
    folders created)."""
    if not breakdowns:
        raise ValueError("memory_png: no memory breakdowns to draw")
    plt = pyplot()
    from matplotlib.lines import Line2D

    labels = list(stage_labels) if stage_labels is not None else [f"stage {k}" for k in range(len(breakdowns))]
    if len(labels) != len(breakdowns):
        raise ValueError(f"memory_png: {len(labels)} stage labels for {len(breakdowns)} breakdowns")
    peak_bytes = max(b.total for b in breakdowns)
    capacity_bytes = breakdowns[0].capacity
    device_bytes = device_bytes if device_bytes is not None and device_bytes > capacity_bytes else None
    # Bars far below the capacity would be invisible on its scale: draw them on their own scale
    # and name the capacity in the legend instead of drawing its line.
    capacity_on_scale = capacity_bytes <= CAPACITY_SCALE_LIMIT * peak_bytes
    device_on_scale = capacity_on_scale and device_bytes is not None
    line_top = max(capacity_bytes, device_bytes or 0.0) if capacity_on_scale else 0.0
    scale, unit = readable_unit(max(peak_bytes, line_top), BYTE_UNITS)
    totals = [b.total / scale for b in breakdowns]
    positions = range(len(breakdowns))
    figure, axes = plt.subplots(figsize=(max(5.5, 1.1 * len(breakdowns) + 3.5), 4.6))
    bottom = [0.0] * len(breakdowns)
    for field, label, colour in COMPONENTS:
        heights = [getattr(b, field) / scale for b in breakdowns]
        axes.bar(positions, heights, 0.6, bottom=bottom, color=colour, edgecolor="white", linewidth=0.6, label=label)
        bottom = [low + height for low, height in zip(bottom, heights)]
    top = max(line_top / scale, max(totals)) * 1.15
    for position, total, breakdown in zip(positions, totals, breakdowns):
        axes.text(position, total + top * 0.01, f"{total:.3g}", ha="center", va="bottom", fontsize=8,
                  color="#b2182b" if not breakdown.fits else "#333333")
    if device_bytes is not None:
        capacity_label = (f"usable limit {_format_bytes(capacity_bytes)} "
                          f"({capacity_bytes / device_bytes:.0%} of device)")
    else:
        capacity_label = f"capacity {_format_bytes(capacity_bytes)}"
    lines = [(capacity_label, capacity_bytes, capacity_on_scale, dict(color="#b2182b", linestyle="--", linewidth=1.2))]
    if device_bytes is not None:
        lines.append((f"device memory {_format_bytes(device_bytes)}", device_bytes, device_on_scale,
                      dict(color="#b2182b", linestyle=":", linewidth=1.0, alpha=0.45)))
    for label, level, on_scale, style in lines:
        if on_scale:
            axes.axhline(level / scale, label=label, zorder=3, **style)
        else:
            axes.plot([], [], label=f"{label} (off scale)", **style)
    axes.set_ylim(0, top)
    axes.set_xticks(list(positions), labels)
    axes.set_ylabel(f"memory per device ({unit})")
    axes.grid(axis="y", color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    share = peak_bytes / capacity_bytes
    headline = (f"peak {_format_bytes(peak_bytes)} of {_format_bytes(capacity_bytes)}"
                f"{' usable' if device_bytes is not None else ''} "
                f"({f'{share:.1%}' if share >= 0.001 else '< 0.1%'})")
    axes.set_title(f"{title}\n{headline}" if title else headline, fontsize=11)
    handles, legend_labels = axes.get_legend_handles_labels()
    # legend top-down as drawn: the lines highest first (device, limit), then the stack's components
    is_line = [isinstance(handle, Line2D) for handle in handles]
    order = ([k for k in reversed(range(len(handles))) if is_line[k]]
             + [k for k in reversed(range(len(handles))) if not is_line[k]])
    axes.legend([handles[k] for k in order], [legend_labels[k] for k in order], loc="upper left",
                bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return save_figure(figure, path, dpi)


def _format_bytes(num_bytes: float) -> str:
    return format_with_unit(num_bytes, BYTE_UNITS)
