"""Search the plans of a model on a cluster: enumerate, reject, cost, rank.

Enumerated (only the fields a partial plan leaves None): t among the divisors of the devices
within a node (across nodes only when the partial plan fixes it), p among the divisors of N / t,
d = N / (t p), b among the divisors of B / d, v among the divisors of L / p (interleaved; 1F1B and
GPipe with v = 1), sequence parallelism with t > 1, every recompute mode, ZeRO 0-3 with d > 1.
Each candidate breaking a rule of `specs.plan` is counted under that rule's reason
(`SearchResult.rejected`), by calling the same rule functions as `ParallelPlan.check`; the rest
are costed.
Memory is checked before the step time (`_memory_total` decomposes `memory.memory_per_device`
so that a candidate costs a few arithmetic operations; a unit test checks it equals the real
thing). Step times come from `cost.step_time_parts`, whose pieces are cached on the plan fields
they depend on, so a candidate never re-derives a layer; candidates use the closed-form bubble
of their schedule, which the simulation of its action lists reproduces exactly (tested), so
that no candidate waits for a simulation. The best `top` survivors are then estimated in full
with `cost.estimate`, which simulates their schedules.

Listing rule: a higher ZeRO stage only buys memory, so of the candidates that differ only in
their ZeRO stage, only the fastest one that fits is listed (the lowest stage on a tie: ZeRO-1/2
move what the all-reduce moves); GPipe, which costs what 1F1B costs with more memory, is listed
only where it is faster. All of them are still counted in `searched`.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from dataclasses import dataclass

from modelpar.caching import memo
from modelpar.planner.cost import (
    BREAKDOWN_KEYS,
    HIDDEN_KEYS,
    INSIDE_COMPUTE_KEYS,
    StepEstimate,
    estimate,
    pipeline_profile,
    step_time_parts,
    usable_memory_bytes,
)
from modelpar.planner.memory import (
    MIXED_PRECISION,
    activation_bytes_per_layer,
    model_state_bytes_per_parameter,
    stage_parameters,
)
from modelpar.specs.cluster import ClusterSpec
from modelpar.specs.errors import SpecError
from modelpar.specs.model import ModelSpec
from modelpar.specs import plan as rules
from modelpar.specs.plan import RECOMPUTE_MODES, ParallelPlan

REASON_MEMORY = "out of memory"


@dataclass(frozen=True)
class SearchResult:
    """Ranked feasible plans (best first), rejected candidates by reason, how many candidates
    were examined and how long the search took."""

    plans: list[StepEstimate]
    rejected: dict[str, int]
    searched: int
    seconds: float


def divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def search(
    model: ModelSpec,
    cluster: ClusterSpec,
    num_devices: int,
    partial_plan: ParallelPlan | None = None,
    global_batch_size: int | None = None,
    top: int = 10,
) -> SearchResult:
    """Best `top` plans by predicted step time; the fields set in `partial_plan` stay fixed."""
    started = time.perf_counter()
    partial = partial_plan or ParallelPlan()
    batch = _global_batch(partial, global_batch_size)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise SpecError(f"devices must be a positive integer, got {num_devices!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise SpecError(f"top must be a positive integer, got {top!r}")
    cluster = cluster.for_world_size(num_devices)  # once: memory capacity and step times alike
    rejected: Counter[str] = Counter()
    searched = 0
    best: list[tuple[float, int, tuple]] = []  # max-heap by time (negated) of the `top` best
    order = 0
    capacity = usable_memory_bytes(cluster)

    for t in _tensor_candidates(model, cluster, num_devices, partial, rejected):
        for p in _pipeline_candidates(model, num_devices, t, partial, rejected):
            d = num_devices // (t * p)
            if rules.batch_rule(batch, None, d):
                rejected[rules.DP_BATCH] += 1
                continue
            states = _StateMemory(model, t, p, d)
            for b in [partial.micro_batch_size] if partial.micro_batch_size else divisors(batch // d):
                if rules.batch_rule(batch, b, d):
                    rejected[rules.MB_BATCH] += 1
                    continue
                m = batch // (b * d)
                for v, schedule in _schedule_candidates(model, t, p, m, partial, rejected):
                    searched_here, kept = _cost_variants(
                        model, cluster, partial, t, p, d, b, m, v, schedule, states, capacity, rejected
                    )
                    searched += searched_here
                    for step, variant in kept:
                        order += 1
                        item = (-step, -order, variant)
                        if len(best) < top:
                            heapq.heappush(best, item)
                        elif step < -best[0][0]:
                            heapq.heapreplace(best, item)

    ranked = sorted(best, key=lambda item: (-item[0], -item[1]))
    plans = [
        estimate(model, cluster, num_devices, _plan(variant, batch)) for _, _, variant in ranked
    ]
    searched += sum(count for reason, count in rejected.items() if reason not in _VARIANT_REASONS)
    return SearchResult(plans=plans, rejected=dict(rejected), searched=searched, seconds=time.perf_counter() - started)


# `searched` counts every complete candidate the variant loop examines (these two reasons are
# among them) plus one for each rejected branch (a t, p, b or schedule that cannot work).
_VARIANT_REASONS = (REASON_MEMORY, rules.SP_SEQ, rules.SP_TENSOR)


def _global_batch(partial: ParallelPlan, global_batch_size: int | None) -> int:
    if global_batch_size is not None and partial.global_batch_size is not None:
        if global_batch_size != partial.global_batch_size:
            raise SpecError(
                f"global batch size given twice: {global_batch_size} and the plan's {partial.global_batch_size}; "
                "give one"
            )
    batch = global_batch_size if global_batch_size is not None else partial.global_batch_size
    if batch is None:
        raise SpecError("global_batch_size is not set; pass --global-batch-size or set it in the plan")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise SpecError(f"global_batch_size must be a positive integer, got {batch!r}")
    return batch


def _tensor_candidates(model, cluster, num_devices, partial, rejected) -> list[int]:
    """Tensor degrees: the partial plan's, else the divisors of the devices within a node."""
    fixed = partial.tensor_parallel is not None
    kept = []
    for t in [partial.tensor_parallel] if fixed else divisors(num_devices):
        reason = rules.tensor_rule(model, t)
        if reason is None and not fixed and rules.tensor_spans_nodes(t, cluster.devices_per_node):
            reason = rules.TP_NODE
        if reason is None:
            kept.append(t)
        else:
            rejected[reason] += 1
    return kept


