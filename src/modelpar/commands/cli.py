"""The `modelpar` command line: plan, estimate, validate, train (and later profile, simulate).

Every command prints human tables by default and exactly one JSON document with `--json`.
Bad input (a SpecError) is one line on stderr and exit code 2, never a traceback.
Heavy modules (torch, the runtime) are imported only by the commands that need them, so
`modelpar plan` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from modelpar.specs import ParallelPlan, SpecError, load_cluster, load_model, load_plan

EXIT_BAD_INPUT = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _bool_flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_plan_flags(parser: argparse.ArgumentParser) -> None:
    """Plan fields as flags; any left out stays unknown (None) for the search to fill."""
    group = parser.add_argument_group("plan fields (unset ones are searched)")
    group.add_argument("--tensor-parallel", type=_positive_int)
    group.add_argument("--pipeline-parallel", type=_positive_int)
    group.add_argument("--data-parallel", type=_positive_int)
    group.add_argument("--virtual-stages", type=_positive_int)
    group.add_argument("--micro-batch-size", type=_positive_int)
    group.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved"])
    group.add_argument("--sequence-parallel", type=_bool_flag, metavar="true|false")
    group.add_argument("--recompute", choices=["none", "selective", "full"])
    group.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])


def plan_from_flags(args: argparse.Namespace, base: ParallelPlan | None = None) -> ParallelPlan:
    """Merge plan flags over `base` (a plan file), flags winning."""
    base = base or ParallelPlan()
    changes = {}
    for key in ("tensor_parallel", "pipeline_parallel", "data_parallel", "virtual_stages", "micro_batch_size",
                "schedule", "sequence_parallel", "recompute", "zero_stage", "global_batch_size"):
        value = getattr(args, key, None)
        if value is not None:
            changes[key] = value
    return base.with_(**changes)


def _common_model_flags(parser: argparse.ArgumentParser, devices_required: bool = True) -> None:
    parser.add_argument("--model", required=True, help="model preset name or JSON file")
    parser.add_argument("--cluster", required=True, help="cluster preset name, 'local', or JSON file")
    parser.add_argument("--devices", type=_positive_int, required=devices_required, help="number of devices N")
    parser.add_argument("--global-batch-size", type=_positive_int, help="sequences per step (default: N)")
    parser.add_argument("--seq-length", type=_positive_int, help="override the model's sequence length")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _load_model_and_cluster(args: argparse.Namespace):
    model = load_model(args.model)
    if getattr(args, "seq_length", None):
        from dataclasses import replace

        model = replace(model, seq_length=args.seq_length)
    cluster = load_cluster(args.cluster)
    if cluster.num_devices is not None and args.devices > cluster.num_devices:
        raise SpecError(
            f"--devices {args.devices} exceeds the {cluster.num_devices} devices of cluster '{cluster.name}'"
        )
    return model, cluster


# --- plan ---------------------------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace) -> int:
    from modelpar.planner.search import search
    from modelpar.report import tables

    started = time.perf_counter()
    model, cluster = _load_model_and_cluster(args)
    partial = plan_from_flags(args)
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
        _print_json(document)
    else:
        tables.print_search(result, model, cluster, args.devices, elapsed)
    return 0


# --- estimate -----------------------------------------------------------------------------------

def cmd_estimate(args: argparse.Namespace) -> int:
    from modelpar.planner.cost import check_fits, estimate
    from modelpar.report import tables

    model, cluster = _load_model_and_cluster(args)
    base = load_plan(args.plan) if args.plan else None
    plan = plan_from_flags(args, base)
    if plan.global_batch_size is None:
        plan = plan.with_(global_batch_size=args.devices)
    plan = _fill_trivial_defaults(plan, args.devices)
    plan.check(model, args.devices)
    result = estimate(model, cluster, args.devices, plan)
    if args.json:
        _print_json(tables.estimate_json(result))
    else:
        tables.print_estimate(result, model, cluster, args.devices)
    if not args.allow_oom:
        check_fits(result)
    return 0


def _fill_trivial_defaults(plan: ParallelPlan, num_devices: int) -> ParallelPlan:
    """For `estimate`, unset fields get the plain defaults (no search): 1-way, 1F1B, no tricks."""
    t = plan.tensor_parallel or 1
    p = plan.pipeline_parallel or 1
    d = plan.data_parallel or max(1, num_devices // (t * p))
    schedule = plan.schedule or ("interleaved" if (plan.virtual_stages or 1) > 1 else "1f1b")
    return plan.with_(
        tensor_parallel=t, pipeline_parallel=p, data_parallel=d,
        virtual_stages=plan.virtual_stages or 1, micro_batch_size=plan.micro_batch_size or 1,
        sequence_parallel=plan.sequence_parallel if plan.sequence_parallel is not None else False,
        recompute=plan.recompute or "none", zero_stage=plan.zero_stage if plan.zero_stage is not None else 0,
        schedule=schedule,
    )


# --- validate -----------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from modelpar.planner.validate import validate_runs
    from modelpar.report import tables

    report = validate_runs(args.runs)
    if args.json:
        _print_json(tables.validation_json(report))
    else:
        tables.print_validation(report)
    return 0


# --- train --------------------------------------------------------------------------------------

def _add_train(subparsers) -> None:
    from modelpar.commands.train import add_train_arguments

    parser = subparsers.add_parser("train", help="run real training on torch.distributed")
    add_train_arguments(parser)
    parser.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from modelpar.commands.train import train_command

    return train_command(args)


# --- simulate -----------------------------------------------------------------------------------

def _add_simulate(subparsers) -> None:
    from modelpar.commands.simulate import add_simulate_arguments

    parser = subparsers.add_parser("simulate", help="draw a plan's pipeline schedule without running it")
    add_simulate_arguments(parser)
    parser.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from modelpar.commands.simulate import simulate_command

    return simulate_command(args)


# --- profile ------------------------------------------------------------------------------------

def _add_profile(subparsers) -> None:
    from modelpar.profiling.measure import add_profile_arguments

    parser = subparsers.add_parser("profile", help="measure this machine as a cluster spec (--cluster local)")
    add_profile_arguments(parser)
    parser.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from modelpar.profiling.measure import profile_command

    return profile_command(args)


# --- entry point ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelpar", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)

    plan = subparsers.add_parser("plan", help="rank feasible parallel plans for a model on a cluster")
    _common_model_flags(plan)
    add_plan_flags(plan)
    plan.add_argument("--top", type=_positive_int, default=5, help="how many plans to show (default 5)")
    plan.set_defaults(func=cmd_plan)

    est = subparsers.add_parser("estimate", help="full time and memory breakdown of one plan")
    _common_model_flags(est)
    est.add_argument("--plan", help="plan JSON file (a `modelpar plan --json` document works too)")
    add_plan_flags(est)
    est.add_argument("--allow-oom", action="store_true", help="report a plan that does not fit without failing")
    est.set_defaults(func=cmd_estimate)

    val = subparsers.add_parser("validate", help="predict published runs and compare with their measurements")
    val.add_argument("runs", help="runs JSON file (see shared/validation/README.md)")
    val.add_argument("--json", action="store_true", help="print one JSON document")
    val.set_defaults(func=cmd_validate)

    _add_train(subparsers)  # modelpar.training.trainer(_cli) import torch only inside their functions
    _add_simulate(subparsers)
    _add_profile(subparsers)
    return parser


def _print_json(document) -> None:
    json.dump(document, sys.stdout, indent=1, default=_json_default)
    sys.stdout.write("\n")


def _json_default(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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


if __name__ == "__main__":
    sys.exit(main())
