"""lm-eval's model_args for the `flexgen-dist` model (`simple_evaluate(model="flexgen-dist", model_args=...)`,
`lm_eval --model flexgen-dist` after importing flexgen_dist.evaluation.lm) as a RunConfig: the `eval` flags' names
with underscores, and every Policy field (gpu_batch_size, w_gpu_percent, ...)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from flexgen_dist.base.devices import DEVICES, DTYPES
from flexgen_dist.base.errors import UserError
from flexgen_dist.base.typed_fields import known_keys, typed
from flexgen_dist.engine.generation import Sampling
from flexgen_dist.engine.policy import Policy, load_policy_file
from flexgen_dist.memory.budget import MemoryBudget, parse_max_memory
from flexgen_dist.run_config import EXECUTORS, PLACEMENT_STRATEGIES, RunConfig

_WHERE = "flexgen-dist model_args"
# RunConfig's settings, typed; `policy` names a policy YAML file whose fields the Policy keys then override.
_RUN_KEYS = {"model": str, "dummy_weights": bool, "seed": int, "device": str, "dtype": str, "max_memory": str,
             "offload_dir": str, "stages": int, "executor": str, "ray_address": str, "placement_strategy": str,
             "cpus_per_stage": float, "prefill_chunks": int, "blocks_in_flight": int, "refill": bool,
             "policy": str}
_CHOICES = {"device": DEVICES, "dtype": tuple(DTYPES), "executor": EXECUTORS,
            "placement_strategy": PLACEMENT_STRATEGIES}
# What simple_evaluate adds to every model's arguments; batch_size is our GPU batch size unless gpu_batch_size is given.
_LM_EVAL_KEYS = ("batch_size", "max_batch_size")


def run_config(model_args: dict) -> RunConfig:
    policy_keys = [f.name for f in fields(Policy)]
    known_keys(model_args, [*_RUN_KEYS, *policy_keys, *_LM_EVAL_KEYS], _WHERE)
    if not model_args.get("model"):
        raise UserError(f"{_WHERE}: missing model (a checkpoint directory with a tokenizer)")
    given = {k: typed(v, _RUN_KEYS[k], f"{_WHERE}: {k}") for k, v in model_args.items() if k in _RUN_KEYS}
    if str(given.get("device", "")).startswith("cuda:"):
        given["device"] = "cuda"  # lm-eval names a GPU; Ray places each stage on its own
    for key, choices in _CHOICES.items():
        if key in given and given[key] not in choices:
            raise UserError(f"{_WHERE}: {key} {given[key]!r}: expected one of {', '.join(choices)}")
    defaults = Policy()
    policy_fields = {k: typed(v, type(getattr(defaults, k)), f"{_WHERE}: {k}")
                     for k, v in model_args.items() if k in policy_keys}
    batch_size = model_args.get("batch_size")
    if batch_size is not None and "gpu_batch_size" not in policy_fields:
        if not str(batch_size).isdigit():
            raise UserError(f"{_WHERE}: batch_size {batch_size!r}: give a number of sequences per GPU batch (the "
                            "engine's block shape comes from the policy, not from probing)")
        policy_fields["gpu_batch_size"] = int(batch_size)
    base = load_policy_file(Path(given["policy"])) if "policy" in given else Policy()
    policy = replace(base, **policy_fields)  # Policy checks its own values (one-line UserErrors)
    return RunConfig(
        model=given["model"], policy=policy, dummy_weights=given.get("dummy_weights", False),
        sampling=Sampling(seed=given.get("seed", 0)), device=given.get("device"), dtype=given.get("dtype"),
        budget=parse_max_memory(given["max_memory"]) if "max_memory" in given else MemoryBudget(),
        offload_dir=given.get("offload_dir"), stages=given.get("stages", 1), executor=given.get("executor", "auto"),
        ray_address=given.get("ray_address"), placement_strategy=given.get("placement_strategy", "PACK"),
        cpus_per_stage=given.get("cpus_per_stage"), prefill_chunks=given.get("prefill_chunks"),
        blocks_in_flight=given.get("blocks_in_flight"), refill=given.get("refill", False))
