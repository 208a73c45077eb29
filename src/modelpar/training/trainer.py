"""The training loop: one `RankTrainer` per rank runs a `ParallelPlan` on a GPT; `run_training`
spawns the ranks (or joins torchrun) and summarises loss, throughput, MFU and memory.

One step on every rank:

1. build the step's global batch from (seed, step) and keep this replica's m micro-batches;
2. `PipelineExecutor` runs the rank's schedule actions (forward/backward of its chunks, p2p);
   data-parallel buckets are all-reduced from gradient hooks during the last backward of each chunk;
3. gradient synchronisation: wait for the buckets; sum the tied word-embedding gradient of the
   first and last stage (p > 1); sum sequence-parallel / replicated-KV gradients over the tensor group
   (bf16: all of it on fp32 main gradients, `runtime.precision.MainGradients`);
4. the step's loss, mean over the global batch, is all-reduced to every rank;
5. optimizer step: ZeRO-1 reduce-scatters the gradients; the global gradient norm (every serial
   parameter counted once, `runtime.grad_norm`) is logged and, with a clip, the gradients are scaled
   to it; the learning rate comes from the schedule (`runtime.lr_schedule`: warmup, then constant,
   linear or cosine decay); AdamW (ZeRO-1 shards it over the data group; bf16 keeps fp32 master
   weights) decays weight matrices and embeddings but not biases and norm weights.

A run resumed from a checkpoint (`runtime.checkpoint`: weights, AdamW state, step count; any
layout) continues at the saved step: batches, dropout keys and the learning rate follow it.

This module imports torch only inside functions, so `modelpar --help` and `modelpar plan` start fast.
The command line (`modelpar train`, contract in DESIGN.md) is `modelpar.commands.train`.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field, replace

from modelpar.planner.prediction import COMPARED_KEYS, try_predict
from modelpar.schedules.events import COLLECTIVE_KIND, GRAD_SYNC_KIND, LAUNCH_KIND, OPTIMIZER_KIND
from modelpar.specs import ModelSpec, ParallelPlan, SpecError
from modelpar.specs.plan import complete_plan

DEFAULT_STEPS = 20
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_WEIGHT_DECAY = 0.1
DEFAULT_CLIP_GRAD = 0.0
"""Gradient clipping is off by default (0); Megatron-LM's default is 1.0 (`--clip-grad 1.0`)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a rank needs to train; picklable, identical on every rank."""

    model: ModelSpec
    plan: ParallelPlan
    steps: int = DEFAULT_STEPS
    seed: int = 0
    dtype: str = "fp32"
    data_path: str | None = field(default=None, metadata={"doc": "text file, 'synthetic', or None (packaged corpus)"})
    learning_rate: float = DEFAULT_LEARNING_RATE
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    bucket_bytes: int = 25 * 2**20
    progress: bool = True
    crash_rank: int | None = field(default=None, metadata={
        "doc": "fault injection for tests: this rank exits abruptly (os._exit(17)) at the start of step 1"})
    p2p: str | None = field(default=None, metadata={
        "doc": "pipeline point-to-point mode: 'tagged' or 'batched' (`runtime.pipeline.resolve_p2p_mode`; "
               "None: batched on NCCL, tagged on gloo)"})
    load_checkpoint: str | None = field(default=None, metadata={
        "doc": "resume from this checkpoint (`runtime.checkpoint`, any layout): weights, AdamW state, step"})
    save_checkpoint: str | None = field(default=None, metadata={
        "doc": "write the final weights, AdamW state and step count here (serial layout)"})
    clip_grad: float = field(default=DEFAULT_CLIP_GRAD, metadata={"doc": "max global gradient norm; 0: no clipping"})
    lr_warmup_steps: int = field(default=0, metadata={"doc": "linear warmup steps (`runtime.lr_schedule`)"})
    lr_decay_style: str = field(default="constant", metadata={"doc": "after warmup: constant | linear | cosine"})
    lr_decay_steps: int | None = field(default=None, metadata={
        "doc": "step where decay ends; None: the last step (resumed: checkpoint steps + `steps`)"})
    min_learning_rate: float = field(default=0.0, metadata={"doc": "floor of the linear / cosine decay"})
    decay_norms_and_biases: bool = field(default=False, metadata={
        "doc": "False (Megatron-LM / nanoGPT convention): weight decay on weight matrices and embeddings, "
               "not on biases and norm weights; True: on every parameter"})

    @property
    def lr_schedule(self):
        from modelpar.runtime.lr_schedule import LearningRateSchedule

        return LearningRateSchedule(self.learning_rate, self.lr_warmup_steps, self.lr_decay_style,
                                    self.lr_decay_steps, self.min_learning_rate)


