"""Pipeline partition: contiguous, complete, balanced by cost."""

from __future__ import annotations

import pytest

from flexgen_dist.base.errors import UserError
from flexgen_dist.models.family import config_by_name, model_layers
from flexgen_dist.runtime.partition import ResidentWork, embedding_resident, layer_cost, partition, resident_work


@pytest.mark.parametrize("model,stages", [("opt-125m", 1), ("opt-1.3b", 2), ("opt-6.7b", 4), ("opt-30b", 4), ("opt-350m", 3)])
def test_partition_is_contiguous_complete_and_balanced(model, stages):
    layers = model_layers(config_by_name(model))
    ranges = partition(layers, stages)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(layers)
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(stages - 1))
    costs = [sum(layer_cost(l) for l in layers[a:b]) for a, b in ranges]
    biggest_layer = max(layer_cost(l) for l in layers)
    assert max(costs) - min(costs) <= 2 * biggest_layer  # within a layer or two of perfect balance


def test_cost_balance_beats_a_layer_count_split():
    """opt-125m's embedding and head are a large share of its weights: halving the layer count would not balance."""
    layers = model_layers(config_by_name("opt-125m"))

    def imbalance(cut: int) -> int:
        return abs(sum(map(layer_cost, layers[:cut])) - sum(map(layer_cost, layers[cut:])))

    (_, cut), _ = partition(layers, 2)
    assert imbalance(cut) < imbalance(len(layers) // 2)


def test_too_many_stages_is_a_user_error():
    layers = model_layers(config_by_name("opt-125m"))
    with pytest.raises(UserError, match="--stages"):
        partition(layers, len(layers) + 1)
    with pytest.raises(UserError, match="--stages"):
        partition(layers, 0)


def test_a_resident_embedding_is_a_lookup_so_stage_zero_takes_more_layers():
    """A resident table costs only the rows looked up; streamed, its bytes count. opt-1.3b at S=2: the resident cut
    gives stage 0 more of the decoder layers than the streamed one."""
    layers = model_layers(config_by_name("opt-1.3b"))
    work = ResidentWork(positions=95, head_positions=95)  # the head as heavy as its weights: the table alone differs
    (_, streamed_cut), _ = partition(layers, 2)
    (_, resident_cut), _ = partition(layers, 2, work)
    assert resident_cut > streamed_cut
    costs = [sum(layer_cost(l, work) for l in part) for part in (layers[:resident_cut], layers[resident_cut:])]
    assert abs(costs[0] - costs[1]) <= max(layer_cost(l, work) for l in layers[1:-1])  # within one half-layer


def test_a_resident_head_costs_the_positions_it_gives_logits_for():
    """Issue 19's workload (opt-1.3b, 64 x (64 + 32), S=2): the head computes 32 positions a sequence, a decoder layer
    95, so stage 1 takes one MLP more than if the head cost as a streamed layer (measured: stage busy 32.8 and 32.2 s
    against 35.3 and 32.9). Decode-only work (one prompt position) makes the head as heavy as its weights again."""
    layers = model_layers(config_by_name("opt-1.3b"))
    assert partition(layers, 2, resident_work(True, 64, 32)) == [(0, 26), (26, 50)]
    heavy_head = partition(layers, 2, resident_work(True, 1, 256))
    assert heavy_head[0][1] > 26
    assert resident_work(False, 64, 32) is None  # streamed weights: bytes and work per token, as before
    scoring = resident_work(True, 512, 0, head_positions=512)
    assert scoring == ResidentWork(512, 512)


def test_embedding_resident_means_every_weight_on_the_device():
    assert embedding_resident(100) and not embedding_resident(99.5)
