"""`--policy auto` without `--hardware`: the profile is measured where a stage computes (its threads; on Ray, its node:
tests/test_multinode.py), within the run's memory budget, once per machine and thread count, and grown by the layer
shapes of a new model instead of measured again."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_parity import PROMPTS, run_cli
from test_policy_search import _profile

from flexgen_dist.policy import auto, profiler
from flexgen_dist.policy.hardware import load_profile, save_profile


def test_a_run_scope_holds_its_memory_allowance(tmp_path: Path) -> None:
    """The measurements of a run's scope hold at most its allowance at once (the broad profile held 4.6 GB)."""
    allowance = 256 << 20
    code = f"""
import resource, torch
from flexgen_dist.policy import profiler
torch.set_num_threads(1)
torch.randn(1)  # torch's own start-up memory belongs to the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
scope = profiler.ProfileScope.for_run(256, {allowance})
profile = profiler.measure_profile(torch.device("cpu"), [torch.float32], {str(tmp_path)!r}, scope)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, sorted(profile.dtypes["float32"].gemm_flops))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, shapes = out.stdout.split(" ", 1)
    assert int(grown) <= allowance, f"the profile grew the process by {int(grown) >> 20} MiB"
    # Only the run's model's shapes; its LM head on a slice of rows that fits the cold set (a quarter of the allowance).
    assert eval(shapes) == ["1024x256", "256x1024", "256x256", "32768x256"]
    assert not any(tmp_path.iterdir())  # its disk files are gone


def test_a_cached_profile_gains_a_new_models_shapes_and_keeps_the_rest(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = auto.cache_path("cpu", torch.get_num_threads())
    path.parent.mkdir(parents=True)
    save_profile(_profile(disk_read=123e6), path)
    grown = auto.machine_profile(torch.device("cpu"), torch.float32, str(tmp_path), hidden_size=64,
                                 memory_bytes=64 << 20)
    assert set(grown.dtypes["float32"].gemm_flops) == {"256x256", "64x64", "256x64", "64x256", "32768x64"}
    assert grown.disk_read_bytes_per_s == 123e6 and load_profile(path) == grown  # the rest as cached; saved

    def measured(*_):
        raise AssertionError("a cached profile with the model's shapes is measured again")

    monkeypatch.setattr(profiler, "gemm_tables", measured)
    monkeypatch.setattr(profiler, "measure_profile", measured)
    assert auto.machine_profile(torch.device("cpu"), torch.float32, None, hidden_size=64) == grown


def test_the_cache_is_per_thread_count(tmp_path: Path, monkeypatch) -> None:
    """A stage given one core computes at about half the GEMM rate of two: its profile is its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert auto.cache_path("cpu", 1) != auto.cache_path("cpu", 2)
    assert auto.cache_path("cuda", 1) == auto.cache_path("cuda", 2)


def test_the_profile_allowance_is_the_run_budget() -> None:
    from flexgen_dist.memory.budget import MemoryBudget

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto.profile_memory(MemoryBudget(gpu=800 << 20, cpu=200 << 20), cpu) == 1000 << 20  # one RAM
    assert auto.profile_memory(MemoryBudget(gpu=800 << 20, cpu=200 << 20), cuda) == 200 << 20  # host buffers
    assert auto.profile_memory(MemoryBudget(), cpu) == 2 << 30


def test_generate_policy_auto_measures_this_machine_once(tmp_path: Path, monkeypatch, capsys, opt_preln_dir) -> None:
    """In process, the first auto run measures (within its budget, for the model's hidden size) and caches; the
    second reads the cache. Both give the same tokens as a fixed policy."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    budget = ("--max-memory", "gpu=32MiB,cpu=32MiB")
    first, _ = run_cli(tmp_path / "first", opt_preln_dir, "--policy", "auto", *budget)
    assert "measuring this machine" in capsys.readouterr().err
    cached = load_profile(auto.cache_path("cpu", torch.get_num_threads()))
    assert all(key.endswith("x64") or key.startswith("64x") for key in cached.dtypes["float32"].gemm_flops)
    second, _ = run_cli(tmp_path / "second", opt_preln_dir, "--policy", "auto", *budget)
    captured = capsys.readouterr()
    assert "measuring" not in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["policy_search"]["hardware"] == cached.name
    fixed, _ = run_cli(tmp_path / "fixed", opt_preln_dir)
    assert first == second == fixed and len(first) == len(PROMPTS)


@pytest.mark.parametrize("budget,expect", [(64 << 20, 16 << 20), (4 << 30, 512 << 20)])
def test_a_run_scope_is_in_proportion_to_its_budget(budget: int, expect: int) -> None:
    scope = profiler.ProfileScope.for_run(2048, budget)
    assert scope.cold_bytes == expect and scope.hidden_sizes == (2048,)
    assert scope.disk_sample_bytes <= 512 << 20 and 3 * scope.copy_bytes <= budget
    assert replace(scope, memory_bytes=1 << 40).cold_bytes == 512 << 20  # never beyond the broad profile's
