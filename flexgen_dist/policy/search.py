"""Policy search (`--policy auto`): for each candidate batch shape, a linear program places weights and KV cache across
the tiers to minimize the block time under the tier budgets; the candidate with the best predicted throughput wins.

A candidate fixes what is discrete: GPU batch size, GPU batches per block, weight and cache compression, CPU
attention. The LP (pulp with CBC) chooses the placement fractions and whether a layer is staged (0/1), with one
variable per distinct layer window bounding its resources (cost_model.py); decode steps are taken at their mean cache
length. Candidates are visited best bound first (compute alone, or the I/O no placement avoids), 16 LPs to one CBC
run, and the search stops when no remaining bound can beat the best solution: a few dozen LPs decide among hundreds
of shapes in about a second.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, replace

import pulp
import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.budget import MemoryBudget, format_bytes
from flexgen_dist.memory.tiers import TIERS, Tier
from flexgen_dist.models.family import ModelConfig
from flexgen_dist.models.layout import LayerSpec
from flexgen_dist.policy.cost_model import (
    CACHE_VARS,
    STAGED,
    WEIGHT_VARS,
    CostModel,
    Prediction,
    placement_values,
    predict,
    step_seconds,
)
from flexgen_dist.policy.hardware import HardwareProfile
from flexgen_dist.policy.memory_plan import TierPlan, plan_bytes

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NUM_GPU_BATCHES = (1, 2, 4, 8, 16, 32)
_MEMORY_MARGIN_FRACTION = 0.10  # of a detected capacity, left to the runtime, allocator slack, the OS
_MEMORY_MARGIN_MIN = 1 << 30  # ... and at least this much of a memory tier (Python, torch, Ray take ~0.7 GiB)
# Weight of moved bytes' time in the LP objective, next to the block time: I/O hidden under compute still costs a
# little, so the cache stays in memory when memory is plenty (a staged copy attends over fewer positions than a home).
_TIE_BREAK = 0.05
_OVERFLOW_PENALTY = 1e7  # seconds per GiB over budget: any overflow outweighs every real block time
_BATCH = 16  # candidates per CBC run


@dataclass(frozen=True)
class Budgets:
    """Bytes the search may place on each tier, and on a CPU compute device (where the "gpu" and "cpu" tiers are the
    same RAM) the bytes of both together: `shared_memory`, else None."""

    gpu: int
    cpu: int
    disk: int
    shared_memory: int | None

    def fits(self, plan: TierPlan) -> Tier | None:
        """The first tier `plan` overflows, or None."""
        need = {t: plan.total(t) for t in TIERS}
        for tier in TIERS:
            if need[tier] > getattr(self, tier.value):
                return tier
        if self.shared_memory is not None and need[Tier.GPU] + need[Tier.CPU] > self.shared_memory:
            return Tier.GPU if need[Tier.GPU] >= need[Tier.CPU] else Tier.CPU
        return None

    def describe(self) -> str:
        text = ", ".join(f"{t.value} {format_bytes(getattr(self, t.value))}" for t in TIERS)
        if self.shared_memory is not None:
            text += f", gpu + cpu (one RAM) {format_bytes(self.shared_memory)}"
        return text


def resolve_budgets(budget: MemoryBudget, hardware: HardwareProfile) -> Budgets:
    """The user's --max-memory per tier where given, elsewhere the profile's capacity less a safety margin. On a CPU
    device the two memory tiers are one RAM, bounded together: by the RAM less the margin, and by the sum of the gpu
    and cpu budgets given (MemoryBudget.one_ram)."""
    def usable(capacity: int, memory: bool) -> int:
        margin = max(_MEMORY_MARGIN_MIN if memory else 0, int(capacity * _MEMORY_MARGIN_FRACTION))
        return max(0, capacity - margin)

    ram = usable(hardware.cpu_memory_bytes, True)
    disk = usable(hardware.disk_bytes, False) if budget.disk is None else budget.disk
    if not hardware.shared_memory:
        return Budgets(gpu=usable(hardware.device_memory_bytes, True) if budget.gpu is None else budget.gpu,
                       cpu=ram if budget.cpu is None else budget.cpu, disk=disk, shared_memory=None)
    # One RAM: gpu= and cpu= are two names for the same memory, so either tier may take all of it. The search keeps
    # weights and cache in the gpu tier (used in place), so holding it to gpu= alone wasted the cpu= budget: issue
    # 20's offloaded opt-1.3b run (gpu=1GiB,cpu=1GiB) put its 4-bit cache on disk, 201 s of its 810 s waiting on it.
    if budget.one_ram() is not None:
        ram = min(ram, budget.one_ram())
    return Budgets(gpu=ram, cpu=ram, disk=disk, shared_memory=ram)


@dataclass(frozen=True)
class SearchSpace:
    """The discrete choices tried. A flag the user fixed (e.g. --compress-weight with --policy auto) has one value."""

    gpu_batch_sizes: tuple[int, ...] = BATCH_SIZES
    num_gpu_batches: tuple[int, ...] = NUM_GPU_BATCHES
    compress_weight: tuple[bool, ...] = (False, True)
    compress_cache: tuple[bool, ...] = (False, True)
    cpu_cache_compute: tuple[bool, ...] = (False, True)
    max_block_size: int | None = None  # the number of sequences: a larger block only computes padding


@dataclass(frozen=True)
class SearchResult:
    policy: Policy
    prediction: Prediction
    budgets: Budgets
    linear_programs: int  # LPs solved
    candidates: int  # shapes considered
    seconds: float

    def to_dict(self) -> dict:
        return {"predicted": self.prediction.to_dict(), "budgets": asdict(self.budgets),
                "linear_programs": self.linear_programs, "candidates": self.candidates, "search_s": self.seconds}


def _candidates(base: Policy, space: SearchSpace, cpu_device: bool) -> list[Policy]:
    out = []
    for batch in space.gpu_batch_sizes:
        for blocks in space.num_gpu_batches:
            if space.max_block_size is not None and batch * blocks > max(space.max_block_size, 1) and \
                    (batch > 1 or blocks > 1):
                continue
            for cw in space.compress_weight:
                for cc in space.compress_cache:
                    # On a CPU device attention already runs where the cache lives: the flag changes nothing.
                    for cpu_attention in ((False,) if cpu_device else space.cpu_cache_compute):
                        out.append(replace(base, gpu_batch_size=batch, num_gpu_batches=blocks, compress_weight=cw,
                                           compress_cache=cc, cpu_cache_compute=cpu_attention))
    return out


def _lower_bound_s(model: CostModel, decode_past: int, budgets: Budgets, blocks_in_flight: int) -> float:
    """A block time no placement of this candidate beats: its compute alone (at the cheapest cache placement for
    attention), or the I/O it cannot avoid, whichever is longer. Unavoidable I/O, every step: what does not fit on
    the compute device crosses to it (or, the cache with CPU attention, is read by the CPU), and what fits in no
    memory tier is read from disk; cache bytes count at the prompt's share of their positions, the least a decode
    step reads."""
    hw, speeds = model.hardware, model.speeds
    weights, cache = model.weight_bytes(), model.cache_bytes(blocks_in_flight)
    fixed = model.tier_bytes(blocks_in_flight)  # consts: workspace and staging a placement cannot avoid
    prompt_share = model.prompt_len / (model.prompt_len + model.gen_len)
    if hw.shared_memory:
        memory = (budgets.shared_memory or budgets.gpu) - fixed[Tier.GPU].const - fixed[Tier.CPU].const
        disk_s = prompt_share * max(0, weights + cache - memory) / hw.disk_read_bytes_per_s
        io_bound = model.gen_len * disk_s
    else:
        memory = budgets.gpu + budgets.cpu - fixed[Tier.GPU].const - fixed[Tier.CPU].const
        disk_s = prompt_share * max(0, weights + cache - memory) / hw.disk_read_bytes_per_s
        # Bytes off the device cross the link, or (cache, with CPU attention) are read by the CPU meanwhile.
        off_device = max(0, weights + prompt_share * cache - (budgets.gpu - fixed[Tier.GPU].const))
        rate = hw.host_to_device_bytes_per_s
        if model.policy.cpu_cache_compute:
            rate += speeds.cpu_decode_attention_bytes_per_s
        io_bound = model.gen_len * max(disk_s, off_device / rate)
    prefill, decode = model.step_windows(0), model.step_windows(decode_past)
    best = math.inf
    for cache_tier in (Tier.GPU, Tier.CPU):
        x = {v: 0.0 for v in (*WEIGHT_VARS.values(), *CACHE_VARS.values())}
        x.update({WEIGHT_VARS[Tier.GPU]: 1.0, CACHE_VARS[cache_tier]: 1.0, STAGED: 0.0})
        seconds = sum(n * w.compute.value(x) for n, w in prefill)
        seconds += (model.gen_len - 1) * sum(n * w.compute.value(x) for n, w in decode)
        best = min(best, seconds)
    return max(best, io_bound)


def _add_candidate(lp: pulp.LpProblem, tag: str, model: CostModel, budgets: Budgets, blocks_in_flight: int,
                   shrink: dict[Tier, int]) -> tuple[dict[str, pulp.LpVariable], pulp.LpVariable, list]:
    """One candidate's variables and constraints, named apart by `tag`; its objective terms, its placement
    variables, and its overflow variable: GiB past the budgets, so that a candidate with no fitting placement does
    not make the whole batch infeasible (any overflow in the solution means it does not fit)."""
    x = {name: lp.add_variable(f"{tag}_{name}", 0, 1) for name in (*WEIGHT_VARS.values(), *CACHE_VARS.values())}
    x[STAGED] = lp.add_variable(f"{tag}_{STAGED}", cat="Binary")
    overflow = lp.add_variable(f"{tag}_overflow", 0)

    def expr(linear) -> pulp.LpAffineExpression:
        return linear.const + pulp.lpSum(coef * x[name] for name, coef in linear.terms.items())

    lp += pulp.lpSum(x[v] for v in WEIGHT_VARS.values()) == 1
    lp += pulp.lpSum(x[v] for v in CACHE_VARS.values()) == 1
    if model.cpu_device:  # the two memory tiers are one RAM: keep each layer in one of them, so it is used in place
        lp += x[WEIGHT_VARS[Tier.CPU]] == 0
        lp += x[CACHE_VARS[Tier.CPU]] == 0
        lp += x[STAGED] >= x[WEIGHT_VARS[Tier.DISK]]
    else:
        lp += x[STAGED] >= x[WEIGHT_VARS[Tier.CPU]] + x[WEIGHT_VARS[Tier.DISK]]

    objective = [_OVERFLOW_PENALTY * overflow]
    for past, weight in ((0, 1), (model.mean_decode_past(), model.gen_len - 1)):
        if weight == 0:
            continue
        for i, (count, window) in enumerate(model.step_windows(past)):
            t = lp.add_variable(f"{tag}_t_{past}_{i}", 0)
            for bound in window.bounds(model.policy.overlap, model.hardware.overlap(decode=past > 0)):
                lp += t >= expr(bound)
            objective.append(weight * count * t)
            objective += [_TIE_BREAK * weight * count * expr(r) for r in window.resources()[1:]]

    mem = model.tier_bytes(blocks_in_flight)
    slack = (1 << 30) * overflow
    for tier in TIERS:
        lp += expr(mem[tier]) <= getattr(budgets, tier.value) - shrink.get(tier, 0) + slack
    if budgets.shared_memory is not None:
        lp += expr(mem[Tier.GPU]) + expr(mem[Tier.CPU]) <= budgets.shared_memory - sum(shrink.values()) + slack
    return x, overflow, objective


def _solve(models: list[CostModel], budgets: Budgets, blocks_in_flight: int,
           shrinks: list[dict[Tier, int]]) -> list[dict[str, float] | None]:
    """The LPs of several candidates, solved in one CBC run (they share no variable, so minimizing the sum of their
    objectives minimizes each: one solver process instead of one per candidate). Per candidate, its placement
    values, or None when nothing fits its budgets."""
    lp = pulp.LpProblem("placement", pulp.LpMinimize)
    parts = [_add_candidate(lp, f"c{i}", m, budgets, blocks_in_flight, shrink)
             for i, (m, shrink) in enumerate(zip(models, shrinks))]
    lp += pulp.lpSum(term for _, _, objective in parts for term in objective)
    # No optimality gap: CBC's default relative gap is on the batch's total, where a candidate's overflow penalty
    # would let the others stop far from their own optimum.
    with warnings.catch_warnings():  # PuLP 3.3 warns that 4.0 drops the bundled CBC; pyproject pins pulp < 4
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, gapRel=0, gapAbs=0)
    lp.solve(solver)
    if pulp.LpStatus[lp.status] != "Optimal":
        return [None] * len(models)
    return [None if (overflow.value() or 0) > 1e-6 else {name: v.value() or 0.0 for name, v in x.items()}
            for x, overflow, _ in parts]


def _block_seconds(model: CostModel, policy: Policy) -> float:
    """The LP's objective for a concrete policy: prefill plus every decode step at the mean cache length."""
    x = placement_values(policy, model.cpu_device)
    return step_seconds(model, 0, x) + (model.gen_len - 1) * step_seconds(model, model.mean_decode_past(), x)


