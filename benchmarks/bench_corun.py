"""Do co-located pipeline stages slow each other down? Each process holds one stage's share of a model's linear
weights (its own copy, as a stage does) and runs F.linear over them on one thread, with the rows of a decode step
(the GPU batch) or of a prefill (GPU batch x prompt length), for a fixed time: first one process alone, then
`--processes` of them at once. A stage that computes at the same rate alone and in company scales; one that slows
shares something with the others (memory bandwidth, a cache) that one device per stage would not.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_corun.py --model opt-1.3b --dtype float32 --layers 12 \
        --decode-rows 16 --prefill-rows 1024 --seconds 60

Prints one JSON line per measurement: phase, rows, processes, and each process's GFLOP/s."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch
import torch.nn.functional as F

from flexgen_dist.base.devices import DTYPES
from flexgen_dist.models.family import config_by_name


def _stage_share(model: str, layers: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    cfg = config_by_name(model)
    h, f = cfg.hidden_size, cfg.ffn_dim
    g = torch.Generator().manual_seed(seed)
    shapes = [(h, h)] * 4 + [(f, h), (h, f)]  # q, k, v, out, fc1, fc2: a decoder layer's matrices
    return [(torch.randn(o, i, generator=g) * 0.02).to(dtype) for _ in range(layers) for (o, i) in shapes]


def _worker(model: str, layers: int, dtype_name: str, rows: int, seconds: float, seed: int, start, out) -> None:
    torch.set_num_threads(1)
    dtype = DTYPES[dtype_name]
    weights = _stage_share(model, layers, dtype, seed)
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(dtype) for w in weights}
    for w in weights[:6]:  # warm the kernels before the clock starts
        F.linear(inputs[w.shape[1]], w)
    start.wait()  # every process allocated and warm: they compute together from here
    flops, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
            flops += 2 * rows * w.shape[0] * w.shape[1]
    out.put(flops / (time.perf_counter() - began) / 1e9)


def measure(args: argparse.Namespace, rows: int, processes: int) -> list[float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(args.model, args.layers, args.dtype, rows, args.seconds, seed, start, out))
             for seed in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sorted(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    ap.add_argument("--layers", type=int, default=12, help="layers per stage (opt-1.3b at S=2: 12)")
    ap.add_argument("--decode-rows", type=int, default=16, help="a decode step's rows: the GPU batch size")
    ap.add_argument("--prefill-rows", type=int, default=1024, help="a prefill's rows: GPU batch x prompt length")
    ap.add_argument("--processes", type=int, default=2, help="stages computing at once (one core each)")
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    for phase, rows in (("decode", args.decode_rows), ("prefill", args.prefill_rows)):
        for processes in (1, args.processes):
            rates = measure(args, rows, processes)
            print(json.dumps({"phase": phase, "rows": rows, "processes": processes,
                              "gflops_each": [round(r, 2) for r in rates]}), flush=True)


if __name__ == "__main__":
    main()
