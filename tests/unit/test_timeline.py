"""Timelines of pipeline schedules: events, Chrome traces, Gantt/memory PNGs and `modelpar simulate`."""

import argparse
import json
import struct
import subprocess
import sys

import pytest

from modelpar.planner import cost
from modelpar.planner.memory import memory_per_device
from modelpar.schedules.simulate import simulate
from modelpar.report.memory_plot import memory_png
from modelpar.report import memory_plot
from modelpar.report.timeline import chunk_colours, event_colour
from modelpar.schedules.events import events_from_simulation
from modelpar.report.timeline import (
    TimelineEvent,
    chrome_trace,
    events_from_runtime,
    gantt_png,
    side_by_side_png,
    timeline_bubble_fraction,
    timeline_span,
    write_chrome_trace,
)
from modelpar.schedules.actions import build_schedule
from modelpar.commands.simulate import add_arguments as add_simulate_arguments
from modelpar.commands.simulate import predict_schedule
from modelpar.commands.simulate import run as simulate_command
from modelpar.specs import ParallelPlan, SpecError, load_cluster, load_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)]


def simulated(schedule="1f1b", p=4, m=8, v=1, forward=1e-3, backward=2e-3, p2p=0.0):
    return simulate(build_schedule(schedule, p, m, v), forward, backward, p2p)


def plan(schedule="1f1b", p=4, m=8, v=1, d=1, zero_stage=0):
    return ParallelPlan(
        tensor_parallel=1, pipeline_parallel=p, data_parallel=d, virtual_stages=v, micro_batch_size=1,
        global_batch_size=m * d, sequence_parallel=False, recompute="none", zero_stage=zero_stage, schedule=schedule,
    )


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 300 and height > 150
    return width, height


# --- events -------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,v", SCHEDULES)
def test_events_from_simulation_has_2mv_events_per_rank(schedule, v):
    p, m = 4, 8
    sim = simulated(schedule, p, m, v)
    events = events_from_simulation(sim)
    for rank in range(p):
        mine = [e for e in events if e.rank == rank]
        assert len(mine) == 2 * m * v
        assert sum(e.kind == "forward" for e in mine) == m * v
        assert {(e.chunk, e.micro_batch) for e in mine} == {(c, i) for c in range(v) for i in range(m)}
    timed = {(t.rank, t.action.kind, t.action.chunk, t.action.micro_batch): (t.start, t.end)
             for row in sim.timeline for t in row}
    for e in events:
        assert timed[(e.rank, e.kind[0].upper(), e.chunk, e.micro_batch)] == (e.start_s, e.end_s)


def test_event_names_follow_render_timeline_labels():
    names = {e.name for e in events_from_simulation(simulated("interleaved", 2, 4, 2))}
    assert {"F0a", "F3b", "B2a"} <= names
    assert {e.name for e in events_from_simulation(simulated("1f1b", 2, 2))} == {"F0", "F1", "B0", "B1"}


@pytest.mark.parametrize("schedule,v", SCHEDULES)
def test_timeline_bubble_fraction_matches_the_simulator(schedule, v):
    sim = simulated(schedule, 4, 8, v, p2p=1e-4)
    assert timeline_bubble_fraction(events_from_simulation(sim)) == pytest.approx(sim.bubble_fraction, abs=1e-12)
    assert timeline_bubble_fraction([]) == 0.0


def test_events_from_runtime_parses_actions_and_kinds():
    f3 = {"name": "F(chunk 0, micro-batch 3)", "micro_batch": 3, "chunk": 0, "stage": 0}
    spans = {  # rank 0 as stored in a summary (dicts), rank 1 as recorded (TimelineEvent)
        "0": [dict(rank=0, kind="forward", start_s=0.0, end_s=0.5, **f3), dict(rank=0, kind="send", start_s=0.5,
                                                                              end_s=0.6, **f3),
              TimelineEvent(0, "step 0", "grad_sync", 0.7, 0.9).to_dict(),
              TimelineEvent(0, "optimizer", "optimizer", 0.9, 1.0).to_dict()],
        "1": [TimelineEvent(1, "F(chunk 1, micro-batch 3)", "recv", 0.1, 0.6, 3, 1, 3),
              TimelineEvent(1, "B(chunk 1, micro-batch 3)", "backward", 0.6, 0.8, 3, 1, 3)],
    }
    events = events_from_runtime(spans)
    by_rank_kind = {(e.rank, e.kind): e for e in events}
    forward = by_rank_kind[(0, "forward")]
    assert (forward.name, forward.micro_batch, forward.chunk, forward.duration_s) == ("F3a", 3, 0, 0.5)
    assert by_rank_kind[(0, "send")].micro_batch == 3
    assert by_rank_kind[(0, "allreduce")].name == "step 0"
    assert by_rank_kind[(0, "optimizer")].micro_batch is None
    assert by_rank_kind[(1, "recv")].chunk == 1
    assert by_rank_kind[(1, "backward")].name == "B3b"
    assert events_from_runtime([[TimelineEvent(0, "", "forward", 0.0, 1.0, 0, 0, 0)]])[0].name == "F0"


