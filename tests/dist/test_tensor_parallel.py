"""Tensor and sequence parallelism on gloo ranks against the serial reference, exactly (fp32).

One spawn of 4 ranks runs every case: t = 2 (two tensor groups, data = 2, so the mesh is exercised
too) and t = 4. Each case returns its mismatch messages; the tests below assert per case.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modelpar.models.gpt import DropoutKey, init_gpt
from modelpar.models.gpt_parallel import parallelize, sync_tensor_parallel_grads
from modelpar.runtime.collectives import (all_gather_sequence, copy_to_tensor_region, gather_last_dim,
                                          reduce_from_tensor_region, reduce_scatter_sequence, scatter_last_dim,
                                          split_sequence)
from modelpar.runtime.mesh import ParallelContext, ParallelDims, coordinates, group_of
from modelpar.runtime.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                              full_grads, full_state_dict, load_full_state_dict,
                                              vocab_parallel_cross_entropy)
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS

from .harness import dict_mismatches, make_context, mismatch, random_tokens, relative_mismatch, run_ranks

pytestmark = pytest.mark.dist

RTOL, ATOL = 1e-5, 1e-6
TENSOR_DEGREES = (2, 4)
MODELS = {
    # gelu + multi-head attention + learned positions + tied embeddings + dropout 0.1
    "gpt-tiny": MODEL_PRESETS["gpt-tiny"],
    # swiglu + grouped-query attention (4 KV heads) + rope + rmsnorm + untied; dropout on to test masks
    "llama-tiny": dataclasses.replace(MODEL_PRESETS["llama-tiny"], dropout=0.1),
    # 2 KV heads: at t = 4 each K/V head is replicated on two ranks
    "llama-tiny-kv2": dataclasses.replace(MODEL_PRESETS["llama-tiny"], name="llama-tiny-kv2", num_query_groups=2,
                                          num_layers=2, dropout=0.1),
}


def _collective_cases(ctx) -> list[str]:
    """Each dual pair's forward and backward against what the serial computation implies."""
    group, t, r = ctx.tensor_group, ctx.dims.tensor, ctx.tensor_rank
    torch.manual_seed(31)
    x_full, weight = torch.randn(2, 8, 12), torch.randn(2, 8, 12)
    ranks_sum = t * (t + 1) / 2  # sum over ranks of (rank + 1)
    problems = []

    def run(name, function, x, weight_of_output, want_output, want_grad):
        x = x.clone().requires_grad_()
        y = function(x, group)
        (y * weight_of_output).sum().backward()
        problems.extend(mismatch(f"{name} forward", y, want_output, RTOL, ATOL))
        problems.extend(mismatch(f"{name} backward", x.grad, want_grad, RTOL, ATOL))

    last, seq = (lambda z: z.chunk(t, -1)[r]), (lambda z: z.chunk(t, 1)[r])
    run("copy_to", copy_to_tensor_region, x_full, weight * (r + 1), x_full, weight * ranks_sum)
    run("reduce_from", reduce_from_tensor_region, x_full * (r + 1), weight, x_full * ranks_sum, weight)
    run("scatter_last_dim", scatter_last_dim, x_full, last(weight), last(x_full), weight)
    run("gather_last_dim", gather_last_dim, last(x_full), weight, x_full, last(weight))
    run("all_gather_sequence", all_gather_sequence, seq(x_full), weight, x_full, seq(weight) * t)
    run("reduce_scatter_sequence", reduce_scatter_sequence, x_full * (r + 1), seq(weight), seq(x_full) * ranks_sum,
        weight)
    return problems


