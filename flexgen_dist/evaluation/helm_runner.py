"""HELM on the engine: a checkpoint registered as a HELM model, and a Runner whose executor answers every request of a
run (one run spec's scenario, adapted) with ONE offline engine job, as the FlexGen paper ran HELM. HELM's own Executor
hands requests to a client one at a time (4 threads); `Executor.execute` is the one place that sees them all.

Used through helm_run.py, which registers the model and sets the engine's settings (`configure`) before helm-run
builds this runner from its class name. Needs crfm-helm (.venv-helm, launch/setup_helm.sh)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.executor import ExecutionSpec, Executor
from helm.benchmark.model_deployment_registry import ClientSpec, ModelDeployment, register_model_deployment
from helm.benchmark.model_metadata_registry import get_unknown_model_metadata, register_model_metadata
from helm.benchmark.runner import Runner, RunSpec
from helm.benchmark.tokenizer_config_registry import TokenizerConfig, TokenizerSpec, register_tokenizer_config
from helm.clients.client import Client
from helm.common.hierarchical_logger import hlog
from helm.common.request import Request as HelmRequest
from helm.common.request import RequestResult

from flexgen_dist.base.errors import UserError
from flexgen_dist.evaluation.helm_requests import completion, engine_requests, refusal
from flexgen_dist.io.model_source import load_tokenizer, model_config
from flexgen_dist.io.prompts import Request
from flexgen_dist.run import generate
from flexgen_dist.run_config import RunConfig

JOBS_FILE = "flexgen_dist_jobs.json"  # beside HELM's stats.json in each run's directory: its engine job's summary


@dataclass(frozen=True)
class EngineModel:
    name: str  # the HELM model and model deployment name: flexgen-dist/<checkpoint directory's name>
    run: RunConfig
    tokenizer: Any


_model: EngineModel | None = None  # set by `configure`; helm-run builds the runner from a class name, not an object


def configure(run: RunConfig) -> str:
    """Register `run.model` with HELM and keep the run's settings for the runner; -> the model's HELM name."""
    global _model
    path = Path(run.model).expanduser()
    tokenizer = load_tokenizer(path) if path.is_dir() else None
    if tokenizer is None:
        raise UserError(f"--model {run.model}: HELM sends text, so it needs a checkpoint directory with a tokenizer "
                        "(with --dummy-weights too)")
    name = f"flexgen-dist/{path.resolve().name}"
    register(name, path.resolve(), model_config(run.model).max_positions, tokenizer)
    _model = EngineModel(name, replace(run, output=None), tokenizer)
    return name


def register(name: str, path: Path, max_positions: int, tokenizer: Any) -> None:
    """The model, its deployment and its tokenizer (HELM's HuggingFaceTokenizer on the checkpoint directory). HELM
    counts a prompt's tokens without the special tokens the engine adds, and an echo that scores its prompt generates
    one token it drops: the window HELM fits prompts into leaves room for both, so no request exceeds the positions."""
    special = len(tokenizer("a").input_ids) - len(tokenizer("a", add_special_tokens=False).input_ids)
    register_model_metadata(get_unknown_model_metadata(name))
    register_tokenizer_config(TokenizerConfig(
        name=name, tokenizer_spec=TokenizerSpec(class_name="helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer",
                                                args={"pretrained_model_name_or_path": str(path)}),
        end_of_text_token=tokenizer.eos_token or "", prefix_token=tokenizer.bos_token or ""))
    register_model_deployment(ModelDeployment(
        name=name, client_spec=ClientSpec(class_name=f"{__name__}.BatchOnlyClient", args={}), model_name=name,
        tokenizer_name=name, max_sequence_length=max_positions - special - 1))


class BatchOnlyClient(Client):
    """The deployment's client: its requests are answered by BatchExecutor, never one by one."""

    def make_request(self, request: HelmRequest) -> RequestResult:
        raise UserError(f"{request.model_deployment} answers whole runs only: run it with python -m "
                        "flexgen_dist.evaluation.helm_run")


class BatchRunner(Runner):
    """HELM's Runner with BatchExecutor; writes each run's engine job summary to JOBS_FILE in the run's directory."""

    def __init__(self, execution_spec: ExecutionSpec, *args: Any, **kwargs: Any) -> None:
        super().__init__(execution_spec, *args, **kwargs)
        if _model is None:
            raise UserError("BatchRunner needs the engine's settings: run python -m flexgen_dist.evaluation.helm_run "
                            "--model DIR ... -- HELM_RUN_ARGS")
        self.executor = BatchExecutor(execution_spec, _model)

    def run_one(self, run_spec: RunSpec) -> None:
        self.executor.jobs = []
        super().run_one(run_spec)
        if self.executor.jobs:
            with open(os.path.join(self._get_run_path(run_spec), JOBS_FILE), "w") as f:
                json.dump(self.executor.jobs, f, indent=2)


class BatchExecutor(Executor):
    def __init__(self, execution_spec: ExecutionSpec, model: EngineModel) -> None:
        super().__init__(execution_spec)
        self.model = model
        self.jobs: list[dict] = []  # the summary of each engine job of the current run

    def execute(self, scenario_state: ScenarioState) -> ScenarioState:
        states = scenario_state.request_states
        if self.execution_spec.dry_run or not states:
            return scenario_state
        results, job = run_batch(self.model, [s.request for s in states])
        self.jobs.append(job)
        hlog(f"flexgen-dist: {job['helm_requests']} requests as {job['sequences']} sequences in one engine job, "
             f"{job['total_s']:.1f} s, {job['generation_throughput_tok_s']:.1f} generated tok/s")
        return replace(scenario_state, request_states=[replace(s, result=r) for s, r in zip(states, results)])


def run_batch(model: EngineModel, requests: list[HelmRequest]) -> tuple[list[RequestResult], dict]:
    """Every request (all checked first) as one engine job; -> a result per request, and the job's summary. Identical
    sequences are computed once (a greedy request's completions, repeated requests), as HELM's request cache would."""
    for request in requests:
        why = refusal(request) or (None if request.model_deployment == model.name else
                                   f"model deployment {request.model_deployment} (this run serves {model.name})")
        if why:
            raise UserError(f"HELM request {request.prompt[:40]!r}...: {why}")
    distinct: dict[Request, str] = {}
    ids = [[distinct.setdefault(r, str(len(distinct))) for r in engine_requests(request, model.run.sampling.seed)]
           for request in requests]
    records: dict[str, dict] = {}
    start = time.perf_counter()
    summary = generate(model.run, [replace(r, id=i) for r, i in distinct.items()],
                       sink=lambda batch: records.update((record["id"], record) for record in batch))
    elapsed = time.perf_counter() - start  # loading the stages included: HELM reports it as the batch's runtime

    def decode(token_ids: list[int]) -> str:
        return model.tokenizer.decode(token_ids)  # special tokens kept, as HELM's HuggingFaceClient decodes

    results = [RequestResult(success=True, embedding=[], cached=False, batch_size=len(requests),
                             batch_request_time=elapsed,
                             completions=[completion(records[i], request, decode) for i in request_ids])
               for request, request_ids in zip(requests, ids)]
    return results, {"helm_requests": len(requests), "batch_request_time_s": elapsed, **summary}
