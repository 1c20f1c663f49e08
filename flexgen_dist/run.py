"""One generation run: validate everything, check budgets, start the stages, stream blocks through them, write results.

The CLI maps flags onto `RunConfig`; this module knows nothing about argparse, and nothing about Ray beyond choosing
the executor.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from flexgen_dist.base.devices import dtype_name, resolve_device, resolve_dtype
from flexgen_dist.base.errors import ContextLengthExceeded, UserError
from flexgen_dist.engine.generation import REFILL_SPAN, BlockRun, Sampling, Sequence, SequenceHead, generator_seed
from flexgen_dist.engine.policy import Policy
from flexgen_dist.io.model_source import ModelSource, resolve_model
from flexgen_dist.io.outputs import ResultWriter, read_done_ids
from flexgen_dist.io.prompts import Request
from flexgen_dist.memory.budget import format_bytes
from flexgen_dist.memory.tiers import TIERS, Tier, ensure_offload_root, new_run_id
from flexgen_dist.models.family import ModelConfig, model_layers
from flexgen_dist.observability.metrics import RunMetrics, serve
from flexgen_dist.observability.progress import progress
from flexgen_dist.policy import auto as auto_policy
from flexgen_dist.policy.hardware import HardwareProfile, detect_capacities
from flexgen_dist.policy.memory_plan import TierPlan, check_budget, plan_bytes
from flexgen_dist.policy.pipeline_model import predict_pipeline
from flexgen_dist.run_config import RunConfig
from flexgen_dist.runtime.coordinator import prefill_chunks, run_blocks
from flexgen_dist.runtime.executor import Executor, LocalExecutor
from flexgen_dist.runtime.partition import embedding_resident, partition, resident_work
from flexgen_dist.runtime.worker import StageSpec


def prompt_ids(request: Request, source: ModelSource) -> list[int]:
    """A request's token ids (its text through the checkpoint's tokenizer), checked against the vocabulary."""
    cfg = source.config
    if request.input_ids is not None:
        ids = list(request.input_ids)
    elif source.tokenizer is None:
        raise UserError(f"prompt {request.id}: text prompts need a tokenizer, and {cfg.name} has none; give input_ids")
    else:
        ids = list(source.tokenizer(request.prompt).input_ids)
    bad = [i for i in ids if i >= cfg.vocab_size]
    if bad:
        raise UserError(f"prompt {request.id}: token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
    return ids


def _head(request: Request, run: RunConfig) -> SequenceHead:
    """A request's own sampling and log-probability settings, else the run's. Its generator's seed comes from its own
    seed, or the run's and its id: never from its block or row. Echo implies log-probabilities (no alternatives)."""
    def given(value, default):
        return default if value is None else value

    key = str(request.seed) if request.seed is not None else f"{run.sampling.seed}/{request.id}"
    sampling = Sampling(given(request.temperature, run.sampling.temperature), given(request.top_p, run.sampling.top_p),
                        generator_seed(key), run.sampling.ignore_eos)
    logprobs = given(request.logprobs, run.logprobs)
    return SequenceHead(sampling, 0 if logprobs is None and request.echo else logprobs, request.echo)


def _detokenize(source: ModelSource):
    tokenizer = source.tokenizer
    return None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def _sequence(r: Request, source: ModelSource, run: RunConfig) -> Sequence:
    """A request as a sequence to generate; a UserError when it cannot run."""
    cfg, detokenize = source.config, _detokenize(source)
    ids = prompt_ids(r, source)
    new = r.max_new_tokens or run.max_new_tokens
    if len(ids) + new > cfg.max_positions:
        raise ContextLengthExceeded(f"prompt {r.id}: {len(ids)} prompt tokens + {new} new tokens exceed the model's "
                        f"{cfg.max_positions} positions")
    stop = run.stop if r.stop is None else r.stop
    if stop and detokenize is None:
        raise UserError(f"prompt {r.id}: stop strings are matched in the output text, and {cfg.name} has no "
                        f"tokenizer to give it")
    return Sequence(ids, new, _head(r, run), stop, detokenize)


def _tokenize(requests: list[Request], source: ModelSource, run: RunConfig,
              results: Results) -> tuple[list[tuple[Request, Sequence]], list[dict]]:
    """The requests' sequences, and the error records of those `results` refuses to run."""
    work, refused = [], []
    for r in requests:
        try:
            work.append((r, _sequence(r, source, run)))
        except UserError as e:
            refused.append(results.refused(r, e))
    return work, refused


