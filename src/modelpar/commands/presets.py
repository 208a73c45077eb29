"""`modelpar presets`: the model and cluster presets, and any one of them as a JSON template.

    modelpar presets              list every model preset (layers, hidden, heads, parameters) and
                                  cluster preset (device, devices per node, memory, peak)
    modelpar presets --json       the same as one JSON document
    modelpar presets NAME         that preset as the JSON object `--model FILE` / `--cluster FILE`
                                  accept (keys = the ModelSpec / ClusterSpec fields): a template
                                  to copy and edit

An unknown NAME is a SpecError naming the closest preset (the CLI prints one line, exit 2).
Pure Python: no torch, no matplotlib.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shutil
import sys
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from modelpar.specs import CLUSTER_PRESETS, MODEL_PRESETS, ClusterSpec, ModelSpec, SpecError

COMMAND = "presets"


def register(subparsers) -> argparse.ArgumentParser:
    """Add `modelpar presets [NAME] [--json]` to `subparsers` (from `add_subparsers`)."""
    parser = subparsers.add_parser(
        COMMAND, help="list the model and cluster presets, or print one as a JSON template",
        description="List the model and cluster presets; with NAME, print that preset as the JSON "
                    "object --model FILE / --cluster FILE accept (copy it and edit).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None,
                        help="a model or cluster preset: print it as a JSON template")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    """Run `modelpar presets`; returns the exit code (an unknown name raises SpecError)."""
    if args.name is not None:
        _print_json(preset_template(args.name))
    elif args.json:
        _print_json(listing())
    else:
        print_listing()
    return 0


# --- documents ----------------------------------------------------------------------------------


def model_summary(key: str, model: ModelSpec) -> dict[str, Any]:
    return {
        "name": key, "num_layers": model.num_layers, "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads, "seq_length": model.seq_length,
        "num_parameters": model.num_parameters(),
    }


def cluster_summary(key: str, cluster: ClusterSpec) -> dict[str, Any]:
    device = cluster.device
    return {
        "name": key, "device": device.name, "devices_per_node": cluster.devices_per_node,
        "memory_gib": device.memory_gib, "peak_tflops": device.peak_tflops,
    }


def listing() -> dict[str, list[dict[str, Any]]]:
    """{"models": [...], "clusters": [...]}: one summary per preset, in registry order."""
    return {
        "models": [model_summary(key, model) for key, model in MODEL_PRESETS.items()],
        "clusters": [cluster_summary(key, cluster) for key, cluster in CLUSTER_PRESETS.items()],
    }


def preset_template(name: str) -> dict[str, Any]:
    """The preset `name` as the JSON object `load_model` / `load_cluster` read back (every
    dataclass field, nested device included); SpecError naming the closest preset otherwise."""
    if name in MODEL_PRESETS:
        return asdict(MODEL_PRESETS[name])
    if name in CLUSTER_PRESETS:
        return json.loads(json.dumps(asdict(CLUSTER_PRESETS[name])))  # tuples -> lists, as in a file
    names = [*MODEL_PRESETS, *CLUSTER_PRESETS]
    # a name that starts a preset's ('dgx-a100') means that preset; else the most similar one
    close = [key for key in names if key.startswith(name)] if name else []
    close = close or difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    hint = f"; did you mean {' or '.join(repr(key) for key in close)}?" if close else ""
    raise SpecError(f"unknown preset '{name}'{hint} (run `modelpar presets` for the list)")


# --- human output -------------------------------------------------------------------------------


def format_parameters(count: int) -> str:
    """'175.0B', '124.4M', '85.0K'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def print_listing() -> None:
    # piped output would otherwise wrap at 80 columns
    console = Console(highlight=False, width=max(shutil.get_terminal_size((120, 24)).columns, 100))
    models = Table(title="model presets (--model NAME)", title_justify="left")
    for column in ("name", "layers", "hidden", "heads", "seq", "parameters"):
        models.add_column(column, justify="left" if column == "name" else "right")
    for row in listing()["models"]:
        models.add_row(row["name"], str(row["num_layers"]), str(row["hidden_size"]), str(row["num_attention_heads"]),
                       str(row["seq_length"]), format_parameters(row["num_parameters"]))
    console.print(models)
    clusters = Table(title="cluster presets (--cluster NAME)", title_justify="left")
    for column in ("name", "device", "devices/node", "memory (GiB)", "peak TFLOP/s"):
        clusters.add_column(column, justify="left" if column in ("name", "device") else "right")
    for row in listing()["clusters"]:
        clusters.add_row(row["name"], row["device"], str(row["devices_per_node"]), f"{row['memory_gib']:g}",
                         f"{row['peak_tflops']:g}")
    console.print(clusters)
    console.print("`modelpar presets NAME` prints one as a JSON template for --model FILE / --cluster FILE")


def _print_json(document) -> None:
    json.dump(document, sys.stdout, indent=1)
    sys.stdout.write("\n")
