"""Sequences that start with the same unscored tokens (lm-eval's multiple-choice requests: one context, a continuation
per choice) share a scoring row: the context fed once, each continuation attending to it and to itself at the
positions it would have alone. Each sequence's log-likelihood and greediness equal HF's on that sequence by itself,
for OPT's learned positions and Llama's rotary ones, left padded among rows of other widths."""

from __future__ import annotations

import random

import pytest
import torch
from hf_oracle import hf_log_softmax

from flexgen_dist.engine import scoring
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.scoring import HEAD_CHUNK_POSITIONS, ScoredSequence, score_rows
from flexgen_dist.io.model_source import model_config
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.memory.tiers import Tier
from flexgen_dist.models.attention import attention_mask, position_ids
from flexgen_dist.models.likelihood import NOT_SCORED
from flexgen_dist.run_config import RunConfig
from flexgen_dist.runtime import worker
from flexgen_dist.score_run import plan_scoring, run_scoring

REL_TOL = 1e-4


def _request(context: list[int], continuation: list[int]) -> ScoredSequence:
    """As evaluation.windows.continuation_window makes one: all but the last token fed, the continuation scored."""
    return ScoredSequence((context + continuation)[:-1], targets=list(continuation))


def test_a_segment_sees_the_prefix_and_itself_at_its_own_positions():
    # One left-padding slot, a prefix of 2, then two sequences' own tokens (2 and 1).
    valid = torch.tensor([[False, True, True, True, True, True]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 2]])
    mask = attention_mask(valid, 6, segments)[0, 0]
    assert mask.int().tolist() == [[1, 0, 0, 0, 0, 0],  # padding sees itself only
                                   [0, 1, 0, 0, 0, 0],
                                   [0, 1, 1, 0, 0, 0],
                                   [0, 1, 1, 1, 0, 0],
                                   [0, 1, 1, 1, 1, 0],
                                   [0, 1, 1, 0, 0, 1]]  # the second sequence skips the first's tokens
    assert position_ids(valid, 6, segments).tolist() == [[0, 0, 1, 2, 3, 2]]
    assert position_ids(valid, 2, segments).tolist() == [[3, 2]]  # the last two positions' only


def test_rows_share_a_whole_unscored_beginning_only():
    context = [2, 10, 11, 12]
    choices = [_request(context, [20, 21]), _request(context, [30]), _request(context, [40, 41, 42])]
    other = _request([2, 10, 14, 12], [20, 21])  # starts alike, but not all its unscored tokens are the same
    # Only its last context token differs, which is each continuation's own first fed token: it shares the row.
    sibling = _request([2, 10, 11, 13], [50])
    whole = ScoredSequence(context + [20])  # every next token scored: nothing unscored to share
    sequences = [choices[0], other, choices[1], whole, choices[2], sibling]
    rows = {row.indices: row for row in score_rows(sequences, hidden_size=64, max_width=64)}
    assert sorted(rows) == [(0, 2, 4, 5), (1,), (3,)]
    shared = rows[(0, 2, 4, 5)]
    assert shared.prefix == 3  # the context but its last token, whose logits predict each continuation's first
    assert shared.input_ids == [2, 10, 11, 12, 20, 12, 12, 40, 41, 13]
    assert shared.segments == [0, 0, 0, 1, 1, 2, 3, 3, 3, 4]
    assert shared.position_targets() == [NOT_SCORED] * 3 + [20, 21, 30, 40, 41, 42, 50]
    assert shared.logit_columns == 7
    assert rows[(1,)].prefix == 0 and rows[(1,)].segments == [1] * 5 and rows[(1,)].logit_columns == 2
    assert rows[(3,)].logit_columns == 5
    # A row holds at most max_width tokens: the third choice starts a row of its own, which shares nothing.
    narrow = {row.indices: row.prefix for row in score_rows(sequences, hidden_size=64, max_width=7)}
    assert narrow == {(0, 2): 3, (4, 5): 3, (1,): 0, (3,): 0}
    assert all(len(row.sequences) == 1 for row in score_rows(sequences, 64, 64, share=False))


def test_a_row_is_shared_only_where_it_computes_less():
    """Sharing saves the prefix's per-token work and widens the row's attention (quadratic in its width): a long
    context shares with short choices, but one token (BOS) does not bring long continuations of different two-token
    contexts together (their prefix is the BOS alone: each context's last token is fed with its continuation)."""
    rng = random.Random(2)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(4, 500) for _ in range(n)]

    context = [2] + tokens(100)
    choices = [_request(context, tokens(40)) for _ in range(4)]
    assert [len(r.sequences) for r in score_rows(choices, hidden_size=768, max_width=2048)] == [4]
    short_contexts = [_request([2, t], tokens(300)) for t in tokens(6)]
    assert [len(r.sequences) for r in score_rows(short_contexts, hidden_size=768, max_width=2048)] == [1] * 6
    # One token of BOS before continuations of 2 tokens: the row's attention grows less than the work saved.
    assert [len(r.sequences) for r in score_rows([_request([2, t], [5, 6]) for t in tokens(6)], 768, 2048)] == [6]


