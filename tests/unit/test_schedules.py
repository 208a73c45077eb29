"""Pipeline schedules as data: completeness, orders from the papers, and input checks."""

import subprocess
import sys
from collections import Counter

import pytest

from modelpar.schedules.actions import (
    Action,
    build_schedule,
    global_stage,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
)
from modelpar.specs.errors import SpecError

STAGES = range(1, 9)
MICRO_BATCHES = range(1, 17)


def valid_cases():
    """Every (schedule, p, m, v) of the grid p 1..8, m 1..16, v 1..4 that the schedules accept."""
    for p in STAGES:
        for m in MICRO_BATCHES:
            yield "gpipe", p, m, 1
            yield "1f1b", p, m, 1
            if m % p == 0:
                for v in range(1, 5):
                    yield "interleaved", p, m, v


def forwards_before_first_backward(actions: list[Action]) -> int:
    return next((i for i, action in enumerate(actions) if action.kind == "B"), len(actions))


def test_grid_schedules_are_complete_and_forward_precedes_backward():
    cases = list(valid_cases())
    assert len(cases) == 2 * 8 * 16 + 4 * sum(16 // p for p in STAGES)
    for schedule, p, m, v in cases:
        ranks = build_schedule(schedule, p, m, v)
        assert len(ranks) == p
        expected = Counter((kind, chunk, i) for kind in "FB" for chunk in range(v) for i in range(m))
        for rank, actions in enumerate(ranks):
            counts = Counter((a.kind, a.chunk, a.micro_batch) for a in actions)
            assert counts == expected, (schedule, p, m, v, rank)
            seen_forward = set()
            for action in actions:
                if action.kind == "F":
                    seen_forward.add((action.chunk, action.micro_batch))
                else:
                    assert (action.chunk, action.micro_batch) in seen_forward, (schedule, p, m, v, rank, action)


def test_gpipe_runs_all_forwards_then_all_backwards():
    for actions in gpipe(4, 6):
        assert [a.kind for a in actions] == ["F"] * 6 + ["B"] * 6
        assert [a.micro_batch for a in actions] == list(range(6)) * 2


@pytest.mark.parametrize("p", STAGES)
def test_one_f_one_b_warms_up_then_alternates(p):
    for m in MICRO_BATCHES:
        for rank, actions in enumerate(one_f_one_b(p, m)):
            warmup = min(p - rank - 1, m)
            assert all(a.kind == "F" for a in actions[:warmup])
            steady = actions[warmup:warmup + 2 * (m - warmup)]
            assert [a.kind for a in steady] == ["F", "B"] * (m - warmup)
            assert all(a.kind == "B" for a in actions[warmup + 2 * (m - warmup):])
            assert forwards_before_first_backward(actions) == min(p - rank, m)


def test_interleaved_forward_order_is_groups_of_p_across_chunks():
    # Narayanan et al. 2021 Fig. 4 / Megatron-LM: micro-batches 0..p-1 on chunk 0, then on chunk 1, ...
    p, m, v = 2, 4, 2
    rank_actions = interleaved_one_f_one_b(p, m, v)
    expected_forwards = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    expected_backwards = [(1, 0), (1, 1), (0, 0), (0, 1), (1, 2), (1, 3), (0, 2), (0, 3)]
    for actions in rank_actions:
        assert [(a.chunk, a.micro_batch) for a in actions if a.kind == "F"] == expected_forwards
        assert [(a.chunk, a.micro_batch) for a in actions if a.kind == "B"] == expected_backwards


def test_interleaved_warmup_follows_megatron_formula():
    for schedule, p, m, v in valid_cases():
        if schedule != "interleaved":
            continue
        for rank, actions in enumerate(interleaved_one_f_one_b(p, m, v)):
            warmup = min((p - rank - 1) * 2 + (v - 1) * p, m * v)
            # the steady phase starts with one more forward before the first backward
            assert forwards_before_first_backward(actions) == min(warmup + 1, m * v), (p, m, v, rank)
            kinds = [a.kind for a in actions]
            steady = m * v - warmup
            assert kinds[warmup:warmup + 2 * steady] == ["F", "B"] * steady


def test_global_stage_is_chunk_major():
    assert global_stage(rank=2, chunk=0, num_stages=4) == 2
    assert global_stage(rank=2, chunk=1, num_stages=4) == 6
    assert global_stage(rank=0, chunk=3, num_stages=5) == 15


def test_build_schedule_dispatches_to_the_named_schedule():
    assert build_schedule("gpipe", 3, 4) == gpipe(3, 4)
    assert build_schedule("1f1b", 3, 4) == one_f_one_b(3, 4)
    assert build_schedule("interleaved", 3, 6, 2) == interleaved_one_f_one_b(3, 6, 2)
    assert build_schedule("interleaved", 3, 6, 1) != one_f_one_b(3, 6)  # Megatron's 2(p - r - 1) warm-up


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("interleaved", 4, 7, 2), ["num_micro_batches (7)", "num_stages (4)", "use 4 or 8"]),
        (("interleaved", 4, 2, 2), ["num_micro_batches (2)", "num_stages (4)", "use 4 micro-batches"]),
        (("1f1b", 4, 8, 2), ["virtual_stages=2", "'1f1b'", "interleaved"]),
        (("gpipe", 4, 8, 3), ["virtual_stages=3", "'gpipe'"]),
        (("zigzag", 4, 8, 1), ["'zigzag'", "gpipe, 1f1b, interleaved"]),
        (("1f1b", 0, 8, 1), ["num_stages", "0"]),
        (("1f1b", 4, 0, 1), ["num_micro_batches", "0"]),
        (("interleaved", 4, 8, 0), ["virtual_stages", "0"]),
        (("gpipe", 4, -3, 1), ["num_micro_batches", "-3"]),
        (("gpipe", 2.0, 4, 1), ["num_stages", "2.0"]),
        (("gpipe", True, 4, 1), ["num_stages", "True"]),
    ],
)
def test_invalid_inputs_raise_spec_error_naming_the_values(args, fragments):
    with pytest.raises(SpecError) as error:
        build_schedule(*args)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_schedule_functions_check_their_inputs_directly():
    with pytest.raises(SpecError, match="num_micro_batches"):
        gpipe(2, 0)
    with pytest.raises(SpecError, match="num_stages"):
        one_f_one_b(0, 3)
    with pytest.raises(SpecError, match=r"num_micro_batches \(5\).*num_stages \(2\)"):
        interleaved_one_f_one_b(2, 5, 2)


def test_action_is_frozen_and_readable():
    action = Action("B", 1, 3)
    with pytest.raises(AttributeError):
        action.kind = "F"
    assert str(action) == "B(chunk 1, micro-batch 3)"


def test_planner_modules_do_not_import_torch():
    code = (
        "import sys, modelpar.schedules.actions, modelpar.schedules.simulate; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
