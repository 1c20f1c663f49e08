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


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood (nats) of each row's targets. logits [B, S, V] float32, targets [B, S] int64
    -> [B] float64."""
    return -target_logprobs(logits, targets).double().sum(dim=1)


class TargetScores(NamedTuple):
    """Per row: what scoring needs of its targets' logits."""

    nll: torch.Tensor  # [B] float64: the summed negative log-likelihood (nats) of the row's targets
    greedy: torch.Tensor  # [B] bool: every target is the most likely token where it is predicted


def target_scores(logits: torch.Tensor, targets: torch.Tensor) -> TargetScores:
    """logits [B, S, V] float32, targets [B, S] int64 (NOT_SCORED: none) -> each row's TargetScores."""
    unscored = targets == NOT_SCORED
    greedy = (logits.argmax(dim=-1) == targets) | unscored
    return TargetScores(summed_nll(logits, targets), greedy.all(dim=1))
