"""The pipeline's cost and shape, on identical work: in-process engine vs Ray with 1 stage vs Ray with S stages.

    .venv/bin/python launch/bench_pipeline.py --model opt-1.3b --num-seqs 64 --prompt-len 128 --gen-len 32 \
        --gpu-batch-size 32 --stages 1 2

Each configuration runs `flexgen-dist generate` in its own subprocess (Ray embedded on 127.0.0.1), one after the
other. Prints a table and, last, one JSON line with every summary and the throughput ratios to the in-process run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run(args: argparse.Namespace, executor: str, stages: int) -> dict:
    cmd = [sys.executable, "-m", "flexgen_dist", "generate", "--model", args.model, "--dummy-weights",
           "--synthetic", str(args.num_seqs), "--prompt-len", str(args.prompt_len), "--max-new-tokens", str(args.gen_len),
           "--ignore-eos", "--gpu-batch-size", str(args.gpu_batch_size), "--num-gpu-batches", str(args.num_gpu_batches),
           "--dtype", args.dtype, "--device", "cpu", "--quiet", "--output", "/dev/null",
           "--executor", executor, "--stages", str(stages)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{executor} S={stages} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-1.3b")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=32)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="Ray stage counts to run")
    args = p.parse_args()
    results = {"local-1": run(args, "local", 1)}
    for s in args.stages:
        results[f"ray-{s}"] = run(args, "ray", s)
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