def _as_policy(shape: Policy, values: dict[str, float], num_heads: int) -> Policy:
    """Percentages from the LP's fractions in units of 0.1% for weights and of heads (the cache's unit of placement):
    rounded down on the faster tiers, the rest to the slowest tier the LP used, so rounding neither opens a disk
    piece the LP did not want nor (rarely) overshoots a budget the LP filled."""
    def split(names: dict[Tier, str], units: int) -> tuple[int, int]:
        gpu = math.floor(values[names[Tier.GPU]] * units + 1e-6)  # 0.9999999 from the solver is 1
        cpu = min(math.floor(values[names[Tier.CPU]] * units + 1e-6), units - gpu)
        if values[names[Tier.DISK]] < 1e-6:  # no disk: the remainder goes to the slower memory tier in use
            if values[names[Tier.CPU]] > 1e-6:
                cpu = units - gpu
            else:
                gpu = units - cpu
        return gpu, cpu

    w_gpu, w_cpu = split(WEIGHT_VARS, 1000)
    gpu_heads, cpu_heads = split(CACHE_VARS, num_heads)
    return replace(shape, w_gpu_percent=w_gpu / 10, w_cpu_percent=w_cpu / 10,
                   cache_gpu_percent=100 * gpu_heads / num_heads, cache_cpu_percent=100 * cpu_heads / num_heads)


