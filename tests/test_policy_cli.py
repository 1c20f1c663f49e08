"""`flexgen-dist profile`, `flexgen-dist policy` and `generate --policy auto|FILE.yaml` through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hf_oracle import hf_greedy
from test_parity import PROMPTS, run_cli
from test_policy_search import _profile

from flexgen_dist.cli import main
from flexgen_dist.policy.hardware import load_profile, save_profile

REPO = Path(__file__).resolve().parents[1]
T4 = str(REPO / "configs" / "hardware" / "t4-paper.yaml")


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_profile_measures_this_machine(tmp_path: Path, capsys) -> None:
    out = tmp_path / "hw.yaml"
    assert main(["profile", "--device", "cpu", "--dtype", "float32", "--hidden-sizes", "256", "--disk-sample", "8MiB",
                 "--offload-dir", str(tmp_path / "disk"), "--output", str(out)]) == 0
    hw = load_profile(out)
    speeds = hw.speeds("float32")
    assert set(speeds.gemm_flops) == {"256x256", "1024x256", "256x1024", "50272x256"}
    assert all(rate > 0 for table in speeds.gemm_flops.values() for rate in table.values())
    assert hw.disk_read_bytes_per_s > 0 and hw.disk_write_bytes_per_s > 0
    assert 0 <= hw.compute_io_overlap <= 1 and 0 <= hw.decode_compute_io_overlap <= 1
    assert hw.cpu_memory_bytes > 0 and not list((tmp_path / "disk").iterdir())  # its files are gone


def test_policy_command_writes_a_policy_file_generate_runs(tmp_path: Path, capsys, opt_preln_dir) -> None:
    hw = tmp_path / "hw.yaml"
    save_profile(_profile(), hw)
    policy_file = tmp_path / "policy.yaml"
    assert main(["policy", "--model", str(opt_preln_dir), "--hardware", str(hw), "--prompt-len", "19", "--gen-len",
                 "12", "--num-prompts", "5", "--max-memory", "cpu=64MiB", "--output", str(policy_file)]) == 0
    written = yaml.safe_load(policy_file.read_text())
    assert written["predicted"]["throughput_tok_s"] > 0 and written["workload"]["num_prompts"] == 5
    outputs, _ = run_cli(tmp_path / "run", opt_preln_dir, "--policy", str(policy_file))
    assert outputs == hf_greedy(opt_preln_dir, PROMPTS, 12)


def test_policy_command_plans_for_the_paper_t4(capsys) -> None:
    assert main(["policy", "--model", "opt-30b", "--hardware", T4]) == 0
    written = yaml.safe_load(capsys.readouterr().out)
    policy = written["policy"]
    assert policy["w_gpu_percent"] < 50 and written["predicted"]["peak_bytes"]["gpu"] <= 16e9
    assert written["workload"] == {"model": "opt-30b", "prompt_len": 512, "gen_len": 32, "num_prompts": None,
                                   "stages": 1, "dtype": "float16", "hardware": "NVIDIA T4 (FlexGen paper)"}


def test_generate_with_policy_auto_equals_hf_and_fits_the_budget(tmp_path: Path, capsys, opt_preln_dir) -> None:
    hw = tmp_path / "hw.yaml"
    save_profile(_profile(disk_read=1e8), hw)
    # A budget under the checkpoint's float32 weights (~0.9 MB): the search must put part of them on disk.
    outputs, _ = run_cli(tmp_path / "run", opt_preln_dir, "--policy", "auto", "--hardware", str(hw),
                         "--max-memory", "cpu=700KiB", "--no-compression")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert outputs == hf_greedy(opt_preln_dir, PROMPTS, 12)
    search = summary["policy_search"]
    assert search["hardware"] == "synthetic cpu" and search["predicted"]["throughput_tok_s"] > 0
    assert summary["policy"]["w_gpu_percent"] < 100
    assert summary["peak_bytes"]["gpu"] + summary["peak_bytes"]["cpu"] <= 700 << 10


def test_generate_policy_auto_plans_each_stage_on_its_own(tmp_path: Path, capsys, opt_preln_dir) -> None:
    """Two stages: one block shape, each stage's placement searched on its own layers under its own budget, which
    each stage's peak stays within; output still HF's."""
    hw = tmp_path / "hw.yaml"
    save_profile(_profile(disk_read=1e8), hw)
    outputs, _ = run_cli(tmp_path / "run", opt_preln_dir, "--policy", "auto", "--hardware", str(hw),
                         "--max-memory", "cpu=700KiB", "--no-compression", "--stages", "2")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert outputs == hf_greedy(opt_preln_dir, PROMPTS, 12)
    stages = summary["policy_search"]["stages"]
    assert len(stages) == 2 == len(summary["stage_policies"])
    shapes = {(p["gpu_batch_size"], p["num_gpu_batches"]) for p in summary["stage_policies"]}
    assert len(shapes) == 1 and summary["policy"] == summary["stage_policies"][0]
    for stage in summary["stage_stats"]:
        assert stage["peak_bytes"]["gpu"] + stage["peak_bytes"]["cpu"] <= 700 << 10


def test_policy_command_plans_every_stage_within_its_budget(capsys) -> None:
    """Each of opt-30b's 4xT4 stages plans its own placement within its budget: with 40 GB of host memory each, they
    keep different shares of their weights in GPU memory (their layers and the embedding and head differ)."""
    assert main(["policy", "--model", "opt-30b", "--hardware", T4, "--stages", "4", "--max-memory",
                 "gpu=16GB,cpu=40GB", "--num-prompts", "1024"]) == 0
    pipe = yaml.safe_load(capsys.readouterr().out)["pipeline"]
    assert [s["over_budget"] for s in pipe["stages"]] == [None] * 4
    assert len({s["placement"]["weights"][0] for s in pipe["stages"]}) > 1  # placed stage by stage


def test_generate_policy_auto_keeps_pinned_flags(tmp_path: Path, capsys, opt_preln_dir) -> None:
    hw = tmp_path / "hw.yaml"
    save_profile(_profile(), hw)
    outputs, _ = run_cli(tmp_path / "run", opt_preln_dir, "--policy", "auto", "--hardware", str(hw),
                         "--gpu-batch-size", "2", "--compress-cache")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["policy"]["gpu_batch_size"] == 2 and summary["policy"]["compress_cache"]


@pytest.mark.parametrize("argv, needles", [
    (["generate", "--policy", "auto", "--percent", "100", "0", "100", "0", "100", "0"], ["--percent", "auto"]),
    (["generate", "--hardware", T4], ["--hardware", "--policy auto"]),
    (["generate", "--policy", "auto", "--hardware", T4], ["cuda device", "flexgen-dist policy"]),
    (["score", "--policy", "auto"], ["score", "policy auto"]),
    (["generate", "--no-compression"], ["--no-compression", "--policy auto"]),
    (["generate", "--policy", "auto", "--no-compression", "--compress-cache"], ["contradicts"]),
])
def test_policy_flag_misuse_is_one_line(capsys, opt_preln_dir, argv: list[str], needles: list[str]) -> None:
    command, *flags = argv
    _one_line_error(capsys, [command, "--model", str(opt_preln_dir), "--prompt", "hello", "--device", "cpu",
                             "--dtype", "float32", "--executor", "local", *flags], *needles)


def test_policy_command_refuses_what_cannot_fit(capsys) -> None:
    _one_line_error(capsys, ["policy", "--model", "opt-1.3b", "--hardware", T4, "--max-memory", "gpu=1MiB"],
                    "no policy fits")


def test_policy_command_refuses_a_broken_profile(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "hw.yaml"
    bad.write_text("name: x\ndevice: cpu\n")
    _one_line_error(capsys, ["policy", "--model", "opt-1.3b", "--hardware", str(bad)], "missing")


def test_a_job_config_can_ask_for_policy_auto() -> None:
    from flexgen_dist.job_config import parse_job_config
    from flexgen_dist.policy.auto import AutoPolicy

    job = parse_job_config({"model": "opt-125m", "dummy_weights": True, "policy": "auto",
                            "input": {"synthetic": {"n": 4, "prompt_len": 8}}}, "job.yaml")
    assert job.run.policy == AutoPolicy()
