"""`modelpar presets`: the model and cluster presets (`modelpar presets [--json]`), and any one
of them as the JSON object `--model FILE` / `--cluster FILE` accept, a template to copy and edit
(`modelpar presets NAME`). An unknown NAME is a SpecError naming the closest preset."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich.table import Table

from modelpar.report.tables import console, print_json
from modelpar.specs import CLUSTER_PRESETS, MODEL_PRESETS, SpecError
from modelpar.specs.io import closest_names_hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`modelpar presets [NAME] [--json]`."""
    parser.add_argument("name", nargs="?", default=None, help="a model or cluster preset: print it as a JSON template")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    if args.name is not None:
        print_json(preset_template(args.name))
    elif args.json:
        print_json(listing())
    else:
        print_listing()
    return 0


def listing() -> dict[str, list[dict]]:
    """{"models": [...], "clusters": [...]}: one summary per preset, in registry order."""
    return {
        "models": [{"name": key, "num_layers": model.num_layers, "hidden_size": model.hidden_size,
                    "num_attention_heads": model.num_attention_heads, "seq_length": model.seq_length,
                    "num_parameters": model.num_parameters()} for key, model in MODEL_PRESETS.items()],
        "clusters": [{"name": key, "device": cluster.device.name, "devices_per_node": cluster.devices_per_node,
                      "memory_gib": cluster.device.memory_gib, "peak_tflops": cluster.device.peak_tflops}
                     for key, cluster in CLUSTER_PRESETS.items()],
    }


def preset_template(name: str) -> dict:
    """The preset `name` as the JSON object `load_model` / `load_cluster` read back (every
    dataclass field, nested device included; tuples as lists, as in a file)."""
    for presets in (MODEL_PRESETS, CLUSTER_PRESETS):
        if name in presets:
            return json.loads(json.dumps(asdict(presets[name])))
    raise SpecError(f"unknown preset '{name}'{closest_names_hint(name, [*MODEL_PRESETS, *CLUSTER_PRESETS])} "
                    "(run `modelpar presets` for the list)")


def format_parameters(count: int) -> str:
    """'175.0B', '124.4M', '85.0K'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def print_listing() -> None:
    document, out = listing(), console()
    for title, text_columns, columns, rows in (
        ("model presets (--model NAME)", 1, ("name", "layers", "hidden", "heads", "seq", "parameters"),
         [(r["name"], r["num_layers"], r["hidden_size"], r["num_attention_heads"], r["seq_length"],
           format_parameters(r["num_parameters"])) for r in document["models"]]),
        ("cluster presets (--cluster NAME)", 2, ("name", "device", "devices/node", "memory (GiB)", "peak TFLOP/s"),
         [(r["name"], r["device"], r["devices_per_node"], f"{r['memory_gib']:g}", f"{r['peak_tflops']:g}")
          for r in document["clusters"]]),
    ):
        table = Table(title=title, title_justify="left")
        for index, column in enumerate(columns):
            table.add_column(column, justify="left" if index < text_columns else "right")
        for row in rows:
            table.add_row(*map(str, row))
        out.print(table)
    out.print("`modelpar presets NAME` prints one as a JSON template for --model FILE / --cluster FILE")
