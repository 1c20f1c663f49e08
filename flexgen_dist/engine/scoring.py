"""Scoring state of one block: left padding as in generation, each sequence's summed log-likelihood.

The last stage turns logits into summed negative log-likelihoods of known next tokens (models/likelihood.py) instead
of sampling; `Scoring` is what it needs for that, handed to the stages when the block starts. By default a block is
one prefill step. With `decode_tokens` N, the last N tokens of every sequence are fed one decode step at a time
(teacher forcing), so their likelihoods come from attention over the stored KV cache, as generated tokens' do:
that is how a compressed cache or sparse decode attention shows up in the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexgen_dist.engine.generation import left_pad
from flexgen_dist.models.likelihood import next_token_targets


@dataclass(frozen=True, eq=False)
class Scoring:
    """A block's head task when scoring (generation's is its `Decoding`): per GPU batch, the token each position of
    the whole block predicts, [B, T] int64; a step scores the columns of its query positions."""

    targets: tuple[torch.Tensor, ...]

    def step_targets(self, valid: list[torch.Tensor], query_len: int) -> tuple[torch.Tensor, ...]:
        """This step's columns: the last `query_len` of the `valid.shape[1]` positions seen so far. -> [B, S] each."""
        end = valid[0].shape[1]
        return tuple(t[:, end - query_len : end] for t in self.targets)


@dataclass
class ScoredSequence:
    input_ids: list[int]
    nll: float = 0.0  # summed over tokens 2..n, in nats

    @property
    def scored_tokens(self) -> int:
        return len(self.input_ids) - 1  # the first token has no prefix to be predicted from

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.scored_tokens)


class ScoreBlock:
    """Up to gpu_batch_size x num_gpu_batches sequences (each longer than `decode_tokens`): a prefill step, then
    `decode_tokens` teacher-forced decode steps."""

    def __init__(self, block_id: int, sequences: list[ScoredSequence], gpu_batch_size: int, pad_id: int,
                 decode_tokens: int = 0) -> None:
        self.block_id, self.sequences, self.decode_tokens = block_id, sequences, decode_tokens
        self.batches = [sequences[i : i + gpu_batch_size] for i in range(0, len(sequences), gpu_batch_size)]
        self.capacity = max(len(s.input_ids) for s in sequences)
        self._ids: list[torch.Tensor] = []  # [B, capacity] per batch, the whole block's tokens
        self._valid: list[torch.Tensor] = []  # [B, capacity] bool per batch (False = left padding)
        for batch in self.batches:
            ids, valid = left_pad([s.input_ids for s in batch], self.capacity, pad_id)
            self._ids.append(ids)
            self._valid.append(valid)
        self.steps_done = 0
        self.head_task = Scoring(tuple(next_token_targets(i, v) for i, v in zip(self._ids, self._valid)))

    @property
    def batch_sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    @property
    def done(self) -> bool:
        return self.steps_done > self.decode_tokens

    @property
    def _end(self) -> int:
        """Positions fed once the next step has run: the prefill covers all but the last `decode_tokens`."""
        return self.capacity - self.decode_tokens + self.steps_done

    @property
    def tokens(self) -> list[torch.Tensor]:
        """The next step's input ids per batch: [B, S] for the prefill, [B, 1] for a decode step."""
        start = 0 if self.steps_done == 0 else self._end - 1
        return [ids[:, start : self._end] for ids in self._ids]

    @property
    def valid(self) -> list[torch.Tensor]:
        """[B, T] bool per batch for the next step: every position fed so far, this step's included."""
        return [v[:, : self._end] for v in self._valid]

    def advance(self, nll: list[torch.Tensor]) -> None:
        """Add one step's output, the summed NLL of its positions per sequence ([B] per batch)."""
        for batch, values in zip(self.batches, nll):
            for s, value in zip(batch, values.tolist()):
                s.nll += value
        self.steps_done += 1
