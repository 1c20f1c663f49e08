"""`flexgen-dist` command line: flags -> RunConfig/Policy, one JSON summary line, exit 2 on bad input."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from flexgen_dist.base.devices import DEVICES, DTYPES, dtype_name, resolve_device, resolve_dtype
from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.generation import Sampling
from flexgen_dist.engine.policy import Policy, load_policy_file, policy_yaml
from flexgen_dist.io.openai_batch import FORMATS
from flexgen_dist.io.prompts import load_prompts_file, requests_from_cli, synthetic_requests
from flexgen_dist.memory.budget import MemoryBudget, parse_max_memory, parse_size
from flexgen_dist.memory.disk import ALIGN
from flexgen_dist.openai_output import batch_input
from flexgen_dist.policy.auto import PLACEMENT, SEARCHED, AutoPolicy
from flexgen_dist.run import generate
from flexgen_dist.run_config import EXECUTORS, PLACEMENT_STRATEGIES, RunConfig
from flexgen_dist.score_run import score


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"flexgen-dist: error: {message} (see --help)\n")


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy")
    g.add_argument("--policy", metavar="auto|FILE.yaml",
                   help="auto: search the policy for this machine's measured speeds and --max-memory (flags below pin "
                        "what they give); or a saved policy, e.g. from `flexgen-dist policy` (flags below override it)")
    g.add_argument("--hardware", metavar="FILE.yaml",
                   help="with --policy auto: the hardware profile to plan with (default: this machine's, measured once "
                        "by `flexgen-dist profile` and cached)")
    g.add_argument("--percent", nargs=6, type=float, metavar=("W_GPU", "W_CPU", "CACHE_GPU", "CACHE_CPU", "ACT_GPU", "ACT_CPU"),
                   help="placement percentages; disk gets the rest of each pair (default 100 0 100 0 100 0)")
    g.add_argument("--gpu-batch-size", type=int, help="sequences per GPU batch (default 1)")
    g.add_argument("--num-gpu-batches", type=int, help="GPU batches per block: weights are reused across them (default 1)")
    g.add_argument("--no-overlap", action="store_true", help="run transfers inline instead of overlapping compute")
    g.add_argument("--cpu-cache-compute", action="store_true",
                   help="decode attention runs on the CPU where a CPU-tier KV cache lives (only its output moves)")
    g.add_argument("--attn-sparsity", type=float, metavar="F",
                   help="decode attends to the top ceil(F x length) positions per query, 0 < F <= 1 (default 1)")
    g.add_argument("--compress-weight", action="store_true",
                   help="group-wise quantized weights in every tier, dequantized on the compute device before use")
    g.add_argument("--compress-cache", action="store_true", help="group-wise quantized KV cache in every tier")
    g.add_argument("--compress-bits", type=int, choices=(4, 8), help="bits per compressed value (default 4)")
    g.add_argument("--compress-group-size", type=int, metavar="N", help="values per quantization group (default 64)")
    g.add_argument("--compress-symmetric", action="store_true",
                   help="symmetric quantization (a scale per group, no minimum)")
    g.add_argument("--no-compression", action="store_true",
                   help="with --policy auto: never choose compression, so outputs stay exact")


def _add_model_and_input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a size (opt-125m … opt-175b, llama-3.2-1b, llama-3.1-8b, …; with --dummy-weights) or an HF checkpoint dir")
    p.add_argument("--dummy-weights", action="store_true", help="seeded random weights of the model's size")
    p.add_argument("--seed", type=int, default=0, help="dummy weights, synthetic prompts and sampling (default 0)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE.jsonl",
                     help='lines {"id", "prompt"|"input_ids"} with optional "max_new_tokens", "stop", "temperature", '
                          '"top_p", "seed", "logprobs", "echo" (generate); generate also reads OpenAI batch files '
                          '(--prompts-format)')
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N random prompts of --prompt-len tokens")
    p.add_argument("--prompt-len", type=int, default=128, help="with --synthetic (default 128)")


def _add_resource_flags(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("resources")
    r.add_argument("--device", choices=DEVICES, help="default: cuda if available")
    r.add_argument("--dtype", choices=tuple(DTYPES), help="default: float16 on cuda, bfloat16 on cpu")
    r.add_argument("--max-memory", metavar="gpu=…,cpu=…,disk=…", help="per-tier budgets, e.g. gpu=16GiB,cpu=64GiB")
    r.add_argument("--offload-dir", help="where the disk tier's files go (default: the system temp dir)")


def _stage_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(s) for s in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected stage counts >= 1 separated by commas, e.g. 1,2,4; got {text!r}")
    return tuple(dict.fromkeys(counts))


def _add_distribution_flags(p: argparse.ArgumentParser, stage_counts: bool = False) -> None:
    dist = p.add_argument_group("distribution")
    if stage_counts:  # bench: a scaling table over several pipeline lengths
        dist.add_argument("--stages", type=_stage_counts, default=(1,), metavar="S[,S…]",
                          help="pipeline stages, one device each; several (e.g. 1,2,4) give a scaling table: "
                               "throughput, speedup over the first, each stage's busy and idle time (default 1)")
    else:
        dist.add_argument("--stages", type=int, default=1, help="pipeline stages, one device each (default 1)")
    dist.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else an embedded local one)")
    dist.add_argument("--placement-strategy", default="PACK", choices=PLACEMENT_STRATEGIES,
                      help="how stages' bundles land on nodes (default PACK)")
    dist.add_argument("--cpus-per-stage", type=float, metavar="N",
                      help="Ray CPUs per stage, and its compute threads: on CPU-only nodes one stage per N cores "
                           "models one device per stage (default: an equal share of a node's CPUs)")
    dist.add_argument("--prefill-chunks", type=int, metavar="N",
                      help="cut each block's prefill into about N pipeline steps of a few sequences, so the next "
                           "stage starts early and other blocks' decode steps are not held up behind it (exact; "
                           "default: 2 per stage with --stages > 1 and no KV cache on disk, else 1)")
    dist.add_argument("--blocks-in-flight", type=int, metavar="N",
                      help="blocks in flight through the stages, each stage holding every one's KV cache "
                           "(default: one per stage). More fill the gaps a prefill part or a round trip leaves between "
                           "a block's steps, where devices do not slow each other down (docs/distributed.md)")
    dist.add_argument("--executor", default="auto", choices=EXECUTORS,
                      help="ray: one actor per stage; local: the same stage workers in this process; auto (default): "
                           "local for one stage on this machine, unless --ray-address, RAY_ADDRESS or "
                           "--cpus-per-stage asks for Ray, else ray")


def _add_refill_flag(group) -> None:
    group.add_argument("--refill", action="store_true",
                       help="a block's rows whose sequence has stopped take waiting prompts, computed just before its "
                            "next step, so the block stops wasting them; its KV cache holds twice the longest "
                            "generation (exact: every output stays what it is alone)")


def _add_run_flags(p: argparse.ArgumentParser, stage_counts: bool = False) -> None:
    """What every command that runs the engine takes: the policy, the resources, the distribution."""
    _add_policy_flags(p)
    _add_resource_flags(p)
    _add_distribution_flags(p, stage_counts)


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="FILE.jsonl", help="results, one line per prompt; re-running resumes (default: stdout)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flexgen-dist", description="High-throughput offloaded inference of OPT and Llama-family models (FlexGen design).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    gen = sub.add_parser("generate", help="generate for prompts; results as JSONL, summary as the last stdout line")
    _add_model_and_input_flags(gen)
    d = gen.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    d.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sequence's output before this text (repeatable; needs a tokenizer; a prompt's own "
                        "\"stop\" list replaces these)")
    d.add_argument("--logprobs", type=int, metavar="K",
                   help="each generated token's log-probability and its K most likely alternatives, 0-20 (default: "
                        "none; a prompt's own \"logprobs\" overrides it)")
    _add_refill_flag(d)
    _add_run_flags(gen)
    _add_output_flags(gen)
    m = gen.add_argument_group("observability")
    m.add_argument("--metrics-port", type=_port, default=0, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics during the run (default 0: off)")
    m.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics server binds (default 127.0.0.1; 0.0.0.0 lets other machines scrape)")
    m.add_argument("--metrics-linger", type=_seconds, default=0.0, metavar="SECONDS",
                   help="after the run, keep serving until a scrape has read the final values, at most this long")
    gen.add_argument("--prompts-format", choices=FORMATS, default="auto",
                     help="flexgen: our lines (above); openai-batch: an OpenAI Batch API file of /v1/completions "
                          "requests, answered in the batch output format with an error record per bad line; auto: "
                          "a batch file if its first line has a custom_id (default)")
    gen.set_defaults(func=_generate)
    sc = sub.add_parser("score", help="log-likelihood and perplexity of each prompt (tokens 2..n given their prefix); "
                                      "results as JSONL, summary with the corpus perplexity as the last stdout line")
    _add_model_and_input_flags(sc)
    sc.add_argument("--decode-tokens", type=int, default=0, metavar="N",
                    help="score each sequence's last N tokens one decode step at a time (teacher forcing): they "
                         "attend over the stored KV cache, so --compress-cache and --attn-sparsity count (default 0)")
    _add_run_flags(sc)
    _add_output_flags(sc)
    sc.set_defaults(func=_score)

    ev = sub.add_parser("eval", help="lm-evaluation-harness tasks through the engine, each request kind one offline "
                                     "job (needs the eval extra); lm-eval's results table, its results JSON")
    ev.add_argument("--model", required=True, help="an HF checkpoint dir with a tokenizer")
    ev.add_argument("--dummy-weights", action="store_true", help="seeded random weights of the checkpoint's shapes")
    ev.add_argument("--tasks", required=True, type=_task_names, metavar="T1,T2",
                    help="lm-eval task, group or tag names (glob patterns too)")
    ev.add_argument("--include-path", metavar="DIR", help="a directory of task YAMLs beside lm-eval's own")
    ev.add_argument("--num-fewshot", type=int, metavar="K", help="examples in each prompt (default: each task's)")
    ev.add_argument("--limit", type=float, metavar="N",
                    help="documents per task; below 1, that fraction of them (only for testing: metrics on part of "
                         "a task are not the task's)")
    ev.add_argument("--batch-size", dest="gpu_batch_size", type=int, metavar="N", help="same as --gpu-batch-size")
    ev.add_argument("--seed", type=int, default=0,
                    help="dummy weights, and each sampled request's generator unless its task gives a seed (default 0)")
    ev.add_argument("--log-samples", action="store_true",
                    help="each document's requests, responses and metrics in the results JSON too")
    ev.add_argument("--output", metavar="FILE.json", help="lm-eval's results JSON, with each engine job's summary")
    ev.add_argument("--quiet", action="store_true", help="no progress bars of our jobs")
    _add_refill_flag(ev)
    _add_run_flags(ev)
    ev.set_defaults(func=_eval)

    be = sub.add_parser("bench", help="our engine and the baselines (HF generate, HF accelerate offload) on the same "
                                      "synthetic work; throughput, latency, ratios, roofline; JSON out")
    be.add_argument("--model", required=True,
                    help="a size (opt-1.3b, llama-3.2-1b, …: dummy weights) or a checkpoint dir (both systems read it; needed by "
                         "--baseline accelerate: write one with `flexgen-dist checkpoint`)")
    be.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    be.add_argument("--gen-len", type=int, default=32, help="new tokens per prompt, EOS ignored (default 32)")
    be.add_argument("--num-prompts", type=int, metavar="N",
                    help="prompts per point (default: one block per stage, so latency is one block's time)")
    be.add_argument("--seed", type=int, default=0, help="dummy weights and synthetic prompts (default 0)")
    be.add_argument("--sweep", metavar="BxN,…", help="block shapes (--gpu-batch-size x --num-gpu-batches) to measure, "
                                                    "e.g. 8x1,32x1,32x4: a latency/throughput curve")
    be.add_argument("--baseline", action="append", default=[], metavar="SYSTEM",
                    help="also run HF transformers generate (hf, weights resident), HF accelerate's offload "
                         "(accelerate) or vLLM (vllm, in its own environment: launch/setup_vllm.sh) under the same "
                         "budgets (repeatable)")
    be.add_argument("--vllm-python", metavar="PATH",
                    help="the Python that has vLLM, for --baseline vllm (default: $FLEXGEN_VLLM_PYTHON, else "
                         ".venv-vllm beside this checkout, else this Python if it imports vllm)")
    be.add_argument("--baseline-batch-size", type=int, action="append", default=[], metavar="N",
                    help="baseline batch sizes to try, the best reported (default: hf the two largest powers of two "
                         "up to the block size that fit the memory budget, accelerate the block size, vllm the block "
                         "size as its most sequences in flight)")
    be.add_argument("--baseline-calls", type=int, metavar="N",
                    help="time at most N generate calls of each baseline batch size (default: all the prompts): its "
                         "calls are the same work, so a slow baseline can be measured on a sample")
    be.add_argument("--baseline-max-memory", metavar="gpu=…,cpu=…",
                    help="the baselines' memory budgets, where a peer's best differs from ours (default: --max-memory); "
                         "e.g. accelerate under a hard limit needs room beside its weights for its KV cache")
    be.add_argument("--results", metavar="FILE.jsonl", help="append every measured point here")
    be.add_argument("--plot", metavar="FILE.png", help="latency/throughput plot of every system, or with several "
                                                       "--stages throughput against stages (needs matplotlib)")
    be.add_argument("--no-roofline", action="store_true",
                    help="skip the roofline (it needs the hardware profile: --hardware, else this machine's, "
                         "measured once and cached)")
    be.add_argument("--disk-now", action="store_true",
                    help="time the disk (1 GiB, O_DIRECT) just before and after each of our runs and give the "
                         "roofline at the mean of those speeds too: a virtual disk's speed wanders")
    be.add_argument("--dummy-weights", action="store_true",
                    help="seeded random weights of a size name's shapes, as `generate --dummy-weights` (a size name "
                         "implies it)")
    _add_run_flags(be, stage_counts=True)
    be.set_defaults(func=_bench)

    ck = sub.add_parser("checkpoint", help="write a random checkpoint of a real size (HF safetensors shards), "
                                           "e.g. for `bench --baseline accelerate`")
    ck.add_argument("--model", required=True, help="a size: opt-125m … opt-175b, llama-3.2-1b, llama-3.1-8b, …")
    ck.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="stored dtype (default float16)")
    ck.add_argument("--seed", type=int, default=0, help="the dummy weights' seed (default 0)")
    ck.add_argument("--output", required=True, metavar="DIR", help="an empty or new directory")
    ck.set_defaults(func=_checkpoint)

    pr = sub.add_parser("profile", help="measure this machine's hardware constants for the cost model; YAML out")
    pr.add_argument("--device", choices=DEVICES, help="default: cuda if available")
    pr.add_argument("--dtype", action="append", choices=tuple(DTYPES),
                    help="compute dtype to measure (repeatable; default: the run default for the device)")
    pr.add_argument("--offload-dir", help="measure the disk under this directory (default: the system temp dir)")
    pr.add_argument("--hidden-sizes", default="2048,4096", metavar="H,H,…",
                    help="hidden sizes whose layer GEMM shapes are timed; the cost model uses the nearest "
                         "(default 2048,4096: opt-1.3b and opt-6.7b)")
    pr.add_argument("--disk-sample", default="2GiB", metavar="SIZE",
                    help="bytes written and read per disk round; larger than any disk cache (default 2GiB)")
    pr.add_argument("--output", metavar="FILE.yaml", help="write the profile here (default: stdout)")
    pr.set_defaults(func=_profile)

    po = sub.add_parser("policy", help="search the best policy for a model, workload, budgets and hardware; YAML out")
    po.add_argument("--model", required=True, help="a size (opt-125m … opt-175b, llama-3.1-70b, …) or an HF checkpoint dir (only its config is read)")
    po.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default 512)")
    po.add_argument("--gen-len", type=int, default=32, help="new tokens per prompt (default 32)")
    po.add_argument("--num-prompts", type=int, metavar="N", help="prompts to run: bounds the block size (default: many)")
    po.add_argument("--hardware", metavar="FILE.yaml",
                    help="hardware profile, e.g. configs/hardware/t4-paper.yaml (default: this machine's, cached)")
    po.add_argument("--max-memory", metavar="gpu=…,cpu=…,disk=…",
                    help="per-tier budgets (default: the profile's capacities less a safety margin)")
    po.add_argument("--dtype", choices=tuple(DTYPES), help="default: float16 on cuda, the CPU default on cpu")
    po.add_argument("--stages", type=int, default=1, help="pipeline stages the model is cut into (default 1)")
    po.add_argument("--output", metavar="FILE.yaml", help="write the policy here, for --policy FILE.yaml (default: stdout)")
    g = po.add_argument_group("pinned choices (the search chooses these unless given)")
    g.add_argument("--gpu-batch-size", type=int)
    g.add_argument("--num-gpu-batches", type=int)
    g.add_argument("--compress-weight", action="store_true")
    g.add_argument("--compress-cache", action="store_true")
    g.add_argument("--cpu-cache-compute", action="store_true")
    g.add_argument("--no-compression", action="store_true", help="never choose compression, as generate's flag")
    po.set_defaults(func=_policy_command)
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535 (0: off), got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _policy_fields(args: argparse.Namespace) -> dict:
    """The Policy fields the policy flags give (flags left out give nothing)."""
    fields: dict = {}
    if args.percent:
        fields.update(zip(PLACEMENT, args.percent))
    if args.no_overlap:
        fields["overlap"] = False
    for flag in ("cpu_cache_compute", "compress_weight", "compress_cache", "compress_symmetric"):  # store_true flags
        if getattr(args, flag):
            fields[flag] = True
    for name in ("gpu_batch_size", "num_gpu_batches", "attn_sparsity", "compress_bits", "compress_group_size"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return fields


def _auto_policy(fields: dict, no_compression: bool, hardware: str | None) -> AutoPolicy:
    """The search, with the policy fields given pinned (and with --no-compression, compression pinned off)."""
    pinned = frozenset(fields) & set(SEARCHED)
    if no_compression:
        if fields.get("compress_weight") or fields.get("compress_cache"):
            raise UserError("--no-compression contradicts --compress-weight/--compress-cache")
        pinned |= {"compress_weight", "compress_cache"}  # pinned to the defaults: off
    return AutoPolicy(replace(Policy(), **fields), pinned, hardware)


def _policy(args: argparse.Namespace) -> Policy | AutoPolicy:
    fields = _policy_fields(args)
    if args.policy == "auto":
        if args.percent:
            raise UserError("--percent cannot be given with --policy auto: the search chooses the placement")
        return _auto_policy(fields, args.no_compression, args.hardware)
    if args.no_compression:
        raise UserError("--no-compression restricts --policy auto: without it, compression is off unless asked for")
    if args.hardware:
        raise UserError("--hardware is the profile --policy auto plans with: give it with --policy auto")
    base = load_policy_file(Path(args.policy)) if args.policy else Policy()
    return replace(base, **fields)


def _requests(args: argparse.Namespace, vocab_size: int):
    if args.prompts:
        return load_prompts_file(args.prompts)
    if args.prompt:
        return requests_from_cli(args.prompt)
    if args.synthetic < 1 or args.prompt_len < 1:
        raise UserError("--synthetic and --prompt-len must be >= 1")
    return synthetic_requests(args.synthetic, args.prompt_len, vocab_size, args.seed)


def _run_config(args: argparse.Namespace, sampling: Sampling, **fields) -> RunConfig:
    """The flags every command shares (model, policy, resources, distribution, output), plus the command's own."""
    return RunConfig(
        model=args.model,
        policy=_policy(args),
        dummy_weights=args.dummy_weights,
        sampling=sampling,
        device=args.device,
        dtype=args.dtype,
        budget=parse_max_memory(args.max_memory) if args.max_memory else MemoryBudget(),
        offload_dir=args.offload_dir,
        output=args.output,
        progress=not args.quiet,
        stages=args.stages,
        executor=args.executor,
        ray_address=args.ray_address,
        placement_strategy=args.placement_strategy,
        cpus_per_stage=args.cpus_per_stage,
        prefill_chunks=args.prefill_chunks,
        blocks_in_flight=args.blocks_in_flight,
        **fields,
    )


