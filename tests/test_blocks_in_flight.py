"""More blocks in flight than stages (--blocks-in-flight): every stage holds each one's KV cache, the plan checks it
against the budgets before loading, and the output is the same whatever the count."""

from __future__ import annotations

import json

import pytest
import torch
from hf_oracle import hf_greedy
from test_parity import MAX_NEW, PROMPTS, run_cli

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.io.model_source import model_config
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.memory.tiers import Tier
from flexgen_dist.models.family import model_layers
from flexgen_dist.policy.memory_plan import plan_bytes
from flexgen_dist.run import plan_stages
from flexgen_dist.run_config import RunConfig
from flexgen_dist.runtime.partition import embedding_resident, partition, resident_work


@pytest.mark.parametrize("in_flight", ["1", "3", "5"])
def test_the_count_in_flight_does_not_change_the_tokens(tmp_path, opt_postln_dir, in_flight, capsys):
    ours, _ = run_cli(tmp_path, opt_postln_dir, "--gpu-batch-size", "1", "--stages", "2", "--blocks-in-flight", in_flight)
    assert ours == hf_greedy(opt_postln_dir, PROMPTS, MAX_NEW)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["blocks_in_flight"] == int(in_flight)


def test_one_block_per_stage_by_default(tmp_path, opt_postln_dir, capsys):
    run_cli(tmp_path, opt_postln_dir, "--gpu-batch-size", "1", "--stages", "2")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["blocks_in_flight"] == 2


def _largest_stage_bytes(cfg, policy: Policy, in_flight: int) -> int:
    """The biggest stage's bytes in RAM (the gpu and cpu tiers of a CPU device) with `in_flight` blocks."""
    layers = model_layers(cfg)
    ranges = partition(layers, 2, resident_work(embedding_resident(policy.w_gpu_percent), 8, 4))
    return max(sum(plan_bytes(cfg, layers[a:b], policy, torch.float32, torch.device("cpu"), 8, 4, in_flight).total(t)
                   for t in (Tier.GPU, Tier.CPU)) for a, b in ranges)


def test_blocks_in_flight_are_planned_against_the_budgets(opt_preln_dir):
    cfg = model_config(str(opt_preln_dir))
    policy = Policy(gpu_batch_size=4, num_gpu_batches=1)
    two, four = _largest_stage_bytes(cfg, policy, 2), _largest_stage_bytes(cfg, policy, 4)
    assert four > two  # each block in flight adds its KV cache to every stage

    def planned(budget: MemoryBudget, requested: int | None) -> int:
        run = RunConfig(str(opt_preln_dir), policy, stages=2, device="cpu", dtype="float32", budget=budget,
                        blocks_in_flight=requested)
        return plan_stages(run, cfg, torch.float32, torch.device("cpu"), 8, 4).blocks_in_flight

    between = MemoryBudget(gpu=(two + four) // 2, cpu=0)
    assert planned(between, None) == 2 and planned(MemoryBudget(), 4) == 4
    with pytest.raises(UserError, match="but --max-memory gives"):
        planned(between, 4)  # refused before loading, not run into the OOM killer


def test_blocks_in_flight_must_be_positive():
    with pytest.raises(UserError, match="--blocks-in-flight must be >= 1"):
        RunConfig("m", Policy(), blocks_in_flight=0)


def test_lm_eval_model_args_take_the_count():
    from flexgen_dist.evaluation.model_args import run_config

    assert run_config({"model": "m", "blocks_in_flight": 3}).blocks_in_flight == 3


def test_the_policy_search_prices_every_block_in_flight(monkeypatch):
    """--policy auto with --blocks-in-flight plans each stage for that many blocks' KV caches, not one per stage."""
    from test_policy_search import _profile

    from flexgen_dist.models.family import config_by_name
    from flexgen_dist.policy import auto

    priced = []
    real = auto.search_policy

    def spy(*args, **kwargs):
        priced.append(kwargs["blocks_in_flight"])
        return real(*args, **kwargs)

    monkeypatch.setattr(auto, "search_policy", spy)
    cfg, hw = config_by_name("opt-125m"), _profile()
    result = auto.choose_policy(auto.AutoPolicy(), cfg, hw, torch.float32, 64, 16, MemoryBudget(), 2, 128, 4)
    auto.stage_policies(result, cfg, [hw, hw], torch.float32, 64, 16, MemoryBudget(), 4)
    auto.choose_policy(auto.AutoPolicy(), cfg, hw, torch.float32, 64, 16, MemoryBudget(), 2, 128)
    assert priced[:-1] == [4] * (len(priced) - 1) and priced[-1] == 2
