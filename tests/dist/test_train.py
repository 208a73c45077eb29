"""`modelpar train` end to end: one JSON summary on stdout, and a checkpoint saved from one
layout loaded into another (serial-layout checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch

from modelpar.commands import cli
from modelpar.training.data import make_token_source
from modelpar.models.gpt import DropoutKey, init_gpt
from modelpar.runtime.checkpoint import load_checkpoint
from modelpar.specs.model import MODEL_PRESETS

pytestmark = pytest.mark.dist

SPEC = MODEL_PRESETS["gpt-tiny"]


def _train_json(capsys, *flags: str) -> dict:
    code = cli.main(["train", "--model", "gpt-tiny", "--json", *flags])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)  # exactly one JSON document and nothing else


def test_train_json_summary_and_checkpoint_into_another_layout(tmp_path, capsys):
    checkpoint = tmp_path / "ck.pt"
    first = _train_json(capsys, "--tensor-parallel", "2", "--pipeline-parallel", "2", "--sequence-parallel",
                        "--steps", "3", "--seed", "4", "--cluster", "dgx-a100-80gb",
                        "--save-checkpoint", str(checkpoint))
    for key in ("losses", "step_time_s", "tokens_per_s", "mfu", "peak_memory_bytes", "plan", "measured",
                "predicted", "timeline"):
        assert key in first
    assert len(first["losses"]) == 3 and first["losses"][-1] < first["losses"][0]
    assert first["plan"]["tensor_parallel"] == 2 and first["plan"]["sequence_parallel"] is True
    assert first["predicted"]["step_time_s"] > 0 and first["mfu"] > 0
    assert set(first["timeline"]) == {"0", "1", "2", "3"}
    kinds = {"compute" if event["kind"] in ("forward", "backward") else event["kind"]
             for event in first["timeline"]["0"]}
    assert kinds >= {"compute", "send", "grad_sync", "optimizer"}

    state, metadata = load_checkpoint(checkpoint)
    assert metadata["plan"]["pipeline_parallel"] == 2
    assert set(state) == set(init_gpt(SPEC, 0).state_dict())

    # the checkpoint of the t2 x p2 run, resumed on d2: its first step is step 3, whose loss equals
    # the serial model's on step 3's batch
    second = _train_json(capsys, "--data-parallel", "2", "--steps", "1", "--seed", "4",
                         "--load-checkpoint", str(checkpoint))
    assert second["start_step"] == 3
    model = init_gpt(SPEC, 0)
    model.load_state_dict(state)
    batch = make_token_source(None, SPEC.vocab_size, 4).global_batch(3, second["plan"]["global_batch_size"],
                                                                    SPEC.seq_length)
    with torch.no_grad():
        want = model(batch[:, :-1], batch[:, 1:], DropoutKey(4, 3)).item()
    assert abs(second["losses"][0] / want - 1) < 1e-5


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"model": init_gpt(MODEL_PRESETS["llama-tiny"], 0).state_dict(), "metadata": {}}, path)
    assert cli.main(["train", "--model", "gpt-tiny", "--load-checkpoint", str(path)]) == 2
    assert "does not match model 'gpt-tiny'" in capsys.readouterr().err