def search_policy(cfg: ModelConfig, layers: list[LayerSpec], hardware: HardwareProfile, dtype: torch.dtype,
                  prompt_len: int, gen_len: int, budget: MemoryBudget, base: Policy = Policy(),
                  space: SearchSpace = SearchSpace(), blocks_in_flight: int = 1) -> SearchResult:
    """The policy with the best predicted throughput that fits the budgets, for one stage holding `layers`
    (`blocks_in_flight`: the pipeline's stage count, each holding that many blocks' KV cache)."""
    start = time.perf_counter()
    budgets = resolve_budgets(budget, hardware)
    device = torch.device(hardware.device)
    shapes = _candidates(base, space, hardware.shared_memory)
    bounded = []
    for shape in shapes:
        model = CostModel(cfg, layers, shape, hardware, dtype, prompt_len, gen_len)
        bound_s = _lower_bound_s(model, model.mean_decode_past(), budgets, blocks_in_flight)
        bounded.append((shape.block_size * gen_len / bound_s, shape, model))
    # (bound, shape, model, shrink, tries), best bound first.
    pending = [(bound, shape, model, {}, 0) for bound, shape, model in sorted(bounded, key=lambda b: -b[0])]
    best: tuple[float, Policy] | None = None
    solved = 0
    while pending and (best is None or pending[0][0] > best[0]):
        count = sum(1 for c in pending[:_BATCH] if best is None or c[0] > best[0])
        batch, pending = pending[:count], pending[count:]
        results = _solve([c[2] for c in batch], budgets, blocks_in_flight, [c[3] for c in batch])
        solved += len(batch)
        retries = []
        for (bound, shape, model, shrink, tries), values in zip(batch, results):
            if values is None:
                continue
            policy = _as_policy(shape, values, cfg.num_kv_heads)
            plan = plan_bytes(cfg, layers, policy, dtype, device, prompt_len, gen_len, blocks_in_flight)
            over = budgets.fits(plan)
            if over is not None:  # rounding to pages and heads overshot the LP's budget: tighten, try again
                if tries < 3:
                    tighter = {**shrink, over: shrink.get(over, 0) + max(plan.total(over) // 100, 1 << 20)}
                    retries.append((bound, shape, model, tighter, tries + 1))
                continue
            throughput = policy.block_size * gen_len / _block_seconds(model, policy)
            if best is None or throughput > best[0]:
                best = (throughput, policy)
        pending = sorted(retries + pending, key=lambda c: -c[0])
    if best is None:
        raise UserError(_infeasible_message(cfg, layers, base, dtype, device, prompt_len, gen_len, budgets,
                                            blocks_in_flight))
    policy = best[1]
    prediction = predict(cfg, layers, policy, hardware, dtype, prompt_len, gen_len, blocks_in_flight)
    return SearchResult(policy, prediction, budgets, solved, len(shapes), time.perf_counter() - start)


def _infeasible_message(cfg: ModelConfig, layers: list[LayerSpec], base: Policy, dtype: torch.dtype,
                        device: torch.device, prompt_len: int, gen_len: int, budgets: Budgets,
                        blocks_in_flight: int) -> str:
    """Why nothing fits: what the smallest policy (one sequence, weights and cache on disk, compressed) needs."""
    smallest = replace(base, gpu_batch_size=1, num_gpu_batches=1, w_gpu_percent=0, w_cpu_percent=0,
                       cache_gpu_percent=0, cache_cpu_percent=0, compress_weight=True, compress_cache=True)
    plan = plan_bytes(cfg, layers, smallest, dtype, device, prompt_len, gen_len, blocks_in_flight)
    need = ", ".join(f"{t.value} {format_bytes(plan.total(t))}" for t in TIERS)
    return (f"--policy auto: no policy fits the memory budgets ({budgets.describe()}): "
            f"even one sequence with weights and cache compressed on disk needs {need}; "
            f"raise --max-memory or shorten the prompt and generation")
