"""modelpar's runtime against PyTorch's own parallel APIs: same GPT, same machine, one run.

Tensor parallel, t = 2 ranks: `modelpar.models.gpt_parallel` (Megatron-style column/row layers,
vocab-parallel embedding and cross-entropy) against torch.distributed.tensor.parallel with
torchtitan's plan without sequence parallelism: ColwiseParallel on attention.qkv, mlp.fc1 and the
LM head (logits left sharded on the vocabulary for `loss_parallel`), RowwiseParallel on
attention.proj, mlp.fc2 and the token embedding (vocabulary-sharded), on a gloo DeviceMesh.

Pipeline parallel, p = 4 ranks, 1F1B, m = 8 micro-batches: modelpar's `PipelineExecutor` running
`build_schedule("1f1b", 4, 8)` against torch.distributed.pipelining `PipelineStage` +
`Schedule1F1B`, with the same two layers per stage (embedding on stage 0, final norm + output
projection + cross-entropy on stage 3).

Both sides are cut from the same serial GPT (`models.gpt.init_gpt(spec, seed)`, fp32, dropout 0,
untied embeddings: torch.distributed.pipelining has no tied-weight support) and train with the
same torch.optim.AdamW on the same synthetic batches; the first step's losses are printed side by
side (and against the serial model) as a sanity check. A step is zero_grad + forward + backward
(+ gradient synchronisation) + optimizer step.

Timing: one spawn per parallel mode holds both sides. After warm-up, repetitions are paired and
interleaved (ours, theirs, theirs, ours, ...: the order flips every pair); each repetition runs
`--steps` steps, each step starting after a barrier and lasting from the earliest rank's start to
the latest rank's end (one monotonic clock on one machine). The figure is the median over pairs
of ours / theirs (a ratio below 1 means modelpar is faster). Two cross-checks that other
processes on a shared machine disturb less come with it: the ratio of the two sides' fastest
steps, and the paired ratio of CPU seconds summed over the ranks (work plus framework overhead).

Bubble: measured on modelpar's side from the executor's per-action compute timers, with the
planner's definition (`schedules.simulate.PipelineSimulation.bubble_fraction`): over one step,
1 - max_r busy_r / makespan, where busy_r is the summed compute time of rank r and the makespan
runs from the first compute start to the last compute end on any rank. The idle share of the
busiest rank is what the schedule cannot fill: every other rank also waits on data dependencies
of unequal stages. Theory: (p - 1)/(m + p - 1) = 3/11 for p = 4, m = 8.

On a 2-core machine the 4 pipeline ranks (1 thread each) oversubscribe the cores 2:1, so an
action's wall time stretches whenever more than two ranks compute at once (the steady 1F1B phase)
and not during fill and drain; the wall-clock bubble is therefore biased low. To separate the
schedule from the contention, the script also replays the executed 1F1B action lists through the
planner's simulator with per-stage forward / backward times measured solo (one rank computing
at a time, the others parked in a barrier; fastest of 8) - reported as ``bubble_fraction_solo_replay``.

Run:  python benchmarks/vs_torch_native.py [--repeats N] [--steps K] [--quick] [--json] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

from _common import (machine_description, pair_step_times, paired_ratio, print_table, profile_one_step,
                     robustness_checks, run_interleaved_pairs)

from modelpar.specs import MODEL_PRESETS, ModelSpec
from modelpar.specs.errors import SpecError

TARGET_RATIO = 0.9
BUBBLE_TOLERANCE = 0.10  # relative: |measured / theory - 1| <= 10 %
LOSS_TOLERANCE = 1e-4    # relative difference of the first-step losses (fp32, different reduction orders)


@dataclass(frozen=True)
class BenchConfig:
    """Everything a rank needs; picklable."""

    model: ModelSpec
    tensor_parallel: int = 2
    tp_batch_size: int = 16           # sequences per tensor-parallel step
    pipeline_stages: int = 4
    num_micro_batches: int = 8
    micro_batch_size: int = 2         # sequences per pipeline micro-batch
    repeats: int = 20                 # interleaved pairs
    steps: int = 1                    # timed steps per side per pair
    warmup_steps: int = 2             # per side, before the pairs
    seed: int = 0
    learning_rate: float = 1e-4
    profile: bool = False


def benchmark_model(name: str) -> ModelSpec:
    """The preset with dropout 0 and untied embeddings (see the module docstring)."""
    if name not in MODEL_PRESETS:
        raise SpecError(f"--model {name!r} is not a preset; use one of {', '.join(sorted(MODEL_PRESETS))}")
    return dataclasses.replace(MODEL_PRESETS[name], name=f"{name} (untied, dropout 0)", dropout=0.0,
                               tied_embeddings=False)


def make_batch(config: BenchConfig, step: int, sequences: int):
    """(tokens, targets) [sequences, s] of a step: the same on every rank and for both sides."""
    from modelpar.training.data import SyntheticTokens

    batch = SyntheticTokens(config.model.vocab_size, config.seed).global_batch(step, sequences, config.model.seq_length)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


# --- the torch-native sides ------------------------------------------------------------------------


def _group_qkv_rows_by_rank(attention, tensor_parallel: int) -> None:
    """Reorder the fused [Q | K | V] rows into [Q_0 K_0 V_0 | Q_1 K_1 V_1 | ...], so that
    ColwiseParallel's contiguous Shard(0) hands rank r its own heads (what Megatron's fused layout
    does); the forward then splits the local output with the per-rank head counts."""
    import torch

    heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    if heads % tensor_parallel or kv_heads % tensor_parallel:
        raise SpecError(f"native tensor parallel needs heads ({heads}) and KV heads ({kv_heads}) divisible by "
                        f"t = {tensor_parallel}; pick another model or t")
    q_per, kv_per = heads // tensor_parallel, kv_heads // tensor_parallel
    k_base, v_base = heads * head_dim, (heads + kv_heads) * head_dim
    order = []
    for rank in range(tensor_parallel):
        order += range(rank * q_per * head_dim, (rank + 1) * q_per * head_dim)
        order += range(k_base + rank * kv_per * head_dim, k_base + (rank + 1) * kv_per * head_dim)
        order += range(v_base + rank * kv_per * head_dim, v_base + (rank + 1) * kv_per * head_dim)
    index = torch.tensor(order)
    with torch.no_grad():
        attention.qkv.weight.copy_(attention.qkv.weight.index_select(0, index))
        attention.qkv.bias.copy_(attention.qkv.bias.index_select(0, index))
    attention.num_heads, attention.num_kv_heads = q_per, kv_per  # the local head counts the forward splits by


def native_tensor_parallel(model, mesh):
    """torch.distributed.tensor.parallel applied to the serial GPT (torchtitan's plan, no SP)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    t = mesh.size()
    plan = {
        "embedding.token": RowwiseParallel(input_layouts=Replicate()),
        "head.output": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    }
    for index, layer in enumerate(model.layers):
        _group_qkv_rows_by_rank(layer.attention, t)
        plan[f"layers.{index}.attention.qkv"] = ColwiseParallel()
        plan[f"layers.{index}.attention.proj"] = RowwiseParallel()
        plan[f"layers.{index}.mlp.fc1"] = ColwiseParallel()
        plan[f"layers.{index}.mlp.fc2"] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


def native_stage_module(model, layers: range, first: bool, last: bool):
    """A torch.distributed.pipelining stage: (embedding) + layers + (final norm + output -> logits)."""
    from torch import nn

    class NativeStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = model.embedding if first else None
            self.layers = nn.ModuleList(model.layers[i] for i in layers)
            self.head = model.head if last else None

        def forward(self, inputs):
            hidden = self.embedding(inputs) if self.embedding is not None else inputs
            for layer in self.layers:
                hidden = layer(hidden)
            return self.head.logits(hidden) if self.head is not None else hidden

    return NativeStage()


def _token_cross_entropy(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --- tensor parallel ------------------------------------------------------------------------------


def tensor_parallel_worker(rank: int, world_size: int, config: BenchConfig) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from modelpar.models.gpt import init_gpt
    from modelpar.models.gpt_parallel import parallelize, sync_tensor_parallel_grads
    from modelpar.runtime.mesh import ParallelContext, ParallelDims

    spec, t = config.model, config.tensor_parallel
    ctx = ParallelContext(ParallelDims(tensor=t))
    mesh = init_device_mesh("cpu", (t,))
    ours = parallelize(init_gpt(spec, config.seed), ctx, sequence_parallel=False)
    theirs = native_tensor_parallel(init_gpt(spec, config.seed), mesh)
    ours.train()
    theirs.train()
    optimizers = {"ours": torch.optim.AdamW(ours.parameters(), lr=config.learning_rate),
                  "theirs": torch.optim.AdamW(theirs.parameters(), lr=config.learning_rate)}
    phases = {"ours": [], "theirs": []}  # per step: forward, backward (+ grad sync), optimizer seconds
    first_loss = {}

    def step_ours(step: int) -> None:
        tokens, targets = make_batch(config, step, config.tp_batch_size)
        start = time.perf_counter()
        loss = ours(tokens, targets)
        forward_end = time.perf_counter()
        loss.backward()
        sync_tensor_parallel_grads(ours, ctx)
        backward_end = time.perf_counter()
        optimizers["ours"].step()
        optimizers["ours"].zero_grad(set_to_none=True)
        phases["ours"].append((forward_end - start, backward_end - forward_end, time.perf_counter() - backward_end))
        if "ours" not in first_loss:
            first_loss["ours"] = float(loss.detach())

    def step_theirs(step: int) -> None:
        tokens, targets = make_batch(config, step, config.tp_batch_size)
        start = time.perf_counter()
        with loss_parallel():
            loss = theirs(tokens, targets)
            forward_end = time.perf_counter()
            loss.backward()
        backward_end = time.perf_counter()
        optimizers["theirs"].step()
        optimizers["theirs"].zero_grad(set_to_none=True)
        phases["theirs"].append((forward_end - start, backward_end - forward_end, time.perf_counter() - backward_end))
        if "theirs" not in first_loss:  # outside the steady state: no extra DTensor op in the timed steps
            value = loss.full_tensor() if isinstance(loss, DTensor) else loss
            first_loss["theirs"] = float(value.detach())

    if rank == 0:
        tokens, targets = make_batch(config, 0, config.tp_batch_size)
        with torch.no_grad():
            first_loss["serial"] = float(init_gpt(spec, config.seed)(tokens, targets))
    pairs = run_interleaved_pairs(step_ours, step_theirs, config.repeats, config.steps, config.warmup_steps)
    tables = profile_one_step(rank, step_ours, step_theirs, 10_000) if config.profile else {}
    skip = config.warmup_steps
    return {"rank": rank, "pairs": pairs, "first_loss": first_loss, "profile": tables,
            "phases": {side: values[skip: skip + config.repeats * config.steps] for side, values in phases.items()}}


# --- pipeline parallel ----------------------------------------------------------------------------


def pipeline_worker(rank: int, world_size: int, config: BenchConfig) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from modelpar.training.data import Batch
    from modelpar.models.gpt import init_gpt
    from modelpar.runtime.mesh import ParallelContext, ParallelDims
    from modelpar.runtime.pipeline import PipelineExecutor, PipelineTopology, build_chunks, stage_layer_ranges
    from modelpar.runtime.timeline import Timeline
    from modelpar.schedules.actions import build_schedule

    spec, p, m, b = config.model, config.pipeline_stages, config.num_micro_batches, config.micro_batch_size
    first, last = rank == 0, rank == p - 1
    ctx = ParallelContext(ParallelDims(pipeline=p))

    chunks = build_chunks(init_gpt(spec, config.seed), ctx.pipeline_rank, p)
    timeline = Timeline()
    executor = PipelineExecutor(chunks, PipelineTopology.from_context(ctx), build_schedule("1f1b", p, m), m,
                                (b, spec.seq_length, spec.hidden_size), torch.float32, "cpu", timeline=timeline)
    serial_for_theirs = init_gpt(spec, config.seed)
    stage_module = native_stage_module(serial_for_theirs, stage_layer_ranges(spec.num_layers, p)[rank], first, last)
    stage = PipelineStage(stage_module, rank, p, torch.device("cpu"))
    schedule = Schedule1F1B(stage, m, loss_fn=_token_cross_entropy)
    chunk_params = [param for chunk in chunks for param in chunk.parameters()]
    optimizers = {"ours": torch.optim.AdamW(chunk_params, lr=config.learning_rate),
                  "theirs": torch.optim.AdamW(stage_module.parameters(), lr=config.learning_rate)}
    first_loss = {}
    optimizer_s = {"ours": [], "theirs": []}

    def split(step: int):
        tokens, targets = make_batch(config, step, m * b)
        return tokens, targets

    def step_ours(step: int) -> None:
        tokens, targets = split(step)
        batches = [Batch(tokens[i * b:(i + 1) * b], targets[i * b:(i + 1) * b]) for i in range(m)]
        loss = executor.run(batches)
        start = time.perf_counter()
        optimizers["ours"].step()
        optimizers["ours"].zero_grad(set_to_none=True)
        optimizer_s["ours"].append(time.perf_counter() - start)
        if loss is not None:
            first_loss.setdefault("ours", float(loss))

    def step_theirs(step: int) -> None:
        tokens, targets = split(step)
        losses: list = []
        # return_outputs=False: our executor does not gather the last stage's logits either
        if first:
            schedule.step(tokens, return_outputs=False)
        elif last:
            schedule.step(target=targets, losses=losses, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        start = time.perf_counter()
        optimizers["theirs"].step()
        optimizers["theirs"].zero_grad(set_to_none=True)
        optimizer_s["theirs"].append(time.perf_counter() - start)
        if losses:
            first_loss.setdefault("theirs", float(torch.stack([loss.detach() for loss in losses]).mean()))

    if last:
        tokens, targets = split(0)
        with torch.no_grad():
            first_loss["serial"] = float(init_gpt(spec, config.seed)(tokens, targets))

    block_events: list[list] = []  # schedules.events.TimelineEvent
    marks = {}

    def on_ours_block(where: str) -> None:
        if where == "start":
            marks["first_event"] = len(timeline.events)
        else:
            block_events.append(timeline.events[marks["first_event"]:])

    pairs = run_interleaved_pairs(step_ours, step_theirs, config.repeats, config.steps, config.warmup_steps,
                                  on_ours_block)
    solo = _solo_stage_times(rank, p, chunks[0], config)
    tables = profile_one_step(rank, step_ours, step_theirs, 10_000) if config.profile else {}
    dist.barrier()
    skip = config.warmup_steps
    return {"rank": rank, "pairs": pairs, "first_loss": first_loss, "ours_events": block_events, "solo": solo,
            "profile": tables,
            "optimizer_s": {side: values[skip: skip + config.repeats * config.steps] for side, values in optimizer_s.items()}}


def _solo_stage_times(rank: int, p: int, chunk, config: BenchConfig, repeats: int = 8) -> dict:
    """Fastest forward and backward seconds of this rank's stage on one micro-batch while every
    other rank waits in a barrier (no contention among the ranks; the minimum also filters out
    other processes on a shared machine)."""
    import torch
    import torch.distributed as dist

    spec, b = config.model, config.micro_batch_size
    tokens, targets = make_batch(config, 0, b)
    forward_s, backward_s = [], []
    for turn in range(p):
        dist.barrier()
        if turn != rank:
            continue
        for _ in range(repeats + 1):
            inputs = tokens if chunk.is_first else torch.randn(b, spec.seq_length, spec.hidden_size, requires_grad=True)
            start = time.perf_counter()
            output = chunk(inputs, targets if chunk.is_last else None)
            middle = time.perf_counter()
            if chunk.is_last:
                output.backward()
            else:
                output.backward(torch.ones_like(output))
            end = time.perf_counter()
            forward_s.append(middle - start)
            backward_s.append(end - middle)
        chunk.zero_grad(set_to_none=True)
    dist.barrier()
    return {"forward_s": min(forward_s[1:]), "backward_s": min(backward_s[1:])}


# --- analysis (parent process) --------------------------------------------------------------------


def measured_bubbles(rank_results: list[dict]) -> dict:
    """Per executed step (of our runtime): 1 - max_r busy_r / makespan (busiest rank), and the idle
    share of every rank, from the executor's compute timers."""
    steps_per_block = len(rank_results[0]["pairs"][0]["ours"])
    busiest, per_rank = [], [[] for _ in rank_results]
    recv_share = []
    for block in range(len(rank_results[0]["ours_events"])):
        for k in range(steps_per_block):
            compute, recv = [], []
            for result in rank_results:
                start, end, _ = result["pairs"][block]["ours"][k]
                events = [e for e in result["ours_events"][block] if start <= e.start_s and e.end_s <= end]
                compute.append([(e.start_s, e.end_s) for e in events if e.kind in ("forward", "backward")])
                recv.append(sum(e.duration_s for e in events if e.kind == "recv"))
            makespan = max(s[-1][1] for s in compute) - min(s[0][0] for s in compute)
            busy = [sum(end - start for start, end in spans) for spans in compute]
            busiest.append(1.0 - max(busy) / makespan)
            for rank, value in enumerate(busy):
                per_rank[rank].append(1.0 - value / makespan)
            recv_share.append([value / makespan for value in recv])
    return {"busiest_rank": statistics.median(busiest),
            "idle_share_per_rank": [statistics.median(values) for values in per_rank],
            "recv_wait_share_per_rank": [statistics.median(values[r] for values in recv_share)
                                         for r in range(len(rank_results))],
            "samples": len(busiest)}


def solo_replay_bubble(rank_results: list[dict], p: int, m: int) -> dict:
    """The executed 1F1B lists replayed by the planner's simulator with solo-measured stage times."""
    from modelpar.schedules.simulate import simulate
    from modelpar.schedules.actions import build_schedule

    forward = [result["solo"]["forward_s"] for result in rank_results]
    backward = [result["solo"]["backward_s"] for result in rank_results]
    simulation = simulate(build_schedule("1f1b", p, m), lambda rank, action: forward[rank],
                          lambda rank, action: backward[rank])
    return {"bubble_fraction": simulation.bubble_fraction, "forward_s": forward, "backward_s": backward,
            "makespan_s": simulation.makespan}


def _loss_check(first_loss: dict) -> dict:
    ours, theirs = first_loss["ours"], first_loss["theirs"]
    relative = abs(ours - theirs) / abs(theirs)
    return {**first_loss, "relative_difference": relative, "agree": relative <= LOSS_TOLERANCE}


def _phase_medians(values: list[tuple[float, ...]]) -> list[float]:
    return [statistics.median(v[i] for v in values) for i in range(len(values[0]))]


def _forward_backward_ratio(rank_results: list[dict], steps_per_pair: int):
    """Paired ratio of forward + backward time alone (no optimizer step), slowest rank per step."""
    per_side = {}
    for side in ("ours", "theirs"):
        per_step = [max(values) for values in zip(*([f + b for f, b, _ in r["phases"][side]] for r in rank_results))]
        per_side[side] = [statistics.median(per_step[k:k + steps_per_pair])
                          for k in range(0, len(per_step), steps_per_pair)]
    return paired_ratio(per_side["ours"], per_side["theirs"])


def run_benchmark(config: BenchConfig, timeout_s: float = 1800.0) -> dict:
    from modelpar.schedules.simulate import bubble_fraction, closed_form_bubble_fraction
    from modelpar.runtime.launch import spawn

    load_at_start = os.getloadavg()[0]
    tp = spawn(tensor_parallel_worker, config.tensor_parallel, (config,), timeout_s=timeout_s)
    pp = spawn(pipeline_worker, config.pipeline_stages, (config,), timeout_s=timeout_s)

    tp_ratio = paired_ratio(pair_step_times(tp, "ours"), pair_step_times(tp, "theirs"))
    pp_ratio = paired_ratio(pair_step_times(pp, "ours"), pair_step_times(pp, "theirs"))
    p, m = config.pipeline_stages, config.num_micro_batches
    bubbles = measured_bubbles(pp)
    theory = closed_form_bubble_fraction("1f1b", p, m)
    replay = solo_replay_bubble(pp, p, m)
    slowest_tp = {side: [max(values) for values in zip(*(_phase_medians(r["phases"][side]) for r in tp))]
                  for side in ("ours", "theirs")}
    return {
        "tensor_parallel_ratio": tp_ratio.median,
        "pipeline_parallel_ratio": pp_ratio.median,
        "bubble_fraction_measured": bubbles["busiest_rank"],
        "bubble_fraction_theory": theory,
        "targets": {"ratio_at_most": TARGET_RATIO, "bubble_relative_tolerance": BUBBLE_TOLERANCE,
                    "tensor_parallel_met": tp_ratio.median <= TARGET_RATIO,
                    "pipeline_parallel_met": pp_ratio.median <= TARGET_RATIO,
                    "bubble_met": abs(bubbles["busiest_rank"] / theory - 1.0) <= BUBBLE_TOLERANCE},
        "tensor_parallel": {**tp_ratio.as_dict(), **robustness_checks(tp), "first_step_loss": _loss_check(tp[0]["first_loss"]),
                            "phases_s_forward_backward_optimizer": slowest_tp,
                            "forward_backward_only_ratio": _forward_backward_ratio(tp, config.steps).median},
        "pipeline_parallel": {**pp_ratio.as_dict(), **robustness_checks(pp), "first_step_loss": _loss_check(pp[-1]["first_loss"]),
                              "optimizer_s": {side: max(statistics.median(r["optimizer_s"][side]) for r in pp)
                                              for side in ("ours", "theirs")}},
        "bubble": {**bubbles, "simulated_unit_times": bubble_fraction("1f1b", p, m), "solo_replay": replay},
        "bubble_fraction_solo_replay": replay["bubble_fraction"],
        "config": {**{k: v for k, v in dataclasses.asdict(config).items() if k != "model"},
                   "model": dataclasses.asdict(config.model), "threads_per_rank": 1, "backend": "gloo"},
        "machine": {**machine_description(), "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]}},
        "profile": {"tensor_parallel": tp[0]["profile"], "pipeline_parallel_rank0": pp[0]["profile"]},
    }


# --- output ---------------------------------------------------------------------------------------


def print_report(result: dict) -> None:
    config, machine = result["config"], result["machine"]
    tp, pp, bubble = result["tensor_parallel"], result["pipeline_parallel"], result["bubble"]
    print(f"model {config['model']['name']}: {config['model']['num_layers']} layers, h={config['model']['hidden_size']}, "
          f"heads={config['model']['num_attention_heads']}, s={config['model']['seq_length']}, "
          f"V={config['model']['vocab_size']}, fp32; {machine['cores']} cores ({machine['cpu']}), gloo, "
          f"1 thread per rank, torch {machine['torch']}")
    load = machine["load_average_1m"]
    print(f"1-minute load average {load['start']:.1f} at start, {load['end']:.1f} at end ({machine['cores']} cores)")
    print(f"paired repetitions: {config['repeats']} x {config['steps']} steps per side after "
          f"{config['warmup_steps']} warm-up steps; figure = median over pairs of ours / theirs")
    for name, block in (("tensor parallel", tp), ("pipeline parallel", pp)):
        loss = block["first_step_loss"]
        print(f"first-step loss ({name}): modelpar {loss['ours']:.6f}, torch {loss['theirs']:.6f}, "
              f"serial {loss['serial']:.6f} -> relative difference {loss['relative_difference']:.1e} "
              f"({'agree' if loss['agree'] else 'DISAGREE'})")
    targets = result["targets"]

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    rows = [
        (f"TP t={config['tensor_parallel']}, batch {config['tp_batch_size']}", f"{tp['ours_median_step_s']:.3f}",
         f"{tp['theirs_median_step_s']:.3f}", f"{tp['median_ratio']:.3f} [{tp['min_ratio']:.3f}, {tp['max_ratio']:.3f}]",
         f"<= {TARGET_RATIO}", verdict(targets["tensor_parallel_met"])),
        (f"PP p={config['pipeline_stages']} 1F1B, m={config['num_micro_batches']}, b={config['micro_batch_size']}",
         f"{pp['ours_median_step_s']:.3f}", f"{pp['theirs_median_step_s']:.3f}",
         f"{pp['median_ratio']:.3f} [{pp['min_ratio']:.3f}, {pp['max_ratio']:.3f}]", f"<= {TARGET_RATIO}",
         verdict(targets["pipeline_parallel_met"])),
    ]
    print_table("step time: modelpar vs torch native (median over pairs)",
                ["case", "modelpar s", "torch s", "ratio [min, max]", "target", "verdict"], rows)
    print_table("cross-checks (less sensitive to other load on the machine)",
                ["case", "best-step ratio", "CPU-seconds ratio", "CPU s modelpar / torch (all ranks)"],
                [(name, f"{block['best_step_ratio']:.3f}", f"{block['cpu_time_ratio']:.3f}",
                  f"{block['ours_cpu_s']:.3f} / {block['theirs_cpu_s']:.3f}")
                 for name, block in (("TP", tp), ("PP", pp))])
    theory = result["bubble_fraction_theory"]
    measured = result["bubble_fraction_measured"]
    replay = bubble["solo_replay"]
    bubble_rows = [
        ("theory (p-1)/(m+p-1)", f"{theory:.3f}", ""),
        ("measured, busiest rank (wall clock)", f"{measured:.3f}",
         f"{measured / theory - 1:+.1%} -> {verdict(targets['bubble_met'])}"),
        ("idle share per rank (wall clock)", ", ".join(f"{v:.3f}" for v in bubble["idle_share_per_rank"]), ""),
        ("receive wait share per rank", ", ".join(f"{v:.3f}" for v in bubble["recv_wait_share_per_rank"]), ""),
        ("replay, solo stage times", f"{replay['bubble_fraction']:.3f}", f"{replay['bubble_fraction'] / theory - 1:+.1%}"),
    ]
    print_table("1F1B bubble fraction (modelpar's executor)", ["measure", "value", "vs theory"], bubble_rows)
    phases = tp["phases_s_forward_backward_optimizer"]
    print("TP phases, slowest rank, median s (forward / backward / optimizer): "
          f"modelpar {' / '.join(f'{v:.3f}' for v in phases['ours'])}, "
          f"torch {' / '.join(f'{v:.3f}' for v in phases['theirs'])}; "
          f"forward + backward only ratio {tp['forward_backward_only_ratio']:.3f}")
    print("PP optimizer step, slowest rank, median s: "
          f"modelpar {pp['optimizer_s']['ours']:.4f}, torch {pp['optimizer_s']['theirs']:.4f}")
    print("PP solo stage times (forward / backward ms per micro-batch): "
          + ", ".join(f"r{r} {f * 1e3:.1f}/{b * 1e3:.1f}"
                      for r, (f, b) in enumerate(zip(replay["forward_s"], replay["backward_s"]))))
    for mode, tables in result["profile"].items():
        for side, table in tables.items():
            print(f"\nprofile, {mode}, {side} (rank 0, one step):\n{table}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved pairs (default 20; --quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side per pair (default 1)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per side before the pairs")
    parser.add_argument("--model", default=None, help="model preset (default gpt-small-cpu; --quick gpt-tiny)")
    parser.add_argument("--quick", action="store_true", help="gpt-tiny, 3 pairs: a smoke run (~15 s)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one step per side")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    repeats = args.repeats if args.repeats is not None else (3 if quick else 20)
    steps = args.steps if args.steps is not None else 1
    for name, value in (("--repeats", repeats), ("--steps", steps)):
        if value < 1:
            raise SpecError(f"{name} must be at least 1, got {value}")
    if args.warmup_steps < 1:
        raise SpecError(f"--warmup-steps must be at least 1 (the first step builds state), got {args.warmup_steps}")
    model = benchmark_model(args.model or ("gpt-tiny" if quick else "gpt-small-cpu"))
    config = BenchConfig(model=model, repeats=repeats, steps=steps, warmup_steps=args.warmup_steps,
                         profile=args.profile)
    validate(config)
    return config


def validate(config: BenchConfig) -> None:
    """SpecError before any rank starts when the model cannot be split t or p ways."""
    from modelpar.models.gpt_parallel import check_tensor_parallel
    from modelpar.runtime.pipeline import stage_layer_ranges

    spec, t = config.model, config.tensor_parallel
    check_tensor_parallel(spec, t, sequence_parallel=False)
    if spec.kv_heads % t:
        raise SpecError(f"model '{spec.name}': the native plan needs KV heads ({spec.kv_heads}) divisible by t = {t}; "
                        f"pick another model")
    stage_layer_ranges(spec.num_layers, config.pipeline_stages)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except SpecError as error:
        print(f"vs_torch_native: error: {error}", file=sys.stderr)
        return 2
    result = run_benchmark(config)
    if args.json:
        if not args.profile:
            result.pop("profile")
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
