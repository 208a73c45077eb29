"""Step time, utilisation, energy and memory of one complete plan.

One optimizer step of a t x p x d plan with m = B / (b d) micro-batches per pipeline (v model
chunks per pipeline rank) is modelled as

    step = m x (slowest rank's compute + tensor-parallel communication per micro-batch)
         + bubble + exposed pipeline p2p + exposed data-parallel communication + optimizer step

- compute (`compute.py`): per layer and micro-batch, forward, backward (2x the forward GEMMs)
  and the recomputed forward (full: the whole layer; selective: the attention core), on the
  layers of the rank's chunks; the first rank adds the embedding, the last the logits and the
  loss. The slowest rank sets the pace.
- tensor-parallel communication (`comm.py`), per layer and micro-batch, on the critical path
  (Megatron-LM issues it synchronously between the GEMMs): without sequence parallelism two
  all-reduces of the [s, b, h] activation in the forward and two in the backward (Shoeybi et al.
  2019, Fig. 3: g and f); with sequence parallelism each becomes an all-gather + reduce-scatter of
  the same total volume (Korthikanti et al. 2022, Sec. 4.2.2). Full recomputation repeats the
  forward's. The backward re-gathers the sequence-parallel input for the weight gradient;
  Megatron overlaps that with the input-gradient GEMM, so it is not counted, except on CPU ranks
  of a profiled host (`ClusterSpec.host_cores`), where gloo's copies need the cores the GEMM uses.
  The first rank adds the vocabulary-parallel embedding's all-reduce, the last the output layer's
  input-gradient all-reduce and the vocabulary-parallel cross-entropy's three small all-reduces
  (`tensor_comm_edges`).
- bubble: the schedule's idle share f from the simulation of its real action lists
  (`schedules.simulate`; the equal closed form for long schedules and inside the search):
  bubble = f / (1 - f) x m x (mean rank time per micro-batch), e.g. f = (p - 1)/(m + p - 1) for
  1F1B, (p - 1)/(v m + p - 1) interleaved. Memory uses the schedule's peak in-flight
  (chunk, micro-batch) pairs per rank.
- pipeline p2p: each (chunk, micro-batch) receives its input and sends its output in the forward
  and the same in the backward; Megatron's blocking send/receive pairs put one transfer per
  direction on the critical path: 2 (v m + p - 1) transfers of b s h / t values (the
  scatter/gather optimisation of Narayanan et al. 2021 Sec. 4.1: each tensor rank sends 1/t,
  the receiving stage all-gathers over NVLink; with sequence parallelism the activation is already
  split and nothing is gathered).
- data parallelism (first pipeline rank: it holds the embedding and finishes its backward
  last): ZeRO-0 all-reduces the gradients over the d replicas, ZeRO-1/2 reduce-scatter them and
  all-gather the updated weights, ZeRO-3 also gathers each layer's weights in every pass of every
  micro-batch (Rajbhandari et al. 2020; `data_parallel_work`); what the bucketed overlap of
  PyTorch DDP / DeepSpeed / Megatron-LM leaves exposed is `data_parallel_exposure`.
  Tensor-parallel and pipeline communication are never overlapped (above).
- optimizer: Adam over the local (ZeRO-sharded) parameters, memory-bound.

MFU counts model FLOPs (no recomputation), HFU hardware FLOPs, both from `planner.flops`.
Energy = device power x devices x step time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelpar.caching import memo
from modelpar.planner import comm, compute, flops, shared_host
from modelpar.planner.constants import GRADIENT_BYTES, USABLE_MEMORY_FRACTION
from modelpar.planner.memory import MIXED_PRECISION, MemoryBreakdown, Precision, memory_per_device, stage_parameters
from modelpar.schedules.simulate import bubble_fraction as simulated_bubble_fraction
from modelpar.schedules.simulate import closed_form_bubble_fraction
from modelpar.specs.cluster import ClusterSpec
from modelpar.specs.errors import SpecError
from modelpar.specs.model import ModelSpec
from modelpar.specs.plan import ParallelPlan

GIB = 2**30
SIMULATION_ACTION_LIMIT = 4096
"""`estimate` simulates schedules with up to this many (rank, chunk, micro-batch) forward steps
(a few ms each, cached); longer ones, and every candidate of the search, use the closed-form
bubble, which the simulation reproduces exactly for these schedules with uniform stages
(tests/unit/test_cost.py sweeps it). Simulating a 128-stage pipeline with 1024 micro-batches
takes about a second, and a search meets hundreds of schedule shapes."""


@dataclass(frozen=True)
class StepEstimate:
    """Predicted cost of one optimizer step of a complete plan."""

    plan: ParallelPlan
    step_time_s: float
    mfu: float
    hfu: float
    breakdown: dict[str, float] = field(compare=False)
    memory: MemoryBreakdown = field(compare=False)
    energy_per_step_j: float
    energy_per_token_j: float
    device_name: str = ""
    num_devices: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.breakdown.get("tokens_per_step", 0.0) / self.step_time_s


def estimate(model: ModelSpec, cluster: ClusterSpec, num_devices: int, plan: ParallelPlan,
             precision: Precision = MIXED_PRECISION) -> StepEstimate:
    """Predict step time, MFU/HFU, energy and memory of a complete `plan` (see module docstring);
    the memory of model states and activations with the bytes of `precision` (`planner.memory`).

    `cluster` is resolved for the plan's devices here (`ClusterSpec.for_world_size`; a resolved
    cluster stays as it is). Raises SpecError when the plan is incomplete or cannot run (the rules
    of `specs.plan`).
    A plan that runs out of memory still gets an estimate with `memory.fits` False; call
    `check_fits` to turn that into an error.
    """
    plan.check(model, num_devices)
    return _estimate(model, cluster.for_world_size(num_devices), plan, precision)


def check_fits(step: StepEstimate) -> None:
    """Raise SpecError when `step`'s plan does not fit in device memory, naming the largest part."""
    memory = step.memory
    if memory.fits:
        return
    name, size = memory.largest_component()
    advice = {
        "activations": "try recompute 'selective' or 'full', sequence_parallel, a smaller micro_batch_size "
        "or more pipeline stages",
        "optimizer_states": "try zero_stage 1 or more, or more tensor/pipeline parallelism",
        "gradients": "try zero_stage 2, or more tensor/pipeline parallelism",
        "parameters": "try more tensor/pipeline parallelism or zero_stage 3",
        "embedding_and_logits": "try a smaller micro_batch_size or more tensor parallelism",
    }[name]
    device = f" on {step.device_name}" if step.device_name else ""
    raise SpecError(
        f"plan needs {memory.total / GIB:.1f} GiB per device{device} "
        f"({memory.capacity / USABLE_MEMORY_FRACTION / GIB:.0f} GiB, {memory.capacity / GIB:.1f} GiB usable; "
        f"{memory.shortfall / GIB:.1f} GiB over): {name.replace('_', ' ')} {size / GIB:.1f} GiB are the largest; "
        f"{advice}"
    )


