"""Cutting the model's engine layers into contiguous pipeline stages of balanced cost (a pure function)."""

from __future__ import annotations

from flexgen_dist.base.errors import UserError
from flexgen_dist.models.layout import LayerSpec


def layer_cost(layer: LayerSpec) -> int:
    """Bytes streamed plus matmul work per token, both proportional to parameter counts: the embedding is a lookup
    (bytes only, plus its projection), every other layer is matmuls over all its weights."""
    if layer.kind == "embed":
        return layer.numel + sum(w.numel for w in layer.weights if w.name == "project_in")
    return 2 * layer.numel


def partition(layers: list[LayerSpec], num_stages: int) -> list[tuple[int, int]]:
    """[start, stop) layer ranges for each stage, contiguous, minimising the most expensive stage."""
    n = len(layers)
    if not 1 <= num_stages <= n:
        raise UserError(f"--stages must be between 1 and {n} (the model's engine layers), got {num_stages}")
    prefix = [0]
    for layer in layers:
        prefix.append(prefix[-1] + layer_cost(layer))
    inf = float("inf")
    # best[s][i]: the smallest possible max-stage cost for the first i layers in s stages; cut[s][i]: where stage s starts
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    ranges, stop = [], n
    for s in range(num_stages, 0, -1):
        ranges.append((cut[s][stop], stop))
        stop = cut[s][stop]
    return ranges[::-1]
