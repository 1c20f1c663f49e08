"""Scoring state of one block: left padding as in generation, each sequence's summed log-likelihood.

The last stage turns logits into summed negative log-likelihoods of known targets (models/likelihood.py) instead
of sampling; `Scoring` is what it needs for that, handed to the stages when the block starts. A sequence's targets are
every next token (`flexgen-dist score`) or the tokens its last positions predict (a continuation, as lm-eval's
log-likelihood requests ask); the head computes logits only from the first position a step scores. By default a
block is one prefill step. With `decode_tokens` N, the last N tokens of every sequence are fed one decode step at a
time (teacher forcing), so their likelihoods come from attention over the stored KV cache, as generated tokens' do:
that is how a compressed cache or sparse decode attention shows up in the figures.

Sequences whose unscored beginnings are the same tokens (lm-eval's multiple-choice requests: one context, one
continuation per choice) share a row (ScoreRow): the context once, then each continuation, each attending to the
context and to itself at the positions it would have alone. A row scores each sequence exactly as its own row would,
and computes its context once instead of once per choice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from flexgen_dist.engine.generation import left_pad
from flexgen_dist.models.likelihood import NOT_SCORED, TargetScores

# The last stage computes a scoring GPU batch's logits for whole rows of about this many scored positions at a time:
# [n, V] float32 logits and their log-softmax are its largest temporaries. Row 18d (opt-1.3b, 16 rows of a document's
# context and 4 choices, up to 214 scored positions a row): 1.4 GB at once, 0.8 GB in chunks of 9 rows. A GEMM of
# 2,048 rows runs at the full rate (an opt-1.3b GEMM on machine B: 169-187 GFLOP/s at 2,048 rows, 162-181 at 512).
HEAD_CHUNK_POSITIONS = 2048


@dataclass(frozen=True, eq=False)
class Scoring:
    """A block's head task when scoring (generation's is its `Decoding`): per GPU batch, the token each position of
    the whole block predicts, [B, T] int64, a step scoring the columns of its query positions; and, when rows hold
    several sequences after a shared prefix, which sequence of its row each position belongs to (ScoreRow.segments),
    which every stage's attention reads too. None: one sequence a row."""

    targets: tuple[torch.Tensor, ...]
    segments: tuple[torch.Tensor, ...] | None = None

    def step_targets(self, valid: list[torch.Tensor],
                     query_lens: list[int]) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
        """Per GPU batch, this step's columns (the last `query_lens[k]` of the `valid[k].shape[1]` positions seen so
        far) from the first one a sequence scores on: only those need logits. -> ([B, n] targets, [B, n] segments or
        None) each, 1 <= n <= query_len."""
        columns = []
        for k, (t, v, query_len) in enumerate(zip(self.targets, valid, query_lens)):
            end = v.shape[1]
            step = t[:, end - query_len : end]
            scored = (step != NOT_SCORED).any(dim=0).nonzero()
            first = end - query_len + (int(scored[0]) if len(scored) else query_len - 1)
            columns.append((t[:, first:end], self.segments[k][:, first:end] if self.segments is not None else None))
        return tuple(columns)

    def sequences_per_row(self, k: int) -> int:
        """The most sequences a row of GPU batch k holds: what TargetScores gives per row."""
        return int(self.segments[k].max()) if self.segments is not None else 1


