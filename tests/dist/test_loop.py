"""Close the loop on this machine: `modelpar profile` -> `modelpar plan --cluster local --json`
-> `modelpar train --plan plan.json`, which runs exactly that plan and reports predicted vs
measured step time, compute, communication, bubble, peak memory and activations per layer."""

from __future__ import annotations

import json

import pytest

from modelpar.commands import cli
from modelpar.planner.prediction import COMPARED_KEYS
from modelpar.specs import load_cluster

pytestmark = pytest.mark.dist


def _run_json(capsys, *argv: str) -> dict:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)  # exactly one JSON document and nothing else


def test_profile_plan_train_loop(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODELPAR_CACHE", str(tmp_path / "cache"))
    unprofiled = _run_json(capsys, "train", "--model", "gpt-tiny", "--steps", "1", "--json")
    assert unprofiled["predicted"] is None and unprofiled["relative_error"] is None
    assert "no local profile: run `modelpar profile` first" in unprofiled["prediction"]["error"]
    assert set(COMPARED_KEYS) <= set(unprofiled["measured"])

    profile = _run_json(capsys, "profile", "--fast", "--ranks", "2,4", "--json")
    cluster = load_cluster(profile["path"])  # plain ClusterSpec JSON, loadable as a file
    assert load_cluster("local") == cluster
    assert [p.ranks for p in cluster.shared_host] == [2, 4]
    for shared in cluster.shared_host:
        device = shared.device
        assert device.peak_tflops > 0 and device.memory_bandwidth_gb_per_s > 0 and device.kernel_overhead_us > 0
        assert device.value_bytes == 4 and device.attention_kernel == "explicit"
    assert cluster.shared_host[0].latency_us > 0  # gloo collectives among 2 ranks

    planned = _run_json(capsys, "plan", "--model", "gpt-tiny", "--cluster", "local", "--devices", "4", "--json")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(planned))
    best = planned["plans"][0]

    summary = _run_json(capsys, "train", "--model", "gpt-tiny", "--plan", str(plan_path), "--steps", "3", "--json")
    assert summary["plan"] == best["plan"]  # exactly the planned plan, nothing re-chosen
    assert summary["world_size"] == 4
    predicted, measured, errors = summary["predicted"], summary["measured"], summary["relative_error"]
    assert set(predicted) == set(measured)
    for key in COMPARED_KEYS:
        assert measured[key] is not None and predicted[key] is not None, key
        assert key in errors
    for key in ("step_time_s", "compute_s", "peak_memory_bytes", "activation_bytes_per_layer"):
        assert measured[key] > 0 and predicted[key] > 0, key
        assert errors[key] == pytest.approx(predicted[key] / measured[key] - 1)
    parts = measured["compute_s"] + measured["communication_s"] + measured["bubble_s"]
    assert parts == pytest.approx(measured["step_time_s"])
    assert predicted["step_time_s"] == pytest.approx(best["predicted_step_time_s"], rel=1e-9)
    assert summary["prediction"]["cluster"] == "local"
