"""`modelpar train --png/--trace`: predicted vs measured timeline picture and Chrome trace of a real run."""

from __future__ import annotations

import json

from modelpar.commands.cli import main


def test_train_writes_side_by_side_png_and_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MODELPAR_CACHE", str(tmp_path / "no-profile"))  # no local profile: measured only
    png, trace = tmp_path / "step.png", tmp_path / "trace.json"
    code = main(["train", "--model", "gpt-tiny", "--pipeline-parallel", "2", "--steps", "2", "--json",
                 "--png", str(png), "--trace", str(trace)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["png"] == str(png) and summary["trace"] == str(trace)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in events} == {0, 1}
    assert sum(1 for e in events if e["name"].startswith("F")) >= 2 * summary["plan"]["global_batch_size"] // (
        summary["plan"]["micro_batch_size"] * summary["plan"]["data_parallel"])
