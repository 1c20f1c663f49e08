"""What the benchmark drivers share: the synthetic workload's flags, and running `flexgen-dist generate` on it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def add_workload_args(p: argparse.ArgumentParser, num_seqs: int, gpu_batch_size: int, num_gpu_batches: int) -> None:
    p.add_argument("--model", default="opt-1.3b")
    p.add_argument("--num-seqs", type=int, default=num_seqs)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=gpu_batch_size)
    p.add_argument("--num-gpu-batches", type=int, default=num_gpu_batches)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))


def run_generate(args: argparse.Namespace, *extra: str) -> dict:
    """`flexgen-dist generate` on the synthetic workload (dummy weights, EOS ignored) in a subprocess; its summary."""
    cmd = [sys.executable, "-m", "flexgen_dist", "generate", "--model", args.model, "--dummy-weights",
           "--synthetic", str(args.num_seqs), "--prompt-len", str(args.prompt_len), "--max-new-tokens", str(args.gen_len),
           "--ignore-eos", "--gpu-batch-size", str(args.gpu_batch_size), "--num-gpu-batches", str(args.num_gpu_batches),
           "--dtype", args.dtype, "--device", "cpu", "--quiet", "--output", "/dev/null", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(extra) or 'generate'} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
