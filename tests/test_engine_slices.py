"""The engine runs any contiguous slice of layers (a pipeline stage): chained slices equal the whole model."""

from __future__ import annotations

import pytest
import torch
from engine_steps import greedy_logits

from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.stage_engine import StageEngine
from flexgen_dist.io.weights import DummyWeights, open_checkpoint
from flexgen_dist.models.family import model_layers
from flexgen_dist.models.layout import WeightSpec


@pytest.mark.parametrize("cut", [1, 2, 4, 6])
def test_chained_slices_equal_whole_model(tmp_path, opt_postln_dir, cut):
    cfg, source = open_checkpoint(opt_postln_dir)
    layers = model_layers(cfg)
    policy = Policy(w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=0, cache_cpu_percent=50)
    ids = torch.randint(4, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    valid0 = torch.ones(3, 9, dtype=torch.bool)
    valid0[0, :4] = False  # a left-padded row
    valids = [torch.cat([valid0, torch.ones(3, i, dtype=torch.bool)], 1) for i in range(4)]

    def engine(sl):
        return StageEngine(cfg, sl, policy, source, torch.device("cpu"), torch.float32, str(tmp_path))

    whole = engine(layers)
    first, second = engine(layers[:cut]), engine(layers[cut:])
    try:
        expected = greedy_logits([whole], ids, valids)
        got = greedy_logits([first, second], ids, valids)
        assert not first.has_head and not second.has_embedding
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    finally:
        for e in (whole, first, second):
            e.close()


def test_dummy_weights_any_range_is_the_same_values():
    spec = WeightSpec("w", (3000, 3001), "decoder.layers.0.fc1.weight", "normal")
    source = DummyWeights(seed=7)
    whole = torch.empty(spec.numel, dtype=torch.bfloat16)
    source.read(spec, 0, spec.numel, whole)
    part = torch.empty(5_000_000 - 4_000_000 + 123, dtype=torch.bfloat16)
    source.read(spec, 4_000_000 - 123, 5_000_000, part)
    assert torch.equal(part, whole[4_000_000 - 123 : 5_000_000])
    assert whole.float().std().item() == pytest.approx(0.02, rel=0.05)
    other = torch.empty(spec.numel, dtype=torch.bfloat16)
    DummyWeights(seed=8).read(spec, 0, spec.numel, other)
    assert not torch.equal(whole, other)
