"""What one run is asked to do, as plain data (devices and dtypes: flexgen_dist.base.devices)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.generation import Sampling
from flexgen_dist.engine.policy import Policy
from flexgen_dist.io.prompts import MAX_LOGPROBS, valid_stop
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.policy.auto import AutoPolicy

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies
EXECUTORS = ("auto", "ray", "local")  # RunConfig.in_process


@dataclass(frozen=True)
class RunConfig:
    model: str
    policy: Policy | AutoPolicy  # AutoPolicy: searched when the run knows its prompt and generation lengths
    dummy_weights: bool = False
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()  # stop strings of prompts that give none
    logprobs: int | None = None  # alternatives per token of prompts that do not say; None: no log-probabilities
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: float16 on cuda; on cpu bfloat16 where it has bf16 instructions, else float32
    budget: MemoryBudget = MemoryBudget()
    offload_dir: str | None = None
    output: str | None = None
    progress: bool = True
    stages: int = 1
    executor: str = "auto"  # "ray" (a Ray actor per stage), "local" (the same workers in this process), or "auto"
    ray_address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else an embedded local cluster
    placement_strategy: str = "PACK"
    cpus_per_stage: float | None = None  # Ray CPUs (compute threads) per stage; None: an equal share of a node's CPUs
    prefill_chunks: int | None = None  # pipeline steps a block's prefill is cut into; None: chosen (run.py)
    blocks_in_flight: int | None = None  # blocks the stages hold at once; None: one per stage
    refill: bool = False  # rows whose sequence stopped take waiting prompts (generation.BlockRun)
    metrics_port: int = 0  # 0: no metrics server
    metrics_host: str = "127.0.0.1"
    metrics_linger_s: float = 0.0  # after the run, serve until a scrape has read the final figures, at most this long

    def __post_init__(self) -> None:
        if not valid_stop(self.stop):
            raise UserError(f"--stop: expected non-empty strings, got {list(self.stop)!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UserError(f"--logprobs must be from 0 to {MAX_LOGPROBS}, got {self.logprobs}")
        if self.executor not in EXECUTORS:
            raise UserError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.cpus_per_stage is not None and self.cpus_per_stage <= 0:
            raise UserError(f"--cpus-per-stage must be > 0, got {self.cpus_per_stage:g}")
        if self.prefill_chunks is not None and self.prefill_chunks < 1:
            raise UserError(f"--prefill-chunks must be >= 1, got {self.prefill_chunks}")
        if self.blocks_in_flight is not None and self.blocks_in_flight < 1:
            raise UserError(f"--blocks-in-flight must be >= 1, got {self.blocks_in_flight}")
        sparsity = (self.policy.base if isinstance(self.policy, AutoPolicy) else self.policy).attn_sparsity
        if self.refill and sparsity < 1:
            # Top-k keeps a share of every position a row has, its padding too: a refilled row, padded further than
            # it would be alone, would keep other positions.
            raise UserError("--refill needs dense attention: drop --attn-sparsity")

    @property
    def in_process(self) -> bool:
        """Whether the stages run in this process (LocalExecutor) rather than as Ray actors. `auto` keeps one stage in
        process unless the run joins a cluster (--ray-address, or RAY_ADDRESS under `ray job submit`) or asks for Ray
        CPUs per stage: an actor on the embedded cluster shares the node's cores with Ray's daemons and the driver,
        and at two threads on two cores it ran resident steps 0.80x as fast (machine C, docs/benchmark-history.md)
        and lm-eval's generate_until 0.88x (machine B)."""
        if self.executor != "auto":
            return self.executor == "local"
        return self.stages == 1 and not self.joins_cluster and self.cpus_per_stage is None

    @property
    def joins_cluster(self) -> bool:
        """Whether Ray stages join a running cluster (--ray-address, or RAY_ADDRESS under `ray job submit`) rather
        than an embedded one on this machine."""
        return bool(self.ray_address or os.environ.get("RAY_ADDRESS"))

    @property
    def executor_name(self) -> str:
        """What runs the stages, for summaries: "local" or "ray"."""
        return "local" if self.in_process else "ray"
