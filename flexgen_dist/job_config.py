"""A job as a YAML file (the `ray job submit` path): parsed and fully validated into a RunConfig and the description
of its work, so a bad config fails in a second with one line, not after minutes on a cluster.

Keys mirror the `flexgen-dist generate` flags with underscores. A generation job names its `input`; an evaluation job
(`flexgen-dist eval`) names instead `eval: {tasks, include_path, num_fewshot, limit, log_samples}`, and its `output`
is lm-eval's results JSON. Relative paths are resolved against the current working directory, which under
`ray job submit --working-dir DIR` is the uploaded copy of DIR.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flexgen_dist.base.devices import DEVICES, DTYPES
from flexgen_dist.base.errors import UserError
from flexgen_dist.base.typed_fields import dataclass_from_mapping, known_keys, mapping, typed
from flexgen_dist.engine.generation import Sampling
from flexgen_dist.engine.policy import Policy, load_policy_file
from flexgen_dist.io.model_source import model_config
from flexgen_dist.io.openai_batch import FORMATS
from flexgen_dist.io.prompts import Request, load_prompts_file, requests_from_cli, synthetic_requests
from flexgen_dist.memory.budget import MemoryBudget, parse_max_memory
from flexgen_dist.policy.auto import AutoPolicy
from flexgen_dist.run_config import PLACEMENT_STRATEGIES, RunConfig

POLICY_DIR = Path("configs/policies")  # where `policy: NAME.yaml` is looked up, relative to the working directory
INPUT_KINDS = ("prompts", "synthetic", "prompt")
KEYS = ("model", "dummy_weights", "policy", "max_memory", "stages", "placement_strategy", "cpus_per_stage",
        "prefill_chunks", "blocks_in_flight", "refill", "device", "dtype", "input", "max_new_tokens", "sampling", "stop",
        "logprobs", "output", "offload_dir", "metrics_port", "metrics_host", "metrics_linger_s", "eval")
EVAL_KEYS = ("tasks", "include_path", "num_fewshot", "limit", "log_samples")


@dataclass(frozen=True)
class EvalJob:
    """What `flexgen-dist eval` takes besides the run's settings (evaluation/command.py's EvalSpec, but the output)."""

    tasks: tuple[str, ...]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    log_samples: bool = False


@dataclass(frozen=True)
class JobConfig:
    run: RunConfig
    # Exactly one input is set.
    prompts_file: str | None = None
    prompts_format: str = "auto"  # of prompts_file: io/openai_batch.FORMATS
    prompts: tuple[str, ...] = ()
    synthetic: tuple[int, int] | None = None  # (count, prompt length)
    evaluation: EvalJob | None = None  # an evaluation job instead: no input

    def requests(self) -> list[Request]:
        if self.prompts_file is not None:
            return load_prompts_file(self.prompts_file)
        if self.prompts:
            return requests_from_cli(list(self.prompts))
        assert self.synthetic is not None
        count, prompt_len = self.synthetic
        seed = self.run.sampling.seed
        # Synthetic ids come from the model's vocabulary; resolving the model reads its config, not its weights.
        vocab_size = model_config(self.run.model).vocab_size
        return synthetic_requests(count, prompt_len, vocab_size, seed)


def load_job_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobConfig:
    """Read the YAML file at `path`, apply `--set KEY=VALUE` overrides, validate everything."""
    try:
        data = yaml.safe_load(Path(path).read_bytes())  # bytes: YAML itself reports bad encodings as YAMLError
    except OSError as e:
        raise UserError(f"job config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"job config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"job config {path}: expected a mapping with keys {', '.join(KEYS)}")
    return parse_job_config(apply_overrides(data, overrides), str(path))


def apply_overrides(data: dict, assignments: Sequence[str]) -> dict:
    """`sampling.seed=3`: dotted keys reach into mappings; values are YAML (4 is an int, true a bool, null unsets)."""
    data = copy.deepcopy(data)
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. stages=2 or sampling.seed=3")
        *parents, leaf = key.split(".")
        node = data
        for name in parents:
            if node.get(name) is None:
                node[name] = {}
            if not isinstance(node[name], dict):
                raise UserError(f"--set {item!r}: {name} is {node[name]!r} in the config, not a mapping")
            node = node[name]
        try:
            node[leaf] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: not a valid YAML value ({str(e).splitlines()[0]})") from None
    return data


def parse_job_config(data: dict, where: str) -> JobConfig:
    """`where` (the file name) prefixes every error."""
    known_keys(data, KEYS, where)
    if not data.get("model"):
        raise UserError(f"{where}: missing 'model' (a size name such as opt-125m, or a checkpoint directory)")
    model = typed(data["model"], str, f"{where}: model")
    if Path(model).expanduser().is_dir():
        model = _absolute(model)
    opt = _Optional(data, where)
    run = RunConfig(
        model=model,
        policy=_policy(data.get("policy"), where),
        dummy_weights=opt.get("dummy_weights", bool, False),
        max_new_tokens=opt.get("max_new_tokens", int, RunConfig.max_new_tokens),
        sampling=_sampling(data.get("sampling"), where),
        stop=tuple(opt.get("stop", list, [])),
        logprobs=opt.get("logprobs", int, None),
        device=opt.choice("device", DEVICES),
        dtype=opt.choice("dtype", tuple(DTYPES)),
        budget=_budget(data.get("max_memory"), where),
        offload_dir=_absolute(opt.get("offload_dir", str, None)),
        output=_absolute(opt.get("output", str, None)),
        stages=opt.get("stages", int, RunConfig.stages),
        placement_strategy=opt.choice("placement_strategy", PLACEMENT_STRATEGIES) or RunConfig.placement_strategy,
        cpus_per_stage=opt.get("cpus_per_stage", float, None),
        prefill_chunks=opt.get("prefill_chunks", int, None),
        blocks_in_flight=opt.get("blocks_in_flight", int, None),
        refill=opt.get("refill", bool, False),
        metrics_port=_metrics_port(opt.get("metrics_port", int, RunConfig.metrics_port), where),
        metrics_host=opt.get("metrics_host", str, RunConfig.metrics_host),
        metrics_linger_s=_metrics_linger(opt.get("metrics_linger_s", float, RunConfig.metrics_linger_s), where),
    )
    if "eval" in data:
        if "input" in data:
            raise UserError(f"{where}: give input (a generation job) or eval (an lm-eval job), not both")
        return JobConfig(run, evaluation=_evaluation(data["eval"], f"{where}: eval"))
    return _with_input(run, data.get("input"), f"{where}: input")


def _evaluation(value: Any, where: str) -> EvalJob:
    value = mapping(value, where)
    known_keys(value, EVAL_KEYS, where)
    tasks = value.get("tasks")
    names = tasks.split(",") if isinstance(tasks, str) else tasks
    if not isinstance(names, list) or not names or not all(isinstance(t, str) and t.strip() for t in names):
        raise UserError(f"{where}.tasks: give lm-eval task names, as a list or separated by commas")
    opt = _Optional(value, where)
    return EvalJob(tuple(t.strip() for t in names), _absolute(opt.get("include_path", str, None)),
                   opt.get("num_fewshot", int, None), opt.get("limit", float, None),
                   opt.get("log_samples", bool, False))


@dataclass(frozen=True)
class _Optional:
    """Optional top-level keys: absent or null means the default."""

    data: dict
    where: str

    def get(self, key: str, kind: type, default: Any) -> Any:
        value = self.data.get(key)
        return default if value is None else typed(value, kind, f"{self.where}: {key}")

    def choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        value = self.get(key, str, None)
        if value is not None and value not in choices:
            raise UserError(f"{self.where}: {key} {value!r}: expected one of {', '.join(choices)}")
        return value


def _absolute(path: str | None) -> str | None:
    """Driver and stage actors must agree on paths, whatever directory each runs in."""
    return None if path is None else str(Path.cwd() / Path(path).expanduser())


def _metrics_port(port: int, where: str) -> int:
    if not 0 <= port <= 65535:
        raise UserError(f"{where}: metrics_port {port}: expected a TCP port 0-65535 (0: off)")
    return port


def _metrics_linger(seconds: float, where: str) -> float:
    if not seconds >= 0:
        raise UserError(f"{where}: metrics_linger_s {seconds}: expected seconds >= 0")
    return seconds


def _policy(value: Any, where: str) -> Policy | AutoPolicy:
    if value == "auto":  # searched on the node the job's driver runs on, with that machine's cached profile
        return AutoPolicy()
    if isinstance(value, str):
        path = POLICY_DIR / value
        if Path(value).name != value or not path.is_file():
            names = ", ".join(sorted(p.name for p in POLICY_DIR.glob("*.yaml"))) or "none"
            raise UserError(f"{where}: policy {value!r}: not a file in {Path.cwd() / POLICY_DIR} (there: {names}); "
                            f"give a file name there, a mapping of policy fields, or auto")
        return load_policy_file(path)
    return dataclass_from_mapping(Policy, value, f"{where}: policy")


def _sampling(value: Any, where: str) -> Sampling:
    return dataclass_from_mapping(Sampling, value, f"{where}: sampling")


def _budget(value: Any, where: str) -> MemoryBudget:
    if value is None:
        return MemoryBudget()
    text = typed(value, str, f"{where}: max_memory")
    try:
        return parse_max_memory(text)
    except UserError as e:
        raise UserError(f"{where}: max_memory: {e}") from None


def _with_input(run: RunConfig, value: Any, where: str) -> JobConfig:
    if value is None:
        raise UserError(f"{where}: missing; give one of {', '.join(INPUT_KINDS)}")
    value = mapping(value, where)
    known_keys(value, (*INPUT_KINDS, "prompts_format"), where)
    kinds = [k for k in value if k != "prompts_format"]
    if len(kinds) != 1:
        raise UserError(f"{where}: give exactly one of {', '.join(INPUT_KINDS)}, got {', '.join(kinds) or 'none'}")
    kind, spec = kinds[0], value[kinds[0]]
    if "prompts_format" in value and kind != "prompts":
        raise UserError(f"{where}.prompts_format: only a prompts file has a format")
    if kind == "prompts":
        fmt = value.get("prompts_format", "auto")
        if fmt not in FORMATS:
            raise UserError(f"{where}.prompts_format: {fmt!r} is not one of {', '.join(FORMATS)}")
        return JobConfig(run, prompts_file=_absolute(typed(spec, str, f"{where}.prompts")), prompts_format=fmt)
    if kind == "prompt":
        if not isinstance(spec, list) or not spec:
            raise UserError(f"{where}.prompt: expected a non-empty list of texts")
        return JobConfig(run, prompts=tuple(typed(t, str, f"{where}.prompt[{i}]") for i, t in enumerate(spec)))
    spec = mapping(spec, f"{where}.synthetic")
    known_keys(spec, ("n", "prompt_len"), f"{where}.synthetic")
    if set(spec) != {"n", "prompt_len"}:
        raise UserError(f"{where}.synthetic: give both n and prompt_len")
    return JobConfig(run, synthetic=(typed(spec["n"], int, f"{where}.synthetic.n"),
                                     typed(spec["prompt_len"], int, f"{where}.synthetic.prompt_len")))