@pytest.mark.parametrize("model,chunk", [("opt_preln_dir", HEAD_CHUNK_POSITIONS), ("llama_dir", HEAD_CHUNK_POSITIONS),
                                         ("opt_preln_dir", 7)])
def test_shared_rows_score_each_sequence_as_hf_scores_it_alone(request, monkeypatch, model, chunk):
    """`chunk`: the head's positions at a time; at 7, it computes the logits of about one row at a time."""
    model_dir = request.getfixturevalue(model)
    monkeypatch.setattr(scoring, "HEAD_CHUNK_POSITIONS", chunk)
    heads = []
    scores = worker.target_scores

    def counted(logits, *args):
        heads.append(logits.shape[:2])
        return scores(logits, *args)

    monkeypatch.setattr(worker, "target_scores", counted)
    rng = random.Random(11)
    sequences = []
    for context_len, choices in ((9, 4), (3, 2), (20, 3), (6, 1)):
        context = [2] + [rng.randrange(4, 500) for _ in range(context_len - 1)]
        sequences += [_request(context, [rng.randrange(4, 500) for _ in range(rng.randrange(1, 6))])
                      for _ in range(choices)]
    # Half of the last context's choices are its greedy token, so greediness is checked both ways.
    best = int(hf_log_softmax(model_dir, sequences[-1].input_ids[:6])[-1].argmax())
    sequences.append(_request(sequences[-1].input_ids[:6], [best]))
    run = RunConfig(str(model_dir), Policy(gpu_batch_size=2, num_gpu_batches=2), dtype="float32", device="cpu",
                    executor="local", progress=False)
    cfg = model_config(str(model_dir))
    summary = run_scoring(run, cfg, plan_scoring(run, cfg, torch.float32, torch.device("cpu"), sequences), sequences)
    assert summary["rows"] == 4 and summary["shared_tokens_saved"] == (8 * 3 + 2 * 1 + 19 * 2 + 5 * 1)
    greedy = []
    for s in sequences:
        full = s.input_ids + s.targets[-1:]
        logprobs = hf_log_softmax(model_dir, full)[len(full) - 1 - len(s.targets) : len(full) - 1]
        expected = -sum(float(logprobs[i, t]) for i, t in enumerate(s.targets))
        assert s.nll == pytest.approx(expected, rel=REL_TOL)
        assert s.greedy == all(int(logprobs[i].argmax()) == t for i, t in enumerate(s.targets))
        greedy.append(s.greedy)
    assert any(greedy) and not all(greedy)
    assert all(rows == 1 or rows * columns <= chunk for rows, columns in heads)
    assert len(heads) > 2 if chunk == 7 else len(heads) == 2  # one block of 2 GPU batches: a call each, or more


def test_rows_narrow_to_what_lone_sequences_plan_where_the_budget_is_short(opt_preln_dir):
    """A budget that holds the lone sequences' plan but not the shared rows' (wider, with more scored positions):
    the rows are cut to the widest sequence's width and scored positions, and still score as HF does."""
    rng = random.Random(5)
    context = [2] + [rng.randrange(4, 500) for _ in range(9)]
    sequences = [_request(context, [rng.randrange(4, 500) for _ in range(5)]) for _ in range(4)]
    cfg = model_config(str(opt_preln_dir))

    def plan(budget: MemoryBudget):
        run = RunConfig(str(opt_preln_dir), Policy(gpu_batch_size=2, num_gpu_batches=1), dtype="float32",
                        device="cpu", executor="local", progress=False, budget=budget)
        return run, plan_scoring(run, cfg, torch.float32, torch.device("cpu"), sequences)

    _, wide = plan(MemoryBudget())
    assert [len(r.sequences) for r in wide.rows] == [4]
    need = sum(p.total(Tier.GPU) + p.total(Tier.CPU) for p in wide.stages.plans)
    run, narrow = plan(MemoryBudget(gpu=need - 1))
    assert [len(r.sequences) for r in narrow.rows] == [1] * 4  # 5 scored positions each: no two fit in 5 columns
    run_scoring(run, cfg, narrow, sequences)
    for s in sequences:
        logprobs = hf_log_softmax(opt_preln_dir, s.input_ids)[-len(s.targets) :]  # the positions predicting them
        assert s.nll == pytest.approx(-sum(float(logprobs[i, t]) for i, t in enumerate(s.targets)), rel=REL_TOL)