def usable_memory_bytes(cluster: ClusterSpec) -> float:
    """Device memory a plan may fill: USABLE_MEMORY_FRACTION of the device's capacity."""
    return cluster.device.memory_bytes * USABLE_MEMORY_FRACTION


# --- pipeline schedule -------------------------------------------------------------------------


def pipeline_profile(schedule: str, p: int, m: int, v: int, simulate: bool = True) -> tuple[float, tuple[int, ...]]:
    """(bubble fraction, peak in-flight (chunk, micro-batch) pairs per rank) of a schedule.

    The bubble comes from simulating the schedule's action lists (`schedules.simulate`, cached)
    when `simulate` and the schedule has at most SIMULATION_ACTION_LIMIT forward steps, else from
    the closed form that the simulation matches. In-flight counts follow the schedules' warm-up
    lengths (GPipe m; 1F1B min(p - r, m); interleaved min(2 (p - r - 1) + (v - 1) p + 1, v m)),
    which the simulation reproduces (tested).
    """
    return _pipeline_profile(schedule, p, m, v, simulate and p * m * v <= SIMULATION_ACTION_LIMIT)


@memo(65536)
def _pipeline_profile(schedule: str, p: int, m: int, v: int, simulate: bool) -> tuple[float, tuple[int, ...]]:
    if p == 1:
        bubble = 0.0
    elif simulate:
        bubble = simulated_bubble_fraction(schedule, p, m, v)
    else:
        bubble = closed_form_bubble_fraction(schedule, p, m, v)
    if schedule == "gpipe":
        in_flight = tuple(m for _ in range(p))
    elif schedule == "interleaved":
        in_flight = tuple(min(2 * (p - r - 1) + (v - 1) * p + 1, v * m) for r in range(p))
    else:
        in_flight = tuple(min(p - r, m) for r in range(p))
    return bubble, in_flight


