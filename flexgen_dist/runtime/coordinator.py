"""The coordinator: feeds blocks through the stages with up to S blocks in flight, samples or scores nothing itself
(the last stage does), lets each block track its own progress and stopping, and hands finished blocks back as they
complete. Generation and scoring share it.

With S stages and S blocks in flight, stage s works on one block while stage s+1 works on the block submitted before
it: Ray runs each actor's calls in order, and object refs flow actor to actor without visiting the coordinator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from flexgen_dist.generation import Sampling
from flexgen_dist.runtime.executor import Executor
from flexgen_dist.scoring import Scoring


@dataclass
class PipelineTiming:
    total_s: float = 0.0  # wall time from the first submitted step to the last result
    prefill_s: float = 0.0  # summed latency of prefill steps (overlaps decode when blocks are in flight together)
    decode_s: float = 0.0


class Block(Protocol):
    """What the coordinator needs of a block: generation's BlockRun and scoring's ScoreBlock both are one."""

    block_id: int
    steps_done: int

    @property
    def batch_sizes(self) -> list[int]: ...
    @property
    def capacity(self) -> int: ...
    @property
    def tokens(self) -> list[torch.Tensor]: ...
    @property
    def valid(self) -> list[torch.Tensor]: ...
    @property
    def done(self) -> bool: ...
    def advance(self, outputs: list[torch.Tensor]) -> None: ...


B = TypeVar("B", bound=Block)


def run_blocks(executor: Executor, blocks: Iterator[B], head: Callable[[B], Sampling | Scoring], max_in_flight: int,
               on_block_done: Callable[[B], None],
               on_step: Callable[[B, float], None] | None = None) -> PipelineTiming:
    """`head(block)`: what the last stage does with the block's logits (sample, or score). `on_step(block, latency_s)`
    runs after each step's output is recorded (`block.steps_done == 1` after its prefill), before `on_block_done`."""
    timing = PipelineTiming()
    in_flight: list[tuple[B, object, float]] = []  # (block, handle of its current step, submit time)
    start = time.perf_counter()

    def submit(block: B) -> None:
        submitted = time.perf_counter()  # before the call: the in-process executor runs the whole step inside it
        in_flight.append((block, executor.submit_step(block.block_id, block.tokens, block.valid), submitted))

    pending = iter(blocks)
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < max_in_flight:
                block = next(pending, None)
                if block is None:
                    exhausted = True
                    break
                executor.start_block(block.block_id, block.batch_sizes, block.capacity, head(block))
                submit(block)
            if not in_flight:
                break
            block, handle, submitted = in_flight.pop(executor.wait_any([h for _, h, _ in in_flight]))
            outputs = executor.result(handle)
            latency = time.perf_counter() - submitted
            if block.steps_done == 0:
                timing.prefill_s += latency
            else:
                timing.decode_s += latency
            block.advance(outputs)
            if on_step is not None:
                on_step(block, latency)
            if block.done:
                executor.end_block(block.block_id)
                on_block_done(block)
            else:
                submit(block)
    finally:
        timing.total_s = time.perf_counter() - start
    return timing
