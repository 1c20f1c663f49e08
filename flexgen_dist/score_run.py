"""One scoring run: the log-likelihood of given token sequences (batch scoring, held-out perplexity) through the same
stages, placement policy and budgets as a generation run: one prefill step per block, then `decode_tokens`
teacher-forced decode steps (scoring.py).

Records are `{"id", "tokens", "nll", "perplexity"}`: `tokens` counts the scored tokens (2..n: the first one has no
prefix), `nll` is their summed negative log-likelihood in nats. The summary's `perplexity` is the corpus figure,
exp(sum nll / sum tokens), over the sequences this run scored.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexgen_dist.base.devices import dtype_name, resolve_device, resolve_dtype
from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.scoring import ScoreBlock, ScoredSequence, ScoreRow, head_rows, score_rows
from flexgen_dist.io.model_source import ModelSource, resolve_model
from flexgen_dist.io.outputs import ResultWriter, read_done_ids
from flexgen_dist.io.prompts import Request
from flexgen_dist.models.family import ModelConfig
from flexgen_dist.observability.progress import progress
from flexgen_dist.run import StagePlan, make_executor, plan_stages, prompt_ids, resource_summary
from flexgen_dist.run_config import RunConfig
from flexgen_dist.runtime.coordinator import run_blocks

_LOGITS_COPIES = 2  # the last stage holds a chunk of float32 logits and their log-softmax at once (head_rows)


def _sequences(requests: list[Request], source: ModelSource, decode_tokens: int) -> list[tuple[Request, ScoredSequence]]:
    """Token ids to score; a prompt's `max_new_tokens` means nothing here and is ignored."""
    cfg, out = source.config, []
    for r in requests:
        ids = prompt_ids(r, source)
        if len(ids) < 2:
            raise UserError(f"prompt {r.id}: scoring needs at least 2 tokens (the first is only context), got {len(ids)}")
        if len(ids) <= decode_tokens:
            raise UserError(f"prompt {r.id}: --decode-tokens {decode_tokens} needs sequences longer than that, "
                            f"got {len(ids)} tokens")
        if len(ids) > cfg.max_positions:
            raise UserError(f"prompt {r.id}: {len(ids)} tokens exceed the model's {cfg.max_positions} positions")
        out.append((r, ScoredSequence(ids)))
    return out


def _record(request: Request, seq: ScoredSequence) -> dict:
    return {"id": request.id, "tokens": seq.scored_tokens, "nll": seq.nll, "perplexity": seq.perplexity}


def score(run: RunConfig, requests: list[Request], decode_tokens: int = 0) -> dict:
    """Score every request; return the summary. Raises UserError for bad input before any heavy work.
    `decode_tokens`: score each sequence's last N tokens through decode steps, which read the (compressed) KV cache."""
    if decode_tokens < 0:
        raise UserError(f"--decode-tokens must be >= 0, got {decode_tokens}")
    check_scoring_policy(run)
    device = resolve_device(run.device)
    dtype = resolve_dtype(run.dtype, device)
    source = resolve_model(run.model, run.dummy_weights, run.sampling.seed)
    work = _sequences(requests, source, decode_tokens)
    skipped = 0
    if run.output:
        done = read_done_ids(run.output)
        skipped = sum(r.id in done for r, _ in work)
        work = [(r, s) for r, s in work if r.id not in done]
    sequences = [s for _, s in work]
    plan = plan_scoring(run, source.config, dtype, device, sequences, decode_tokens)
    with contextlib.ExitStack() as stack:
        # Open the output first: an unwritable path fails before minutes of weight loading.
        writer = stack.enter_context(ResultWriter(run.output)) if run.output else None

        def scored(indices: list[int]) -> None:
            records = [_record(*work[i]) for i in indices]
            if writer is not None:
                writer.write_many(records)
            else:
                for rec in records:
                    print(json.dumps(rec), flush=True)

        summary = run_scoring(run, source.config, plan, sequences, scored)
    return {**summary, "decode_tokens": decode_tokens, "skipped": skipped}


def check_scoring_policy(run: RunConfig) -> None:
    """Scoring runs a fixed Policy (--policy auto plans generation only)."""
    if not isinstance(run.policy, Policy):
        raise UserError("--policy auto is not available for scoring (score, eval's log-likelihood requests) yet: "
                        "its cost model covers generation; give --percent and batch flags or a policy YAML, e.g. one "
                        "written by `flexgen-dist policy`")


@dataclass(frozen=True)
class ScoringPlan:
    stages: StagePlan
    rows: tuple[ScoreRow, ...]  # what the blocks feed: every sequence, in rows (engine.scoring.score_rows)
    decode_tokens: int  # of each sequence, scored through teacher-forced decode steps (ScoreBlock)


