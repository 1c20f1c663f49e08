"""`--policy auto` at run time: pick the policy once the work's lengths are known, from a hardware profile.

Without `--hardware FILE` the profile of this machine is measured on first use (about a minute) and kept under
~/.cache/flexgen_dist/, so later runs start at once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flexgen_dist.base.devices import dtype_name
from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.models.layout import LayerSpec, model_layers
from flexgen_dist.models.opt import OptConfig
from flexgen_dist.policy.hardware import HardwareProfile, detect_capacities, load_profile, save_profile
from flexgen_dist.policy.search import SearchResult, SearchSpace, search_policy
from flexgen_dist.runtime.partition import embedding_resident, partition

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


def cache_path(device: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "flexgen_dist" / f"hardware-{device}.yaml"


def machine_profile(device: torch.device, dtype: torch.dtype, offload_dir: str | None) -> HardwareProfile:
    """This machine's profile for `dtype`, measured once and cached."""
    path = cache_path(device.type)
    name = dtype_name(dtype)
    profile = load_profile(path) if path.exists() else None
    if profile is not None and name in profile.dtypes:
        return profile
    from flexgen_dist.policy.profiler import measure_profile

    print(f"flexgen-dist: measuring this machine for --policy auto (once, about a minute; saved to {path})",
          file=sys.stderr, flush=True)
    measured = measure_profile(device, [dtype], offload_dir)
    if profile is not None:  # keep the dtypes measured before
        measured = replace(measured, dtypes={**profile.dtypes, **measured.dtypes})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(measured, path)
    return measured


def hardware_for(auto: AutoPolicy, device: torch.device, dtype: torch.dtype, offload_dir: str | None) -> HardwareProfile:
    """The profile a run plans with: its speeds from the file (or this machine's cache), its capacities detected
    now, so a run in a smaller container or cgroup than the profiled machine plans for what it really has."""
    if auto.hardware is None:
        profile = machine_profile(device, dtype, offload_dir)
    else:
        profile = load_profile(auto.hardware)
        if profile.device != device.type:
            raise UserError(f"--hardware {auto.hardware} describes a {profile.device} device but this run computes on "
                            f"{device.type}; plan for other hardware with `flexgen-dist policy`")
    gpu, cpu, disk = detect_capacities(device.type, offload_dir)
    return replace(profile, device_memory_bytes=gpu, cpu_memory_bytes=cpu, disk_bytes=disk)


def stage_layers(cfg: OptConfig, stages: int) -> list[LayerSpec]:
    """The layers of the heaviest pipeline stage: every stage runs the same policy, the heaviest bounds it. The run
    cuts the model one way when the policy keeps every weight on the device, another otherwise
    (partition.layer_cost), so the heaviest stage of either cut."""
    layers = model_layers(cfg)
    ranges = partition(layers, stages) + partition(layers, stages, embedding_resident=True)
    a, b = max(ranges, key=lambda r: sum(layer.numel for layer in layers[r[0]:r[1]]))
    return layers[a:b]


def choose_policy(auto: AutoPolicy, cfg: OptConfig, hardware: HardwareProfile, dtype: torch.dtype, prompt_len: int,
                  gen_len: int, budget: MemoryBudget, stages: int = 1, num_sequences: int | None = None) -> SearchResult:
    # Never fewer blocks than stages where the prompts allow: one block of every prompt leaves all but one stage
    # idle (issue 19: S=2 chose one block of 128, and ran at 0.95x one stage).
    max_block = max(1, num_sequences // stages) if num_sequences is not None else None
    return search_policy(cfg, stage_layers(cfg, stages), hardware, dtype, prompt_len, gen_len, budget, auto.base,
                         auto.space(max_block), blocks_in_flight=stages)


def stage_policies(result: SearchResult, cfg: OptConfig, hardware: HardwareProfile, dtype: torch.dtype,
                   prompt_len: int, gen_len: int, budget: MemoryBudget, stages: int) -> list[SearchResult]:
    """Each stage's own placement, searched on its own layers (the first holds the embedding, the last the head)
    under its own budget, with the block shape and compression `result` chose for the heaviest stage: blocks flow
    through every stage, so their shape is one. A policy planned for one stage and applied to all can overflow
    another's budget (opt-30b on 4xT4: stage 2 over its GPU or CPU budget, `policy --stages 4`)."""
    shape = result.policy
    space = SearchSpace(gpu_batch_sizes=(shape.gpu_batch_size,), num_gpu_batches=(shape.num_gpu_batches,),
                        compress_weight=(shape.compress_weight,), compress_cache=(shape.compress_cache,),
                        cpu_cache_compute=(shape.cpu_cache_compute,))
    layers = model_layers(cfg)
    resident = embedding_resident(shape.w_gpu_percent)
    for _ in range(2):  # the cut counts the embedding by stage 0's placement: search again if that moved it
        ranges = partition(layers, stages, resident)
        results = [search_policy(cfg, layers[a:b], hardware, dtype, prompt_len, gen_len, budget, shape, space,
                                 blocks_in_flight=stages) for a, b in ranges]
        if embedding_resident(results[0].policy.w_gpu_percent) == resident:
            break
        resident = not resident
    return results


def resolve(policy: Policy | AutoPolicy, cfg: OptConfig, dtype: torch.dtype, device: torch.device, prompt_len: int,
            gen_len: int, num_sequences: int, budget: MemoryBudget, stages: int,
            offload_dir: str | None) -> tuple[list[Policy], dict | None]:
    """Each stage's policy: searched per stage when the run asked for --policy auto (else `policy` for every
    stage), and the search's report for the summary."""
    if not isinstance(policy, AutoPolicy):
        return [policy] * stages, None
    hardware = hardware_for(policy, device, dtype, offload_dir)
    result = choose_policy(policy, cfg, hardware, dtype, prompt_len, gen_len, budget, stages, num_sequences)
    if stages == 1:
        return [result.policy], {"hardware": hardware.name, **result.to_dict()}
    per_stage = stage_policies(result, cfg, hardware, dtype, prompt_len, gen_len, budget, stages)
    return [r.policy for r in per_stage], {"hardware": hardware.name, **result.to_dict(),
                                           "stages": [r.to_dict() for r in per_stage]}
