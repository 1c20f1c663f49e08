"""One pipeline stage on one device: the offloading engine over a slice of layers. No Ray here.

The same class runs in-process (LocalExecutor) or as a Ray actor (ray_executor.py); the device is resolved inside it,
after Ray has set the visible GPUs.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from flexgen_dist.engine import BatchInput, StageEngine
from flexgen_dist.generation import Sampling, sample
from flexgen_dist.model_source import resolve_model
from flexgen_dist.models.layout import model_layers
from flexgen_dist.policy import Policy
from flexgen_dist.run_config import resolve_device, resolve_dtype


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


class StageWorker:
    def __init__(self, spec: StageSpec) -> None:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.device = resolve_device(spec.device)
        source = resolve_model(spec.model, spec.dummy_weights, spec.seed)
        layers = model_layers(source.config)[spec.layer_start : spec.layer_stop]
        self.engine = StageEngine(source.config, layers, spec.policy, source.weights, self.device,
                                  resolve_dtype(spec.dtype, self.device), spec.offload_dir)
        self._sampling: dict[int, tuple[Sampling, torch.Generator]] = {}
        self.busy_s = 0.0
        self._first_step: float | None = None

    def ready(self) -> bool:
        return True

    def start_block(self, block_id: int, batch_sizes: list[int], capacity: int, sampling: Sampling) -> None:
        self.engine.start_block(block_id, batch_sizes, capacity)
        if self.engine.has_head:
            self._sampling[block_id] = (sampling, sampling.generator(block_id))

    def step(self, block_id: int, data: list[torch.Tensor], valid: list[torch.Tensor]) -> list[torch.Tensor]:
        """Token ids (first stage) or hidden states in; hidden states, or sampled next tokens [B] (last stage), out."""
        start = time.perf_counter()
        if self._first_step is None:
            self._first_step = start
        out = self.engine.step(block_id, [BatchInput(d, v) for d, v in zip(data, valid)])
        if self.engine.has_head:
            sampling, generator = self._sampling[block_id]
            out = [sample(logits, sampling, generator).cpu() for logits in out]
        elif self.device.type != "cpu":
            out = [h.cpu() for h in out]  # hidden states travel between stages through host memory
        self.busy_s += time.perf_counter() - start
        return out

    def end_block(self, block_id: int) -> None:
        self.engine.end_block(block_id)
        self._sampling.pop(block_id, None)

    def stats(self) -> dict:
        """Busy (inside step) and idle (since the first step, outside step) seconds, peak bytes, transfers."""
        span = time.perf_counter() - self._first_step if self._first_step is not None else 0.0
        return {"busy_s": self.busy_s, "idle_s": max(0.0, span - self.busy_s),
                "peak_bytes": self.engine.tiers.peak_bytes(), **self.engine.tiers.stats.summary(),
                "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def close(self) -> None:
        self.engine.close()
