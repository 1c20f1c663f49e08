"""What a block's start and end cost when its KV cache lives in CPU memory on a GPU device: the cache homes of every
layer and GPU batch are made (page-locked for the GPU) and released, block after block, as a stage does. The first
block locks its homes; later ones reuse the buffers the previous block released (memory/page_locked.py); the
engine's close unlocks them. Before the reuse, every block paid a lock at its start and an unlock (after a device
sync) at its end.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_block_turnover.py --model opt-6.7b --gpu-batch-size 16 \
        --num-gpu-batches 4 --capacity 544 --blocks 8

Prints one JSON line per block (start and end seconds, buffers locked and reused so far) and one for the close.
On a machine without CUDA the homes are not locked and the figures only time the allocation."""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from flexgen_dist.base.devices import DTYPES
from flexgen_dist.memory.cache_home import CacheHome
from flexgen_dist.memory.tiers import TierSet
from flexgen_dist.models.family import config_by_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--gpu-batch-size", type=int, default=16)
    ap.add_argument("--num-gpu-batches", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=544, help="cache positions per sequence (prompt + gen)")
    ap.add_argument("--blocks", type=int, default=8)
    args = ap.parse_args()
    cfg = config_by_name(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as offload:
        tiers = TierSet(device, offload)
        for block in range(args.blocks):
            start = time.perf_counter()
            homes = [CacheHome(tiers, args.gpu_batch_size, cfg.num_kv_heads, cfg.head_dim, args.capacity,
                               DTYPES[args.dtype], (0.0, 100.0, 0.0), f"l{j}-b{k}")
                     for j in range(cfg.num_layers) for k in range(args.num_gpu_batches)]
            started = time.perf_counter()
            for home in homes:
                home.release()
            ended = time.perf_counter()
            print(json.dumps({"block": block, "start_s": round(started - start, 4), "end_s": round(ended - started, 4),
                              "cache_gb": round(tiers.peak_bytes()["cpu"] / 1e9, 3), "locks": tiers.page_locked.locks,
                              "reuses": tiers.page_locked.reuses, "device": device.type}), flush=True)
        start = time.perf_counter()
        tiers.close()
        print(json.dumps({"close_s": round(time.perf_counter() - start, 4)}))


if __name__ == "__main__":
    main()
