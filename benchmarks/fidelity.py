"""Local fidelity: the planner's predicted step time against the measured one, on this CPU.

For each configuration of a grid (tensor, pipeline, data parallelism, micro-batches, schedule,
2-8 gloo ranks), run `modelpar train` (in-process API, `train.run_training`) for a few steps and
compare its measured step time (median of the steps after the first, slowest rank) with the
prediction of `planner.cost.estimate` on the profiled local cluster (`modelpar profile`, read
through `--cluster local`). The figure is the median over the grid of |predicted / measured - 1|.

Every row also carries the compute / communication / bubble split of both sides (definitions in
`modelpar.planner.prediction`), so a miss can be traced to its part.

Run `modelpar profile` first (minutes), then: `python benchmarks/fidelity.py [--json]`.
Other processes on the machine disturb both the profile and the runs; the script prints the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from _common import machine_description

from modelpar.specs import MODEL_PRESETS, ParallelPlan, load_cluster

# name: (t, p, d, v, schedule, micro-batch size, micro-batches per replica, extras)
GRID = {
    "d2": (1, 1, 2, 1, "1f1b", 2, 2, {}),
    "d4": (1, 1, 4, 1, "1f1b", 2, 1, {}),
    "d8": (1, 1, 8, 1, "1f1b", 1, 1, {}),
    "t2": (2, 1, 1, 1, "1f1b", 2, 2, {}),
    "t2-sp": (2, 1, 1, 1, "1f1b", 2, 2, {"sequence_parallel": True}),
    "t4": (4, 1, 1, 1, "1f1b", 2, 2, {}),
    "p2-1f1b": (1, 2, 1, 1, "1f1b", 2, 4, {}),
    "p2-gpipe": (1, 2, 1, 1, "gpipe", 2, 4, {}),
    "p2-interleaved": (1, 2, 1, 2, "interleaved", 2, 4, {}),
    "p4-1f1b": (1, 4, 1, 1, "1f1b", 1, 8, {}),
    "p4-interleaved": (1, 4, 1, 2, "interleaved", 1, 8, {}),
    "t2-d2": (2, 1, 2, 1, "1f1b", 2, 1, {}),
    "p2-d2": (1, 2, 2, 1, "1f1b", 2, 4, {}),
    "t2-p2": (2, 2, 1, 1, "1f1b", 2, 4, {}),
    "t2-p2-d2": (2, 2, 2, 1, "1f1b", 1, 4, {}),
    "p2-d2-zero1": (1, 2, 2, 1, "1f1b", 2, 2, {"zero_stage": 1}),
}


def grid_plan(t: int, p: int, d: int, v: int, schedule: str, b: int, m: int, extras: dict) -> ParallelPlan:
    fields = dict(tensor_parallel=t, pipeline_parallel=p, data_parallel=d, virtual_stages=v, schedule=schedule,
                  micro_batch_size=b, global_batch_size=b * m * d, sequence_parallel=False, recompute="none",
                  zero_stage=0)
    fields.update(extras)
    return ParallelPlan(**fields)


def run_grid(model_name: str, cluster_name: str, steps: int, names: list[str]) -> list[dict]:
    from modelpar.training.run import run_training

    model, cluster = MODEL_PRESETS[model_name], load_cluster(cluster_name)
    rows = []
    for name in names:
        plan = grid_plan(*GRID[name])
        started = time.perf_counter()
        summary = run_training(model, plan, steps, cluster=cluster, progress=False)
        predicted, measured = summary["predicted"], summary["measured"]
        if predicted is None:
            raise SystemExit(f"{name}: no prediction: {summary['prediction']['error']}")
        rows.append({
            "name": name, "plan": plan.to_dict(), "world_size": plan.world_size,
            "num_micro_batches": plan.num_micro_batches,
            "predicted": {key: predicted[key] for key in ("step_time_s", "compute_s", "communication_s", "bubble_s")},
            "measured": {key: measured[key] for key in ("step_time_s", "compute_s", "communication_s", "bubble_s")},
            "relative_error": summary["relative_error"]["step_time_s"],
            "measured_step_times_s": summary["measurement"]["step_times_s"],
            "wall_s": time.perf_counter() - started,
        })
        print(f"{name}: predicted {predicted['step_time_s']:.3f} s, measured {measured['step_time_s']:.3f} s "
              f"({rows[-1]['relative_error']:+.1%})", file=sys.stderr)
    return rows


HEADER = ("config", "ranks", "m", "schedule", "predicted (s)", "measured (s)", "error",
          "pred. compute / comm / bubble", "meas. compute / comm / bubble")


def table_rows(document: dict) -> list[tuple[str, ...]]:
    def split(side: dict) -> str:
        return f"{side['compute_s']:.3f} / {side['communication_s']:.3f} / {side['bubble_s']:.3f}"

    rows = []
    for row in document["rows"]:
        plan = row["plan"]
        rows.append((
            row["name"], ParallelPlan(**plan).degrees(),
            str(row["num_micro_batches"]), plan["schedule"], f"{row['predicted']['step_time_s']:.3f}",
            f"{row['measured']['step_time_s']:.3f}", f"{row['relative_error']:+.1%}",
            split(row["predicted"]), split(row["measured"]),
        ))
    return rows


def summary_line(document: dict) -> str:
    before, after = document["load_average_before"][0], document["load_average_after"][0]
    return (f"median |predicted / measured - 1| of step time: {document['median_abs_relative_error']:.1%} "
            f"over {len(document['rows'])} configurations (max {document['max_abs_relative_error']:.1%}); "
            f"load average before {before:.1f}, after {after:.1f}")


def print_document(document: dict, markdown: bool) -> None:
    title = (f"{document['model']} on {document['machine']['cpu']} ({document['machine']['cores']} cores), "
             f"predicted with cluster '{document['cluster']}', {document['machine']['date_utc']} UTC")
    if markdown:
        print(f"{title}\n")
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for row in table_rows(document):
            print("| " + " | ".join(row) + " |")
        print(f"\n{summary_line(document)}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*HEADER, title=title)
    for row in table_rows(document):
        table.add_row(*row)
    Console(width=160).print(table)
    print(summary_line(document))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-small-cpu", help="model preset (default gpt-small-cpu)")
    parser.add_argument("--cluster", default="local", help="cluster to predict with (default: the local profile)")
    parser.add_argument("--steps", type=int, default=6, help="steps per configuration; the first is warm-up")
    parser.add_argument("--only", nargs="*", choices=sorted(GRID), help="run only these configurations")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for BENCHMARKS.md)")
    parser.add_argument("--render", metavar="FILE", help="print a saved --json document instead of running")
    args = parser.parse_args()

    if args.render:
        with open(args.render, encoding="utf-8") as handle:
            print_document(json.load(handle), args.markdown)
        return
    load_before = os.getloadavg()
    rows = run_grid(args.model, args.cluster, args.steps, args.only or list(GRID))
    load_after = os.getloadavg()
    errors = [abs(row["relative_error"]) for row in rows]
    document = {
        "machine": machine_description(), "model": args.model, "cluster": args.cluster, "steps": args.steps,
        "load_average_before": load_before, "load_average_after": load_after,
        "median_abs_relative_error": statistics.median(errors), "max_abs_relative_error": max(errors),
        "rows": rows,
    }
    if args.json:
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_document(document, args.markdown)


if __name__ == "__main__":
    main()