# --- communication pieces ----------------------------------------------------------------------


@memo(8192)
def tensor_comm_per_layer(
    model: ModelSpec, cluster: ClusterSpec, micro_batch_size: int, tensor_parallel: int, sequence_parallel: bool,
    recompute: str,
) -> tuple[float, float, float]:
    """(forward, backward, recompute) seconds of tensor-parallel collectives per layer and micro-batch."""
    t = tensor_parallel
    if t == 1:
        return 0.0, 0.0, 0.0
    link = comm.tensor_link(cluster, t)
    activation = micro_batch_size * model.seq_length * model.hidden_size * compute.value_bytes(cluster.device)
    backward_extra = 0.0
    if sequence_parallel:
        one_pass = 2 * (comm.all_gather_time(activation, t, link) + comm.reduce_scatter_time(activation, t, link))
        if cluster.host_cores is not None:  # CPU ranks: the weight-gradient re-gather hides behind nothing
            backward_extra = 2 * comm.all_gather_time(activation, t, link)
    else:
        one_pass = 2 * comm.all_reduce_time(activation, t, link)
    return one_pass, one_pass + backward_extra, one_pass if recompute == "full" else 0.0


CROSS_ENTROPY_ALL_REDUCES = 3
"""Vocabulary-parallel cross-entropy (Megatron-LM `_VocabParallelCrossEntropy`): all-reduces of the
per-token logit maximum, target logit and sum of exponentials over the tensor group."""
CROSS_ENTROPY_VALUE_BYTES = 4  # the loss is computed in fp32


@memo(8192)
def tensor_comm_edges(
    model: ModelSpec, cluster: ClusterSpec, micro_batch_size: int, tensor_parallel: int, sequence_parallel: bool,
) -> tuple[float, float, float, float]:
    """(embedding forward, embedding backward, head forward, head backward) seconds of the
    tensor-parallel collectives outside the layers, per micro-batch (Shoeybi et al. 2019 Sec. 3,
    vocabulary-parallel embedding and output layer):

    - embedding: each rank looks up its vocabulary rows, then the [b, s, h] partial sums are
      all-reduced (with sequence parallelism reduce-scattered); nothing in the backward;
    - head: the output layer is column-parallel over the vocabulary: its input is copied forward
      and its gradient all-reduced backward (sequence parallelism: all-gathered forward,
      re-gathered for the weight gradient on CPU ranks as in the layers, and reduce-scattered
      backward); the cross-entropy adds CROSS_ENTROPY_ALL_REDUCES all-reduces of b s fp32
      values in the forward.
    """
    t = tensor_parallel
    if t == 1:
        return 0.0, 0.0, 0.0, 0.0
    link = comm.tensor_link(cluster, t)
    tokens = micro_batch_size * model.seq_length
    activation = tokens * model.hidden_size * compute.value_bytes(cluster.device)
    loss = CROSS_ENTROPY_ALL_REDUCES * comm.all_reduce_time(tokens * CROSS_ENTROPY_VALUE_BYTES, t, link)
    if sequence_parallel:
        gather = comm.all_gather_time(activation, t, link)
        regather = gather if cluster.host_cores is not None else 0.0
        return (comm.reduce_scatter_time(activation, t, link), 0.0, gather + loss,
                regather + comm.reduce_scatter_time(activation, t, link))
    return comm.all_reduce_time(activation, t, link), 0.0, loss, comm.all_reduce_time(activation, t, link)


