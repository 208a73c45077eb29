"""Strict loading of model, cluster and plan specs from presets, JSON files or dicts.

Unknown keys, wrong types and missing required keys are errors that name the key; an unknown
preset name suggests the closest one.
"""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from modelpar.specs.cluster import CLUSTER_PRESETS, ClusterSpec
from modelpar.specs.errors import SpecError
from modelpar.specs.local import local_profile_path
from modelpar.specs.model import MODEL_PRESETS, ModelSpec
from modelpar.specs.plan import ParallelPlan

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
        raise SpecError(f"{where}: unknown key '{key}'{hint}")
    values = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise SpecError(f"{where}: missing required key '{name}'")
            continue
        values[name] = _coerce(hints[name], data[name], f"{where}.{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except SpecError:
                continue
        raise SpecError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple:  # tuple[X, ...]: a JSON list of X
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, element, f"{where}[{index}]") for index, element in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SpecError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        return value
    raise SpecError(f"{where}: unsupported type {hint}")


def _type_name(hint: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing file or malformed JSON is a SpecError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def _looks_like_file(name: str) -> bool:
    return name.endswith(".json") or os.sep in name or Path(name).is_file()


def closest_names_hint(name: str, names) -> str:
    """'; did you mean 'x'?' for the names `name` starts (all of them: 'dgx-a100' means both A100
    presets), else the most similar one; '' when none is close."""
    close = [key for key in names if key.startswith(name)] if name else []
    close = close or difflib.get_close_matches(name, list(names), n=1, cutoff=0.4)
    return f"; did you mean {' or '.join(repr(key) for key in close)}?" if close else ""


def _preset(kind: str, name: str, presets: dict[str, T]) -> T:
    if name in presets:
        return presets[name]
    raise SpecError(f"unknown {kind} '{name}'{closest_names_hint(name, presets)} (presets: {', '.join(presets)}; "
                    "or give a JSON file)")


def load_model(name_or_path: str | dict) -> ModelSpec:
    """A model preset name, a JSON file path, or a dict with ModelSpec keys."""
    if isinstance(name_or_path, dict):
        data = dict(name_or_path)
        data.setdefault("name", "custom")
        return from_dict(ModelSpec, data, "model")
    if _looks_like_file(name_or_path):
        data = read_json(name_or_path)
        if isinstance(data, dict):
            data.setdefault("name", Path(name_or_path).stem)
        return from_dict(ModelSpec, data, f"{name_or_path}")
    return _preset("model", name_or_path, MODEL_PRESETS)


def load_cluster(name_or_path: str | dict) -> ClusterSpec:
    """A cluster preset name, 'local' (the profiled machine), a JSON file, or a dict."""
    if isinstance(name_or_path, dict):
        return from_dict(ClusterSpec, name_or_path, "cluster")
    if name_or_path == "local":
        return load_local_cluster()
    if _looks_like_file(name_or_path):
        return from_dict(ClusterSpec, read_json(name_or_path), f"{name_or_path}")
    return _preset("cluster", name_or_path, CLUSTER_PRESETS)


def load_plan(path_or_dict: str | dict) -> ParallelPlan:
    """A plan JSON file or dict. A `modelpar plan --json` document is accepted too (its best plan)."""
    data = read_json(path_or_dict) if not isinstance(path_or_dict, dict) else path_or_dict
    where = "plan" if isinstance(path_or_dict, dict) else str(path_or_dict)
    if isinstance(data, dict) and "plans" in data and isinstance(data["plans"], list):
        if not data["plans"]:
            raise SpecError(f"{where}: the plan document lists no feasible plans")
        data = data["plans"][0]
    if isinstance(data, dict) and "plan" in data and isinstance(data["plan"], dict):
        data = data["plan"]
    return from_dict(ParallelPlan, data, where)


def load_local_cluster(path: str | os.PathLike | None = None) -> ClusterSpec:
    """The cached profile of this machine; SpecError when there is none or it is unreadable."""
    source = Path(path) if path is not None else local_profile_path()
    if not source.is_file():
        raise SpecError(f"no local profile: run `modelpar profile` first (looked for {source})")
    data = read_json(source)
    try:
        return from_dict(ClusterSpec, data, f"local profile {source}")
    except SpecError as error:
        raise SpecError(f"{error} (re-run `modelpar profile` to rebuild it)") from None
