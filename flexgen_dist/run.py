"""One generation run: validate everything, check budgets, start the stages, stream blocks through them, write results.

The CLI maps flags onto `RunConfig`; this module knows nothing about argparse, and nothing about Ray beyond choosing
the executor.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from collections.abc import Iterator

from flexgen_dist.errors import UserError
from flexgen_dist.generation import BlockRun, Sequence
from flexgen_dist.memory.plan import check_budget, plan_bytes
from flexgen_dist.memory.tiers import TIERS, Tier, ensure_offload_root
from flexgen_dist.model_source import ModelSource, resolve_model
from flexgen_dist.models.layout import model_layers
from flexgen_dist.outputs import ResultWriter, read_done_ids
from flexgen_dist.prompts import Request
from flexgen_dist.run_config import RunConfig, resolve_device, resolve_dtype
from flexgen_dist.runtime.coordinator import run_blocks
from flexgen_dist.runtime.executor import Executor, LocalExecutor
from flexgen_dist.runtime.partition import partition
from flexgen_dist.runtime.worker import StageSpec


def _tokenize(requests: list[Request], source: ModelSource, default_new: int) -> list[tuple[Request, Sequence]]:
    cfg, out = source.config, []
    for r in requests:
        if r.input_ids is not None:
            ids = list(r.input_ids)
        elif source.tokenizer is None:
            raise UserError(f"prompt {r.id}: text prompts need a tokenizer, and {cfg.name} has none; give input_ids")
        else:
            ids = list(source.tokenizer(r.prompt).input_ids)
        bad = [i for i in ids if i >= cfg.vocab_size]
        if bad:
            raise UserError(f"prompt {r.id}: token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
        new = r.max_new_tokens or default_new
        if len(ids) + new > cfg.max_positions:
            raise UserError(f"prompt {r.id}: {len(ids)} prompt tokens + {new} new tokens exceed the model's "
                            f"{cfg.max_positions} positions")
        out.append((r, Sequence(ids, new)))
    return out


def _record(request: Request, seq: Sequence, tokenizer) -> dict:
    record = {"id": request.id, "input_ids": seq.prompt_ids, "output_ids": seq.output_ids}
    if tokenizer is not None:
        record["text"] = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    record["finish_reason"] = seq.finish_reason
    return record


def _progress_bar(total: int, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, unit="seq", desc="generate", file=sys.stderr, dynamic_ncols=True)


def make_executor(run: RunConfig, specs: list[StageSpec]) -> Executor:
    if run.executor == "local":
        return LocalExecutor(specs)
    from flexgen_dist.runtime.ray_executor import RayExecutor

    return RayExecutor(specs, run.ray_address, run.placement_strategy)


def generate(run: RunConfig, requests: list[Request]) -> dict:
    """Run everything; return the summary. Raises UserError for bad input before any heavy work."""
    if run.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {run.max_new_tokens}")
    device = resolve_device(run.device)
    dtype = resolve_dtype(run.dtype, device)
    source = resolve_model(run.model, run.dummy_weights, run.sampling.seed)
    cfg, policy = source.config, run.policy
    work = _tokenize(requests, source, run.max_new_tokens)
    if run.output:
        done = read_done_ids(run.output)
        work = [(r, s) for r, s in work if r.id not in done]
    layers = model_layers(cfg)
    ranges = partition(layers, run.stages)
    prompt_len = max((len(s.prompt_ids) for _, s in work), default=1)
    gen_len = max((s.max_new_tokens for _, s in work), default=1)
    # Each stage holds the KV cache of every block in flight (one per stage) on its own device, CPU and disk.
    plans = [plan_bytes(cfg, layers[a:b], policy, dtype, device, prompt_len, gen_len, blocks_in_flight=run.stages)
             for a, b in ranges]
    for plan in plans:
        check_budget(plan, run.budget)
    if any(plan.total(Tier.DISK) for plan in plans):
        ensure_offload_root(run.offload_dir)

    # Similar lengths share a block: less padding computed and cached.
    work.sort(key=lambda rs: len(rs[1].prompt_ids), reverse=True)
    blocks = [work[i : i + policy.block_size] for i in range(0, len(work), policy.block_size)]
    summary = {"model": cfg.name, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
               "stages": run.stages, "executor": run.executor, "sequences": len(work), "generated_tokens": 0,
               "prompt_tokens": sum(len(s.prompt_ids) for _, s in work)}
    specs = [StageSpec(run.model, run.dummy_weights, run.sampling.seed, a, b, policy, run.device, run.dtype,
                       run.offload_dir) for a, b in ranges]
    stage_stats: list[dict] = []
    with contextlib.ExitStack() as stack:
        # Open the output first: an unwritable path fails before minutes of weight loading.
        writer = stack.enter_context(ResultWriter(run.output)) if run.output else None
        timing = None
        if blocks:
            load_start = time.perf_counter()
            executor = make_executor(run, specs)
            stack.callback(executor.shutdown)  # frees tiers, deletes offload files, stops what the run started
            summary["load_s"] = time.perf_counter() - load_start
            bar = stack.enter_context(_progress_bar(len(work), run.progress))

            def block_runs() -> Iterator[BlockRun]:
                for i, block in enumerate(blocks):
                    yield BlockRun(i, [s for _, s in block], policy.gpu_batch_size, cfg.pad_token_id,
                                   cfg.eos_token_id, run.sampling.ignore_eos)

            def finished(block: BlockRun) -> None:
                records = [_record(r, s, source.tokenizer) for r, s in blocks[block.block_id]]
                summary["generated_tokens"] += sum(len(s.output_ids) for s in block.sequences)
                if writer is not None:
                    writer.write_many(records)
                else:
                    for rec in records:
                        print(json.dumps(rec, ensure_ascii=False), flush=True)
                if bar is not None:
                    bar.update(len(block.sequences))

            timing = run_blocks(executor, block_runs(), run.sampling, max_in_flight=run.stages, on_block_done=finished)
            stage_stats = executor.stats()
    total = timing.total_s if timing else 0.0
    summary.update(total_s=total, prefill_s=timing.prefill_s if timing else 0.0,
                   decode_s=timing.decode_s if timing else 0.0,
                   generation_throughput_tok_s=summary["generated_tokens"] / total if total else 0.0)
    peak = {t.value: sum(s["peak_bytes"][t.value] for s in stage_stats) for t in TIERS}
    peak["rss"] = max([s["rss"] for s in stage_stats] + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    summary["peak_bytes"] = peak
    summary["planned_bytes"] = {t.value: sum(p.total(t) for p in plans) for t in TIERS}
    summary["stage_stats"] = [{"stage": i, "layers": list(ranges[i]), **s} for i, s in enumerate(stage_stats)]
    summary["policy"] = policy.to_dict()
    return summary