def _record(request: Request, seq: Sequence, tokenizer) -> dict:
    """`output_ids`: every generated token, up to the one that completed a stop string; `text`: cut before it."""
    record = {"id": request.id, "input_ids": seq.prompt_ids, "output_ids": seq.output_ids}
    if tokenizer is not None:
        record["text"] = seq.output_text
    record["finish_reason"] = seq.finish_reason
    if seq.logprobs is not None:
        token_text = None if tokenizer is None else (lambda i: tokenizer.decode([i]))
        record["logprobs"] = seq.logprobs.to_record(seq.output_ids, seq.prompt_ids, token_text)
    return record


class Results(Protocol):
    """How a run's requests become output records; a record's "id" is what a resumed run finds it done by."""

    def key(self, request: Request) -> str:
        """The "id" of the request's record."""

    def record(self, request: Request, seq: Sequence, tokenizer: Any) -> dict:
        """The record of a finished sequence."""

    def refused(self, request: Request, error: UserError) -> dict:
        """The record of a request that cannot run (or raise `error`: the run fails)."""

    def input_errors(self) -> list[dict]:
        """Records of input lines that were refused while reading them."""


class OwnFormat:
    """Our records (`_record`); bad input fails the whole run, before any work."""

    def key(self, request: Request) -> str:
        return request.id

    def record(self, request: Request, seq: Sequence, tokenizer: Any) -> dict:
        return _record(request, seq, tokenizer)

    def refused(self, request: Request, error: UserError) -> dict:
        raise error

    def input_errors(self) -> list[dict]:
        return []


@dataclass(frozen=True)
class StagePlan:
    """A run's stages: their layer ranges, memory plans (checked against the budgets) and specs, and how many blocks
    the coordinator keeps in flight (each stage holds the KV cache of every one)."""

    ranges: list[tuple[int, int]]
    plans: list[TierPlan]
    specs: list[StageSpec]
    blocks_in_flight: int


def plan_stages(run: RunConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, prompt_len: int,
                gen_len: int, head_workspace: int = 0, policies: list[Policy] | None = None,
                kv_cache: bool = True, head_positions: int | None = None) -> StagePlan:
    """Cut the model into stages and refuse, before any loading, a policy that does not fit the budgets.
    `head_workspace`: compute-device bytes the last stage needs beyond a generation step's (scoring's logits);
    `policies`: each stage's (default: the run's for every stage); `kv_cache`: whether blocks keep one;
    `head_positions`: the positions per sequence the head gives logits for, when not one per new token (scoring's),
    to balance the stages."""
    layers = model_layers(cfg)
    policies = policies or [run.policy] * run.stages
    resident = embedding_resident(policies[0].w_gpu_percent)  # stage 0 holds the table
    work = resident_work(resident, prompt_len, gen_len, head_positions)
    ranges = partition(layers, run.stages, work)
    in_flight = run.blocks_in_flight or run.stages
    # Each stage holds the KV cache of every block in flight on its own device, CPU and disk.
    plans = [plan_bytes(cfg, layers[a:b], policy, dtype, device, prompt_len, gen_len, blocks_in_flight=in_flight,
                        kv_cache=kv_cache) for (a, b), policy in zip(ranges, policies)]
    last = plans[-1]
    plans[-1] = replace(last, buffers={**last.buffers, Tier.GPU: last.buffers[Tier.GPU] + head_workspace})
    for plan in plans:
        check_budget(plan, run.budget, one_ram=device.type == "cpu")
    if any(plan.total(Tier.DISK) for plan in plans):
        ensure_offload_root(run.offload_dir)
    if stages_on_this_machine(run):
        check_capacity(run, plans, device)
    run_id = new_run_id()
    specs = [StageSpec(run.model, run.dummy_weights, run.sampling.seed, a, b, policy, run.device, run.dtype,
                       run.offload_dir, run_id=run_id, stage=i)
             for i, ((a, b), policy) in enumerate(zip(ranges, policies))]
    return StagePlan(ranges, plans, specs, in_flight)


def stages_on_this_machine(run: RunConfig) -> bool:
    """In process, or on the embedded Ray cluster: no cluster address to join (ray_executor._connect)."""
    return run.in_process or not run.joins_cluster


