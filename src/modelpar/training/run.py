"""A training run: `run_training` validates the run, spawns one process per rank (or joins
torchrun), trains (`training.trainer.RankTrainer`) and summarises loss, throughput, MFU and
memory, with the planner's prediction (computed once, `planner.prediction.try_predict`) beside
the measurement (`report.comparison`)."""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from modelpar.models.memory_probe import layer_activation_bytes
from modelpar.planner.flops import hfu, mfu
from modelpar.planner.prediction import COMPARED_KEYS, try_predict
from modelpar.report.comparison import measured_times, rank_step_breakdowns, rank_summary, relative_errors
from modelpar.runtime.checkpoint import read_checkpoint
from modelpar.runtime.instrument import ActivationTracker, model_state_bytes, timed_collectives
from modelpar.runtime.launch import choose_backend, default_backend, spawn, under_torchrun
from modelpar.runtime.mesh import ParallelContext, ParallelDims
from modelpar.runtime.precision import DTYPES
from modelpar.schedules.events import COLLECTIVE_KIND, LAUNCH_KIND
from modelpar.specs import ModelSpec, ParallelPlan, SpecError
from modelpar.specs.io import load_local_cluster
from modelpar.specs.plan import complete_plan
from modelpar.training.config import DEFAULT_LEARNING_RATE, DEFAULT_STEPS, TrainConfig, optimizer_summary
from modelpar.training.data import make_token_source
from modelpar.training.trainer import RankTrainer, validate_training


