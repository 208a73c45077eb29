"""Memory model: Korthikanti Table 2 activations, ZeRO model states, per-device breakdown."""

from __future__ import annotations

import pytest

from modelpar.planner import memory
from modelpar.planner.memory import MemoryBreakdown, activation_bytes_per_layer, activation_terms
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS, ModelSpec
from modelpar.specs.plan import ParallelPlan

GIB = 2**30


def gpt(layers: int, hidden: int, heads: int, **changes) -> ModelSpec:
    fields = dict(
        name=f"gpt-{layers}x{hidden}", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=4 * hidden, vocab_size=51200, seq_length=2048,
    )
    fields.update(changes)
    return ModelSpec(**fields)


# Korthikanti et al. 2022 Table 3: model, t, p, interleaved chunks v, micro-batch b, global batch.
TABLE3 = {
    "22B": (gpt(48, 6144, 64), 8, 1, 1, 4, 4),
    "175B": (gpt(96, 12288, 96), 8, 8, 3, 1, 64),
    "530B": (gpt(105, 20480, 128), 8, 35, 3, 1, 280),
    "1T": (gpt(128, 25600, 160), 8, 64, 1, 1, 512),
}


def table2(model: ModelSpec, b: int, t: int, sp: bool, recompute: str) -> float:
    """Korthikanti et al. 2022 Table 2, bytes per layer."""
    s, h, a = model.seq_length, model.hidden_size, model.num_attention_heads
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / t if sp else 2 * sbh
    attention_core = 5 * a * s / h if recompute == "none" else 0.0
    if sp:
        return sbh / t * (34 + attention_core)
    return sbh * (10 + 24 / t + attention_core / t)


def make_plan(t=1, p=1, d=1, v=1, b=1, batch=None, sp=False, recompute="none", zero=0, schedule=None) -> ParallelPlan:
    schedule = schedule or ("interleaved" if v > 1 else "1f1b")
    return ParallelPlan(
        tensor_parallel=t, pipeline_parallel=p, data_parallel=d, virtual_stages=v, micro_batch_size=b,
        global_batch_size=batch or b * d * p, sequence_parallel=sp, recompute=recompute, zero_stage=zero,
        schedule=schedule,
    )


# --- Korthikanti Table 2 and the per-term breakdown --------------------------------------------


@pytest.mark.parametrize("size", list(TABLE3))
@pytest.mark.parametrize("t", [1, 2, 8])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_bytes_match_korthikanti_table2(size, t, sp, recompute):
    model = TABLE3[size][0]
    for b in (1, 4):
        expected = table2(model, b, t, sp, recompute)
        assert activation_bytes_per_layer(model, b, t, sp, recompute) == pytest.approx(expected, rel=1e-12)


def test_terms_are_korthikanti_section_4_1_and_sum_to_34_plus_5as_over_h():
    model = MODEL_PRESETS["gpt3-175b"]
    s, b, h, a = model.seq_length, 2, model.hidden_size, model.num_attention_heads
    terms = activation_terms(model, b, 1, False, "none")
    in_sbh = {  # Sec. 4.1, 16-bit values and 1-byte masks, in units of s b h
        "attention_norm_input": 2, "qkv_input": 2, "query_key": 4, "value": 2, "output_projection_input": 2,
        "attention_residual_dropout_mask": 1, "mlp_norm_input": 2, "mlp_input": 2, "gelu_input": 8,
        "mlp_output_projection_input": 8, "mlp_residual_dropout_mask": 1,
    }
    in_as2b = {"softmax_output": 2, "attention_dropout_mask": 1, "attention_dropout_output": 2}
    assert set(terms) == set(in_sbh) | set(in_as2b)
    for name, coefficient in in_sbh.items():
        assert terms[name] == coefficient * s * b * h, name
    for name, coefficient in in_as2b.items():
        assert terms[name] == coefficient * a * s * s * b, name
    assert sum(in_sbh.values()) == 34 and sum(in_as2b.values()) == 5
    assert sum(terms.values()) == s * b * h * (34 + 5 * a * s / h)


def test_tensor_parallel_splits_24_of_the_34():
    model = MODEL_PRESETS["megatron-530b"]
    terms = activation_terms(model, 1, 8, False, "selective")
    sbh = model.seq_length * model.hidden_size
    replicated = ("attention_norm_input", "qkv_input", "attention_residual_dropout_mask", "mlp_norm_input",
                  "mlp_input", "mlp_residual_dropout_mask")
    assert sum(terms[name] for name in replicated) == 10 * sbh
    assert sum(value for name, value in terms.items() if name not in replicated) == 24 * sbh / 8
    assert "softmax_output" not in terms  # selective recomputation re-runs the attention core


