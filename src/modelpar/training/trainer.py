"""One rank's share of training: `RankTrainer` runs a `ParallelPlan` on a GPT (`training.run` spawns
the ranks and summarises the run; `training.config` says what a run is).

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

The command line (`modelpar train`, contract in DESIGN.md) is `modelpar.commands.train`.
"""


from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from modelpar.models.gpt import DropoutKey, init_gpt
from modelpar.models.gpt_parallel import parallelize, sync_tensor_parallel_grads
from modelpar.runtime.checkpoint import (Checkpoint, gather_full_gradients, gather_full_state_dict, read_checkpoint,
                                         save_checkpoint, shard_parameter_tensors)
from modelpar.runtime.data_parallel import GradientReducer, all_reduce_gradients, default_grad_of, set_grad
from modelpar.runtime.grad_norm import clip_factor, global_grad_norm, norm_ranges
from modelpar.runtime.mesh import global_rank
from modelpar.runtime.pipeline import PipelineExecutor, PipelineTopology, build_chunks, tied_parameters
from modelpar.runtime.precision import MainGradients, PrecisionPolicy
from modelpar.runtime.recompute import apply_recompute
from modelpar.runtime.tensor_parallel import shard_layouts_by_parameter
from modelpar.runtime.timeline import Timeline
from modelpar.runtime.zero import AdamW, OptimizerState, ZeroOneAdamW, decay_everything, decay_matrices
from modelpar.schedules.actions import build_schedule
from modelpar.schedules.events import GRAD_SYNC_KIND, OPTIMIZER_KIND
from modelpar.specs import SpecError
from modelpar.training.config import TrainConfig
from modelpar.training.data import make_token_source, micro_batches


def read_checkpoint_for(path: str | os.PathLike, spec) -> Checkpoint:
    """`read_checkpoint`, and SpecError unless every tensor fits a GPT of `spec` (ModelSpec)."""
    checkpoint = read_checkpoint(path)
    wrong = checkpoint.first_mismatch(init_gpt(spec, 0))
    if wrong is not None:
        raise SpecError(f"--load-checkpoint {path}: does not match model '{spec.name}' (first difference: "
                        f"{wrong}); load a checkpoint of the same model")
    return checkpoint



def validate_training(config: TrainConfig) -> None:
    """Everything that can be checked before a rank starts; raises SpecError (one line)."""
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
        tied, params = self.spec.tied_embeddings, self.optimizer.params
        exp_avg, exp_avg_sq = (shard_parameter_tensors(self.chunks, self.ctx, serial, tied)
                               for serial in (checkpoint.exp_avg, checkpoint.exp_avg_sq))
        self.optimizer.import_state(OptimizerState([exp_avg[id(p)] for p in params],
                                                   [exp_avg_sq[id(p)] for p in params], checkpoint.optimizer_steps))

    def _init_grad_norm(self) -> None:
        """Counting weights of this rank's gradient elements in the global norm (`runtime.grad_norm`),
        and the group that sums them: the world under ZeRO-1 (disjoint shards), else the model group
        (the data replicas hold the same averaged gradients)."""
        counted_elsewhere = self.tied_params if self.ctx.pipeline_rank != 0 else []  # the last stage's copy
        self.norm_ranges = norm_ranges(self.optimizer.params, shard_layouts_by_parameter(self.modules),
                                       self.ctx.tensor_rank, counted_elsewhere)
        self.norm_group = None if self.zero else self.ctx.model_group
        self.grad_norms: list[float] = []
        self.learning_rates: list[float] = []

    def _embedding_group(self, dist):
        """Process group {pipeline rank 0, pipeline rank p-1} of this rank's (data, tensor) coordinates,
        created collectively for all coordinates (every rank calls new_group in the same order)."""
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
        save_checkpoint(path, self.chunks, self.ctx, metadata, self.optimizer, tied=self.spec.tied_embeddings,
                        master_weights=self.policy.mixed, completed_steps=self.completed_steps)

    @property
    def completed_steps(self) -> int:
        """Training steps done: the checkpoint's, plus the optimizer steps of this trainer."""
        return self.start_step + len(self.grad_norms)

    def full_state_dict(self):
        """Serial state dict on global rank 0 (None elsewhere). Collective."""
        return gather_full_state_dict(self.chunks, self.ctx)

    def full_gradients(self):
        """Serial gradients on global rank 0 after `forward_backward` (None elsewhere). With ZeRO the
        data-parallel mean is taken here, on a copy (the optimizer reduce-scatters the originals). Collective."""
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
