"""Predict published training runs and compare with their measured step times.

Each run of `published_runs.json` (shipped as `modelpar/specs/validation/`, format: its README.md) gives a
model, a cluster (preset name or inline object), a device count, a partial plan (null = the
source did not say) and the measured seconds per step. The run's plan has no schedule: it is
'interleaved' when virtual_stages > 1 and unknown otherwise. `validate_runs` fills the unknowns
with the planner's own best choice (`search.search` over the nulls only), predicts the step time
and reports relative_error = predicted / measured - 1, per run and summarised per source.

Nothing here is specific to a run or a source: every run goes through the same search and the
same cost model with the same constants (`planner/constants.py`).
"""

from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpar.planner.search import search
from modelpar.specs.cluster import ClusterSpec
from modelpar.specs.errors import SpecError
from modelpar.specs.io import from_dict, load_cluster, read_json
from modelpar.specs.model import ModelSpec
from modelpar.specs.plan import PLAN_FIELDS, ParallelPlan

@dataclass(frozen=True)
class ValidationRow:
    """One run: what was predicted, what was measured, and what the planner filled in."""

    name: str
    group: str
    predicted_step_time_s: float
    measured_step_time_s: float
    relative_error: float
    predicted_mfu: float
    measured_mfu: float | None
    chosen: dict[str, Any] = field(compare=False)
    plan: ParallelPlan | None = None
    breakdown: dict[str, float] = field(default_factory=dict, compare=False)
    error: str | None = None  # why no prediction was possible (then the numbers are NaN)

    def to_dict(self) -> dict:
        """JSON-ready: the numbers of a failed run are null (not NaN)."""
        def number(value: float) -> float | None:
            return None if value != value else value

        return {
            "name": self.name, "group": self.group, "predicted_step_time_s": number(self.predicted_step_time_s),
            "measured_step_time_s": self.measured_step_time_s, "relative_error": number(self.relative_error),
            "predicted_mfu": number(self.predicted_mfu), "measured_mfu": self.measured_mfu, "chosen": self.chosen,
            "plan": self.plan.to_dict() if self.plan else None, "breakdown": self.breakdown, "error": self.error,
        }


@dataclass(frozen=True)
class ValidationReport:
    runs: list[ValidationRow]
    summary: dict[str, Any]

    def to_dict(self) -> dict:
        return {"runs": [row.to_dict() for row in self.runs], "summary": self.summary}


def validate_runs(path_or_data: str | os.PathLike | dict | list | None = None) -> ValidationReport:
    """Predict every run of a published-runs file (path, parsed document, or list of runs; None:
    the packaged published runs, `default_runs_path()`)."""
    if path_or_data is None:
        path_or_data = default_runs_path()
    data = read_json(path_or_data) if isinstance(path_or_data, (str, os.PathLike)) else path_or_data
    runs = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(runs, list) or not runs:
        raise SpecError("validation file: expected {'runs': [...]} with at least one run")
    groups = _group_labels(runs)
    rows = [_predict(run, groups[index]) for index, run in enumerate(runs)]
    return ValidationReport(runs=rows, summary=summarise(rows))


def summarise(rows: list[ValidationRow]) -> dict[str, Any]:
    """count, median and max |relative error|, and per group the count and median."""
    predicted = [row for row in rows if row.error is None]
    errors = [abs(row.relative_error) for row in predicted]
    per_group: dict[str, dict[str, float]] = {}
    for group in dict.fromkeys(row.group for row in predicted):
        members = [abs(row.relative_error) for row in predicted if row.group == group]
        per_group[group] = {
            "count": len(members),
            "median_abs_relative_error": statistics.median(members),
            "max_abs_relative_error": max(members),
        }
    return {
        "count": len(predicted),
        "failed": len(rows) - len(predicted),
        "median_abs_relative_error": statistics.median(errors) if errors else float("nan"),
        "max_abs_relative_error": max(errors) if errors else float("nan"),
        "per_group": per_group,
    }


# --- one run -----------------------------------------------------------------------------------


def run_inputs(run: dict) -> tuple[ModelSpec, ClusterSpec, int, ParallelPlan]:
    """(model, cluster, devices, partial plan) of one run record."""
    name = run.get("name", "run")
    model = from_dict(ModelSpec, {**run["model"], "name": name}, f"{name}.model")
    cluster_data = run["cluster"]
    cluster = load_cluster(cluster_data) if isinstance(cluster_data, str) else from_dict(
        ClusterSpec, cluster_data, f"{name}.cluster"
    )
    plan_data = dict(run["plan"])
    if plan_data.get("context_parallel") is None:
        plan_data["context_parallel"] = 1  # only 1 is supported; null means "not used"
    if "schedule" not in plan_data:
        virtual = plan_data.get("virtual_stages")
        plan_data["schedule"] = "interleaved" if virtual is not None and virtual > 1 else None
    plan = from_dict(ParallelPlan, plan_data, f"{name}.plan")
    return model, cluster, int(run["num_devices"]), plan


def _predict(run: dict, group: str) -> ValidationRow:
    name = run.get("name", "run")
    measured = run["measured"]
    measured_s = float(measured["step_time_s"])
    try:
        model, cluster, devices, partial = run_inputs(run)
        result = search(model, cluster, devices, partial, top=1)
        if not result.plans:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(result.rejected.items()))
            raise SpecError(f"no feasible plan ({reasons})")
    except SpecError as error:
        nan = float("nan")
        return ValidationRow(name, group, nan, measured_s, nan, nan, measured.get("mfu"), {}, error=str(error))
    best = result.plans[0]
    chosen = {key: getattr(best.plan, key) for key in PLAN_FIELDS if getattr(partial, key) is None}
    return ValidationRow(
        name=name,
        group=group,
        predicted_step_time_s=best.step_time_s,
        measured_step_time_s=measured_s,
        relative_error=best.step_time_s / measured_s - 1.0,
        predicted_mfu=best.mfu,
        measured_mfu=measured.get("mfu"),
        chosen=chosen,
        plan=best.plan,
        breakdown=dict(best.breakdown),
    )


def _group_labels(runs: list[dict]) -> list[str]:
    """Group = the run's source; labelled by the name tokens all its runs share, up to the first
    token that starts with a digit or has two characters or fewer (a size, 't1', 'gt'):
    'narayanan21', 'megatron_readme_h100', 'vtrain', ..."""
    names_by_source: dict[str, list[list[str]]] = {}
    for run in runs:
        names_by_source.setdefault(run.get("source", run.get("name", "")), []).append(run.get("name", "run").split("_"))
    labels = {}
    for source, names in names_by_source.items():
        shared = []
        for tokens in zip(*names):
            if len(set(tokens)) > 1 or re.match(r"\d", tokens[0]) or len(tokens[0]) <= 2:
                break
            shared.append(tokens[0])
        labels[source] = "_".join(shared) or names[0][0]
    return [labels[run.get("source", run.get("name", ""))] for run in runs]


def default_runs_path() -> Path:
    """The published runs shipped with the package: `modelpar/specs/validation/published_runs.json`
    (a copy of `shared/validation/published_runs.json`; format: that folder's README.md)."""
    return Path(__file__).resolve().parents[1] / "specs" / "validation" / "published_runs.json"
