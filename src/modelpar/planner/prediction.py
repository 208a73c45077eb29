"""Predicted vs measured: the same six quantities from the planner and from a training run.

Keys (both sides, `COMPARED_KEYS`), all for the *worst rank*: the busiest one for times (most
compute, the rank the cost model's "slowest rank" describes), the fullest one for memory.

- step_time_s: one optimizer step. Measured: median over the steps after the first (warm-up),
  of the slowest rank.
- compute_s: forward/backward/recomputation of the rank's chunks, embedding, head and loss, and
  the optimizer step. Measured: the 'compute' and 'optimizer' spans of the schedule actions
  (`runtime.pipeline.Timeline`) minus the collectives timed inside them
  (`runtime.instrument.timed_collectives`). Predicted: `compute_s + optimizer_s` of the
  `planner.cost` breakdown.
- communication_s: collectives: tensor-parallel (inside the layers), the gradient synchronisation
  at the end of the step (data-parallel buckets, tied embeddings, sequence-parallel norms), ZeRO's
  reduce-scatter / all-gather and the loss all-reduce, plus launching pipeline sends. Measured:
  'collective' spans + 'grad_sync' spans (collectives nested in them counted once) + 'send',
  less the time each collective waited for the last member of its group to arrive (matched
  across ranks: `collective_waits`): that wait is idle time. Predicted:
  `tensor_parallel_comm_s + data_parallel_comm_s` (exposed).
- bubble_s: the rest of the step: time the rank waits for its pipeline neighbours (idle slots of
  the schedule, and the transfers it waits on: a receive wait cannot tell the two apart), for
  late peers in collectives, and per-step overhead. Measured: step - compute - communication.
  Predicted: `bubble_s + pipeline_p2p_s`.
- peak_memory_bytes: predicted `planner.memory.memory_per_device` of the fullest pipeline rank
  (fp32 weights, gradients and Adam moments for --dtype fp32; 16-bit mixed precision for bf16).
  Measured: CUDA allocator peak; on CPU, exact parameter + gradient + optimizer bytes plus the
  peak of the saved-for-backward activations over the schedule (`runtime.instrument`).
- activation_bytes_per_layer: saved-for-backward bytes of one layer and one micro-batch.
  Predicted: `planner.memory.activation_bytes_per_layer`; measured:
  `runtime.memory_probe.measure_activation_bytes_per_layer`.

relative_error[key] = predicted / measured - 1 (None when the measurement is 0).

This module is pure Python (no torch): the planner side and the arithmetic on the ranks' numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from modelpar.specs import ClusterSpec, ModelSpec, ParallelPlan, SpecError

COMPARED_KEYS = ("step_time_s", "compute_s", "communication_s", "bubble_s", "peak_memory_bytes",
                 "activation_bytes_per_layer")
COMPUTE_KINDS = ("compute", "optimizer")
SYNC_KINDS = ("grad_sync",)
SEND_KINDS = ("send",)
COLLECTIVE_KIND = "collective"
LAUNCH_KIND = "collective_launch"


# --- predicted -----------------------------------------------------------------------------------


def predict(model: ModelSpec, plan: ParallelPlan, cluster: ClusterSpec, dtype: str = "fp32") -> dict:
    """The planner's six numbers for a complete `plan` (module docstring), plus tokens/s, MFU and
    the full breakdown. Raises SpecError when the planner cannot cost the plan."""
    from modelpar.planner.cost import estimate, pipeline_profile, usable_memory_bytes
    from modelpar.planner.memory import FULL_FP32, MIXED_PRECISION, activation_bytes_per_layer, memory_per_device

    result = estimate(model, cluster, plan.world_size, plan)
    parts = result.breakdown
    precision = FULL_FP32 if dtype == "fp32" else MIXED_PRECISION
    in_flight = pipeline_profile(plan.schedule, plan.pipeline_parallel, plan.num_micro_batches,
                                 plan.virtual_stages)[1]
    memory = memory_per_device(model, plan, usable_memory_bytes(cluster.for_world_size(plan.world_size)),
                               in_flight, precision=precision)
    return {
        "step_time_s": result.step_time_s,
        "compute_s": parts["compute_s"] + parts["optimizer_s"],
        "communication_s": parts["tensor_parallel_comm_s"] + parts["data_parallel_comm_s"],
        "bubble_s": parts["bubble_s"] + parts["pipeline_p2p_s"],
        "peak_memory_bytes": memory.total,
        "activation_bytes_per_layer": activation_bytes_per_layer(
            model, plan.micro_batch_size, plan.tensor_parallel, bool(plan.sequence_parallel), plan.recompute,
            precision.activation_bytes),
        "tokens_per_s": plan.global_batch_size * model.seq_length / result.step_time_s,
        "mfu": result.mfu,
        "breakdown": dict(parts),
        "memory": {"parameters": memory.parameters, "gradients": memory.gradients,
                   "optimizer_states": memory.optimizer_states, "activations": memory.activations,
                   "embedding_and_logits": memory.embedding_and_logits},
    }


def try_predict(model: ModelSpec, plan: ParallelPlan, cluster: ClusterSpec | None, dtype: str,
                cluster_error: str | None = None) -> tuple[dict | None, str | None]:
    """(prediction, None), or (None, why there is none): no cluster, or the planner rejects a
    plan the runtime can still run."""
    if cluster is None:
        return None, cluster_error or "no cluster given"
    try:
        return predict(model, plan, cluster, dtype), None
    except SpecError as error:
        return None, f"the planner cannot cost this plan on '{cluster.name}': {error}"


# --- measured --------------------------------------------------------------------------------------


def _inside(event: tuple, spans: Sequence[tuple]) -> bool:
    start, end = event[0], event[1]
    return any(span[0] <= start and end <= span[1] for span in spans)


def collective_waits(events_by_rank: Sequence[Sequence[tuple]]) -> list[dict[int, float]]:
    """For one step: per rank, {index of a 'collective' event: seconds of it spent waiting for
    the last member of its group to arrive}. Events are (start, end, kind, label); equal labels on
    different ranks are the same collective (`runtime.instrument.timed_collectives`); a rank
    arrives when it launches the collective (its 'collective_launch' event for an asynchronous
    one, else the start of the span); all ranks share one clock (one machine's perf_counter)."""
    latest: dict[str, float] = {}
    for events in events_by_rank:
        arrived: dict[str, float] = {}
        for start, _, kind, label in events:
            if kind == LAUNCH_KIND or (kind == COLLECTIVE_KIND and label not in arrived):
                arrived[label] = start
        for label, start in arrived.items():
            latest[label] = max(latest.get(label, start), start)
    return [{index: max(0.0, min(latest[event[3]], event[1]) - event[0])
             for index, event in enumerate(events) if event[2] == COLLECTIVE_KIND}
            for events in events_by_rank]


def step_breakdown(events: Sequence[tuple], step_time_s: float, waits: dict[int, float] | None = None
                   ) -> dict[str, float]:
    """compute_s, communication_s, bubble_s of one rank's step from its (start, end, kind, label)
    events and the waits of its collectives (`collective_waits`; none: no waits). Collectives
    nested in compute spans move to communication; a collective's wait for a late peer is idle
    time (bubble); collectives nested in a gradient-sync span are counted by that span, less
    their waits."""
    waits = waits or {}
    compute_spans = [e for e in events if e[2] in COMPUTE_KINDS]
    sync_spans = [e for e in events if e[2] in SYNC_KINDS]
    compute = sum(e[1] - e[0] for e in compute_spans)
    communication = sum(e[1] - e[0] for e in events if e[2] in SYNC_KINDS or e[2] in SEND_KINDS)
    for index, event in enumerate(events):
        if event[2] != COLLECTIVE_KIND:
            continue
        duration, wait = event[1] - event[0], waits.get(index, 0.0)
        if _inside(event, sync_spans):
            communication -= wait
            continue
        if _inside(event, compute_spans):
            compute -= duration
        communication += duration - wait
    return {"compute_s": compute, "communication_s": communication,
            "bubble_s": step_time_s - compute - communication}


def rank_step_breakdowns(steps_by_rank: Sequence[Sequence[tuple[float, Sequence[tuple]]]]) -> list[list[dict]]:
    """Per rank, per step, `step_breakdown` with cross-rank collective waits; `steps_by_rank[r]`
    is rank r's list of (step seconds, events) for the same steps."""
    count = min(len(steps) for steps in steps_by_rank)
    result: list[list[dict]] = [[] for _ in steps_by_rank]
    for step in range(count):
        events = [steps[step][1] for steps in steps_by_rank]
        for rank, waits in enumerate(collective_waits(events)):
            step_time, rank_events = steps_by_rank[rank][step]
            result[rank].append(step_breakdown(rank_events, step_time, waits))
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
    from rich.table import Table

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


__all__ = ["COMPARED_KEYS", "print_comparison", "predict", "try_predict", "collective_waits", "step_breakdown", "rank_step_breakdowns",
           "rank_summary", "measured_times", "relative_errors"]