def check_capacity(run: RunConfig, plans: list[TierPlan], device: torch.device) -> None:
    """Refuse, before loading, budgets and plans beyond this machine's memory (RAM, or the cgroup limit) or the offload
    directory's free space: the OS cannot honour them, and the run would meet the OOM killer or a full disk mid-way.
    GPU memory is left to the budget check (asking CUDA here would start a context in the driver)."""
    _, memory, disk_free = detect_capacities("cpu", run.offload_dir)
    in_memory = (Tier.GPU, Tier.CPU) if device.type == "cpu" else (Tier.CPU,)  # a CPU device computes from RAM
    offload_root = run.offload_dir or tempfile.gettempdir()
    holds = {"memory": (memory, f"this machine's memory ({format_bytes(memory)}: RAM, or the cgroup limit)"),
             "disk": (disk_free, f"the free space under {offload_root} ({format_bytes(disk_free)})")}
    for tier in (*in_memory, Tier.DISK):
        capacity, what = holds["disk" if tier is Tier.DISK else "memory"]
        limit = getattr(run.budget, tier.value)
        if limit is not None and limit > capacity:
            raise UserError(f"--max-memory {tier.value}={format_bytes(limit)} is more than {what}: the OS cannot "
                            f"honour it; lower it")
    needs = {"memory": sum(plan.total(t) for plan in plans for t in in_memory),
             "disk": sum(plan.total(Tier.DISK) for plan in plans)}
    for resource_name, need in needs.items():
        capacity, what = holds[resource_name]
        if need > capacity:
            raise UserError(f"the policy needs {format_bytes(need)} of {resource_name} (all stages) but that is more "
                            f"than {what}; move weights or cache to another tier, use smaller batches, or free space")


