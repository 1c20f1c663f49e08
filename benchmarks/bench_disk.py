"""Disk-tier read bandwidth: DiskTensor.read_rows_into vs `dd iflag=direct` on the same file, cold cache.

Prints one JSON line: ours_gbps, dd_gbps (medians over rounds), ratio (= ours / dd), plus the write bandwidth and the
settings used. Dropping caches needs root ("caches_dropped" says whether it happened; both readers bypass the cache).
Example, from the repo root: PYTHONPATH=. python benchmarks/bench_disk.py --size-gib 1 --dir /tmp
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time

import torch

from flexgen_dist.memory import disk


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def dd_read_gbps(path: str) -> float:
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"],
                         capture_output=True, text=True, check=True).stderr
    nbytes, secs = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out).groups()
    return int(nbytes) / float(secs) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="scratch directory (not inside the repo)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating dd/ours rounds; medians are reported")
    ap.add_argument("--chunk-mib", type=int, default=disk.CHUNK >> 20, help="override disk.CHUNK (tuning)")
    ap.add_argument("--threads", type=int, default=disk.THREADS, help="override disk.THREADS (tuning)")
    args = ap.parse_args()
    disk.CHUNK, disk.THREADS = args.chunk_mib << 20, args.threads
    disk._pool = disk._new_pool()  # apply --threads

    rows = int(args.size_gib * (1 << 30)) // (1 << 20)
    path = os.path.join(args.dir, f"bench_disk_{os.getpid()}.bin")
    t = disk.DiskTensor(path, (rows, 1 << 19), torch.float16)  # 1 MiB rows
    try:
        src = torch.randint(-30000, 30000, t.shape, dtype=torch.int16).view(torch.float16)
        start = time.perf_counter()
        t.write_rows(src)
        os.sync()
        write_gbps = t.nbytes / (time.perf_counter() - start) / 1e9
        dst = disk.aligned_empty(t.shape, t.dtype)
        ours, dd = [], []

        def read_ours() -> None:
            start = time.perf_counter()
            t.read_rows_into(dst)
            ours.append(t.nbytes / (time.perf_counter() - start) / 1e9)

        # The virtual disk's bandwidth drifts over seconds: alternate who goes first and compare medians.
        for r in range(args.rounds):
            for run in (read_ours, lambda: dd.append(dd_read_gbps(path)))[:: 1 if r % 2 else -1]:
                dropped = drop_caches()
                run()
        ours_gbps, dd_gbps = statistics.median(ours), statistics.median(dd)
        print(json.dumps({"ours_gbps": round(ours_gbps, 3), "dd_gbps": round(dd_gbps, 3),
                          "ratio": round(ours_gbps / dd_gbps, 3), "write_gbps": round(write_gbps, 3),
                          "size_gib": args.size_gib, "chunk_mib": args.chunk_mib, "threads": args.threads,
                          "all_ours": [round(x, 3) for x in ours], "all_dd": [round(x, 3) for x in dd],
                          "caches_dropped": dropped,
                          "verified": torch.equal(dst.view(torch.int16), src.view(torch.int16))}))
    finally:
        t.delete()


if __name__ == "__main__":
    main()
