"""Learning-rate schedule: linear warmup, then constant, linear or cosine decay to a floor.

The shape of Megatron-LM's OptimizerParamScheduler (and nanoGPT's ``get_lr``), written for this
runtime; pure Python (no torch), so the planner side and the unit tests can use it. For the
optimizer step s = 0, 1, 2, ... (0-based), with peak learning rate η, floor η_min, W warmup steps
and decay ending at step D:

    s < W:        η (s + 1) / W                          linear warmup (the first step is not wasted at 0)
    W <= s <= D:  r = (s - W) / (D - W)
                  constant:  η
                  linear:    η_min + (η - η_min)(1 - r)
                  cosine:    η_min + (η - η_min)(1 + cos(π r)) / 2     (Loshchilov & Hutter 2017, SGDR)
    s > D:        η_min (η for 'constant')

Megatron counts its scheduler steps from 0 and so trains its first step at lr 0 when warming up;
here step s uses the warmup value of step s + 1. D defaults to the run's number of steps
(Megatron's ``lr_decay_iters`` = ``train_iters``), so the last step trains just above η_min.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modelpar.specs.errors import SpecError

DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LearningRateSchedule:
    """The learning rate of every optimizer step (module docstring gives the formula).

    peak: η, reached at the end of the warmup. warmup_steps: W (0: start at η).
    decay_style: 'constant' | 'linear' | 'cosine'. decay_steps: D, the step at which the decay
    reaches min_learning_rate (None: the run's number of steps). min_learning_rate: η_min.
    """

    peak: float
    warmup_steps: int = 0
    decay_style: str = "constant"
    decay_steps: int | None = None
    min_learning_rate: float = 0.0

    def check(self, total_steps: int) -> None:
        """Raise SpecError (one line, naming the flag) unless the schedule fits a run of `total_steps`."""
        if not _is_number(self.peak) or not math.isfinite(self.peak) or self.peak <= 0:
            raise SpecError(f"--learning-rate must be a positive number, got {self.peak!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise SpecError(f"--lr-warmup-steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.warmup_steps > total_steps:
            raise SpecError(f"--lr-warmup-steps {self.warmup_steps} is more than --steps {total_steps}; "
                            f"warm up for at most {total_steps} steps")
        if self.decay_style not in DECAY_STYLES:
            raise SpecError(f"--lr-decay-style {self.decay_style!r} is unknown; use one of {', '.join(DECAY_STYLES)}")
        if self.decay_steps is not None and (not _is_int(self.decay_steps) or self.decay_steps < 1):
            raise SpecError(f"--lr-decay-steps must be a positive integer, got {self.decay_steps!r}")
        if self.decay_style != "constant" and self.decay_end(total_steps) <= self.warmup_steps:
            raise SpecError(f"--lr-decay-steps {self.decay_end(total_steps)} must be more than --lr-warmup-steps "
                            f"{self.warmup_steps} for {self.decay_style} decay; raise it or shorten the warmup")
        if not _is_number(self.min_learning_rate) or not 0 <= self.min_learning_rate <= self.peak:
            raise SpecError(f"--min-learning-rate {self.min_learning_rate!r} must be between 0 and --learning-rate "
                            f"{self.peak}")

    def decay_end(self, total_steps: int) -> int:
        """D: `decay_steps`, or the run's `total_steps` when not given."""
        return self.decay_steps if self.decay_steps is not None else total_steps

    def at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step `step` (0-based) in a run of `total_steps` steps."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.decay_style == "constant":
            return self.peak
        end = self.decay_end(total_steps)
        if step > end:
            return self.min_learning_rate
        ratio = (step - self.warmup_steps) / (end - self.warmup_steps)
        if self.decay_style == "linear":
            factor = 1.0 - ratio
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_learning_rate + (self.peak - self.min_learning_rate) * factor

    def values(self, total_steps: int) -> list[float]:
        """The learning rate of each of the `total_steps` steps."""
        return [self.at(step, total_steps) for step in range(total_steps)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
