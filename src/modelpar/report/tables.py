"""Human tables (rich) and JSON documents for the planner's commands.

The JSON shapes are the contracts of DESIGN.md: `plan` -> {"plans": [...], "rejected": {...}},
`estimate` -> {"plan", "predicted_step_time_s", "predicted_mfu", "breakdown", "memory"},
`validate` -> {"runs": [...], "summary": {...}}.
"""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from typing import Any

GIB = 2**30
MEMORY_KEYS = ("parameters", "gradients", "optimizer_states", "activations", "embedding_and_logits")


def _console():
    import shutil

    from rich.console import Console

    # Piped output would otherwise wrap at 80 columns and fold every table cell.
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
    explanations = getattr(result, "explanations", None)
    if explanations:
        document["explanations"] = list(explanations)
    return document


def estimate_json(estimate) -> dict:
    return {**_prediction(estimate), "memory": memory_dict(estimate.memory)}


def validation_json(report) -> dict:
    return {"runs": [_as_dict(r) for r in report.runs], "summary": _as_dict(report.summary)}


def _plan_label(plan) -> str:
    label = f"t{plan.tensor_parallel} p{plan.pipeline_parallel} d{plan.data_parallel}"
    if plan.virtual_stages and plan.virtual_stages > 1:
        label += f" v{plan.virtual_stages}"
    return label


def print_search(result, model, cluster, num_devices: int, elapsed_s: float) -> None:
    from rich.table import Table

    console = _console()
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
        comm = sum(v for k, v in b.items() if k.endswith("comm_s") or k.endswith("p2p_s"))
        table.add_row(
            str(rank), _plan_label(p), str(p.micro_batch_size), str(p.num_micro_batches), p.schedule,
            "yes" if p.sequence_parallel else "no", p.recompute, str(p.zero_stage), f"{e.step_time_s:.3f}",
            f"{e.mfu:.1%}", f"{e.memory.total / GIB:.1f}", f"{b.get('bubble_s', 0.0) / e.step_time_s:.1%}",
            f"{comm / e.step_time_s:.1%}",
        )
    console.print(table)
    if result.rejected:
        rejected = ", ".join(f"{reason}: {count}" for reason, count in sorted(result.rejected.items(), key=lambda kv: -kv[1]))
        console.print(f"rejected {sum(result.rejected.values())} of {result.searched} plans — {rejected}")
    for line in getattr(result, "explanations", None) or []:
        console.print(f"  {line}")
    console.print(f"searched in {result.seconds:.3f} s (command {elapsed_s:.3f} s)")


def no_plan_message(result, model, cluster, num_devices: int) -> str:
    counts = ", ".join(f"{reason}: {count}" for reason, count in sorted(result.rejected.items(), key=lambda kv: -kv[1]))
    return (
        f"no feasible plan for {model.name} on {num_devices} x {cluster.device.name} "
        f"({cluster.device.memory_gib:g} GiB) among {result.searched} candidates ({counts or 'none'}); "
        f"add devices, free fixed plan fields, or lower the global batch size"
    )


def print_estimate(estimate, model, cluster, num_devices: int) -> None:
    from rich.table import Table

    console = _console()
    p = estimate.plan
    console.print(
        f"[bold]{model.name}[/bold] on {num_devices} x {cluster.device.name}: {_plan_label(p)}, micro-batch "
        f"{p.micro_batch_size} x {p.num_micro_batches}, {p.schedule}, SP {'on' if p.sequence_parallel else 'off'}, "
        f"recompute {p.recompute}, ZeRO-{p.zero_stage}"
    )
    console.print(
        f"predicted step {estimate.step_time_s:.3f} s, MFU {estimate.mfu:.1%}, HFU {estimate.hfu:.1%}, "
        f"{estimate.energy_per_token_j:.3g} J/token"
    )
    time_table = Table(title="where the time goes (per step, slowest stage)", title_justify="left")
    time_table.add_column("component")
    time_table.add_column("seconds", justify="right")
    time_table.add_column("share of step", justify="right")
    for key, value in estimate.breakdown.items():
        time_table.add_row(key, f"{value:.4f}", f"{value / estimate.step_time_s:.1%}")
    console.print(time_table)
    mem = estimate.memory
    mem_table = Table(title="memory per device (worst stage)", title_justify="left")
    mem_table.add_column("component")
    mem_table.add_column("GiB", justify="right")
    for key in MEMORY_KEYS:
        mem_table.add_row(key, f"{getattr(mem, key) / GIB:.2f}")
    mem_table.add_row("total", f"{mem.total / GIB:.2f}")
    mem_table.add_row("capacity", f"{mem.capacity / GIB:.2f}")
    console.print(mem_table)
    if not mem.fits:
        console.print(f"[red]does not fit: {mem.shortfall / GIB:.2f} GiB over[/red]")


def print_validation(report) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title="published runs: predicted vs measured step time", title_justify="left")
    for column in ("run", "group", "devices", "measured (s)", "predicted (s)", "error", "pred. MFU", "filled in"):
        table.add_column(column, justify="left" if column in ("run", "group", "filled in") else "right")
    for row in report.runs:
        r = _as_dict(row)
        chosen = r.get("chosen") or {}
        table.add_row(
            r["name"], r.get("group", ""), str(r.get("num_devices", "")), f"{r['measured_step_time_s']:.3f}",
            f"{r['predicted_step_time_s']:.3f}", f"{r['relative_error']:+.1%}",
            f"{r['predicted_mfu']:.1%}" if r.get("predicted_mfu") is not None else "",
            ", ".join(f"{k}={v}" for k, v in chosen.items()),
        )
    console.print(table)
    summary = _as_dict(report.summary)
    groups = summary.get("groups") or summary.get("per_group") or {}
    if groups:
        group_table = Table(title="by source", title_justify="left")
        for column in ("group", "runs", "median |error|", "max |error|"):
            group_table.add_column(column, justify="left" if column == "group" else "right")
        for name, g in groups.items():
            g = _as_dict(g)
            group_table.add_row(
                name, str(g.get("count", "")), f"{g.get('median_abs_relative_error', 0.0):.1%}",
                f"{g.get('max_abs_relative_error', 0.0):.1%}",
            )
        console.print(group_table)
    console.print(
        f"{summary['count']} runs: median |error| {summary['median_abs_relative_error']:.1%}, "
        f"max |error| {summary['max_abs_relative_error']:.1%}"
    )