def _generate(args: argparse.Namespace) -> int:
    run = _run_config(args, Sampling(args.temperature, args.top_p, args.seed, args.ignore_eos),
                      max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), logprobs=args.logprobs,
                      refill=args.refill,
                      metrics_port=args.metrics_port,
                      metrics_host=args.metrics_host, metrics_linger_s=args.metrics_linger)
    if args.prompts_format != "auto" and not args.prompts:
        raise UserError("--prompts-format applies to --prompts FILE")
    batch = batch_input(args.prompts, args.prompts_format, run) if args.prompts else None
    summary = generate(run, *batch) if batch else generate(run, _requests(args, _vocab_size(args)))
    print(json.dumps(summary), flush=True)
    return 0


def _score(args: argparse.Namespace) -> int:
    run = _run_config(args, Sampling(seed=args.seed))  # the seed of dummy weights; nothing is sampled
    summary = score(run, _requests(args, _vocab_size(args)), args.decode_tokens)
    print(json.dumps(summary), flush=True)
    return 0


def _task_names(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected task names separated by commas, got {text!r}")
    return names


def _eval(args: argparse.Namespace) -> int:
    from flexgen_dist.evaluation.command import EvalSpec, run_eval

    # Each request's generation settings come from its task; the model writes no per-prompt lines (--output is the
    # results JSON).
    run = _run_config(args, Sampling(seed=args.seed), refill=args.refill)
    run_eval(run, EvalSpec(args.tasks, args.include_path, args.num_fewshot, args.limit, args.log_samples, args.output))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from flexgen_dist.policy.hardware import profile_yaml
    from flexgen_dist.policy.profiler import ProfileScope, measure_profile

    device = resolve_device(args.device)
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else [resolve_dtype(None, device)]
    log = (lambda text: print(f"flexgen-dist profile: {text}", file=sys.stderr, flush=True))
    try:
        hidden = tuple(int(h) for h in args.hidden_sizes.split(","))
    except ValueError:
        hidden = ()
    if not hidden or min(hidden) < 1:
        raise UserError(f"--hidden-sizes: expected positive integers separated by commas, got {args.hidden_sizes!r}")
    sample = parse_size(args.disk_sample)
    if sample < 4 * ALIGN * 4:
        raise UserError(f"--disk-sample must be at least 64KiB, got {args.disk_sample!r}")
    scope = ProfileScope(hidden, disk_sample_bytes=sample // (4 * ALIGN) * 4 * ALIGN)
    profile = measure_profile(device, dtypes, args.offload_dir, scope, log=log)
    _write_text(args.output, profile_yaml(profile))
    return 0


def _policy_command(args: argparse.Namespace) -> int:
    from flexgen_dist.io.model_source import model_config
    from flexgen_dist.policy.auto import choose_policy, machine_profile
    from flexgen_dist.policy.hardware import load_profile

    _require_positive(args, ("prompt_len", "gen_len", "num_prompts", "stages"))
    cfg = model_config(args.model)
    if args.hardware:
        hardware = load_profile(args.hardware)
        if args.dtype:
            dtype = DTYPES[args.dtype]
        elif len(hardware.dtypes) == 1:  # the one dtype the profile has
            dtype = DTYPES[next(iter(hardware.dtypes))]
        else:
            dtype = resolve_dtype(None, torch.device(hardware.device))
    else:
        device = resolve_device(None)
        dtype = resolve_dtype(args.dtype, device)
        hardware = machine_profile(device, dtype, None)
    pinned = {name: getattr(args, name) for name in SEARCHED if getattr(args, name) not in (None, False)}
    auto = _auto_policy(pinned, args.no_compression, args.hardware)
    budget = parse_max_memory(args.max_memory) if args.max_memory else MemoryBudget()
    result = choose_policy(auto, cfg, hardware, dtype, args.prompt_len, args.gen_len, budget, args.stages,
                           args.num_prompts)
    workload = {"model": cfg.name, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                "num_prompts": args.num_prompts, "stages": args.stages, "dtype": dtype_name(dtype),
                "hardware": hardware.name}
    report = {"workload": workload, **result.to_dict()}
    if args.stages > 1:  # every stage's own plan, and the pipeline's throughput and bubble (the pipeline model)
        from flexgen_dist.policy.auto import stage_policies
        from flexgen_dist.policy.pipeline_model import pipeline_plan
        from flexgen_dist.runtime.coordinator import prefill_chunks

        policies = [r.policy for r in stage_policies(result, cfg, [hardware] * args.stages, dtype, args.prompt_len,
                                                      args.gen_len, budget)]
        # Without --num-prompts: four blocks per stage, enough for the pipeline's steady state to dominate.
        prompts = args.num_prompts or 4 * args.stages * result.policy.block_size
        chunks = prefill_chunks(None, policies)
        report["pipeline"] = pipeline_plan(cfg, policies, hardware, dtype, args.prompt_len, args.gen_len, prompts,
                                           chunks, result.budgets)
    _write_text(args.output, policy_yaml(result.policy, report))
    return 0


# generate's flags that bench passes through to our runs: (attribute, flag)
_BENCH_PASSTHROUGH = (
    ("policy", "--policy"), ("hardware", "--hardware"), ("percent", "--percent"), ("gpu_batch_size", "--gpu-batch-size"),
    ("num_gpu_batches", "--num-gpu-batches"), ("no_overlap", "--no-overlap"), ("cpu_cache_compute", "--cpu-cache-compute"),
    ("attn_sparsity", "--attn-sparsity"), ("compress_weight", "--compress-weight"), ("compress_cache", "--compress-cache"),
    ("compress_bits", "--compress-bits"), ("compress_group_size", "--compress-group-size"),
    ("compress_symmetric", "--compress-symmetric"), ("no_compression", "--no-compression"), ("device", "--device"),
    ("dtype", "--dtype"), ("max_memory", "--max-memory"), ("offload_dir", "--offload-dir"),
    ("ray_address", "--ray-address"), ("placement_strategy", "--placement-strategy"), ("executor", "--executor"),
    ("cpus_per_stage", "--cpus-per-stage"), ("prefill_chunks", "--prefill-chunks"),
    ("blocks_in_flight", "--blocks-in-flight"),
)  # --stages: per point


def _bench(args: argparse.Namespace) -> int:
    from flexgen_dist.bench.baselines import SYSTEMS
    from flexgen_dist.bench.command import BenchSpec, format_table, parse_blocks, plot_pareto, plot_scaling, run_bench
    from flexgen_dist.bench.vllm_baseline import vllm_python
    from flexgen_dist.io.model_source import model_config
    from flexgen_dist.policy.auto import machine_profile
    from flexgen_dist.policy.hardware import load_profile

    _require_positive(args, ("prompt_len", "gen_len", "num_prompts", "baseline_calls", "prefill_chunks",
                             "blocks_in_flight"))
    unknown = [b for b in args.baseline if b not in SYSTEMS]
    if unknown:  # checked here, not by argparse choices, so that the parser needs no benchmarking code
        raise UserError(f"--baseline {unknown[0]}: unknown system (choose from {', '.join(SYSTEMS)})")
    if any(b < 1 for b in args.baseline_batch_size):
        raise UserError("--baseline-batch-size must be >= 1")
    if args.disk_now and args.no_roofline:
        raise UserError("--disk-now gives a roofline: drop --no-roofline")
    # --hardware is the roofline's profile too; only --policy auto also plans with it.
    planning = argparse.Namespace(**{**vars(args), "hardware": args.hardware if args.policy == "auto" else None})
    policy = _policy(planning)  # also refuses contradictory policy flags before anything runs
    cfg = model_config(args.model)
    if args.dummy_weights and Path(args.model).is_dir():
        raise UserError("--dummy-weights takes a size name (opt-1.3b, llama-3.2-1b, …); bench reads a checkpoint dir as it is")
    if "accelerate" in args.baseline and not Path(args.model).is_dir():
        raise UserError("--baseline accelerate loads a checkpoint: pass a checkpoint dir as --model, e.g. one written "
                        f"by `flexgen-dist checkpoint --model {args.model} --output DIR`")
    if cfg.max_positions < args.prompt_len + args.gen_len:
        raise UserError(f"--prompt-len + --gen-len = {args.prompt_len + args.gen_len} exceeds the model's "
                        f"{cfg.max_positions} positions")
    device = resolve_device(args.device)
    dtype = dtype_name(resolve_dtype(args.dtype, device))
    blocks = parse_blocks(args.sweep) if args.sweep else ()
    if not blocks and isinstance(policy, Policy):
        blocks = ((policy.gpu_batch_size, policy.num_gpu_batches),)
    spec = BenchSpec(args.model, cfg, args.prompt_len, args.gen_len, args.num_prompts, blocks, args.stages,
                     device.type, dtype, parse_max_memory(args.max_memory) if args.max_memory else MemoryBudget(),
                     args.offload_dir, tuple(dict.fromkeys(args.baseline)), tuple(args.baseline_batch_size), args.seed,
                     args.baseline_calls, args.disk_now, vllm_python(args.vllm_python) if "vllm" in args.baseline else None,
                     parse_max_memory(args.baseline_max_memory) if args.baseline_max_memory else None)
    hardware = None
    if not args.no_roofline:
        hardware = load_profile(args.hardware) if args.hardware else machine_profile(device, DTYPES[dtype], None)
        if dtype not in hardware.dtypes:
            raise UserError(f"{hardware.name}: the hardware profile has no {dtype} speeds for the roofline "
                            "(profile that dtype, or --no-roofline)")
    flags: list[str] = []
    for attr, flag in _BENCH_PASSTHROUGH:
        value = getattr(planning, attr)
        if value is True:
            flags.append(flag)
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif value not in (None, False):
            flags += [flag, str(value)]
    log = (lambda text: print(f"flexgen-dist bench: {text}", file=sys.stderr, flush=True))
    result = run_bench(spec, flags, hardware, log)
    print(format_table(result), file=sys.stderr)
    if args.results:
        _append_results(args.results, result)
    if args.plot:  # several pipeline lengths: the scaling curve; else the latency/throughput front
        (plot_scaling if result["scaling"] else plot_pareto)(result, args.plot)
    print(json.dumps(result), flush=True)
    return 0


def _append_results(path: str, result: dict) -> None:
    try:
        with open(path, "a") as f:
            for point in result["points"]:
                f.write(json.dumps({"workload": result["workload"], **point}) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _checkpoint(args: argparse.Namespace) -> int:
    from flexgen_dist.io.checkpoint_writer import write_random_checkpoint
    from flexgen_dist.models.family import config_by_name

    cfg = config_by_name(args.model)
    out = write_random_checkpoint(cfg, Path(args.output), DTYPES[args.dtype], args.seed)
    print(json.dumps({"checkpoint": str(out), "model": cfg.name, "dtype": args.dtype}), flush=True)
    return 0


def _require_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Count flags of `policy` and `bench` (left out = None) must be >= 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _write_text(path: str | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _vocab_size(args: argparse.Namespace) -> int:
    """Synthetic prompts draw ids from the model's vocabulary; read it without loading weights."""
    if not args.synthetic:
        return 0
    from flexgen_dist.io.model_source import model_config

    return model_config(args.model).vocab_size


class Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT), so a run unwinds as on any error: the current write
    finishes, the stages delete their offload files, the embedded Ray cluster and the metrics server stop."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def exit_code(command: Callable[[], int]) -> int:
    """Run a command the way every entry point does: bad input is one line and exit 2, I/O faults and failed runs exit
    1, SIGINT 130, SIGTERM 143 (after cleaning up)."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return command()
    except UserError as e:
        print(f"flexgen-dist: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, permissions, I/O errors in the offload or output dir
        print(f"flexgen-dist: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        return _stopped_by_signal(e)
    except SystemError as e:
        # A signal that lands inside a C extension's call (ray.get while the stages load) raises our exception there,
        # and CPython hands it over wrapped: unwrap it, or SIGTERM during loading would print a traceback.
        if isinstance(e.__cause__, (KeyboardInterrupt, Terminated)):
            return _stopped_by_signal(e.__cause__)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _stopped_by_signal(e: BaseException) -> int:
    interrupted = isinstance(e, KeyboardInterrupt)
    print(f"flexgen-dist: {'interrupted' if interrupted else 'terminated'}", file=sys.stderr)
    return 130 if interrupted else 143


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: args.func(args))
