"""The planner's command line: JSON contracts and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelpar.commands.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_json_contract(capsys):
    code, out, err = run(capsys, "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--devices", "1024",
                         "--global-batch-size", "1536", "--top", "3", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert len(document["plans"]) == 3
    best = document["plans"][0]
    for key in ("plan", "predicted_step_time_s", "predicted_mfu", "memory_per_device_bytes"):
        assert key in best
    times = [p["predicted_step_time_s"] for p in document["plans"]]
    assert times == sorted(times)
    assert sum(document["rejected"].values()) > 0
    plan = best["plan"]
    assert plan["tensor_parallel"] * plan["pipeline_parallel"] * plan["data_parallel"] == 1024


def test_partial_plan_searches_only_unknowns(capsys):
    code, out, _ = run(capsys, "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--devices", "512",
                       "--global-batch-size", "512", "--tensor-parallel", "8", "--pipeline-parallel", "8", "--json")
    assert code == 0
    for row in json.loads(out)["plans"]:
        assert row["plan"]["tensor_parallel"] == 8 and row["plan"]["pipeline_parallel"] == 8


def test_plan_human_table_mentions_rejections(capsys):
    code, out, _ = run(capsys, "plan", "--model", "megatron-1t", "--cluster", "dgx-a100-80gb", "--devices", "3072",
                       "--global-batch-size", "3072")
    assert code == 0
    assert "best plans" in out and "out of memory" in out and "searched in" in out


def test_estimate_breakdown_contract(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tensor_parallel": 8, "pipeline_parallel": 64, "data_parallel": 1, "virtual_stages": 1,
                                "micro_batch_size": 1, "global_batch_size": 512, "sequence_parallel": True,
                                "recompute": "selective", "zero_stage": 0, "schedule": "1f1b"}))
    code, out, err = run(capsys, "estimate", "--model", "megatron-1t", "--cluster", "dgx-a100-80gb", "--devices", "512",
                         "--plan", str(plan), "--json")
    assert code == 0, err
    document = json.loads(out)
    assert set(document) >= {"plan", "predicted_step_time_s", "predicted_mfu", "breakdown", "memory"}
    assert document["memory"]["fits"] is True
    assert 0.4 < document["predicted_mfu"] < 0.7  # Korthikanti Table 5 measured 56.3%


def test_validate_json_contract(capsys):
    from modelpar.planner.validate import default_runs_path

    path = default_runs_path()
    assert path.is_file(), path  # shipped inside the package: never skipped
    code, out, _ = run(capsys, "validate", str(path), "--json")
    assert code == 0
    document = json.loads(out)
    assert document["summary"]["count"] == len(document["runs"]) == 89
    row = document["runs"][0]
    assert {"name", "predicted_step_time_s", "measured_step_time_s", "relative_error", "predicted_mfu"} <= set(row)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--devices", "64", "--tensor-parallel", "7"],
         "tensor_parallel 7 does not divide"),
        (["plan", "--model", "megatron-1tt", "--cluster", "dgx-a100-80gb", "--devices", "8"], "did you mean 'megatron-1t'"),
        (["plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80", "--devices", "8"], "did you mean 'dgx-a100-80gb'"),
        (["estimate", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--devices", "8", "--tensor-parallel", "8",
          "--micro-batch-size", "1"], "plan needs"),
        (["plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--devices", "8"], "no feasible plan"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_json_and_unknown_key(capsys, tmp_path):
    bad = tmp_path / "model.json"
    bad.write_text('{"num_layers": 2,')
    code, _, err = run(capsys, "plan", "--model", str(bad), "--cluster", "dgx-a100-80gb", "--devices", "8")
    assert code == 2 and "malformed JSON" in err
    unknown = tmp_path / "m2.json"
    unknown.write_text(json.dumps({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256,
                                   "vocab_size": 100, "seq_length": 16, "heads": 4}))
    code, _, err = run(capsys, "plan", "--model", str(unknown), "--cluster", "dgx-a100-80gb", "--devices", "8")
    assert code == 2 and "unknown key 'heads'" in err


def test_console_script_exit_code_and_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "modelpar.commands.cli", "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb",
         "--devices", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "positive integer" in result.stderr


def test_planner_does_not_import_torch():
    code = ("import sys, modelpar.commands.cli as c; c.main(['plan','--model','gpt3-175b','--cluster','dgx-a100-80gb',"
            "'--devices','64','--json']); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_estimate_time_table_lists_seconds_and_the_rest_with_units(capsys, tmp_path):
    plan = tmp_path / "plan.json"  # Korthikanti et al. 2022 Table 5, 1T
    plan.write_text(json.dumps({"tensor_parallel": 8, "pipeline_parallel": 64, "data_parallel": 1,
                                "virtual_stages": 1, "micro_batch_size": 1, "global_batch_size": 512,
                                "sequence_parallel": True, "recompute": "selective", "zero_stage": 0,
                                "schedule": "1f1b"}))
    code, out, err = run(capsys, "estimate", "--model", "megatron-1t", "--cluster", "dgx-a100-80gb", "--devices",
                         "512", "--plan", str(plan))
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    assert "bubble_fraction" not in rows and "num_micro_batches" not in rows and "tokens_per_step" not in rows
    assert "compute_s" in rows and "step" in rows and "100.0%" in rows["step"]
    assert "not in step" in rows["overlapped_comm_s (hidden behind compute)"]
    assert "pipeline bubble: 11.0% of the schedule's time is idle" in out
    assert "micro-batches per step: 512 per pipeline" in out and "tokens per step: 1,048,576" in out
    shares = [float(line.split("│")[3].strip().rstrip("%")) for key, line in rows.items()
              if key.endswith("_s") and "%" in line and "(" not in line.split("│")[3]]
    assert sum(shares) == pytest.approx(100.0, abs=0.5)  # the step's parts add up to the step


def test_plan_exposed_comm_counts_only_exposed_communication_and_explains_losers(capsys):
    argv = ["plan", "--model", "megatron-1t", "--cluster", "dgx-a100-80gb", "--devices", "3072",
            "--global-batch-size", "3072"]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    document = json.loads(out)
    assert len(document["explanations"]) == len(document["plans"]) - 1
    assert document["explanations"][0].startswith("#2 ")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "why the others are slower than #1:" in out and "#2 t" in out
    table_rows = [line.split("│") for line in out.splitlines() if line.count("│") >= 13]
    assert len(table_rows) == len(document["plans"]) == 5
    for best, row in zip(document["plans"], table_rows):
        b = best["breakdown"]
        exposed = b["tensor_parallel_comm_s"] + b["pipeline_p2p_s"] + b["data_parallel_comm_s"]
        assert row[13].strip() == f"{exposed / best['predicted_step_time_s']:.1%}"



def test_estimate_precision_recipe(capsys):
    """--precision megatron-bf16 keeps fp32 main gradients: twice the 16-bit gradient bytes."""
    argv = ["estimate", "--model", "llama2-7b", "--cluster", "dgx-a100-80gb", "--devices", "8", "--tensor-parallel",
            "2", "--pipeline-parallel", "4", "--micro-batch-size", "1", "--json"]
    memory = {}
    for precision in ("mixed", "megatron-bf16"):
        code, out, err = run(capsys, *argv, "--precision", precision)
        assert code == 0, err
        memory[precision] = json.loads(out)["memory"]
    assert memory["megatron-bf16"]["gradients"] == pytest.approx(2 * memory["mixed"]["gradients"])
    assert memory["megatron-bf16"]["parameters"] == memory["mixed"]["parameters"]
