"""The Ray pipeline on a real local cluster: S = 1, 2, 3 stages give HF's greedy output for several placements, for
OPT and the Llama family."""

from __future__ import annotations

import json

import pytest
from hf_oracle import hf_greedy
from test_parity import MAX_NEW, PROMPTS, run_cli

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.run_config import RunConfig

PLACEMENTS = [
    ("resident", "100 0 100 0 100 0", 2, 2),
    ("offloaded-mixed", "30 30 30 30 100 0", 1, 3),
    ("all-disk", "0 0 0 0 100 0", 2, 1),
]


@pytest.mark.parametrize("model", ["opt_postln_dir", "llama_dir"])  # OPT-350m's layout; GQA, rotary, untied head
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("name,percent,gbs,ngb", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_ray_pipeline_matches_hf(tmp_path, request, ray_cluster, model, stages, name, percent, gbs, ngb, capsys):
    model_dir = request.getfixturevalue(model)
    ours, _ = run_cli(tmp_path, model_dir, "--percent", *percent.split(), "--gpu-batch-size", str(gbs),
                      "--num-gpu-batches", str(ngb), "--stages", str(stages), "--ray-address", ray_cluster["address"],
                      executor="ray")
    assert ours == hf_greedy(model_dir, PROMPTS, MAX_NEW)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["stage"] for s in summary["stage_stats"]] == list(range(stages))
    assert all(s["busy_s"] > 0 for s in summary["stage_stats"])
    offload = tmp_path / "offload"
    assert not offload.exists() or not any(offload.rglob("*.bin")), "stages must delete their offload files"


def test_stage_failure_to_load_is_one_clear_line(tmp_path, ray_cluster, opt_preln_dir, capsys):
    """An error raised inside a stage actor (here: an offload dir that cannot be created) reaches the user as one line."""
    from flexgen_dist.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": 1, "input_ids": [5, 6]}) + "\n")
    rc = main(["generate", "--model", str(opt_preln_dir), "--prompts", str(prompts), "--percent", "0", "0", "100", "0",
               "100", "0", "--ray-address", ray_cluster["address"], "--stages", "2",
               "--offload-dir", str(blocker / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "offload directory" in err, err


def test_unplaceable_stages_fail_with_an_actionable_line(tmp_path, ray_cluster, opt_preln_dir, capsys, monkeypatch):
    """STRICT_SPREAD wants one node per stage; the test cluster has one node."""
    from flexgen_dist.cli import main
    from flexgen_dist.runtime import ray_executor

    monkeypatch.setattr(ray_executor, "PLACEMENT_TIMEOUT_S", 3.0)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": 1, "input_ids": [5, 6]}) + "\n")
    rc = main(["generate", "--model", str(opt_preln_dir), "--prompts", str(prompts), "--stages", "2",
               "--placement-strategy", "STRICT_SPREAD", "--ray-address", ray_cluster["address"]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "cannot place 2 stages" in err and "STRICT_SPREAD" in err and "ray status" in err


@pytest.mark.parametrize("gpus,stages,share", [(0, 2, None), (1, 2, 0.5), (1, 1, 1.0), (4, 4, 1.0), (8, 2, 1.0),
                                               (2, 3, 0.5), (2, 4, 0.5), (3, 4, 0.5), (1, 3, 1 / 3)])
def test_stages_share_gpus_in_whole_numbers_per_gpu(gpus, stages, share):
    """Fewer GPUs than stages: every stage the same fraction of one, so each GPU holds a whole number of stages."""
    from flexgen_dist.runtime.ray_executor import stage_bundle

    bundle = stage_bundle(gpus, stages, 1.0)
    assert bundle.get("GPU") == (pytest.approx(share) if share else None) and bundle["CPU"] == 1.0
    if share:
        per_gpu = round(1 / share)
        assert per_gpu * max(1, gpus) >= stages  # every stage finds room


def test_auto_executor_keeps_one_stage_of_this_machine_in_process(monkeypatch):
    """Ray only where it buys something: more stages, a cluster to join, or Ray CPUs asked for per stage."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    policy = Policy()
    assert RunConfig("m", policy).executor_name == "local"
    assert RunConfig("m", policy, stages=2).executor_name == "ray"
    assert RunConfig("m", policy, ray_address="127.0.0.1:6379").executor_name == "ray"
    assert RunConfig("m", policy, cpus_per_stage=1.0).executor_name == "ray"
    assert RunConfig("m", policy, executor="ray").executor_name == "ray"
    assert RunConfig("m", policy, stages=2, executor="local").executor_name == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as `ray job submit` sets it
    assert RunConfig("m", policy).executor_name == "ray"
    with pytest.raises(UserError, match="--executor: expected one of auto, ray, local, got 'threads'"):
        RunConfig("m", policy, executor="threads")
