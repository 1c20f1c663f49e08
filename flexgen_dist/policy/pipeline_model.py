"""The pipeline model: a run of S stages, its throughput and each stage's busy and idle time, predicted.

Each stage's step times come from the cost model on that stage's own layers (the first holds the embedding, the last
the head); the schedule is the coordinator's, replayed event by event (`simulate`): S blocks in flight, each prefill
cut into parts sent in turn (runtime/coordinator.py), every stage running its calls in submission order as a Ray
actor does, a hop between stages, and a round trip through the driver after the last stage. The idle time it predicts
is the bubble: a stage waiting for its input, or for the driver.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, replace

import torch

from flexgen_dist.engine.policy import Policy
from flexgen_dist.models.family import ModelConfig, model_layers
from flexgen_dist.policy.cost_model import CostModel, placement_values, predict, step_seconds
from flexgen_dist.policy.hardware import HardwareProfile
from flexgen_dist.policy.memory_plan import plan_bytes
from flexgen_dist.policy.search import Budgets
from flexgen_dist.runtime.coordinator import prefill_parts
from flexgen_dist.runtime.partition import embedding_resident, partition, resident_work

# Measured on the 2-core machines (docs/benchmark-history.md): an object-store hop costs ~3 ms for a decode hidden
# state and 47 ms for a 16.8 MB prefill one; a step's round trip through the driver (result, advance, resubmit) ~5 ms
# (an S=1 run of 128 steps idled 0.7 s).
HOP_LATENCY_S = 0.003
HOP_BYTES_PER_S = 0.36e9
DRIVER_ROUND_TRIP_S = 0.005


@dataclass(frozen=True)
class StageTimes:
    """One stage's step times for one block: each prefill part's, and each decode step's."""

    prefill_parts_s: tuple[float, ...]
    decode_s: tuple[float, ...]  # per decode step, in order (the cache grows by one position each)
    hop_out_s: tuple[float, float]  # sending (a prefill part's, a decode step's) hidden states on; 0 for the last


@dataclass(frozen=True)
class PipelinePrediction:
    total_s: float
    generated_tokens: int
    stage_busy_s: tuple[float, ...]
    stage_idle_s: tuple[float, ...]  # since the stage's first step, as the stages' own counters count it
    stage_layers: tuple[tuple[int, int], ...]

    @property
    def throughput_tok_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s else 0.0

    @property
    def bubble(self) -> float:
        """The idle share of the stages' time: 0 keeps every stage busy throughout."""
        return sum(self.stage_idle_s) / (sum(self.stage_idle_s) + sum(self.stage_busy_s))

    def to_dict(self) -> dict:
        return {"throughput_tok_s": self.throughput_tok_s, "total_s": self.total_s, "bubble": self.bubble,
                "stage_busy_s": list(self.stage_busy_s), "stage_idle_s": list(self.stage_idle_s),
                "stage_layers": [list(r) for r in self.stage_layers]}


def simulate(stages: list[StageTimes], num_blocks: int, parts_per_prefill: int, in_flight: int,
             round_trip_s: float = DRIVER_ROUND_TRIP_S) -> tuple[float, list[float], list[float]]:
    """Total seconds, and per stage busy and idle seconds, of `num_blocks` blocks through the stages."""
    n = len(stages)
    decode_steps = len(stages[0].decode_s)
    queues: list[deque] = [deque() for _ in range(n)]  # per stage: (task id) in submission order
    task_info: list[tuple[int, int, bool]] = []  # task id -> (block, step: -1-part for a prefill part, last of step)
    done_on: list[list[float | None]] = []  # task id -> per stage, when it finished there
    submitted: list[float] = []  # task id -> when the driver submitted it
    free_at, busy, first = [0.0] * n, [0.0] * n, [math.inf] * n
    events: list[tuple[float, int, int]] = []  # (time, order, block): the driver resubmits a block's next step
    order = 0
    steps_done: dict[int, int] = {}  # block -> steps returned (its prefill counts one)

    def duration(stage: int, task: int) -> float:
        _, step, _ = task_info[task]
        times = stages[stage]
        return times.prefill_parts_s[-1 - step] if step < 0 else times.decode_s[step]

    def hop(stage: int, task: int) -> float:
        return stages[stage].hop_out_s[0 if task_info[task][1] < 0 else 1]

    def submit(now: float, steps: list[tuple[int, int]]) -> None:
        """Blocks' steps (block, step) at `now`; prefill steps (step 0) as their parts, in turn across blocks."""
        expanded = [[(b, -1 - p, p == parts_per_prefill - 1) for p in range(parts_per_prefill)] if s == 0
                    else [(b, s - 1, True)] for b, s in steps]
        for turn in range(max(map(len, expanded), default=0)):
            for units in expanded:
                if turn < len(units):
                    task_info.append(units[turn])
                    done_on.append([None] * n)
                    submitted.append(now)
                    for q in queues:
                        q.append(len(task_info) - 1)

    started = min(in_flight, num_blocks)
    submit(0.0, [(b, 0) for b in range(started)])
    next_block, finished, end = started, 0, 0.0
    while finished < num_blocks:
        # The stage whose head-of-line task can start soonest (its input is there, the stage is free).
        best = None
        for s in range(n):
            if not queues[s]:
                continue
            task = queues[s][0]
            ready = submitted[task] if s == 0 else done_on[task][s - 1]
            if ready is None:
                continue
            if s > 0:
                ready += hop(s - 1, task)
            start = max(free_at[s], ready)
            if best is None or start < best[0]:
                best = (start, s, task)
        if events and (best is None or events[0][0] <= best[0]):
            now, _, block = heapq.heappop(events)
            step = steps_done[block]
            if step <= decode_steps:
                submit(now, [(block, step)])
            else:
                finished += 1
                end = max(end, now)
                if next_block < num_blocks:
                    submit(now, [(next_block, 0)])
                    next_block += 1
            continue
        start, s, task = best
        queues[s].popleft()
        took = duration(s, task)
        free_at[s] = done_on[task][s] = start + took
        busy[s] += took
        first[s] = min(first[s], start)
        block, step, last_of_step = task_info[task]
        if s == n - 1 and last_of_step:
            steps_done[block] = (0 if step < 0 else step + 1) + 1
            order += 1
            heapq.heappush(events, (start + took + round_trip_s, order, block))
    idle = [max(0.0, end - first[s] - busy[s]) for s in range(n)]
    return end, busy, idle


