"""Training features a Megatron-LM user expects, each against the serial GPT, in ONE launch of 8 ranks:

- global gradient norm: every layout reports the serial model's norm (within 1e-5) at every step,
  counting each parameter once (tensor-replicated norms and biases, K/V heads replicated when
  t > KV groups, the tied embedding's two pipeline copies, ZeRO-1 shards);
- clipping by that norm, a warmup + cosine learning-rate schedule and weight decay only on
  matrices: losses, step-1 gradients, norms and final weights equal the serial model trained
  with torch's clip_grad_norm_ and AdamW param groups;
- vocabulary padding: vocabularies of 253 and 9 that t = 2, 4, 8 do not divide (with t = 8 and
  V = 9 three ranks hold only padding) train like the serial model, and the gathered weights
  and gradients are in the unpadded serial layout;
- bf16 fp32 main gradients: with 8 micro-batches, the runtime's step gradient equals the fp32
  sum of the serial bf16 micro-batch gradients and is strictly closer to the fp32 gradient than
  the bf16 accumulation the runtime used to do.

Each case re-initialises the default process group on a fresh FileStore (as
tests/dist/test_equivalence.py does), so all cases share one spawn.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from modelpar.training.data import make_token_source
from modelpar.models.gpt import DropoutKey, init_gpt
from modelpar.specs.model import MODEL_PRESETS
from modelpar.specs.plan import ParallelPlan
from modelpar.training.config import TrainConfig
from modelpar.training.trainer import RankTrainer

from .harness import dict_mismatches, launch_with_store, relative_mismatch, run_in_own_groups

pytestmark = pytest.mark.dist

WORLD = 8
STEPS = 3
SEED = 5
NORM_RTOL = LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
WEIGHT_ATOL = 5e-4  # 3 AdamW steps: see test_equivalence's WEIGHT_ATOL

# gpt-tiny and llama-tiny cut to 4 layers (2 for t = 8): the collectives per step, not the FLOPs,
# cost the time of 8 gloo ranks on 2 cores.
GPT = dataclasses.replace(MODEL_PRESETS["gpt-tiny"], num_layers=4)  # tied, layernorm, learned positions, dropout
GPT_V253 = dataclasses.replace(GPT, name="gpt-tiny-v253", vocab_size=253)
GPT_V9 = dataclasses.replace(GPT, name="gpt-tiny-v9", vocab_size=9, num_layers=2)
LLAMA_KV2_V253 = dataclasses.replace(MODEL_PRESETS["llama-tiny"], name="llama-tiny-kv2-v253", num_layers=4,
                                     vocab_size=253, num_query_groups=2, dropout=0.1)  # untied; t = 4 replicates K/V

# The serial gradient norm is about 2: clipping to 0.5 acts at every step.
OPTIMIZER = dict(clip_grad=0.5, lr_warmup_steps=1, lr_decay_style="cosine", lr_decay_steps=3, min_learning_rate=3e-4,
                 decay_norms_and_biases=False)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: object
    plan: ParallelPlan
    dtype: str = "fp32"


def _plan(t, p, d, schedule="1f1b", v=1, b=2, m=2, sp=False, zero=0) -> ParallelPlan:
    return ParallelPlan(tensor_parallel=t, pipeline_parallel=p, data_parallel=d, virtual_stages=v, schedule=schedule,
                        micro_batch_size=b, global_batch_size=b * d * m, sequence_parallel=sp, recompute="none",
                        zero_stage=zero)


NORM_CASES = [
    Case("t2p2d2-sp-zero1-tied", GPT, _plan(2, 2, 2, sp=True, zero=1)),
    Case("t4p2d1-kv2-vocab253", LLAMA_KV2_V253, _plan(4, 2, 1, "gpipe")),
    Case("t8-sp-vocab9", GPT_V9, _plan(8, 1, 1, sp=True)),
    Case("t2p1d2-vocab253", GPT_V253, _plan(2, 1, 2)),
    Case("t1p2d2-interleaved-zero1", GPT, _plan(1, 2, 2, "interleaved", v=2, zero=1)),
]
BF16_CASES = [
    Case("bf16-t1p1d2-m8", GPT, _plan(1, 1, 2, b=1, m=8), "bf16"),
    Case("bf16-t2p2d2-sp-zero1-m8", GPT, _plan(2, 2, 2, b=1, m=8, sp=True, zero=1), "bf16"),
]
CASES = NORM_CASES + BF16_CASES


def _config(case: Case) -> TrainConfig:
    return TrainConfig(case.model, case.plan, STEPS, SEED, case.dtype, "synthetic", progress=False, **OPTIMIZER)


def _run_cases(rank: int, world_size: int, cases: list[Case], store_dir: str) -> dict:
    """Every case on the ranks it needs, each in its own default process group; rank 0 returns the results."""
    torch.set_num_threads(1)

    def train(case: Case, ctx) -> dict:
        trainer = RankTrainer(_config(case), ctx)
        result = {"initial_state": trainer.full_state_dict() if case.dtype == "fp32" else None}
        losses = [trainer.forward_backward(0)]
        result["grads"] = trainer.full_gradients()
        if case.dtype == "fp32":
            trainer.optimizer_step()
            losses += [trainer.step(step) for step in range(1, STEPS)]
            result["state"] = trainer.full_state_dict()
        result.update(losses=losses, grad_norms=trainer.grad_norms, learning_rates=trainer.learning_rates)
        return result

    return run_in_own_groups(rank, world_size, cases, store_dir, train)


@pytest.fixture(scope="module")
def runs():
    return launch_with_store(_run_cases, WORLD, CASES, timeout_s=300, title="train-features")


def serial_training(case: Case) -> dict:
    """The serial GPT with torch.optim.AdamW (decay on >= 2-dim parameters only), clip_grad_norm_
    and the schedule's learning rate set before each step."""
    config = _config(case)
    model = init_gpt(case.model, SEED)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)
    source = make_token_source("synthetic", case.model.vocab_size, SEED)
    losses, norms, rates, grads = [], [], [], None
    for step in range(STEPS):
        batch = source.global_batch(step, case.plan.global_batch_size, case.model.seq_length)
        loss = model(batch[:, :-1], batch[:, 1:], DropoutKey(SEED, step, 0))
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, config.clip_grad)))
        rates.append(config.lr_schedule.at(step, STEPS))
        for group in optimizer.param_groups:
            group["lr"] = rates[-1]
        optimizer.step()
        optimizer.zero_grad()
    return {"losses": losses, "grad_norms": norms, "learning_rates": rates, "grads": grads,
            "state": model.state_dict(), "initial_state": initial}


