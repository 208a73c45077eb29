"""Human tables (rich) and JSON documents for the planner's commands.

The JSON shapes are the contracts of DESIGN.md: `plan` -> {"plans": [...], "rejected": {...}},
`estimate` -> {"plan", "predicted_step_time_s", "predicted_mfu", "breakdown", "memory"},
`validate` -> {"runs": [...], "summary": {...}}.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, fields, is_dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from modelpar.planner.cost import BREAKDOWN_KEYS, EXPOSED_COMM_KEYS, HIDDEN_KEYS, INSIDE_COMPUTE_KEYS
from modelpar.planner.search import explain_losers

GIB = 2**30
MEMORY_KEYS = ("parameters", "gradients", "optimizer_states", "activations", "embedding_and_logits")


def print_json(document) -> None:
    """One JSON document on stdout (dataclasses and objects with `to_dict` included)."""
    json.dump(document, sys.stdout, indent=1, default=_as_dict)
    sys.stdout.write("\n")


def console() -> Console:
    """A rich console at least 120 columns wide: piped output would otherwise wrap at 80 columns
    and fold every table cell."""
    width = max(shutil.get_terminal_size((140, 24)).columns, 120)
    return Console(highlight=False, width=width)


def _as_dict(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value):
        return asdict(value)
    raise TypeError(f"cannot render {type(value).__name__}")


def memory_dict(memory) -> dict:
    """MemoryBreakdown -> JSON-ready dict with bytes, capacity, fits and shortfall."""
    data = {f.name: getattr(memory, f.name) for f in fields(memory)} if is_dataclass(memory) else dict(memory)
    data["fits"] = bool(memory.fits)
    data["shortfall"] = float(memory.shortfall)
    return data


def _prediction(estimate) -> dict:
    """Fields shared by `plan` rows and the `estimate` document."""
    return {
        "plan": estimate.plan.to_dict(),
        "predicted_step_time_s": estimate.step_time_s,
        "predicted_mfu": estimate.mfu,
        "predicted_hfu": estimate.hfu,
        "breakdown": dict(estimate.breakdown),
        "energy_per_step_j": estimate.energy_per_step_j,
        "energy_per_token_j": estimate.energy_per_token_j,
    }


def plan_row(estimate) -> dict:
    """One ranked plan as in the `plan --json` contract."""
    return {**_prediction(estimate), "memory_per_device_bytes": estimate.memory.total}


def search_json(result) -> dict:
    document = {
        "plans": [plan_row(e) for e in result.plans],
        "rejected": dict(result.rejected),
        "searched": result.searched,
    }
    document["explanations"] = explain_losers(result)
    return document


def estimate_json(estimate) -> dict:
    return {**_prediction(estimate), "memory": memory_dict(estimate.memory)}


def validation_json(report) -> dict:
    return {"runs": [_as_dict(r) for r in report.runs], "summary": _as_dict(report.summary)}


def print_search(result, model, cluster, num_devices: int, elapsed_s: float) -> None:
    out = console()
    table = Table(
        title=f"{model.name} on {num_devices} x {cluster.device.name} ({cluster.name}): best plans",
        title_justify="left",
    )
    for column in ("#", "t p d v", "mb", "m", "schedule", "SP", "recompute", "ZeRO", "step (s)", "MFU",
                   "mem/dev (GiB)", "bubble", "exposed comm"):
        table.add_column(column, justify="right" if column not in ("t p d v", "schedule", "recompute") else "left")
    for rank, e in enumerate(result.plans, 1):
        p = e.plan
        b = e.breakdown
        comm = sum(b.get(key, 0.0) for key in EXPOSED_COMM_KEYS)
        table.add_row(
            str(rank), p.degrees(), str(p.micro_batch_size), str(p.num_micro_batches), p.schedule,
            "yes" if p.sequence_parallel else "no", p.recompute, str(p.zero_stage), f"{e.step_time_s:.3f}",
            f"{e.mfu:.1%}", f"{e.memory.total / GIB:.1f}", f"{b.get('bubble_s', 0.0) / e.step_time_s:.1%}",
            f"{comm / e.step_time_s:.1%}",
        )
    out.print(table)
    if result.rejected:
        rejected = ", ".join(f"{reason}: {count}" for reason, count in sorted(result.rejected.items(), key=lambda kv: -kv[1]))
        out.print(f"rejected {sum(result.rejected.values())} of {result.searched} plans — {rejected}")
    losers = explain_losers(result)
    if losers:
        out.print("why the others are slower than #1:")
    for line in losers:
        out.print(f"  {line}")
    out.print(f"searched in {result.seconds:.3f} s (command {elapsed_s:.3f} s)")


def no_plan_message(result, model, cluster, num_devices: int) -> str:
    counts = ", ".join(f"{reason}: {count}" for reason, count in sorted(result.rejected.items(), key=lambda kv: -kv[1]))
    return (
        f"no feasible plan for {model.name} on {num_devices} x {cluster.device.name} "
        f"({cluster.device.memory_gib:g} GiB) among {result.searched} candidates ({counts or 'none'}); "
        f"add devices, free fixed plan fields, or lower the global batch size"
    )


def print_estimate(estimate, model, cluster, num_devices: int) -> None:
    out = console()
    p = estimate.plan
    out.print(f"[bold]{model.name}[/bold] on {num_devices} x {cluster.device.name}: {p.describe()}")
    out.print(
        f"predicted step {estimate.step_time_s:.3f} s, MFU {estimate.mfu:.1%}, HFU {estimate.hfu:.1%}, "
        f"{estimate.energy_per_token_j:.3g} J/token"
    )
    out.print(_time_table(estimate))
    breakdown = estimate.breakdown
    out.print(f"pipeline bubble: {breakdown['bubble_fraction']:.1%} of the schedule's time is idle")
    out.print(f"micro-batches per step: {breakdown['num_micro_batches']:,.0f} per pipeline")
    out.print(f"tokens per step: {breakdown['tokens_per_step']:,.0f}")
    mem = estimate.memory
    mem_table = Table(title="memory per device (worst stage)", title_justify="left")
    mem_table.add_column("component")
    mem_table.add_column("GiB", justify="right")
    for key in MEMORY_KEYS:
        mem_table.add_row(key, f"{getattr(mem, key) / GIB:.2f}")
    mem_table.add_row("total", f"{mem.total / GIB:.2f}")
    device_gib = cluster.device.memory_gib
    mem_table.add_row(f"usable capacity ({mem.capacity / cluster.device.memory_bytes:.0%} of {device_gib:g} GiB)",
                      f"{mem.capacity / GIB:.2f}")
    out.print(mem_table)
    if not mem.fits:
        out.print(f"[red]does not fit: {mem.shortfall / GIB:.2f} GiB over[/red]")


def _seconds_keys(breakdown: dict) -> list[str]:
    """The breakdown's seconds entries (`planner.cost.BREAKDOWN_KEYS` first, then any other `_s` key)."""
    known = [key for key in BREAKDOWN_KEYS if key in breakdown]
    return known + [key for key in breakdown if key.endswith("_s") and key not in known]


