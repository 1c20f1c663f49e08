"""Validate the cost model and `--policy auto` on this machine (issue 4): run a grid of hand-made policies and the
auto policy under a hard memory limit, and record measured and predicted times side by side.

    python benchmarks/policy_grid.py run --model opt-1.3b --memory 4G --hardware configs/hardware/dev-epyc-2core-bf16.yaml \
        --num-prompts 16 --prompt-len 16 --gen-len 8 --out docs/data/policy-grid-bf16.jsonl
    python benchmarks/policy_grid.py report docs/data/policy-grid-bf16.jsonl --hardware configs/hardware/dev-epyc-2core-bf16.yaml

Each run is `flexgen-dist generate` (dummy weights in --dtype, local executor) under `memlimit MEMORY`, which counts
the page cache, so a disk tier is really read from disk. The grid's policies are what a user would try by hand: for
each block shape, the cache kept in memory where it fits and as much of the weights as the budget leaves (with the
budgets `--policy auto` itself uses), plus a few variants. Lines already in --out are skipped (resume).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from flexgen_dist.base.devices import DTYPES
from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.budget import MemoryBudget, parse_size
from flexgen_dist.models.family import config_by_name, model_layers
from flexgen_dist.policy.cost_model import predict
from flexgen_dist.policy.hardware import HardwareProfile, load_profile
from flexgen_dist.policy.memory_plan import plan_bytes
from flexgen_dist.policy.search import Budgets, resolve_budgets

MEMLIMIT = Path(__file__).resolve().parents[2] / "shared" / "tools" / "memlimit"
SHAPES = ((4, 1), (4, 4), (8, 1), (8, 2), (16, 1))


def _fits(policy: Policy, args, budgets: Budgets) -> bool:
    cfg = config_by_name(args.model)
    plan = plan_bytes(cfg, model_layers(cfg), policy, DTYPES[args.dtype], torch.device("cpu"), args.prompt_len, args.gen_len)
    return budgets.fits(plan) is None


def _filled(shape: Policy, args, budgets: Budgets, weight_share: float = 1.0) -> Policy | None:
    """The cache in memory where it fits (else the fewest heads on disk), then the most weights that fit, in 5%
    steps, scaled by `weight_share`."""
    for cache in range(100, -1, -5):
        for weights in range(100, -1, -5):
            policy = replace(shape, w_gpu_percent=float(weights), w_cpu_percent=0.0, cache_gpu_percent=float(cache),
                             cache_cpu_percent=0.0)
            if _fits(policy, args, budgets):
                if weight_share < 1:
                    policy = replace(policy, w_gpu_percent=float(5 * math.floor(weights * weight_share / 5)))
                return policy
    return None


def grid(args, budgets: Budgets) -> list[tuple[str, Policy]]:
    """Five block shapes with the most weights that fit; then half and none of them in memory; then compression."""
    entries = [(f"b{b}x{k}", Policy(gpu_batch_size=b, num_gpu_batches=k), 1.0) for b, k in SHAPES]
    entries += [(f"b{b}x{k}-half-weights", Policy(gpu_batch_size=b, num_gpu_batches=k), 0.5) for b, k in ((8, 1), (16, 1))]
    entries += [(f"b{b}x{k}-weights-on-disk", Policy(gpu_batch_size=b, num_gpu_batches=k), 0.0)
                for b, k in ((4, 1), (8, 2), (16, 1))]
    entries += [("b16x1-4bit-weights", Policy(gpu_batch_size=16, compress_weight=True), 1.0),
                ("b8x2-4bit-cache", Policy(gpu_batch_size=8, num_gpu_batches=2, compress_cache=True), 1.0)]
    if args.num_prompts < 16:  # the smaller work of the larger model: 4-bit weights on a block it allows
        entries.append(("b8x1-4bit-weights", Policy(gpu_batch_size=8, compress_weight=True), 1.0))
    out = []
    for name, shape, share in entries:
        if shape.block_size <= args.num_prompts:
            policy = _filled(shape, args, budgets, share)
            if policy is not None and policy not in [p for _, p in out]:  # a tight budget makes variants coincide
                out.append((name, policy))
    return out


def _policy_flags(policy: Policy) -> list[str]:
    flags = ["--percent", *(f"{p:g}" for p in (policy.w_gpu_percent, policy.w_cpu_percent, policy.cache_gpu_percent,
                                                policy.cache_cpu_percent, policy.act_gpu_percent, policy.act_cpu_percent)),
             "--gpu-batch-size", str(policy.gpu_batch_size), "--num-gpu-batches", str(policy.num_gpu_batches)]
    return flags + (["--compress-weight"] if policy.compress_weight else []) + \
        (["--compress-cache"] if policy.compress_cache else [])


def _generate(args, policy_flags: list[str]) -> tuple[dict | None, str]:
    cmd = [str(MEMLIMIT), args.memory, "--", sys.executable, "-m", "flexgen_dist", "generate", "--model", args.model,
           "--dummy-weights", "--synthetic", str(args.num_prompts), "--prompt-len", str(args.prompt_len),
           "--max-new-tokens", str(args.gen_len), "--ignore-eos", "--device", "cpu", "--dtype", args.dtype,
           "--executor", "local", "--quiet", "--output", "/dev/null", "--offload-dir", args.offload_dir, *policy_flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    peak = next((line for line in proc.stderr.splitlines() if line.startswith("memlimit: peak")), "")
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), peak


def budgets_under(hardware: HardwareProfile, memory: str) -> Budgets:
    """The budgets `--policy auto` gives itself under `memlimit MEMORY`, where it detects that much RAM (the cgroup
    limit): the grid's policies get the same."""
    limit = parse_size(memory)
    return resolve_budgets(MemoryBudget(), replace(hardware, cpu_memory_bytes=limit, device_memory_bytes=limit))


