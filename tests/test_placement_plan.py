"""Placement splits and the pre-load memory plan against what the engine actually allocates."""

from __future__ import annotations

import pytest
import torch

from flexgen_dist.engine.generation import BlockRun, Sequence
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.stage_engine import BatchInput, StageEngine
from flexgen_dist.io.weights import DummyWeights
from flexgen_dist.memory.placement import split_elements, split_heads
from flexgen_dist.memory.tiers import Tier
from flexgen_dist.models.family import config_by_name, model_layers
from flexgen_dist.models.opt import OPT_SIZES
from flexgen_dist.policy.memory_plan import plan_bytes, workspace_bytes


@pytest.mark.parametrize("percents", [(100, 0, 0), (0, 100, 0), (0, 0, 100), (30, 30, 40), (33.3, 33.3, 33.4), (0, 1, 99)])
def test_split_elements_covers_everything_with_aligned_bounds(percents):
    total = 1_000_448
    ranges = split_elements(total, percents, 512)
    assert sorted(ranges.values())[0][0] == 0 and max(stop for _, stop in ranges.values()) == total
    for tier, (start, stop) in ranges.items():
        assert start % 512 == 0
        share = 100 * (stop - start) / total
        assert abs(share - percents[[Tier.GPU, Tier.CPU, Tier.DISK].index(tier)]) < 0.2


def test_split_heads_never_fails_and_keeps_order():
    assert split_heads(4, (30, 30, 40)) == {Tier.GPU: (0, 1), Tier.CPU: (1, 2), Tier.DISK: (2, 4)}
    assert split_heads(1, (30, 30, 40)) == {Tier.CPU: (0, 1)}  # rounding the cumulative 60% boundary
    assert split_heads(96, (100, 0, 0)) == {Tier.GPU: (0, 96)}


def test_size_table_parameter_counts():
    expected = {"opt-125m": 0.125, "opt-350m": 0.331, "opt-1.3b": 1.316, "opt-6.7b": 6.658, "opt-175b": 174.6}
    for name, billions in expected.items():
        assert config_by_name(name).param_count() / 1e9 == pytest.approx(billions, rel=0.01)
    assert OPT_SIZES["opt-350m"].projects_embeddings and not OPT_SIZES["opt-350m"].do_layer_norm_before


COMPRESSION = {"plain": {}, "compressed": {"compress_weight": True, "compress_cache": True},
               "8bit-cache-cpu-attention": {"compress_cache": True, "compress_bits": 8, "cpu_cache_compute": True}}


@pytest.mark.parametrize("extra", COMPRESSION.values(), ids=COMPRESSION.keys())
@pytest.mark.parametrize("percent", [(100, 0, 100, 0), (30, 30, 30, 30), (0, 0, 0, 0), (0, 100, 0, 100)])
def test_plan_matches_measured_weights_and_cache(tmp_path, percent, extra):
    """Weights and KV cache bytes per tier (compressed sizes when compressed) are predicted exactly; measured peaks
    stay within the plan."""
    cfg = OPT_SIZES["opt-125m"]
    cfg = type(cfg)(**{**cfg.__dict__, "num_layers": 2, "name": "opt-125m-2l"})
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=percent[0], w_cpu_percent=percent[1],
                    cache_gpu_percent=percent[2], cache_cpu_percent=percent[3], **extra)
    layers = model_layers(cfg)
    plan = plan_bytes(cfg, layers, policy, torch.bfloat16, torch.device("cpu"), prompt_len=16, gen_len=4)
    engine = StageEngine(cfg, layers, policy, DummyWeights(), torch.device("cpu"), torch.bfloat16, str(tmp_path))
    try:
        block = BlockRun(0, [Sequence(list(range(4, 20)), 4) for _ in range(4)], 2, 1, (2,), ignore_eos=True)
        engine.start_block(0, block.batch_sizes, block.capacity)
        assert {t: sum(h.nbytes(t) for h in engine.homes) for t in Tier} == plan.weights
        cached = {t: 0 for t in Tier}
        for home in engine.blocks[0].caches.values():
            for piece in home.pieces:
                for stored in (piece.k, piece.v):
                    cached[piece.tier] += stored.nbytes
        assert cached == plan.cache
        while not block.done:
            logits = engine.step(0, [BatchInput(t, v) for t, v in zip(block.tokens, block.valid)])
            block.advance([x.argmax(-1) for x in logits])
        engine.end_block(0)
        peaks = engine.tiers.peak_bytes()
        for tier in (Tier.GPU, Tier.CPU, Tier.DISK):
            assert peaks[tier.value] <= plan.total(tier), (tier, peaks, plan.as_dict())
            assert peaks[tier.value] >= plan.weights[tier] + plan.cache[tier]
    finally:
        engine.close()
    assert not any(tmp_path.iterdir())


def test_workspace_counts_a_decode_step_over_the_whole_block():
    """A decode step computes a layer for all the block's batches at once (StageEngine._decode_layer): with short
    prompts and many batches its rows and float32 logits outgrow one batch's prefill workspace."""
    cfg = config_by_name("opt-1.3b")
    one_batch = workspace_bytes(cfg, 8, 4, 36, 4, 1)
    merged = workspace_bytes(cfg, 8, 4, 36, 4, 64)  # 512 rows at decode against 32 tokens of one batch's prefill
    assert merged == 512 * (6 * 2048 + 8192) * 4 + 2 * 512 * cfg.vocab_size * 4 > one_batch
    assert workspace_bytes(cfg, 8, 512, 544, 4, 4) == workspace_bytes(cfg, 8, 512, 544, 4, 1)  # prefill dominates
