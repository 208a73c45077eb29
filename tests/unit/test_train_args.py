"""`modelpar train` arguments: the contract flags, plan defaults, and every validation error that
must stop the command (one line, exit code 2) before any rank starts."""

from __future__ import annotations

import argparse
import json

import pytest

from modelpar.commands import cli
from modelpar.specs import MODEL_PRESETS, ParallelPlan, SpecError
from modelpar.specs.plan import complete_plan
from modelpar.training.config import TrainConfig
from modelpar.training.trainer import validate_training
from modelpar.commands.train import add_arguments as add_train_arguments
from modelpar.commands.train import train_plan as plan_from_args


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(argv))


def test_contract_flags_build_the_plan():
    args = _parse("--model", "gpt-tiny", "--tensor-parallel", "2", "--pipeline-parallel", "2", "--data-parallel", "2",
                  "--virtual-stages", "2", "--schedule", "interleaved", "--micro-batch-size", "1",
                  "--global-batch-size", "8", "--sequence-parallel", "--recompute", "selective", "--zero-stage", "1",
                  "--dtype", "bf16", "--steps", "3", "--seed", "7", "--data", "notes.txt", "--json")
    plan = plan_from_args(args)
    assert plan == ParallelPlan(tensor_parallel=2, pipeline_parallel=2, data_parallel=2, virtual_stages=2,
                                schedule="interleaved", micro_batch_size=1, global_batch_size=8,
                                sequence_parallel=True, recompute="selective", zero_stage=1)
    assert (args.dtype, args.steps, args.seed, args.data, args.json) == ("bf16", 3, 7, "notes.txt", True)


def test_defaults_complete_a_partial_plan():
    plan = plan_from_args(_parse("--model", "gpt-tiny", "--pipeline-parallel", "2", "--data-parallel", "2"))
    assert plan.is_complete()
    assert (plan.tensor_parallel, plan.virtual_stages, plan.schedule, plan.micro_batch_size) == (1, 1, "1f1b", 2)
    assert plan.num_micro_batches == 4  # m = 2p
    assert (plan.sequence_parallel, plan.recompute, plan.zero_stage) == (False, "none", 0)
    assert complete_plan(ParallelPlan(pipeline_parallel=2, schedule="interleaved")).virtual_stages == 2


def test_plan_file_fields_are_overridden_by_flags(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"tensor_parallel": 2, "pipeline_parallel": 2, "data_parallel": 1,
                                "virtual_stages": 1, "micro_batch_size": 1, "global_batch_size": 4,
                                "sequence_parallel": True, "recompute": "full", "zero_stage": 0,
                                "schedule": "gpipe"}))
    plan = plan_from_args(_parse("--model", "gpt-tiny", "--plan", str(path), "--schedule", "1f1b",
                                 "--no-sequence-parallel"))
    assert (plan.tensor_parallel, plan.schedule, plan.sequence_parallel, plan.recompute) == (2, "1f1b", False, "full")


@pytest.mark.parametrize("flags, message", [
    (["--tensor-parallel", "3"], "tensor_parallel 3 does not divide num_attention_heads 8"),
    (["--pipeline-parallel", "3"], "num_layers 8 is not divisible by pipeline_parallel 3"),
    (["--pipeline-parallel", "2", "--virtual-stages", "8", "--schedule", "interleaved"],
     "num_layers 8 is not divisible by pipeline_parallel 2 x virtual_stages 8"),
    (["--pipeline-parallel", "2", "--schedule", "interleaved", "--micro-batch-size", "2", "--global-batch-size", "6"],
     "interleaved schedule needs the micro-batches per step (3) to be a multiple of pipeline_parallel 2"),
    (["--schedule", "interleaved"], "needs pipeline_parallel > 1"),
    (["--virtual-stages", "2"], "virtual_stages=2 needs schedule 'interleaved'"),
    (["--data-parallel", "2", "--micro-batch-size", "2", "--global-batch-size", "6"],
     "global_batch_size 6 is not divisible by micro_batch_size 2 x data_parallel 2"),
    (["--zero-stage", "2"], "zero_stage 2 is not implemented by the runtime"),
    (["--data", "/no/such/file.txt"], "no such file"),
])
def test_bad_plans_fail_in_one_line_with_exit_code_2(capsys, flags, message):
    code = cli.main(["train", "--model", "gpt-tiny", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_text_data_needs_a_byte_vocabulary(tmp_path, capsys):
    model = tmp_path / "small-vocab.json"
    model.write_text(json.dumps({"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
                                 "ffn_hidden_size": 32, "vocab_size": 128, "seq_length": 8}))
    text = tmp_path / "text.txt"
    text.write_text("hello world, " * 10)
    assert cli.main(["train", "--model", str(model), "--data", str(text)]) == 2
    assert "byte-level text needs vocab_size >= 256, the model has 128" in capsys.readouterr().err


def test_text_shorter_than_a_sequence_is_refused(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("too short")
    config = TrainConfig(MODEL_PRESETS["gpt-tiny"], complete_plan(ParallelPlan()), data_path=str(text))
    with pytest.raises(SpecError, match="fewer than seq_length"):
        validate_training(config)


def test_torchrun_world_size_must_match_the_plan(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("MODELPAR_SPAWNED", raising=False)
    assert cli.main(["train", "--model", "gpt-tiny", "--tensor-parallel", "2"]) == 2
    assert "torchrun started 3 ranks but the plan needs 2" in capsys.readouterr().err


def test_bad_dtype_is_an_argument_error():
    with pytest.raises(SystemExit) as exit_info:
        _parse("--model", "gpt-tiny", "--dtype", "fp16")
    assert exit_info.value.code == 2