def read_checkpoint_for(path: str | os.PathLike, spec) -> Checkpoint:
    """`read_checkpoint`, and SpecError unless every tensor fits a GPT of `spec` (ModelSpec)."""
    from modelpar.models.gpt import init_gpt
    from modelpar.runtime.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    wrong = checkpoint.first_mismatch(init_gpt(spec, 0))
    if wrong is not None:
        raise SpecError(f"--load-checkpoint {path}: does not match model '{spec.name}' (first difference: "
                        f"{wrong}); load a checkpoint of the same model")
    return checkpoint



def validate_training(config: TrainConfig) -> None:
    """Everything that can be checked before a rank starts; raises SpecError (one line)."""
    from modelpar.training.data import make_token_source
    from modelpar.runtime.precision import PrecisionPolicy

    plan, model = config.plan, config.model
    plan.check(model, plan.world_size, runtime=True)
    PrecisionPolicy(config.dtype)
    if isinstance(config.steps, bool) or not isinstance(config.steps, int) or config.steps < 1:
        raise SpecError(f"--steps must be a positive integer, got {config.steps!r}")
    start_step = 0
    if config.load_checkpoint is not None:
        start_step = read_checkpoint_for(config.load_checkpoint, model).completed_steps
    if config.save_checkpoint is not None and not os.path.isdir(os.path.dirname(os.path.abspath(
            config.save_checkpoint))):
        raise SpecError(f"--save-checkpoint {config.save_checkpoint}: no such directory; create it first")
    config.lr_schedule.check(start_step + config.steps)  # a resumed run continues the schedule
    if not _is_real(config.clip_grad) or not 0 <= config.clip_grad < float("inf"):
        raise SpecError(f"--clip-grad must be a finite number >= 0 (0 turns clipping off), got {config.clip_grad!r}")
    if not _is_real(config.weight_decay) or not 0 <= config.weight_decay < float("inf"):
        raise SpecError(f"--weight-decay must be a finite number >= 0, got {config.weight_decay!r}")
    source = make_token_source(config.data_path, model.vocab_size, config.seed)
    source.global_batch(0, 1, model.seq_length)  # a text shorter than one sequence fails here


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RankTrainer:
    """One rank's share of the training: its pipeline chunks (tensor-parallel modules inside),
    the schedule executor, data-parallel reducers and the optimizer.

    `initial_state`: start from a serial state dict (weights only) or a `runtime.checkpoint.Checkpoint`
    (weights, fp32 master weights, AdamW state, and the step to continue from: `start_step`)
    instead of `init_gpt(seed)` at step 0.
    """

    def __init__(self, config: TrainConfig, ctx, initial_state=None) -> None:
        import torch
        import torch.distributed as dist
        from torch import nn

        from modelpar.training.data import make_token_source
        from modelpar.models.gpt import init_gpt
        from modelpar.models.gpt_parallel import parallelize
        from modelpar.runtime.checkpoint import Checkpoint
        from modelpar.runtime.data_parallel import GradientReducer
        from modelpar.runtime.timeline import Timeline
        from modelpar.runtime.pipeline import (PipelineExecutor, PipelineTopology, build_chunks,
                                               tied_parameters)
        from modelpar.runtime.precision import MainGradients, PrecisionPolicy
        from modelpar.runtime.recompute import apply_recompute
        from modelpar.schedules.actions import build_schedule
        from modelpar.runtime.zero import AdamW, ZeroOneAdamW, decay_everything, decay_matrices

        self.config, self.ctx = config, ctx
        plan, spec = config.plan, config.model
        self.plan, self.spec = plan, spec
        t, p, d, v = plan.tensor_parallel, plan.pipeline_parallel, plan.data_parallel, plan.virtual_stages
        self.num_micro_batches = m = plan.num_micro_batches
        self.policy = PrecisionPolicy(config.dtype)
        self.source = make_token_source(config.data_path, spec.vocab_size, config.seed)
        self.lr_schedule = config.lr_schedule

        checkpoint = Checkpoint(initial_state) if isinstance(initial_state, dict) else initial_state
        self.start_step = checkpoint.completed_steps if checkpoint is not None else 0
        serial = init_gpt(spec, config.seed)
        if checkpoint is not None:  # the master weights, if saved: the optimizer copies them below
            checkpoint.load_weights(serial)
        model = parallelize(serial, ctx, plan.sequence_parallel)
        self.chunks = build_chunks(model, ctx.pipeline_rank, p, v)
        self.modules = nn.ModuleList(self.chunks)
        apply_recompute([layer for chunk in self.chunks for layer in chunk.layers], plan.recompute)
        self.tied = spec.tied_embeddings and p > 1
        self.tied_params = [param for _, param in tied_parameters(model)] if self.tied else []
        self.embedding_group = self._embedding_group(dist) if self.tied else None
        del model, serial

        params = list(self.modules.parameters())
        adamw = dict(lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8, weight_decay=config.weight_decay,
                     decays=decay_everything if config.decay_norms_and_biases else decay_matrices)
        self.zero = plan.zero_stage >= 1 and d > 1
        if self.zero or self.policy.mixed:  # fp32 master weights captured before the bf16 cast
            self.optimizer = ZeroOneAdamW(params, ctx.data_group if self.zero else None, **adamw)
        else:
            self.optimizer = AdamW(params, **adamw)
        if checkpoint is not None and checkpoint.has_optimizer_state:
            self._load_optimizer_state(checkpoint)
        self.policy.cast_model(self.modules)
        # bf16: micro-batch gradients accumulate in fp32 main_grad; hooks registered before the reducers'
        self.main_grads = MainGradients(params) if self.policy.mixed else None
        self.reducers = None
        if d > 1 and not self.zero:
            self.reducers = [GradientReducer(list(chunk.parameters()), ctx.data_group, config.bucket_bytes)
                             for chunk in self.chunks]
        self._init_grad_norm()

        local_seq = spec.seq_length // t if (plan.sequence_parallel and t > 1) else spec.seq_length
        self.timeline = Timeline(ctx.rank)
        self.executor = PipelineExecutor(
            self.chunks, PipelineTopology.from_context(ctx, v),
            build_schedule(plan.schedule, p, m, v), m,
            (plan.micro_batch_size, local_seq, spec.hidden_size), self.policy.compute_dtype, ctx.device,
            grad_reducers=self.reducers, loss_fn=self.policy.loss_for_backward, timeline=self.timeline,
            p2p=config.p2p,
        )

    def _load_optimizer_state(self, checkpoint) -> None:
        """Cut this rank's parameters' moments from the checkpoint's serial ones (the optimizer keeps
        its ZeRO-1 slice)."""
        from modelpar.runtime.checkpoint import shard_parameter_tensors
        from modelpar.runtime.zero import OptimizerState

        tied, params = self.spec.tied_embeddings, self.optimizer.params
        exp_avg, exp_avg_sq = (shard_parameter_tensors(self.chunks, self.ctx, serial, tied)
                               for serial in (checkpoint.exp_avg, checkpoint.exp_avg_sq))
        self.optimizer.import_state(OptimizerState([exp_avg[id(p)] for p in params],
                                                   [exp_avg_sq[id(p)] for p in params], checkpoint.optimizer_steps))

    def _init_grad_norm(self) -> None:
        """Counting weights of this rank's gradient elements in the global norm (`runtime.grad_norm`),
        and the group that sums them: the world under ZeRO-1 (disjoint shards), else the model group
        (the data replicas hold the same averaged gradients)."""
        from modelpar.runtime.tensor_parallel import shard_layouts_by_parameter
        from modelpar.runtime.grad_norm import norm_ranges

        counted_elsewhere = self.tied_params if self.ctx.pipeline_rank != 0 else []  # the last stage's copy
        self.norm_ranges = norm_ranges(self.optimizer.params, shard_layouts_by_parameter(self.modules),
                                       self.ctx.tensor_rank, counted_elsewhere)
        self.norm_group = None if self.zero else self.ctx.model_group
        self.grad_norms: list[float] = []
        self.learning_rates: list[float] = []

    def _embedding_group(self, dist):
        """Process group {pipeline rank 0, pipeline rank p-1} of this rank's (data, tensor) coordinates,
        created collectively for all coordinates (every rank calls new_group in the same order)."""
        from modelpar.runtime.mesh import global_rank

        dims, mine = self.ctx.dims, None
        for data_idx in range(dims.data):
            for tensor_idx in range(dims.tensor):
                ranks = [global_rank(dims, data_idx, 0, tensor_idx),
                         global_rank(dims, data_idx, dims.pipeline - 1, tensor_idx)]
                group = dist.new_group(ranks)
                if self.ctx.rank in ranks:
                    mine = group
        return mine

    # -- one step ---------------------------------------------------------------------------------
    def forward_backward(self, step: int) -> float:
        """Run the schedule and synchronise the gradients; returns the step's mean loss (every rank)."""
        import torch
        import torch.distributed as dist

        from modelpar.training.data import micro_batches
        from modelpar.models.gpt import DropoutKey
        from modelpar.models.gpt_parallel import sync_tensor_parallel_grads
        from modelpar.runtime.data_parallel import all_reduce_gradients

        if self.config.crash_rank == self.ctx.rank and step == self.start_step + 1:
            os._exit(17)
        plan, ctx, b = self.plan, self.ctx, self.plan.micro_batch_size
        batch = self.source.global_batch(step, plan.global_batch_size, self.spec.seq_length)
        batches = micro_batches(batch, ctx.data_rank, plan.data_parallel, b)
        keys = [DropoutKey(self.config.seed, step, (ctx.data_rank * self.num_micro_batches + i) * b)
                for i in range(self.num_micro_batches)]
        loss_sum = self.executor.run(batches, keys)
        with self.timeline.span(GRAD_SYNC_KIND, f"step {step}"):
            for reducer in self.reducers or ():
                reducer.finish()
            if self.embedding_group is not None:
                all_reduce_gradients(self.tied_params, self.embedding_group, average=False)
            sync_tensor_parallel_grads(self.modules, ctx)
        contribution = loss_sum.double() / plan.data_parallel if (loss_sum is not None and ctx.tensor_rank == 0) \
            else torch.zeros((), dtype=torch.float64)
        contribution = contribution.reshape(1).to(ctx.device)
        dist.all_reduce(contribution)
        return float(contribution.item())

    def optimizer_step(self) -> float:
        """Reduce (ZeRO-1), measure the global gradient norm, clip, set the scheduled learning rate,
        step and clear the gradients. Returns the norm before clipping (also in `grad_norms`)."""
        from modelpar.runtime.grad_norm import clip_factor, global_grad_norm

        with self.timeline.span(OPTIMIZER_KIND, "optimizer"):
            self.optimizer.reduce_gradients()
            norm = global_grad_norm(self.optimizer.gradient_pieces(), self.norm_ranges, self.norm_group,
                                    self.ctx.device)
            if self.config.clip_grad > 0:
                factor = clip_factor(norm, self.config.clip_grad)
                if factor < 1.0:
                    self.optimizer.scale_gradients(factor)
            self.optimizer.lr = self.lr_schedule.at(self.completed_steps, self.start_step + self.config.steps)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.grad_norms.append(norm)
        self.learning_rates.append(self.optimizer.lr)
        return norm

    def step(self, step: int) -> float:
        loss = self.forward_backward(step)
        self.optimizer_step()
        return loss

    # -- gathering ----------------------------------------------------------------------------------
    def save_checkpoint(self, path: str, metadata: dict | None = None) -> None:
        """Write the weights, AdamW state (and fp32 master weights in bf16) and the number of steps
        done, in the serial layout (`runtime.checkpoint`), from global rank 0. Collective."""
        from modelpar.runtime.checkpoint import save_checkpoint

        save_checkpoint(path, self.chunks, self.ctx, metadata, self.optimizer, tied=self.spec.tied_embeddings,
                        master_weights=self.policy.mixed, completed_steps=self.completed_steps)

    @property
    def completed_steps(self) -> int:
        """Training steps done: the checkpoint's, plus the optimizer steps of this trainer."""
        return self.start_step + len(self.grad_norms)

    def full_state_dict(self):
        """Serial state dict on global rank 0 (None elsewhere). Collective."""
        from modelpar.runtime.checkpoint import gather_full_state_dict

        return gather_full_state_dict(self.chunks, self.ctx)

    def full_gradients(self):
        """Serial gradients on global rank 0 after `forward_backward` (None elsewhere). With ZeRO the
        data-parallel mean is taken here, on a copy (the optimizer reduce-scatters the originals). Collective."""
        from modelpar.runtime.checkpoint import gather_full_gradients
        from modelpar.runtime.data_parallel import all_reduce_gradients, default_grad_of, set_grad

        saved = None
        if self.zero:
            params = list(self.modules.parameters())
            saved = [None if default_grad_of(p) is None else default_grad_of(p).clone() for p in params]
            all_reduce_gradients(params, self.ctx.data_group)
        grads = gather_full_gradients(self.chunks, self.ctx, self.tied)
        if saved is not None:
            for param, grad in zip(params, saved):
                if grad is not None:
                    set_grad(param, grad)
        return grads

    def state_tensors(self) -> list:
        """Gradient-side buffers beyond ``.grad`` (bucket buffers, fp32 main gradients), for the
        memory accounting of `runtime.instrument.model_state_bytes`."""
        main = [p.main_grad for p in self.main_grads.params if p.main_grad is not None] if self.main_grads else []
        return [*(self.reducers or ()), main]