def test_no_dropout_drops_masks_and_the_dropout_output():
    model = gpt(4, 1024, 16, dropout=0.0)
    s, b, h, a = 2048, 1, 1024, 16
    terms = activation_terms(model, b, 1, False, "none")
    assert not any("dropout" in name for name in terms)
    assert sum(terms.values()) == s * b * h * 32 + 2 * a * s * s * b  # 34 - 2 residual masks; 5 - mask - output


def test_swiglu_gqa_head_dim_rmsnorm_terms():
    # q = 8 x 32 = 256 != h = 128; 2 KV groups: k = 64; SwiGLU f = 352.
    model = gpt(2, 128, 8, seq_length=64, ffn_hidden_size=352, num_query_groups=2, head_dim=32, activation="swiglu",
                normalization="rmsnorm", dropout=0.0)
    s, b = 64, 3
    terms = activation_terms(model, b, 1, False, "none")
    sb2 = s * b * 2
    assert terms["query_key"] == sb2 * (256 + 64)
    assert terms["value"] == sb2 * 64
    assert terms["output_projection_input"] == sb2 * 256
    for name in ("gate_output", "up_output", "silu_output", "mlp_output_projection_input"):
        assert terms[name] == sb2 * 352
    assert "gelu_input" not in terms
    assert terms["softmax_output"] == 2 * 8 * s * s * b
    assert sum(terms.values()) == sb2 * (4 * 128 + 256 + 64 + 64 + 256 + 4 * 352) + 2 * 8 * s * s * b
    # t = 4 > 2 KV groups: each rank keeps one replicated KV head (32 wide).
    split = activation_terms(model, b, 4, True, "none")
    assert split["value"] == sb2 * 32 and split["query_key"] == sb2 * (64 + 32)
    assert split["attention_norm_input"] == sb2 * 128 / 4


def test_fp32_doubles_values_but_not_masks():
    model = MODEL_PRESETS["gpt2-small"]
    half = activation_terms(model, 4, 2, True, "none", bytes_per_value=2)
    full = activation_terms(model, 4, 2, True, "none", bytes_per_value=4)
    for name in half:
        assert full[name] == (half[name] if name.endswith("mask") else 2 * half[name]), name
    cpu = activation_terms(model, 4, 2, True, "none", bytes_per_value=4, dropout_mask_bytes=4)
    assert cpu["attention_dropout_mask"] == 4 * half["attention_dropout_mask"]


def test_full_recompute_keeps_only_the_layer_input():
    model = MODEL_PRESETS["gpt3-175b"]
    sbh = model.seq_length * 2 * model.hidden_size
    assert activation_terms(model, 2, 8, False, "full") == {"layer_input": 2 * sbh}
    assert activation_terms(model, 2, 8, True, "full") == {"layer_input": 2 * sbh / 8}


@pytest.mark.parametrize("size", list(TABLE3))
def test_sequence_parallel_with_selective_recompute_cuts_activations_about_5x(size):
    """Abstract / Fig. 7: the two techniques together reduce activation memory ~5x vs t = 8."""
    model = TABLE3[size][0]
    baseline = activation_bytes_per_layer(model, 1, 8, False, "none")
    present = activation_bytes_per_layer(model, 1, 8, True, "selective")
    assert 4.5 < baseline / present < 6.5


def test_selective_recompute_saves_70_and_65_percent_for_gpt3_and_mt_nlg():
    """Sec. 5: 5as/h = 80 for GPT-3, 64 for MT-NLG; selective recomputation saves 70% and 65%."""
    for name, paper in (("gpt3-175b", 0.70), ("megatron-530b", 0.65)):
        model = MODEL_PRESETS[name]
        none = activation_bytes_per_layer(model, 1, 1, False, "none")
        saved = 1 - activation_bytes_per_layer(model, 1, 1, False, "selective") / none
        assert saved == pytest.approx(paper, abs=0.006)


def test_bad_activation_arguments():
    model = MODEL_PRESETS["gpt-tiny"]
    with pytest.raises(SpecError, match="recompute"):
        activation_bytes_per_layer(model, 1, 1, False, "some")
    with pytest.raises(SpecError, match="bytes_per_value"):
        activation_bytes_per_layer(model, 1, 1, False, "none", bytes_per_value=3)


