"""Resident throughput, ours vs HF transformers `generate`, on the same synthetic work in one process tree.

    .venv/bin/python launch/bench_resident.py --model opt-1.3b --num-seqs 128 --prompt-len 128 --gen-len 32 \
        --gpu-batch-size 32 --num-gpu-batches 4 --hf-batch-size 32

Each system runs in its own subprocess (so neither inherits the other's memory), one after the other; the last line
is JSON with both summaries and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench_common import add_workload_args, run_generate


def _hf(args: argparse.Namespace) -> dict:
    code = (
        "import json, torch, sys\n"
        "from flexgen_dist.baselines import hf_generate_throughput\n"
        "from flexgen_dist.models.opt import config_by_name\n"
        "from flexgen_dist.prompts import synthetic_requests\n"
        f"cfg = config_by_name({args.model!r})\n"
        f"prompts = [list(r.input_ids) for r in synthetic_requests({args.num_seqs}, {args.prompt_len}, cfg.vocab_size, 0)]\n"
        f"print(json.dumps(hf_generate_throughput(cfg, prompts, {args.gen_len}, {args.hf_batch_size}, torch.{args.dtype})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, num_seqs=128, gpu_batch_size=32, num_gpu_batches=4)
    p.add_argument("--hf-batch-size", type=int, default=32)
    args = p.parse_args()
    ours = run_generate(args)
    hf = _hf(args)
    print(f"ours: {ours['generation_throughput_tok_s']:.1f} tok/s   hf: {hf['generation_throughput_tok_s']:.1f} tok/s",
          file=sys.stderr)
    print(json.dumps({"ours": ours, "hf": hf,
                      "ratio": ours["generation_throughput_tok_s"] / hf["generation_throughput_tok_s"]}))


if __name__ == "__main__":
    main()
