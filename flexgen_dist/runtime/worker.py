"""One pipeline stage on one device: the offloading engine over a slice of layers. No Ray here.

The same class runs in-process (LocalExecutor) or as a Ray actor (ray_executor.py); the device is resolved inside it,
after Ray has set the visible GPUs.
"""

from __future__ import annotations

import os
import resource
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexgen_dist.base.devices import resolve_device, resolve_dtype
from flexgen_dist.engine.generation import Decoding, sequence_generator
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.scoring import Scoring, head_rows
from flexgen_dist.engine.stage_engine import BatchInput, PrefillPart, RefillRows, StageEngine
from flexgen_dist.io.model_source import resolve_model
from flexgen_dist.memory.host_heap import keep_freed_memory
from flexgen_dist.memory.tiers import stage_offload_dir
from flexgen_dist.models.family import model_layers
from flexgen_dist.models.likelihood import TargetScores, target_scores
from flexgen_dist.runtime.stage_snapshot import StageSnapshot, take_snapshot


@dataclass(frozen=True)
class StageSpec:
    model: str
    dummy_weights: bool
    seed: int
    layer_start: int  # slice of models.layout.model_layers
    layer_stop: int
    policy: Policy
    device: str | None
    dtype: str | None
    offload_dir: str | None
    threads: int | None = None  # compute threads (Ray actors otherwise inherit OMP_NUM_THREADS from num_cpus)
    # With a run id, the stage's offload files go under <offload_dir>/flexgen-<run_id>-stage<stage>, a name its
    # restarted process finds again (and clears: memory/tiers.py stage_offload_dir).
    run_id: str | None = None
    stage: int = 0


def _join_rows(rows: list) -> torch.Tensor | tuple:
    """Tensors joined along their first dimension; named tuples of them (a prefill that echoes) field by field."""
    if isinstance(rows[0], torch.Tensor):
        return torch.cat(rows)
    return type(rows[0])._make(_join_rows(list(column)) for column in zip(*rows))


def _cat_rows(parts: dict[int, torch.Tensor | tuple]) -> torch.Tensor | tuple:
    """Parts keyed by their first sequence, in sequence order."""
    return _join_rows([parts[start] for start in sorted(parts)])


