"""The batched (NCCL-style) point-to-point plan: lockstep rounds, exchange programs, and the strict
rendezvous replay that proves them hang-free and order-matched; the p2p mode choice; CUDA-event
timeline spans (with a fake clock); backend and timeout choices of the launcher."""

from __future__ import annotations

import pytest
import torch

from modelpar.schedules.simulate import PipelineDeadlock, check_runtime_order, simulate
from modelpar.runtime import launch
from modelpar.schedules.dependencies import ACTIVATION, GRADIENT, Message
from modelpar.schedules.p2p import Exchange, check_exchange_programs, exchange_programs, lockstep_rounds
from modelpar.runtime.pipeline import resolve_p2p_mode
from modelpar.runtime.timeline import Timeline, _CudaClock
from modelpar.schedules.actions import Action, build_schedule, interleaved_one_f_one_b
from modelpar.specs.errors import SpecError


def schedule_grid():
    for schedule in ("gpipe", "1f1b"):
        for p in (2, 3, 4, 8):
            for m in (1, 2, 3, 4, 8, 12):
                yield schedule, p, m, 1
    for p in (2, 3, 4):
        for v in (2, 3, 4):
            for m in (p, 2 * p, 4 * p):
                yield "interleaved", p, m, v


GRID = list(schedule_grid())


def test_lockstep_rounds_are_the_unit_time_simulation():
    for schedule, p, m, v in GRID:
        actions = build_schedule(schedule, p, m, v)
        rounds = lockstep_rounds(actions)
        simulation = simulate(actions, 1.0, 1.0)
        assert rounds == [[int(timed.start) for timed in row] for row in simulation.timeline], (schedule, p, m, v)


def test_every_schedule_gets_a_hang_free_order_matched_plan():
    for schedule, p, m, v in GRID:
        actions = build_schedule(schedule, p, m, v)
        programs = exchange_programs(actions)
        check_exchange_programs(actions, programs)
        for rank, program in enumerate(programs):
            assert sorted(step for step in program if isinstance(step, int)) == list(range(len(actions[rank])))
            exchanges = [step for step in program if isinstance(step, Exchange)]
            assert [e.round for e in exchanges] == sorted({e.round for e in exchanges})  # one per round
            for exchange in exchanges:  # at most one message per (peer, direction): no ordering inside a batch
                sends = [message.receiver for message in exchange.sends]
                recvs = [message.sender for message in exchange.recvs]
                assert len(sends) == len(set(sends)) and len(recvs) == len(set(recvs))
                assert all(message.sender == rank for message in exchange.sends)
                assert all(message.receiver == rank for message in exchange.recvs)
        sent = sorted((m.key, m.sender, m.receiver) for prog in programs for s in prog if isinstance(s, Exchange)
                      for m in s.sends)
        received = sorted((m.key, m.sender, m.receiver) for prog in programs for s in prog
                          if isinstance(s, Exchange) for m in s.recvs)
        assert sent == received and len(sent) == len(set(sent))
        messages_expected = 2 * m * (p * v - 1)  # every stage boundary, both directions, every micro-batch
        assert len(sent) == messages_expected


def test_two_stages_send_and_receive_with_the_same_peer_in_one_batch():
    programs = exchange_programs(build_schedule("1f1b", 2, 4))
    both = [step for step in programs[0] if isinstance(step, Exchange) and step.sends and step.recvs]
    assert both and all(step.sends[0].receiver == step.recvs[0].sender == 1 for step in both)


def test_lists_received_out_of_order_still_get_a_matching_plan():
    # rank 1 swaps its first two forwards: tag-less in-order receives would take the wrong
    # tensor (check_runtime_order refuses it), but the lockstep plan receives in sending order
    actions = interleaved_one_f_one_b(2, 4, 2)
    actions[1][0], actions[1][1] = actions[1][1], actions[1][0]
    with pytest.raises(PipelineDeadlock):
        check_runtime_order(actions)
    check_exchange_programs(actions, exchange_programs(actions))


