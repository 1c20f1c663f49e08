"""Parsing of user-given memory sizes and per-tier budgets (`gpu=16GiB,cpu=64GiB,disk=500GiB`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from fractions import Fraction

from flexgen_dist.base.errors import UserError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    # Bare letters follow the memory-size habit of `free -h`/`ulimit`: powers of two.
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([a-z]*)")
_SIZE_HELP = "expected a non-negative number with an optional unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, K, M, G, T"


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "16GiB", "1.5 GiB", "16GB", "512MiB", "100KB" or "4096".

    Units are case-insensitive. KB/MB/GB/TB are decimal (10**9 for GB), KiB/MiB/GiB/TiB are
    binary, and the bare letters K/M/G/T are binary too ("16G" == "16GiB"). A number without a
    unit is bytes and must be whole; fractional sizes with a unit are rounded down to a byte.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UserError(f"invalid size {text}: must not be negative")
        return text
    if not isinstance(text, str):
        raise UserError(f"invalid size {text!r}: {_SIZE_HELP}")
    m = _SIZE_RE.fullmatch(text.strip().lower())
    if m is None or m.group(2) not in _UNITS:
        raise UserError(f"invalid size {text!r}: {_SIZE_HELP}")
    number, unit = Fraction(m.group(1)), _UNITS[m.group(2)]
    if unit == 1 and number.denominator != 1:
        raise UserError(f"invalid size {text!r}: a byte count must be a whole number (add a unit?)")
    return int(number * unit)


def format_bytes(n: int) -> str:
    """Human-readable binary size: 512 -> "512 B", 1610612736 -> "1.50 GiB"."""
    for name, unit in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{n} B"


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes the engine may use on each tier; None means no user limit (detect or leave unlimited)."""

    gpu: int | None = None
    cpu: int | None = None
    disk: int | None = None

    def __str__(self) -> str:
        def show(n: int | None) -> str:
            return "auto" if n is None else format_bytes(n)

        return ", ".join(f"{f.name}={show(getattr(self, f.name))}" for f in fields(self))

    def one_ram(self) -> int | None:
        """On a CPU compute device the gpu and cpu tiers are the same RAM: the bytes both may hold together, the sum
        of the budgets given (one alone: that one; None: neither given)."""
        given = [b for b in (self.gpu, self.cpu) if b is not None]
        return sum(given) if given else None


def parse_max_memory(text: str) -> MemoryBudget:
    """Parse "gpu=16GiB,cpu=64GiB,disk=500GiB": any subset of the tiers, in any order."""
    tiers = [f.name for f in fields(MemoryBudget)]
    values: dict[str, int] = {}
    if not text.strip():
        raise UserError(f"empty memory budget: expected e.g. 'gpu=16GiB,cpu=64GiB' with tiers {', '.join(tiers)}")
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise UserError(f"memory budget entry {part.strip()!r}: expected TIER=SIZE, e.g. gpu=16GiB")
        if key not in tiers:
            raise UserError(f"memory budget entry {part.strip()!r}: unknown tier {key!r} (known: {', '.join(tiers)})")
        if key in values:
            raise UserError(f"memory budget entry {part.strip()!r}: tier {key!r} given more than once")
        try:
            values[key] = parse_size(value)
        except UserError as e:
            raise UserError(f"memory budget entry {part.strip()!r}: {e}") from None
    return MemoryBudget(**values)