def plan_scoring(run: RunConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 sequences: list[ScoredSequence], decode_tokens: int = 0) -> ScoringPlan:
    """The rows and stages for scoring `sequences` (run.policy a fixed Policy: check_scoring_policy), checked against
    the budgets before any loading; the last stage's workspace holds a GPU batch's logits of the positions it scores.
    Blocks keep a KV cache only to score `decode_tokens` decode steps (engine.scoring.ScoreBlock).

    Sequences that start alike share rows (a multiple-choice document's context fed once), unless decode steps score
    them (a decode step feeds a row one token). A shared row may be as wide as the model's positions; where the
    budgets cannot hold a GPU batch of those rows, their activations and their logits, rows are cut to the widest
    sequence's width and scored positions, which plans what the sequences alone would."""
    share = decode_tokens == 0
    rows = score_rows(sequences, cfg.hidden_size, cfg.max_positions, share=share)
    try:
        return ScoringPlan(_plan_rows(run, cfg, dtype, device, rows, decode_tokens), tuple(rows), decode_tokens)
    except UserError:
        if not any(r.prefix for r in rows):
            raise
    rows = score_rows(sequences, cfg.hidden_size, max(len(s.input_ids) for s in sequences),
                      max(s.logit_columns for s in sequences), share=share)
    return ScoringPlan(_plan_rows(run, cfg, dtype, device, rows, decode_tokens), tuple(rows), decode_tokens)


def _plan_rows(run: RunConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, rows: list[ScoreRow],
               decode_tokens: int) -> StagePlan:
    prompt_len = max((len(r.input_ids) for r in rows), default=1)
    columns = max((r.logit_columns for r in rows), default=1)
    # The head computes the logits of head_rows rows at a time (engine.scoring.HEAD_CHUNK_POSITIONS).
    logits_bytes = _LOGITS_COPIES * min(run.policy.gpu_batch_size, head_rows(columns)) * columns * cfg.vocab_size * 4
    return plan_stages(run, cfg, dtype, device, prompt_len, gen_len=0, head_workspace=logits_bytes,
                       kv_cache=decode_tokens > 0, head_positions=columns)


def run_scoring(run: RunConfig, cfg: ModelConfig, plan: ScoringPlan, sequences: list[ScoredSequence],
                on_scored: Callable[[list[int]], None] | None = None, label: str = "score") -> dict:
    """Score `sequences` in place (their `nll` and `greedy`) through the planned stages and rows, similar widths
    sharing a block; `on_scored(indices)` as each block finishes, with the indices into `sequences` it held.
    `label`: the progress bar's. -> the summary (corpus perplexity, throughput, resources, policy)."""
    policy, rows, stages = run.policy, plan.rows, plan.stages
    # Similar widths share a block: less padding computed.
    order = sorted(rows, key=lambda r: len(r.input_ids), reverse=True)
    groups = [order[i : i + policy.block_size] for i in range(0, len(order), policy.block_size)]
    device = resolve_device(run.device)
    fed = sum(len(r.input_ids) for r in rows)
    summary: dict = {"model": cfg.name, "device": device.type, "dtype": dtype_name(resolve_dtype(run.dtype, device)),
                     "stages": run.stages, "executor": run.executor_name, "sequences": len(sequences),
                     "rows": len(rows), "prompt_tokens": fed,
                     # Fed once for several sequences (a shared context): tokens a row each would have computed again.
                     "shared_tokens_saved": sum(len(s.input_ids) for s in sequences) - fed,
                     "scored_tokens": sum(s.scored_tokens for s in sequences)}
    stage_stats: list[dict] = []
    total_s = 0.0
    with contextlib.ExitStack() as stack:
        if groups:
            load_start = time.perf_counter()
            executor = make_executor(run)
            stack.callback(executor.shutdown)  # frees tiers, deletes offload files, stops what the run started
            executor.start(stages.specs)
            summary["load_s"] = time.perf_counter() - load_start
            bar = stack.enter_context(progress(len(sequences), len(groups), run.progress, label))
            blocks = [ScoreBlock(i, g, policy.gpu_batch_size, cfg.pad_token_id, plan.decode_tokens)
                      for i, g in enumerate(groups)]

            def finished(block: ScoreBlock) -> None:
                if on_scored is not None:
                    on_scored([i for row in block.rows for i in row.indices])
                if bar is not None:
                    bar.step_done(sum(len(r.input_ids) for r in block.rows))
                    bar.block_done(len(block.sequences))

            total_s = run_blocks(executor, iter(blocks), lambda block: block.head_task,
                                 max_in_flight=stages.blocks_in_flight,
                                 on_block_done=finished).total_s
            stage_stats = executor.stats()
    nll = sum(s.nll for s in sequences)
    tokens = summary["scored_tokens"]
    summary.update(nll=nll, perplexity=math.exp(nll / tokens) if tokens else None, total_s=total_s,
                   scoring_throughput_tok_s=summary["prompt_tokens"] / total_s if total_s else 0.0)
    summary.update(resource_summary(stages, stage_stats))
    summary["policy"] = policy.to_dict()
    return summary
