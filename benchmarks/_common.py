"""Helpers shared by the benchmark scripts: paired, interleaved timing inside spawned ranks, paired-ratio
statistics, the machine's description, tables.

Paired design: a benchmark alternates the two contenders (A, B, A, B, ...) inside one run, so slow
drifts of the machine (thermal state, other load) hit both alike; the figure is the median of the
per-pair ratios A_k / B_k, which is robust to one disturbed pair.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedRatio:
    """Per-pair ratios ours_k / theirs_k and their median (the reported figure), with the spread."""

    ours_s: tuple[float, ...]
    theirs_s: tuple[float, ...]
    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def low(self) -> float:
        return min(self.ratios)

    @property
    def high(self) -> float:
        return max(self.ratios)

    @property
    def ours_median_s(self) -> float:
        return statistics.median(self.ours_s)

    @property
    def theirs_median_s(self) -> float:
        return statistics.median(self.theirs_s)

    def as_dict(self) -> dict:
        return {"median_ratio": self.median, "min_ratio": self.low, "max_ratio": self.high,
                "ratios": list(self.ratios), "ours_step_s": list(self.ours_s), "theirs_step_s": list(self.theirs_s),
                "ours_median_step_s": self.ours_median_s, "theirs_median_step_s": self.theirs_median_s}


def paired_ratio(ours_s: Sequence[float], theirs_s: Sequence[float]) -> PairedRatio:
    """Ratios of matched repetitions (same index = one interleaved pair)."""
    if len(ours_s) != len(theirs_s) or not ours_s:
        raise ValueError(f"paired_ratio needs equally many, at least one, timings: {len(ours_s)} vs {len(theirs_s)}")
    return PairedRatio(tuple(ours_s), tuple(theirs_s), tuple(a / b for a, b in zip(ours_s, theirs_s)))


def machine_description() -> dict:
    """What the figures were measured on: CPU model, core count, OS, Python, torch, date (UTC)."""
    from modelpar.profiling.fits import cpu_model_name

    cpu = cpu_model_name()
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch_version,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


# --- paired timing of two contenders inside spawned ranks (torch.distributed initialised) ---------

SIDES = ("ours", "theirs")


def timed_steps(run_step, first_step: int, steps: int) -> list[tuple[float, float, float]]:
    """(start, end, cpu seconds) of each step, each started after a barrier: perf_counter wall
    times (one monotonic clock for every process of the machine), and this process's CPU time
    (all its threads, the communication library's included) spent in the step."""
    import torch.distributed as dist

    spans = []
    for k in range(steps):
        dist.barrier()
        cpu_start, start = time.process_time(), time.perf_counter()
        run_step(first_step + k)
        spans.append((start, time.perf_counter(), time.process_time() - cpu_start))
    return spans


def run_interleaved_pairs(step_ours, step_theirs, repeats: int, steps: int, warmup_steps: int,
                          on_ours_block=None) -> list[dict]:
    """`warmup_steps` untimed steps per side, then `repeats` pairs of `steps` steps per side,
    alternating which side goes first (ours, theirs, theirs, ours, ...). Each side counts its own
    steps from 0, so both see the same step indices (and data) in the same order. Returns per
    pair {"ours": spans, "theirs": spans, "ours_first": bool} (spans from `timed_steps`).
    `on_ours_block("start" | "end")` brackets every timed block of ours (e.g. to slice a timeline)."""
    next_step = {"ours": 0, "theirs": 0}
    run = {"ours": step_ours, "theirs": step_theirs}
    for _ in range(warmup_steps):
        for side in SIDES:
            timed_steps(run[side], next_step[side], 1)
            next_step[side] += 1
    pairs = []
    for pair in range(repeats):
        record: dict = {"ours_first": pair % 2 == 0}
        for side in SIDES if pair % 2 == 0 else SIDES[::-1]:
            if side == "ours" and on_ours_block is not None:
                on_ours_block("start")
            record[side] = timed_steps(run[side], next_step[side], steps)
            if side == "ours" and on_ours_block is not None:
                on_ours_block("end")
            next_step[side] += steps
        pairs.append(record)
    return pairs


def profile_one_step(rank: int, step_ours, step_theirs, step: int, row_limit: int = 14) -> dict:
    """Operator-level profile (torch.profiler, CPU) of one step per side; the tables on rank 0 only."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for side, run_step in zip(SIDES, (step_ours, step_theirs)):
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_step(step)
        if rank == 0:
            tables[side] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return tables


# --- analysis of the ranks' spans (parent process) -------------------------------------------------


def _per_pair_median(rank_results: list[dict], side: str, of_step) -> list[float]:
    """Per pair: median over its steps of `of_step(spans)`, spans = every rank's (start, end, cpu
    seconds) of that step."""
    medians = []
    for pair in range(len(rank_results[0]["pairs"])):
        rank_spans = [result["pairs"][pair][side] for result in rank_results]
        medians.append(statistics.median(of_step([spans[k] for spans in rank_spans])
                                         for k in range(len(rank_spans[0]))))
    return medians


def pair_step_times(rank_results: list[dict], side: str) -> list[float]:
    """Per pair: median over its steps of (latest rank's end - earliest rank's start)."""
    return _per_pair_median(rank_results, side, lambda spans: max(s[1] for s in spans) - min(s[0] for s in spans))


def pair_cpu_times(rank_results: list[dict], side: str) -> list[float]:
    """Per pair: median over its steps of the CPU seconds summed over the ranks (the total work)."""
    return _per_pair_median(rank_results, side, lambda spans: sum(s[2] for s in spans))


def robustness_checks(rank_results: list[dict]) -> dict:
    """Cross-checks less disturbed than the wall-clock median by other processes on a shared
    machine: the ratio of the fastest steps (best of all pairs), and the paired ratio of CPU
    seconds (work plus framework overhead; blind to waiting and to time taken by other processes)."""
    ours, theirs = pair_step_times(rank_results, "ours"), pair_step_times(rank_results, "theirs")
    cpu = paired_ratio(pair_cpu_times(rank_results, "ours"), pair_cpu_times(rank_results, "theirs"))
    return {"best_step_ratio": min(ours) / min(theirs), "ours_best_step_s": min(ours), "theirs_best_step_s": min(theirs),
            "cpu_time_ratio": cpu.median, "ours_cpu_s": cpu.ours_median_s, "theirs_cpu_s": cpu.theirs_median_s}
