"""Bytes a policy needs on each tier, computed before any weight is loaded.

Weights and KV cache use the very split functions the engine places them with, so the prediction is the placement;
staging buffers and compute workspace follow the engine's allocation rules (engine.py, cache_home.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.budget import MemoryBudget, format_bytes
from flexgen_dist.memory.compression import record_nbytes
from flexgen_dist.memory.disk import ALIGN
from flexgen_dist.memory.placement import single_tier, split_elements, split_heads
from flexgen_dist.memory.tiers import TIERS, Tier
from flexgen_dist.memory.weight_home import FlatLayout, PackedLayout
from flexgen_dist.models.family import ModelConfig
from flexgen_dist.models.layout import LayerSpec

CACHE_LOADS_IN_FLIGHT = 3  # decode: next batch loading, current computing, previous writing back


@dataclass(frozen=True)
class TierPlan:
    weights: dict[Tier, int]
    cache: dict[Tier, int]
    activations: dict[Tier, int]
    buffers: dict[Tier, int]  # weight staging, cache staging, compute workspace

    def total(self, tier: Tier) -> int:
        return self.weights[tier] + self.cache[tier] + self.activations[tier] + self.buffers[tier]

    def as_dict(self) -> dict[str, int]:
        return {t.value: self.total(t) for t in TIERS}


def plan_bytes(cfg: ModelConfig, layers: list[LayerSpec], policy: Policy, dtype: torch.dtype, device: torch.device,
               prompt_len: int, gen_len: int, blocks_in_flight: int = 1, kv_cache: bool = True) -> TierPlan:
    """`blocks_in_flight`: blocks whose KV cache a stage holds at once (one per pipeline stage); without `kv_cache`
    (a block scored in one prefill, engine.scoring.ScoreBlock) none."""
    item = dtype.itemsize
    addressable = {Tier.GPU} | ({Tier.CPU} if device.type == "cpu" else set())
    weights, cache, acts, buffers = ({t: 0 for t in TIERS} for _ in range(4))

    # Mirrors StageEngine.__init__: two slots each of the compute-dtype staging, the packed-bytes gathering buffer
    # (compressed layers not usable in place) and, on CUDA, the pinned bounce buffer for disk pieces.
    quant = policy.weight_quant
    stored_item = 1 if quant else item
    staged_numel = packed_bytes = disk_bytes = 0
    for layer in layers:
        numel = FlatLayout.of(layer, dtype).numel
        stored_numel = PackedLayout.of(layer, dtype, quant).nbytes if quant else numel
        pieces = split_elements(stored_numel, policy.weight_percents(), ALIGN // stored_item)
        for tier, (start, stop) in pieces.items():
            weights[tier] += (stop - start) * stored_item
        in_place = len(pieces) == 1 and next(iter(pieces)) in addressable
        if quant or not in_place:
            staged_numel = max(staged_numel, numel)
        if not in_place:
            packed_bytes = max(packed_bytes, stored_numel if quant else 0)
            disk_bytes = max(disk_bytes, sum(stop - start for t, (start, stop) in pieces.items() if t is Tier.DISK)
                             * stored_item)
    buffers[Tier.GPU] += 2 * (staged_numel * item + packed_bytes)
    if device.type == "cuda":
        buffers[Tier.CPU] += 2 * disk_bytes

    batch, blocks = policy.gpu_batch_size, policy.num_gpu_batches
    capacity = prompt_len + gen_len
    num_attention = sum(layer.kind == "attention" for layer in layers)
    cached = capacity if kv_cache else 0
    head_bytes = 2 * batch * cached * cfg.head_dim * item  # K and V of one key/value head for one GPU batch, uncompressed
    quant = policy.cache_quant(cfg.head_dim)
    stored_head_bytes = 2 * batch * cached * record_nbytes(cfg.head_dim, quant) if quant else head_bytes
    for tier, (h0, h1) in split_heads(cfg.num_kv_heads, policy.cache_percents()).items():
        cache[tier] += blocks_in_flight * num_attention * blocks * (h1 - h0) * stored_head_bytes
        on_cpu = tier is Tier.CPU and policy.cpu_cache_compute
        if quant or not (tier in addressable or on_cpu):  # staged (dequantized) where attention runs
            buffers[Tier.CPU if on_cpu else Tier.GPU] += CACHE_LOADS_IN_FLIGHT * (h1 - h0) * head_bytes
            if tier is Tier.DISK:
                buffers[Tier.CPU] += CACHE_LOADS_IN_FLIGHT * (h1 - h0) * stored_head_bytes

    acts[single_tier(policy.act_percents())] += blocks_in_flight * blocks * batch * prompt_len * cfg.hidden_size * item
    buffers[Tier.GPU] += workspace_bytes(cfg, batch, prompt_len, capacity, item, blocks)
    return TierPlan(weights, cache, acts, buffers)


def workspace_bytes(cfg: ModelConfig, batch: int, prompt_len: int, capacity: int, item: int, batches: int) -> int:
    """The larger of one GPU batch computing a layer at prefill (q/k/v/context, MLP hidden, fp32 attention scores,
    fp32 logits) and a decode step computing a layer for all the block's `batches` at once (stage_engine._decode_layer:
    one token per sequence, the same tensors but the scores)."""
    def layer(tokens: int, sequences: int) -> int:
        return tokens * (6 * cfg.hidden_size + cfg.ffn_temporaries * cfg.ffn_dim) * item + 2 * sequences * cfg.vocab_size * 4

    prefill = layer(batch * prompt_len, batch) + batch * cfg.num_heads * prompt_len * capacity * 4
    return max(prefill, layer(batch * batches, batch * batches))


def check_budget(plan: TierPlan, budget: MemoryBudget, one_ram: bool) -> None:
    """Refuse, with the tier and the shortfall, a plan that does not fit the user's budgets. `one_ram`: a CPU compute
    device, whose gpu and cpu tiers are the same RAM, held together to the sum of their budgets."""
    groups = ([((Tier.GPU, Tier.CPU), "the gpu and cpu tiers (one RAM on a CPU device)", budget.one_ram()),
               ((Tier.DISK,), "the disk tier", budget.disk)] if one_ram else
              [((tier,), f"the {tier.value} tier", getattr(budget, tier.value)) for tier in TIERS])
    for tiers, where, limit in groups:
        need = sum(plan.total(t) for t in tiers)
        if limit is None or need <= limit:
            continue
        weights, cache, activations, buffers = (format_bytes(sum(part[t] for t in tiers)) for part in
                                                (plan.weights, plan.cache, plan.activations, plan.buffers))
        raise UserError(
            f"policy needs {format_bytes(need)} on {where} (weights {weights}, KV cache {cache}, activations "
            f"{activations}, buffers {buffers}) but --max-memory gives {format_bytes(limit)}: short by "
            f"{format_bytes(need - limit)}; move weights or cache to a lower tier or use smaller batches")
