"""`modelpar profile`: measure this machine (`profiling.measure`) and cache it as the cluster
`--cluster local` reads (`specs.local`). The measurements load torch, so `run` imports them only
when the command runs (`modelpar plan` never loads torch)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from modelpar.report.tables import print_json
from modelpar.profiling.fits import DEFAULT_RANKS, VALUE_BYTES
from modelpar.runtime.launch import RankFailure
from modelpar.specs.local import save_local_cluster


def _ranks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rank counts like 1,2,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"rank counts must be positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `modelpar profile` flags."""
    parser.add_argument("--ranks", type=_ranks, default=DEFAULT_RANKS,
                        help="rank counts to profile, comma-separated (default 1,2,4,8); a plan of N ranks "
                             "uses the smallest profiled count >= N")
    parser.add_argument("--fast", action="store_true", help="tiny sizes and short windows (seconds; rough)")
    parser.add_argument("--dtype", choices=sorted(VALUE_BYTES), default="fp32",
                        help="precision to measure, as `modelpar train --dtype` runs (default fp32)")
    parser.add_argument("--output", metavar="PATH",
                        help="write the cluster JSON here instead of the cache ($MODELPAR_CACHE/local_cluster.json)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are declared stuck")
    parser.add_argument("--json", action="store_true", help="print one JSON document: the cluster and raw timings")


def run(args: argparse.Namespace) -> int:
    """`modelpar profile`: measure, write the cluster JSON (cache or --output), report."""
    from modelpar.profiling.measure import ProfileOptions, profile_machine  # torch (module docstring)

    options = ProfileOptions(ranks=tuple(args.ranks), fast=args.fast, dtype=args.dtype)
    log = None if args.json else (lambda line: print(line, file=sys.stderr))
    try:
        cluster, raw = profile_machine(options, timeout_s=args.timeout, log=log)
    except RankFailure as failure:
        print(f"modelpar profile: error: {str(failure).splitlines()[0]}", file=sys.stderr)
        return 1
    path = save_local_cluster(cluster, args.output)
    if args.json:
        print_json({"path": str(path), "cluster": asdict(cluster), "measurements": raw})
    else:
        print(f"wrote {path}; use it with --cluster {'local' if args.output is None else path}")
    return 0


