"""Time and profile the engine's steps on a slice of a real OPT size (dummy weights, resident unless told otherwise), to
see where a prefill or decode step spends its time: the torch profiler's table of operators for one prefill and a few
decode steps.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_step.py --model opt-1.3b --layers 4 --batch 32 --prompt-len 128

`--layers` cuts the model to its first N decoder layers (same shapes, faster to load); `FLEXGEN_CPU_PREPACK=0`
compares with unpacked weights; `--compress-weight`, `--compress-cache`, `--num-gpu-batches` and `--no-overlap` set
the policy's. `--weights-on-disk` and `--cache-on-disk` put them in offload files under `--offload-dir` (the
disk-bound regime); `--no-profile` times the steps without the profiler. The transfer counters of each phase are
printed as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from flexgen_dist.base.devices import resolve_dtype
from flexgen_dist.engine.generation import BlockRun, Sequence
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.stage_engine import BatchInput, StageEngine
from flexgen_dist.io.weights import DummyWeights
from flexgen_dist.memory.host_heap import keep_freed_memory
from flexgen_dist.memory.stats import TransferStats
from flexgen_dist.models.family import ModelConfig, config_by_name, model_layers


def synthetic_block(cfg: ModelConfig, policy: Policy, prompt_len: int, new_tokens: int) -> BlockRun:
    """One block of the policy's size: prompts of `prompt_len` ordinary tokens, `new_tokens` each, EOS ignored."""
    return BlockRun(0, [Sequence([4 + (i + j) % 1000 for j in range(prompt_len)], new_tokens)
                        for i in range(policy.block_size)], policy.gpu_batch_size, cfg.pad_token_id, cfg.eos_token_ids,
                    ignore_eos=True)


def greedy_step(step: Callable[[int, list[BatchInput]], list[torch.Tensor]], block: BlockRun) -> None:
    """Run the block's next step through `step` (block id 0) and feed each row's argmax back."""
    logits = step(0, [BatchInput(t, v) for t, v in zip(block.tokens, block.valid)])
    block.advance([x.argmax(-1) for x in logits])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--num-gpu-batches", type=int, default=1)
    ap.add_argument("--compress-weight", action="store_true")
    ap.add_argument("--compress-cache", action="store_true")
    ap.add_argument("--no-overlap", action="store_true", help="run the lanes' work inline")
    ap.add_argument("--weights-on-disk", action="store_true", help="store every weight in offload files")
    ap.add_argument("--cache-on-disk", action="store_true", help="store the KV cache in offload files")
    ap.add_argument("--offload-dir", default=tempfile.gettempdir(), help="where the offload files go")
    ap.add_argument("--no-profile", action="store_true", help="time the steps only")
    ap.add_argument("--rows", type=int, default=15, help="operators shown per table")
    args = ap.parse_args()
    policy = Policy(gpu_batch_size=args.batch, num_gpu_batches=args.num_gpu_batches, overlap=not args.no_overlap,
                    compress_weight=args.compress_weight, compress_cache=args.compress_cache,
                    **({"w_gpu_percent": 0.0, "w_cpu_percent": 0.0} if args.weights_on_disk else {}),
                    **({"cache_gpu_percent": 0.0, "cache_cpu_percent": 0.0} if args.cache_on_disk else {}))
    device = torch.device("cpu")
    keep_freed_memory()  # as the stage worker does
    cfg = replace(config_by_name(args.model), num_layers=args.layers)
    engine = StageEngine(cfg, model_layers(cfg), policy, DummyWeights(), device, resolve_dtype(None, device),
                         args.offload_dir)
    try:
        for phase in ("warm-up", "measured"):
            block = synthetic_block(cfg, policy, args.prompt_len, args.decode_steps + 1)
            engine.start_block(0, block.batch_sizes, block.capacity)
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) if not args.no_profile else \
                    contextlib.nullcontext() as prof:
                times = []
                while not block.done:
                    start = time.perf_counter()
                    greedy_step(engine.step, block)
                    times.append(time.perf_counter() - start)
            engine.end_block(0)
            stats, engine.tiers.stats = engine.tiers.stats.summary(), TransferStats()  # per phase
            print(f"{phase}: prefill {times[0]:.3f} s, decode steps {', '.join(f'{t:.3f}' for t in times[1:])} s")
        print(json.dumps(stats))
        if prof is not None:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
