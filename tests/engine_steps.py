"""Greedy decoding straight through StageEngines, for the engine-level tests (no coordinator, no sampling)."""
from __future__ import annotations

import torch

from flexgen_dist.engine.stage_engine import BatchInput, StageEngine


def greedy_logits(stages: list[StageEngine], ids: torch.Tensor, valid_steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prefill then decode through chained stages (one GPU batch, block 0), each step's argmax fed back; the logits of
    every step. `valid_steps[t]`: the step's [B, T] mask of real positions."""
    for s in stages:
        s.start_block(0, [ids.shape[0]], valid_steps[-1].shape[1])
    logits, data = [], ids
    for valid in valid_steps:
        x = data
        for s in stages:
            (x,) = s.step(0, [BatchInput(x, valid)])
        logits.append(x)
        data = x.argmax(-1)[:, None]
    return logits
