"""The pipeline's cost and shape, on identical work: in-process engine vs Ray with 1 stage vs Ray with S stages.

    .venv/bin/python benchmarks/bench_pipeline.py --model opt-1.3b --num-seqs 64 --prompt-len 128 --gen-len 32 \
        --gpu-batch-size 32 --stages 1 2

Each configuration runs `flexgen-dist generate` in its own subprocess (Ray embedded on 127.0.0.1), one after the
other. Prints a table and, last, one JSON line with every summary and the throughput ratios to the in-process run.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench_common import add_workload_args, run_generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, num_seqs=64, gpu_batch_size=32, num_gpu_batches=1)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="Ray stage counts to run")
    args = p.parse_args()
    results = {"local-1": run_generate(args, "--executor", "local", "--stages", "1")}
    for s in args.stages:
        results[f"ray-{s}"] = run_generate(args, "--executor", "ray", "--stages", str(s))
    base = results["local-1"]["generation_throughput_tok_s"]
    print(f"{'run':<10} {'tok/s':>8} {'ratio':>6} {'total_s':>8}  per-stage busy/idle s", file=sys.stderr)
    for name, r in results.items():
        stages = "  ".join(f"s{s['stage']}: {s['busy_s']:.1f}/{s['idle_s']:.1f}" for s in r["stage_stats"])
        print(f"{name:<10} {r['generation_throughput_tok_s']:8.2f} {r['generation_throughput_tok_s'] / base:6.3f} "
              f"{r['total_s']:8.1f}  {stages}", file=sys.stderr)
    print(json.dumps({"results": results,
                      "ratio_to_local": {k: r["generation_throughput_tok_s"] / base for k, r in results.items()}}))


if __name__ == "__main__":
    main()