def _pipeline_candidates(model, num_devices, t, partial, rejected) -> list[int]:
    """Pipeline degrees: the partial plan's, else N / (t d) for a fixed d, else the divisors of N / t."""
    d = partial.data_parallel
    if rules.devices_rule(t, None, None, num_devices):
        rejected[rules.DEVICES] += 1
        return []
    if d is not None and rules.devices_rule(t, None, d, num_devices):  # N / (t d) is not a whole pipeline
        rejected[rules.WORLD_SIZE] += 1
        return []
    if partial.pipeline_parallel is not None:
        candidates = [partial.pipeline_parallel]
    elif d is not None:
        candidates = [num_devices // (t * d)]
    else:
        candidates = [p for p in divisors(num_devices // t) if p <= model.num_layers]
    kept = []
    for p in candidates:
        reason = (rules.devices_rule(t, p, None, num_devices) or rules.devices_rule(t, p, d, num_devices)
                  or rules.layers_rule(model, p))
        if reason is None:
            kept.append(p)
        else:
            rejected[reason] += 1
    return kept


def _schedule_candidates(model, t, p, m, partial, rejected) -> list[tuple[int, str]]:
    """(v, schedule) pairs: the partial plan's, else v = 1 with 1F1B / GPipe and every v > 1 that
    divides the layers with the interleaved schedule."""
    if partial.virtual_stages is not None:
        stages = [partial.virtual_stages]
    elif partial.schedule is not None and partial.schedule != "interleaved":
        stages = [1]
    else:
        stages = [1] if p == 1 else divisors(model.num_layers // p)
    kept = []
    for v in stages:
        reason = rules.layers_rule(model, p, v)
        if reason is not None:
            rejected[reason] += 1
            continue
        if partial.schedule is not None:
            schedules = [partial.schedule]
        else:
            schedules = ["interleaved"] if v > 1 else (["1f1b", "gpipe"] if p > 1 else ["1f1b"])
        for schedule in schedules:
            reason = rules.schedule_rule(schedule, p, v, m)
            if reason is None:
                kept.append((v, schedule))
            else:
                rejected[reason] += 1
    return kept


class _StateMemory:
    """Model-state bytes (weights + gradients + Adam) of pipeline ranks 0, 1 and p - 1 per ZeRO stage."""

    def __init__(self, model: ModelSpec, t: int, p: int, d: int) -> None:
        ranks = sorted({0, min(1, p - 1), p - 1})
        params = {rank: stage_parameters(model, t, p, rank) for rank in ranks}
        self.ranks = ranks
        self.by_zero = {
            zero: {rank: params[rank] * per_parameter for rank in ranks}
            for zero in (0, 1, 2, 3)
            for per_parameter in [sum(model_state_bytes_per_parameter(zero, d, MIXED_PRECISION))]
        }


@memo(16384)
def _activation_memory(model, t, b, sp, recompute) -> tuple[float, float]:
    """(stored bytes per layer and micro-batch, recomputation working set) as `memory.py` counts them."""
    act = MIXED_PRECISION.activation_bytes
    per_layer = activation_bytes_per_layer(model, b, t, sp, recompute, act)
    working = activation_bytes_per_layer(model, b, t, sp, "none", act) - per_layer if recompute != "none" else 0.0
    return per_layer, working


def _memory_total(model, t, p, v, b, sp, schedule, in_flight, per_layer, working, state_bytes, ranks) -> float:
    """Bytes on the fullest of ranks 0, 1, p - 1: `memory.memory_per_device(...).total`, decomposed
    (ranks in the middle hold fewer in-flight micro-batches than rank 1 and no buffers)."""
    layers_per_chunk = model.num_layers // (p * v)
    tokens = model.seq_length * b
    replicated = 1.0 / t if sp else 1.0
    worst = 0.0
    for rank in ranks:
        total = state_bytes[rank] + in_flight[rank] * layers_per_chunk * per_layer + working
        if rank == 0 and model.dropout > 0.0:
            total += math.ceil(in_flight[rank] / v) * tokens * model.hidden_size * replicated
        if rank == p - 1:
            micro_batches = in_flight[rank] if schedule == "gpipe" else 1
            head_inputs = 2 * tokens * model.hidden_size * MIXED_PRECISION.activation_bytes * replicated
            total += micro_batches * (head_inputs + 4.0 * tokens * model.vocab_size / t)
        worst = max(worst, total)
    return worst


def _cost_variants(model, cluster, partial, t, p, d, b, m, v, schedule, states, capacity, rejected):
    """Cost the sequence-parallel x recompute x ZeRO variants of one (t, p, d, b, v, schedule);
    returns (candidates examined, [(step, variant)] kept after the tie rule)."""
    in_flight = pipeline_profile(schedule, p, m, v, simulate=False)[1]
    if partial.sequence_parallel is not None:
        sp_options = [partial.sequence_parallel]
    else:
        sp_options = [False, True] if t > 1 else [False]
    recompute_options = [partial.recompute] if partial.recompute is not None else list(RECOMPUTE_MODES)
    if partial.zero_stage is not None:
        zero_options = [partial.zero_stage]
    else:
        zero_options = [0, 1, 2, 3] if d > 1 else [0]
    examined = 0
    kept = []
    for sp in sp_options:
        reason = rules.sequence_rule(model, t, sp)
        if reason is not None:
            rejected[reason] += len(recompute_options) * len(zero_options)
            examined += len(recompute_options) * len(zero_options)
            continue
        for recompute in recompute_options:
            per_layer, working = _activation_memory(model, t, b, sp, recompute)
            best_step, best_variant = None, None
            for zero in zero_options:
                examined += 1
                total = _memory_total(model, t, p, v, b, sp, schedule, in_flight, per_layer, working,
                                      states.by_zero[zero], states.ranks)
                if total > capacity:
                    rejected[REASON_MEMORY] += 1
                    continue
                step = step_time_parts(model, cluster, t, p, d, v, b, m, sp, recompute, zero, schedule, False)[0]
                if best_step is None or step < best_step * (1 - 1e-12):  # a tie keeps the lower stage
                    best_step, best_variant = step, (t, p, d, v, b, sp, recompute, zero, schedule)
            if best_variant is not None:
                if schedule == "gpipe" and partial.schedule is None and _ties_with_1f1b(
                    model, cluster, t, p, d, v, b, m, sp, recompute, best_variant[7], best_step
                ):
                    continue
                kept.append((best_step, best_variant))
    return examined, kept


def _ties_with_1f1b(model, cluster, t, p, d, v, b, m, sp, recompute, zero, step) -> bool:
    """GPipe is listed only when it is faster than 1F1B (which it never is with uniform stages)."""
    other = step_time_parts(model, cluster, t, p, d, v, b, m, sp, recompute, zero, "1f1b", False)[0]
    return other <= step * (1 + 1e-12)


def _plan(variant: tuple, batch: int) -> ParallelPlan:
    t, p, d, v, b, sp, recompute, zero, schedule = variant
    return ParallelPlan(
        tensor_parallel=t, pipeline_parallel=p, data_parallel=d, context_parallel=1, virtual_stages=v,
        micro_batch_size=b, global_batch_size=batch, sequence_parallel=sp, recompute=recompute, zero_stage=zero,
        schedule=schedule,
    )


# --- explanations ------------------------------------------------------------------------------


def explain_rejections(result: SearchResult) -> str:
    """One line per rejection reason, most frequent first."""
    if not result.rejected:
        return f"{result.searched} candidates examined, none rejected"
    lines = [f"{result.searched} candidates examined; rejected:"]
    for reason, count in sorted(result.rejected.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"  {count:>7}  {reason}")
    return "\n".join(lines)


def explain_losers(result: SearchResult) -> list[str]:
    """For each plan after the best: how much slower it is and which breakdown part explains most."""
    if not result.plans:
        return []
    best = result.plans[0]
    lines = []
    for rank, other in enumerate(result.plans[1:], start=2):
        gap = other.step_time_s - best.step_time_s
        deltas = {key: other.breakdown[key] - best.breakdown[key] for key in BREAKDOWN_KEYS
                  if key not in INSIDE_COMPUTE_KEYS + HIDDEN_KEYS}
        key, delta = max(deltas.items(), key=lambda item: item[1])
        relative = gap / best.step_time_s
        if delta <= 0:
            lines.append(f"#{rank} {other.plan.describe()}: {100 * relative:.1f}% slower")
            continue
        lines.append(
            f"#{rank} {other.plan.describe()}: {100 * relative:.1f}% slower; "
            f"{key.removesuffix('_s').replace('_', ' ')} +{delta:.3g} s "
            f"({other.breakdown[key]:.3g} s vs {best.breakdown[key]:.3g} s)"
        )
    return lines
