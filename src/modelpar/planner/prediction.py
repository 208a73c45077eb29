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

The predicted step as a timeline (`predict_schedule`): what `modelpar simulate` draws and what
`modelpar train --png` puts above the measured step (`predict` carries it).

Source of truth: `planner.cost.estimate`, whose step is not a schedule simulation (its bubble is
the schedule's unit-time idle share times the mean rank time, and every pipeline transfer is on
the critical path). The timeline is built to show the estimate's numbers:

- the schedule's action lists are placed in time by `schedules.simulate.simulate` with the cost
  model's per-action durations (`cost.stage_times`: a chunk's layers, + the embedding on stage 0
  and the head on the last, each with its tensor-parallel collectives; the backward includes
  the recomputation), so a rank's forward + backward time is its compute + tensor-parallel time
  (tests/unit/test_timeline.py); every duration is stretched by the one factor that makes the
  busiest rank's the estimate's (1 unless ranks share a host's cores, `ClusterSpec.shares_cores`);
- the wait on each dependency between ranks (`PredictedSchedule.edge_s`, in place of the cost
  model's transfer time `ActionTimes.p2p_s`, which the list schedule mostly hides in slack) is
  fitted so that the pipeline lasts the estimate's compute + tensor-parallel + bubble + pipeline
  p2p of the busiest rank: its drawn busy time is then the estimate's compute, its idle time the
  estimate's bubble + p2p. Should the schedule be longer than that even without waits (unequal
  stages, processor sharing), edge_s is 0 and the pipeline part is compressed in time instead
  (`time_scale` < 1);
- after its last backward each rank spends the estimate's exposed data-parallel time in an
  "allreduce" event (ZeRO-3's per-micro-batch traffic lumped there too), and all ranks step the
  optimizer once the last of them is done (the global gradient norm synchronises them).

So `PredictedSchedule.step_time_s`, first forward to last optimizer end, is the estimate's step
(to rounding): the picture and the prediction table agree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from modelpar.planner import cost
from modelpar.planner.memory import MIXED_PRECISION, RUNTIME_PRECISION, Precision, activation_bytes_per_layer
from modelpar.schedules.actions import Action, build_schedule
from modelpar.schedules.events import ALLREDUCE_KIND, OPTIMIZER_KIND, TimelineEvent, events_from_simulation
from modelpar.schedules.simulate import PipelineSimulation, simulate
from modelpar.specs import ClusterSpec, ModelSpec, ParallelPlan, SpecError

FIT_TOLERANCE = 1e-12  # relative error of the fitted pipeline span
FIT_STEPS = 60


@dataclass(frozen=True)
class ActionTimes:
    """Seconds per micro-batch of each (pipeline rank, chunk)'s forward and backward, and of one
    transfer between stages; the data-parallel tail of the step."""

    forward_s: tuple[tuple[float, ...], ...]   # [rank][chunk]
    backward_s: tuple[tuple[float, ...], ...]  # [rank][chunk]
    p2p_s: float
    grad_sync_s: float   # exposed data-parallel communication after a rank's last backward (0 for d = 1)
    optimizer_s: float


@dataclass(frozen=True)
class PredictedSchedule:
    """The simulated step of a plan (module docstring): the pipeline simulation, its events (with
    the data-parallel and optimizer tail), the durations used and the estimate it shows."""

    plan: ParallelPlan
    times: ActionTimes
    simulation: PipelineSimulation
    events: tuple[TimelineEvent, ...]  # forward/backward + allreduce + optimizer, per pipeline rank
    step_time_s: float                 # first forward start to last optimizer end: the estimate's step
    estimate: cost.StepEstimate
    edge_s: float                      # simulated wait per dependency between ranks (fitted)
    time_scale: float                  # drawn pipeline time / simulated time (1 unless compressed)


def action_times(
    model: ModelSpec, cluster: ClusterSpec, plan: ParallelPlan, grad_sync_s: float = 0.0, optimizer_s: float = 0.0
) -> ActionTimes:
    """Per-(rank, chunk) forward/backward seconds and the transfer time (see module docstring);
    `grad_sync_s` and `optimizer_s` (the step's tail) are passed through."""
    t, p, v = plan.tensor_parallel, plan.pipeline_parallel, plan.virtual_stages
    b = plan.micro_batch_size
    sp = bool(plan.sequence_parallel) and t > 1
    stages = cost.stage_times(model, cluster, t, p, v, b, sp, plan.recompute)

    def per_rank(seconds) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(seconds(stages[chunk * p + rank]) for chunk in range(v)) for rank in range(p))

    forward = per_rank(lambda stage: stage.compute_forward + stage.comm_forward)
    backward = per_rank(lambda stage: stage.compute_backward + stage.comm_backward)
    p2p = cost.p2p_per_transfer(model, cluster, b, t, p, sp)
    return ActionTimes(forward, backward, p2p, grad_sync_s, optimizer_s)


def predict_schedule(
    model: ModelSpec, cluster: ClusterSpec, plan: ParallelPlan, num_devices: int | None = None,
    precision: Precision = MIXED_PRECISION,
) -> PredictedSchedule:
    """Estimate one step of a complete `plan` (memory with `precision`) and build its timeline
    (module docstring). Raises SpecError if the plan cannot run."""
    cluster = cluster.for_world_size(num_devices or plan.world_size)  # once, for the estimate and the actions
    step_estimate = cost.estimate(model, cluster, num_devices or plan.world_size, plan, precision)
    parts = step_estimate.breakdown
    times = action_times(model, cluster, plan, parts["data_parallel_comm_s"],
                         parts["optimizer_s"])
    actions = build_schedule(plan.schedule, plan.pipeline_parallel, plan.num_micro_batches, plan.virtual_stages)
    busiest = plan.num_micro_batches * max(sum(f) + sum(b) for f, b in zip(times.forward_s, times.backward_s))
    stretch = (parts["compute_s"] + parts["tensor_parallel_comm_s"]) / busiest
    simulation, edge_s, time_scale = _fit_pipeline(
        actions, lambda rank, action: stretch * times.forward_s[rank][action.chunk],
        lambda rank, action: stretch * times.backward_s[rank][action.chunk],
        step_estimate.step_time_s - times.grad_sync_s - times.optimizer_s)
    events = [replace(e, start_s=e.start_s * time_scale, end_s=e.end_s * time_scale) if time_scale != 1.0 else e
              for e in events_from_simulation(simulation)]
    rank_end = [max(e.end_s for e in events if e.rank == rank) for rank in range(plan.pipeline_parallel)]
    if times.grad_sync_s > 0:
        events += [TimelineEvent(rank, "gradient all-reduce", ALLREDUCE_KIND, end, end + times.grad_sync_s)
                   for rank, end in enumerate(rank_end)]
        rank_end = [end + times.grad_sync_s for end in rank_end]
    optimizer_start = max(rank_end)
    step_end = optimizer_start + times.optimizer_s
    if times.optimizer_s > 0:
        events += [TimelineEvent(rank, "optimizer step", OPTIMIZER_KIND, optimizer_start, step_end)
                   for rank in range(plan.pipeline_parallel)]
    step_start = min(e.start_s for e in events)
    return PredictedSchedule(plan, times, simulation, tuple(events), step_end - step_start, step_estimate,
                             edge_s, time_scale)


def _fit_pipeline(actions: list[list[Action]], forward, backward, span_s: float
                  ) -> tuple[PipelineSimulation, float, float]:
    """(simulation, edge seconds, time scale) of `actions` lasting `span_s` (module docstring).

    With a fixed order per rank the makespan is the longest path of the dependency graph: a
    convex, piecewise-linear, non-decreasing function of the edge wait. Newton's method from a
    wait that is surely too long (the first forward's path to the last backward crosses ranks at
    least twice) approaches the root from above (the slope is a left difference) and lands on it
    once on its linear piece."""
    def run(edge: float) -> PipelineSimulation:
        return simulate(actions, forward, backward, p2p_time=edge)

    simulation = run(0.0)
    if len(actions) == 1 or simulation.makespan >= span_s:
        return simulation, 0.0, span_s / simulation.makespan if simulation.makespan > 0 else 1.0
    edge = span_s / 2
    simulation = run(edge)
    for _ in range(FIT_STEPS):
        excess = simulation.makespan - span_s
        if abs(excess) <= FIT_TOLERANCE * span_s:
            break
        probe = min(edge, span_s * 1e-9)
        slope = (simulation.makespan - run(edge - probe).makespan) / probe
        if slope <= 0:
            break
        edge -= excess / slope
        simulation = run(edge)
    return simulation, edge, 1.0


COMPARED_KEYS = ("step_time_s", "compute_s", "communication_s", "bubble_s", "peak_memory_bytes",
                 "activation_bytes_per_layer")


def predict(model: ModelSpec, plan: ParallelPlan, cluster: ClusterSpec, dtype: str = "fp32") -> dict:
    """The planner's six numbers for a complete `plan` (module docstring), plus tokens/s, MFU, the
    full breakdown, the memory parts and `events`: the predicted step's timeline
    (`schedules.events.TimelineEvent`s, what `modelpar train --png` draws). Raises SpecError when
    the planner cannot cost the plan.

    One estimate (`planner.cost.estimate`, the source of truth) and one simulation built from it
    (`predict_schedule`): the drawn step lasts the reported
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
