"""The narrow call surface between the coordinator and the stages, and its in-process implementation.

A step is submitted to stage 0 and flows stage to stage; the handle resolves to the last stage's sampled tokens.
The Ray implementation (ray_executor.py) has the same methods, so the coordinator cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from flexgen_dist.base.errors import RunFailed
from flexgen_dist.engine.generation import Decoding
from flexgen_dist.engine.scoring import Scoring
from flexgen_dist.engine.stage_engine import PrefillPart, RefillRows
from flexgen_dist.runtime.stage_snapshot import StageSnapshot
from flexgen_dist.runtime.worker import StageSpec, StageWorker


class StageLost(RunFailed):
    """A stage's process died or became unreachable, and the state of every block in flight went with it. `result`
    raises it; the coordinator then calls `recover` and replays those blocks. Uncaught, it is one line, exit 1."""


class Executor(Protocol):
    """Made with a place reserved for each stage (on Ray: a placement-group bundle); `start` loads the stages."""

    num_stages: int

    # fn(*args) run once in each stage's place before the stages start (the profiler, measuring where a stage will
    # compute): its results in stage order.
    def on_each_stage(self, fn: Callable[..., Any], *args: Any) -> list: ...
    def start(self, specs: list[StageSpec]) -> None: ...
    def start_block(self, block_id: int, batch_sizes: list[int], capacity: int, head: Decoding | Scoring) -> None: ...
    # `part`: the step is that part of the block's prefill (its sequences alone); None: every GPU batch. `refills`:
    # rows given new sequences, each with its valid, their input ids after the batches' in `tokens` (worker.step).
    def submit_step(self, block_id: int, tokens: list[torch.Tensor], valid: list[torch.Tensor],
                    part: PrefillPart | None = None, refills: tuple[tuple[RefillRows, torch.Tensor], ...] = ()
                    ) -> Any: ...
    def wait_any(self, handles: list[Any]) -> int: ...
    def result(self, handle: Any) -> list[torch.Tensor]: ...  # raises StageLost
    # After StageLost: once every stage answers again, the stages that were restarted (they hold no blocks now).
    # Raises UserError when a stage cannot come back: its restarts are spent, or it does not answer in time.
    def recover(self) -> list[int]: ...
    def end_block(self, block_id: int) -> None: ...
    def stats(self) -> list[dict]: ...
    # Called from the metrics server's thread while steps run; None for a stage that did not answer in time.
    def stage_snapshots(self) -> list[StageSnapshot | None]: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    """All stages in this process, run one after the other (no pipelining): tests and in-process baselines."""

    def __init__(self, num_stages: int) -> None:
        self.workers: list[StageWorker] = []
        self.num_stages = num_stages

    def on_each_stage(self, fn: Callable[..., Any], *args: Any) -> list:
        return [fn(*args)] * self.num_stages  # every stage computes here: one result serves all

    def start(self, specs: list[StageSpec]) -> None:
        try:
            for spec in specs:
                self.workers.append(StageWorker(spec))
        except BaseException:
            self.shutdown()
            raise

    def start_block(self, block_id: int, batch_sizes: list[int], capacity: int, head: Decoding | Scoring) -> None:
        for w in self.workers:
            w.start_block(block_id, batch_sizes, capacity, head)

    def submit_step(self, block_id: int, tokens: list[torch.Tensor], valid: list[torch.Tensor],
                    part: PrefillPart | None = None, refills: tuple[tuple[RefillRows, torch.Tensor], ...] = ()
                    ) -> list[torch.Tensor]:
        data = tokens
        for w in self.workers:
            data = w.step(block_id, data, valid, part, refills)
        return data

    def wait_any(self, handles: list[Any]) -> int:
        return 0  # every handle is already complete

    def result(self, handle: list[torch.Tensor]) -> list[torch.Tensor]:
        return handle

    def recover(self) -> list[int]:
        return []  # in-process stages are never lost: result() does not raise StageLost

    def end_block(self, block_id: int) -> None:
        for w in self.workers:
            w.end_block(block_id)

    def stats(self) -> list[dict]:
        return [w.stats() for w in self.workers]

    def stage_snapshots(self) -> list[StageSnapshot | None]:
        return [w.snapshot() for w in self.workers]

    def shutdown(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []
