"""`--policy auto` at run time: pick the policy once the work's lengths are known, from a hardware profile.

Without `--hardware FILE` each stage's profile is measured where the stage runs (its node, its device, its threads),
within the run's memory budget, on first use (well under a minute), and kept in that node's ~/.cache/flexgen_dist/,
so later runs start at once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flexgen_dist.base.devices import DTYPES, dtype_name, resolve_device
from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.models.family import ModelConfig, model_layers
from flexgen_dist.models.layout import LayerSpec
from flexgen_dist.policy.hardware import HardwareProfile, detect_capacities, load_profile, save_profile
from flexgen_dist.policy.search import SearchResult, SearchSpace, search_policy
from flexgen_dist.runtime.partition import embedding_resident, partition, resident_work

# The fields the search chooses; a user may pin any of them next to --policy auto (e.g. --gpu-batch-size 8).
SEARCHED = ("gpu_batch_size", "num_gpu_batches", "compress_weight", "compress_cache", "cpu_cache_compute")
PLACEMENT = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent", "act_gpu_percent",
             "act_cpu_percent")


@dataclass(frozen=True)
class AutoPolicy:
    """A policy to be searched: `base` holds the fields the search does not choose (overlap, compression bits,
    sparsity) and the values of `pinned` searched fields."""

    base: Policy = Policy()
    pinned: frozenset[str] = frozenset()
    hardware: str | None = None  # a profile YAML; None: this machine's cached profile

    def __post_init__(self) -> None:
        unknown = set(self.pinned) - set(SEARCHED)
        if unknown:
            raise UserError(f"--policy auto chooses the placement itself: {', '.join(sorted(unknown))} cannot be "
                            f"given with it")

    def space(self, max_block_size: int | None) -> SearchSpace:
        """Every value of the searched fields, but only the given one of a pinned field."""
        pinned = {("gpu_batch_sizes" if name == "gpu_batch_size" else name): (getattr(self.base, name),)
                  for name in self.pinned}
        return replace(SearchSpace(max_block_size=max_block_size), **pinned)


def cache_path(device: str, threads: int) -> Path:
    """Where this node keeps its profile for a device, and on a CPU device for a thread count: a stage with one
    core computes at half the GEMM rate of two (211 vs 419 GFLOP/s measured on a 2-core Xeon)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    name = f"hardware-{device}-{threads}t.yaml" if device == "cpu" else f"hardware-{device}.yaml"
    return root / "flexgen_dist" / name


def machine_profile(device: torch.device, dtype: torch.dtype, offload_dir: str | None, hidden_size: int | None = None,
                    memory_bytes: int | None = None) -> HardwareProfile:
    """This process's profile for `dtype` (its device, its threads), measured once per machine and cached. With
    `hidden_size` (a run's model): measured in a run's scope, within `memory_bytes`, and a cached profile that lacks
    that hidden size's layer shapes gains them (only those are measured)."""
    from flexgen_dist.policy import profiler

    path = cache_path(device.type, torch.get_num_threads())
    name = dtype_name(dtype)
    cached = load_profile(path) if path.exists() else None
    scope = (profiler.ProfileScope() if hidden_size is None else
             profiler.ProfileScope.for_run(hidden_size, memory_bytes or profiler.ProfileScope().memory_bytes))
    if cached is not None and name in cached.dtypes:
        speeds = cached.dtypes[name]
        if hidden_size is None or any(key.endswith(f"x{hidden_size}") for key in speeds.gemm_flops):
            return cached
        gemm, packed = profiler.gemm_tables(device, dtype, scope)
        grown = replace(speeds, gemm_flops={**speeds.gemm_flops, **gemm},
                        packed_gemm_flops={**speeds.packed_gemm_flops, **packed})
        measured = replace(cached, dtypes={**cached.dtypes, name: grown})
    else:
        print(f"flexgen-dist: measuring this machine for --policy auto (once; saved to {path})", file=sys.stderr,
              flush=True)
        start = time.perf_counter()
        measured = profiler.measure_profile(device, [dtype], offload_dir, scope)
        print(f"flexgen-dist: measured in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if cached is not None:  # keep the dtypes measured before
            measured = replace(measured, dtypes={**cached.dtypes, **measured.dtypes})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")  # renamed into place: a concurrent run reads all or nothing
    save_profile(measured, partial)
    partial.replace(path)
    return measured


def stage_profile(device_name: str | None, dtype: str, offload_dir: str | None, hidden_size: int,
                  memory_bytes: int) -> HardwareProfile:
    """Run in a stage's place (its node, cores and threads) before the stage starts: the node's profile, with the
    capacities this process has now (a node's RAM or cgroup limit, its GPU, its offload disk). It holds at most
    `memory_bytes`, and at most a quarter of the node's memory, at once."""
    device = resolve_device(device_name)
    gpu, cpu, disk = detect_capacities(device.type, offload_dir)
    profile = machine_profile(device, DTYPES[dtype], offload_dir, hidden_size, min(memory_bytes, cpu // 4))
    return replace(profile, device_memory_bytes=gpu, cpu_memory_bytes=cpu, disk_bytes=disk)


def profile_memory(budget: MemoryBudget, device: torch.device) -> int:
    """The most a stage's profile may hold at once: the stage's memory budget (on a CPU device both memory tiers are
    RAM; on a GPU the host buffers count against the CPU budget), 2 GiB where none is given."""
    memory = budget.one_ram() if device.type == "cpu" else budget.cpu
    return 2 << 30 if memory is None else memory


# Runs a function once in each stage's place, returning its results in stage order (an executor's on_each_stage).
OnStages = Callable[..., list]


def stage_hardware(auto: AutoPolicy, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                   offload_dir: str | None, budget: MemoryBudget, stages: int,
                   on_stages: OnStages | None) -> list[HardwareProfile]:
    """Each stage's profile: `--hardware FILE` for every stage (capacities detected here), else measured where each
    stage runs (`on_stages`), or in this process when the stages run in it."""
    if auto.hardware is not None:
        profile = load_profile(auto.hardware)
        if profile.device != device.type:
            raise UserError(f"--hardware {auto.hardware} describes a {profile.device} device but this run computes on "
                            f"{device.type}; plan for other hardware with `flexgen-dist policy`")
        gpu, cpu, disk = detect_capacities(device.type, offload_dir)  # a smaller container than the profiled machine
        return [replace(profile, device_memory_bytes=gpu, cpu_memory_bytes=cpu, disk_bytes=disk)] * stages
    args = (device.type, dtype_name(dtype), offload_dir, cfg.hidden_size, profile_memory(budget, device))
    if on_stages is None:
        return [stage_profile(*args)] * stages
    return on_stages(stage_profile, *args)


def stage_layers(cfg: ModelConfig, stages: int, prompt_len: int, gen_len: int) -> list[LayerSpec]:
    """The layers of the heaviest pipeline stage: every stage runs the same policy, the heaviest bounds it. The run
    cuts the model one way when the policy keeps every weight on the device, another otherwise
    (partition.layer_cost), so the heaviest stage of either cut."""
    layers = model_layers(cfg)
    ranges = partition(layers, stages) + partition(layers, stages, resident_work(True, prompt_len, gen_len))
    a, b = max(ranges, key=lambda r: sum(layer.numel for layer in layers[r[0]:r[1]]))
    return layers[a:b]


def choose_policy(auto: AutoPolicy, cfg: ModelConfig, hardware: HardwareProfile, dtype: torch.dtype, prompt_len: int,
                  gen_len: int, budget: MemoryBudget, stages: int = 1, num_sequences: int | None = None,
                  blocks_in_flight: int | None = None) -> SearchResult:
    """`blocks_in_flight`: the KV caches each stage holds (--blocks-in-flight; default one block per stage)."""
    # Never fewer blocks than stages where the prompts allow: one block of every prompt leaves all but one stage
    # idle (issue 19: S=2 chose one block of 128, and ran at 0.95x one stage).
    max_block = max(1, num_sequences // stages) if num_sequences is not None else None
    return search_policy(cfg, stage_layers(cfg, stages, prompt_len, gen_len), hardware, dtype, prompt_len, gen_len,
                         budget, auto.base, auto.space(max_block), blocks_in_flight=blocks_in_flight or stages)


def stage_policies(result: SearchResult, cfg: ModelConfig, hardware: list[HardwareProfile], dtype: torch.dtype,
                   prompt_len: int, gen_len: int, budget: MemoryBudget,
                   blocks_in_flight: int | None = None) -> list[SearchResult]:
    """Each stage's own placement, searched on its own layers (the first holds the embedding, the last the head)
    with its own hardware (`hardware`, one per stage) under its own budget, with the block shape and compression
    `result` chose for the heaviest stage: blocks flow through every stage, so their shape is one. A policy planned
    for one stage and applied to all can overflow another's budget (opt-30b on 4xT4: stage 2 over its GPU or CPU
    budget, `policy --stages 4`)."""
    shape = result.policy
    space = SearchSpace(gpu_batch_sizes=(shape.gpu_batch_size,), num_gpu_batches=(shape.num_gpu_batches,),
                        compress_weight=(shape.compress_weight,), compress_cache=(shape.compress_cache,),
                        cpu_cache_compute=(shape.cpu_cache_compute,))
    layers = model_layers(cfg)
    stages = len(hardware)
    resident = embedding_resident(shape.w_gpu_percent)
    for _ in range(2):  # the cut counts the embedding by stage 0's placement: search again if that moved it
        ranges = partition(layers, stages, resident_work(resident, prompt_len, gen_len))
        results = [search_policy(cfg, layers[a:b], profile, dtype, prompt_len, gen_len, budget, shape, space,
                                 blocks_in_flight=blocks_in_flight or stages)
                   for (a, b), profile in zip(ranges, hardware)]
        if embedding_resident(results[0].policy.w_gpu_percent) == resident:
            break
        resident = not resident
    return results


def resolve(policy: Policy | AutoPolicy, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, prompt_len: int,
            gen_len: int, num_sequences: int, budget: MemoryBudget, stages: int, offload_dir: str | None,
            on_stages: OnStages | None = None, blocks_in_flight: int | None = None
            ) -> tuple[list[Policy], dict | None, list[HardwareProfile]]:
    """Each stage's policy: searched per stage when the run asked for --policy auto (else `policy` for every
    stage), the search's report for the summary, and each stage's hardware profile ([] without a search).
    `on_stages`: runs the profiler where the stages run; `blocks_in_flight`: the run's --blocks-in-flight."""
    if not isinstance(policy, AutoPolicy):
        return [policy] * stages, None, []
    hardware = stage_hardware(policy, cfg, device, dtype, offload_dir, budget, stages, on_stages)
    # The block shape from the heaviest stage's layers on the smallest device: it bounds every stage.
    smallest = min(hardware, key=lambda h: h.device_memory_bytes)
    result = choose_policy(policy, cfg, smallest, dtype, prompt_len, gen_len, budget, stages, num_sequences,
                           blocks_in_flight)
    if stages == 1:
        return [result.policy], {"hardware": smallest.name, **result.to_dict()}, hardware
    per_stage = stage_policies(result, cfg, hardware, dtype, prompt_len, gen_len, budget, blocks_in_flight)
    return [r.policy for r in per_stage], {
        "hardware": smallest.name, **result.to_dict(),
        "stages": [{"hardware": h.name, **r.to_dict()} for h, r in zip(hardware, per_stage)]}, hardware
