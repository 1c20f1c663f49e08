"""An offloaded run measured against the disk itself, in one run.

    .venv/bin/python benchmarks/bench_offload.py --offload-dir /tmp/flexgen-bench -- \
        --model opt-6.7b --dummy-weights --synthetic 16 --prompt-len 64 --max-new-tokens 8 \
        --percent 0 0 100 0 100 0 --gpu-batch-size 16 --max-memory gpu=2GiB,cpu=2GiB

Measures `dd iflag=direct` on a scratch file in the offload directory before and after the run, runs
`flexgen-dist generate ARGS` under `/usr/bin/time -v`, and prints one JSON line: the run's summary, the engine's
disk->compute weight streaming bandwidth, dd's, their ratio, and peak RSS against the budgets: of the stage processes
(Ray actors report their own) and of the command's process tree as /usr/bin/time sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def dd_direct_gbps(directory: Path, size_mib: int) -> float:
    scratch = directory / "dd-scratch.bin"
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={scratch}", "bs=16M", f"count={size_mib // 16}", "oflag=direct"],
                       check=True, capture_output=True)
        out = subprocess.run(["dd", f"if={scratch}", "of=/dev/null", "bs=16M", "iflag=direct"],
                             check=True, capture_output=True, text=True).stderr
    finally:
        scratch.unlink(missing_ok=True)
    seconds = float(re.search(r"copied, ([0-9.]+) s", out).group(1))
    return size_mib * 2**20 / seconds / 1e9


def interpreter_baseline_rss() -> int:
    """Peak RSS of a process that only imports the package and torch: what budgets do not cover."""
    out = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", "import flexgen_dist.run"],
                         capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1)) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--offload-dir", required=True)
    p.add_argument("--dd-mib", type=int, default=2048)
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then flexgen-dist generate arguments")
    args = p.parse_args()
    gen_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    directory = Path(args.offload_dir)
    directory.mkdir(parents=True, exist_ok=True)

    dd_before = dd_direct_gbps(directory, args.dd_mib)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "flexgen_dist", "generate", *gen_args,
           "--offload-dir", str(directory), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    dd_after = dd_direct_gbps(directory, args.dd_mib)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    flows = [s["transfers"].get("weights:disk->gpu", {"bytes": 0, "seconds": 0.0}) for s in summary["stage_stats"]]
    stream_gbps = sum(f["bytes"] for f in flows) / max(sum(f["seconds"] for f in flows), 1e-9) / 1e9
    dd = (dd_before + dd_after) / 2
    print(json.dumps({
        "summary": summary,
        "weights_disk_stream_gbps": round(stream_gbps, 3),
        "dd_direct_gbps": {"before": round(dd_before, 3), "after": round(dd_after, 3), "mean": round(dd, 3)},
        "stream_over_dd": round(stream_gbps / dd, 3),
        "stage_peak_rss_bytes": [s["rss"] for s in summary["stage_stats"]],
        "time_v_peak_rss_bytes": peak_rss,
        "interpreter_baseline_rss_bytes": interpreter_baseline_rss(),
        "leftover_offload_files": sorted(str(f) for f in directory.rglob("*") if f.is_file()),
    }))


if __name__ == "__main__":
    main()
