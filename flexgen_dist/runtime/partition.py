"""Cutting the model's engine layers into contiguous pipeline stages of balanced cost (a pure function)."""

from __future__ import annotations

from dataclasses import dataclass

from flexgen_dist.base.errors import UserError
from flexgen_dist.models.layout import LayerSpec


@dataclass(frozen=True)
class ResidentWork:
    """What each layer computes per sequence when every weight stays on the compute device: a decoder layer every
    position of the prompt and of the generation, the LM head only the positions it gives logits for (one per new
    token in generation, the scored ones in scoring)."""

    positions: int
    head_positions: int


def resident_work(resident: bool, prompt_len: int, gen_len: int,
                  head_positions: int | None = None) -> ResidentWork | None:
    """The work a cut is balanced by where every weight is resident (`embedding_resident`); None where weights
    stream (`layer_cost`). `head_positions`: the head's positions per sequence when not one per new token
    (scoring's)."""
    if not resident:
        return None
    return ResidentWork(prompt_len + max(gen_len - 1, 0), gen_len if head_positions is None else head_positions)


def layer_cost(layer: LayerSpec, resident: ResidentWork | None = None) -> int:
    """Streamed weights (`resident` None): each step reads every layer's weights and runs matmuls over all of them,
    bytes plus matmul work per token, both proportional to parameter counts; the embedding costs its table's bytes
    plus its projection's. Resident: matmul work only, per position the layer computes. The head then costs only
    the positions it gives logits for, and the embedding is a lookup plus its projection. Counted as a streamed
    layer, opt-1.3b's head (2 decoder layers of weights) put a whole MLP too many on stage 0 of 2: busy 35.3 s
    against stage 1's 32.9 at 64 x (64 + 32) (issue 19, machine D); priced by its positions, 32.8 against 32.2."""
    projection = sum(w.numel for w in layer.weights if w.name == "project_in")
    if resident is None:
        return layer.numel + projection if layer.kind == "embed" else 2 * layer.numel
    if layer.kind == "embed":
        return resident.positions * projection
    return (resident.head_positions if layer.kind == "head" else resident.positions) * layer.numel


def embedding_resident(weights_on_device_percent: float) -> bool:
    """Whether a policy keeps every weight, the embedding's table included, on the compute device."""
    return weights_on_device_percent >= 100


def partition(layers: list[LayerSpec], num_stages: int,
              resident: ResidentWork | None = None) -> list[tuple[int, int]]:
    """[start, stop) layer ranges for each stage, contiguous, minimising the most expensive stage (`layer_cost`;
    `resident`: the work of a policy that keeps every weight on the device)."""
    n = len(layers)
    if not 1 <= num_stages <= n:
        raise UserError(f"--stages must be between 1 and {n} (the model's engine layers), got {num_stages}")
    prefix = [0]
    for layer in layers:
        prefix.append(prefix[-1] + layer_cost(layer, resident))
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
