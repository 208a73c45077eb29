"""Specs: presets match the papers, strict loading rejects bad input with a message naming the key."""

import json

import pytest

from modelpar.specs import (
    CLUSTER_PRESETS, MODEL_PRESETS, ClusterSpec, ModelSpec, ParallelPlan, SpecError, from_dict, load_cluster,
    load_model, load_plan,
)


@pytest.mark.parametrize(
    "name, billions, tolerance",
    [
        ("megatron-8.3b", 8.3, 0.01),    # Shoeybi et al. 2019 Table 1
        ("megatron-530b", 529.6, 0.001),  # Narayanan et al. 2021 Table 1
        ("megatron-1t", 1008.0, 0.001),   # Narayanan et al. 2021 Table 1
        ("gpt3-175b", 175.0, 0.01),       # Brown et al. 2020 Table 2.1
        ("palm-540b", 540.35, 0.001),     # Chowdhery et al. 2022 Table 1
        ("llama2-70b", 69.0, 0.01),       # Touvron et al. 2023
        ("llama2-7b", 6.74, 0.01),
    ],
)
def test_preset_parameter_counts_match_papers(name, billions, tolerance):
    assert MODEL_PRESETS[name].num_parameters() / 1e9 == pytest.approx(billions, rel=tolerance)


def test_standard_layer_is_12h2_plus_13h():
    model = MODEL_PRESETS["gpt3-175b"]
    h = model.hidden_size
    assert model.parameters_per_layer() == 12 * h * h + 13 * h


def test_every_cluster_preset_has_power_and_positive_numbers():
    for cluster in CLUSTER_PRESETS.values():
        assert cluster.device.power_watts > 0
        assert cluster.device.peak_tflops > 0
        assert cluster.devices_per_node >= 1


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(SpecError, match="unknown key 'hiden_size'.*hidden_size"):
        load_model({"num_layers": 2, "hiden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
                    "vocab_size": 10, "seq_length": 8})


@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
def test_non_positive_or_non_integer_size_is_rejected(value):
    data = {"num_layers": value, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
            "vocab_size": 10, "seq_length": 8}
    with pytest.raises(SpecError, match="num_layers"):
        load_model(data)


def test_missing_required_key():
    with pytest.raises(SpecError, match="missing required key 'vocab_size'"):
        load_model({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
                    "seq_length": 8})


def test_unknown_preset_suggests_closest():
    with pytest.raises(SpecError, match="did you mean 'megatron-1t'"):
        load_model("megatron-1tt")
    with pytest.raises(SpecError, match="did you mean 'dgx-a100-80gb'"):
        load_cluster("dgx-a100-80")


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "model.json"
    path.write_text('{"num_layers": 2,\n "hidden_size": }')
    with pytest.raises(SpecError, match=r"model.json: malformed JSON at line 2"):
        load_model(str(path))


def test_model_json_file_round_trip(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"num_layers": 4, "hidden_size": 128, "num_attention_heads": 8,
                                "ffn_hidden_size": 512, "vocab_size": 1000, "seq_length": 64}))
    model = load_model(str(path))
    assert model.name == "mine" and model.num_layers == 4


def test_inline_cluster_from_validation_format():
    cluster = from_dict(ClusterSpec, {
        "name": "vtrain-a100",
        "device": {"name": "A100", "peak_tflops": 312.0, "memory_gib": 80, "memory_bandwidth_gb_per_s": 2039},
        "devices_per_node": 8, "intra_node_bandwidth_gb_per_s": 150, "inter_node_bandwidth_gb_per_s": 100,
    })
    assert cluster.device.memory_bytes == 80 * 2**30


def test_plan_checks_name_the_value_and_fix():
    model = MODEL_PRESETS["gpt3-175b"]
    plan = ParallelPlan(tensor_parallel=7, pipeline_parallel=1, data_parallel=1, virtual_stages=1,
                        micro_batch_size=1, global_batch_size=8, sequence_parallel=False, recompute="none",
                        zero_stage=0, schedule="1f1b")
    with pytest.raises(SpecError, match="tensor_parallel 7 does not divide num_attention_heads 96.*such as 6"):
        plan.check(model, 7)
    with pytest.raises(SpecError, match="= 7 devices, but there are 8"):
        plan.check(model, 8)
    bad_layers = plan.with_(tensor_parallel=8, pipeline_parallel=5)
    with pytest.raises(SpecError, match="num_layers 96 is not divisible by pipeline_parallel 5"):
        bad_layers.check(model, 40)


def test_plan_loader_accepts_plan_command_output(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plans": [{"plan": {"tensor_parallel": 2, "pipeline_parallel": 2}}], "rejected": {}}))
    plan = load_plan(str(path))
    assert plan.tensor_parallel == 2 and plan.data_parallel is None


def test_gqa_and_head_dim_properties():
    palm = MODEL_PRESETS["palm-540b"]
    assert palm.kv_heads == 1 and palm.attention_width == 48 * 256
    with pytest.raises(SpecError, match="not divisible by num_query_groups"):
        ModelSpec("x", 2, 64, 8, 256, 10, 8, num_query_groups=3)
