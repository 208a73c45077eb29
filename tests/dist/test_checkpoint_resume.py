"""Any layout resumes any checkpoint: 2 steps in layout A, save, 2 more steps in layout B equal
4 uninterrupted steps (losses, learning rates, final weights), in ONE launch of 4 gloo ranks.

- t2 x p2 (tied embeddings on two stages) -> t1 x p2 x d2 interleaved (v = 2) with ZeRO-1;
- vocabulary 253 (padded) on t2 x d2 with ZeRO-1 -> t4 with sequence parallelism;
- bf16 on p2 x d2 with ZeRO-1 resumed in the same layout: bit-identical, so the fp32 master
  weights, not the bf16 copy, were restored;
- control: the same checkpoint without its AdamW state (fresh moments, same step and batches)
  does not match, so the tolerances tell a restored optimizer from a restarted one.

The optimizer clips (the norm is ~2, the clip 0.5), warms up for 1 step and decays (cosine) to
step 4, so the resumed run must continue the step count, the moments and the schedule. Each phase
re-initialises the default process group on a fresh FileStore (as tests/dist/test_train_features.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from modelpar.models.gpt import init_gpt
from modelpar.runtime.checkpoint import read_checkpoint
from modelpar.specs.model import MODEL_PRESETS
from modelpar.specs.plan import ParallelPlan
from modelpar.training.config import TrainConfig
from modelpar.training.trainer import RankTrainer

from .harness import dict_mismatches, launch_with_store, relative_mismatch, run_in_own_groups

pytestmark = pytest.mark.dist

WORLD = 4
STEPS, SAVED_AFTER = 4, 2
SEED = 5
LOSS_RTOL = WEIGHT_ATOL = 1e-5  # measured: losses within 9e-8 (relative), weights within 5e-7
OPTIMIZER = dict(clip_grad=0.5, lr_warmup_steps=1, lr_decay_style="cosine", lr_decay_steps=STEPS,
                 min_learning_rate=3e-4)

GPT = dataclasses.replace(MODEL_PRESETS["gpt-tiny"], num_layers=4)  # tied embeddings, dropout
GPT_V253 = dataclasses.replace(GPT, name="gpt-tiny-v253", vocab_size=253)


def _plan(t, p, d, schedule="1f1b", v=1, m=2, sp=False, zero=0) -> ParallelPlan:
    return ParallelPlan(tensor_parallel=t, pipeline_parallel=p, data_parallel=d, virtual_stages=v, schedule=schedule,
                        micro_batch_size=2, global_batch_size=2 * d * m, sequence_parallel=sp, recompute="none",
                        zero_stage=zero)


@dataclasses.dataclass(frozen=True)
class Phase:
    """Train `steps` steps of `plan`; `load`: start from the checkpoint another phase saved
    (`fresh_optimizer`: without its AdamW state); `save`: write a checkpoint at the end."""

    name: str
    model: object
    plan: ParallelPlan
    steps: int
    dtype: str = "fp32"
    load: str | None = None
    save: bool = False
    fresh_optimizer: bool = False


T2P2, T1P2D2_INTERLEAVED_ZERO = _plan(2, 2, 1, m=4), _plan(1, 2, 2, "interleaved", v=2, zero=1)
T2D2_ZERO, T4_SP = _plan(2, 1, 2, zero=1), _plan(4, 1, 1, m=4, sp=True)
BF16_P2D2_ZERO = _plan(1, 2, 2, zero=1)
PHASES = [
    Phase("tied-uninterrupted", GPT, T2P2, STEPS),
    Phase("tied-a", GPT, T2P2, SAVED_AFTER, save=True),
    Phase("tied-b", GPT, T1P2D2_INTERLEAVED_ZERO, STEPS - SAVED_AFTER, load="tied-a"),
    Phase("tied-b-fresh-optimizer", GPT, T1P2D2_INTERLEAVED_ZERO, STEPS - SAVED_AFTER, load="tied-a",
          fresh_optimizer=True),
    Phase("vocab253-uninterrupted", GPT_V253, T2D2_ZERO, STEPS),
    Phase("vocab253-a", GPT_V253, T2D2_ZERO, SAVED_AFTER, save=True),
    Phase("vocab253-b", GPT_V253, T4_SP, STEPS - SAVED_AFTER, load="vocab253-a"),
    Phase("bf16-uninterrupted", GPT, BF16_P2D2_ZERO, STEPS, "bf16"),
    Phase("bf16-a", GPT, BF16_P2D2_ZERO, SAVED_AFTER, "bf16", save=True),
    Phase("bf16-b", GPT, BF16_P2D2_ZERO, STEPS - SAVED_AFTER, "bf16", load="bf16-a"),
]
RESUMED = {"tied": ("tied-a", "tied-b"), "vocab253": ("vocab253-a", "vocab253-b")}


def _path(store_dir: str, phase_name: str) -> str:
    return f"{store_dir}/{phase_name}.pt"


def _run_phases(rank: int, world_size: int, phases: list[Phase], store_dir: str) -> dict:
    """Every phase on the ranks it needs, in order, each in its own default process group; rank 0
    returns {phase: {"losses", "learning_rates", "start_step", "state" (final, serial), "checkpoint"}}."""
    torch.set_num_threads(1)

    def train(phase, ctx) -> dict:
        config = TrainConfig(phase.model, phase.plan, phase.steps, SEED, phase.dtype, "synthetic", progress=False,
                             **OPTIMIZER)
        checkpoint = read_checkpoint(_path(store_dir, phase.load)) if phase.load else None
        if checkpoint is not None and phase.fresh_optimizer:
            checkpoint = dataclasses.replace(checkpoint, exp_avg=None, exp_avg_sq=None, optimizer_steps=0)
        trainer = RankTrainer(config, ctx, checkpoint)
        losses = [trainer.step(step) for step in range(trainer.start_step, trainer.start_step + phase.steps)]
        if phase.save:
            trainer.save_checkpoint(_path(store_dir, phase.name), {"phase": phase.name})
        state = trainer.full_state_dict()
        dist.barrier()  # the checkpoint is written before rank 0 reads it
        saved = read_checkpoint(_path(store_dir, phase.name)) if phase.save and ctx.rank == 0 else None
        return {"losses": losses, "learning_rates": trainer.learning_rates, "start_step": trainer.start_step,
                "state": state, "checkpoint": saved}

    return run_in_own_groups(rank, world_size, phases, store_dir, train)


@pytest.fixture(scope="module")
def runs():
    return launch_with_store(_run_phases, WORLD, PHASES, timeout_s=300, title="checkpoint-resume")


@pytest.mark.parametrize("case", list(RESUMED))
def test_resumed_in_another_layout_equals_uninterrupted(runs, case):
    first, second = (runs[name] for name in RESUMED[case])
    want = runs[f"{case}-uninterrupted"]
    assert (first["start_step"], second["start_step"]) == (0, SAVED_AFTER)
    assert first["learning_rates"] + second["learning_rates"] == want["learning_rates"]
    problems = []
    for step, (got, expected) in enumerate(zip(first["losses"] + second["losses"], want["losses"])):
        problems += relative_mismatch(f"loss of step {step}", got, expected, LOSS_RTOL)
    problems += dict_mismatches("weight ", second["state"], want["state"], 0.0, WEIGHT_ATOL)
    assert not problems, "\n".join(problems[:12])


@pytest.mark.parametrize("case", list(RESUMED))
def test_checkpoint_holds_the_optimizer_in_the_serial_layout(runs, case):
    checkpoint, model = runs[RESUMED[case][0]]["checkpoint"], GPT if case == "tied" else GPT_V253
    serial = init_gpt(model, 0)
    assert checkpoint.first_mismatch(serial) is None  # 253 vocabulary rows, no padding
    assert set(checkpoint.exp_avg) == {name for name, _ in serial.named_parameters()}  # tied: stored once
    assert checkpoint.optimizer_steps == checkpoint.completed_steps == SAVED_AFTER
    assert checkpoint.master_weights is None  # fp32: the model weights are the master weights
    assert all(float(v.min()) >= 0 for v in checkpoint.exp_avg_sq.values())
    assert float(checkpoint.exp_avg_sq["layers.0.mlp.fc1.weight"].abs().sum()) > 0


def test_bf16_resume_restores_the_fp32_master_weights(runs):
    first, second, want = runs["bf16-a"], runs["bf16-b"], runs["bf16-uninterrupted"]
    assert first["losses"] + second["losses"] == want["losses"]  # same layout: bit-identical
    assert not dict_mismatches("weight ", second["state"], want["state"], 0.0, 0.0)
    checkpoint = first["checkpoint"]
    master, model = checkpoint.master_weights, checkpoint.model
    name = "layers.0.mlp.fc1.weight"
    assert master is not None and not torch.equal(master[name], model[name])  # fp32, not the bf16 copy
    assert torch.equal(master[name].bfloat16().float(), model[name])


def test_resume_without_the_optimizer_state_is_told_apart(runs):
    want, got = runs["tied-uninterrupted"], runs["tied-b-fresh-optimizer"]
    assert got["start_step"] == SAVED_AFTER and got["learning_rates"] == want["learning_rates"][SAVED_AFTER:]
    assert abs(got["losses"][-1] / want["losses"][-1] - 1) > 10 * LOSS_RTOL  # 8e-4 measured
    difference = max(float((got["state"][name] - want["state"][name]).abs().max()) for name in want["state"])
    assert difference > 100 * WEIGHT_ATOL
