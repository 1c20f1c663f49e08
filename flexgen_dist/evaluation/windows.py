"""Log-likelihood requests as sequences to score, cut the way lm-eval's `hf` backend cuts them: pure token lists."""

from __future__ import annotations

from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.scoring import ScoredSequence


def continuation_window(context: list[int], continuation: list[int], max_length: int) -> ScoredSequence:
    """The continuation's tokens scored after the context, left-truncated as HFLM does: of context + continuation,
    the last max_length + 1 tokens, all but the last fed, each continuation token predicted by the position before
    it."""
    if not continuation:
        raise UserError("a log-likelihood request has an empty continuation: nothing to score")
    if len(continuation) > max_length:
        raise UserError(f"a continuation of {len(continuation)} tokens exceeds the model's {max_length} positions")
    tokens = (context + continuation)[-(max_length + 1) :]
    return ScoredSequence(tokens[:-1], targets=list(continuation))


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[ScoredSequence]:
    """A document's disjoint windows for its rolling log-likelihood (lm-eval's, with one token of context for the
    first): every token is scored once, with as much of the document before it as fits."""
    windows = get_rolling_token_windows(token_list=tokens, prefix_token=prefix_token, max_seq_len=max_length,
                                        context_len=1)
    return [continuation_window(*make_disjoint_window(window), max_length) for window in windows]