def peak_memory_bytes(device) -> int:
    """CUDA: peak allocated bytes. CPU: peak resident set size of this process (includes the
    Python interpreter and torch, a few hundred MB)."""
    if getattr(device, "type", device) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure_matmul_tflops(dtype: str = "fp32", device: str = "cpu", trials: int = 5, seconds: float = 0.05) -> float:
    """Dense matmul throughput of one device (TFLOP/s, best of `trials`): the 'peak' used for MFU
    when no --cluster is given. On the CPU it is the whole host with all its threads (the spawned
    ranks share it, so each gets 1/world of it)."""
    size = 4096 if device.startswith("cuda") else 512
    a = torch.randn(size, size, dtype=DTYPES[dtype], device=device)
    b = torch.randn(size, size, dtype=DTYPES[dtype], device=device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm up the thread pool / the kernel
    synchronize()
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        synchronize()
        best = max(best, 2.0 * size**3 * count / (time.perf_counter() - start) / 1e12)
    return best


def _train_worker(rank: int, world_size: int, config: TrainConfig) -> dict:
    """Spawned (or torchrun) entry: train and return this rank's measurements (`report.comparison`
    defines them: per-step compute / communication / bubble from the timeline, with collectives
    timed inside the compute spans; peak memory; saved activations)."""
    ctx = ParallelContext(ParallelDims.from_plan(config.plan))
    trainer = RankTrainer(config, ctx, read_checkpoint(config.load_checkpoint) if config.load_checkpoint else None)
    on_cuda = getattr(ctx.device, "type", "cpu") == "cuda"
    tracker = None
    if not on_cuda:  # CPU: activation memory from saved-tensor hooks (CUDA: the allocator's peak)
        tracker = ActivationTracker(excluded=trainer.modules.parameters())
        tracker.attach(trainer.chunks)
    bar = None
    if rank == 0 and config.progress:
        bar = tqdm(total=config.steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    tokens = config.plan.global_batch_size * config.model.seq_length
    losses, step_times, last_step_events = [], [], []
    step_events, activation_peaks, states = [], [], None
    totals: dict[str, float] = {}  # seconds by event kind (compute, recv, send, grad_sync, ...) over all steps
    dist.barrier()
    with timed_collectives(trainer.timeline):
        for step in range(trainer.start_step, trainer.start_step + config.steps):
            if step == trainer.start_step + config.steps - 1 and step > trainer.start_step:
                dist.barrier()  # the recorded timeline is the last step's, from a common start on every rank
            start = time.perf_counter()
            loss = trainer.forward_backward(step)
            if states is None:  # gradients exist now and the optimizer has not cleared them
                pause = time.perf_counter()
                states = model_state_bytes(trainer.modules, trainer.optimizer, trainer.state_tensors())
                start += time.perf_counter() - pause
            trainer.optimizer_step()
            if trainer.ctx.device.type == "cuda":  # step time must include the GPU's queued work
                torch.cuda.synchronize(trainer.ctx.device)
            losses.append(loss)
            step_times.append(time.perf_counter() - start)
            events = trainer.timeline.events
            step_events.append(list(events))
            if tracker is not None:
                activation_peaks.append(tracker.peak_bytes(trainer.executor.actions))
            last_step_events = [replace(e, start_s=e.start_s - start, end_s=e.end_s - start) for e in events
                                if e.kind not in (COLLECTIVE_KIND, LAUNCH_KIND)]
            for event in events:
                totals[event.kind] = totals.get(event.kind, 0.0) + event.duration_s
            events.clear()
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", grad_norm=f"{trainer.grad_norms[-1]:.3g}",
                                tok_per_s=f"{tokens / step_times[-1]:.0f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    if tracker is not None:
        tracker.detach()
    if config.save_checkpoint:
        trainer.save_checkpoint(config.save_checkpoint, {"model": config.model.name, "plan": config.plan.to_dict(),
                                                         "steps": config.steps, "seed": config.seed,
                                                         "dtype": config.dtype})
    warm = slice(1, None) if config.steps > 1 else slice(None)  # the first step warms up
    if on_cuda:
        peak = peak_memory_bytes(ctx.device)
    else:
        peak = sum(states.values()) + max(activation_peaks)
    mine = {"rank": rank, "start_step": trainer.start_step, "losses": losses, "grad_norms": trainer.grad_norms,
            "learning_rates": trainer.learning_rates, "step_times_s": step_times,
            "step_events": step_events[warm], "warm_step_times_s": step_times[warm],
            "peak_memory_bytes": peak, "peak_rss_bytes": peak_memory_bytes("cpu"),
            "model_state_bytes": states, "peak_activation_bytes": max(activation_peaks) if activation_peaks else None,
            "activation_bytes_per_layer": layer_activation_bytes(config.model, config.plan, config.dtype, ctx),
            "time_by_kind_s": totals, "last_step_timeline": last_step_events}
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered  # every rank's measurements on rank 0, None elsewhere


def run_training(model_spec: ModelSpec, plan: ParallelPlan, steps: int = DEFAULT_STEPS, seed: int = 0,
                 dtype: str = "fp32", data_path: str | None = None, *, learning_rate: float = DEFAULT_LEARNING_RATE,
                 cluster=None, timeout_s: float = 600.0, collective_timeout_s: float | None = None,
                 progress: bool = True,
                 crash_rank: int | None = None, p2p: str | None = None, load_checkpoint: str | None = None,
                 save_checkpoint: str | None = None, **optimizer_options) -> dict | None:
    """Train `steps` steps of `plan` (partial plans are completed with the runtime defaults) and
    return the summary: losses and gradient norms per step, step time, tokens/s, MFU, peak
    memory, the plan, and the planner's prediction when a `cluster` (ClusterSpec) is given (None
    on torchrun ranks other than 0). `optimizer_options`: TrainConfig's optimizer fields
    (weight_decay, clip_grad, lr_warmup_steps, lr_decay_style, lr_decay_steps, min_learning_rate,
    decay_norms_and_biases).
    Raises SpecError before any rank starts when the plan cannot run, and `launch.RankFailure`
    naming the rank when one fails."""
    plan = complete_plan(plan)
    config = TrainConfig(model_spec, plan, steps, seed, dtype, data_path, learning_rate, progress=progress,
                         crash_rank=crash_rank, p2p=p2p,
                         load_checkpoint=load_checkpoint, save_checkpoint=save_checkpoint, **optimizer_options)
    validate_training(config)
    world = plan.world_size
    torchrun = under_torchrun()
    backend = default_backend() if torchrun else choose_backend(world)
    cluster_error = None
    if cluster is None and backend == "gloo":  # CPU ranks: this machine's profile, when there is one

        try:
            cluster = load_local_cluster()
        except SpecError as error:
            cluster_error = str(error)
    elif cluster is None:
        cluster_error = "no cluster given: pass --cluster to compare with the planner"
    if cluster is not None:
        cluster = cluster.for_world_size(world)  # once: the prediction and the MFU peak
    predicted, prediction_error = try_predict(model_spec, plan, cluster, dtype, cluster_error)
    if cluster is not None:
        peak = cluster.device.peak_tflops
        peak_source = f"cluster {cluster.name}"
    elif torchrun or backend == "nccl":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if backend == "nccl" else "cpu"
        peak, peak_source = measure_matmul_tflops(dtype, device), f"measured {device} matmul"
    else:
        peak, peak_source = measure_matmul_tflops(dtype) / world, "measured host matmul / ranks"
    # torchrun: this process's rank only (NCCL on GPUs); otherwise gloo ranks on this machine's CPU
    results = spawn(_train_worker, world, (config,), timeout_s=timeout_s, backend=backend,
                    collective_timeout=collective_timeout_s)
    rank_results = next((r for r in results if r is not None), None)
    if rank_results is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    summary = summarise(config, rank_results, peak, peak_source, predicted)
    summary["prediction"] = {"cluster": cluster.name if cluster is not None else None, "error": prediction_error,
                             **({"breakdown": predicted["breakdown"], "memory": predicted["memory"],
                                 "timeline": [e.to_dict() for e in predicted["events"]]} if predicted else {})}
    return summary


def summarise(config: TrainConfig, rank_results: list[dict], peak_tflops: float, peak_source: str,
              predicted: dict | None = None) -> dict:
    """The JSON summary of a run from the ranks' measurements: rank 0's losses; `measured` and
    `predicted` with the same keys (`planner.prediction.COMPARED_KEYS`, tokens/s, MFU) and
    `relative_error`. Step time: the slowest rank's median over the steps after the first
    (which includes warm-up)."""
    plan, model = config.plan, config.model
    first = rank_results[0]
    breakdowns = rank_step_breakdowns([result["warm_step_times_s"] for result in rank_results],
                                      [result["step_events"] for result in rank_results])
    for result, steps in zip(rank_results, breakdowns):
        result["breakdown"] = rank_summary(steps, result["warm_step_times_s"])
    times = measured_times([result["breakdown"] for result in rank_results])
    step_time = times["step_time_s"]
    world = plan.world_size
    tokens = plan.global_batch_size * model.seq_length
    measured = {
        **times,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rank_results),
        "activation_bytes_per_layer": max(r["activation_bytes_per_layer"] for r in rank_results),
        "tokens_per_s": tokens / step_time,
        "mfu": mfu(model, plan.global_batch_size, step_time, world, peak_tflops),
    }
    if predicted is not None:
        predicted = {key: predicted[key] for key in measured}
    details = {
        "hfu": hfu(model, plan.global_batch_size, plan.recompute, step_time, world, peak_tflops),
        "peak_tflops_per_device": peak_tflops,
        "peak_tflops_source": peak_source,
        "step_times_s": first["step_times_s"],
        "per_rank": [{key: r[key] for key in ("rank", "breakdown", "peak_memory_bytes", "peak_rss_bytes",
                                              "model_state_bytes", "peak_activation_bytes",
                                              "activation_bytes_per_layer", "time_by_kind_s")}
                     for r in rank_results],
    }
    return {
        "model": model.name, "plan": plan.to_dict(), "dtype": config.dtype, "steps": config.steps,
        "start_step": first["start_step"], "seed": config.seed, "world_size": world,
        "data": make_token_source(config.data_path, model.vocab_size, config.seed).description,
        "losses": first["losses"], "grad_norms": first["grad_norms"], "learning_rates": first["learning_rates"],
        "optimizer": optimizer_summary(config, first["start_step"]), "step_time_s": step_time,
        "tokens_per_s": measured["tokens_per_s"], "mfu": measured["mfu"],
        "peak_memory_bytes": measured["peak_memory_bytes"],
        "measured": measured, "predicted": predicted, "relative_error": relative_errors(predicted, measured),
        "compared_keys": list(COMPARED_KEYS), "measurement": details,
        "timeline": {str(r["rank"]): [e.to_dict() for e in r["last_step_timeline"]] for r in rank_results},
    }
