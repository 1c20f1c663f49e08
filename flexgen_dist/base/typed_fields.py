"""Building frozen config dataclasses from YAML mappings with type checks: one-line errors, never a TypeError."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any, TypeVar

from flexgen_dist.base.errors import UserError

T = TypeVar("T")
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def typed(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # YAML true/false arrive as bool, which is an int subclass in Python.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise UserError(f"{where}: expected {_KIND_NAMES[kind]}, got {value!r}")
    return value


def known_keys(data: dict, known: Sequence[str], where: str) -> None:
    unknown = [str(k) for k in data if k not in known]
    if unknown:
        raise UserError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"(known: {', '.join(known)})")


def mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    return value


def dataclass_from_mapping(cls: type[T], value: Any, where: str) -> T:
    """An all-defaults frozen dataclass (Policy, Sampling) from a mapping, each value typed like its default."""
    data = {} if value is None else mapping(value, where)
    known_keys(data, [f.name for f in fields(cls)], where)
    defaults = cls()
    kwargs = {k: typed(v, type(getattr(defaults, k)), f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except UserError as e:  # the class's own checks, e.g. Policy's percentages
        raise UserError(f"{where}: {e}") from None
