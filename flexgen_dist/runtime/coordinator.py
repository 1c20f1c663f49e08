"""The coordinator: feeds blocks through the stages with S blocks in flight (or as many as asked), samples or scores
nothing itself (the last stage does), lets each block track its own progress and stopping, and hands finished blocks
back as they complete. Generation and scoring share it.

With S stages and S blocks in flight, stage s works on one block while stage s+1 works on the block submitted before
it: Ray runs each actor's calls in order, and object refs flow actor to actor without visiting the coordinator. More
blocks in flight (--blocks-in-flight) also fill the gaps a prefill part or a block's round trip through the driver
leaves between a block's steps: the pipeline model gives 2S about 3% more at S=2 (opt-1.3b, 64 x (64 + 32), blocks
of 16), but on a 2-core CPU the stages then compute together more often, and its two cores run slower together than
one alone (one-thread GEMMs lose 10-14%): 2-8% below S in flight (docs/benchmark-history.md), so S stays the default.

A block's prefill costs many decode steps (~20x for opt-1.3b at prompt 64, batch 16). Sent whole, it holds up the
next stage, and the decode steps of the other blocks behind it, for that long: with S=2 the stages sat idle 14.4 and
8.1 s of a 63.5 s run (issue 19). Cut into parts of a few sequences each (`prefill_chunks`), the parts flow through
the stages one behind the other like blocks of their own, and the bubble shrinks to about one part.

A block's rows whose sequences stopped may take waiting sequences (generation.BlockRun, refill): their prompts travel
with the block's next step, which computes them with the weights it loads anyway (engine RefillRows).

A stage that loses its process loses the KV caches (and sampling generators) of every block in flight. Once the
executor has it back (`recover`), each block in flight is replayed on every stage from a fresh start (see `_replay`),
so the run's output is the one an undisturbed run gives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.generation import Decoding
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.scoring import Scoring
from flexgen_dist.engine.stage_engine import PrefillPart, RefillRows
from flexgen_dist.runtime.executor import Executor, StageLost


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
    # What the next step also computes: (refill, its input ids [n, m], its valid [n, m]); scoring has none.
    def take_refills(self) -> list[tuple[RefillRows, torch.Tensor, torch.Tensor]]: ...


B = TypeVar("B", bound=Block)
# One submit_step call: block id, tokens and valid per GPU batch (or of a part's sequences), the part, the refills.
Piece = tuple[int, list[torch.Tensor], list[torch.Tensor], PrefillPart | None, tuple]


def prefill_parts(batch_sizes: list[int], chunks: int) -> list[PrefillPart]:
    """A prefill cut into about `chunks` parts of near-equal sequence counts, none across two GPU batches; [] when
    it stays whole."""
    total = sum(batch_sizes)
    if chunks <= 1 or total <= 1:
        return []
    parts = []
    for k, size in enumerate(batch_sizes):
        n = max(1, min(size, round(chunks * size / total)))
        bounds = [size * i // n for i in range(n + 1)]
        parts += [PrefillPart(k, a, b) for a, b in zip(bounds, bounds[1:])]
    return parts


def prefill_chunks(requested: int | None, policies: list[Policy]) -> int:
    """How many parts each block's prefill is cut into, for stages running `policies` (one each; `requested`:
    --prefill-chunks, None for the default). Cut only where it pays: with several stages (one stage has no next stage
    to start early; 2 per stage measured best, docs/benchmark-history.md), and with no stage keeping KV cache on disk
    (a disk home's positions hold every sequence's row, so a part's rows cannot be written alone)."""
    on_disk = max(policy.cache_disk_percent for policy in policies)
    if on_disk > 0:
        if requested is not None and requested > 1:
            raise UserError(f"--prefill-chunks needs the KV cache in memory: a stage keeps {on_disk:g}% of it on disk")
        return 1
    if requested is not None:
        return requested
    return 2 * len(policies) if len(policies) > 1 else 1


def step_pieces(block_id: int, tokens: list[torch.Tensor], valid: list[torch.Tensor], parts: list[PrefillPart],
                refills: list[tuple[RefillRows, torch.Tensor, torch.Tensor]]) -> list[Piece]:
    """A step as the calls that send it: whole (with its refills), or one per part of a prefill cut into `parts`."""
    if not parts:
        return [(block_id, [*tokens, *(ids for _, ids, _ in refills)], valid, None,
                 tuple((refill, v) for refill, _, v in refills))]
    return [(block_id, [tokens[p.batch][p.start : p.stop]], [valid[p.batch][p.start : p.stop]], p, ())
            for p in parts]


def _send(executor: Executor, steps: list[list[Piece]]) -> list[object]:
    """Submit steps, each as its pieces, the pieces of several steps taken in turn (blocks that start together:
    stage 1 then finishes the first block's prefill about one part after stage 0 is done with them all, instead of
    holding stage 0 idle through the second block's whole prefill). Per step, the handle of its last piece, which
    carries the step's output (the stages run their calls in order, so it resolves after the others)."""
    handles: list[object] = [None] * len(steps)
    for turn in range(max((len(q) for q in steps), default=0)):
        for i, pieces in enumerate(steps):
            if turn < len(pieces):
                handles[i] = executor.submit_step(*pieces[turn])
    return handles


def _replay(executor: Executor, block: Block, head: Decoding | Scoring, sent: list[list[Piece]]) -> object:
    """Send a block, from a fresh start on every stage, each step it was sent so far, as it was sent; returns the
    handle of the last (the step in flight). Teacher forcing: every step gets the inputs it got the first time, so
    the stages rebuild the same KV cache, and the last stage's generators, seeded per sequence by `start_block` (or
    by the refill that gave a row its sequence), draw the same numbers again: the step in flight yields what it would
    have without the loss. Earlier steps' outputs are already in the block and are dropped."""
    executor.start_block(block.block_id, block.batch_sizes, block.capacity, head)  # also drops a stage's stale state
    return [_send(executor, [pieces])[0] for pieces in sent][-1]


def run_blocks(executor: Executor, blocks: Iterator[B], head: Callable[[B], Decoding | Scoring], max_in_flight: int,
               on_block_done: Callable[[B], None], on_step: Callable[[B, float], None] | None = None,
               on_restart: Callable[[int], None] | None = None, prefill_chunks: int = 1) -> PipelineTiming:
    """`head(block)`: what the last stage does with the block's logits (sample, or score); `prefill_chunks`: cut each
    generation prefill into about this many parts (scoring's steps are all prefills of one size, sent whole).
    `on_step(block, latency_s)` runs after each step's output is recorded (`block.steps_done == 1` after its
    prefill), before `on_block_done`.
    `on_restart(stage)`: a stage's process was lost and restarted; the blocks in flight are being replayed."""
    timing = PipelineTiming()
    in_flight: list[tuple[B, object, float]] = []  # (block, handle of its current step, submit time)
    sent: dict[int, list[list[Piece]]] = {}  # block id -> the steps sent for a block in flight, to replay it
    start = time.perf_counter()

    def submit(batch: list[B]) -> None:
        submitted = time.perf_counter()  # before the call: the in-process executor runs the whole step inside it
        steps: list[list[Piece]] = []
        for block in batch:
            cut = block.steps_done == 0 and isinstance(head(block), Decoding)
            parts = prefill_parts(block.batch_sizes, prefill_chunks) if cut else []
            # Copies of the lists: a block replaces their items as it advances (the tensors stay as sent).
            steps.append(step_pieces(block.block_id, list(block.tokens), list(block.valid), parts,
                                     block.take_refills()))
            sent.setdefault(block.block_id, []).append(steps[-1])
        in_flight.extend((block, handle, submitted) for block, handle in zip(batch, _send(executor, steps)))

    def recover() -> None:
        for stage in executor.recover():
            if on_restart is not None:
                on_restart(stage)
        # Every block in flight, not just the one whose step failed: the lost stage held them all. A step's latency
        # keeps its first submit time, so the wait for the restart and the replay shows in it.
        for i, (block, _, submitted) in enumerate(in_flight):
            in_flight[i] = (block, _replay(executor, block, head(block), sent[block.block_id]), submitted)

    pending = iter(blocks)
    exhausted = False
    try:
        while True:
            starting: list[B] = []
            while not exhausted and len(in_flight) + len(starting) < max_in_flight:
                block = next(pending, None)
                if block is None:
                    exhausted = True
                    break
                executor.start_block(block.block_id, block.batch_sizes, block.capacity, head(block))
                starting.append(block)
            submit(starting)
            if not in_flight:
                break
            i = executor.wait_any([h for _, h, _ in in_flight])
            block, handle, submitted = in_flight[i]
            try:
                outputs = executor.result(handle)
            except StageLost:
                recover()
                continue
            del in_flight[i]
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
                del sent[block.block_id]
                on_block_done(block)
            else:
                submit([block])
    finally:
        timing.total_s = time.perf_counter() - start
    return timing
