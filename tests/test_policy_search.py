"""Hardware profiles, the cost model and the LP policy search (issue 4), on small synthetic profiles."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.budget import MemoryBudget
from flexgen_dist.memory.tiers import TIERS, Tier
from flexgen_dist.models.family import config_by_name, model_layers
from flexgen_dist.models.opt import OptConfig
from flexgen_dist.policy.cost_model import (
    CACHE_VARS,
    STAGED,
    WEIGHT_VARS,
    CostModel,
    Linear,
    Window,
    placement_values,
    predict,
)
from flexgen_dist.policy.hardware import (
    DtypeSpeeds,
    HardwareProfile,
    cgroup_memory_limit,
    load_profile,
    profile_from_mapping,
    save_profile,
)
from flexgen_dist.policy.memory_plan import check_budget, plan_bytes
from flexgen_dist.policy.search import SearchSpace, resolve_budgets, search_policy

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30
TINY = OptConfig("tiny", hidden_size=256, num_layers=4, num_heads=8, ffn_dim=1024, vocab_size=1000, max_positions=256)


def _speeds(flops: float = 1e11) -> DtypeSpeeds:
    return DtypeSpeeds(gemm_flops={"256x256": {1: flops / 20, 16: flops / 4, 256: flops}}, attention_flops=flops / 2,
                       decode_attention_bytes_per_s=1e10, cpu_decode_attention_bytes_per_s=5e9,
                       dequantize_elements_per_s=1e9)


def _profile(device: str = "cpu", memory: int = 64 * GiB, device_memory: int | None = None,
             disk_read: float = 1e9, overlap: float = 1.0) -> HardwareProfile:
    return HardwareProfile(name=f"synthetic {device}", device=device,
                           device_memory_bytes=memory if device_memory is None else device_memory,
                           cpu_memory_bytes=memory, disk_bytes=1 << 40, host_to_device_bytes_per_s=1e10,
                           device_to_host_bytes_per_s=1e10, disk_read_bytes_per_s=disk_read,
                           disk_write_bytes_per_s=disk_read / 2, memory_bytes_per_s=1e10,
                           dtypes={"float32": _speeds()}, compute_io_overlap=overlap,
                           decode_compute_io_overlap=overlap)


def _search(hw: HardwareProfile, budget: MemoryBudget, cfg: OptConfig = TINY, prompt_len: int = 32, gen_len: int = 8,
            **space):
    return search_policy(cfg, model_layers(cfg), hw, torch.float32, prompt_len, gen_len, budget,
                         space=SearchSpace(**space))


def _plan(cfg: OptConfig, policy: Policy, device: str, prompt_len: int = 32, gen_len: int = 8):
    return plan_bytes(cfg, model_layers(cfg), policy, torch.float32, torch.device(device), prompt_len, gen_len)


# ---- hardware profiles ----

def test_gemm_time_interpolates_in_log_rows_and_picks_the_nearest_shape() -> None:
    speeds = DtypeSpeeds({"256x256": {1: 1e9, 100: 1e11}, "4096x4096": {1: 1e10, 100: 1e12}}, 1, 1, 1, 1)
    assert speeds.gemm_seconds(256, 256, 1) == pytest.approx(2 * 256 * 256 / 1e9)
    assert speeds.gemm_seconds(256, 256, 10) == pytest.approx(2 * 10 * 256 * 256 / 1e10)  # halfway in log: 1e10
    assert speeds.gemm_seconds(256, 256, 1000) == pytest.approx(2 * 1000 * 256 * 256 / 1e11)  # flat past the end
    assert speeds.gemm_seconds(3000, 5000, 100) == pytest.approx(2 * 100 * 3000 * 5000 / 1e12)


def test_packed_gemms_price_only_layers_used_in_place() -> None:
    """The engine packs weights that stay in compute memory (prepack.py); staged or dequantized copies run F.linear."""
    plain = _profile()
    packed = dataclasses.replace(plain, dtypes={"float32": dataclasses.replace(
        _speeds(), packed_gemm_flops={"256x256": {1: 1e10, 16: 5e10, 256: 2e11}})})

    def seconds(hw: HardwareProfile, **policy) -> float:
        return predict(TINY, model_layers(TINY), Policy(gpu_batch_size=4, **policy), hw, torch.float32, 32, 8).block_s

    assert seconds(packed) < 0.8 * seconds(plain)
    streamed = dict(w_gpu_percent=50.0, w_cpu_percent=0.0)
    assert seconds(packed, **streamed) == pytest.approx(seconds(plain, **streamed))
    assert seconds(packed, compress_weight=True) == pytest.approx(seconds(plain, compress_weight=True))


def test_step_overhead_is_charged_per_layer_window_and_per_batch() -> None:
    hw = _profile()
    layers = len(model_layers(TINY))

    def block_s(profile: HardwareProfile, batches: int) -> float:
        policy = Policy(gpu_batch_size=2, num_gpu_batches=batches)
        return predict(TINY, model_layers(TINY), policy, profile, torch.float32, 32, 8).block_s

    costly = dataclasses.replace(hw, layer_overhead_s=1e-3, batch_layer_overhead_s=2e-4)
    steps = 8  # the prefill and 7 decode steps, each a window per layer
    for batches in (1, 3):
        extra = block_s(costly, batches) - block_s(hw, batches)
        assert extra == pytest.approx(steps * layers * (1e-3 + batches * 2e-4), rel=1e-6)
    codec = dataclasses.replace(hw, cache_codec_overhead_s=5e-4)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, compress_cache=True)
    extra = (predict(TINY, model_layers(TINY), policy, codec, torch.float32, 32, 8).block_s
             - predict(TINY, model_layers(TINY), policy, hw, torch.float32, 32, 8).block_s)
    assert extra == pytest.approx(steps * TINY.num_layers * 3 * 5e-4, rel=1e-6)


def test_profile_yaml_round_trip(tmp_path: Path) -> None:
    hw = _profile(overlap=0.4)
    hw = dataclasses.replace(hw, dtypes={"bfloat16": dataclasses.replace(
        _speeds(), packed_gemm_flops={"256x256": {1: 2e10, 256: 2e11}})})
    save_profile(hw, tmp_path / "hw.yaml")
    assert load_profile(tmp_path / "hw.yaml") == hw


@pytest.mark.parametrize("change, message", [
    ({"device": "tpu"}, "expected cuda or cpu"),
    ({"disk_read_bytes_per_s": -1.0}, "must not be negative"),
    ({"compute_io_overlap": 2.0}, "a share, 0 to 1"),
    ({"decode_compute_io_overlap": -0.5}, "must not be negative"),
    ({"dtypes": {"float32": {"gemm_flops": {"big": {1: 1.0}}}}}, "expected a weight shape"),
    ({"surprise": 1}, "unknown key"),
])
def test_bad_profiles_are_refused_in_one_line(change: dict, message: str) -> None:
    data = _profile().to_dict()
    if "dtypes" in change:  # a bad GEMM table inside an otherwise complete dtype
        data["dtypes"]["float32"].update(change["dtypes"]["float32"])
        change = {}
    data.update(change)
    with pytest.raises(UserError, match=message) as e:
        profile_from_mapping(data, "hw.yaml")
    assert "\n" not in str(e.value)


def test_missing_profile_fields_are_named() -> None:
    data = _profile().to_dict()
    del data["disk_read_bytes_per_s"]
    with pytest.raises(UserError, match="missing disk_read_bytes_per_s"):
        profile_from_mapping(data, "hw.yaml")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_memory_limit_reads_the_tightest_limit_on_the_path(tmp_path: Path, version: str) -> None:
    if version == "v1":
        (tmp_path / "proc").write_text("5:cpu:/\n4:memory:/job/step\n")
        leaf, name = tmp_path / "memory" / "job" / "step", "memory.limit_in_bytes"
        unlimited = "9223372036854771712"
    else:
        (tmp_path / "proc").write_text("0::/job/step\n")
        leaf, name = tmp_path / "job" / "step", "memory.max"
        unlimited = "max"
    leaf.mkdir(parents=True)
    (leaf / name).write_text(unlimited)
    (leaf.parent / name).write_text(str(4 * GiB))
    assert cgroup_memory_limit(str(tmp_path / "proc"), str(tmp_path)) == 4 * GiB
    (leaf.parent / name).write_text(unlimited)
    assert cgroup_memory_limit(str(tmp_path / "proc"), str(tmp_path)) is None


def test_shipped_profiles_load() -> None:
    paths = sorted((REPO / "configs" / "hardware").glob("*.yaml"))
    assert {p.name for p in paths} >= {"t4-paper.yaml", "dev-epyc-2core.yaml"}
    for path in paths:
        hw = load_profile(path)
        assert hw.dtypes and hw.disk_read_bytes_per_s > 0


# ---- the cost model ----

def test_linear_expressions() -> None:
    a = Linear(1.0, {"x": 2.0}) + Linear(0.5, {"x": 1.0, "y": 3.0})
    assert (a * 2).value({"x": 1.0, "y": 2.0}) == pytest.approx(2 * (1.5 + 3.0 + 6.0))
    assert (a + 1.0).const == 2.5


def test_decode_steps_use_the_decode_overlap() -> None:
    cfg = config_by_name("opt-125m")
    policy = Policy(gpu_batch_size=4, w_gpu_percent=0)
    hidden = predict(cfg, model_layers(cfg), policy, _profile(overlap=1.0), torch.float32, 16, 8)
    prefill_only = dataclasses.replace(_profile(overlap=0.0), decode_compute_io_overlap=1.0)
    serial = predict(cfg, model_layers(cfg), policy, prefill_only, torch.float32, 16, 8)
    assert serial.decode_s == pytest.approx(hidden.decode_s) and serial.prefill_s > hidden.prefill_s


def test_window_bounds_overlap_compute_and_disk_by_the_measured_share() -> None:
    window = Window(Linear(2.0), Linear(1.0), Linear(0.5), Linear())
    assert window.seconds({}, True, 1.0) == 2.0  # the longer resource
    assert window.seconds({}, True, 0.0) == 3.0  # nothing hidden
    assert window.seconds({}, True, 0.5) == 2.5
    assert window.seconds({}, False, 1.0) == 3.5  # overlap off: everything adds up


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("policy", [
    Policy(gpu_batch_size=4),
    Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=40, w_cpu_percent=30, cache_gpu_percent=25,
           cache_cpu_percent=50),
    Policy(gpu_batch_size=4, w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0),
    Policy(gpu_batch_size=4, num_gpu_batches=2, w_gpu_percent=50, cache_gpu_percent=50, compress_weight=True,
           compress_cache=True),
    Policy(gpu_batch_size=4, w_gpu_percent=20, w_cpu_percent=80, cache_gpu_percent=0, cache_cpu_percent=100,
           cpu_cache_compute=True),
])
def test_the_lps_memory_expressions_equal_the_engines_plan(device: str, policy: Policy) -> None:
    """The LP's linear bytes per tier equal plan_bytes (the engine's own allocations) up to page rounding."""
    hw = _profile(device)
    model = CostModel(TINY, model_layers(TINY), policy, hw, torch.float32, 32, 8)
    x = placement_values(policy, hw.shared_memory)
    plan = _plan(TINY, policy, device)
    for tier, linear in model.tier_bytes().items():
        assert linear.value(x) == pytest.approx(plan.total(tier), rel=0.01, abs=16 * 4096), tier


def test_prediction_moves_the_right_way() -> None:
    cfg = config_by_name("opt-1.3b")
    hw = _profile(disk_read=1e9)
    fast = predict(cfg, model_layers(cfg), Policy(gpu_batch_size=8), hw, torch.float32, 64, 16)
    on_disk = predict(cfg, model_layers(cfg), Policy(gpu_batch_size=8, w_gpu_percent=0), hw, torch.float32, 64, 16)
    assert 0 < fast.prefill_s and 0 < fast.decode_s
    assert on_disk.block_s > 16 * 5.3e9 / 1e9  # every step reads the 5.3 GB of weights at 1 GB/s
    bigger = predict(cfg, model_layers(cfg), Policy(gpu_batch_size=32), hw, torch.float32, 64, 16)
    assert bigger.throughput_tok_s > fast.throughput_tok_s  # weights are reused by more sequences
    assert fast.peak_bytes["disk"] == 0 and on_disk.peak_bytes["disk"] > 5e9



def test_a_decode_step_prices_its_gemms_over_the_whole_block() -> None:
    """The engine runs a decode step's GEMMs once over all the block's batches: 8x4 decodes like one batch of 32 (the
    weights read once), not like four of 8, while its prefill stays four prefills of 8."""
    cfg = config_by_name("opt-1.3b")
    hw = _profile()
    four = predict(cfg, model_layers(cfg), Policy(gpu_batch_size=8, num_gpu_batches=4), hw, torch.float32, 64, 16)
    one = predict(cfg, model_layers(cfg), Policy(gpu_batch_size=32), hw, torch.float32, 64, 16)
    eights = predict(cfg, model_layers(cfg), Policy(gpu_batch_size=8), hw, torch.float32, 64, 16)
    assert four.decode_s < 2 * eights.decode_s < 4 * eights.decode_s  # 16 rows run far below 32's rate per FLOP
    assert four.decode_s == pytest.approx(one.decode_s, rel=0.05)  # attention and elementwise work do not merge
    assert four.prefill_s == pytest.approx(4 * eights.prefill_s, rel=1e-6)


# ---- the search ----

def test_a_budget_that_holds_everything_keeps_everything_on_the_device() -> None:
    result = _search(_profile(), MemoryBudget(), max_block_size=16)
    p = result.policy
    assert (p.w_gpu_percent, p.cache_gpu_percent) == (100, 100)
    assert p.block_size == 16  # the largest block the work allows: weights reused the most
    assert result.prediction.peak_bytes["disk"] == 0


def test_a_budget_smaller_than_the_weights_puts_them_partly_on_disk_and_fits() -> None:
    cfg = config_by_name("opt-125m")
    weights = sum(layer.numel for layer in model_layers(cfg)) * 4
    budget = MemoryBudget(cpu=weights // 2)
    result = _search(_profile(), budget, cfg=cfg, max_block_size=32)
    p = result.policy
    assert p.w_disk_percent > 0  # (all of them, here: a split layer's memory piece costs the cores a copy)
    plan = _plan(cfg, p, "cpu")
    assert plan.total(Tier.GPU) + plan.total(Tier.CPU) <= weights // 2  # cpu= alone bounds the one RAM


def test_both_memory_budgets_of_a_cpu_device_are_one_ram_for_the_search() -> None:
    """gpu= and cpu= on a CPU device name the same RAM: the search may fill the gpu tier (where weights and cache are
    used in place) with both, and the run's budget check accepts the plan."""
    cfg = config_by_name("opt-125m")
    weights = sum(layer.numel for layer in model_layers(cfg)) * 4
    budget = MemoryBudget(gpu=weights * 3 // 4, cpu=weights * 3 // 4)
    p = _search(_profile(), budget, cfg=cfg, max_block_size=32).policy
    plan = _plan(cfg, p, "cpu")
    assert plan.total(Tier.GPU) > budget.gpu  # every weight in memory: more than gpu= alone holds
    assert p.w_disk_percent == 0 and plan.total(Tier.GPU) + plan.total(Tier.CPU) <= budget.gpu + budget.cpu
    check_budget(plan, budget, one_ram=True)


def test_a_gpu_smaller_than_the_model_streams_weights_from_cpu_memory() -> None:
    cfg = config_by_name("opt-125m")
    hw = _profile("cuda", memory=64 * GiB, device_memory=GiB)
    result = _search(hw, MemoryBudget(gpu=600 << 20), cfg=cfg, max_block_size=32)  # float32 weights: ~500 MB
    p = result.policy
    assert p.w_cpu_percent > 0 and p.w_disk_percent == 0
    assert _plan(cfg, p, "cuda").total(Tier.GPU) <= 600 << 20


def test_no_policy_fits_a_tiny_budget() -> None:
    with pytest.raises(UserError, match="no policy fits the memory budgets") as e:
        _search(_profile(), MemoryBudget(gpu=1 << 20, cpu=1 << 20))
    assert "\n" not in str(e.value)


def test_pinned_choices_and_the_block_limit_are_respected() -> None:
    result = _search(_profile(), MemoryBudget(), gpu_batch_sizes=(2,), compress_weight=(True,), max_block_size=8)
    assert result.policy.gpu_batch_size == 2 and result.policy.compress_weight
    assert result.policy.block_size <= 8


def test_default_budgets_leave_a_margin_and_share_one_ram_on_a_cpu_device() -> None:
    budgets = resolve_budgets(MemoryBudget(), _profile(memory=16 * GiB))
    assert budgets.shared_memory == budgets.cpu < 16 * GiB - GiB + 1
    assert resolve_budgets(MemoryBudget(cpu=3 * GiB), _profile()).shared_memory == 3 * GiB
    cuda = resolve_budgets(MemoryBudget(), _profile("cuda", device_memory=16 * GiB))
    assert cuda.shared_memory is None and cuda.gpu < 16 * GiB


def test_the_searched_policy_is_the_best_of_the_candidates_it_beat() -> None:
    """Exhaustive check on a small space: no candidate's own LP optimum predicts more than the chosen one."""
    hw = _profile(disk_read=5e8, overlap=0.5)
    cfg = config_by_name("opt-125m")
    weights = sum(layer.numel for layer in model_layers(cfg)) * 4
    budget = MemoryBudget(cpu=weights * 3 // 4)
    chosen = _search(hw, budget, cfg=cfg, max_block_size=16, gpu_batch_sizes=(1, 4, 16), num_gpu_batches=(1, 4))
    for batch in (1, 4, 16):
        for blocks in (1, 4):
            if batch * blocks > 16:
                continue
            other = _search(hw, budget, cfg=cfg, max_block_size=16, gpu_batch_sizes=(batch,),
                            num_gpu_batches=(blocks,))
            assert other.prediction.throughput_tok_s <= chosen.prediction.throughput_tok_s * 1.02


def test_search_is_fast_on_this_machines_profile() -> None:
    hw = load_profile(REPO / "configs" / "hardware" / "dev-epyc-2core.yaml")
    cfg = config_by_name("opt-6.7b")
    start = time.perf_counter()
    search_policy(cfg, model_layers(cfg), hw, torch.float32, 512, 32, MemoryBudget(cpu=8 * GiB))
    assert time.perf_counter() - start < 2.0


def test_the_lp_variables_cover_every_tier() -> None:
    assert set(WEIGHT_VARS) == set(CACHE_VARS) == set(TIERS) and STAGED not in WEIGHT_VARS.values()


def test_paper_profile_plans_opt_175b_like_the_paper() -> None:
    """On the T4, 175B cannot sit on the GPU: weights go to CPU memory and disk, and the block is large."""
    hw = load_profile(REPO / "configs" / "hardware" / "t4-paper.yaml")
    cfg = config_by_name("opt-175b")
    result = search_policy(cfg, model_layers(cfg), hw, torch.float16, 512, 32, MemoryBudget())
    p = result.policy
    assert p.w_gpu_percent < 10 and p.block_size >= 64
    assert result.prediction.peak_bytes["gpu"] <= hw.device_memory_bytes
    assert dataclasses.asdict(result.budgets)["shared_memory"] is None


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_auto_plans_at_least_one_block_per_stage(stages):
    """A pipeline needs a block per stage in flight: with the prompts for it, the search never makes fewer blocks."""
    from flexgen_dist.policy.auto import AutoPolicy, choose_policy

    cfg = config_by_name("opt-1.3b")
    result = choose_policy(AutoPolicy(), cfg, _profile(), torch.float32, 64, 16, MemoryBudget(), stages, 128)
    assert 128 // result.policy.block_size >= stages