def _linear_cases(ctx, sequence_parallel: bool) -> list[str]:
    group, t, rank = ctx.tensor_group, ctx.dims.tensor, ctx.tensor_rank
    torch.manual_seed(11)
    column_serial, row_serial = nn.Linear(16, 24), nn.Linear(24, 12)
    x = torch.randn(2, 8, 16)
    column = ColumnParallelLinear.from_linear(column_serial, group, sequence_parallel=sequence_parallel)
    row = RowParallelLinear.from_linear(row_serial, group, sequence_parallel=sequence_parallel)

    expected = row_serial(F.gelu(column_serial(x)))
    expected.square().sum().backward()
    x_local = split_sequence(x, group) if sequence_parallel else x
    y = row(F.gelu(column(x_local)))
    y.square().sum().backward()  # each rank's loss covers its own shard (SP) or the replicated output
    if sequence_parallel:
        dist.all_reduce(row.bias.grad, group=group)  # the sequence-parallel grad all-reduce

    problems = mismatch("output", y, split_sequence(expected, group) if sequence_parallel else expected, RTOL, ATOL)
    rows, cols = torch.arange(24).chunk(t)[rank], torch.arange(24).chunk(t)[rank]
    problems += mismatch("column.weight.grad", column.weight.grad, column_serial.weight.grad[rows], RTOL, ATOL)
    problems += mismatch("column.bias.grad", column.bias.grad, column_serial.bias.grad[rows], RTOL, ATOL)
    problems += mismatch("row.weight.grad", row.weight.grad, row_serial.weight.grad[:, cols], RTOL, ATOL)
    problems += mismatch("row.bias.grad", row.bias.grad, row_serial.bias.grad, RTOL, ATOL)

    gathered = ColumnParallelLinear.from_linear(column_serial, group, gather_output=True)
    problems += mismatch("column gather_output", gathered(x), column_serial(x), RTOL, ATOL)
    return problems


def _vocab_cases(ctx) -> list[str]:
    group, vocab, hidden = ctx.tensor_group, 32, 8
    torch.manual_seed(12)
    embedding, projection = nn.Embedding(vocab, hidden), nn.Linear(hidden, vocab, bias=False)
    tokens, targets = random_tokens(vocab, 3, 5, seed=13)
    logits = projection(embedding(tokens))
    expected = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none").view_as(targets)
    expected.mean().backward()

    parallel_embedding = VocabParallelEmbedding.from_embedding(embedding, group)
    parallel_projection = ColumnParallelLinear.from_linear(projection, group)
    hidden_states = parallel_embedding(tokens)
    losses = vocab_parallel_cross_entropy(parallel_projection(hidden_states), targets,
                                          parallel_embedding.vocab_start, group)
    losses.mean().backward()
    rows = torch.arange(vocab).chunk(ctx.dims.tensor)[ctx.tensor_rank]
    problems = mismatch("embedding output", hidden_states, embedding(tokens), RTOL, ATOL)
    problems += mismatch("per-token loss", losses, expected, RTOL, ATOL)
    problems += mismatch("embedding.grad", parallel_embedding.weight.grad, embedding.weight.grad[rows], RTOL, ATOL)
    problems += mismatch("projection.grad", parallel_projection.weight.grad, projection.weight.grad[rows], RTOL, ATOL)
    return problems


def _gpt_case(ctx, spec, sequence_parallel: bool) -> list[str]:
    tokens, targets = random_tokens(spec.vocab_size, 2, spec.seq_length, seed=21)
    key = DropoutKey(seed=5, step=3, sample_offset=4)

    serial = init_gpt(spec, seed=7).train()
    serial_loss = serial(tokens, targets, key)
    serial_loss.backward()
    serial_grads = {name: p.grad for name, p in serial.named_parameters()}
    serial_state = {name: tensor.clone() for name, tensor in serial.state_dict().items()}

    model = parallelize(init_gpt(spec, seed=7), ctx, sequence_parallel).train()
    loss = model(tokens, targets, key)
    loss.backward()
    sync_tensor_parallel_grads(model, ctx)

    problems = relative_mismatch("loss", loss.item(), serial_loss.item(), RTOL)
    problems += dict_mismatches("grad ", full_grads(model, ctx), serial_grads, RTOL, ATOL)
    problems += dict_mismatches("state ", full_state_dict(model, ctx), serial_state, 0.0, 0.0)

    # any layout loads any checkpoint: perturb, reload the serial weights, same loss again
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    load_full_state_dict(model, serial_state, ctx)
    model.zero_grad()
    problems += relative_mismatch("reloaded loss", model(tokens, targets, key).item(), serial_loss.item(), RTOL)
    if spec.dropout > 0:  # the key matters: another step draws other masks
        other = model(tokens, targets, DropoutKey(seed=5, step=4, sample_offset=4)).item()
        if other == serial_loss.item():
            problems.append("a different dropout key gave the identical loss")
    return problems


