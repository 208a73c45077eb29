"""`modelpar presets`: the listing, the JSON templates (round trip through --model/--cluster FILE)
and the one-line error for an unknown name."""

from __future__ import annotations

import json

import pytest

from modelpar.commands import cli, presets
from modelpar.specs import CLUSTER_PRESETS, MODEL_PRESETS, SpecError, load_cluster, load_model


def parse(argv):
    return cli.build_parser().parse_args(["presets", *argv])


def run(capsys, *argv):
    args = parse(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_listing_names_every_preset_with_its_shape(capsys):
    code, out, _ = run(capsys)
    assert code == 0
    for name in [*MODEL_PRESETS, *CLUSTER_PRESETS]:
        assert name in out
    assert "175B" not in out and "174.6B" in out  # gpt3-175b's counted parameters
    assert "A100-SXM4-80GB" in out


def test_listing_json(capsys):
    code, out, _ = run(capsys, "--json")
    assert code == 0
    document = json.loads(out)
    assert [row["name"] for row in document["models"]] == list(MODEL_PRESETS)
    assert [row["name"] for row in document["clusters"]] == list(CLUSTER_PRESETS)
    gpt3 = next(row for row in document["models"] if row["name"] == "gpt3-175b")
    assert (gpt3["num_layers"], gpt3["hidden_size"], gpt3["num_attention_heads"]) == (96, 12288, 96)
    assert gpt3["num_parameters"] == MODEL_PRESETS["gpt3-175b"].num_parameters()
    a100 = next(row for row in document["clusters"] if row["name"] == "dgx-a100-80gb")
    assert (a100["device"], a100["devices_per_node"], a100["memory_gib"]) == ("A100-SXM4-80GB", 8, 80)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_model_template_round_trips_through_a_file(capsys, tmp_path, name):
    code, out, _ = run(capsys, name)
    assert code == 0
    path = tmp_path / "model.json"
    path.write_text(out)
    assert load_model(str(path)) == MODEL_PRESETS[name]


@pytest.mark.parametrize("name", list(CLUSTER_PRESETS))
def test_cluster_template_round_trips_through_a_file(capsys, tmp_path, name):
    code, out, _ = run(capsys, name, "--json")
    assert code == 0
    path = tmp_path / "cluster.json"
    path.write_text(out)
    assert load_cluster(str(path)) == CLUSTER_PRESETS[name]


def test_template_keys_are_the_dataclass_fields():
    assert set(presets.preset_template("llama2-7b")) == set(MODEL_PRESETS["llama2-7b"].__dataclass_fields__)
    cluster = presets.preset_template("dgx-h100")
    assert set(cluster) == set(CLUSTER_PRESETS["dgx-h100"].__dataclass_fields__)
    assert set(cluster["device"]) == set(CLUSTER_PRESETS["dgx-h100"].device.__dataclass_fields__)


@pytest.mark.parametrize("name, closest", [
    ("gpt3-175", "gpt3-175b"), ("megatron-1tt", "megatron-1t"), ("dgx-a100", "dgx-a100-40gb' or 'dgx-a100-80gb"),
])
def test_unknown_name_names_the_closest_preset(name, closest):
    args = parse([name])
    with pytest.raises(SpecError, match=f"unknown preset '{name}'; did you mean '{closest}'") as error:
        args.func(args)
    assert "\n" not in str(error.value)


def test_unknown_name_through_the_cli_is_one_line_and_exit_2(capsys):
    assert cli.main(["presets", "megatron-1tt"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "did you mean 'megatron-1t'" in err


def test_format_parameters():
    assert presets.format_parameters(1_008_000_000_000) == "1.0T"
    assert presets.format_parameters(124_400_000) == "124.4M"
    assert presets.format_parameters(999) == "999"
