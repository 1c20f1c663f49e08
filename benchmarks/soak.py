"""Soak run (issue 7): thousands of prompts through an offloaded Ray run, with the memory of every process sampled.

    .venv/bin/python benchmarks/soak.py --out /tmp/flexgen-soak            # 2,000 prompts, about 3.5 minutes on 2 cores

Builds a tiny random OPT checkpoint (transformers' OPTConfig, save_pretrained), runs `flexgen-dist generate` on it
over synthetic prompts with the Ray executor (an embedded cluster) and a policy that keeps half the weights and half
the KV cache on disk and the rest in CPU memory, and samples the RSS of the driver and of each stage actor (the
processes titled ray::StageWorker under the driver) every second, with the number of results written so far.

Writes OUT/soak-samples.csv (one row per sample and process) and OUT/soak.json (the command, the machine, the run's
summary, the offload files left after it (none expected) and, per process and in total, the mean RSS just after
warm-up against the mean RSS over the last prompts, and their growth). Exits 1 when any of them grew by the threshold
or more, or offload files were left.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

WINDOW = 0.05  # fraction of the prompts each RSS figure averages over


@dataclass(frozen=True)
class Sample:
    t_s: float
    done: int  # results written
    process: str  # "driver" or "stage <pid>"
    pid: int
    rss: int


def build_checkpoint(directory: Path, seed: int) -> Path:
    """A random OPT small enough that the run's own bookkeeping, not compute, dominates the steps."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=4, ffn_dim=512, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=128, do_layer_norm_before=True)
    OPTForCausalLM(config).float().eval().save_pretrained(directory)
    return directory


def generate_command(args: argparse.Namespace, model: Path) -> list[str]:
    return [sys.executable, "-m", "flexgen_dist", "generate", "--model", str(model), "--synthetic", str(args.prompts),
            "--prompt-len", str(args.prompt_len), "--max-new-tokens", str(args.gen_len), "--ignore-eos",
            "--seed", str(args.seed), "--device", "cpu", "--dtype", "float32", "--percent", "0", "50", "0", "50",
            "100", "0", "--gpu-batch-size", str(args.gpu_batch_size), "--num-gpu-batches", "2",
            "--stages", str(args.stages), "--executor", "ray", "--offload-dir", str(args.out / "offload"),
            "--output", str(args.out / "results.jsonl"), "--quiet"]


class LineCounter:
    """Results written so far: newlines in the output file, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


def rss_now(driver: psutil.Process) -> list[tuple[str, int, int]]:
    """(process, pid, RSS) of the driver and of each stage actor among its descendants (the embedded cluster's)."""
    found = [("driver", driver.pid, driver.memory_info().rss)]
    for child in driver.children(recursive=True):
        try:
            if "StageWorker" in " ".join(child.cmdline()):
                found.append((f"stage {child.pid}", child.pid, child.memory_info().rss))
        except psutil.Error:  # gone between the listing and the read
            continue
    return found


def sample_run(cmd: list[str], out: Path, log: Path, interval_s: float) -> tuple[list[Sample], int]:
    """Run `cmd` (stdout and stderr to `log`: Ray's forwarded actor logs would fill a pipe), sampling as it goes;
    returns the samples and the exit status."""
    counter = LineCounter(out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always the embedded cluster
    start = time.monotonic()
    samples: list[Sample] = []
    with open(log, "w") as sink, subprocess.Popen(cmd, stdout=sink, stderr=sink, env=env) as proc:
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            t, done = time.monotonic() - start, counter.count()
            try:
                samples += [Sample(t, done, name, pid, rss) for name, pid, rss in rss_now(driver)]
            except psutil.NoSuchProcess:  # the driver exited between poll and read
                break
            time.sleep(interval_s)
    return samples, proc.returncode


def mean_rss(samples: list[Sample], process: str, lo: int, hi: int) -> float | None:
    values = [s.rss for s in samples if s.process == process and lo <= s.done < hi]
    return sum(values) / len(values) if values else None


def growth(samples: list[Sample], prompts: int, warmup: float) -> dict:
    """Per process and in total: mean RSS over the prompts just after warm-up, over the last prompts, growth in %."""
    warm = (int(prompts * warmup), int(prompts * (warmup + WINDOW)))
    end = (int(prompts * (1 - WINDOW)), prompts)  # the last results written, before the run tears down
    totals: dict[tuple[float, int], int] = {}
    for s in samples:
        totals[s.t_s, s.done] = totals.get((s.t_s, s.done), 0) + s.rss
    every = samples + [Sample(t, done, "total", 0, rss) for (t, done), rss in totals.items()]
    report = {}
    for process in dict.fromkeys(s.process for s in every):
        after_warmup, at_end = mean_rss(every, process, *warm), mean_rss(every, process, *end)
        if after_warmup is None or at_end is None:
            continue  # a stage restarted mid-run, or the run too short to sample both windows
        report[process] = {"rss_after_warmup": round(after_warmup), "rss_at_end": round(at_end),
                           "max_rss": max(s.rss for s in every if s.process == process),
                           "growth_pct": round(100 * (at_end - after_warmup) / after_warmup, 2)}
    return {"warmup_results": list(warm), "end_results": list(end), "processes": report}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
            "python": platform.python_version()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="work directory: checkpoint, results, offload, report")
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--gpu-batch-size", type=int, default=4, help="a block is two GPU batches of this many sequences")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the prompts counted as warm-up (default 0.1)")
    p.add_argument("--threshold", type=float, default=5.0, help="growth in %% that fails the soak (default 5)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").unlink(missing_ok=True)  # a fresh run, not a resumed one
    cmd = generate_command(args, build_checkpoint(args.out / "model", args.seed))
    print(f"soak: {' '.join(cmd)}", file=sys.stderr, flush=True)

    log = args.out / "run.log"
    samples, returncode = sample_run(cmd, args.out / "results.jsonl", log, args.interval)
    lines = log.read_text().strip().splitlines()
    if returncode != 0:
        sys.exit(f"soak: the run failed ({returncode}): " + "\n".join(lines[-20:]))
    with open(args.out / "soak-samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Sample.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    left = [str(f) for f in (args.out / "offload").rglob("*") if f.is_file()]
    report = {"command": cmd, "machine": machine(), "samples": len(samples), "threshold_pct": args.threshold,
              "summary": json.loads(next(line for line in reversed(lines) if line.startswith('{"model"'))),
              "offload_files_left": left, **growth(samples, args.prompts, args.warmup)}
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["processes"], indent=2))
    grown = [name for name, r in report["processes"].items() if r["growth_pct"] >= args.threshold]
    if grown:
        print(f"soak: RSS grew by {args.threshold} % or more after warm-up: {', '.join(grown)}", file=sys.stderr)
    if left:
        print(f"soak: {len(left)} offload files left, e.g. {left[0]}", file=sys.stderr)
    return 1 if grown or left else 0


if __name__ == "__main__":
    sys.exit(main())
