"""A/B two versions of the engine's step in one process: one engine, one block, its decode steps run alternately by
this tree's `StageEngine.step` and by the `step` of another version's engine.py, so both read the same offload files
from the same disk. On the dev VM the disk's speed drifts by 20-30% within minutes, more than most engine changes
move a step; and two engines' files, written one after the other, read at speeds 10-20% apart. Runs in separate
processes, or two engines in one, cannot tell such changes apart.

    git show 239c51b:flexgen_dist/engine.py > /tmp/engine_before.py
    PYTHONPATH=. .venv/bin/python launch/ab_steps.py --before /tmp/engine_before.py --model opt-1.3b --batch 8 \
        --decode-steps 20 --weights disk

`--before` is imported as its own module next to the installed package; its `step` must work on this tree's engine
(the attributes it uses must still exist). Prints each side's decode step times and the median of after / before over
the pairs of adjacent steps.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from flexgen_dist.engine import StageEngine
from flexgen_dist.memory.host_heap import keep_freed_memory
from flexgen_dist.models.layout import model_layers
from flexgen_dist.models.opt import config_by_name
from flexgen_dist.policy import Policy
from flexgen_dist.weights import DummyWeights

from step_common import greedy_step, synthetic_block


def _engine_class(path: str) -> type:
    spec = importlib.util.spec_from_file_location("engine_before", path) if Path(path).is_file() else None
    if spec is None or spec.loader is None:
        sys.exit(f"ab_steps: no engine.py to import at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_before"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module.StageEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="engine.py of the version to compare against")
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--layers", type=int, help="cut the model to its first N decoder layers")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-gpu-batches", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--weights", choices=["gpu", "cpu", "disk"], default="gpu", help="the tier holding every weight")
    ap.add_argument("--cache-on-disk", action="store_true")
    ap.add_argument("--offload-dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    keep_freed_memory()
    cfg = config_by_name(args.model)
    if args.layers:
        cfg = replace(cfg, num_layers=args.layers)
    policy = Policy(gpu_batch_size=args.batch, num_gpu_batches=args.num_gpu_batches,
                    w_gpu_percent=100.0 * (args.weights == "gpu"), w_cpu_percent=100.0 * (args.weights == "cpu"),
                    **({"cache_gpu_percent": 0.0, "cache_cpu_percent": 0.0} if args.cache_on_disk else {}))
    before_step = _engine_class(args.before).step
    engine = StageEngine(cfg, model_layers(cfg), policy, DummyWeights(), torch.device("cpu"), torch.bfloat16,
                         args.offload_dir)
    times: dict[str, list[float]] = {"before": [], "after": []}
    try:
        block = synthetic_block(cfg, policy, args.prompt_len, 2 * args.decode_steps + 1)
        engine.start_block(0, block.batch_sizes, block.capacity)
        with torch.no_grad():
            for step in range(2 * args.decode_steps + 1):
                # Pairs of steps in the order AB BA AB ...: neither side always runs first.
                name = "before" if step % 4 in (0, 1) else "after"
                start = time.perf_counter()
                greedy_step(functools.partial(before_step, engine) if name == "before" else engine.step, block)
                if step:  # the prefill is not timed
                    times[name].append(time.perf_counter() - start)
    finally:
        engine.close()
    for name, steps in times.items():
        print(f"{name}: median {statistics.median(steps):.3f} s, steps {' '.join(f'{t:.2f}' for t in steps)}")
    ratios = [a / b for a, b in zip(times["after"], times["before"])]
    print(f"after / before, median over {len(ratios)} pairs of adjacent steps: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
