"""Where one stage's time, bytes and memory have gone so far: the figures the metrics exporter turns into per-stage
families. Plain data (it crosses from a Ray actor to the driver), taken on a thread other than the stage's own."""

from __future__ import annotations

from dataclasses import dataclass

from flexgen_dist.memory.stats import TRANSFER_KINDS, WAIT_KINDS
from flexgen_dist.memory.tiers import TIERS, TierSet


@dataclass(frozen=True)
class StageSnapshot:
    """Cumulative since the stage's first step, except `memory_bytes` (allocated now). Between steps the seconds
    partition the wall time: compute + sum(io_wait_s) + idle = time since the first step."""

    compute_s: float  # inside a step, not stalled on a transfer
    io_wait_s: dict[str, float]  # kind -> seconds a step sat stalled on transfers of that kind
    io_s: dict[str, float]  # kind -> seconds inside transfers of that kind (overlaps compute when overlap is on)
    io_bytes: dict[tuple[str, str], int]  # (src tier, dst tier) -> bytes moved
    idle_s: float  # between steps: waiting for the previous stage or the coordinator
    memory_bytes: dict[str, int]  # tier -> bytes allocated now


def take_snapshot(tiers: TierSet, busy_s: float, span_s: float, overlap: bool) -> StageSnapshot:
    """`busy_s`: seconds inside steps (a running step included); `span_s`: seconds since the first step."""
    flows, waits = tiers.stats.copy()
    io_s = dict.fromkeys(TRANSFER_KINDS, 0.0)
    io_bytes: dict[tuple[str, str], int] = {}
    for (kind, src, dst), flow in flows.items():
        io_s[kind] = io_s.get(kind, 0.0) + flow.seconds
        io_bytes[src, dst] = io_bytes.get((src, dst), 0) + flow.nbytes
    # Without overlap the transfers run inline in the step: all of their time is a stall, and no lane is waited on.
    io_wait_s = {**dict.fromkeys(WAIT_KINDS, 0.0), **(waits if overlap else io_s)}
    # A stall is added when it ends, but a running step's busy time grows all along, so mid-step this can overshoot
    # by the stall in progress; the exporter keeps counters from going back down.
    compute_s = max(0.0, busy_s - sum(io_wait_s.values()))
    return StageSnapshot(compute_s=compute_s, io_wait_s=io_wait_s, io_s=io_s, io_bytes=io_bytes,
                         idle_s=max(0.0, span_s - busy_s), memory_bytes={t.value: tiers.current[t] for t in TIERS})
