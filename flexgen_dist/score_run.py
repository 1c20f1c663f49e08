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

from flexgen_dist.base.devices import dtype_name, resolve_device, resolve_dtype
from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.scoring import ScoreBlock, ScoredSequence
from flexgen_dist.io.model_source import ModelSource, resolve_model
from flexgen_dist.io.outputs import ResultWriter, read_done_ids
from flexgen_dist.io.prompts import Request
from flexgen_dist.observability.progress import progress
from flexgen_dist.run import make_executor, plan_stages, prompt_ids, resource_summary
from flexgen_dist.run_config import RunConfig
from flexgen_dist.runtime.coordinator import run_blocks

_LOGITS_COPIES = 2  # the last stage holds a GPU batch's float32 logits and their log-softmax at once


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
    if not isinstance(run.policy, Policy):
        raise UserError("score: --policy auto is not available for scoring yet (its cost model covers generation); "
                        "give --percent and batch flags or a policy YAML, e.g. one written by `flexgen-dist policy`")
    device = resolve_device(run.device)
    dtype = resolve_dtype(run.dtype, device)
    source = resolve_model(run.model, run.dummy_weights, run.sampling.seed)
    cfg, policy = source.config, run.policy
    work = _sequences(requests, source, decode_tokens)
    skipped = 0
    if run.output:
        done = read_done_ids(run.output)
        skipped = sum(r.id in done for r, _ in work)
        work = [(r, s) for r, s in work if r.id not in done]
    prompt_len = max((len(s.input_ids) for _, s in work), default=1)
    logits_bytes = _LOGITS_COPIES * policy.gpu_batch_size * prompt_len * cfg.vocab_size * 4
    stages = plan_stages(run, cfg, dtype, device, prompt_len, gen_len=0, head_workspace=logits_bytes)

    # Similar lengths share a block: less padding computed.
    work.sort(key=lambda rs: len(rs[1].input_ids), reverse=True)
    groups = [work[i : i + policy.block_size] for i in range(0, len(work), policy.block_size)]
    summary: dict = {"model": cfg.name, "device": device.type, "dtype": dtype_name(dtype),
                     "stages": run.stages, "executor": run.executor, "decode_tokens": decode_tokens,
                     "sequences": len(work), "skipped": skipped,
                     "prompt_tokens": sum(len(s.input_ids) for _, s in work),
                     "scored_tokens": sum(s.scored_tokens for _, s in work)}
    stage_stats: list[dict] = []
    total_s = 0.0
    with contextlib.ExitStack() as stack:
        # Open the output first: an unwritable path fails before minutes of weight loading.
        writer = stack.enter_context(ResultWriter(run.output)) if run.output else None
        if groups:
            load_start = time.perf_counter()
            executor = make_executor(run)
            stack.callback(executor.shutdown)  # frees tiers, deletes offload files, stops what the run started
            executor.start(stages.specs)
            summary["load_s"] = time.perf_counter() - load_start
            bar = stack.enter_context(progress(len(work), len(groups), run.progress, "score"))
            blocks = [ScoreBlock(i, [s for _, s in g], policy.gpu_batch_size, cfg.pad_token_id, decode_tokens)
                      for i, g in enumerate(groups)]

            def finished(block: ScoreBlock) -> None:
                records = [_record(r, s) for r, s in groups[block.block_id]]
                if writer is not None:
                    writer.write_many(records)
                else:
                    for rec in records:
                        print(json.dumps(rec), flush=True)
                if bar is not None:
                    bar.step_done(sum(len(s.input_ids) for s in block.sequences))
                    bar.block_done(len(block.sequences))

            total_s = run_blocks(executor, iter(blocks), lambda block: block.head_task, max_in_flight=run.stages,
                                 on_block_done=finished).total_s
            stage_stats = executor.stats()
    nll = sum(s.nll for _, s in work)
    tokens = summary["scored_tokens"]
    summary.update(nll=nll, perplexity=math.exp(nll / tokens) if tokens else None, total_s=total_s,
                   scoring_throughput_tok_s=summary["prompt_tokens"] / total_s if total_s else 0.0)
    summary.update(resource_summary(stages, stage_stats))
    summary["policy"] = policy.to_dict()
    return summary