@dataclass(frozen=True)
class StageTimes:
    """Seconds one micro-batch spends on one global pipeline stage (its L / (p v) layers, + the
    embedding on the first stage, + the head on the last): compute and tensor-parallel
    collectives, forward and backward (the backward includes the recomputed forward)."""

    compute_forward: float
    compute_backward: float
    comm_forward: float
    comm_backward: float


@memo(8192)
def stage_times(
    model: ModelSpec, cluster: ClusterSpec, tensor_parallel: int, pipeline_parallel: int, virtual_stages: int,
    micro_batch_size: int, sequence_parallel: bool, recompute: str,
) -> tuple[StageTimes, ...]:
    """Per-action durations of every global stage g = chunk x p + pipeline rank, from the same
    pieces as `rank_work` (`compute.layer_compute`, `tensor_comm_per_layer`,
    `compute.embedding_compute` / `head_compute`, `tensor_comm_edges`): what the schedule
    simulations (`planner.shared_host`, `modelpar simulate`) place in time."""
    t, p, b, sp = tensor_parallel, pipeline_parallel, micro_batch_size, sequence_parallel
    device = cluster.device
    layer = compute.layer_compute(model, device, b, t, sp, recompute)
    tp_fwd, tp_bwd, tp_rc = tensor_comm_per_layer(model, cluster, b, t, sp, recompute)
    embed_fwd, embed_bwd = compute.embedding_compute(model, device, b, t, sp)
    head_fwd, head_bwd = compute.head_compute(model, device, b, t, sp)
    comm_embed_fwd, comm_embed_bwd, comm_head_fwd, comm_head_bwd = tensor_comm_edges(model, cluster, b, t, sp)
    layers = model.num_layers // (p * virtual_stages)
    last = p * virtual_stages - 1
    stages = []
    for stage in range(p * virtual_stages):
        first, final = stage == 0, stage == last
        stages.append(StageTimes(
            compute_forward=layers * layer.forward_s + (embed_fwd if first else 0.0) + (head_fwd if final else 0.0),
            compute_backward=(layers * (layer.backward_s + layer.recompute_s) + (embed_bwd if first else 0.0)
                              + (head_bwd if final else 0.0)),
            comm_forward=layers * tp_fwd + (comm_embed_fwd if first else 0.0) + (comm_head_fwd if final else 0.0),
            comm_backward=(layers * (tp_bwd + tp_rc) + (comm_embed_bwd if first else 0.0)
                           + (comm_head_bwd if final else 0.0)),
        ))
    return tuple(stages)


@memo(8192)
def p2p_per_transfer(
    model: ModelSpec, cluster: ClusterSpec, micro_batch_size: int, tensor_parallel: int, pipeline_parallel: int,
    sequence_parallel: bool,
) -> float:
    """Seconds of one activation (or gradient) transfer between consecutive stages."""
    if pipeline_parallel == 1:
        return 0.0
    t = tensor_parallel
    activation = micro_batch_size * model.seq_length * model.hidden_size * compute.value_bytes(cluster.device)
    seconds = comm.p2p_time(activation / t, comm.pipeline_link(cluster, t, pipeline_parallel))
    if t > 1 and not sequence_parallel:  # scatter/gather: rebuild the full activation on the receiver
        seconds += comm.all_gather_time(activation, t, comm.tensor_link(cluster, t))
    return seconds


