"""`flexgen-dist bench`: our engine and the baselines on the same synthetic work, one after the other, each in its own
process; throughput, latency, the ratios, the roofline of every run, and a latency/throughput (Pareto) plot over a
sweep of block sizes, as the FlexGen paper's Figure 1.

Latency is the time to finish one block of prompts (one `generate` call of the baselines' batch), throughput the
generated tokens over the generation time (prefill + decode; loading excluded for every system)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from flexgen_dist.base.devices import DTYPES
from flexgen_dist.base.errors import UserError
from flexgen_dist.bench.baselines import BaselineSpec, spec_json
from flexgen_dist.bench.vllm_baseline import SETUP_HINT, vllm_command, why_not
from flexgen_dist.io.prompts import synthetic_requests
from flexgen_dist.memory.budget import MemoryBudget, format_bytes
from flexgen_dist.models.family import ModelConfig
from flexgen_dist.policy.hardware import HardwareProfile
from flexgen_dist.policy.profiler import measure_disk
from flexgen_dist.policy.roofline import Workload, roofline


@dataclass(frozen=True)
class BenchSpec:
    model: str  # a size name (dummy weights) or a checkpoint directory (both systems read it)
    config: ModelConfig
    prompt_len: int
    gen_len: int
    num_prompts: int | None  # None: one block per stage for each point
    blocks: tuple[tuple[int, int], ...]  # (gpu_batch_size, num_gpu_batches) per point; () = the policy's own
    stages: tuple[int, ...]  # pipeline lengths to measure, each point at each
    device: str
    dtype: str
    budget: MemoryBudget
    offload_dir: str | None
    baselines: tuple[str, ...]
    baseline_batch_sizes: tuple[int, ...]  # () = chosen per point (see baseline_batches)
    seed: int = 0
    baseline_calls: int | None = None  # time at most this many generate calls per baseline batch size
    disk_now: bool = False  # measure the disk around each of our runs and give the roofline at that speed too
    vllm_python: str | None = None  # the interpreter that has vLLM (--baseline vllm); None: not installed
    baseline_budget: MemoryBudget | None = None  # the baselines' own budgets (--baseline-max-memory); None: ours

    @property
    def budget_for_baselines(self) -> MemoryBudget:
        """The budget the baselines get: their own where given, else ours."""
        return self.baseline_budget or self.budget


def parse_blocks(text: str) -> tuple[tuple[int, int], ...]:
    """"8x1,32x4" -> ((8, 1), (32, 4))."""
    blocks = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise UserError(f"--sweep: expected GPU_BATCHxNUM_BATCHES items like 8x1,32x4, got {item.strip()!r}")
        blocks.append((int(parts[0]), int(parts[1])))
    return tuple(blocks)


def hf_resident_bytes(cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, dtype_bytes: int) -> int:
    """Memory HF `generate` needs with every weight resident: weights, the whole KV cache, the widest prefill
    activation (attention scores or the MLP's hidden) and float32 logits of the last position."""
    activations = batch * prompt_len * max(cfg.ffn_dim, cfg.num_heads * prompt_len) * dtype_bytes * 2
    return (cfg.param_count() * dtype_bytes + cfg.cache_bytes(batch, prompt_len + gen_len, dtype_bytes)
            + activations + batch * cfg.vocab_size * 4)


def memory_budget_for_baselines(spec: BenchSpec) -> int | None:
    """What the baselines may hold in memory: the compute device's budget on a GPU; on a CPU device both memory tiers
    are the same RAM, bounded together as our run's are (MemoryBudget.one_ram). None: no budget given."""
    budget = spec.budget_for_baselines
    return budget.gpu if spec.device == "cuda" else budget.one_ram()


def baseline_batches(spec: BenchSpec, system: str, block_size: int) -> tuple[list[int], str]:
    """The baseline batch sizes to measure for one point (its best is reported), or none and why.

    hf: the two largest powers of two up to the block size whose resident run fits the memory budget (past the
    weights, a larger batch is not always faster on a CPU). accelerate: the block size, as its offload streams the
    weights once per forward pass whatever the batch. vllm: the block size as its most sequences in flight (it
    schedules them itself), where its CPU build can hold the weights and their cache."""
    if system == "vllm":
        if spec.vllm_python is None:
            return [], f"not installed ({SETUP_HINT}, or give --vllm-python)"
        limit = memory_budget_for_baselines(spec)
        reasons = {b: why_not(spec.config, spec.device, b, spec.prompt_len + spec.gen_len, spec.dtype, limit)
                   for b in spec.baseline_batch_sizes or (block_size,)}
        fitting = [b for b, why in reasons.items() if not why]
        return fitting, "" if fitting else next(iter(reasons.values()))
    if spec.baseline_batch_sizes:
        return list(spec.baseline_batch_sizes), ""
    if system == "accelerate":
        return [block_size], ""
    limit, dtype_bytes = memory_budget_for_baselines(spec), DTYPES[spec.dtype].itemsize
    sizes = [1 << k for k in range(block_size.bit_length()) if (1 << k) <= block_size]
    fitting = [b for b in sizes if limit is None
               or hf_resident_bytes(spec.config, b, spec.prompt_len, spec.gen_len, dtype_bytes) <= limit]
    if not fitting:
        need = hf_resident_bytes(spec.config, 1, spec.prompt_len, spec.gen_len, dtype_bytes)
        return [], f"does not fit: needs {format_bytes(need)} resident at batch 1, memory budget {format_bytes(limit)}"
    return fitting[-2:][::-1], ""


def _last_json_line(proc: subprocess.CompletedProcess, what: str) -> dict:
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        raise UserError(f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else 'no message'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(spec: BenchSpec, generate_flags: list[str], block: tuple[int, int] | None, num_prompts: int,
             stages: int) -> dict:
    """`flexgen-dist generate` on the synthetic work in a subprocess; its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "flexgen_dist", "generate", "--model", spec.model, "--synthetic", str(num_prompts),
               "--prompt-len", str(spec.prompt_len), "--max-new-tokens", str(spec.gen_len), "--ignore-eos", "--quiet",
               "--seed", str(spec.seed), "--output", str(Path(tmp) / "out.jsonl"), "--stages", str(stages),
               *generate_flags]
        if not Path(spec.model).is_dir():
            cmd.append("--dummy-weights")
        if block:
            cmd += ["--gpu-batch-size", str(block[0]), "--num-gpu-batches", str(block[1])]
        return _last_json_line(subprocess.run(cmd, capture_output=True, text=True), "our run")


def run_baseline(spec: BaselineSpec, cfg: ModelConfig, vllm_python: str | None = None) -> dict | None:
    """The baseline's result ({"skipped": why} where vLLM does not import); None when its process was SIGKILLed, as the
    OOM killer does to a batch that does not fit a cgroup's memory limit: that batch is then not the baseline's best,
    and the other candidates still run."""
    with tempfile.TemporaryDirectory() as tmp:
        if spec.system == "vllm":
            command = vllm_command(vllm_python, spec, cfg, Path(tmp))
        else:
            path = Path(tmp) / "spec.json"
            path.write_text(spec_json(spec))
            command = [sys.executable, "-m", "flexgen_dist.bench.baselines", str(path)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode == -signal.SIGKILL:
            return None
        return _last_json_line(proc, f"baseline {spec.system}")


def measure_disk_now(spec: BenchSpec) -> dict[str, float]:
    """The disk's read and write speed through the engine's O_DIRECT path, now: 1 GiB in four files (a few seconds)."""
    read, write, _ = measure_disk(spec.offload_dir, 256 << 20, 4)
    return {"read_bytes_per_s": read, "write_bytes_per_s": write}


def _at_disk_now(hardware: HardwareProfile, before: dict[str, float], after: dict[str, float]) -> HardwareProfile:
    """The profile with the disk's speeds replaced by the mean of those measured just before and after a run."""
    return replace(hardware, disk_read_bytes_per_s=(before["read_bytes_per_s"] + after["read_bytes_per_s"]) / 2,
                   disk_write_bytes_per_s=(before["write_bytes_per_s"] + after["write_bytes_per_s"]) / 2)


def _ours_point(spec: BenchSpec, summary: dict, hardware: HardwareProfile | None, rounds: int,
                disk_now: tuple[dict[str, float], dict[str, float]] | None = None) -> dict:
    policy = summary["policy"]
    block = (policy["gpu_batch_size"], policy["num_gpu_batches"])
    point = {"system": "flexgen_dist", "block": f"{block[0]}x{block[1]}", "block_size": block[0] * block[1],
             "stages": summary["stages"], "blocks_in_flight": summary["blocks_in_flight"],
             "sequences": summary["sequences"], "total_s": summary["total_s"],
             "prefill_s": summary["prefill_s"], "decode_s": summary["decode_s"], "latency_s": summary["total_s"] / rounds,
             "generation_throughput_tok_s": summary["generation_throughput_tok_s"], "policy": policy,
             "peak_bytes": summary["peak_bytes"],
             # the pipeline's own counters: what each stage holds, and how long it computed and waited
             "stage_stats": [{"stage": s["stage"], "layers": s["layers"], "busy_s": round(s["busy_s"], 3),
                              "idle_s": round(s["idle_s"], 3), "peak_bytes": s["peak_bytes"]}
                             for s in summary["stage_stats"]]}
    if hardware is not None:
        transfers = {k: v for s in summary["stage_stats"] for k, v in s["transfers"].items()}
        work = Workload(summary["sequences"], spec.prompt_len, spec.gen_len, block[0])
        # S stages are S devices sharing the work: S device-seconds against one device's roofs.
        device_s = summary["total_s"] * summary["stages"]
        point["roofline"] = roofline(spec.config, work, hardware, summary["dtype"], transfers, device_s)
        if disk_now is not None:
            # A virtual disk's speed wanders by tens of percent over hours: the profile's may not be today's.
            point["disk_now"] = {"before": disk_now[0], "after": disk_now[1]}
            point["roofline_disk_now"] = roofline(spec.config, work, _at_disk_now(hardware, *disk_now),
                                                  summary["dtype"], transfers, device_s)
    return point


def _baseline_point(spec: BenchSpec, result: dict, hardware: HardwareProfile | None) -> dict:
    point = {**result, "block_size": result["batch_size"]}
    if hardware is not None:  # baselines report no transfers: their compute and memory roofs only
        work = Workload(result["generated_tokens"] // spec.gen_len, spec.prompt_len, spec.gen_len, result["batch_size"])
        point["roofline"] = roofline(spec.config, work, hardware, spec.dtype, {}, result["total_s"])
    return point


def run_bench(spec: BenchSpec, generate_flags: list[str], hardware: HardwareProfile | None,
              log: Callable[[str], None]) -> dict:
    """Every point of the sweep: ours, then each baseline on the same prompts; the best of each system compared."""
    points: list[dict] = []
    measured: set[tuple[str, int, int]] = set()  # (system, batch, prompts): a baseline run ignores our block
    for block in spec.blocks or (None,):
        block_size = block[0] * block[1] if block else None
        # The same prompts at every pipeline length: one block per stage of the longest, unless given.
        num_prompts = spec.num_prompts or (block_size or 0) * max(spec.stages)
        if num_prompts < 1:
            raise UserError("--num-prompts is needed when the block size is left to --policy auto")
        for stages in spec.stages:
            log(f"flexgen_dist, block {f'{block[0]}x{block[1]}' if block else 'of the policy'}, {num_prompts} prompts, "
                f"{stages} stage{'s' if stages > 1 else ''}")
            disk_before = measure_disk_now(spec) if spec.disk_now else None
            summary = run_ours(spec, generate_flags, block, num_prompts, stages)
            disk_now = (disk_before, measure_disk_now(spec)) if disk_before else None
            actual = summary["policy"]["gpu_batch_size"] * summary["policy"]["num_gpu_batches"]
            rounds = -(-num_prompts // (actual * stages))
            points.append({**_ours_point(spec, summary, hardware, rounds, disk_now),
                           "requested": f"{block[0]}x{block[1]}" if block else "policy"})
            log(f"  {points[-1]['generation_throughput_tok_s']:.3f} tok/s, latency {points[-1]['latency_s']:.1f} s")
        prompts = [list(r.input_ids) for r in
                   synthetic_requests(num_prompts, spec.prompt_len, spec.config.vocab_size, spec.seed)]
        for system in spec.baselines:
            batches, why = baseline_batches(spec, system, min(actual, num_prompts))
            if not batches:
                points.append({"system": system, "block_size": actual, "skipped": why})
                log(f"  {system}: {why}")
            for batch in batches:
                if (system, batch, num_prompts) in measured:
                    continue
                measured.add((system, batch, num_prompts))
                sample = prompts[: batch * spec.baseline_calls] if spec.baseline_calls else prompts
                base = BaselineSpec(system, spec.model, sample, spec.gen_len, batch, spec.device, spec.dtype,
                                    _budget_dict(spec.budget_for_baselines), spec.offload_dir or tempfile.gettempdir())
                log(f"  {system}, batch {batch}")
                result = run_baseline(base, spec.config, spec.vllm_python)
                if result is None or "skipped" in result:
                    why = result["skipped"] if result else "killed (SIGKILL: out of memory under the limit?)"
                    points.append({"system": system, "batch_size": batch, "block_size": batch, "skipped": why})
                    log(f"    {why}")
                    continue
                points.append(_baseline_point(spec, result, hardware))
                log(f"    {points[-1]['generation_throughput_tok_s']:.3f} tok/s, latency {points[-1]['latency_s']:.1f} s")
    return {"workload": {"model": spec.config.name, "prompt_len": spec.prompt_len, "gen_len": spec.gen_len,
                         "device": spec.device, "dtype": spec.dtype, "stages": spec.stages,
                         "max_memory": str(spec.budget),
                         **({"baseline_max_memory": str(spec.baseline_budget)} if spec.baseline_budget else {})},
            "points": points, "best": best_and_ratios(points), "scaling": scaling(points)}


def _budget_dict(budget: MemoryBudget) -> dict[str, int]:
    return {tier: size for tier, size in (("gpu", budget.gpu), ("cpu", budget.cpu)) if size is not None}


def best_and_ratios(points: list[dict]) -> dict:
    """Each system's highest throughput, and ours over each baseline's."""
    best: dict[str, dict] = {}
    for p in points:
        if "skipped" not in p and p["generation_throughput_tok_s"] > best.get(p["system"], {}).get(
                "generation_throughput_tok_s", -1.0):
            best[p["system"]] = p
    out = {system: {"generation_throughput_tok_s": p["generation_throughput_tok_s"],
                    "at": p.get("block") or f"batch {p['batch_size']}"} for system, p in best.items()}
    ours = best.get("flexgen_dist")
    if ours:
        for system, p in best.items():
            if system != "flexgen_dist":
                out[system]["ours_over_it"] = round(ours["generation_throughput_tok_s"] / p["generation_throughput_tok_s"], 3)
    return out


def scaling(points: list[dict]) -> list[dict]:
    """Per block shape measured at several pipeline lengths: each length's throughput, its speedup over the shortest,
    and each stage's busy and idle seconds (the bubble) and layers; [] with one length only."""
    ours = [p for p in points if p["system"] == "flexgen_dist"]
    rows = []
    for requested in dict.fromkeys(p["requested"] for p in ours):  # a sweep point: --policy auto may pick per length
        runs = sorted((p for p in ours if p["requested"] == requested), key=lambda p: p["stages"])
        if len(runs) < 2:
            continue
        base = runs[0]
        for p in runs:
            rows.append({"block": p["block"], "stages": p["stages"], "blocks_in_flight": p["blocks_in_flight"],
                         "generation_throughput_tok_s": p["generation_throughput_tok_s"],
                         "speedup": round(p["generation_throughput_tok_s"] / base["generation_throughput_tok_s"], 3),
                         "over_stages": base["stages"],
                         "stage_busy_s": [s["busy_s"] for s in p["stage_stats"]],
                         "stage_idle_s": [s["idle_s"] for s in p["stage_stats"]],
                         "stage_idle_fraction": [round(s["idle_s"] / p["total_s"], 3) for s in p["stage_stats"]],
                         "stage_layers": [s["layers"] for s in p["stage_stats"]]})
    return rows


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both latency (lower) and throughput (higher)."""
    done = [p for p in points if "skipped" not in p]
    return [p for p in done if not any(q["latency_s"] <= p["latency_s"] and q["generation_throughput_tok_s"]
                                       >= p["generation_throughput_tok_s"] and q is not p and
                                       (q["latency_s"], q["generation_throughput_tok_s"]) !=
                                       (p["latency_s"], p["generation_throughput_tok_s"]) for q in done)]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'flexgen_dist[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict) -> str:
    w = result["workload"]
    return f"{w['model']} {w['dtype']}, prompt {w['prompt_len']}, gen {w['gen_len']}\n{w['max_memory']}"


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def plot_pareto(result: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for system in dict.fromkeys(p["system"] for p in result["points"]):
        mine = sorted((p for p in result["points"] if p["system"] == system and "skipped" not in p),
                      key=lambda p: p["latency_s"])
        if not mine:
            continue
        front = pareto_front(mine)
        line, = ax.plot([p["latency_s"] for p in front], [p["generation_throughput_tok_s"] for p in front], "-",
                        label=system)
        ax.plot([p["latency_s"] for p in mine], [p["generation_throughput_tok_s"] for p in mine], "o",
                color=line.get_color())
        for p in mine:
            ax.annotate(p.get("block") or str(p["batch_size"]), (p["latency_s"], p["generation_throughput_tok_s"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="latency per block (s)", ylabel="generation throughput (token/s)")
    ax.set_title(_title(result), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(plt, fig, path)


def plot_scaling(result: dict, path: str) -> None:
    """Throughput against pipeline length, per block shape, next to linear scaling from the shortest."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    rows = result["scaling"]
    for block in dict.fromkeys(r["block"] for r in rows):
        mine = [r for r in rows if r["block"] == block]
        stages = [r["stages"] for r in mine]
        line, = ax.plot(stages, [r["generation_throughput_tok_s"] for r in mine], "o-", label=f"block {block}")
        base = mine[0]["generation_throughput_tok_s"] / mine[0]["stages"]
        ax.plot(stages, [base * s for s in stages], ":", color=line.get_color(), label=f"linear ({block})")
    ax.set(xlabel="pipeline stages (devices)", ylabel="generation throughput (token/s)")
    ax.set_xticks(sorted({r["stages"] for r in rows}))
    ax.set_title(_title(result), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def format_table(result: dict) -> str:
    rows = ["system         block/batch  stages  tok/s      latency s  bound by       achieved"]
    for p in result["points"]:
        at = p.get("block") or str(p.get("batch_size", p.get("block_size")))
        if "skipped" in p:
            rows.append(f"{p['system']:<14} {at:<12} {'':<7} skipped: {p['skipped']}")
            continue
        roof, now = p.get("roofline", {}), p.get("roofline_disk_now")
        rows.append(f"{p['system']:<14} {at:<12} {p.get('stages', 1):<7} {p['generation_throughput_tok_s']:<10.3f} "
                    f"{p['latency_s']:<10.2f} {roof.get('bound_by', '-'):<14} "
                    f"{roof.get('achieved_fraction', float('nan')):.2f}"
                    + (f" (disk now: {now['bound_by']} {now['achieved_fraction']:.2f})" if now else ""))
    for system, best in result["best"].items():
        if "ours_over_it" in best:
            rows.append(f"flexgen_dist / {system}: {best['ours_over_it']:.2f}x")
    if result.get("scaling"):
        rows.append("scaling        block        stages  tok/s      speedup    idle per stage (share of the run)")
        for r in result["scaling"]:
            idle = ", ".join(f"{s:.1f} s ({f:.0%})" for s, f in zip(r["stage_idle_s"], r["stage_idle_fraction"]))
            rows.append(f"{'':<14} {r['block']:<12} {r['stages']:<7} {r['generation_throughput_tok_s']:<10.3f} "
                        f"{r['speedup']:<10.2f} {idle}")
    return "\n".join(rows)
