"""What a training run is: `TrainConfig` (everything a rank needs, identical on every rank) with
its documented defaults, and the optimizer settings a run reports. Pure Python (no torch): the
command line imports it to show the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from modelpar.runtime.lr_schedule import LearningRateSchedule
from modelpar.specs import ModelSpec, ParallelPlan

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
    def lr_schedule(self) -> LearningRateSchedule:
        return LearningRateSchedule(self.learning_rate, self.lr_warmup_steps, self.lr_decay_style,
                                    self.lr_decay_steps, self.min_learning_rate)


def optimizer_summary(config: TrainConfig, start_step: int = 0) -> dict:
    """The optimizer settings of a run (resumed after `start_step` steps), for its JSON summary."""
    return {"learning_rate": config.learning_rate, "lr_warmup_steps": config.lr_warmup_steps,
            "lr_decay_style": config.lr_decay_style,
            "lr_decay_steps": config.lr_schedule.decay_end(start_step + config.steps),
            "min_learning_rate": config.min_learning_rate, "weight_decay": config.weight_decay,
            "decay_norms_and_biases": config.decay_norms_and_biases, "clip_grad": config.clip_grad}