# --- Chrome trace -------------------------------------------------------------------------------


def test_chrome_trace_structure(tmp_path):
    p, m = 3, 4
    events = events_from_simulation(simulated("1f1b", p, m, forward=1e-3, backward=2e-3))
    events.append(TimelineEvent(0, "recv F1", "recv", 0.0105, 0.011))
    trace = chrome_trace(events)
    assert trace["displayTimeUnit"] == "ms"
    complete = [e for e in trace["traceEvents"] if e["ph"] != "M"]
    metadata = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    assert len(complete) == len(events)
    for entry in complete:
        assert entry["ph"] == "X"
        assert {"name", "cat", "ts", "dur", "pid", "tid", "args"} <= set(entry)
        assert entry["ts"] >= 0
    assert {e["pid"] for e in complete} == set(range(p))
    forwards = [e for e in complete if e["cat"] == "forward"]
    backwards = [e for e in complete if e["cat"] == "backward"]
    assert all(e["dur"] == pytest.approx(1000.0) for e in forwards)  # 1 ms in microseconds
    assert all(e["dur"] == pytest.approx(2000.0) for e in backwards)
    first_on_rank_2 = min(e["ts"] for e in forwards if e["pid"] == 2)
    assert first_on_rank_2 == pytest.approx(2000.0)  # two forwards upstream
    assert [e["tid"] for e in complete if e["cat"] == "recv"] == [1]
    assert {e["args"]["name"] for e in metadata if e["name"] == "process_name"} == {f"rank {r}" for r in range(p)}
    path = write_chrome_trace(events, tmp_path / "sub" / "trace.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(trace))


# --- pictures -----------------------------------------------------------------------------------


def test_gantt_png_writes_a_png(tmp_path):
    events = events_from_simulation(simulated("interleaved", 4, 8, 2))
    assert_png(gantt_png(events, tmp_path / "gantt.png", title="interleaved"))
    dense = events_from_simulation(simulated("1f1b", 8, 64))  # boxes too narrow for labels
    assert_png(gantt_png(dense, tmp_path / "dense.png"))


def test_side_by_side_png_writes_a_png(tmp_path):
    predicted = events_from_simulation(simulated("1f1b", 4, 8))
    measured = [TimelineEvent(e.rank, e.name, e.kind, 1.0 + 1.3 * e.start_s, 1.0 + 1.3 * e.end_s, e.micro_batch,
                              e.chunk) for e in predicted]
    measured += [TimelineEvent(r, "step 0", "allreduce", 1.05, 1.06) for r in range(4)]
    _, shared_height = assert_png(side_by_side_png(predicted, measured, tmp_path / "sbs.png", "p vs m"))
    _, own_height = assert_png(side_by_side_png(predicted, measured, tmp_path / "own.png", share_time_axis=False))
    single = assert_png(gantt_png(predicted, tmp_path / "one.png"))
    assert shared_height > single[1] and own_height > single[1]


def test_memory_png_writes_a_png(tmp_path):
    model = load_model("llama2-7b")
    full = plan(p=4, m=16).with_(tensor_parallel=2)
    in_flight = (4, 3, 2, 1)
    breakdowns = [memory_per_device(model, full, 80 * 2**30, in_flight, stage=r) for r in range(4)]
    assert_png(memory_png(breakdowns, tmp_path / "memory.png", title="llama2-7b"))
    tight = [memory_per_device(model, full, 20 * 2**30, in_flight, stage=r) for r in range(4)]
    assert not tight[0].fits
    assert_png(memory_png(tight, tmp_path / "oom.png", stage_labels=["a", "b", "c", "d"]))
    with pytest.raises(ValueError):
        memory_png([], tmp_path / "empty.png")


# --- modelpar simulate --------------------------------------------------------------------------


def run_simulate(argv):
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return simulate_command(parser.parse_args(argv))


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved", 2)])
def test_simulate_command_writes_png_and_trace(tmp_path, capsys, schedule, v):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan(schedule, 4, 8, v).to_dict()))
    png, trace = tmp_path / "out" / "gantt.png", tmp_path / "trace.json"
    argv = ["--plan", str(plan_path), "--model", "gpt-tiny", "--cluster", "dgx-a100-80gb",
            "--png", str(png), "--trace", str(trace), "--memory-png", str(tmp_path / "memory.png"), "--json"]
    assert run_simulate(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["png"] == str(png) and document["trace"] == str(trace)
    assert document["makespan_s"] > 0 and 0 < document["bubble_fraction"] < 1
    assert len(document["peak_in_flight"]) == 4
    assert_png(png)
    assert_png(tmp_path / "memory.png")
    forwards = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "forward"]
    assert len(forwards) == 4 * 8 * v


