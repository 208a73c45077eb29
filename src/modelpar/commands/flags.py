"""Command-line flags shared by the subcommands, generated once from the specs.

The plan flags come from the `ParallelPlan` dataclass: one flag per field (`--tensor-parallel`
for `tensor_parallel`), its help from the field's doc, its choices from the field's registry
(schedules, recompute modes, ZeRO stages), positive integers for the degrees and sizes, and
`--sequence-parallel` / `--no-sequence-parallel` for the boolean, in every subcommand.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields, replace

from modelpar.specs import ClusterSpec, ModelSpec, ParallelPlan, SpecError, load_cluster, load_model
from modelpar.specs.plan import COMPLETION_DEFAULTS, PLAN_FIELDS, note_tensor_across_nodes, tensor_spans_nodes

_PLAN_HINTS = typing.get_type_hints(ParallelPlan)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (no floats, no exponents)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_plan_arguments(parser: argparse.ArgumentParser, searched: bool, choices: dict | None = None) -> None:
    """One flag per plan field. `searched`: unset fields are searched (`modelpar plan`), else they
    take the defaults of `specs.plan.complete_plan`. `choices` narrows the choices a field shows
    (the runtime's ZeRO stages for `train`); a value outside them is refused by the plan rule."""
    title = "plan fields (unset ones are searched)" if searched else f"plan fields (unset: {COMPLETION_DEFAULTS})"
    group = parser.add_argument_group(title)
    for spec_field in fields(ParallelPlan):
        name = spec_field.name
        flag = "--" + name.replace("_", "-")
        doc = spec_field.metadata.get("doc", "")
        if _PLAN_HINTS[name] == (bool | None):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
            continue
        allowed = spec_field.metadata.get("choices")
        kind = type(allowed[0]) if allowed else positive_int
        if name in (choices or {}):  # shown narrowed; other values reach the plan rule and its message
            shown = choices[name]
            group.add_argument(flag, type=kind, default=None, metavar="{" + ",".join(map(str, shown)) + "}",
                               help=f"{doc} Supported here: {', '.join(map(str, shown))}.")
            continue
        group.add_argument(flag, type=kind, choices=allowed, default=None, help=doc)


def plan_from_args(args: argparse.Namespace, base: ParallelPlan | None = None) -> ParallelPlan:
    """The plan flags given on the command line over `base` (a plan file), flags winning."""
    changes = {name: getattr(args, name) for name in PLAN_FIELDS if getattr(args, name, None) is not None}
    return (base or ParallelPlan()).with_(**changes)


def add_model_and_cluster_arguments(parser: argparse.ArgumentParser, devices_required: bool = True) -> None:
    parser.add_argument("--model", required=True, help="model preset name or JSON file (`modelpar presets`)")
    parser.add_argument("--cluster", required=True, help="cluster preset name, 'local', or JSON file")
    parser.add_argument("--devices", type=positive_int, required=devices_required, help="number of devices N")
    parser.add_argument("--seq-length", type=positive_int, help="override the model's sequence length")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def load_model_and_cluster(args: argparse.Namespace, num_devices: int) -> tuple[ModelSpec, ClusterSpec]:
    """The model (with --seq-length) and the cluster as `num_devices` ranks see it
    (`ClusterSpec.for_world_size`): resolved here, once per command."""
    model = load_model(args.model)
    if getattr(args, "seq_length", None):
        model = replace(model, seq_length=args.seq_length)
    cluster = load_cluster(args.cluster)
    if cluster.num_devices is not None and num_devices > cluster.num_devices:
        raise SpecError(
            f"--devices {num_devices} exceeds the {cluster.num_devices} devices of cluster '{cluster.name}'"
        )
    return model, cluster.for_world_size(num_devices)


def tensor_note(plan: ParallelPlan, cluster: ClusterSpec) -> str | None:
    """The note for a plan that fixes tensor parallelism beyond a node (legal, never searched)."""
    t = plan.tensor_parallel
    if t is not None and tensor_spans_nodes(t, cluster.devices_per_node):
        return note_tensor_across_nodes(t, cluster.devices_per_node)
    return None
