"""`modelpar simulate`: the predicted timeline of one plan's pipeline step, drawn without running
it: the planner's `prediction.predict_schedule` (its docstring says how the timeline
shows the estimate's numbers), as a Gantt chart, a Chrome trace and a memory picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelpar.report.tables import print_json
from modelpar.commands import flags
from modelpar.planner.cost import usable_memory_bytes
from modelpar.planner.memory import memory_per_device
from modelpar.report import memory_plot
from modelpar.planner.prediction import PredictedSchedule, predict_schedule
from modelpar.report.timeline import format_duration, gantt_png, write_chrome_trace
from modelpar.specs import load_plan
from modelpar.specs.plan import COMPLETION_DEFAULTS, complete_plan


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `modelpar simulate`."""
    parser.add_argument("--plan", required=True, help="plan JSON file (a `modelpar plan --json` document works too); "
                                                      f"unset fields: {COMPLETION_DEFAULTS}")
    parser.add_argument("--model", required=True, help="model preset name or JSON file")
    parser.add_argument("--cluster", required=True, help="cluster preset name, 'local', or JSON file")
    parser.add_argument("--devices", type=flags.positive_int, help="number of devices N (default: the plan's t x p x d)")
    parser.add_argument("--png", help="write the Gantt chart of the step to this PNG file")
    parser.add_argument("--trace", help="write a Chrome trace (open in ui.perfetto.dev) to this JSON file")
    parser.add_argument("--memory-png", help="write the memory per pipeline stage to this PNG file")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    """Run `modelpar simulate`; returns the exit code (bad input raises SpecError)."""
    plan = complete_plan(load_plan(args.plan), args.devices)
    num_devices = args.devices or plan.world_size
    model, cluster = flags.load_model_and_cluster(args, num_devices)
    plan.check(model, num_devices)
    predicted = predict_schedule(model, cluster, plan, num_devices)
    title = f"{model.name} on {cluster.name}: {plan.describe()}"
    outputs = {"png": None, "trace": None, "memory_png": None}
    if args.png:
        outputs["png"] = str(gantt_png(predicted.events, args.png, title=f"predicted step, {title}",
                                       row_name="pipeline rank"))
    if args.trace:
        outputs["trace"] = str(write_chrome_trace(predicted.events, args.trace, row_name="pipeline rank"))
    if args.memory_png:
        outputs["memory_png"] = str(_memory_png(model, cluster, plan, predicted, args.memory_png, title))
    document = _summary(predicted, outputs)
    if args.json:
        print_json(document)
    else:
        _print_summary(document, title)
    return 0


def _memory_png(model, cluster, plan, predicted: PredictedSchedule, path: str, title: str) -> Path:
    # the limit `estimate` checks: the usable share of the device (`cluster` is resolved by `run`)
    in_flight = tuple(max(1, k) for k in predicted.simulation.peak_in_flight)
    breakdowns = [memory_per_device(model, plan, usable_memory_bytes(cluster), in_flight, stage=rank)
                  for rank in range(plan.pipeline_parallel)]
    return memory_plot.memory_png(breakdowns, path, title=f"memory per device, {title}",
                      stage_labels=[f"rank {rank}" for rank in range(plan.pipeline_parallel)],
                      device_bytes=cluster.device.memory_bytes)


def _summary(predicted: PredictedSchedule, outputs: dict) -> dict:
    simulation, times = predicted.simulation, predicted.times
    return {
        "makespan_s": simulation.makespan,
        "bubble_fraction": simulation.bubble_fraction,
        "peak_in_flight": list(simulation.peak_in_flight),
        "png": outputs["png"],
        "trace": outputs["trace"],
        "memory_png": outputs["memory_png"],
        "step_time_s": predicted.step_time_s,
        "estimated_step_time_s": predicted.estimate.step_time_s,
        "forward_s": [list(row) for row in times.forward_s],
        "backward_s": [list(row) for row in times.backward_s],
        "p2p_s": times.p2p_s,
        "grad_sync_s": times.grad_sync_s,
        "optimizer_s": times.optimizer_s,
        "plan": predicted.plan.to_dict(),
    }


def _print_summary(document: dict, title: str) -> None:
    print(title)
    print(f"  pipeline makespan   {format_duration(document['makespan_s'])}")
    print(f"  bubble fraction     {document['bubble_fraction']:.1%}")
    print(f"  peak in flight      {', '.join(map(str, document['peak_in_flight']))} (per pipeline rank)")
    print(f"  step (with tail)    {format_duration(document['step_time_s'])}"
          f"  (cost model estimate {format_duration(document['estimated_step_time_s'])})")
    for key, label in (("png", "Gantt chart"), ("trace", "Chrome trace"), ("memory_png", "memory chart")):
        if document[key]:
            print(f"  {label:<19} {document[key]}")
    if not (document["png"] or document["trace"]):
        print("  (give --png OUT.png and/or --trace OUT.json to draw the timeline)")
