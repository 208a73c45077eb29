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


def figure_path(path: str | Path, supported: Sequence[str] = ("png",)) -> Path:
    """The file a figure for `path` is written to: `path` itself when its suffix names a format in
    `supported` (case-insensitive), else `path` with '.png' appended ('out/run' -> 'out/run.png',
    'run.v2' -> 'run.v2.png'), which is what matplotlib would write for a bare name."""
    path = Path(path)
    if path.suffix[1:].lower() in {name.lower() for name in supported}:
        return path
    return path.with_name(path.name + ".png")


def save_figure(figure, path: str | Path, dpi: int) -> Path:
    """Write `figure` (parent folders created, tight bounding box), close it, and return the path
    really written: `figure_path(path)` ('.png' appended unless the suffix names an image format)."""
    path = figure_path(path, tuple(figure.canvas.get_supported_filetypes()))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight", format=path.suffix[1:].lower())
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