def test_deadlocking_lists_raise_naming_the_ranks():
    actions = [[Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
               [Action("F", 0, 1), Action("F", 0, 0), Action("B", 0, 0), Action("B", 0, 1)]]
    with pytest.raises(PipelineDeadlock, match=r"rank 1 waits at F\(chunk 0, micro-batch 1\)"):
        lockstep_rounds(actions)


TWO_RANKS = [[Action("F", 0, 0), Action("B", 0, 0)], [Action("F", 0, 0), Action("B", 0, 0)]]
ACT = Message(ACTIVATION, 1, 0, 0, 1)
GRAD = Message(GRADIENT, 0, 0, 1, 0)


def test_the_replay_catches_a_receive_posted_ahead_of_a_send():
    # NCCL's hazard: rank 0 posts the gradient's receive before the activation's send on the
    # stream they share; rank 1 waits for the activation: both hang
    assert exchange_programs(TWO_RANKS) == [
        [0, Exchange(0, (ACT,), ()), Exchange(2, (), (GRAD,)), 1],
        [Exchange(0, (), (ACT,)), 0, 1, Exchange(2, (GRAD,), ())],
    ]
    bad = [[0, Exchange(2, (), (GRAD,)), Exchange(0, (ACT,), ()), 1],
           [Exchange(0, (), (ACT,)), 0, 1, Exchange(2, (GRAD,), ())]]
    with pytest.raises(PipelineDeadlock, match="the exchange programs hang: rank 0 at the exchange of round 2"):
        check_exchange_programs(TWO_RANKS, bad)


def test_the_replay_catches_mismatched_and_premature_messages():
    other = Message(ACTIVATION, 1, 1, 0, 1)
    actions = [[Action("F", 0, 0), Action("F", 0, 1), Action("B", 0, 0), Action("B", 0, 1)],
               [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)]]
    good = exchange_programs(actions)
    check_exchange_programs(actions, good)
    swapped = [list(good[0]), list(good[1])]
    first, second = [k for k, s in enumerate(swapped[1]) if isinstance(s, Exchange) and s.recvs
                     and s.recvs[0].kind == ACTIVATION][:2]
    swapped[1][first], swapped[1][second] = swapped[1][second], swapped[1][first]
    with pytest.raises(PipelineDeadlock, match="rank 0 -> rank 1, message 0: sent as activation of micro-batch 0"):
        check_exchange_programs(actions, swapped)
    early = [[Exchange(0, (ACT,), ()), 0, Exchange(2, (), (GRAD,)), 1], exchange_programs(TWO_RANKS)[1]]
    with pytest.raises(PipelineDeadlock, match="rank 0 sends activation of micro-batch 0 .* before computing it"):
        check_exchange_programs(TWO_RANKS, early)
    assert other.consumer(1) == Action("F", 1, 1) and ACT.producer(1) == Action("F", 0, 0)


def test_p2p_mode_choice():
    assert resolve_p2p_mode(None, "gloo") == "tagged"
    assert resolve_p2p_mode(None, "nccl") == "batched"
    assert resolve_p2p_mode("batched", "gloo") == "batched"
    with pytest.raises(SpecError, match="'tagged' needs gloo's tag matching but the backend is nccl"):
        resolve_p2p_mode("tagged", "nccl")
    with pytest.raises(SpecError, match="mode 'fast' .* use one of tagged, batched"):
        resolve_p2p_mode("fast", "gloo")


class _FakeEvent:
    """A CUDA event stand-in whose 'GPU time' (ms) is taken from a shared counter at record()."""

    now_ms = 0.0

    def record(self) -> None:
        self.ms = _FakeEvent.now_ms

    def elapsed_time(self, other: "_FakeEvent") -> float:
        return other.ms - self.ms


def test_cuda_timeline_spans_map_event_times_onto_perf_counter(monkeypatch):
    synchronised = []
    timeline = Timeline()
    timeline.clock = _CudaClock("cuda", event_factory=_FakeEvent, synchronize=lambda: synchronised.append(1))
    monkeypatch.setattr("modelpar.runtime.timeline.time.perf_counter", lambda: 100.0)
    _FakeEvent.now_ms = 5.0
    with timeline.span("compute", "F(chunk 0, micro-batch 0)"):
        _FakeEvent.now_ms = 9.0  # the kernels of the span take 4 ms of GPU time
    with timeline.span("compute", "B(chunk 0, micro-batch 0)"):
        _FakeEvent.now_ms = 15.0
    assert len(synchronised) == 1  # the anchor only; events are resolved lazily
    events = timeline.events
    assert [(e.start_s, e.end_s) for e in events] == [(100.0, pytest.approx(100.004)), (pytest.approx(100.004),
                                                                                     pytest.approx(100.010))]
    assert len(synchronised) == 2 and timeline.events == events  # resolved once, kept
    assert timeline.total("compute") == pytest.approx(0.010)


def test_spawn_refuses_nccl_without_a_gpu_per_rank():
    gpus = torch.cuda.device_count()
    with pytest.raises(SpecError, match=f"nccl needs one GPU per rank, {gpus + 1} ranks but {gpus} GPUs"):
        launch.spawn(print, gpus + 1, backend="nccl")
    with pytest.raises(SpecError, match="backend must be one of gloo, nccl, auto"):
        launch.spawn(print, 1, backend="mpi")
    assert launch.choose_backend(gpus + 1) == "gloo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_local_cuda_device_without_gpus_is_a_spec_error():
    with pytest.raises(SpecError, match="backend nccl needs CUDA GPUs but none is visible"):
        launch.local_cuda_device(0)


def test_collective_timeout_override():
    assert launch.collective_timeout_s(None, 300.0) == 300.0
    assert launch.collective_timeout_s(20, 300.0) == 20.0
    with pytest.raises(SpecError, match="--collective-timeout 'soon' must be a positive number"):
        launch.collective_timeout_s("soon", 300.0)