# --- the estimate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankWork:
    """Seconds per micro-batch of the first, a middle and the last pipeline rank (all chunks):
    compute (incl. recomputation, embedding, head), recomputation alone, embedding + head alone,
    tensor-parallel communication (layers, + embedding on the first, + head on the last), and the first rank's forward and
    backward (incl. recomputation and tensor-parallel communication), the windows that hide
    data-parallel communication."""

    compute: tuple[float, float, float]
    recompute: float
    edges: tuple[float, float, float]
    tensor_comm: tuple[float, float, float]
    first_forward: float
    first_backward: float


@memo(16384)
def rank_work(
    model: ModelSpec, cluster: ClusterSpec, tensor_parallel: int, pipeline_parallel: int, micro_batch_size: int,
    sequence_parallel: bool, recompute: str,
) -> RankWork:
    """Per-micro-batch work of the pipeline ranks; v does not matter (a rank always holds l / p layers)."""
    device = cluster.device
    t, p, b = tensor_parallel, pipeline_parallel, micro_batch_size
    sp = sequence_parallel and t > 1
    layer = compute.layer_compute(model, device, b, t, sp, recompute)
    tp_fwd, tp_bwd, tp_rc = tensor_comm_per_layer(model, cluster, b, t, sp, recompute)
    layers = model.num_layers // p
    body = layers * (layer.forward_s + layer.backward_s + layer.recompute_s)
    embed_fwd, embed_bwd = compute.embedding_compute(model, device, b, t, sp)
    head_fwd, head_bwd = compute.head_compute(model, device, b, t, sp)
    head = head_fwd + head_bwd
    edges = (embed_fwd + embed_bwd + (head if p == 1 else 0.0), 0.0, head)
    comm_embed_fwd, comm_embed_bwd, comm_head_fwd, comm_head_bwd = tensor_comm_edges(model, cluster, b, t, sp)
    layer_comm = layers * (tp_fwd + tp_bwd + tp_rc)
    head_comm = comm_head_fwd + comm_head_bwd
    first_forward = (layers * (layer.forward_s + tp_fwd) + embed_fwd + comm_embed_fwd
                     + (head_fwd + comm_head_fwd if p == 1 else 0.0))
    first_backward = (layers * (layer.backward_s + layer.recompute_s + tp_bwd + tp_rc) + embed_bwd + comm_embed_bwd
                      + (head_bwd + comm_head_bwd if p == 1 else 0.0))
    return RankWork(
        compute=tuple(body + edge for edge in edges),
        recompute=layers * layer.recompute_s,
        edges=edges,
        tensor_comm=(layer_comm + comm_embed_fwd + comm_embed_bwd + (head_comm if p == 1 else 0.0), layer_comm,
                     layer_comm + head_comm),
        first_forward=first_forward,
        first_backward=first_backward,
    )


@memo(16384)
def data_parallel_work(
    model: ModelSpec, cluster: ClusterSpec, tensor_parallel: int, pipeline_parallel: int, data_parallel: int,
    zero_stage: int,
) -> tuple[float, float, float]:
    """(gradient reduction s, weight all-gather s, optimizer step s) of the first pipeline rank.

    ZeRO-0: all-reduce of the gradients, no gather. ZeRO-1/2: reduce-scatter of the gradients and
    all-gather of the updated 16-bit weights. ZeRO-3: reduce-scatter, and one all-gather of the
    weights, which happens before every forward, backward and recomputation.
    """
    t, p, d = tensor_parallel, pipeline_parallel, data_parallel
    parameters = stage_parameters(model, t, p, 0)
    optimizer_s = compute.optimizer_time(cluster.device, parameters / (d if zero_stage >= 1 else 1))
    if d == 1:
        return 0.0, 0.0, optimizer_s
    link = comm.data_link(cluster, t, p, d)
    value_bytes = cluster.device.value_bytes  # fp32 training reduces fp32 gradients
    gradient_bytes = (value_bytes if value_bytes is not None else GRADIENT_BYTES) * parameters
    if zero_stage == 0:
        return comm.all_reduce_time(gradient_bytes, d, link), 0.0, optimizer_s
    gather = comm.all_gather_time(compute.value_bytes(cluster.device) * parameters, d, link)
    return comm.reduce_scatter_time(gradient_bytes, d, link), gather, optimizer_s