def test_simulate_command_human_output_and_default_devices(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({"pipeline_parallel": 2, "schedule": "1f1b"}))  # the rest: runtime defaults
    assert run_simulate(["--plan", str(plan_path), "--model", "gpt-tiny", "--cluster", "dgx-a100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "bubble fraction" in out and "t1 p2 d1" in out


def test_simulate_command_rejects_bad_input(tmp_path):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan("1f1b", 4, 8).to_dict()))
    base = ["--plan", str(plan_path), "--model", "gpt-tiny", "--cluster", "dgx-a100-80gb"]
    with pytest.raises(SpecError, match="devices"):
        run_simulate(base + ["--devices", "8"])
    with pytest.raises(SpecError, match="no such file"):
        run_simulate(["--plan", str(tmp_path / "missing.json")] + base[2:])
    plan_path.write_text(json.dumps(plan("interleaved", 4, 6, 2).to_dict()))
    with pytest.raises(SpecError, match="multiple"):
        run_simulate(base)


@pytest.mark.parametrize("model_name,full", [
    ("gpt-tiny", plan("1f1b", 4, 8)),
    ("gpt-tiny", plan("interleaved", 4, 8, 2)),
    ("llama2-7b", plan("1f1b", 4, 16).with_(tensor_parallel=2, sequence_parallel=True, recompute="selective")),
])
def test_predicted_busy_time_is_the_cost_models_compute(model_name, full):
    """Each rank's forward + backward time is the cost model's compute + tensor-parallel time
    of that rank, and the simulated step stays close to the estimate (same pieces, bubble from
    a simulation with the real durations instead of the unit-time one)."""
    model, cluster = load_model(model_name), load_cluster("dgx-a100-80gb")
    predicted = predict_schedule(model, cluster, full)
    p, m = full.pipeline_parallel, full.num_micro_batches
    work = cost.rank_work(model, cluster, full.tensor_parallel, p, full.micro_batch_size,
                          bool(full.sequence_parallel), full.recompute)
    expected = [m * (work.compute[index] + work.tensor_comm[index])
                for index in (0 if r == 0 else 2 if r == p - 1 else 1 for r in range(p))]
    assert predicted.simulation.busy_time == pytest.approx(expected, rel=1e-9)
    assert predicted.step_time_s == pytest.approx(predicted.estimate.step_time_s, rel=0.15)


@pytest.mark.parametrize("full", [plan("1f1b", 4, 8), plan("interleaved", 4, 8, 2), plan("gpipe", 2, 4, d=2)])
def test_predicted_timeline_draws_the_estimates_step_and_compute(full):
    """One source of truth: the drawn step is the estimate's, the busiest rank's drawn forward +
    backward time its compute + tensor-parallel time."""
    predicted = predict_schedule(load_model("gpt-tiny"), load_cluster("dgx-a100-80gb"), full)
    start, end = timeline_span(predicted.events)
    assert end - start == pytest.approx(predicted.estimate.step_time_s, rel=1e-9)
    busy = [sum(e.duration_s for e in predicted.events if e.rank == rank and e.kind in ("forward", "backward"))
            for rank in range(full.pipeline_parallel)]
    parts = predicted.estimate.breakdown
    assert max(busy) == pytest.approx(parts["compute_s"] + parts["tensor_parallel_comm_s"], rel=1e-9)