def head_rows(columns: int) -> int:
    """Rows of `columns` scored positions whose logits the head computes at once (HEAD_CHUNK_POSITIONS)."""
    return max(1, HEAD_CHUNK_POSITIONS // columns)


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


@dataclass(frozen=True, eq=False)
class ScoreRow:
    """One row of a block: a lone sequence (`prefix` 0), or several whose first `prefix` fed tokens are the same and
    unscored, fed once: the prefix, then each sequence's other tokens in turn. `indices`: the sequences' places in the
    list the rows were made from."""

    indices: tuple[int, ...]
    sequences: tuple[ScoredSequence, ...]
    prefix: int = 0

    @property
    def input_ids(self) -> list[int]:
        own = [t for s in self.sequences for t in s.input_ids[self.prefix :]]
        return self.sequences[0].input_ids[: self.prefix] + own

    @property
    def segments(self) -> list[int]:
        """Per fed position: 0 for the shared prefix, i for the i-th sequence's own tokens (from 1)."""
        return [0] * self.prefix + [i for i, s in enumerate(self.sequences, 1) for _ in s.input_ids[self.prefix :]]

    def position_targets(self) -> list[int]:
        return [NOT_SCORED] * self.prefix + [t for s in self.sequences for t in s.position_targets()[self.prefix :]]

    @property
    def logit_columns(self) -> int:
        """Positions whose logits the head computes for this row: from its first scored one to its last."""
        first = self.sequences[0]  # its unscored tokens are the prefix, or (a lone sequence) all the row's
        return len(self.input_ids) - len(first.input_ids) + first.logit_columns


def score_rows(sequences: list[ScoredSequence], hidden_size: int, max_width: int, max_columns: int | None = None,
               share: bool = True) -> list[ScoreRow]:
    """`sequences` as rows: with `share`, those whose fed tokens before their targets are the same (at least one
    token) share rows of at most `max_width` tokens, and of at most `max_columns` scored ones (the head's logits),
    where sharing computes less (_joins); the rest, one a row."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    rows = []
    for i, s in enumerate(sequences):
        unscored = len(s.input_ids) - len(s.targets) if s.targets is not None else 0
        if share and unscored:
            groups[tuple(s.input_ids[:unscored])].append(i)
        else:
            rows.append(ScoreRow((i,), (s,)))
    for prefix, members in groups.items():
        row: list[int] = []
        own_tokens = 0  # the row's tokens after the prefix: all scored
        for i in members:
            own = len(sequences[i].input_ids) - len(prefix)
            width, columns = len(prefix) + own_tokens + own, own_tokens + own
            full = width > max_width or max_columns is not None and columns > max_columns
            if row and (full or not _joins(len(prefix), own_tokens, own, hidden_size)):
                rows.append(_shared_row(sequences, row, len(prefix)))
                row, own_tokens = [], 0
            row.append(i)
            own_tokens += own
        rows.append(_shared_row(sequences, row, len(prefix)))
    return rows


def _joins(prefix: int, row_own: int, own: int, hidden_size: int) -> bool:
    """Whether a sequence of `own` tokens after a shared `prefix` computes less in a row that holds `row_own` tokens
    after it than in a row of its own. It saves the prefix's per-token work, about 24 h^2 FLOPs a token and layer (the
    projections and the MLP); the row's attention, about 4 h S^2 FLOPs for S positions, grows by
    4 h ((W + own)^2 - W^2 - (prefix + own)^2), W = prefix + row_own. So a document's context of 100 tokens is shared
    by its choices of 40 tokens, but requests whose contexts share only a first token (BOS) and continue for 300 tokens
    keep rows of their own."""
    added_attention = 2 * own * row_own - prefix * prefix  # (W + own)^2 - W^2 - (prefix + own)^2
    return 6 * hidden_size * prefix > added_attention  # 24 h^2 prefix > 4 h added_attention, both over 4 h


def _shared_row(sequences: list[ScoredSequence], indices: list[int], prefix: int) -> ScoreRow:
    """The row of `sequences[i]` for i in `indices`, sharing `prefix` tokens; a row of one shares nothing."""
    return ScoreRow(tuple(indices), tuple(sequences[i] for i in indices), prefix if len(indices) > 1 else 0)


class ScoreBlock:
    """Up to gpu_batch_size x num_gpu_batches rows (each sequence longer than `decode_tokens`): a prefill step, then
    `decode_tokens` teacher-forced decode steps (which need rows of one sequence).

    Scored in one prefill (no decode tokens), each GPU batch is padded to its own longest row, not the block's, and
    the block keeps no KV cache (nothing reads it back). lm-eval's multiple-choice requests at opt-125m size, blocks
    of 32x2: padding to the block computed 1.35x the real tokens, to each batch 1.17x."""

    def __init__(self, block_id: int, rows: list[ScoreRow], gpu_batch_size: int, pad_id: int,
                 decode_tokens: int = 0) -> None:
        if decode_tokens and any(row.prefix for row in rows):
            raise ValueError("teacher-forced decode steps score rows of one sequence")
        self.block_id, self.rows, self.decode_tokens = block_id, rows, decode_tokens
        self.batches = [rows[i : i + gpu_batch_size] for i in range(0, len(rows), gpu_batch_size)]
        longest = max(len(r.input_ids) for r in rows)
        # Decode steps feed every batch the same column, so then batches share the block's width.
        self._widths = [max(len(r.input_ids) for r in batch) if not decode_tokens else longest
                        for batch in self.batches]
        self.capacity = longest if decode_tokens else 0  # KV cache positions (0: none)
        self._ids: list[torch.Tensor] = []  # [B, width] per batch, the whole block's tokens
        self._valid: list[torch.Tensor] = []  # [B, width] bool per batch (False = left padding)
        targets, segments = [], []
        for batch, width in zip(self.batches, self._widths):
            ids, valid = left_pad([r.input_ids for r in batch], width, pad_id)
            self._ids.append(ids)
            self._valid.append(valid)
            targets.append(left_pad([r.position_targets() for r in batch], width, NOT_SCORED)[0])
            segments.append(left_pad([r.segments for r in batch], width, 0)[0])
        self.steps_done = 0
        # Segments only where a row shares a prefix: a block of lone sequences keeps the plain causal mask.
        self.head_task = Scoring(tuple(targets), tuple(segments) if any(r.prefix for r in rows) else None)

    @property
    def sequences(self) -> list[ScoredSequence]:
        return [s for row in self.rows for s in row.sequences]

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
        """Add one step's output per batch: the summed NLL of each sequence's positions in it, and their
        greediness."""
        for batch, step in zip(self.batches, scores):
            for row, nll, greedy in zip(batch, step.nll.tolist(), step.greedy.tolist()):
                for s, n, g in zip(row.sequences, nll, greedy):
                    s.nll += n
                    s.greedy = s.greedy and g
        self.steps_done += 1