class StageWorker:
    def __init__(self, spec: StageSpec) -> None:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self._layers = (spec.layer_start, spec.layer_stop)
        self._offload_dir = stage_offload_dir(spec.offload_dir, spec.run_id, spec.stage) if spec.run_id else None
        self.device = resolve_device(spec.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        source = resolve_model(spec.model, spec.dummy_weights, spec.seed, self.device)
        layers = model_layers(source.config)[spec.layer_start : spec.layer_stop]
        try:
            self.engine = StageEngine(source.config, layers, spec.policy, source.weights, self.device,
                                      resolve_dtype(spec.dtype, self.device),
                                      str(self._offload_dir) if self._offload_dir else spec.offload_dir)
        except BaseException:
            self._remove_offload_dir()  # the engine removed its own files; the stage directory may remain
            raise
        # Per block: its sequences' heads, and per GPU batch each sampled sequence's own generator.
        self._decoding: dict[int, tuple[Decoding, list[list[torch.Generator | None]]]] = {}
        self._scoring: dict[int, Scoring] = {}  # blocks whose head sums log-likelihoods instead of sampling
        # Every stage, scoring blocks whose rows share prefixes: per GPU batch, whom each token attends to.
        self._segments: dict[int, tuple[torch.Tensor, ...]] = {}
        # Last stage, a prefill cut into parts: per block, per GPU batch, the logits of the parts seen so far.
        self._part_logits: dict[int, list[dict[int, torch.Tensor | tuple]]] = {}
        self._batch_sizes: dict[int, list[int]] = {}
        self.busy_s = 0.0
        self._first_step: float | None = None
        self._step_start: float | None = None  # while a step runs
        self._clock = threading.Lock()  # snapshot() reads the step clock from another thread

    def __repr__(self) -> str:
        # Ray names the actor's log lines and its state-API entry after this: which slice, not just "StageWorker".
        return f"StageWorker(layers {self._layers[0]}:{self._layers[1]})"

    def pid(self) -> int:
        """Answers once the slice is loaded; the executor waits on it, and tells a restarted stage by a new id."""
        return os.getpid()

    def start_block(self, block_id: int, batch_sizes: list[int], capacity: int, head: Decoding | Scoring) -> None:
        """`head`: what the last stage does with the logits — sample the next tokens, or score the block's tokens."""
        self.engine.start_block(block_id, batch_sizes, capacity)
        self._batch_sizes[block_id] = list(batch_sizes)
        self._part_logits.pop(block_id, None)
        if isinstance(head, Scoring) and head.segments is not None:
            self._segments[block_id] = head.segments
        else:
            self._segments.pop(block_id, None)
        if self.engine.has_head and isinstance(head, Scoring):
            self._scoring[block_id] = head
        elif self.engine.has_head:
            self._decoding[block_id] = (head, head.generators())

    def step(self, block_id: int, data: list[torch.Tensor], valid: list[torch.Tensor],
             part: PrefillPart | None = None,
             refills: tuple[tuple[RefillRows, torch.Tensor], ...] = ()) -> list[torch.Tensor]:
        """Token ids (first stage) or hidden states in; hidden states, or per GPU batch the sampled next tokens [B]
        (with log-probabilities where asked: generation.Sampled) or (scoring) each sequence's summed NLL and
        greediness (likelihood.TargetScores) (last stage), out.
        `part`: one part of a prefill cut into several steps; the last stage answers [] until the block's last part,
        then samples every GPU batch at once. `refills` (a decode step): rows given new sequences, each with its
        valid; their inputs follow the batches' in `data` (and their hidden states the batches' in the output, but
        the last stage's), and the last stage samples those rows for their new sequences from this step on."""
        start = time.perf_counter()
        with self._clock:
            if self._first_step is None:
                self._first_step = start
            self._step_start = start
        try:
            scoring = self._scoring.get(block_id)
            if part is not None and scoring is not None:
                raise ValueError("scoring takes whole prefills")
            query_len = data[0].shape[1]
            # A scoring prefill's batches may differ in width (engine.scoring.ScoreBlock)
            targets = scoring.step_targets(valid, [d.shape[1] for d in data]) if scoring is not None else None
            columns = [t.shape[1] for t, _ in targets] if targets is not None else None  # logits only where scored
            batches = len(valid)
            # A refill whose prompts are all one token long has nothing to compute: only its heads change.
            computed = [i for i, (_, v) in enumerate(refills) if v.shape[1]]
            segments = self._segments.get(block_id, [None] * batches)
            out = self.engine.step(block_id, [BatchInput(d, v, g) for d, v, g in zip(data, valid, segments)],
                                   self._head(block_id, valid, query_len, part, targets), part, columns,
                                   [(refills[i][0], BatchInput(data[batches + i], refills[i][1])) for i in computed],
                                   [head_rows(c) for c in columns] if columns is not None else None)
            if scoring is not None:  # each GPU batch's output: a prefill's, per chunk of rows (head_rows)
                out = [TargetScores(torch.cat([s.nll for s in parts]).cpu(), torch.cat([s.greedy for s in parts]).cpu())
                       for parts in (p if isinstance(p, list) else [p] for p in out)]
            elif self.engine.has_head:
                if part is not None:
                    out = self._whole_prefill(block_id, part, out[0])
                decoding, generators = self._take_refills(block_id, refills)
                out = [decoding.head_output(k, logits, generators[k]) for k, logits in enumerate(out)]
            else:
                hidden = dict(zip(computed, out[batches:]))
                out = out[:batches] + [hidden.get(i, data[batches + i]) for i in range(len(refills))]
                if self.device.type != "cpu":
                    out = [h.cpu() for h in out]  # hidden states travel between stages through host memory
        finally:
            with self._clock:
                self.busy_s += time.perf_counter() - start
                self._step_start = None
        return out

    def _take_refills(self, block_id: int, refills: tuple[tuple[RefillRows, torch.Tensor], ...]
                      ) -> tuple[Decoding, list[list[torch.Generator | None]]]:
        """The block's heads and generators, with the refilled rows' new sequences' in place."""
        decoding, generators = self._decoding[block_id]
        for refill, _ in refills:
            decoding = decoding.with_rows(refill.batch, refill.rows, refill.heads)
            for row, head in zip(refill.rows, refill.heads):
                generators[refill.batch][row] = sequence_generator(head)
        self._decoding[block_id] = (decoding, generators)
        return decoding, generators

    def _head(self, block_id: int, valid: list[torch.Tensor], query_len: int, part: PrefillPart | None,
              targets: tuple[tuple[torch.Tensor, torch.Tensor | None], ...] | None
              ) -> Callable[..., object] | None:
        """What the last stage's head makes of every position's logits (stage_engine.step's `head`); None: it keeps
        the last position's. `targets`: a scoring step's (Scoring.step_targets), whose columns the logits cover."""
        if targets is not None:
            scoring = self._scoring[block_id]

            def scores(k: int, logits: torch.Tensor, rows: slice = slice(None)) -> TargetScores:
                columns, segments = (t if t is None else t[rows].to(logits.device) for t in targets[k])
                return target_scores(logits, columns, segments, scoring.sequences_per_row(k))

            return scores
        prefill = valid[0].shape[1] == query_len
        if block_id not in self._decoding or not prefill:
            return None
        return self._decoding[block_id][0].prefill_head(part.batch if part else None,
                                                        slice(part.start, part.stop) if part else slice(None))

    def _whole_prefill(self, block_id: int, part: PrefillPart, logits: torch.Tensor | tuple) -> list:
        """Keep a part's logits; once every sequence of the block has its part, per GPU batch all its logits."""
        sizes = self._batch_sizes[block_id]
        seen = self._part_logits.setdefault(block_id, [{} for _ in sizes])
        seen[part.batch][part.start] = logits
        rows = (lambda x: len(x[0]) if isinstance(x, tuple) else len(x))  # a tuple's first field has a row each
        if any(sum(rows(x) for x in parts.values()) < size for parts, size in zip(seen, sizes)):
            return []
        del self._part_logits[block_id]
        return [_cat_rows(parts) for parts in seen]

    def end_block(self, block_id: int) -> None:
        self.engine.end_block(block_id)
        self._batch_sizes.pop(block_id, None)
        self._part_logits.pop(block_id, None)
        self._decoding.pop(block_id, None)
        self._scoring.pop(block_id, None)
        self._segments.pop(block_id, None)

    def stats(self) -> dict:
        """Busy (inside step) and idle (since the first step, outside step) seconds, peak bytes, transfers."""
        span = time.perf_counter() - self._first_step if self._first_step is not None else 0.0
        return {"busy_s": self.busy_s, "idle_s": max(0.0, span - self.busy_s),
                "peak_bytes": self.engine.tiers.peak_bytes(), **self.engine.tiers.stats.summary(),
                "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def snapshot(self) -> StageSnapshot:
        """Figures so far, a running step's time included; safe to call while a step runs on another thread."""
        with self._clock:
            now = time.perf_counter()
            busy = self.busy_s + (now - self._step_start if self._step_start is not None else 0.0)
            span = now - self._first_step if self._first_step is not None else 0.0
        return take_snapshot(self.engine.tiers, busy, span, self.engine.policy.overlap)

    def close(self) -> None:
        self.engine.close()
        self._remove_offload_dir()

    def _remove_offload_dir(self) -> None:
        if self._offload_dir is not None:
            shutil.rmtree(self._offload_dir, ignore_errors=True)
