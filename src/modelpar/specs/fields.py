"""One check of a spec's fields from their declarations: the type (an integer, a number, a
boolean, or None where the annotation allows it), the bound (`metadata["bound"]`: "positive", the
default for numbers, or "non_negative") and the choices (`metadata["choices"]`). Every spec
dataclass calls it from `__post_init__`, so no spec keeps its own list of keys to check."""

from __future__ import annotations

import functools
import typing
from dataclasses import fields

from modelpar.specs.errors import SpecError


def check_fields(spec, where: str) -> None:
    """Raise SpecError '<where>: <field> must be ..., got <value>' for the first field that breaks
    its declaration."""
    for name, kinds, metadata in _declarations(type(spec)):
        value = getattr(spec, name)
        optional = type(None) in kinds
        if value is None and optional:
            continue
        or_null = " or null" if optional else ""
        choices = metadata.get("choices")
        if choices is not None:
            if value not in choices:
                raise SpecError(f"{where}: {name} must be one of {', '.join(map(str, choices))}{or_null}, "
                                f"got {value!r}")
            continue
        if bool in kinds:
            if not isinstance(value, bool):
                raise SpecError(f"{where}: {name} must be true or false{or_null}, got {value!r}")
            continue
        if not kinds & {int, float}:
            continue
        integer = float not in kinds
        bound = metadata.get("bound", "positive")
        number = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
        if not number or not (value > 0 if bound == "positive" else value >= 0):
            raise SpecError(f"{where}: {name} must be a {bound.replace('_', '-')} "
                            f"{'integer' if integer else 'number'}{or_null}, got {value!r}")


@functools.cache
def _declarations(cls) -> tuple[tuple[str, frozenset, dict], ...]:
    """(name, the types its annotation allows, metadata) of each field, read once per class."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, frozenset(typing.get_args(hints[f.name]) or (hints[f.name],)), dict(f.metadata))
                 for f in fields(cls))
