"""Splitting a tensor's elements or heads across tiers by percentages (pure functions, unit-tested)."""

from __future__ import annotations

from flexgen_dist.memory.tiers import TIERS, Tier


def split_elements(total: int, percents: tuple[float, float, float], align: int) -> dict[Tier, tuple[int, int]]:
    """[start, stop) element ranges for gpu, cpu, disk so each tier holds its share of `total`.

    Boundaries are rounded to multiples of `align` (so disk pieces start page-aligned) and clamped to `total`: the
    split holds up to one alignment unit, for any percentages, and never fails.
    """
    bounds, acc = [0], 0.0
    for p in percents[:2]:
        acc += p
        bounds.append(min(total, round(total * acc / 100 / align) * align))
    bounds.append(total)
    return {tier: (bounds[i], bounds[i + 1]) for i, tier in enumerate(TIERS) if bounds[i + 1] > bounds[i]}


def single_tier(percents: tuple[float, float, float]) -> Tier:
    """The tier of a placement kept whole on one tier (activations): the first with a share."""
    return next(t for t, p in zip(TIERS, percents) if p > 0)


def split_heads(num_heads: int, percents: tuple[float, float, float]) -> dict[Tier, tuple[int, int]]:
    """[start, stop) head ranges per tier: the KV cache is split along heads, attention runs per piece."""
    return split_elements(num_heads, percents, 1)
