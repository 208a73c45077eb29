"""Time the planner's full search: megatron-1t on 3072 GPUs of dgx-a100-80gb, global batch 3072.

Prints the seconds of a cold search (empty caches, as in a fresh `modelpar plan`; the first one
also pays Python's lazy imports), of a warm repeat, the number of candidates examined and the best
plan. Target: cold < 0.5 s. Run: `python benchmarks/search_speed.py`.
"""

from __future__ import annotations

import argparse
import time

from modelpar.caching import clear_caches
from modelpar.planner.search import explain_rejections, search
from modelpar.specs import CLUSTER_PRESETS, MODEL_PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="megatron-1t")
    parser.add_argument("--cluster", default="dgx-a100-80gb")
    parser.add_argument("--devices", type=int, default=3072)
    parser.add_argument("--global-batch-size", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, cluster = MODEL_PRESETS[args.model], CLUSTER_PRESETS[args.cluster]

    cold = []
    for _ in range(args.repeats):
        clear_caches()
        started = time.perf_counter()
        result = search(model, cluster, args.devices, global_batch_size=args.global_batch_size, top=10)
        cold.append(time.perf_counter() - started)
    started = time.perf_counter()
    search(model, cluster, args.devices, global_batch_size=args.global_batch_size, top=10)
    warm = time.perf_counter() - started

    print(f"{args.model} on {args.devices} x {cluster.device.name} ({args.cluster}), "
          f"global batch {args.global_batch_size}")
    print(f"cold search: first {cold[0]:.3f} s, then best {min(cold):.3f} s / median "
          f"{sorted(cold)[len(cold) // 2]:.3f} s of {args.repeats} (all caches cleared before each)")
    print(f"warm search: {warm:.3f} s")
    print(f"candidates examined: {result.searched}, feasible listed: {len(result.plans)}")
    print(explain_rejections(result))
    if result.plans:
        best = result.plans[0]
        print(f"best: {best.plan.describe()}: {best.step_time_s:.2f} s/step, MFU {best.mfu:.3f}")


if __name__ == "__main__":
    main()
