"""What one run is asked to do, as plain data, and the device/dtype defaults."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_dist.errors import UserError
from flexgen_dist.generation import Sampling
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.policy import Policy

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEVICES = ("cuda", "cpu")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies


@dataclass(frozen=True)
class RunConfig:
    model: str
    policy: Policy
    dummy_weights: bool = False
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: float16 on cuda, bfloat16 on cpu
    budget: MemoryBudget = MemoryBudget()
    offload_dir: str | None = None
    output: str | None = None
    progress: bool = True
    stages: int = 1
    executor: str = "ray"  # "ray" (actors, the product path) or "local" (same workers in-process)
    ray_address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else an embedded local cluster
    placement_strategy: str = "PACK"


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.bfloat16  # bf16 matmuls are fast on AVX-512/AMX CPUs
    return DTYPES[name]
