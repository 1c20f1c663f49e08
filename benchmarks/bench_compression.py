"""Compressed vs uncompressed weights (and optionally KV cache) on the same offloaded work, in one run.

    ../shared/tools/memlimit 4608M -- .venv/bin/python benchmarks/bench_compression.py --model opt-6.7b \
        --num-seqs 16 --prompt-len 64 --gen-len 8 --gpu-batch-size 16 --percent 0 0 100 0 100 0 \
        --max-memory gpu=2GiB,cpu=2GiB --offload-dir /tmp/flexgen-bench --rounds 1

Runs `flexgen-dist generate` on the synthetic workload alternately without and with `--compress-weight` (`--rounds`
times each, alternating so drift hits both), each in its own subprocess, and prints one JSON line per run plus a
summary with the throughput ratio, the bytes each run streamed from disk, and where its time went. Run it under a
memory limit that counts the page cache, or the "disk" tier is really RAM.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench_common import add_workload_args, run_generate


def _streamed(summary: dict, flow: str) -> dict:
    moved = [s["transfers"].get(flow, {"bytes": 0, "seconds": 0.0}) for s in summary["stage_stats"]]
    return {"bytes": sum(f["bytes"] for f in moved), "seconds": round(sum(f["seconds"] for f in moved), 2)}


def _row(name: str, summary: dict) -> dict:
    stage = summary["stage_stats"][0]
    return {"run": name, "tok_s": round(summary["generation_throughput_tok_s"], 4),
            "prefill_s": round(summary["prefill_s"], 1), "decode_s": round(summary["decode_s"], 1),
            "load_s": round(summary["load_s"], 1), "weights_from_disk": _streamed(summary, "weights:disk->gpu"),
            "dequantize": _streamed(summary, "dequantize:gpu->gpu"), "wait_s": stage["wait_s"],
            "peak_bytes": summary["peak_bytes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, num_seqs=16, gpu_batch_size=16, num_gpu_batches=1)
    p.add_argument("--percent", nargs=6, default=["0", "0", "100", "0", "100", "0"])
    p.add_argument("--max-memory", default="gpu=2GiB,cpu=2GiB")
    p.add_argument("--offload-dir", required=True)
    p.add_argument("--compress-cache", action="store_true", help="compress the KV cache too in the compressed runs")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    common = ["--percent", *args.percent, "--max-memory", args.max_memory, "--offload-dir", args.offload_dir]
    variants = {"uncompressed": [], "4-bit weights" + (" + cache" if args.compress_cache else ""):
                ["--compress-weight", *(["--compress-cache"] if args.compress_cache else [])]}
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, flags in variants.items():
            row = _row(name, run_generate(args, *common, *flags))
            rows[name].append(row)
            print(json.dumps(row), flush=True)
    tok_s = {name: statistics.mean(r["tok_s"] for r in runs) for name, runs in rows.items()}
    plain, packed = tok_s.values()
    print(json.dumps({"mean_tok_s": tok_s, "compressed_over_plain": round(packed / plain, 3)}))


if __name__ == "__main__":
    main()