def data_parallel_exposure(
    reduce_s: float, gather_s: float, zero_stage: int, work: RankWork, m: int, layers: int, recompute: str
) -> tuple[float, float]:
    """(exposed, overlapped) data-parallel seconds of the first pipeline rank.

    Bucketed overlap (PyTorch DDP, DeepSpeed `overlap_comm`, Megatron-LM `--overlap-grad-reduce`
    / `--overlap-param-gather`): the gradient reduction runs during the backward of the last
    micro-batch, except the last layer's bucket (1/layers of it), which is ready only when the
    backward ends; ZeRO-1/2's weight all-gather runs during the next step's first forward, except
    the first layer's. ZeRO-3 gathers each layer's weights before its forward, backward (and
    recomputation) and reduce-scatters its gradients in every micro-batch, prefetching one layer
    ahead: all but the excess over that micro-batch's compute, and one layer's worth, is hidden.
    """
    if reduce_s == 0.0:
        return 0.0, 0.0
    if zero_stage == 3:
        passes = 3 if recompute == "full" else 2
        per_micro_batch = passes * gather_s + reduce_s
        total = m * per_micro_batch
        exposed = m * max(0.0, per_micro_batch - (work.first_forward + work.first_backward))
        exposed = min(total, exposed + per_micro_batch / layers)
        return exposed, total - exposed
    exposed = min(reduce_s, max(0.0, reduce_s - work.first_backward) + reduce_s / layers)
    if gather_s:
        exposed += min(gather_s, max(0.0, gather_s - work.first_forward) + gather_s / layers)
    return exposed, reduce_s + gather_s - exposed


BREAKDOWN_KEYS = (
    "compute_s", "recompute_s", "embedding_and_logits_s", "tensor_parallel_comm_s", "bubble_s", "pipeline_p2p_s",
    "data_parallel_comm_s", "optimizer_s", "overlapped_comm_s",
)
INSIDE_COMPUTE_KEYS = ("recompute_s", "embedding_and_logits_s")
"""Parts of `compute_s` (adding them to the step would count them twice)."""
HIDDEN_KEYS = ("overlapped_comm_s",)
"""Seconds that overlap compute: reported, but not part of the step."""
EXPOSED_COMM_KEYS = ("tensor_parallel_comm_s", "pipeline_p2p_s", "data_parallel_comm_s")
"""Communication on the critical path."""


