"""The pipeline simulator: dependencies, bubbles, in-flight activations, deadlocks, runtime order."""

import pytest

from modelpar.schedules.simulate import (
    PipelineDeadlock,
    PipelineSimulation,
    TimedAction,
    bubble_fraction,
    check_runtime_order,
    closed_form_bubble_fraction,
    peak_in_flight_chunks,
    render_timeline,
    simulate,
)
from modelpar.schedules.actions import Action, build_schedule, global_stage, gpipe, interleaved_one_f_one_b, one_f_one_b
from modelpar.specs.errors import SpecError

STAGES = range(1, 9)
MICRO_BATCHES = range(1, 17)
EXACT = 1e-12  # float rounding only: these quantities are sums of small integers


def cases(schedule, p):
    """(m, v) of the grid m 1..16, v 1..4 that `schedule` accepts with p stages."""
    for m in MICRO_BATCHES:
        if schedule != "interleaved":
            yield m, 1
        elif m % p == 0:
            for v in range(1, 5):
                yield m, v


def assert_valid_timeline(sim: PipelineSimulation, actions, forward, backward, p2p):
    """Every action starts after its rank's previous action and after its dependencies (+ p2p across ranks)."""
    p = len(actions)
    end = {}
    for rank, row in enumerate(sim.timeline):
        assert [timed.action for timed in row] == list(actions[rank])
        previous_end = 0.0
        for timed in row:
            assert timed.rank == rank
            assert timed.start >= previous_end - EXACT
            expected = forward if timed.action.kind == "F" else backward
            assert timed.end - timed.start == pytest.approx(expected)
            previous_end = timed.end
            stage = global_stage(rank, timed.action.chunk, p)
            end[timed.action.kind, stage, timed.action.micro_batch] = (timed.end, rank)
    last_stage = max(stage for _, stage, _ in end)
    lag = p2p if p > 1 else 0.0
    for row in sim.timeline:
        for timed in row:
            kind, i = timed.action.kind, timed.action.micro_batch
            stage = global_stage(timed.rank, timed.action.chunk, p)
            if kind == "F" and stage > 0:
                assert timed.start >= end["F", stage - 1, i][0] + lag - EXACT
            if kind == "B":
                assert timed.start >= end["F", stage, i][0] - EXACT
                if stage < last_stage:
                    assert timed.start >= end["B", stage + 1, i][0] + lag - EXACT


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
@pytest.mark.parametrize("p", STAGES)
def test_grid_simulates_without_deadlock_and_respects_dependencies(schedule, p):
    for m, v in cases(schedule, p):
        actions = build_schedule(schedule, p, m, v)
        check_runtime_order(actions)
        sim = simulate(actions, 1.0, 2.0, p2p_time=0.25)
        assert_valid_timeline(sim, actions, 1.0, 2.0, 0.25)
        assert sim.busy_time == pytest.approx([3.0 * m * v] * p)
        no_p2p = simulate(actions, 1.0, 2.0)
        assert sim.makespan >= no_p2p.makespan - EXACT


@pytest.mark.parametrize("p", STAGES)
def test_gpipe_and_1f1b_makespan_and_bubble_match_the_closed_form(p):
    for m in MICRO_BATCHES:
        for schedule in ("gpipe", "1f1b"):
            sim = simulate(build_schedule(schedule, p, m), 1.0, 2.0)
            assert sim.makespan == (m + p - 1) * 3
            assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=EXACT)
            assert sim.bubble_fraction == pytest.approx(closed_form_bubble_fraction(schedule, p, m, 1), abs=EXACT)


@pytest.mark.parametrize("backward", [1.0, 2.0, 3.0])
def test_interleaved_bubble_matches_the_closed_form(backward):
    # With m % p == 0, no p2p time and equal chunks, Megatron's interleaved order reaches the
    # paper's bubble (p - 1)/(v m + p - 1) exactly over the whole grid: the warm-up of
    # 2(p - r - 1) + (v - 1) p forwards keeps every rank busy once its first backward arrives.
    for p in STAGES:
        for m, v in cases("interleaved", p):
            sim = simulate(interleaved_one_f_one_b(p, m, v), 1.0, backward)
            assert sim.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=EXACT), (p, m, v)


