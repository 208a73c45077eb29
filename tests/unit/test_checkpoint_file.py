"""Checkpoints without a process group: the optimizers' state export/import, the file format
(version 2 and the weights-only version 1) and the one-line errors for files that do not fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modelpar.models.gpt import init_gpt
from modelpar.runtime.checkpoint import FORMAT, Checkpoint, read_checkpoint
from modelpar.training.trainer import read_checkpoint_for
from modelpar.runtime.zero import AdamW, OptimizerState, ZeroOneAdamW, decay_matrices
from modelpar.specs import MODEL_PRESETS, ParallelPlan, SpecError
from modelpar.specs.plan import complete_plan
from modelpar.training.config import TrainConfig
from modelpar.training.trainer import validate_training

SPEC = dataclasses.replace(MODEL_PRESETS["gpt-tiny"], num_layers=2)


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((4, 3), (3,), (5, 2))]


def _step(optimizer, params, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("optimizer_class", [AdamW, lambda params, **kw: ZeroOneAdamW(params, None, **kw)],
                         ids=["adamw", "flat-master-adamw"])
def test_exported_state_resumes_the_optimizer_exactly(optimizer_class):
    options = dict(lr=1e-2, weight_decay=0.1, decays=decay_matrices)
    params = _params(0)
    optimizer = optimizer_class(params, **options)
    for step in range(2):
        _step(optimizer, params, step)
    state = optimizer.export_state()
    assert state.steps == 2 and [m.shape for m in state.exp_avg] == [p.shape for p in params]
    assert all(float(v.abs().sum()) > 0 for v in state.exp_avg_sq)

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = optimizer_class(resumed_params, **options)
    resumed.import_state(state)
    for step in range(2, 4):
        _step(optimizer, params, step)
        _step(resumed, resumed_params, step)
    for want, got in zip(params, resumed_params):
        assert torch.equal(want, got)

    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in _params(0)]
    fresh = optimizer_class(fresh_params, **options)  # without the state: a different trajectory
    for step in range(2):
        _step(fresh, fresh_params, step + 2)
    assert not torch.equal(fresh_params[0], params[0])


def test_import_rejects_state_of_other_shapes():
    params = _params(0)
    wrong = OptimizerState([torch.zeros(2)] * 3, [torch.zeros(2)] * 3, 1)
    with pytest.raises(ValueError, match="exp_avg"):
        AdamW(params).import_state(wrong)


def test_master_weights_are_the_fp32_parameters():
    params = _params(1)
    optimizer = ZeroOneAdamW(params, None)
    assert all(torch.equal(m, p.detach()) for m, p in zip(optimizer.master_weights(), params))


def _full_checkpoint(model) -> Checkpoint:
    parameters = dict(model.named_parameters())
    state = model.state_dict()
    return Checkpoint(state, {"model": SPEC.name}, {n: p.detach().clone() + 1 for n, p in parameters.items()},
                      {n: torch.full_like(p, 0.5) for n, p in parameters.items()},
                      {n: torch.full_like(p, 0.25) for n, p in parameters.items()}, optimizer_steps=3,
                      completed_steps=3)


def test_file_round_trip_and_master_weights_load_into_tied_parameters(tmp_path):
    model = init_gpt(SPEC, 0)
    path = tmp_path / "ck.pt"
    torch.save(_full_checkpoint(model).to_payload(), path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["version"] == 2
    assert "head.output.weight" not in payload["optimizer"]["exp_avg"]  # tied: stored once
    checkpoint = read_checkpoint_for(path, SPEC)
    assert checkpoint.has_optimizer_state and checkpoint.completed_steps == checkpoint.optimizer_steps == 3
    target = init_gpt(SPEC, 7)
    checkpoint.load_weights(target)
    assert torch.equal(target.embedding.token.weight, model.embedding.token.weight + 1)
    assert target.head.output.weight is target.embedding.token.weight


def test_weights_only_version_1_file_starts_a_fresh_optimizer(tmp_path):
    path = tmp_path / "v1.pt"
    torch.save({"model": init_gpt(SPEC, 0).state_dict(), "metadata": {"steps": 5}}, path)
    checkpoint = read_checkpoint_for(path, SPEC)
    assert not checkpoint.has_optimizer_state and checkpoint.master_weights is None
    assert checkpoint.completed_steps == 0 and checkpoint.metadata == {"steps": 5}


def _one_line_error(call, *match: str) -> None:
    with pytest.raises(SpecError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for text in match:
        assert text in message, message


def test_bad_files_are_one_line_spec_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all")
    _one_line_error(lambda: read_checkpoint(corrupt), "corrupt.pt", "cannot be read", "--save-checkpoint")

    good = tmp_path / "good.pt"
    torch.save(_full_checkpoint(init_gpt(SPEC, 0)).to_payload(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _one_line_error(lambda: read_checkpoint(truncated), "truncated.pt", "cannot be read")

    _one_line_error(lambda: read_checkpoint(tmp_path / "missing.pt"), "no such file")

    not_checkpoint = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_checkpoint)
    _one_line_error(lambda: read_checkpoint(not_checkpoint), "not a modelpar checkpoint")

    newer = tmp_path / "newer.pt"
    torch.save({**_full_checkpoint(init_gpt(SPEC, 0)).to_payload(), "version": 99}, newer)
    _one_line_error(lambda: read_checkpoint(newer), "version 99")

    bad_optimizer = tmp_path / "bad_optimizer.pt"
    payload = _full_checkpoint(init_gpt(SPEC, 0)).to_payload()
    payload["optimizer"]["steps"] = -1
    torch.save(payload, bad_optimizer)
    _one_line_error(lambda: read_checkpoint(bad_optimizer), "'optimizer'")


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(_full_checkpoint(init_gpt(SPEC, 0)).to_payload(), other)
    bigger = dataclasses.replace(SPEC, hidden_size=128, ffn_hidden_size=512)
    _one_line_error(lambda: read_checkpoint_for(other, bigger), "does not match model", "first difference: model")

    moments = tmp_path / "moments.pt"
    checkpoint = _full_checkpoint(init_gpt(SPEC, 0))
    checkpoint.exp_avg["layers.0.mlp.fc1.bias"] = torch.zeros(3)
    torch.save(checkpoint.to_payload(), moments)
    _one_line_error(lambda: read_checkpoint_for(moments, SPEC), "first difference: exp_avg layers.0.mlp.fc1.bias")


def test_validation_counts_the_checkpoint_steps_and_checks_the_save_directory(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save(_full_checkpoint(init_gpt(SPEC, 0)).to_payload(), path)  # 3 steps done
    plan = complete_plan(ParallelPlan())
    warmup = dict(lr_warmup_steps=3, lr_decay_style="cosine", lr_decay_steps=6)
    validate_training(TrainConfig(SPEC, plan, 2, data_path="synthetic", load_checkpoint=str(path), **warmup))
    _one_line_error(lambda: validate_training(TrainConfig(SPEC, plan, 2, data_path="synthetic", **warmup)),
                    "--lr-warmup-steps 3")
    _one_line_error(lambda: validate_training(TrainConfig(SPEC, plan, 1, data_path="synthetic",
                                                          save_checkpoint=str(tmp_path / "nowhere" / "ck.pt"))),
                    "--save-checkpoint", "no such directory")
