"""Counters of what moved between tiers and how long it took, shared by the engine's threads."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

# The kinds of transfer the engine times (TransferStats.timed) and of stall it counts (waiting): known in advance, so
# the metrics export every one from the start, at 0 where a run has none (a resident run still shows them).
TRANSFER_KINDS = ("weights", "cache", "dequantize")
WAIT_KINDS = ("weights", "cache", "drain")


@dataclass
class Flow:
    nbytes: int = 0
    # Wall time during which at least one transfer of this flow ran: two loads at once (the weight lane's two
    # workers) count their common time once, so bytes / seconds stays the flow's rate.
    seconds: float = 0.0
    running: int = 0  # transfers of this flow in progress
    busy_since: float = 0.0  # when `running` last rose from 0

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds else 0.0


class TransferStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.flows: dict[tuple[str, str, str], Flow] = {}  # (kind, src tier, dst tier) -> totals
        self.waits: dict[str, float] = {}  # seconds compute sat waiting for a lane, per kind

    @contextmanager
    def waiting(self, kind: str):
        start = time.perf_counter()
        yield
        with self._lock:
            self.waits[kind] = self.waits.get(kind, 0.0) + time.perf_counter() - start

    @contextmanager
    def timed(self, kind: str, src: str, dst: str, nbytes: int):
        with self._lock:
            flow = self.flows.setdefault((kind, src, dst), Flow())
            if flow.running == 0:
                flow.busy_since = time.perf_counter()
            flow.running += 1
        moved = 0
        try:
            yield
            moved = nbytes
        finally:
            with self._lock:
                flow.running -= 1
                if flow.running == 0:
                    flow.seconds += time.perf_counter() - flow.busy_since
                flow.nbytes += moved

    def copy(self) -> tuple[dict[tuple[str, str, str], Flow], dict[str, float]]:
        """Consistent copies of the flows and waits, for a reader on another thread (the metrics snapshot)."""
        with self._lock:
            return {key: Flow(f.nbytes, f.seconds) for key, f in self.flows.items()}, dict(self.waits)

    def summary(self) -> dict[str, dict]:
        with self._lock:
            flows = {f"{kind}:{src}->{dst}": {"bytes": f.nbytes, "seconds": round(f.seconds, 4), "gbps": round(f.gbps, 3)}
                     for (kind, src, dst), f in sorted(self.flows.items())}
            return {"transfers": flows, "wait_s": {k: round(v, 4) for k, v in sorted(self.waits.items())}}
