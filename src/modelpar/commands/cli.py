"""The `modelpar` command line: plan, estimate, validate, train, simulate, profile, presets.

Every command prints human tables by default and exactly one JSON document with `--json`.
Bad input (a SpecError) is one line on stderr and exit code 2, never a traceback.
The commands that need torch (train, profile) import it only when they run, so `modelpar plan`
starts fast and never loads torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from modelpar import __version__
from modelpar.commands import flags, presets, profile, simulate, train
from modelpar.planner.cost import check_fits, estimate
from modelpar.planner.memory import PRECISIONS
from modelpar.planner.search import search
from modelpar.planner.validate import default_runs_path, validate_runs
from modelpar.report import tables
from modelpar.specs import SpecError, load_plan
from modelpar.specs.plan import complete_plan

EXIT_BAD_INPUT = 2


def cmd_plan(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model, cluster = flags.load_model_and_cluster(args, args.devices)
    partial = flags.plan_from_args(args)
    if partial.global_batch_size is None:
        partial = partial.with_(global_batch_size=args.devices)
    partial.check_partial(model, args.devices)
    result = search(model, cluster, args.devices, partial, top=args.top)
    elapsed = time.perf_counter() - started
    if not result.plans:
        raise SpecError(tables.no_plan_message(result, model, cluster, args.devices))
    if args.json:
        document = tables.search_json(result)
        document["search_seconds"] = result.seconds
        tables.print_json(document)
    else:
        _print_note(flags.tensor_note(partial, cluster))
        tables.print_search(result, model, cluster, args.devices, elapsed)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    model, cluster = flags.load_model_and_cluster(args, args.devices)
    plan = complete_plan(flags.plan_from_args(args, load_plan(args.plan) if args.plan else None), args.devices)
    plan.check(model, args.devices)
    result = estimate(model, cluster, args.devices, plan, PRECISIONS[args.precision])
    if args.json:
        tables.print_json(tables.estimate_json(result))
    else:
        _print_note(flags.tensor_note(plan, cluster))
        tables.print_estimate(result, model, cluster, args.devices)
    if not args.allow_oom:
        check_fits(result)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    report = validate_runs(args.runs or default_runs_path())
    if args.json:
        tables.print_json(tables.validation_json(report))
    else:
        print(tables.format_validation(report))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with bad flags reported as one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelpar", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"modelpar {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)

    plan = subparsers.add_parser("plan", help="rank feasible parallel plans for a model on a cluster",
                                 description="Rank the feasible plans; unset plan fields are searched and the "
                                             "global batch size defaults to the number of devices.")
    flags.add_model_and_cluster_arguments(plan)
    flags.add_plan_arguments(plan, searched=True)
    plan.add_argument("--top", type=flags.positive_int, default=5, help="how many plans to show (default 5)")
    plan.set_defaults(func=cmd_plan)

    est = subparsers.add_parser("estimate", help="full time and memory breakdown of one plan")
    flags.add_model_and_cluster_arguments(est)
    est.add_argument("--plan", help="plan JSON file (a `modelpar plan --json` document works too)")
    flags.add_plan_arguments(est, searched=False)
    est.add_argument("--precision", choices=PRECISIONS, default="mixed",
                     help="bytes per parameter and activation: mixed (16-bit weights and gradients, fp32 Adam: 16 B, "
                          "the papers' figure; default), megatron-bf16 (fp32 main gradients: 18 B, what `modelpar "
                          "train --dtype bf16` runs), fp32 (16 B, fp32 activations)")
    est.add_argument("--allow-oom", action="store_true", help="report a plan that does not fit without failing")
    est.set_defaults(func=cmd_estimate)

    val = subparsers.add_parser("validate", help="predict published runs and compare with their measurements")
    val.add_argument("runs", nargs="?", default=None, help=(
        "runs JSON file (default: the published runs shipped with modelpar, "
        "modelpar/specs/validation/published_runs.json; format: its README.md)"))
    val.add_argument("--json", action="store_true", help="print one JSON document")
    val.set_defaults(func=cmd_validate)

    for name, module, help_text in (
        ("train", train, "run real training on torch.distributed"),
        ("simulate", simulate, "draw a plan's pipeline schedule without running it"),
        ("profile", profile, "measure this machine as a cluster spec (--cluster local)"),
        ("presets", presets, "list the model and cluster presets, or print one as a JSON template"),
    ):
        command = subparsers.add_parser(name, help=help_text)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def _print_note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as err:
        print(f"modelpar {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `modelpar ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