def test_gpipe_makespan_with_p2p_time_adds_one_hop_per_stage_each_way():
    # Forward chain down p - 1 edges, backward chain up p - 1 edges: (m + p - 1)(f + b) + 2 (p - 1) c.
    for p in STAGES:
        for m in (1, 5, 16):
            sim = simulate(gpipe(p, m), 1.0, 2.0, p2p_time=0.5)
            assert sim.makespan == pytest.approx((m + p - 1) * 3 + 2 * (p - 1) * 0.5)


@pytest.mark.parametrize("p", STAGES)
def test_peak_in_flight_per_rank(p):
    for m in MICRO_BATCHES:
        assert simulate(one_f_one_b(p, m), 1.0, 2.0).peak_in_flight == tuple(min(p - r, m) for r in range(p))
        assert simulate(gpipe(p, m), 1.0, 2.0).peak_in_flight == (m,) * p
        if m % p == 0:
            for v in range(1, 5):
                warmups = [min((p - r - 1) * 2 + (v - 1) * p, m * v) for r in range(p)]
                expected = tuple(min(w + 1, m * v) for w in warmups)
                assert simulate(interleaved_one_f_one_b(p, m, v), 1.0, 2.0).peak_in_flight == expected
                assert peak_in_flight_chunks("interleaved", p, m, v) == max(expected)
        assert peak_in_flight_chunks("1f1b", p, m) == min(p, m)
        assert peak_in_flight_chunks("gpipe", p, m) == m


def test_cached_helpers_agree_with_simulation():
    bubble_fraction.cache_clear()
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11, abs=EXACT)
    assert bubble_fraction("interleaved", 4, 8, 2) == pytest.approx(3 / 19, abs=EXACT)
    assert bubble_fraction("gpipe", 4, 8, 1, 1.0) == pytest.approx(3 / 11, abs=EXACT)
    bubble_fraction("1f1b", 4, 8)
    assert bubble_fraction.cache_info().hits == 1
    assert peak_in_flight_chunks("1f1b", 4, 8) == 4
    assert peak_in_flight_chunks("gpipe", 4, 8) == 8
    assert peak_in_flight_chunks("interleaved", 4, 8, 2) == 11  # 2 (p - 1) + (v - 1) p + 1 on rank 0
    with pytest.raises(SpecError, match="num_micro_batches"):
        bubble_fraction("interleaved", 4, 6, 2)


def test_closed_form_values():
    assert closed_form_bubble_fraction("gpipe", 4, 8, 1) == 3 / 11
    assert closed_form_bubble_fraction("1f1b", 1, 8, 1) == 0.0
    assert closed_form_bubble_fraction("interleaved", 4, 8, 3) == 3 / 27
    with pytest.raises(SpecError, match="'zigzag'"):
        closed_form_bubble_fraction("zigzag", 4, 8, 1)


def test_callable_durations_per_rank():
    # A slow last stage (e.g. the one with the logits) becomes the bottleneck.
    actions = one_f_one_b(3, 6)
    sim = simulate(
        actions,
        forward_time=lambda rank, action: 2.0 if rank == 2 else 1.0,
        backward_time=lambda rank, action: 4.0 if rank == 2 else 2.0,
        p2p_time=0.1,
    )
    assert sim.busy_time == (18.0, 18.0, 36.0)
    assert sim.bubble_fraction == pytest.approx(1 - 36.0 / sim.makespan)
    for timed in sim.timeline[2]:
        assert timed.end - timed.start == pytest.approx(2.0 if timed.action.kind == "F" else 4.0)


