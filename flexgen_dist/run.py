"""One generation run: validate everything, check budgets, load the engine, generate block by block, write results.

The CLI maps flags onto `RunConfig`; this module knows nothing about argparse.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass

import torch

from flexgen_dist.engine import StageEngine
from flexgen_dist.errors import UserError
from flexgen_dist.generation import Sampling, Sequence, run_block
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.memory.plan import check_budget, plan_bytes
from flexgen_dist.memory.tiers import Tier, ensure_offload_root
from flexgen_dist.model_source import ModelSource, resolve_model
from flexgen_dist.models.layout import model_layers
from flexgen_dist.outputs import ResultWriter, read_done_ids
from flexgen_dist.policy import Policy
from flexgen_dist.prompts import Request

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class RunConfig:
    model: str
    policy: Policy
    dummy_weights: bool = False
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: float16 on cuda, bfloat16 on cpu
    budget: MemoryBudget = MemoryBudget()
    offload_dir: str | None = None
    output: str | None = None
    progress: bool = True


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.bfloat16  # bf16 matmuls are fast on AMX CPUs
    return DTYPES[name]


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
    prompt_len = max((len(s.prompt_ids) for _, s in work), default=1)
    gen_len = max((s.max_new_tokens for _, s in work), default=1)
    plan = plan_bytes(cfg, layers, policy, dtype, device, prompt_len, gen_len)
    check_budget(plan, run.budget)
    if plan.total(Tier.DISK):
        ensure_offload_root(run.offload_dir)

    # Similar lengths share a block: less padding computed and cached.
    work.sort(key=lambda rs: len(rs[1].prompt_ids), reverse=True)
    summary = {"model": cfg.name, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
               "sequences": len(work), "generated_tokens": 0, "prompt_tokens": sum(len(s.prompt_ids) for _, s in work),
               "prefill_s": 0.0, "decode_s": 0.0}
    generator = torch.Generator().manual_seed(run.sampling.seed)
    engine = None
    with contextlib.ExitStack() as stack:
        # Open the output first: an unwritable path fails before minutes of weight loading.
        writer = stack.enter_context(ResultWriter(run.output)) if run.output else None
        load_start = time.perf_counter()
        engine = StageEngine(cfg, layers, policy, source.weights, device, dtype, run.offload_dir) if work else None
        if engine is not None:
            stack.callback(engine.close)  # frees tiers and deletes offload files, also on errors and Ctrl-C
        summary["load_s"] = time.perf_counter() - load_start
        bar = stack.enter_context(_progress_bar(len(work), run.progress))
        for i in range(0, len(work), policy.block_size):
            block = work[i : i + policy.block_size]
            timing = run_block(engine, [s for _, s in block], policy.gpu_batch_size, cfg.pad_token_id,
                               cfg.eos_token_id, run.sampling, generator)
            summary["prefill_s"] += timing.prefill_s
            summary["decode_s"] += timing.decode_s
            summary["generated_tokens"] += sum(len(s.output_ids) for _, s in block)
            records = [_record(r, s, source.tokenizer) for r, s in block]
            if writer is not None:
                writer.write_many(records)
            else:
                for rec in records:
                    print(json.dumps(rec, ensure_ascii=False), flush=True)
            if bar is not None:
                bar.update(len(block))
        tier_peaks = engine.tiers.peak_bytes() if engine else {}
        summary.update(engine.tiers.stats.summary() if engine else {})
    total = summary["prefill_s"] + summary["decode_s"]
    summary["total_s"] = total
    summary["generation_throughput_tok_s"] = summary["generated_tokens"] / total if total else 0.0
    summary["peak_bytes"] = {**tier_peaks, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    summary["planned_bytes"] = plan.as_dict()
    summary["policy"] = policy.to_dict()
    return summary
