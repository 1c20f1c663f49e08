"""vLLM on the bench's work, run by vLLM's own interpreter (`PYTHON vllm_runner.py SPEC.json`): vLLM pins its own torch
and packages, so it lives in a virtual environment of its own (launch/setup_vllm.sh), and this file imports nothing of
flexgen_dist. It prints one JSON line: the result, or {"skipped": why} where vLLM does not import.

The spec (written by vllm_baseline.py): model (a directory with config.json, and weights unless load_format is
"dummy"), load_format, prompts (token ids), gen_len, max_num_seqs, dtype, kv_cache_bytes, cpu_offload_bytes."""

from __future__ import annotations

import json
import os
import sys
import time


def _configure_threads() -> None:
    # vLLM's CPU build keeps one core per worker for its scheduler by default: on a 2-core machine that halves its
    # compute, while our engine computes on every core. Give it every core too, unless the user chose.
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"


def run(spec: dict) -> dict:
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except Exception as e:  # an install that does not import (the CUDA torchvision of issue 20) is a skip, not a crash
        return {"skipped": f"vllm does not import here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    start = time.perf_counter()
    offload = {"cpu_offload_gb": spec["cpu_offload_bytes"] / 2**30} if spec["cpu_offload_bytes"] else {}
    llm = LLM(model=spec["model"], load_format=spec["load_format"], skip_tokenizer_init=True, dtype=spec["dtype"],
              max_model_len=max(map(len, spec["prompts"])) + spec["gen_len"], max_num_seqs=spec["max_num_seqs"],
              seed=0, kv_cache_memory_bytes=spec["kv_cache_bytes"], **offload)
    load_s = time.perf_counter() - start
    # Greedy, exactly gen_len tokens each (EOS ignored), as the other systems run; token ids in and out.
    params = SamplingParams(temperature=0.0, max_tokens=spec["gen_len"], ignore_eos=True, detokenize=False)
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    total_s = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"system": "vllm", "version": vllm.__version__, "batch_size": spec["max_num_seqs"],
            "generated_tokens": generated, "total_s": total_s,
            # vLLM schedules every prompt at once (continuous batching): a "block" is the whole call
            "latency_s": total_s, "generation_throughput_tok_s": generated / total_s, "load_s": load_s}


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    _configure_threads()
    # vLLM and its engine processes log to stdout, also after generate returns: send all of it to stderr, so that
    # the one line on stdout is the result.
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result_out.write(json.dumps(run(spec)) + "\n")
    result_out.flush()
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing's spawn: the guard is required
    sys.exit(main(sys.argv[1:]))