def _time_table(estimate):
    """Seconds of the step by component: the step's parts add up to the step; the parts of compute
    are indented under it, and overlapped communication is listed below the total as hidden."""
    step = estimate.step_time_s
    breakdown = estimate.breakdown
    keys = _seconds_keys(breakdown)
    table = Table(title="where the time goes (per step, slowest stage)", title_justify="left")
    table.add_column("component")
    table.add_column("seconds", justify="right")
    table.add_column("share of step", justify="right")
    for key in keys:
        if key in INSIDE_COMPUTE_KEYS or key in HIDDEN_KEYS:
            continue
        table.add_row(key, f"{breakdown[key]:.4f}", f"{breakdown[key] / step:.1%}")
        if key == "compute_s":
            for part in (k for k in keys if k in INSIDE_COMPUTE_KEYS):
                table.add_row(f"  of which {part}", f"{breakdown[part]:.4f}", f"({breakdown[part] / step:.1%})",
                              style="dim")
    table.add_section()
    table.add_row("step", f"{step:.4f}", "100.0%", style="bold", end_section=True)
    for key in (k for k in keys if k in HIDDEN_KEYS):
        table.add_row(f"{key} (hidden behind compute)", f"{breakdown[key]:.4f}", "not in step", style="dim")
    return table


def format_validation(report, runs: bool = True) -> str:
    """Plain-text table: every run (optional), then the per-group and overall summary."""
    lines = []
    if runs:
        lines.append(f"{'run':<48} {'pred s':>9} {'meas s':>9} {'err':>7} {'MFU':>6}  chosen")
        for row in report.runs:
            if row.error:
                lines.append(f"{row.name:<48} {'-':>9} {row.measured_step_time_s:>9.3f}  failed: {row.error}")
                continue
            chosen = " ".join(f"{key}={value}" for key, value in row.chosen.items())
            lines.append(
                f"{row.name[:48]:<48} {row.predicted_step_time_s:>9.3f} {row.measured_step_time_s:>9.3f} "
                f"{100 * row.relative_error:>+6.1f}% {row.predicted_mfu:>6.3f}  {chosen}"
            )
        lines.append("")
    lines.append(f"{'group':<24} {'runs':>5} {'median |err|':>13} {'max |err|':>10}")
    for group, stats in report.summary["per_group"].items():
        lines.append(
            f"{group:<24} {stats['count']:>5} {100 * stats['median_abs_relative_error']:>12.1f}% "
            f"{100 * stats['max_abs_relative_error']:>9.1f}%"
        )
    summary = report.summary
    lines.append(
        f"{'all':<24} {summary['count']:>5} {100 * summary['median_abs_relative_error']:>12.1f}% "
        f"{100 * summary['max_abs_relative_error']:>9.1f}%"
    )
    return "\n".join(lines)
