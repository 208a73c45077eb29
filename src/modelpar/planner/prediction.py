"""Predicted vs measured: the same six quantities from the planner and from a training run.

Keys (both sides, `COMPARED_KEYS`), all for the *worst rank*: the busiest one for times (most
compute, the rank the cost model's "slowest rank" describes), the fullest one for memory.

- step_time_s: one optimizer step. Measured: median over the steps after the first (warm-up),
  of the slowest rank. Predicted: `planner.cost.estimate`'s step.
- compute_s: forward/backward/recomputation of the rank's chunks, embedding, head and loss, and
  the optimizer step. Measured: the forward, backward and optimizer spans of the runtime's
  timeline (`runtime.timeline.Timeline`) minus the collectives timed inside them
  (`runtime.instrument.timed_collectives`). Predicted: `compute_s + optimizer_s` of the
  `planner.cost` breakdown.
- communication_s: collectives: tensor-parallel (inside the layers), the gradient synchronisation
  at the end of the step (data-parallel buckets, tied embeddings, sequence-parallel norms), ZeRO's
  reduce-scatter / all-gather and the loss all-reduce, plus launching pipeline sends. Measured:
  'collective' spans + 'grad_sync' spans (collectives nested in them counted once) + 'send',
  less the time each collective waited for the last member of its group to arrive
  (`report.comparison.collective_waits`): that wait is idle time. Predicted:
  `tensor_parallel_comm_s + data_parallel_comm_s` (exposed).
- bubble_s: the rest of the step: time the rank waits for its pipeline neighbours (idle slots of
  the schedule, and the transfers it waits on: a receive wait cannot tell the two apart), for
  late peers in collectives, and per-step overhead. Measured: step - compute - communication.
  Predicted: `bubble_s + pipeline_p2p_s`.
- peak_memory_bytes: predicted `planner.memory.memory_per_device` of the fullest pipeline rank,
  with the bytes per parameter the runtime's --dtype really uses (`planner.memory.RUNTIME_PRECISION`:
  fp32 weights, gradients and Adam moments for fp32; bf16 weights with fp32 main gradients,
  master weights and moments for bf16, 18 bytes per parameter). Measured: CUDA allocator peak; on
  CPU, exact parameter + gradient + optimizer bytes plus the peak of the saved-for-backward
  activations over the schedule (`runtime.instrument`).
- activation_bytes_per_layer: saved-for-backward bytes of one layer and one micro-batch.
  Predicted: `planner.memory.activation_bytes_per_layer`; measured:
  `models.memory_probe.measure_activation_bytes_per_layer`.

The measured side, the relative errors and the comparison table are `report.comparison`.
This module is pure Python (no torch).
"""

from __future__ import annotations

from modelpar.planner.memory import RUNTIME_PRECISION, activation_bytes_per_layer
from modelpar.planner.schedule_prediction import predict_schedule
from modelpar.specs import ClusterSpec, ModelSpec, ParallelPlan, SpecError

COMPARED_KEYS = ("step_time_s", "compute_s", "communication_s", "bubble_s", "peak_memory_bytes",
                 "activation_bytes_per_layer")


def predict(model: ModelSpec, plan: ParallelPlan, cluster: ClusterSpec, dtype: str = "fp32") -> dict:
    """The planner's six numbers for a complete `plan` (module docstring), plus tokens/s, MFU, the
    full breakdown, the memory parts and `events`: the predicted step's timeline
    (`schedules.events.TimelineEvent`s, what `modelpar train --png` draws). Raises SpecError when
    the planner cannot cost the plan.

    One estimate (`planner.cost.estimate`, the source of truth) and one simulation built from it
    (`planner.schedule_prediction.predict_schedule`): the drawn step lasts the reported
    step_time_s, its busiest rank computes compute_s - optimizer_s (plus the tensor-parallel part
    of communication_s) and idles bubble_s."""
    precision = RUNTIME_PRECISION[dtype]
    schedule = predict_schedule(model, cluster, plan, precision=precision)
    result, memory = schedule.estimate, schedule.estimate.memory
    parts = result.breakdown
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
        "events": list(schedule.events),
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