def stage_times(cfg: ModelConfig, layers, policy: Policy, hardware: HardwareProfile, dtype: torch.dtype,
                prompt_len: int, gen_len: int, parts: int, last: bool) -> StageTimes:
    """A stage's step times from the cost model: each prefill part priced as a step of its own sequences (it reads
    the stage's weights again), each decode step at its cache length."""
    x = placement_values(policy, hardware.shared_memory)
    block = CostModel(cfg, layers, policy, hardware, dtype, prompt_len, gen_len)
    cut = prefill_parts([policy.gpu_batch_size] * policy.num_gpu_batches, parts) or \
        [None]  # uncut: one part, the whole block
    prefill = []
    for p in cut:
        rows = p.stop - p.start if p else policy.gpu_batch_size
        batches = 1 if p else policy.num_gpu_batches
        part = CostModel(cfg, layers, replace(policy, gpu_batch_size=rows, num_gpu_batches=batches), hardware, dtype,
                         prompt_len, gen_len)
        prefill.append(step_seconds(part, 0, x))
    decode = tuple(step_seconds(block, past, x) for past in block.decode_steps())
    item = torch.empty((), dtype=dtype).element_size()
    rows = policy.block_size / len(cut)
    hops = (0.0, 0.0) if last else (HOP_LATENCY_S + rows * prompt_len * cfg.hidden_size * item / HOP_BYTES_PER_S,
                                     HOP_LATENCY_S + policy.block_size * cfg.hidden_size * item / HOP_BYTES_PER_S)
    return StageTimes(tuple(prefill), decode, hops)


def predict_pipeline(cfg: ModelConfig, policies: list[Policy], hardware: list[HardwareProfile], dtype: torch.dtype,
                     prompt_len: int, gen_len: int, num_prompts: int, prefill_chunks: int = 1,
                     blocks_in_flight: int | None = None) -> PipelinePrediction:
    """A generation run of `num_prompts` prompts through one stage per policy (each stage's own placement, one block
    shape) on each stage's own hardware, cut as `run.plan_stages` cuts them, `blocks_in_flight` at a time (default:
    one per stage)."""
    layers = model_layers(cfg)
    stages = len(policies)
    work = resident_work(embedding_resident(policies[0].w_gpu_percent), prompt_len, gen_len)
    ranges = partition(layers, stages, work)
    num_blocks = math.ceil(num_prompts / policies[0].block_size)
    times = [stage_times(cfg, layers[a:b], policy, profile, dtype, prompt_len, gen_len, prefill_chunks, i == stages - 1)
             for i, ((a, b), policy, profile) in enumerate(zip(ranges, policies, hardware))]
    total, busy, idle = simulate(times, num_blocks, len(times[0].prefill_parts_s), blocks_in_flight or stages)
    return PipelinePrediction(total, num_prompts * gen_len, tuple(busy), tuple(idle), tuple(ranges))


def pipeline_plan(cfg: ModelConfig, policies: list[Policy], hardware: HardwareProfile, dtype: torch.dtype,
                  prompt_len: int, gen_len: int, num_prompts: int, prefill_chunks: int, budgets: Budgets) -> dict:
    """Every stage's plan (its layers and placement, predicted step times, peak bytes per tier, and the tier it
    overflows if any) and the pipeline's predicted throughput and bubble, for `flexgen-dist policy --stages S`."""
    layers = model_layers(cfg)
    stages = len(policies)
    prediction = predict_pipeline(cfg, policies, [hardware] * stages, dtype, prompt_len, gen_len, num_prompts,
                                  prefill_chunks)
    plans = []
    for i, ((a, b), policy) in enumerate(zip(prediction.stage_layers, policies)):
        one = predict(cfg, layers[a:b], policy, hardware, dtype, prompt_len, gen_len, blocks_in_flight=stages)
        plan = plan_bytes(cfg, layers[a:b], policy, dtype, torch.device(hardware.device), prompt_len, gen_len, stages)
        overflow = budgets.fits(plan)
        plans.append({"stage": i, "layers": [a, b], "placement": policy.placement(),
                      "prefill_s": one.prefill_s, "decode_s": one.decode_s, "peak_bytes": plan.as_dict(),
                      "over_budget": overflow.value if overflow else None,
                      "busy_s": prediction.stage_busy_s[i], "idle_s": prediction.stage_idle_s[i]})
    return {"num_prompts": num_prompts, "prefill_chunks": prefill_chunks, "stages": plans,
            "predicted": {"throughput_tok_s": prediction.throughput_tok_s, "total_s": prediction.total_s,
                          "bubble": prediction.bubble}}
