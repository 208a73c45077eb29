"""What the report figures share: matplotlib on the Agg backend, imported only when a figure is
drawn (never at module import, so the planner and the CLI start without it), saving a figure,
and choosing a unit that reads naturally (bytes, seconds)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

Units = Sequence[tuple[float, str]]  # (scale, name), largest first
BYTE_UNITS: Units = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))
TIME_UNITS: Units = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"))


def pyplot():
    """matplotlib.pyplot on the Agg (file-only) backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path, dpi: int) -> Path:
    """Write `figure` to `path` (parent folders created, tight bounding box), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(figure)
    return path


def readable_unit(value: float, units: Units) -> tuple[float, str]:
    """(scale, name): the largest unit of `units` that `value` reaches (the smallest if none)."""
    for scale, name in units:
        if value >= scale:
            return scale, name
    return units[-1]


def format_with_unit(value: float, units: Units) -> str:
    """'3.2 ms', '1.5 GiB': three significant digits in `readable_unit`."""
    scale, name = readable_unit(value, units)
    return f"{value / scale:.3g} {name}"
