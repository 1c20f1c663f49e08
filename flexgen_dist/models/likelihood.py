"""Log-likelihood of given tokens under a model's logits: the math of `flexgen-dist score`, pure like opt.py."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

NOT_SCORED = -100  # a target that counts for nothing (left padding, the last position)


def next_token_targets(input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """What each position predicts: the token after it, or NOT_SCORED where there is none or the position is padding.
    input_ids [B, S], valid [B, S] bool (False = left padding) -> [B, S] int64."""
    targets = input_ids.roll(-1, dims=1)
    scored = valid.clone()
    scored[:, -1] = False
    return targets.where(scored, NOT_SCORED)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of each position's target, 0 where it is NOT_SCORED. logits [B, S, V] float32, targets
    [B, S] int64 -> [B, S] float32."""
    b, s, _ = logits.shape
    # flatten keeps the logits a view; cross_entropy gives NOT_SCORED positions exactly 0, whatever their logits.
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=NOT_SCORED, reduction="none")
    return -nll.view(b, s)


class TargetScores(NamedTuple):
    """Per row, per sequence it holds (one, or several after a shared prefix: engine.scoring.ScoreRow): what scoring
    needs of their targets' logits."""

    nll: torch.Tensor  # [B, G] float64: the summed negative log-likelihood (nats) of each sequence's targets
    greedy: torch.Tensor  # [B, G] bool: every target is the most likely token where it is predicted


def target_scores(logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None,
                  sequences: int = 1) -> TargetScores:
    """logits [B, S, V] float32, targets [B, S] int64 (NOT_SCORED: none) -> each row's TargetScores, G = 1; with
    `segments` [B, S] int64 (which sequence of its row each position's target belongs to, from 1; 0: none), G =
    `sequences`, the most a row holds."""
    unscored = targets == NOT_SCORED
    missed = (logits.argmax(dim=-1) != targets) & ~unscored
    nll = -target_logprobs(logits, targets).double()
    if segments is None:
        return TargetScores(nll.sum(dim=1, keepdim=True), ~missed.any(dim=1, keepdim=True))
    sums = nll.new_zeros((nll.shape[0], sequences + 1)).scatter_add_(1, segments, nll)
    misses = segments.new_zeros((nll.shape[0], sequences + 1)).scatter_add_(1, segments, missed.long())
    return TargetScores(sums[:, 1:], misses[:, 1:] == 0)
