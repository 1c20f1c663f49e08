"""The pipeline model: its event-by-event replay of the coordinator's schedule, and the per-stage plans
`flexgen-dist policy --stages S` prints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flexgen_dist.cli import main
from flexgen_dist.engine.policy import Policy
from flexgen_dist.models.family import config_by_name, model_layers
from flexgen_dist.policy.cost_model import predict
from flexgen_dist.policy.hardware import load_profile
from flexgen_dist.policy.pipeline_model import StageTimes, predict_pipeline, simulate

REPO = Path(__file__).resolve().parents[1]
T4 = REPO / "configs" / "hardware" / "t4-paper.yaml"


def test_one_stage_is_every_step_one_after_the_other():
    stage = StageTimes((1.0,), (0.1,) * 31, (0.0, 0.0))
    total, busy, idle = simulate([stage], num_blocks=4, parts_per_prefill=1, in_flight=1, round_trip_s=0.0)
    assert total == pytest.approx(4 * (1.0 + 3.1)) and busy == [pytest.approx(total)] and idle == [0.0]
    total, _, idle = simulate([stage], 4, 1, 1, round_trip_s=0.01)
    assert total == pytest.approx(4 * (1.0 + 3.1) + 4 * 32 * 0.01) and idle[0] == pytest.approx(4 * 32 * 0.01)


def test_cut_prefills_shrink_the_bubble_of_two_stages():
    """Two equal halves of the one-stage model: whole prefills hold the other block's decode up behind them; parts sent
    in turn keep both stages nearly busy, and the speedup nears 2."""
    one = simulate([StageTimes((1.0,), (0.1,) * 31, (0.0, 0.0))], 4, 1, 1, 0.0)[0]
    whole = StageTimes((0.5,), (0.05,) * 31, (0.0, 0.0))
    parts = StageTimes((0.125,) * 4, (0.05,) * 31, (0.0, 0.0))
    t_whole, busy, idle_whole = simulate([whole, whole], 4, 1, 2, 0.0)
    t_parts, _, idle_parts = simulate([parts, parts], 4, 4, 2, 0.0)
    assert busy == [pytest.approx(one / 2)] * 2
    assert sum(idle_parts) < sum(idle_whole) / 3
    assert 1.9 < one / t_parts <= 2.0 and one / t_whole < 1.85


def test_one_stage_pipeline_is_the_cost_model_block_by_block():
    cfg, hw = config_by_name("opt-1.3b"), load_profile(T4)
    policy = Policy(gpu_batch_size=16, num_gpu_batches=1)
    one = predict(cfg, model_layers(cfg), policy, hw, torch.float16, 64, 32)
    piped = predict_pipeline(cfg, [policy], [hw], torch.float16, 64, 32, num_prompts=64)
    steps = 4 * 32  # blocks x steps, each with the driver's round trip
    assert piped.total_s == pytest.approx(4 * one.block_s + steps * 0.005, rel=1e-6)
    assert piped.stage_layers == ((0, len(model_layers(cfg))),)


def test_policy_command_prints_every_stage_and_the_pipeline(capsys, tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["policy", "--model", "opt-6.7b", "--hardware", str(T4), "--stages", "2", "--num-prompts", "128",
                 "--max-memory", "gpu=16GB,cpu=100GB", "--output", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    pipe = written["pipeline"]
    assert [s["stage"] for s in pipe["stages"]] == [0, 1]
    assert pipe["stages"][0]["layers"][0] == 0 and pipe["stages"][0]["layers"][1] == pipe["stages"][1]["layers"][0]
    assert all(s["prefill_s"] > 0 and s["decode_s"] > 0 and s["busy_s"] > 0 for s in pipe["stages"])
    assert pipe["stages"][0]["over_budget"] is None and pipe["prefill_chunks"] == 4
    assert pipe["predicted"]["throughput_tok_s"] > 0 and 0 <= pipe["predicted"]["bubble"] < 1
    assert main(["policy", "--model", "opt-6.7b", "--hardware", str(T4)]) == 0
    assert "pipeline" not in yaml.safe_load(capsys.readouterr().out)  # one stage: nothing to pipeline