# --- model states ------------------------------------------------------------------------------


def test_zero_paper_figure_1():
    """Rajbhandari et al. 2020 Fig. 1: 7.5B parameters, 64-way data parallel, K = 12."""
    params, d = 7.5e9, 64
    gigabytes = [params * sum(memory.model_state_bytes_per_parameter(stage, d)) / 1e9 for stage in range(4)]
    assert [round(value, 1) for value in gigabytes] == [120.0, 31.4, 16.6, 1.9]


def test_precision_presets():
    assert memory.MIXED_PRECISION.bytes_per_parameter == 16
    assert memory.MEGATRON_BF16.bytes_per_parameter == 18  # Megatron docs: bf16 param, fp32 grads
    assert memory.model_state_bytes_per_parameter(1, 8, memory.MEGATRON_BF16) == (2, 4, 1.5)  # 6 + 12/d
    with pytest.raises(SpecError, match="zero_stage"):
        memory.model_state_bytes_per_parameter(4, 8)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "llama2-70b", "palm-540b"])
def test_parameters_per_device_add_up(name):
    model = MODEL_PRESETS[name]
    assert memory.layer_parameters_per_device(model, 1) == model.parameters_per_layer()
    assert memory.stage_parameters(model, 1, 1, 0) == model.num_parameters()
    # Two stages: the layers split evenly; a tied head is copied onto the last stage (Megatron).
    stages = memory.stage_parameters(model, 1, 2, 0) + memory.stage_parameters(model, 1, 2, 1)
    extra = model.vocab_size * model.hidden_size if model.tied_embeddings else 0
    assert stages == pytest.approx(model.num_parameters() + extra)


def test_tensor_parallel_parameters():
    model = gpt(4, 1024, 16)
    h = 1024
    sharded = 12 * h * h + 3 * h + 4 * h  # weights, QKV biases, MLP-in bias
    replicated = 2 * h + 4 * h  # row-parallel biases, two layer norms
    assert memory.layer_parameters_per_device(model, 8) == sharded / 8 + replicated
    first = memory.stage_parameters(model, 8, 2, 0)
    assert first == 2 * (sharded / 8 + replicated) + 51200 * h / 8 + 2048 * h  # positions replicated


# --- per device --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", list(TABLE3))
def test_korthikanti_table3_configurations_fit_only_with_their_memory_savings(size):
    """Table 3 runs fit in an 80 GB A100 with sequence parallelism + selective recomputation (and
    with full recomputation, the baseline); with neither they do not (Sec. 6, Fig. 1)."""
    model, t, p, v, b, batch = TABLE3[size]
    in_flight = (v + 1) * p - 1 if v > 1 else p  # rank 0's peak, Megatron's 1F1B / interleaved warm-up
    capacity = 80e9

    def total(sp, recompute):
        plan = make_plan(t=t, p=p, v=v, b=b, batch=batch, sp=sp, recompute=recompute)
        return memory.memory_per_device(model, plan, capacity, in_flight)

    assert total(True, "selective").fits
    assert total(False, "full").fits
    assert not total(False, "none").fits
    assert total(False, "none").largest_component()[0] == "activations"


def test_interleaved_in_flight_layers_korthikanti_section_4_3():
    """Rank 0 of the interleaved schedule stores l (1 + (p - 1)/(p v)) layers of activations."""
    model, t, p, v, b, batch = TABLE3["530B"]
    plan = make_plan(t=t, p=p, v=v, b=b, batch=batch, sp=True, recompute="none")
    breakdown = memory.memory_per_device(model, plan, 80e9, (v + 1) * p - 1, stage=0)
    per_layer = activation_bytes_per_layer(model, b, t, True, "none")
    layers = model.num_layers * (1 + (p - 1) / (p * v))
    assert breakdown.activations == pytest.approx(layers * per_layer, rel=1e-12)


def test_one_f_one_b_first_stage_holds_all_layers_independent_of_p():
    """Sec. 4.3: with 1F1B the first stage stores p micro-batches of l/p layers: s b h l / t (34 + 5as/h)."""
    model = TABLE3["1T"][0]
    for p in (1, 4, 16, 64):
        plan = make_plan(t=8, p=p, sp=True, recompute="none")
        stored = memory.memory_per_device(model, plan, 80e9, p, stage=0).activations
        assert stored == pytest.approx(model.num_layers * table2(model, 1, 8, True, "none"), rel=1e-12)


