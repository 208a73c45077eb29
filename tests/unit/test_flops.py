"""FLOPs and utilisation formulas, checked against the closed forms and numbers printed in papers."""

from __future__ import annotations

import json

import pytest

from modelpar.planner import flops
from modelpar.planner.validate import default_runs_path
from modelpar.specs.errors import SpecError
from modelpar.specs.model import MODEL_PRESETS, ModelSpec

RUNS_FILE = default_runs_path()  # shipped inside the package: the tests that read it never skip
PEAK_TFLOPS = {"dgx-a100-80gb": 312.0, "dgx-h100": 989.0, "tpu-v4": 275.0}


def gpt(layers: int, hidden: int, heads: int, vocab: int = 51200, seq: int = 2048) -> ModelSpec:
    return ModelSpec(
        name=f"gpt-{layers}x{hidden}", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=4 * hidden, vocab_size=vocab, seq_length=seq,
    )


# Korthikanti et al. 2022, Table 3 models (all: s = 2048, V = 51200).
KORTHIKANTI_MODELS = {
    "22B": gpt(48, 6144, 64),
    "175B": gpt(96, 12288, 96),
    "530B": gpt(105, 20480, 128),
    "1T": gpt(128, 25600, 160),
}


def eq7_model_flops(m: ModelSpec, batch: int) -> float:
    """Korthikanti et al. 2022 eq. 7."""
    b, s, l, h, v = batch, m.seq_length, m.num_layers, m.hidden_size, m.vocab_size
    return 72 * b * s * l * h**2 * (1 + s / (6 * h) + v / (12 * l * h))


def eq8_as_printed(m: ModelSpec, batch: int) -> float:
    """Korthikanti et al. 2022 eq. 8 exactly as printed (s/(3h); see NVIDIA/Megatron-LM#523)."""
    b, s, l, h, v = batch, m.seq_length, m.num_layers, m.hidden_size, m.vocab_size
    return 72 * b * s * l * h**2 * (1 + s / (3 * h) + v / (12 * l * h))


def eq3_narayanan(m: ModelSpec, batch: int) -> float:
    """Narayanan et al. 2021 eq. 3 (with full activation recomputation)."""
    b, s, l, h, v = batch, m.seq_length, m.num_layers, m.hidden_size, m.vocab_size
    return 96 * b * s * l * h**2 * (1 + s / (6 * h) + v / (16 * l * h))


def published_runs(prefix: str) -> list[dict]:
    runs = json.loads(RUNS_FILE.read_text())["runs"]
    return [run for run in runs if run["name"].startswith(prefix)]


def spec_of(run: dict) -> ModelSpec:
    model = run["model"]
    return ModelSpec(
        name=run["name"], num_layers=model["num_layers"], hidden_size=model["hidden_size"],
        num_attention_heads=model["num_attention_heads"], ffn_hidden_size=model["ffn_hidden_size"],
        vocab_size=model["vocab_size"], seq_length=model["seq_length"], num_query_groups=model["num_query_groups"],
        activation=model["activation"],
    )


# --- closed forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt3-175b", "megatron-530b", "megatron-1t", "megatron-8.3b", "gpt2-small"])
@pytest.mark.parametrize("batch", [1, 512])
def test_general_formula_equals_korthikanti_eq7_and_narayanan_eq3_for_gpt(name, batch):
    model = MODEL_PRESETS[name]
    assert flops.model_flops_per_iteration(model, batch) == pytest.approx(eq7_model_flops(model, batch), rel=1e-12)
    assert flops.hardware_flops_per_iteration(model, batch, "full") == pytest.approx(eq3_narayanan(model, batch), rel=1e-12)
    assert flops.hardware_flops_per_iteration(model, batch, "none") == flops.model_flops_per_iteration(model, batch)


def test_selective_recompute_adds_the_attention_core_forward_corrected_eq8():
    model, batch = KORTHIKANTI_MODELS["175B"], 64
    b, s, l, h, v = batch, model.seq_length, model.num_layers, model.hidden_size, model.vocab_size
    corrected = 72 * b * s * l * h**2 * (1 + 2 * s / (9 * h) + v / (12 * l * h))
    assert flops.hardware_flops_per_iteration(model, batch, "selective") == pytest.approx(corrected, rel=1e-12)
    # The printed eq. 8 counts 24 B s^2 h l for the attention terms instead of 16 (erratum).
    printed_extra = eq8_as_printed(model, batch) - flops.hardware_flops_per_iteration(model, batch, "selective")
    assert printed_extra == pytest.approx(8 * b * s**2 * h * l, rel=1e-9)


