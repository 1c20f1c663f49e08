"""Scoring state of one block: left padding as in generation, each sequence's summed log-likelihood.

The last stage turns logits into summed negative log-likelihoods of known targets (models/likelihood.py) instead
of sampling; `Scoring` is what it needs for that, handed to the stages when the block starts. A sequence's targets are
every next token (`flexgen-dist score`) or the tokens its last positions predict (a continuation, as lm-eval's
log-likelihood requests ask); the head computes logits only from the first position a step scores. By default a
block is one prefill step. With `decode_tokens` N, the last N tokens of every sequence are fed one decode step at a
time (teacher forcing), so their likelihoods come from attention over the stored KV cache, as generated tokens' do:
that is how a compressed cache or sparse decode attention shows up in the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexgen_dist.engine.generation import left_pad
from flexgen_dist.models.likelihood import NOT_SCORED, TargetScores


@dataclass(frozen=True, eq=False)
class Scoring:
    """A block's head task when scoring (generation's is its `Decoding`): per GPU batch, the token each position of
    the whole block predicts, [B, T] int64; a step scores the columns of its query positions."""

    targets: tuple[torch.Tensor, ...]

    def step_targets(self, valid: list[torch.Tensor], query_lens: list[int]) -> tuple[torch.Tensor, ...]:
        """Per GPU batch, this step's columns (the last `query_lens[k]` of the `valid[k].shape[1]` positions seen so
        far) from the first one a sequence scores on: only those need logits. -> [B, n] each, 1 <= n <= query_len."""
        columns = []
        for t, v, query_len in zip(self.targets, valid, query_lens):
            end = v.shape[1]
            step = t[:, end - query_len : end]
            scored = (step != NOT_SCORED).any(dim=0).nonzero()
            columns.append(step[:, int(scored[0]) if len(scored) else query_len - 1 :])
        return tuple(columns)


@dataclass
class ScoredSequence:
    input_ids: list[int]  # the tokens fed
    # What the last len(targets) positions predict (a continuation); None: every next token (tokens 2..n are scored).
    targets: list[int] | None = None
    nll: float = 0.0  # summed over the scored tokens, in nats
    greedy: bool = True  # every scored token is the most likely one where it is predicted

    @property
    def scored_tokens(self) -> int:
        # Without targets the first token has no prefix to be predicted from.
        return len(self.input_ids) - 1 if self.targets is None else len(self.targets)

    @property
    def logit_columns(self) -> int:
        """Positions whose logits the head computes for this sequence: from its first scored one to its last."""
        return len(self.input_ids) if self.targets is None else len(self.targets)

    def position_targets(self) -> list[int]:
        """What each fed position predicts (NOT_SCORED: nothing)."""
        if self.targets is None:
            return self.input_ids[1:] + [NOT_SCORED]
        return [NOT_SCORED] * (len(self.input_ids) - len(self.targets)) + self.targets

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.scored_tokens)


class ScoreBlock:
    """Up to gpu_batch_size x num_gpu_batches sequences (each longer than `decode_tokens`): a prefill step, then
    `decode_tokens` teacher-forced decode steps.

    Scored in one prefill (no decode tokens), each GPU batch is padded to its own longest sequence, not the block's,
    and the block keeps no KV cache (nothing reads it back). lm-eval's multiple-choice requests at opt-125m size,
    blocks of 32x2: padding to the block computed 1.35x the real tokens, to each batch 1.17x."""

    def __init__(self, block_id: int, sequences: list[ScoredSequence], gpu_batch_size: int, pad_id: int,
                 decode_tokens: int = 0) -> None:
        self.block_id, self.sequences, self.decode_tokens = block_id, sequences, decode_tokens
        self.batches = [sequences[i : i + gpu_batch_size] for i in range(0, len(sequences), gpu_batch_size)]
        longest = max(len(s.input_ids) for s in sequences)
        # Decode steps feed every batch the same column, so then batches share the block's width.
        self._widths = [max(len(s.input_ids) for s in batch) if not decode_tokens else longest
                        for batch in self.batches]
        self.capacity = longest if decode_tokens else 0  # KV cache positions (0: none)
        self._ids: list[torch.Tensor] = []  # [B, width] per batch, the whole block's tokens
        self._valid: list[torch.Tensor] = []  # [B, width] bool per batch (False = left padding)
        targets = []
        for batch, width in zip(self.batches, self._widths):
            ids, valid = left_pad([s.input_ids for s in batch], width, pad_id)
            self._ids.append(ids)
            self._valid.append(valid)
            targets.append(left_pad([s.position_targets() for s in batch], width, NOT_SCORED)[0])
        self.steps_done = 0
        self.head_task = Scoring(tuple(targets))

    @property
    def batch_sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    @property
    def done(self) -> bool:
        return self.steps_done > self.decode_tokens

    def take_refills(self) -> list:
        return []  # a scoring block's sequences all end together

    def _end(self, k: int) -> int:
        """Positions of GPU batch k fed once the next step has run: the prefill covers all but the last
        `decode_tokens`."""
        return self._widths[k] - self.decode_tokens + self.steps_done

    @property
    def tokens(self) -> list[torch.Tensor]:
        """The next step's input ids per batch: [B, S] for the prefill, [B, 1] for a decode step."""
        return [ids[:, 0 if self.steps_done == 0 else self._end(k) - 1 : self._end(k)] for k, ids in enumerate(self._ids)]

    @property
    def valid(self) -> list[torch.Tensor]:
        """[B, T] bool per batch for the next step: every position fed so far, this step's included."""
        return [v[:, : self._end(k)] for k, v in enumerate(self._valid)]

    def advance(self, scores: list[TargetScores]) -> None:
        """Add one step's output per batch: the summed NLL of its positions per sequence, and their greediness."""
        for batch, step in zip(self.batches, scores):
            for s, nll, greedy in zip(batch, step.nll.tolist(), step.greedy.tolist()):
                s.nll += nll
                s.greedy = s.greedy and greedy
        self.steps_done += 1