@pytest.mark.parametrize("case", NORM_CASES, ids=[c.name for c in NORM_CASES])
def test_grad_norm_clipping_schedule_and_padding_match_serial(runs, case):
    got, want = runs[case.name], serial_training(case)
    assert want["grad_norms"][0] > 2 * OPTIMIZER["clip_grad"]  # the clip is active
    assert got["learning_rates"] == want["learning_rates"]
    problems = []
    for step in range(STEPS):
        problems += relative_mismatch(f"grad norm of step {step}", got["grad_norms"][step], want["grad_norms"][step],
                                      NORM_RTOL)
        problems += relative_mismatch(f"loss of step {step}", got["losses"][step], want["losses"][step], LOSS_RTOL)
    problems += dict_mismatches("initial weight ", got["initial_state"], want["initial_state"], 0.0, 0.0)
    problems += dict_mismatches("grad ", got["grads"], want["grads"], GRAD_RTOL, GRAD_ATOL)
    problems += dict_mismatches("weight ", got["state"], want["state"], 0.0, WEIGHT_ATOL)
    assert not problems, "\n".join(problems[:12])


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[name].double().reshape(-1) for name in sorted(grads)])


def bf16_references(case: Case) -> dict:
    """Step-0 gradients of the serial GPT from the bf16 micro-batch gradients g_k (k over all
    M = m d micro-batches, each of the loss / M): their fp32 sum ("fp32_sum"); the old runtime's
    bf16 accumulation ("bf16_sum": bf16 sum within each replica, fp32 data-parallel mean, back to
    bf16); and the fp32 model's gradient at the same (bf16-rounded) weights ("fp32")."""
    plan, spec = case.plan, case.model
    b, d, m = plan.micro_batch_size, plan.data_parallel, plan.num_micro_batches
    total = m * d
    batch = make_token_source("synthetic", spec.vocab_size, SEED).global_batch(0, plan.global_batch_size,
                                                                              spec.seq_length)
    model = init_gpt(spec, SEED).to(torch.bfloat16)
    fp32_sum, replica_sums, per_replica = {}, [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the ranks
    try:
        for k in range(total):
            rows = batch[k * b:(k + 1) * b]
            loss = model(rows[:, :-1], rows[:, 1:], DropoutKey(SEED, 0, k * b)).float() / total
            loss.backward()
            for name, param in model.named_parameters():
                grad = param.grad
                fp32_sum[name] = fp32_sum.get(name, 0) + grad.float()
                per_replica[name] = per_replica[name] + grad if name in per_replica else grad.clone()
                param.grad = None
            if (k + 1) % m == 0:
                replica_sums.append(per_replica)
                per_replica = {}
        bf16_sum = {name: sum(s[name].float() for s in replica_sums).bfloat16().float() for name in fp32_sum}
        model32 = model.float()
        loss = model32(batch[:, :-1], batch[:, 1:], DropoutKey(SEED, 0, 0))
        loss.backward()
        fp32 = {name: p.grad.clone() for name, p in model32.named_parameters()}
    finally:
        torch.set_num_threads(threads)
    return {"fp32_sum": fp32_sum, "bf16_sum": bf16_sum, "fp32": fp32}


def _relative_error(a: dict, b: dict) -> float:
    difference = _flat(a) - _flat(b)
    return float(difference.norm() / _flat(b).norm())


@pytest.mark.parametrize("case", BF16_CASES, ids=[c.name for c in BF16_CASES])
def test_bf16_gradients_accumulate_in_fp32(runs, case):
    got, refs = runs[case.name]["grads"], bf16_references(case)
    assert set(got) == set(refs["fp32"])
    to_fp32_sum = _relative_error(got, refs["fp32_sum"])
    runtime_error, bf16_accumulation_error = _relative_error(got, refs["fp32"]), _relative_error(refs["bf16_sum"],
                                                                                               refs["fp32"])
    summary = (f"|runtime - fp32 sum of bf16 grads| {to_fp32_sum:.2e}; vs fp32 gradient: runtime {runtime_error:.2e}, "
               f"bf16 accumulation {bf16_accumulation_error:.2e}")
    # t = 1: the ranks compute the serial model's bf16 micro-batch gradients; only the fp32
    # summation order differs. t > 1 splits the bf16 GEMMs, so each micro-batch gradient differs.
    if case.plan.tensor_parallel == 1:
        assert to_fp32_sum < 1e-6, summary  # bf16 accumulation is 4e-3 away from the fp32 sum
    assert runtime_error < bf16_accumulation_error, summary
    assert math.isfinite(runs[case.name]["losses"][0])


def test_train_command_reports_grad_norms_and_trains_a_padded_vocabulary(tmp_path, capsys):
    """`modelpar train --json` on t = 2 with a vocabulary of 255: per-step gradient norms, the
    learning rates of the schedule, the optimizer settings; the human summary prints them."""
    from modelpar.commands import cli
    from modelpar.commands.train import print_summary

    model = tmp_path / "odd-vocab.json"
    model.write_text(json.dumps({"name": "odd-vocab", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                 "ffn_hidden_size": 64, "vocab_size": 255, "seq_length": 16}))
    code = cli.main(["train", "--model", str(model), "--tensor-parallel", "2", "--steps", "3", "--data", "synthetic",
                     "--clip-grad", "0.1", "--lr-warmup-steps", "1", "--lr-decay-style", "linear",
                     "--min-learning-rate", "1e-3", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert len(summary["grad_norms"]) == 3 and all(norm > 0 for norm in summary["grad_norms"])
    assert summary["learning_rates"] == pytest.approx([3e-3, 3e-3, 2e-3])  # warmup 1; linear to 1e-3 at step 3
    assert summary["optimizer"]["clip_grad"] == 0.1 and summary["optimizer"]["decay_norms_and_biases"] is False
    print_summary(summary)
    assert "grad norm" in capsys.readouterr().out