def test_forward_flops_generalise_to_gqa_swiglu_and_head_dim():
    # h=64, 8 heads of width 16 (q = 128 != h), 2 KV groups (k = 32), SwiGLU f=176, s=32.
    model = ModelSpec(
        name="odd", num_layers=3, hidden_size=64, num_attention_heads=8, ffn_hidden_size=176, vocab_size=256,
        seq_length=32, num_query_groups=2, head_dim=16, activation="swiglu",
    )
    tokens = 5 * 32
    by_hand = 2 * tokens * (64 * (128 + 2 * 32) + 128 * 64 + 3 * 64 * 176) + 4 * tokens * 32 * 128
    assert flops.forward_flops_per_layer(model, tokens) == by_hand
    assert flops.logits_forward_flops(model, tokens) == 2 * tokens * 64 * 256
    assert flops.model_flops_per_iteration(model, 5) == 3 * (3 * by_hand + 2 * tokens * 64 * 256)
    # MQA: fewer K/V weights, but attention FLOPs do not depend on the KV heads.
    mqa = ModelSpec(**{**model.__dict__, "num_query_groups": 1})
    assert flops.attention_core_forward_flops(mqa, tokens) == flops.attention_core_forward_flops(model, tokens)
    assert flops.forward_flops_per_layer(model, tokens) - flops.forward_flops_per_layer(mqa, tokens) == 2 * tokens * 64 * 32


def test_megatron_num_floating_point_operations_gqa_swiglu():
    """Megatron-LM's formula: 12 B s l h^2 [(1 + g/a + s/h) q/h + (f/h)(3/2 if SwiGLU) + V/(2 l h)]."""
    model = MODEL_PRESETS["llama2-70b"]
    b, s, l, h, v = 8, model.seq_length, model.num_layers, model.hidden_size, model.vocab_size
    a, g, q, f = model.num_attention_heads, model.kv_heads, model.attention_width, model.ffn_hidden_size
    megatron = 12 * b * s * l * h * h * ((1 + g / a + s / h) * q / h + f / h * 1.5 + v / (2 * l * h))
    assert flops.model_flops_per_iteration(model, b) == pytest.approx(megatron, rel=1e-12)


# --- Narayanan et al. 2021 Table 1 -------------------------------------------------------------


def test_narayanan_table1_step_times_from_eq3():
    runs = published_runs("narayanan21_")
    assert len(runs) == 10
    for run in runs:
        model = spec_of(run)
        batch, gpus = run["plan"]["global_batch_size"], run["num_devices"]
        tflops_per_gpu = run["measured"]["tflops_per_device"]
        step = flops.hardware_flops_per_iteration(model, batch, "full") / (gpus * tflops_per_gpu * 1e12)
        assert step == pytest.approx(run["measured"]["step_time_s"], rel=0.01), run["name"]


def test_narayanan_table1_one_trillion_row():
    """128 layers, h = 25600, 3072 GPUs, batch 3072, 163 TFLOP/s per GPU, 52% of peak."""
    model = MODEL_PRESETS["megatron-1t"]
    step = flops.hardware_flops_per_iteration(model, 3072, "full") / (3072 * 163e12)
    assert flops.hfu(model, 3072, "full", step, 3072, 312.0) == pytest.approx(163 / 312, rel=1e-12)
    assert round(163 / 312, 2) == 0.52
    assert step == pytest.approx(102.6, rel=0.01)


@pytest.mark.parametrize(
    "name, billions",
    [("gpt3-175b", 175.0), ("megatron-530b", 529.6), ("megatron-1t", 1008.0), ("megatron-8.3b", 8.3), ("palm-540b", 540.35)],
)
def test_preset_parameter_counts_match_papers(name, billions):
    assert MODEL_PRESETS[name].num_parameters() / 1e9 == pytest.approx(billions, rel=0.01)


def test_narayanan_table1_parameter_counts():
    for run in published_runs("narayanan21_"):
        label = run["name"].rsplit("_", 1)[1].rstrip("B")  # e.g. "145.6"
        decimals = len(label.split(".")[1]) if "." in label else 0
        count = spec_of(run).num_parameters() / 1e9
        if count < 10:  # the small rows print two significant digits
            assert round(count, 1) == float(label), run["name"]
        else:
            assert round(count, decimals) == float(label), run["name"]


# --- Korthikanti et al. 2022 Table 5 -----------------------------------------------------------


def test_korthikanti_table5_mfu():
    runs = [run for run in published_runs("korthikanti22_") if run["measured"]["mfu"] is not None]
    assert len(runs) >= 5
    for run in runs:
        model, plan = spec_of(run), run["plan"]
        value = flops.mfu(model, plan["global_batch_size"], run["measured"]["step_time_s"], run["num_devices"], 312.0)
        assert value == pytest.approx(run["measured"]["mfu"], abs=0.002), run["name"]


# Table 5: (GPUs, batch, iteration time with sequence parallelism + selective recompute, MFU, HFU).
KORTHIKANTI_TABLE5 = {
    "22B": (8, 4, 1.10, 0.415, 0.437),
    "175B": (64, 64, 13.75, 0.514, 0.528),
    "530B": (280, 280, 37.83, 0.560, 0.570),
    "1T": (512, 512, 71.49, 0.563, 0.570),
}


