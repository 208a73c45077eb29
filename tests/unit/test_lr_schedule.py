"""Optimizer options of `modelpar train` without a process group: the learning-rate schedule's
values, the norm-counting weights, padded vocabulary layouts, the flags and their one-line errors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from modelpar.commands import cli
from modelpar.runtime.grad_norm import WeightedRange, clip_factor, norm_ranges, weighted_square_sum
from modelpar.runtime.lr_schedule import LearningRateSchedule
from modelpar.models.gpt_parallel import qkv_rows
from modelpar.runtime.tensor_parallel import ShardLayout, padded_chunk_layout
from modelpar.runtime.zero import AdamW, ZeroOneAdamW, decay_matrices
from modelpar.specs import MODEL_PRESETS, ParallelPlan, SpecError
from modelpar.specs.plan import complete_plan
from modelpar.training.config import TrainConfig
from modelpar.training.trainer import validate_training
from modelpar.commands.train import add_arguments as add_train_arguments, optimizer_options_from_args


def test_warmup_then_cosine_decay_to_the_floor():
    schedule = LearningRateSchedule(1.0, warmup_steps=4, decay_style="cosine", decay_steps=8, min_learning_rate=0.1)
    values = schedule.values(10)
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, peak at the last warmup step
    assert values[4] == 1.0  # decay starts at the peak
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi / 2) = 0
    assert values[5] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert values[8] == pytest.approx(0.1) and values[9] == 0.1  # at and past the end: the floor
    assert all(a >= b for a, b in zip(values[3:], values[4:]))


def test_linear_and_constant_styles_and_the_default_decay_end():
    linear = LearningRateSchedule(2.0, decay_style="linear", min_learning_rate=0.0)
    assert linear.values(4) == [2.0, 1.5, 1.0, 0.5]  # decays over the run's 4 steps by default
    constant = LearningRateSchedule(2.0, warmup_steps=2)
    assert constant.values(4) == [1.0, 2.0, 2.0, 2.0]
    assert LearningRateSchedule(3e-3).values(3) == [3e-3] * 3  # the default: the old fixed learning rate


@pytest.mark.parametrize("schedule, message", [
    (LearningRateSchedule(1.0, warmup_steps=11), "--lr-warmup-steps 11 is more than --steps 10"),
    (LearningRateSchedule(1.0, warmup_steps=-1), "--lr-warmup-steps must be a non-negative integer"),
    (LearningRateSchedule(-1.0), "--learning-rate must be a positive number"),
    (LearningRateSchedule(1.0, decay_style="cosine", warmup_steps=5, decay_steps=5), "must be more than"),
    (LearningRateSchedule(1.0, decay_style="step"), "--lr-decay-style 'step' is unknown"),
    (LearningRateSchedule(1.0, min_learning_rate=2.0), "--min-learning-rate 2.0 must be between 0"),
    (LearningRateSchedule(1.0, decay_steps=0), "--lr-decay-steps must be a positive integer"),
])
def test_bad_schedules_are_spec_errors(schedule, message):
    with pytest.raises(SpecError, match=message):
        schedule.check(10)


def test_norm_ranges_count_replicated_elements_once():
    # t = 4 ranks, 4 query heads, 2 KV heads of dim 1: every K/V row is held by 2 ranks
    qkv_layout = ShardLayout(0, qkv_rows(4, 2, 1, 4), 8)
    qkv = torch.ones(3, 2)  # rank 1: query row 1, K row 4, V row 6 (x 2 input columns)
    norm = torch.ones(5)  # replicated over the tensor group: counted on tensor rank 0 only
    tied = torch.ones(2, 2)  # a tied copy counted on another pipeline rank
    layouts = {id(qkv): qkv_layout}
    rank1 = norm_ranges([norm, qkv, tied], layouts, tensor_rank=1, excluded=[tied])
    assert rank1 == (WeightedRange(5, 7, 1.0), WeightedRange(7, 11, 0.5))
    rank0 = norm_ranges([norm, qkv], layouts, tensor_rank=0)
    assert rank0 == (WeightedRange(0, 7, 1.0), WeightedRange(7, 11, 0.5))
    values = torch.arange(11.0)
    want = sum(v * v for v in range(7)) + 0.5 * sum(v * v for v in range(7, 11))
    pieces = [(0, values[:3]), (3, values[3:])]  # the sum does not depend on how the gradient is cut
    assert float(weighted_square_sum(pieces, rank0)) == pytest.approx(want)


def test_clip_factor():
    assert clip_factor(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert clip_factor(0.5, 1.0) == 1.0


def test_padded_vocabulary_layout_round_trips_the_serial_rows():
    layout = padded_chunk_layout(9, 4)  # 3 rows per rank; rank 3 holds padding only
    assert layout.local_size == 3 and [len(i) for i in layout.indices] == [3, 3, 3, 0]
    full = torch.randn(9, 5)
    parts = [layout.shard(full, rank) for rank in range(4)]
    assert all(part.shape == (3, 5) for part in parts)
    assert torch.equal(parts[3], torch.zeros(3, 5))
    assert torch.equal(layout.assemble(parts), full)
    assert padded_chunk_layout(8, 4).local_size is None  # divisible: no padding


def test_optimizers_skip_decay_on_biases_and_norm_weights():
    matrix, bias = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    for optimizer in (AdamW([matrix, bias], lr=0.1, weight_decay=0.5, decays=decay_matrices),
                      ZeroOneAdamW([matrix, bias], None, lr=0.1, weight_decay=0.5, decays=decay_matrices)):
        with torch.no_grad():
            matrix.fill_(1.0)
            bias.fill_(1.0)
        matrix.grad, bias.grad = torch.zeros(2, 2), torch.zeros(2)
        optimizer.step()  # zero gradient: only the decay moves the weights
        assert torch.allclose(matrix, torch.full((2, 2), 1 - 0.1 * 0.5)), type(optimizer).__name__
        assert torch.equal(bias.detach(), torch.ones(2)), type(optimizer).__name__


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(["--model", "gpt-tiny", *argv])


def test_flags_reach_the_training_config():
    args = _parse("--clip-grad", "1.0", "--lr-warmup-steps", "2", "--lr-decay-style", "cosine", "--lr-decay-steps",
                  "9", "--min-learning-rate", "1e-4", "--weight-decay", "0.01", "--steps", "10")
    options = optimizer_options_from_args(args)
    assert options == {"weight_decay": 0.01, "clip_grad": 1.0, "lr_warmup_steps": 2, "lr_decay_style": "cosine",
                       "lr_decay_steps": 9, "min_learning_rate": 1e-4}
    config = TrainConfig(MODEL_PRESETS["gpt-tiny"], complete_plan(ParallelPlan()), 10, **options)
    validate_training(config)
    assert config.lr_schedule.values(10)[:2] == [3e-3 / 2, 3e-3]
    defaults = optimizer_options_from_args(_parse())
    assert (defaults["clip_grad"], defaults["lr_warmup_steps"], defaults["lr_decay_style"]) == (0.0, 0, "constant")


@pytest.mark.parametrize("flags, message", [
    (["--clip-grad", "-1"], "--clip-grad must be a finite number >= 0"),
    (["--lr-warmup-steps", "30", "--steps", "20"], "--lr-warmup-steps 30 is more than --steps 20"),
    (["--lr-decay-style", "cosine", "--lr-warmup-steps", "5", "--lr-decay-steps", "3"], "must be more than"),
    (["--min-learning-rate", "1.0"], "--min-learning-rate 1.0 must be between 0 and --learning-rate"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--learning-rate", "0"], "--learning-rate must be a positive number"),
])
def test_bad_optimizer_flags_fail_in_one_line_with_exit_code_2(capsys, flags, message):
    code = cli.main(["train", "--model", "gpt-tiny", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