def test_data_parallel_tail_follows_each_ranks_last_backward():
    model, cluster = load_model("gpt-tiny"), load_cluster("dgx-a100-80gb")
    predicted = predict_schedule(model, cluster, plan("1f1b", 4, 8, d=2))
    assert predicted.times.grad_sync_s == pytest.approx(predicted.estimate.breakdown["data_parallel_comm_s"])
    for rank in range(4):
        last_backward = max(e.end_s for e in predicted.events if e.rank == rank and e.kind == "backward")
        (sync,) = [e for e in predicted.events if e.rank == rank and e.kind == "allreduce"]
        assert sync.start_s == last_backward
    starts = {e.start_s for e in predicted.events if e.kind == "optimizer"}
    assert len(starts) == 1 and starts.pop() == max(e.end_s for e in predicted.events if e.kind == "allreduce")


def test_modules_import_without_torch_or_matplotlib():
    code = ("import sys, modelpar.commands.simulate, modelpar.report.timeline, modelpar.report.memory_plot; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- picture details ----------------------------------------------------------------------------


def _luminance(colour: str) -> float:
    red, green, blue = (int(colour[k:k + 2], 16) / 255 for k in (1, 3, 5))
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


def test_every_chunk_has_its_own_light_forward_and_dark_backward_colour():
    pairs = [chunk_colours(chunk) for chunk in range(128)]
    colours = [colour for pair in pairs for colour in pair]
    assert len(set(colours)) == len(colours)
    assert all(_luminance(light) > _luminance(dark) + 0.2 for light, dark in pairs)
    forward = [event_colour(TimelineEvent(0, "F0", "forward", 0.0, 1.0, 0, chunk)) for chunk in range(8)]
    backward = [event_colour(TimelineEvent(0, "B0", "backward", 0.0, 1.0, 0, chunk)) for chunk in range(8)]
    assert len(set(forward + backward)) == 16  # chunk 0 and chunk 4 no longer share a colour


def test_pictures_return_the_path_they_wrote(tmp_path):
    events = events_from_simulation(simulated("interleaved", 4, 8, 2))
    written = gantt_png(events, tmp_path / "gantt")
    assert written == tmp_path / "gantt.png" and assert_png(written)
    assert not (tmp_path / "gantt").exists()
    written = side_by_side_png(events, events, tmp_path / "run.v2")
    assert written == tmp_path / "run.v2.png" and assert_png(written)
    assert gantt_png(events, tmp_path / "kept.png") == tmp_path / "kept.png"
    breakdowns = [memory_per_device(load_model("gpt-tiny"), plan(), 2**30, (4, 3, 2, 1), stage=r) for r in range(4)]
    assert memory_png(breakdowns, tmp_path / "memory", device_bytes=2**31) == tmp_path / "memory.png"


def test_simulate_reports_the_png_it_wrote(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan("1f1b", 4, 8).to_dict()))
    argv = ["--plan", str(plan_path), "--model", "gpt-tiny", "--cluster", "dgx-a100-80gb",
            "--png", str(tmp_path / "gantt"), "--memory-png", str(tmp_path / "memory"), "--json"]
    assert run_simulate(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["png"] == str(tmp_path / "gantt.png") and assert_png(tmp_path / "gantt.png")
    assert document["memory_png"] == str(tmp_path / "memory.png") and assert_png(tmp_path / "memory.png")


def test_memory_chart_limit_is_the_usable_capacity_estimate_uses(tmp_path, monkeypatch):
    drawn = {}

    def fake_memory_png(breakdowns, path, title="", stage_labels=None, dpi=130, device_bytes=None):
        drawn.update(breakdowns=breakdowns, device_bytes=device_bytes)
        return tmp_path / "memory.png"

    monkeypatch.setattr(memory_plot, "memory_png", fake_memory_png)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan("1f1b", 4, 8).to_dict()))
    run_simulate(["--plan", str(plan_path), "--model", "gpt-tiny", "--cluster", "dgx-a100-80gb",
                  "--memory-png", str(tmp_path / "memory.png"), "--json"])
    cluster = load_cluster("dgx-a100-80gb")
    assert drawn["breakdowns"][0].capacity == pytest.approx(cost.usable_memory_bytes(cluster))
    assert drawn["device_bytes"] == cluster.device.memory_bytes > drawn["breakdowns"][0].capacity
