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
from dataclasses import dataclass

import torch

from flexgen_dist.base.devices import resolve_device, resolve_dtype
from flexgen_dist.engine.generation import Sampling, sample
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.scoring import Scoring
from flexgen_dist.engine.stage_engine import BatchInput, PrefillPart, StageEngine
from flexgen_dist.io.model_source import resolve_model
from flexgen_dist.memory.host_heap import keep_freed_memory
from flexgen_dist.memory.tiers import stage_offload_dir
from flexgen_dist.models.layout import model_layers
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


def _cat_rows(parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Parts keyed by their first sequence, in sequence order."""
    return torch.cat([parts[start] for start in sorted(parts)])


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
        self._sampling: dict[int, tuple[Sampling, torch.Generator]] = {}
        self._scoring: dict[int, Scoring] = {}  # blocks whose head sums log-likelihoods instead of sampling
        # Last stage, a prefill cut into parts: per block, per GPU batch, the logits of the parts seen so far.
        self._part_logits: dict[int, list[dict[int, torch.Tensor]]] = {}
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

    def start_block(self, block_id: int, batch_sizes: list[int], capacity: int, head: Sampling | Scoring) -> None:
        """`head`: what the last stage does with the logits — sample the next tokens, or score the block's tokens."""
        self.engine.start_block(block_id, batch_sizes, capacity)
        self._batch_sizes[block_id] = list(batch_sizes)
        self._part_logits.pop(block_id, None)
        if self.engine.has_head and isinstance(head, Scoring):
            self._scoring[block_id] = head
        elif self.engine.has_head:
            self._sampling[block_id] = (head, head.generator(block_id))

    def step(self, block_id: int, data: list[torch.Tensor], valid: list[torch.Tensor],
             part: PrefillPart | None = None) -> list[torch.Tensor]:
        """Token ids (first stage) or hidden states in; hidden states, or per sequence [B] the sampled next token or
        (scoring) the summed NLL (last stage), out. `part`: one part of a prefill cut into several steps; the last
        stage answers [] until the block's last part, then samples every GPU batch at once, so the generator draws
        as for a whole prefill."""
        start = time.perf_counter()
        with self._clock:
            if self._first_step is None:
                self._first_step = start
            self._step_start = start
        try:
            scoring = self._scoring.get(block_id)
            if part is not None and scoring is not None:
                raise ValueError("scoring takes whole prefills")
            out = self.engine.step(block_id, [BatchInput(d, v) for d, v in zip(data, valid)],
                                   scoring.step_targets(valid, data[0].shape[1]) if scoring else None, part)
            if scoring is not None:
                out = [nll.cpu() for nll in out]  # summed NLL per sequence [B]
            elif self.engine.has_head:
                if part is not None:
                    out = self._whole_prefill(block_id, part, out[0])
                sampling, generator = self._sampling[block_id]
                out = [sample(logits, sampling, generator).cpu() for logits in out]
            elif self.device.type != "cpu":
                out = [h.cpu() for h in out]  # hidden states travel between stages through host memory
        finally:
            with self._clock:
                self.busy_s += time.perf_counter() - start
                self._step_start = None
        return out

    def _whole_prefill(self, block_id: int, part: PrefillPart, logits: torch.Tensor) -> list[torch.Tensor]:
        """Keep a part's logits; once every sequence of the block has its part, per GPU batch all its logits."""
        sizes = self._batch_sizes[block_id]
        seen = self._part_logits.setdefault(block_id, [{} for _ in sizes])
        seen[part.batch][part.start] = logits
        if any(sum(len(x) for x in parts.values()) < size for parts, size in zip(seen, sizes)):
            return []
        del self._part_logits[block_id]
        return [_cat_rows(parts) for parts in seen]

    def end_block(self, block_id: int) -> None:
        self.engine.end_block(block_id)
        self._batch_sizes.pop(block_id, None)
        self._part_logits.pop(block_id, None)
        self._sampling.pop(block_id, None)
        self._scoring.pop(block_id, None)

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