# --- measurements -----------------------------------------------------------------------------------


def peak_memory_bytes(device) -> int:
    """CUDA: peak allocated bytes. CPU: peak resident set size of this process (includes the
    Python interpreter and torch, a few hundred MB)."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure_matmul_tflops(dtype: str = "fp32", device: str = "cpu", trials: int = 5, seconds: float = 0.05) -> float:
    """Dense matmul throughput of one device (TFLOP/s, best of `trials`): the 'peak' used for MFU
    when no --cluster is given. On the CPU it is the whole host with all its threads (the spawned
    ranks share it, so each gets 1/world of it)."""
    import torch

    from modelpar.runtime.precision import DTYPES

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
    import torch
    import torch.distributed as dist

    from modelpar.runtime.checkpoint import read_checkpoint
    from modelpar.models.memory_probe import layer_activation_bytes
    from modelpar.runtime.instrument import ActivationTracker, model_state_bytes, timed_collectives
    from modelpar.runtime.mesh import ParallelContext, ParallelDims

    ctx = ParallelContext(ParallelDims.from_plan(config.plan))
    trainer = RankTrainer(config, ctx, read_checkpoint(config.load_checkpoint) if config.load_checkpoint else None)
    on_cuda = getattr(ctx.device, "type", "cpu") == "cuda"
    tracker = None
    if not on_cuda:  # CPU: activation memory from saved-tensor hooks (CUDA: the allocator's peak)
        tracker = ActivationTracker(excluded=trainer.modules.parameters())
        tracker.attach(trainer.chunks)
    bar = None
    if rank == 0 and config.progress:
        from tqdm import tqdm

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
                 cluster=None, timeout_s: float = 600.0, progress: bool = True,
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
    from modelpar.runtime.launch import choose_backend, default_backend, spawn, under_torchrun

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
        from modelpar.specs.io import load_local_cluster

        try:
            cluster = load_local_cluster()
        except SpecError as error:
            cluster_error = str(error)
    elif cluster is None:
        cluster_error = "no cluster given: pass --cluster to compare with the planner"
    predicted, prediction_error = try_predict(model_spec, plan, cluster, dtype, cluster_error)
    if cluster is not None:
        peak = cluster.for_world_size(world).device.peak_tflops
        peak_source = f"cluster {cluster.name}"
    elif torchrun or backend == "nccl":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if backend == "nccl" else "cpu"
        peak, peak_source = measure_matmul_tflops(dtype, device), f"measured {device} matmul"
    else:
        peak, peak_source = measure_matmul_tflops(dtype) / world, "measured host matmul / ranks"
    # torchrun: this process's rank only (NCCL on GPUs); otherwise gloo ranks on this machine's CPU
    results = spawn(_train_worker, world, (config,), timeout_s=timeout_s, backend=backend)
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
    from modelpar.training.data import make_token_source
    from modelpar.planner.flops import hfu, mfu
    from modelpar.report.comparison import measured_times, rank_step_breakdowns, rank_summary, relative_errors

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


def optimizer_summary(config: TrainConfig, start_step: int = 0) -> dict:
    """The optimizer settings of a run (resumed after `start_step` steps), for its JSON summary."""
    return {"learning_rate": config.learning_rate, "lr_warmup_steps": config.lr_warmup_steps,
            "lr_decay_style": config.lr_decay_style,
            "lr_decay_steps": config.lr_schedule.decay_end(start_step + config.steps),
            "min_learning_rate": config.min_learning_rate, "weight_decay": config.weight_decay,
            "decay_norms_and_biases": config.decay_norms_and_biases, "clip_grad": config.clip_grad}


__all__ = ["TrainConfig", "RankTrainer", "run_training", "validate_training", "optimizer_summary",
           "summarise"]