def resource_summary(stages: StagePlan, stage_stats: list[dict]) -> dict:
    """Summary fields on memory: peak bytes per tier (and process RSS), planned bytes, per-stage statistics."""
    peak = {t.value: sum(s["peak_bytes"][t.value] for s in stage_stats) for t in TIERS}
    peak["rss"] = max([s["rss"] for s in stage_stats] + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    return {"peak_bytes": peak, "planned_bytes": {t.value: sum(p.total(t) for p in stages.plans) for t in TIERS},
            "stage_stats": [{"stage": i, "layers": list(stages.ranges[i]), **s} for i, s in enumerate(stage_stats)]}


def make_executor(run: RunConfig) -> Executor:
    """A place reserved for each stage (on Ray: the cluster joined or started, a bundle per stage); its `start`
    loads the stages."""
    if run.in_process:
        return LocalExecutor(run.stages)
    from flexgen_dist.runtime.ray_executor import RayExecutor

    return RayExecutor(run.stages, run.device, run.ray_address, run.placement_strategy, run.cpus_per_stage)


def generate(run: RunConfig, requests: list[Request], results: Results | None = None,
             sink: Callable[[list[dict]], None] | None = None) -> dict:
    """Run everything; return the summary. Raises UserError for bad input before any heavy work, unless `results`
    (default: OwnFormat) answers it with error records. `sink`: where each finished block's records go (default: the
    run's output file, else stdout)."""
    if run.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {run.max_new_tokens}")
    device = resolve_device(run.device)
    dtype = resolve_dtype(run.dtype, device)
    source = resolve_model(run.model, run.dummy_weights, run.sampling.seed)
    cfg = source.config
    results = results or OwnFormat()
    work, refused = _tokenize(requests, source, run, results)
    errors = results.input_errors() + refused
    if run.output:
        done = read_done_ids(run.output)
        work = [(r, s) for r, s in work if results.key(r) not in done]
        errors = [e for e in errors if e["id"] not in done]
    with contextlib.ExitStack() as reservation:
        reserved: list[Executor] = []

        def on_stages(fn, *args) -> list:
            """--policy auto measures each stage's hardware in its place: reserve the places now."""
            if not reserved:
                reserved.append(make_executor(run))
                reservation.callback(reserved[0].shutdown)
            return reserved[0].on_each_stage(fn, *args)

        prompt_len = max((len(s.prompt_ids) for _, s in work), default=1)
        # With refill a block's cache holds REFILL_SPAN times its longest generation, and it runs about that long.
        gen_len = max((s.max_new_tokens for _, s in work), default=1) * (REFILL_SPAN if run.refill else 1)
        policies, search, hardware = auto_policy.resolve(run.policy, cfg, dtype, device, prompt_len, gen_len,
                                                         len(work), run.budget, run.stages, run.offload_dir,
                                                         on_stages if work else None, run.blocks_in_flight)
        executor = reserved[0] if reserved else None
        return _execute(run, source, work, results, errors, policies, search, hardware, executor, device, dtype,
                        prompt_len, gen_len, sink)


def _execute(run: RunConfig, source: ModelSource, work: list[tuple[Request, Sequence]], results: Results,
             errors: list[dict], policies: list[Policy], search: dict | None, hardware: list[HardwareProfile],
             executor: Executor | None, device: torch.device, dtype: torch.dtype, prompt_len: int, gen_len: int,
             sink: Callable[[list[dict]], None] | None) -> dict:
    """Plan the stages for the chosen policies, start them (in `executor` if already reserved), write the error
    records, run every block. `hardware`: each stage's profile where the policies were searched, for the pipeline
    model's prediction of the run."""
    cfg = source.config
    policy = policies[0]  # every stage's has the same block shape
    run = replace(run, policy=policy)
    chunks = prefill_chunks(run.prefill_chunks, policies)
    stages = plan_stages(run, cfg, dtype, device, prompt_len, gen_len, policies=policies)
    if search is not None and run.stages > 1:  # the pipeline model's prediction of the run as planned
        search["pipeline"] = predict_pipeline(cfg, policies, hardware, dtype, prompt_len, gen_len, len(work), chunks,
                                              stages.blocks_in_flight).to_dict()

    # Similar lengths share a block: less padding computed and cached. Blocks are cut from the waiting sequences as
    # they start, longest prompts first; with refill, a block's finished rows take waiting sequences too.
    work.sort(key=lambda rs: len(rs[1].prompt_ids), reverse=True)
    request_of = {id(s): r for r, s in work}  # a sequence's request, until its record is written
    waiting = [s for _, s in reversed(work)]  # a stack: the longest prompt last, popped first
    summary = {"model": cfg.name, "device": device.type, "dtype": dtype_name(dtype),
               "stages": run.stages, "blocks_in_flight": stages.blocks_in_flight, "executor": run.executor_name,
               "sequences": len(work), "generated_tokens": 0,
               "prompt_tokens": sum(len(s.prompt_ids) for _, s in work), "failed_requests": len(errors),
               "stage_restarts": 0, "decode_row_steps": 0, "finished_row_steps": 0}
    if run.refill:
        summary["refilled_sequences"] = 0
    work.clear()
    stage_stats: list[dict] = []
    metrics = RunMetrics()
    metrics.requests_refused(len(errors))
    metrics.set_budget(run.budget)
    for i, spec in enumerate(stages.specs):
        metrics.set_stage_placement(i, spec.policy.placement())
    with contextlib.ExitStack() as stack:
        # Before the output and the stages: a port in use fails at once, and scrapes see the job while it loads.
        if run.metrics_port:
            url = stack.enter_context(serve(metrics, run.metrics_host, run.metrics_port, run.metrics_linger_s))
            if run.progress:
                print(f"flexgen-dist: metrics on {url}", file=sys.stderr, flush=True)
        # Open the output first: an unwritable path fails before minutes of weight loading.
        writer = stack.enter_context(ResultWriter(run.output)) if run.output else None

        def emit(records: list[dict]) -> None:
            if sink is not None:
                sink(records)
            elif writer is not None:
                writer.write_many(records)
            else:
                for rec in records:
                    print(json.dumps(rec, ensure_ascii=False), flush=True)

        if errors:
            emit(errors)
        timing = None
        if waiting:
            load_start = time.perf_counter()
            executor = executor or make_executor(run)
            stack.callback(executor.shutdown)  # frees tiers, deletes offload files, stops what the run started
            executor.start(stages.specs)
            summary["load_s"] = time.perf_counter() - load_start
            stack.enter_context(metrics.stages.reading(executor.stage_snapshots))
            if run.progress and run.stages > 1:  # each stage's own placement, once the stages are up
                for i, spec in enumerate(stages.specs):
                    shares = ", ".join(f"{k} {'/'.join(f'{p:g}' for p in v)}" for k, v in spec.policy.placement().items())
                    print(f"flexgen-dist: stage {i}: layers {spec.layer_start}-{spec.layer_stop}, {shares} % "
                          "(gpu/cpu/disk)", file=sys.stderr, flush=True)
            most_blocks = -(-len(waiting) // policy.block_size)  # fewer with refill
            bar = stack.enter_context(progress(summary["sequences"], most_blocks, run.progress))

            def take(max_prompt_len: int, max_new_tokens: int) -> Sequence | None:
                """The waiting sequence with the longest prompt within both limits (one that echoes its prompt starts
                a block of its own: a refill computes no prompt logits)."""
                for i in range(len(waiting) - 1, -1, -1):
                    s = waiting[i]
                    if len(s.prompt_ids) <= max_prompt_len and s.max_new_tokens <= max_new_tokens and not s.head.echo:
                        return waiting.pop(i)
                return None

            def block_runs() -> Iterator[BlockRun]:
                block_id = 0
                while waiting:
                    sequences = [waiting.pop() for _ in range(min(policy.block_size, len(waiting)))]
                    yield BlockRun(block_id, sequences, policy.gpu_batch_size, cfg.pad_token_id, cfg.eos_token_ids,
                                   run.sampling.ignore_eos, take if run.refill else None)
                    block_id += 1

            def written(sequences: list[Sequence]) -> None:
                summary["generated_tokens"] += sum(len(s.output_ids) for s in sequences)
                # Written, then let go: else a long job's driver would hold every token it generated.
                emit([results.record(request_of.pop(id(s)), s, source.tokenizer) for s in sequences])
                metrics.sequences_finished(s.finish_reason for s in sequences)

            def finished(block: BlockRun) -> None:
                written(block.sequences)
                if run.refill:
                    summary["refilled_sequences"] += block.refilled
                if bar is not None:
                    bar.block_done(len(block.sequences))

            def stepped(block: BlockRun, latency_s: float) -> None:
                step = block.last_step
                if block.steps_done == 1:  # prefill: no earlier token to time the new one against
                    metrics.prefill_done(step.prompt_tokens, step.generated_tokens)
                else:
                    # A block steps until its last sequence stops: the rows of those that stopped earlier are wasted.
                    finished_rows = step.rows - step.generated_tokens
                    summary["decode_row_steps"] += step.rows
                    summary["finished_row_steps"] += finished_rows
                    metrics.decode_done(step.generated_tokens, finished_rows, latency_s)
                    if step.prompt_tokens:  # the prompts of rows refilled before this step
                        metrics.prefill_done(step.prompt_tokens, 0)
                retired = block.take_retired()  # finished, their rows refilled: written now, not at the block's end
                if retired:
                    written(retired)
                    if bar is not None:
                        bar.sequences_done(len(retired))
                if bar is not None:
                    bar.step_done(step.generated_tokens)

            def restarted(stage: int) -> None:
                summary["stage_restarts"] += 1
                metrics.stage_restarted(stage)

            metrics.run_started(summary["sequences"])
            timing = run_blocks(executor, block_runs(), lambda block: block.head_task,
                                max_in_flight=stages.blocks_in_flight,
                                on_block_done=finished, on_step=stepped, on_restart=restarted, prefill_chunks=chunks)
            metrics.finish()
            stage_stats = executor.stats()
    total = timing.total_s if timing else 0.0
    summary.update(total_s=total, prefill_s=timing.prefill_s if timing else 0.0,
                   decode_s=timing.decode_s if timing else 0.0,
                   generation_throughput_tok_s=summary["generated_tokens"] / total if total else 0.0,
                   finished_row_share=summary["finished_row_steps"] / max(summary["decode_row_steps"], 1))
    # Issue 21's line: past a fifth of the row-steps wasted, refill pays (and it needs more prompts than a block).
    if run.progress and not run.refill and summary["finished_row_share"] > 0.2 and \
            summary["sequences"] > policy.block_size:
        print(f"flexgen-dist: {summary['finished_row_share']:.0%} of the decode row-steps went to sequences that had "
              "already stopped; --refill gives their rows to waiting prompts", file=sys.stderr, flush=True)
    summary.update(resource_summary(stages, stage_stats))
    summary["policy"] = policy.to_dict()
    if run.stages > 1:  # each stage's own placement (--policy auto plans each on its own layers and budget)
        summary["stage_policies"] = [spec.policy.to_dict() for spec in stages.specs]
    if search is not None:
        summary["policy_search"] = search
    return summary