def run(args) -> None:
    budgets = budgets_under(load_profile(args.hardware), args.memory)
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["model"], r["memory"], r.get("dtype", "float32"), r["name"], r.get("round", 1))
                for r in map(json.loads, out.read_text().splitlines())}
    entries: list[tuple[str, Policy | None]] = list(grid(args, budgets))
    if args.auto:
        entries.append(("auto", None))
    if args.only:
        entries = [e for e in entries if e[0] in args.only.split(",")]
    # Rounds run the entries in turn (round 2 after all of round 1), so a slow spell of the machine lands on
    # several entries once rather than on one entry's every run.
    for round_ in range(1, args.rounds + 1):
        for name, policy in entries:
            if (args.model, args.memory, args.dtype, name, round_) not in done:
                _run_entry(args, name, policy, round_, out)


def _run_entry(args, name: str, policy: Policy | None, round_: int, out: Path) -> None:
    flags = ["--policy", "auto", "--hardware", args.hardware] if policy is None else _policy_flags(policy)
    start = time.time()
    summary, peak = _generate(args, flags)
    record = {"model": args.model, "memory": args.memory, "dtype": args.dtype, "name": name, "round": round_,
              "num_prompts": args.num_prompts,
              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "wall_s": time.time() - start,
              "memlimit": peak}
    if summary is None:
        record["error"] = peak
    else:
        record.update(policy=summary["policy"], total_s=summary["total_s"], prefill_s=summary["prefill_s"],
                      decode_s=summary["decode_s"], throughput_tok_s=summary["generation_throughput_tok_s"],
                      peak_bytes=summary["peak_bytes"], load_s=summary.get("load_s"),
                      search=summary.get("policy_search"),
                      stage={k: summary["stage_stats"][0][k] for k in ("busy_s", "wait_s", "transfers")})
    print(json.dumps(record), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _median_run(group: list[dict]) -> dict:
    """An entry over its rounds: the median total time (and the throughput it gives), with the statistics of the
    run nearest to it; a failed round makes the entry failed."""
    failed = [r for r in group if "error" in r]
    if failed:
        return failed[0]
    median = statistics.median(r["total_s"] for r in group)
    nearest = min(group, key=lambda r: abs(r["total_s"] - median))
    return {**nearest, "total_s": median, "throughput_tok_s": nearest["throughput_tok_s"] * nearest["total_s"] / median,
            "rounds": len(group)}


def report(args) -> None:
    """The docs table: per setting, each policy's measured and predicted time, the error, and the auto policy's
    throughput against the best grid policy's."""
    hardware = load_profile(args.hardware)
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for line in Path(args.results).read_text().splitlines():
        r = json.loads(line)
        runs.setdefault((r["model"], r["memory"], r.get("dtype", "float32"), r["name"]), []).append(r)
    rows = [_median_run(group) for group in runs.values()]
    print("| model | memory | policy | batch x batches | weights gpu/disk % | cache gpu/disk % | measured s | "
          "predicted s | error | error at the run's disk rate | tok/s | peak gpu+cpu GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    within_own_disk = budgets_kept = 0
    per_model: dict[str, list[int]] = {}  # model -> [within ±25%, grid policies]
    settings: dict[tuple[str, str], dict] = {}
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['memory']} | {r['name']} | failed: {r['error']} ||||||||| ")
            continue
        cfg, dtype = config_by_name(r["model"]), DTYPES[r.get("dtype", "float32")]
        policy = Policy(**r["policy"])
        blocks = math.ceil(r["num_prompts"] / policy.block_size)
        predicted = blocks * predict(cfg, model_layers(cfg), policy, hardware, dtype, r["prompt_len"],
                                     r["gen_len"]).block_s
        error = predicted / r["total_s"] - 1
        # The virtual disk's speed wanders from run to run: the same prediction with the rate this run's weight
        # reads achieved separates that from the model's own error.
        disk = r.get("stage", {}).get("transfers", {}).get("weights:disk->gpu")
        own = replace(hardware, disk_read_bytes_per_s=disk["bytes"] / disk["seconds"]) if disk else hardware
        own_error = blocks * predict(cfg, model_layers(cfg), policy, own, dtype, r["prompt_len"],
                                     r["gen_len"]).block_s / r["total_s"] - 1
        if r["name"] != "auto":
            within_own_disk += abs(own_error) <= 0.25
            counts = per_model.setdefault(r["model"], [0, 0])
            counts[0] += abs(error) <= 0.25
            counts[1] += 1
        s = settings.setdefault((r["model"], r["memory"]), {"best": 0.0, "best_name": "", "auto": None})
        held = r["peak_bytes"]["gpu"] + r["peak_bytes"]["cpu"] <= budgets_under(hardware, r["memory"]).shared_memory
        budgets_kept += held
        if r["name"] == "auto":
            s.update(auto=r["throughput_tok_s"], auto_policy=policy, auto_held=held,
                     auto_rounds=r.get("rounds", 1), memlimit=r["memlimit"])
        elif r["throughput_tok_s"] > s["best"]:
            s.update(best=r["throughput_tok_s"], best_name=r["name"], best_policy=policy)
        peak = (r["peak_bytes"]["gpu"] + r["peak_bytes"]["cpu"]) / 2**30
        print(f"| {r['model']} | {r['memory']} | {r['name']} | {policy.gpu_batch_size} x {policy.num_gpu_batches} | "
              f"{policy.w_gpu_percent:g}/{policy.w_disk_percent:g} | {policy.cache_gpu_percent:g}/"
              f"{policy.cache_disk_percent:g} | {r['total_s']:.1f} | {predicted:.1f} | {error:+.0%} | {own_error:+.0%} | "
              f"{r['throughput_tok_s']:.2f} | {peak:.2f} |")
    within, total = (sum(column) for column in zip(*per_model.values())) if per_model else (0, 0)
    print(f"\nPredicted within ±25% of measured: {within} of {total} grid policies ({within / max(total, 1):.0%}); "
          f"at each run's own disk rate: {within_own_disk} of {total}. Per model: "
          + ", ".join(f"{m} {w} of {n}" for m, (w, n) in per_model.items()) + ".\n")
    print(f"Peak gpu + cpu bytes within the budget: {budgets_kept} of {len(rows)} runs.\n")
    print("| model | memory | best grid policy | its tok/s | auto's choice | auto tok/s | auto / best | "
          "auto within budget (memlimit peak) |")
    print("|---|---|---|---|---|---|---|---|")
    for (model, memory), s in settings.items():
        if s["auto"] is None:
            continue
        a = s["auto_policy"]
        same = " (the same policy)" if s.get("best_policy") == a else ""
        choice = (f"{a.gpu_batch_size} x {a.num_gpu_batches}, weights {a.w_gpu_percent:g}% in memory, cache "
                  f"{a.cache_gpu_percent:g}%{', 4-bit weights' if a.compress_weight else ''}"
                  f"{', 4-bit cache' if a.compress_cache else ''}{same}")
        print(f"| {model} | {memory} | {s['best_name']} | {s['best']:.2f} | {choice} | {s['auto']:.2f} | "
              f"{s['auto'] / s['best']:.2f} | {'yes' if s['auto_held'] else 'NO'} ({s['memlimit'].split('peak ')[-1]}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="opt-1.3b")
    r.add_argument("--memory", default="4G", help="memlimit for each run; also the RAM the budgets are taken from")
    r.add_argument("--hardware", required=True)
    r.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    r.add_argument("--num-prompts", type=int, default=16)
    r.add_argument("--prompt-len", type=int, default=16)
    r.add_argument("--gen-len", type=int, default=8)
    r.add_argument("--offload-dir", default="/tmp/flexgen-grid")
    r.add_argument("--out", required=True)
    r.add_argument("--auto", action="store_true", help="also run --policy auto")
    r.add_argument("--rounds", type=int, default=1, help="run every entry this many times, in turns (default 1)")
    r.add_argument("--only", metavar="NAME,NAME", help="only these entries (e.g. auto,b16x1)")
    r.add_argument("--list", action="store_true", help="print the grid's policies and exit")
    rep = sub.add_parser("report")
    rep.add_argument("results")
    rep.add_argument("--hardware", required=True)
    args = p.parse_args()
    if args.command == "report":
        return report(args)
    if args.list:
        for name, policy in grid(args, budgets_under(load_profile(args.hardware), args.memory)):
            print(name, " ".join(_policy_flags(policy)))
        return
    run(args)


if __name__ == "__main__":
    main()