def test_timeline_holds_timed_actions_in_list_order():
    actions = one_f_one_b(2, 2)
    sim = simulate(actions, 1.0, 2.0)
    assert sim.timeline[0][0] == TimedAction(0, Action("F", 0, 0), 0.0, 1.0)
    assert sim.timeline[1][1] == TimedAction(1, Action("B", 0, 0), 2.0, 4.0)
    assert sim.makespan == 9.0


def test_cross_neighbour_cycle_raises_deadlock_naming_ranks_and_actions():
    actions = [
        [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
        [Action("F", 0, 1), Action("F", 0, 0), Action("B", 0, 0), Action("B", 0, 1)],  # F1 before rank 0 sends it
    ]
    with pytest.raises(PipelineDeadlock) as error:
        simulate(actions, 1.0, 2.0)
    message = str(error.value)
    assert "rank 0 at B(chunk 0, micro-batch 0) waits for B(stage 1, micro-batch 0)" in message
    assert "rank 1 at F(chunk 0, micro-batch 1) waits for F(stage 0, micro-batch 1)" in message
    with pytest.raises(PipelineDeadlock):
        check_runtime_order(actions)


def test_backward_before_its_own_forward_is_a_deadlock():
    actions = [[Action("B", 0, 0), Action("F", 0, 0)]]
    with pytest.raises(PipelineDeadlock, match=r"rank 0 at B\(chunk 0, micro-batch 0\) waits for F\(stage 0"):
        simulate(actions, 1.0, 1.0)


def test_deadlock_in_a_real_schedule_with_two_actions_swapped():
    actions = one_f_one_b(4, 8)
    row = actions[1]
    first_backward = next(i for i, action in enumerate(row) if action.kind == "B")
    row[0], row[first_backward] = row[first_backward], row[0]  # rank 1 starts with a backward
    with pytest.raises(PipelineDeadlock, match="rank 1 at B"):
        simulate(actions, 1.0, 2.0)


def test_runtime_order_rejects_messages_received_out_of_order():
    # Swapping two forwards on rank 1 still simulates, but rank 1 would take micro-batch 1's
    # activation first while rank 0 sends micro-batch 0's first: FIFO point-to-point breaks.
    actions = interleaved_one_f_one_b(2, 4, 2)
    assert actions[1][:2] == [Action("F", 0, 0), Action("F", 0, 1)]
    actions[1][0], actions[1][1] = actions[1][1], actions[1][0]
    simulate(actions, 1.0, 1.0)
    with pytest.raises(PipelineDeadlock, match=r"rank 0 -> rank 1: message 0"):
        check_runtime_order(actions)


@pytest.mark.parametrize(
    "actions, message",
    [
        ([[Action("F", 0, 0)]], "never runs B(stage 0, micro-batch 0)"),
        ([[Action("F", 0, 0), Action("B", 0, 0), Action("B", 0, 0)]], "runs B(chunk 0, micro-batch 0) twice"),
        ([[Action("X", 0, 0)]], "kind must be 'F' or 'B'"),
        ([[Action("F", -1, 0)]], ">= 0"),
        ([], "no ranks"),
        ([[], []], "no actions"),
    ],
)
def test_malformed_lists_raise_value_error(actions, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        simulate(actions, 1.0, 1.0)


def test_negative_times_are_rejected():
    with pytest.raises(ValueError, match="p2p_time"):
        simulate(gpipe(2, 2), 1.0, 1.0, p2p_time=-1.0)
    with pytest.raises(ValueError, match="durations"):
        simulate(gpipe(2, 2), -1.0, 1.0)


@pytest.mark.parametrize(
    "function, args",
    [(gpipe, (3, 4)), (one_f_one_b, (3, 4)), (interleaved_one_f_one_b, (2, 4, 2))],
)
def test_docstring_tables_are_what_the_simulator_draws(function, args):
    table = render_timeline(simulate(function(*args), 1.0, 1.0))
    docstring_lines = [line.strip() for line in function.__doc__.splitlines()]
    for line in table.splitlines():
        assert line.strip() in docstring_lines