def _mesh_cases(rank: int, world_size: int) -> list[str]:
    problems = []
    for dims in (ParallelDims(tensor=2, pipeline=1, data=2), ParallelDims(tensor=1, pipeline=2, data=2),
                 ParallelDims(tensor=2, pipeline=2, data=1)):
        ctx = ParallelContext(dims)
        if (ctx.data_rank, ctx.pipeline_rank, ctx.tensor_rank) != coordinates(dims, rank):
            problems.append(f"{dims}: coordinates {ctx!r}")
        for kind in ("tensor", "pipeline", "data", "model"):
            members = group_of(dims, kind, rank)
            if getattr(ctx, f"{kind}_ranks") != members:
                problems.append(f"{dims}: {kind}_ranks {getattr(ctx, f'{kind}_ranks')} != {members}")
            total = torch.tensor([float(rank)])
            dist.all_reduce(total, group=getattr(ctx, f"{kind}_group"))
            if total.item() != sum(members):
                problems.append(f"{dims}: all-reduce over {kind} group gave {total.item()}, want {sum(members)}")
        pipeline = group_of(dims, "pipeline", rank)
        position = pipeline.index(rank)
        if ctx.next_pipeline_rank != pipeline[(position + 1) % len(pipeline)] or \
                ctx.prev_pipeline_rank != pipeline[position - 1]:
            problems.append(f"{dims}: pipeline neighbours {ctx.prev_pipeline_rank}, {ctx.next_pipeline_rank}")
        if (ctx.backend, ctx.device.type) != ("gloo", "cpu"):
            problems.append(f"{dims}: backend/device {ctx.backend}/{ctx.device}")
    try:
        ParallelContext(ParallelDims(tensor=8))
        problems.append("8 ranks of dims on a 4-rank group did not raise")
    except SpecError as error:
        if "need 8 ranks but the process group has 4" not in str(error):
            problems.append(f"wrong message: {error}")
    return problems


def _all_cases(rank: int, world_size: int) -> dict:
    results, timings = {"mesh": _mesh_cases(rank, world_size)}, {}
    for t in TENSOR_DEGREES:
        ctx = make_context(tensor=t, data=world_size // t)
        for sequence_parallel in (False, True):
            suffix = f"t{t}-{'sp' if sequence_parallel else 'nosp'}"
            results[f"linear-{suffix}"] = _linear_cases(ctx, sequence_parallel)
            for name, spec in MODELS.items():
                start = time.perf_counter()
                results[f"{name}-{suffix}"] = _gpt_case(ctx, spec, sequence_parallel)
                timings[f"{name}-{suffix}"] = time.perf_counter() - start
        results[f"vocab-t{t}"] = _vocab_cases(ctx)
        results[f"collectives-t{t}"] = _collective_cases(ctx)
    return {"results": results, "timings": timings}


@pytest.fixture(scope="module")
def rank_results():
    return run_ranks(_all_cases, 4)


def _assert_case(rank_results, case: str) -> None:
    problems = {rank: out["results"][case] for rank, out in enumerate(rank_results) if out["results"][case]}
    assert not problems, f"{case}: " + "; ".join(f"rank {r}: {msgs[:3]}" for r, msgs in problems.items())


def test_parallel_context_groups_match_rank_groups(rank_results):
    _assert_case(rank_results, "mesh")


@pytest.mark.parametrize("t", TENSOR_DEGREES)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["nosp", "sp"])
def test_column_row_linear_match_nn_linear(rank_results, t, sequence_parallel):
    _assert_case(rank_results, f"linear-t{t}-{'sp' if sequence_parallel else 'nosp'}")


@pytest.mark.parametrize("t", TENSOR_DEGREES)
def test_collectives_are_dual_pairs(rank_results, t):
    _assert_case(rank_results, f"collectives-t{t}")


@pytest.mark.parametrize("t", TENSOR_DEGREES)
def test_vocab_parallel_embedding_and_cross_entropy_match_serial(rank_results, t):
    _assert_case(rank_results, f"vocab-t{t}")


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("t", TENSOR_DEGREES)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["nosp", "sp"])
def test_parallel_gpt_matches_serial_loss_and_grads(rank_results, model, t, sequence_parallel):
    _assert_case(rank_results, f"{model}-t{t}-{'sp' if sequence_parallel else 'nosp'}")
