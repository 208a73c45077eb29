"""Pure parts of parallelization: the module plan, the split checks, the head/row assignment."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modelpar.models.gpt import init_gpt
from modelpar.models.gpt_parallel import check_tensor_parallel, tensor_parallel_plan
from modelpar.models.gpt_parallel import kv_heads_of_rank, qkv_rows
from modelpar.runtime.tensor_parallel import ShardLayout, chunk_indices
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS


def test_plan_names_every_swappable_module():
    spec = dataclasses.replace(MODEL_PRESETS["gpt-tiny"], num_layers=2)
    plan = tensor_parallel_plan(init_gpt(spec, 0), sequence_parallel=False)
    assert plan == {"embedding": "vocab_parallel_embedding", "layers.0.attention": "parallel_attention",
                    "layers.0.mlp": "parallel_mlp", "layers.1.attention": "parallel_attention",
                    "layers.1.mlp": "parallel_mlp", "head": "vocab_parallel_head"}
    with_sp = tensor_parallel_plan(init_gpt(spec, 0), sequence_parallel=True)
    norms = {name for name, style in with_sp.items() if style == "sequence_parallel_norm"}
    assert norms == {"layers.0.attention_norm", "layers.0.mlp_norm", "layers.1.attention_norm", "layers.1.mlp_norm",
                     "head.norm"}


@pytest.mark.parametrize("change, t, sp, message", [
    ({"num_attention_heads": 6, "hidden_size": 60, "num_query_groups": 3}, 4, False,
     "num_attention_heads 6 is not divisible"),
    ({"num_query_groups": 2, "num_attention_heads": 12, "hidden_size": 48}, 3, False, "num_query_groups 2"),
    ({"ffn_hidden_size": 170}, 4, False, "ffn_hidden_size 170"),
    ({"seq_length": 30}, 4, True, "seq_length 30"),
])
def test_unsplittable_models_are_spec_errors(change, t, sp, message):
    spec = dataclasses.replace(MODEL_PRESETS["llama-tiny"], **change)
    with pytest.raises(SpecError, match=message):
        check_tensor_parallel(spec, t, sp)


def test_splittable_presets_pass():
    check_tensor_parallel(MODEL_PRESETS["gpt-tiny"], 8, True)
    check_tensor_parallel(MODEL_PRESETS["llama-tiny"], 8, True)  # 4 KV heads on 8 ranks: replicated twice


def test_kv_heads_split_or_replicated():
    assert [kv_heads_of_rank(8, 4, 2, r) for r in range(2)] == [[0, 1], [2, 3]]
    assert [kv_heads_of_rank(8, 2, 4, r) for r in range(4)] == [[0], [0], [1], [1]]
    assert [kv_heads_of_rank(8, 1, 4, r) for r in range(4)] == [[0]] * 4


def test_qkv_rows_pick_own_query_heads_and_their_kv_group():
    heads, kv, d, t = 4, 2, 3, 4
    rows = qkv_rows(heads, kv, d, t)
    # rank 3: query head 3 (rows 9..11), K head 1 (rows 12 + 3..5), V head 1 (rows 18 + 3..5)
    assert rows[3].tolist() == [9, 10, 11, 15, 16, 17, 21, 22, 23]
    layout = ShardLayout(0, rows, (heads + 2 * kv) * d)
    assert layout.replicated.tolist() == list(range(12, 24))  # every K/V row is held by two ranks
    assert ShardLayout(0, chunk_indices(12, 4), 12).replicated.numel() == 0


def test_chunk_indices_cover_in_order():
    assert torch.equal(torch.cat(chunk_indices(12, 3)), torch.arange(12))
    with pytest.raises(ValueError, match="does not split evenly"):
        chunk_indices(10, 4)