@pytest.mark.parametrize("size", list(KORTHIKANTI_TABLE5))
def test_korthikanti_table5_hfu_comes_from_the_printed_eq8(size):
    model = KORTHIKANTI_MODELS[size]
    gpus, batch, step, table_mfu, table_hfu = KORTHIKANTI_TABLE5[size]
    assert flops.mfu(model, batch, step, gpus, 312.0) == pytest.approx(table_mfu, abs=0.002)
    printed_hfu = eq8_as_printed(model, batch) / (step * gpus * 312e12)
    assert printed_hfu == pytest.approx(table_hfu, abs=0.002)
    corrected_hfu = flops.hfu(model, batch, "selective", step, gpus, 312.0)
    assert table_mfu - 0.002 < corrected_hfu < table_hfu


def test_korthikanti_selective_recompute_overhead():
    """Sec. 5: selective recomputation costs 2.7% (GPT-3) and 1.6% (MT-NLG) extra FLOPs, with
    the printed eq. 8; the corrected count is a third of that."""
    for name, paper in (("gpt3-175b", 0.027), ("megatron-530b", 0.016)):
        model = gpt(MODEL_PRESETS[name].num_layers, MODEL_PRESETS[name].hidden_size,
                    MODEL_PRESETS[name].num_attention_heads)
        model_flops = flops.model_flops_per_iteration(model, 1)
        assert eq8_as_printed(model, 1) / model_flops - 1 == pytest.approx(paper, abs=0.0006)
        corrected = flops.recompute_flops_per_iteration(model, 1, "selective") / model_flops
        assert corrected == pytest.approx(paper / 3, abs=0.0005)


# --- PaLM Appendix B, MT-NLG, Megatron README --------------------------------------------------


def test_palm_540b_mfu_appendix_b():
    """540B on 6144 TPU v4 (275 TFLOP/s) at 238.3K tokens/s: 46.2% MFU."""
    model = MODEL_PRESETS["palm-540b"]
    per_token = flops.palm_model_flops_per_token(model)
    assert per_token * 238.3e3 / (6144 * 275e12) == pytest.approx(0.462, abs=0.001)
    # The general formula agrees with 6N + 12LHQT to within the spec's biases.
    assert flops.model_flops_per_iteration(model, 1) / model.seq_length == pytest.approx(per_token, rel=1e-4)
    step = 2048 * 2048 / 238.3e3
    assert flops.mfu(model, 2048, step, 6144, 275.0) == pytest.approx(0.462, abs=0.001)


def test_palm_attention_term_is_12_l_h_q_t():
    model = MODEL_PRESETS["palm-540b"]
    attention = flops.palm_model_flops_per_token(model) - 6 * (
        model.num_layers * model.parameters_per_layer() + model.vocab_size * model.hidden_size
    )
    assert attention == 12 * 118 * 48 * 256 * 2048


def test_mt_nlg_mfu_palm_appendix_b_and_reported_tflops():
    """MT-NLG 530B on 2240 A100s at 65.43K tokens/s: 30.2% MFU (PaLM App. B); the 126 TFLOP/s
    MT-NLG reports count the recomputed forward (Narayanan eq. 3)."""
    model = MODEL_PRESETS["megatron-530b"]
    batch = 1920
    step = batch * 2048 / 65.43e3
    assert flops.mfu(model, batch, step, 2240, 312.0) == pytest.approx(0.302, abs=0.001)
    tflops = flops.hardware_flops_per_iteration(model, batch, "full") / (step * 2240) / 1e12
    assert tflops == pytest.approx(126, rel=0.01)


def test_megatron_readme_h100_rows():
    runs = published_runs("megatron_readme_h100_")
    assert len(runs) == 9
    for run in runs:
        model, measured = spec_of(run), run["measured"]
        batch, gpus = run["plan"]["global_batch_size"], run["num_devices"]
        step = flops.model_flops_per_iteration(model, batch) / (gpus * measured["tflops_per_device"] * 1e12)
        assert step == pytest.approx(measured["step_time_s"], rel=0.01), run["name"]
        value = flops.mfu(model, batch, measured["step_time_s"], gpus, 989.0)
        assert value == pytest.approx(measured["mfu"], abs=0.006), run["name"]


# --- utilisation and errors --------------------------------------------------------------------


def test_mfu_and_hfu_relation():
    model = MODEL_PRESETS["gpt3-175b"]
    args = (1536, 30.0, 1024, 312.0)
    assert flops.hfu(model, 1536, "none", *args[1:]) == flops.mfu(model, *args)
    ratio = flops.hfu(model, 1536, "full", *args[1:]) / flops.mfu(model, *args)
    assert ratio == pytest.approx(
        flops.hardware_flops_per_iteration(model, 1536, "full") / flops.model_flops_per_iteration(model, 1536)
    )
    assert 4 / 3 - 0.01 < ratio < 4 / 3  # the logits are not recomputed


def test_bad_inputs_raise_spec_error():
    model = MODEL_PRESETS["gpt-tiny"]
    with pytest.raises(SpecError, match="recompute"):
        flops.hardware_flops_per_iteration(model, 8, "partial")
    with pytest.raises(SpecError, match="positive"):
        flops.mfu(model, 8, 0.0, 8, 312.0)