def test_breakdown_by_hand_for_a_small_model():
    model = MODEL_PRESETS["gpt-tiny"]  # 8 layers, h 64, 8 heads, V 256, s 32, dropout 0.1, tied
    plan = make_plan(t=2, p=2, d=4, b=2, sp=True, recompute="full", zero=1)
    s, b, h, v, t = 32, 2, 64, 256, 2
    last = memory.memory_per_device(model, plan, 1e9, 3, stage=1)
    params = memory.stage_parameters(model, t, 2, 1)
    assert params == 4 * memory.layer_parameters_per_device(model, t) + 2 * h + v * h / t
    assert last.parameters == 2 * params and last.gradients == 2 * params and last.optimizer_states == 12 / 4 * params
    checkpoints = 3 * 4 * 2 * s * b * h / t
    working_set = table2(model, b, t, True, "none") - 2 * s * b * h / t
    assert last.activations == pytest.approx(checkpoints + working_set)
    assert last.embedding_and_logits == pytest.approx(2 * 2 * s * b * h / t + 4 * s * b * v / t)
    first = memory.memory_per_device(model, plan, 1e9, 3, stage=0)
    assert first.embedding_and_logits == pytest.approx(3 * s * b * h / t)  # 1-byte embedding dropout masks
    worst = memory.memory_per_device(model, plan, 1e9, 3)
    assert worst.total == max(first.total, last.total)
    assert last.total == pytest.approx(
        last.parameters + last.gradients + last.optimizer_states + last.activations + last.embedding_and_logits
    )


def test_per_rank_in_flight_counts_pick_the_fullest_rank():
    model = gpt(8, 1024, 16, seq_length=1024)
    plan = make_plan(p=4, b=1, recompute="none")
    per_rank = (4, 3, 2, 1)  # 1F1B: p - r
    worst = memory.memory_per_device(model, plan, 80e9, per_rank)
    ranks = [memory.memory_per_device(model, plan, 80e9, per_rank, stage=r) for r in range(4)]
    assert worst == max(ranks, key=lambda m: m.total) == ranks[0]
    assert ranks[3].activations == activation_bytes_per_layer(model, 1, 1, False, "none") * 2
    # A middle rank that holds the most micro-batches wins.
    skewed = (1, 9, 2, 1)
    assert memory.memory_per_device(model, plan, 80e9, skewed) == memory.memory_per_device(
        model, plan, 80e9, skewed, stage=1
    )


def test_gpipe_keeps_every_micro_batch_logits_on_the_last_stage():
    model = gpt(4, 512, 8, seq_length=512)
    one_f = memory.memory_per_device(model, make_plan(p=2, recompute="none"), 80e9, 8, stage=1)
    gpipe = memory.memory_per_device(model, make_plan(p=2, recompute="none", schedule="gpipe"), 80e9, 8, stage=1)
    assert gpipe.embedding_and_logits == 8 * one_f.embedding_and_logits
    assert one_f.embedding_and_logits == 2 * 2 * 512 * 512 + 4 * 512 * 51200


def test_breakdown_properties():
    fits = MemoryBreakdown(10, 5, 60, 20, 1, 96, 100)
    assert fits.fits and fits.shortfall == 0 and fits.largest_component() == ("optimizer_states", 60)
    short = MemoryBreakdown(10, 5, 6, 80, 1, 102, 100)
    assert not short.fits and short.shortfall == 2 and short.largest_component() == ("activations", 80)


def test_memory_per_device_errors():
    model = MODEL_PRESETS["gpt-tiny"]
    with pytest.raises(SpecError, match="recompute"):
        memory.memory_per_device(model, ParallelPlan(tensor_parallel=1, pipeline_parallel=1, data_parallel=1), 1e9, 1)
    plan = make_plan(p=2)
    with pytest.raises(SpecError, match="stage"):
        memory.memory_per_device(model, plan, 1e9, 1, stage=2)
    with pytest.raises(SpecError, match="in_flight_chunks"):
        memory.memory_per_device(model, plan, 1e9, 0)
    with pytest.raises(SpecError, match="in_flight_chunks"):
        memory.memory_per_device(model, plan, 1e9, (1, 2, 3))
    with pytest.raises(SpecError, match="num_layers"):
        memory.memory_per_device(model, make_plan(p=3), 1e9, 1)