def step_time_parts(
    model: ModelSpec, cluster: ClusterSpec, t: int, p: int, d: int, v: int, b: int, m: int, sp: bool, recompute: str,
    zero_stage: int, schedule: str, simulate: bool = True,
) -> tuple[float, tuple[float, ...], float]:
    """(step seconds, the BREAKDOWN_KEYS values, bubble fraction) of a complete, valid plan.

    The search calls this for every candidate (with `simulate` False: closed-form bubbles); every
    piece is cached on the few plan fields it depends on. `cluster` is as t p d ranks see it
    (`ClusterSpec.for_world_size`, which `estimate` and `search` apply once). A cluster of ranks sharing one host
    (`ClusterSpec.shared_host`, a profiled CPU) is costed with what one rank achieves while
    t p d ranks run at once; with more ranks than cores, compute and bubble come from a
    processor-sharing simulation of the schedule (`planner.shared_host`), and no data-parallel
    communication overlaps the backward: gloo's copies and reductions need the same cores.
    """
    sp = sp and t > 1
    work = rank_work(model, cluster, t, p, b, sp, recompute)
    bubble_fraction = pipeline_profile(schedule, p, m, v, simulate)[0]
    totals = [c + comm_s for c, comm_s in zip(work.compute, work.tensor_comm)]
    slowest = max(range(3), key=totals.__getitem__) if p > 1 else 0
    compute_s = m * work.compute[slowest]
    tensor_comm_s = m * work.tensor_comm[slowest]
    bubble_s = 0.0
    if p > 1:
        mean_rank = (totals[0] + (p - 2) * totals[1] + totals[2]) / p
        bubble_s = bubble_fraction / (1.0 - bubble_fraction) * m * mean_rank
    p2p_s = 2 * (v * m + p - 1) * p2p_per_transfer(model, cluster, b, t, p, sp) if p > 1 else 0.0
    reduce_s, gather_s, optimizer_s = data_parallel_work(model, cluster, t, p, d, zero_stage)
    if cluster.shares_cores(t * p * d):  # more CPU ranks than cores: processor sharing
        shared = shared_host.step_under_sharing(
            stage_times(model, cluster, t, p, v, b, sp, recompute), schedule, p, v, m, t * d,
            p2p_per_transfer(model, cluster, b, t, p, sp), cluster.host_cores)
        busiest = max(range(p), key=shared.compute_wall.__getitem__)
        compute_s, tensor_comm_s = shared.compute_wall[busiest], shared.communication[busiest]
        bubble_s = max(0.0, shared.makespan - compute_s - tensor_comm_s - p2p_s)
        optimizer_s *= t * p * d / cluster.host_cores  # every rank steps at once
    dp_s, overlapped_s = data_parallel_exposure(
        reduce_s, gather_s, zero_stage, work, m, model.num_layers // p, recompute
    )
    if cluster.host_cores is not None:  # CPU ranks: gloo copies and reduces on the cores that compute
        dp_s, overlapped_s = dp_s + overlapped_s, 0.0
    step = compute_s + tensor_comm_s + bubble_s + p2p_s + dp_s + optimizer_s
    parts = (
        compute_s, m * work.recompute, m * work.edges[slowest], tensor_comm_s, bubble_s, p2p_s, dp_s, optimizer_s,
        overlapped_s,
    )
    return step, parts, bubble_fraction


def _estimate(model: ModelSpec, cluster: ClusterSpec, plan: ParallelPlan,
              precision: Precision = MIXED_PRECISION) -> StepEstimate:
    t, p, d, v = plan.tensor_parallel, plan.pipeline_parallel, plan.data_parallel, plan.virtual_stages
    device = cluster.device
    b, m = plan.micro_batch_size, plan.num_micro_batches
    step, parts, bubble_fraction = step_time_parts(
        model, cluster, t, p, d, v, b, m, bool(plan.sequence_parallel), plan.recompute, plan.zero_stage, plan.schedule
    )
    in_flight = pipeline_profile(plan.schedule, p, m, v)[1]
    memory = memory_per_device(model, plan, usable_memory_bytes(cluster), in_flight, precision=precision)
    tokens = plan.global_batch_size * model.seq_length
    num_devices = t * p * d
    energy = device.power_watts * num_devices * step
    breakdown = dict(zip(BREAKDOWN_KEYS, parts))
    breakdown.update(bubble_fraction=bubble_fraction, num_micro_batches=float(m), tokens_per_step=float(tokens))
    return StepEstimate(
        plan=plan,
        step_time_s=step,
        mfu=flops.mfu(model, plan.global_batch_size, step, num_devices, device.peak_tflops),
        hfu=flops.hfu(model, plan.global_batch_size, plan.recompute, step, num_devices, device.peak_tflops),
        breakdown=breakdown,
        memory=memory,
        energy_per_step_j=energy,
        energy_per_token_j=energy / tokens,
        device_name=device.name,
        num_devices=num_devices,
    )
