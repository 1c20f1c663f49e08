"""`flexgen-dist bench` and `flexgen-dist checkpoint`: the sweep against both baselines end to end on a tiny
checkpoint (real subprocesses, real accelerate offload folder, a real PNG), and the arithmetic behind the table:
roofline FLOPs and bytes, baseline batch choice under a budget, the Pareto front, the ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.bench.command import (
    BenchSpec,
    baseline_batches,
    best_and_ratios,
    hf_resident_bytes,
    pareto_front,
    parse_blocks,
)
from flexgen_dist.cli import main
from flexgen_dist.io.weights import DummyWeights, open_checkpoint
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.models.family import config_by_name, model_layers
from flexgen_dist.models.opt import OptConfig
from flexgen_dist.policy.hardware import load_profile
from flexgen_dist.policy.roofline import Workload, generation_flops, moved_bytes, roofline

REPO = Path(__file__).resolve().parent.parent
DEV_PROFILE = REPO / "configs" / "hardware" / "dev-epyc-2core.yaml"


def test_parse_blocks():
    assert parse_blocks("8x1, 32X4") == ((8, 1), (32, 4))
    for bad in ("8", "8x0", "axb", "8x1x2", ""):
        with pytest.raises(UserError, match="--sweep"):
            parse_blocks(bad)


def test_generation_flops_count_every_matmul_once():
    cfg = OptConfig(name="t", hidden_size=8, num_layers=2, num_heads=2, ffn_dim=32, vocab_size=50)
    w = Workload(num_seqs=3, prompt_len=4, gen_len=3, gpu_batch_size=3)
    layer = 2 * (4 * 8 * 8 + 2 * 8 * 32)  # q, k, v, out projections and the two MLP matrices, per position
    attention = 2 * 4 * 4 * 8 + 4 * 5 * 8 + 4 * 6 * 8  # causal prefill, then decode over 5 and 6 positions
    expected = 3 * (2 * (layer * 6 + attention) + 2 * 8 * 50 * 3)
    assert generation_flops(cfg, w) == expected


def test_roofline_takes_the_slowest_roof_and_the_moved_bytes():
    flows = {"weights:disk->gpu": {"bytes": 3e9}, "cache:gpu->disk": {"bytes": 1e9}, "cache:cpu->gpu": {"bytes": 2e9},
             "acts:gpu->cpu": {"bytes": 1e9}}
    assert moved_bytes(flows) == (3e9, 1e9, 3e9)
    hw = load_profile(DEV_PROFILE)
    cfg = config_by_name("opt-1.3b")
    r = roofline(cfg, Workload(8, 16, 4, 8), hw, "float32", flows, measured_s=100.0)
    disk = 3e9 / hw.disk_read_bytes_per_s + 1e9 / hw.disk_write_bytes_per_s
    assert r["bound_by"] == "disk" and r["roofs_s"]["disk"] == pytest.approx(disk, abs=1e-4)
    assert r["achieved_fraction"] == pytest.approx(disk / 100.0, abs=1e-4)


def _spec(budget: MemoryBudget, device: str = "cpu") -> BenchSpec:
    return BenchSpec("opt-1.3b", config_by_name("opt-1.3b"), 128, 32, None, ((32, 1),), 1, device, "float32", budget,
                     None, ("hf",), ())


def test_hf_batches_are_the_largest_that_fit_the_same_memory():
    cfg = config_by_name("opt-1.3b")
    assert baseline_batches(_spec(MemoryBudget()), "hf", 32)[0] == [32, 16]
    fits_8 = hf_resident_bytes(cfg, 8, 128, 32, 4)
    assert hf_resident_bytes(cfg, 16, 128, 32, 4) > fits_8
    # On a CPU device both memory tiers are the same RAM: their sum is what HF may hold.
    assert baseline_batches(_spec(MemoryBudget(gpu=fits_8 // 2, cpu=fits_8 - fits_8 // 2)), "hf", 32)[0] == [8, 4]
    # On a GPU only the device's budget counts.
    assert baseline_batches(_spec(MemoryBudget(gpu=fits_8 // 2, cpu=10 * fits_8), "cuda"), "hf", 32)[0] == []
    batches, why = baseline_batches(_spec(MemoryBudget(gpu=1 << 30, cpu=1 << 30)), "hf", 32)
    assert batches == [] and "does not fit" in why
    assert baseline_batches(_spec(MemoryBudget(gpu=1, cpu=1)), "accelerate", 32)[0] == [32]


def test_pareto_front_and_ratios():
    points = [{"system": "flexgen_dist", "block": "8x1", "latency_s": 1.0, "generation_throughput_tok_s": 10.0},
              {"system": "flexgen_dist", "block": "8x4", "latency_s": 3.0, "generation_throughput_tok_s": 30.0},
              {"system": "flexgen_dist", "block": "4x4", "latency_s": 3.5, "generation_throughput_tok_s": 20.0},
              {"system": "hf", "batch_size": 8, "latency_s": 1.0, "generation_throughput_tok_s": 12.0},
              {"system": "accelerate", "block_size": 8, "skipped": "does not fit"}]
    ours = [p for p in points if p["system"] == "flexgen_dist"]
    assert [p["block"] for p in pareto_front(ours)] == ["8x1", "8x4"]
    best = best_and_ratios(points)
    assert best["flexgen_dist"]["at"] == "8x4" and best["hf"]["ours_over_it"] == 2.5 and "accelerate" not in best


def test_checkpoint_writes_our_dummy_weights_as_hf_shards(tmp_path, capsys, monkeypatch):
    import flexgen_dist.io.checkpoint_writer as writer

    monkeypatch.setattr(writer, "SHARD_BYTES", 1 << 20)  # several shards from opt-125m's first tensors
    out = tmp_path / "ckpt"
    assert main(["checkpoint", "--model", "opt-125m", "--dtype", "bfloat16", "--output", str(out)]) == 0
    assert len(list(out.glob("*.safetensors"))) > 2
    cfg, source = open_checkpoint(out)  # validates every weight's presence and shape
    spec = next(w for layer in model_layers(cfg) for w in layer.weights if w.name == "q_proj.weight")
    ours = torch.empty(spec.numel, dtype=torch.bfloat16)
    DummyWeights(0).read(spec, 0, spec.numel, ours)
    read = torch.empty(spec.numel, dtype=torch.bfloat16)
    source.read(spec, 0, spec.numel, read)
    assert torch.equal(ours, read)
    assert main(["checkpoint", "--model", "opt-125m", "--output", str(out)]) == 2  # never over a checkpoint
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_bench_sweep_against_both_baselines(tmp_path, opt_preln_dir, capsys):
    """Weights on disk for us; accelerate gets the same memory (both tiers, on a CPU device), less than the model, so
    it leaves part of it on disk."""
    results, plot = tmp_path / "points.jsonl", tmp_path / "pareto.png"
    argv = ["bench", "--model", str(opt_preln_dir), "--prompt-len", "8", "--gen-len", "4", "--sweep", "2x1,2x2",
            "--baseline", "hf", "--baseline", "accelerate", "--percent", "0", "0", "100", "0", "100", "0",
            "--max-memory", "gpu=512KiB,cpu=64KiB", "--device", "cpu", "--dtype", "float32", "--executor", "local",
            "--offload-dir", str(tmp_path / "offload"), "--hardware", str(DEV_PROFILE), "--results", str(results),
            "--plot", str(plot)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_system = {}
    for p in out["points"]:
        by_system.setdefault(p["system"], []).append(p)
    assert [p["block"] for p in by_system["flexgen_dist"]] == ["2x1", "2x2"]
    for p in by_system["flexgen_dist"]:
        assert p["sequences"] == p["block_size"] and p["roofline"]["roofs_s"]["disk"] > 0
        assert p["policy"]["w_gpu_percent"] == 0 and p["policy"]["w_cpu_percent"] == 0
    # HF generate holds every weight: the model alone exceeds the memory, so it is skipped, with the reason.
    assert [p["block_size"] for p in by_system["hf"]] == [2, 4]
    assert all("does not fit" in p["skipped"] for p in by_system["hf"])
    assert [p["batch_size"] for p in by_system["accelerate"]] == [2, 4]
    for p in by_system["flexgen_dist"] + by_system["accelerate"]:
        assert p["generation_throughput_tok_s"] > 0 and 0 < p["roofline"]["achieved_fraction"] < 1
    assert set(out["best"]) == {"flexgen_dist", "accelerate"} and out["best"]["accelerate"]["ours_over_it"] > 0
    assert len(results.read_text().splitlines()) == len(out["points"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model_bytes = sum(f.stat().st_size for f in opt_preln_dir.glob("*.safetensors"))
    assert all(0 < p["disk_offload_bytes"] < model_bytes for p in by_system["accelerate"])  # it did offload
    assert not any(p.is_file() for p in (tmp_path / "offload").rglob("*")), "ours and accelerate clean up"


def _bench_with_hf(model_dir: Path, capsys, gen_len: int) -> tuple[dict, list[dict], str]:
    """A block of 4 against HF's candidate batches; the JSON result, its HF points and stderr."""
    argv = ["bench", "--model", str(model_dir), "--prompt-len", "8", "--gen-len", str(gen_len), "--gpu-batch-size",
            "4", "--baseline", "hf", "--device", "cpu", "--dtype", "float32", "--executor", "local", "--no-roofline"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    return out, [p for p in out["points"] if p["system"] == "hf"], captured.err


def test_bench_hf_baseline_gets_its_best_batch_that_fits(tmp_path, opt_preln_dir, capsys):
    out, hf, err = _bench_with_hf(opt_preln_dir, capsys, gen_len=4)
    assert [p["batch_size"] for p in hf] == [4, 2] and all(p["generated_tokens"] == 16 for p in hf)
    best = max(hf, key=lambda p: p["generation_throughput_tok_s"])
    assert out["best"]["hf"]["at"] == f"batch {best['batch_size']}" and "flexgen_dist / hf" in err


def test_bench_measures_each_baseline_batch_once_per_sweep(tmp_path, opt_preln_dir, capsys):
    """Two block shapes of one size on the same prompts: the baseline's batches are the same for both, so run once."""
    argv = ["bench", "--model", str(opt_preln_dir), "--prompt-len", "8", "--gen-len", "2", "--sweep", "2x1,1x2",
            "--num-prompts", "4", "--baseline", "hf", "--device", "cpu", "--dtype", "float32", "--executor", "local",
            "--no-roofline"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [p.get("block") or p["batch_size"] for p in out["points"]] == ["2x1", 2, 1, "1x2"]


def test_bench_times_a_sample_of_the_baseline_calls(opt_preln_dir, capsys):
    argv = ["bench", "--model", str(opt_preln_dir), "--prompt-len", "8", "--gen-len", "2", "--gpu-batch-size", "4",
            "--num-prompts", "8", "--baseline", "hf", "--baseline-batch-size", "2", "--baseline-calls", "1",
            "--device", "cpu", "--dtype", "float32", "--executor", "local", "--no-roofline"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours, hf = out["points"]
    assert ours["sequences"] == 8 and hf["batch_size"] == 2 and hf["generated_tokens"] == 2 * 2


def test_bench_gives_the_roofline_at_the_disk_speed_measured_around_the_run(tmp_path, opt_preln_dir, capsys):
    """--disk-now times the real disk before and after our run; the disk roof is the same bytes at the mean speed."""
    argv = ["bench", "--model", str(opt_preln_dir), "--prompt-len", "8", "--gen-len", "4", "--gpu-batch-size", "2",
            "--percent", "0", "0", "100", "0", "100", "0", "--device", "cpu", "--dtype", "float32",
            "--executor", "local", "--offload-dir", str(tmp_path / "offload"), "--hardware", str(DEV_PROFILE),
            "--disk-now"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    (ours,) = json.loads(captured.out.strip().splitlines()[-1])["points"]
    speeds = ours["disk_now"]
    assert all(speeds[when][kind] > 0 for when in ("before", "after") for kind in ("read_bytes_per_s", "write_bytes_per_s"))
    mean_read = (speeds["before"]["read_bytes_per_s"] + speeds["after"]["read_bytes_per_s"]) / 2
    profile_read = load_profile(DEV_PROFILE).disk_read_bytes_per_s
    profile_disk, now_disk = ours["roofline"]["roofs_s"]["disk"], ours["roofline_disk_now"]["roofs_s"]["disk"]
    assert profile_disk > 0 and now_disk == pytest.approx(profile_disk * profile_read / mean_read, rel=0.02, abs=2e-4)
    assert "(disk now:" in captured.err
    assert not any(p.is_file() for p in (tmp_path / "offload").rglob("*")), "the disk timing cleans up"


def test_bench_reports_a_killed_baseline_batch_and_runs_the_others(opt_preln_dir, capsys, monkeypatch):
    """The OOM killer SIGKILLs a baseline batch that does not fit a cgroup's limit: that batch is reported as
    skipped, the smaller one still runs and is the baseline's best."""
    import flexgen_dist.bench.command as bench

    real_run = bench.subprocess.run

    def run(cmd, **kwargs):
        if "flexgen_dist.bench.baselines" in cmd and json.loads(Path(cmd[-1]).read_text())["batch_size"] == 4:
            cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", run)
    out, hf, err = _bench_with_hf(opt_preln_dir, capsys, gen_len=2)
    assert [p["batch_size"] for p in hf] == [4, 2] and "SIGKILL" in hf[0]["skipped"] and "skipped" not in hf[1]
    assert out["best"]["hf"]["at"] == "batch 2" and "killed" in err


def test_bench_gives_the_baselines_their_own_budget(tmp_path, opt_preln_dir, capsys, monkeypatch):
    """--baseline-max-memory: the budget accelerate is given (its weights in memory) and the one HF's batches must
    fit, apart from ours (--max-memory)."""
    import flexgen_dist.bench.command as bench

    real_run, given = bench.subprocess.run, []

    def run(cmd, **kwargs):
        if "flexgen_dist.bench.baselines" in cmd:
            given.append(json.loads(Path(cmd[-1]).read_text())["max_memory"])
            cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", run)
    argv = ["bench", "--model", str(opt_preln_dir), "--prompt-len", "8", "--gen-len", "2", "--gpu-batch-size", "2",
            "--baseline", "accelerate", "--baseline", "hf", "--device", "cpu", "--dtype", "float32", "--executor",
            "local", "--no-roofline", "--offload-dir", str(tmp_path), "--max-memory", "gpu=1GiB,cpu=1GiB",
            "--baseline-max-memory", "gpu=1KiB,cpu=2KiB"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert given == [{"gpu": 1024, "cpu": 2048}]  # accelerate's; HF's batches fit no 3 KiB, so it never starts
    (hf,) = [p for p in out["points"] if p["system"] == "hf"]
    assert "does not fit" in hf["skipped"] and "budget 3.00 KiB" in hf["skipped"]
    assert out["workload"]["max_memory"].startswith("gpu=1.00 GiB")
    assert out["workload"]["baseline_max_memory"].startswith("gpu=1.00 KiB, cpu=2.00 KiB")


@pytest.mark.parametrize("flags,message", [
    (["--baseline", "accelerate"], "--baseline accelerate loads a checkpoint"),
    (["--baseline", "bogus"], "--baseline bogus: unknown system (choose from hf, accelerate, vllm)"),
    (["--prompt-len", "4000"], "exceeds the model's"),
    (["--sweep", "4x"], "--sweep"),
    (["--policy", "auto"], "--num-prompts is needed"),
    (["--baseline-batch-size", "0"], "--baseline-batch-size must be >= 1"),
    (["--baseline-calls", "0"], "--baseline-calls must be >= 1"),
    (["--disk-now", "--no-roofline"], "--disk-now gives a roofline"),
    (["--prefill-chunks", "0"], "--prefill-chunks must be >= 1"),
])
def test_bench_refuses_bad_input_in_one_line(flags, message, capsys):
    argv = ["bench", "--model", "opt-125m", "--device", "cpu", "--no-roofline", "--executor", "local", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_bench_scaling_table_over_pipeline_lengths(tmp_path, ray_cluster, opt_preln_dir, capsys):
    """--stages 1,2: the same prompts at each length through Ray, the speedup over one stage, each stage's busy and
    idle seconds from the pipeline's own counters, and the scaling plot."""
    plot = tmp_path / "scaling.png"
    argv = ["bench", "--model", str(opt_preln_dir), "--prompt-len", "8", "--gen-len", "4", "--gpu-batch-size", "2",
            "--stages", "1,2", "--cpus-per-stage", "0.5", "--device", "cpu", "--dtype", "float32", "--no-roofline",
            "--ray-address", ray_cluster["address"], "--plot", str(plot)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    ours = [p for p in out["points"] if p["system"] == "flexgen_dist"]
    assert [(p["stages"], p["sequences"]) for p in ours] == [(1, 4), (2, 4)]  # one block per stage of the longest
    assert [len(p["stage_stats"]) for p in ours] == [1, 2]
    one, two = out["scaling"]
    assert (one["stages"], one["speedup"], two["stages"]) == (1, 1.0, 2)
    assert two["speedup"] == pytest.approx(two["generation_throughput_tok_s"] / one["generation_throughput_tok_s"],
                                           rel=1e-2)
    assert len(two["stage_idle_s"]) == 2 and all(b > 0 for b in two["stage_busy_s"])
    assert two["stage_layers"][0][0] == 0 and two["stage_layers"][0][1] == two["stage_layers"][1][0]
    assert "speedup" in captured.err and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("stages", ["0", "1,x", ""])
def test_bench_refuses_bad_stage_counts(stages, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--model", "opt-125m", "--stages", stages])
    assert exited.value.code == 2 and "expected stage counts >= 1" in capsys.readouterr().err


def test_bench_takes_dummy_weights_as_generate_does(opt_preln_dir, capsys):
    argv = ["bench", "--model", "opt-125m", "--dummy-weights", "--prompt-len", "4", "--gen-len", "2",
            "--gpu-batch-size", "2", "--device", "cpu", "--dtype", "float32", "--executor", "local", "--no-roofline"]
    assert main(argv) == 0
    (ours,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["points"]
    assert ours["sequences"] == 2 and ours["generation_throughput_tok_s"] > 0
    assert main(["bench", "--model", str(opt_preln_dir), "--dummy-weights", "--no-roofline"]) == 2
    assert "--dummy-weights takes a size name" in capsys.readouterr().err
