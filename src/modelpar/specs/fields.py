"""One check of a spec's fields from their declarations: the type (an integer, a number, a
boolean, or None where the annotation allows it), the bound (`metadata["bound"]`: "positive", the
default for numbers, or "non_negative") and the choices (`metadata["choices"]`). Every spec
dataclass calls it from `__post_init__`, so no spec keeps its own list of keys to check."""

from __future__ import annotations

import typing
from dataclasses import fields

from modelpar.specs.errors import SpecError


def check_fields(spec, where: str) -> None:
    """Raise SpecError '<where>: <field> must be ..., got <value>' for the first field that breaks
    its declaration."""
    hints = typing.get_type_hints(type(spec))
    for spec_field in fields(spec):
        value, hint = getattr(spec, spec_field.name), hints[spec_field.name]
        kinds = set(typing.get_args(hint)) or {hint}
        optional = type(None) in kinds
        if value is None and optional:
            continue
        or_null = " or null" if optional else ""
        choices = spec_field.metadata.get("choices")
        if choices is not None:
            if value not in choices:
                raise SpecError(f"{where}: {spec_field.name} must be one of {', '.join(map(str, choices))}"
                                f"{or_null}, got {value!r}")
            continue
        if bool in kinds:
            if not isinstance(value, bool):
                raise SpecError(f"{where}: {spec_field.name} must be true or false{or_null}, got {value!r}")
            continue
        if not kinds & {int, float}:
            continue
        integer = float not in kinds
        bound = spec_field.metadata.get("bound", "positive")
        number = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
        if not number or not (value > 0 if bound == "positive" else value >= 0):
            raise SpecError(f"{where}: {spec_field.name} must be a {bound.replace('_', '-')} "
                            f"{'integer' if integer else 'number'}{or_null}, got {value!r}")
