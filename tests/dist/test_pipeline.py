"""The pipeline interpreter: stage layout (pure), every schedule against the serial GPT on gloo
ranks with its timeline, and a crashing rank reported by `modelpar train` within 60 s."""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.distributed as dist

from modelpar.commands import cli
from modelpar.training.data import make_token_source, micro_batches
from modelpar.models.gpt import DropoutKey, init_gpt
from modelpar.runtime.data_parallel import all_reduce_gradients
from modelpar.runtime.pipeline import (PipelineExecutor, PipelineTopology, build_chunks, stage_layer_ranges,
                                       tied_parameters)
from modelpar.schedules.actions import Action, build_schedule
from modelpar.schedules.events import COMPUTE_KINDS
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS
from modelpar.training import run as training_run

from .harness import make_context, mismatch, relative_mismatch, run_ranks

SPEC = MODEL_PRESETS["gpt-tiny"]  # 8 layers, tied embeddings, dropout 0.1 (keyed)
SEED, MICRO_BATCH = 3, 2


# --- pure layout -----------------------------------------------------------------------------------


def test_stage_layer_ranges_split_layers_evenly():
    assert stage_layer_ranges(8, 2, 2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layer_ranges(8, 4) == [range(2 * g, 2 * g + 2) for g in range(4)]
    with pytest.raises(SpecError, match="num_layers 8 is not divisible by pipeline_parallel 3"):
        stage_layer_ranges(8, 3)


def test_build_chunks_interleaved_layout_and_names():
    model = init_gpt(SPEC, SEED)
    chunks = build_chunks(model, pipeline_rank=1, num_stages=2, virtual_stages=2)
    assert [c.stage for c in chunks] == [1, 3]  # chunk c on rank r is global stage c * p + r
    assert [list(c.layer_indices) for c in chunks] == [[2, 3], [6, 7]]
    assert chunks[0].embedding is None and chunks[0].head is None
    assert chunks[1].is_last and chunks[1].head is model.head
    assert chunks[1].layers[0] is model.layers[6]
    assert chunks[1].serial_name("layers.1.mlp.fc1.weight") == "layers.7.mlp.fc1.weight"
    first = build_chunks(model, 0, 2, 2)[0]
    assert first.is_first and first.embedding is model.embedding
    assert [name for name, _ in tied_parameters(model)] == ["token.weight"]


def test_chunk_forward_equals_serial_model():
    model = init_gpt(SPEC, SEED)
    tokens = torch.randint(0, SPEC.vocab_size, (2, SPEC.seq_length + 1), generator=torch.Generator().manual_seed(0))
    key = DropoutKey(SEED, 0)
    expected = model(tokens[:, :-1], tokens[:, 1:], key)
    hidden = tokens[:, :-1]
    for stage_chunks in [build_chunks(model, rank, 4) for rank in range(4)]:
        hidden = stage_chunks[0](hidden, tokens[:, 1:], key)
    assert torch.equal(hidden, expected)


# --- distributed: every schedule against the serial model --------------------------------------------

SCHEDULE_CASES = {  # name: (p, d, schedule, v, m)
    "gpipe-p4": (4, 1, "gpipe", 1, 4),
    "1f1b-p4-m6": (4, 1, "1f1b", 1, 6),
    "1f1b-p4-m2": (4, 1, "1f1b", 1, 2),  # fewer micro-batches than stages
    "interleaved-p2-v2-d2": (2, 2, "interleaved", 2, 4),
    "interleaved-p4-v2": (4, 1, "interleaved", 2, 4),
}


def _run_schedule(rank: int, p: int, d: int, schedule: str, v: int, m: int) -> dict:
    ctx = make_context(tensor=1, pipeline=p, data=d)
    model = init_gpt(SPEC, SEED)
    chunks = build_chunks(model, ctx.pipeline_rank, p, v)
    executor = PipelineExecutor(chunks, PipelineTopology.from_context(ctx, v),
                                build_schedule(schedule, p, m, v), m,
                                (MICRO_BATCH, SPEC.seq_length, SPEC.hidden_size))
    batch_size = MICRO_BATCH * m * d
    batch = make_token_source("synthetic", SPEC.vocab_size, SEED).global_batch(0, batch_size, SPEC.seq_length)
    keys = [DropoutKey(SEED, 0, (ctx.data_rank * m + i) * MICRO_BATCH) for i in range(m)]
    loss = executor.run(micro_batches(batch, ctx.data_rank, d, MICRO_BATCH), keys)
    params = list(torch.nn.ModuleList(chunks).parameters())
    all_reduce_gradients(params, ctx.data_group)
    tied = [param for _, param in tied_parameters(model)]
    # the first and last stage of each pipeline sum the two copies of the tied embedding
    # (new_group is collective: every rank creates every group, in the same order)
    groups = [dist.new_group([di * p, di * p + p - 1]) for di in range(d)] if p > 1 else [None] * d
    if ctx.pipeline_rank in (0, p - 1):
        all_reduce_gradients(tied, groups[ctx.data_rank], average=False)
    grads = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            serial = chunk.serial_name(name)
            grads["embedding.token.weight" if serial == "head.output.weight" else serial] = param.grad.clone()
    events = executor.timeline.events
    computed = sorted((e.name for e in events if e.kind in COMPUTE_KINDS))
    return {"loss": None if loss is None else float(loss), "grads": grads, "computed": computed,
            "actions": sorted(str(a) for a in executor.actions),
            "recv_events": sum(e.kind == "recv" for e in events),
            "bad_interval": any(e.end_s < e.start_s for e in events), "data_rank": ctx.data_rank}


def _schedule_worker(rank: int, world_size: int) -> dict:
    results = {}
    for name, (p, d, schedule, v, m) in SCHEDULE_CASES.items():
        results[name] = _run_schedule(rank, p, d, schedule, v, m)
        dist.barrier()
    try:  # an action list that misses an action is refused before anything runs
        PipelineExecutor(build_chunks(init_gpt(SPEC, SEED), 0, 4), PipelineTopology(0, 4, 1, (0, 1, 2, 3)),
                         [[Action("F", 0, 0)]] * 4, 2, (MICRO_BATCH, SPEC.seq_length, SPEC.hidden_size))
        results["bad_actions"] = "accepted"
    except ValueError as error:
        results["bad_actions"] = str(error)
    return results


@pytest.fixture(scope="module")
def schedule_results():
    return run_ranks(_schedule_worker, 4, timeout_s=180)


def _serial(m: int, d: int) -> tuple[float, dict]:
    model = init_gpt(SPEC, SEED)
    batch = make_token_source("synthetic", SPEC.vocab_size, SEED).global_batch(0, MICRO_BATCH * m * d, SPEC.seq_length)
    loss = model(batch[:, :-1], batch[:, 1:], DropoutKey(SEED, 0))
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.dist
@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_schedule_matches_serial(schedule_results, name):
    p, d, _, _, m = SCHEDULE_CASES[name]
    want_loss, want_grads = _serial(m, d)
    problems = []
    losses = {}
    for rank, result in enumerate(schedule_results):
        case = result[name]
        if case["loss"] is not None:
            losses[case["data_rank"]] = case["loss"]
        for param_name, grad in case["grads"].items():
            problems += mismatch(f"rank {rank} grad {param_name}", grad, want_grads[param_name], 1e-4, 1e-6)
        if case["computed"] != case["actions"]:
            problems.append(f"rank {rank}: timed compute events {case['computed'][:3]}... != actions")
        if case["bad_interval"]:
            problems.append(f"rank {rank}: an event ends before it starts")
        expected_recvs = sum(1 for _ in case["actions"]) - (m if rank % p == 0 else 0) - (m if rank % p == p - 1 else 0)
        if p > 1 and case["recv_events"] != expected_recvs:
            problems.append(f"rank {rank}: {case['recv_events']} receive events, expected {expected_recvs}")
    problems += relative_mismatch("mean loss", sum(losses.values()) / d, want_loss, 1e-5)
    assert len(losses) == d
    assert not problems, "\n".join(problems[:10])


@pytest.mark.dist
def test_incomplete_action_list_is_refused(schedule_results):
    assert "does not run every" in schedule_results[0]["bad_actions"]


# --- a crashing rank ---------------------------------------------------------------------------------


@pytest.mark.dist
def test_crashing_rank_is_named_within_60_s(monkeypatch, capsys):
    # fault injection: rank 1 exits abruptly at the start of step 1 (`TrainConfig.crash_rank`)
    monkeypatch.setattr(training_run, "run_training", functools.partial(training_run.run_training, crash_rank=1))
    started = time.perf_counter()
    code = cli.main(["train", "--model", "gpt-tiny", "--pipeline-parallel", "2", "--steps", "3", "--json"])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 1
    assert "rank 1 of 2" in err and "exit code 17" in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert elapsed < 60
