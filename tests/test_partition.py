"""Pipeline partition: contiguous, complete, balanced by cost."""

from __future__ import annotations

import pytest

from flexgen_dist.base.errors import UserError
from flexgen_dist.models.family import config_by_name, model_layers
from flexgen_dist.runtime.partition import layer_cost, partition


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
    (_, streamed_cut), _ = partition(layers, 2)
    (_, resident_cut), _ = partition(layers, 2, embedding_resident=True)
    assert resident_cut > streamed_cut
    costs = [sum(layer_cost(l, embedding_resident=True) for l in part) for part in (layers[:resident_cut], layers[resident_cut:])]
    assert abs(costs[0] - costs[1]) <= max(layer_cost(l) for l in layers[1:-1])  # within one half-layer
