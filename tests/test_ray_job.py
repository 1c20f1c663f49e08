"""The `ray job submit` path: the job config parser (every shipped config included), the entrypoint's exit codes, and
one real job submitted with the Ray CLI to a local head, checked token for token against HF."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hf_oracle import hf_greedy
from test_parity import MAX_NEW, PROMPTS

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.generation import Sampling
from flexgen_dist.engine.policy import Policy
from flexgen_dist.job_config import EvalJob, load_job_config
from flexgen_dist.memory.budget import MemoryBudget

REPO = Path(__file__).resolve().parents[1]
JOB_CONFIGS = sorted((REPO / "configs" / "jobs").glob("*.yaml"))
VALID = {
    "model": "opt-125m",
    "dummy_weights": True,
    "policy": {"gpu_batch_size": 4, "num_gpu_batches": 2, "w_gpu_percent": 0, "w_cpu_percent": 50},
    "max_memory": "cpu=8GiB",
    "stages": 2,
    "placement_strategy": "SPREAD",
    "cpus_per_stage": 1,
    "prefill_chunks": 3,
    "blocks_in_flight": 2,
    "refill": True,
    "device": "cpu",
    "dtype": "float32",
    "input": {"synthetic": {"n": 3, "prompt_len": 5}},
    "max_new_tokens": 4,
    "sampling": {"temperature": 0.7, "top_p": 0.9, "seed": 7, "ignore_eos": True},
    "stop": ["\n\n", "###"],
    "logprobs": 3,
    "output": "out/results.jsonl",
    "offload_dir": "/tmp/flexgen-offload",
}


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _load_entrypoint():
    spec = importlib.util.spec_from_file_location("generate_job", REPO / "launch" / "generate_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[p.stem for p in JOB_CONFIGS])
def test_shipped_job_configs_parse(path, monkeypatch):
    monkeypatch.chdir(REPO)  # as under `ray job submit --working-dir .`: policy names resolve in configs/policies/
    job = load_job_config(path)
    assert job.run.output and Path(job.run.output).is_absolute(), "outputs belong outside the uploaded working dir"
    assert job.run.offload_dir and Path(job.run.offload_dir).is_absolute()
    assert job.requests()


def test_shipped_job_configs_exist():
    assert {p.stem for p in JOB_CONFIGS} >= {"tiny-cpu", "opt-6.7b-t4", "opt-30b-4xt4", "opt-175b-disk"}


def test_config_maps_onto_run_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = load_job_config(_write(tmp_path, VALID))
    run = job.run
    assert (run.model, run.dummy_weights, run.stages, run.placement_strategy) == ("opt-125m", True, 2, "SPREAD")
    assert (run.device, run.dtype, run.max_new_tokens, run.executor_name) == ("cpu", "float32", 4, "ray")
    assert (run.cpus_per_stage, run.prefill_chunks, run.blocks_in_flight, run.refill) == (1.0, 3, 2, True)
    assert run.policy == Policy(gpu_batch_size=4, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=50)
    assert run.budget == MemoryBudget(cpu=8 * 2**30)
    assert run.sampling == Sampling(temperature=0.7, top_p=0.9, seed=7, ignore_eos=True)
    assert (run.stop, run.logprobs) == (("\n\n", "###"), 3)
    assert run.output == str(tmp_path / "out" / "results.jsonl")  # relative paths: against the working directory
    assert run.offload_dir == "/tmp/flexgen-offload"
    assert run.ray_address is None  # the job's driver finds the cluster through RAY_ADDRESS
    assert job.synthetic == (3, 5)
    requests = job.requests()
    assert [len(r.input_ids) for r in requests] == [5, 5, 5]


def test_a_prompts_file_may_name_its_format(tmp_path):
    """An OpenAI batch file named as such (launch/generate_job.py passes the format to batch_input); auto otherwise."""
    job = load_job_config(_write(tmp_path, {"model": "opt-125m", "input": {"prompts": "b.jsonl",
                                                                          "prompts_format": "openai-batch"}}))
    assert (job.prompts_file, job.prompts_format) == (str(Path.cwd() / "b.jsonl"), "openai-batch")
    assert load_job_config(_write(tmp_path, {"model": "opt-125m", "input": {"prompts": "b.jsonl"}})).prompts_format == "auto"


def test_defaults_named_policy_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = _write(tmp_path, {"model": "opt-125m", "policy": "all-disk.yaml", "input": {"prompt": ["hi"]}})
    job = load_job_config(path)
    assert job.run.policy.weight_percents() == (0, 0, 100)  # configs/policies/all-disk.yaml
    assert (job.run.stages, job.run.placement_strategy, job.run.output, job.run.device) == (1, "PACK", None, None)
    assert job.prompts == ("hi",)

    assert (job.run.metrics_port, job.run.metrics_host, job.run.metrics_linger_s) == (0, "127.0.0.1", 0.0)

    job = load_job_config(path, ["stages=3", "sampling.seed=5", "policy={gpu_batch_size: 2}", "output=/tmp/x.jsonl",
                                 "metrics_port=9400", "metrics_linger_s=30"])
    assert (job.run.stages, job.run.sampling, job.run.output) == (3, Sampling(seed=5), "/tmp/x.jsonl")
    assert (job.run.metrics_port, job.run.metrics_linger_s) == (9400, 30.0)
    assert job.run.policy == Policy(gpu_batch_size=2)


def test_evaluation_job_config(tmp_path, monkeypatch):
    """`eval:` instead of `input:`: an lm-eval job (launch/generate_job.py runs it as `flexgen-dist eval`)."""
    monkeypatch.chdir(tmp_path)
    config = {k: v for k, v in VALID.items() if k != "input"}
    job = load_job_config(_write(tmp_path, {**config, "eval": {"tasks": "a, b", "include_path": "tasks",
                                                               "num_fewshot": 2, "limit": 0.5}}))
    assert job.evaluation == EvalJob(("a", "b"), str(tmp_path / "tasks"), 2, 0.5, False)
    assert job.run.stages == VALID["stages"] and job.run.output == str(tmp_path / VALID["output"])
    job = load_job_config(_write(tmp_path, {**config, "eval": {"tasks": ["a"], "log_samples": True}}))
    assert job.evaluation == EvalJob(("a",), log_samples=True) and job.prompts_file is None


@pytest.mark.parametrize("change,overrides,message", [
    ({"metrics_prot": 9000}, [], "unknown key metrics_prot"),
    ({"metrics_port": 70000}, [], "metrics_port 70000: expected a TCP port 0-65535"),
    ({"metrics_linger_s": -1}, [], "metrics_linger_s -1.0: expected seconds >= 0"),
    ({"model": None}, [], "missing 'model'"),
    ({"cpus_per_stage": 0}, [], "--cpus-per-stage must be > 0"),
    ({"prefill_chunks": 0}, [], "--prefill-chunks must be >= 1"),
    ({"blocks_in_flight": 0}, [], "--blocks-in-flight must be >= 1"),
    ({"input": {"synthetic": {"n": 2, "prompt_len": 3}, "prompt": ["hi"]}}, [], "exactly one of prompts, synthetic"),
    ({"input": None}, [], "input: missing"),
    ({"input": {"synthetic": {"n": 2}}}, [], "synthetic: give both n and prompt_len"),
    ({"input": {"synthetic": {"n": 2, "prompt_len": 3}, "prompts_format": "openai-batch"}}, [],
     "prompts_format: only a prompts file has a format"),
    ({"input": {"prompts": "p.jsonl", "prompts_format": "csv"}}, [], "prompts_format: 'csv' is not one of auto"),
    ({"stages": "two"}, [], "stages: expected an integer"),
    ({"dummy_weights": "yes"}, [], "dummy_weights: expected true or false"),
    ({"placement_strategy": "ANYWHERE"}, [], "placement_strategy 'ANYWHERE': expected one of PACK"),
    ({"policy": {"w_gpu": 10}}, [], "policy: unknown key w_gpu"),
    ({"policy": {"w_gpu_percent": 80, "w_cpu_percent": 80}}, [], "policy: --percent: w gpu 80 + cpu 80"),
    ({"policy": "no-such-policy.yaml"}, [], "policy 'no-such-policy.yaml': not a file in"),
    ({"max_memory": "gpu=lots"}, [], "max_memory: memory budget entry 'gpu=lots'"),
    ({"sampling": {"top_p": 0}}, [], "in (0, 1]"),
    ({"stop": "###"}, [], "stop: expected a list"),
    ({"stop": ["###", 3]}, [], "--stop: expected non-empty strings"),
    ({"logprobs": 21}, [], "--logprobs must be from 0 to 20"),
    ({"eval": {"tasks": ["t"]}}, [], "give input (a generation job) or eval (an lm-eval job), not both"),
    ({"input": None, "eval": {"tasks": []}}, [], "eval.tasks: give lm-eval task names"),
    ({"input": None, "eval": {"tasks": "t", "num_shots": 1}}, [], "eval: unknown key num_shots"),
    ({"input": None, "eval": {"tasks": "t", "limit": "all"}}, [], "eval: limit: expected a number"),
    ({}, ["stages"], "--set 'stages': expected KEY=VALUE"),
    ({}, ["model.name=x"], "--set 'model.name=x': model is 'opt-125m' in the config, not a mapping"),
])
def test_bad_configs_are_one_clear_line(tmp_path, monkeypatch, change, overrides, message):
    monkeypatch.chdir(REPO)
    config = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    with pytest.raises(UserError) as e:
        load_job_config(_write(tmp_path, config), overrides)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(UserError, match="job config .*missing.yaml: No such file"):
        load_job_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- model\n")
    with pytest.raises(UserError, match="expected a mapping with keys model"):
        load_job_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [opt\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_job_config(tmp_path / "broken.yaml")


def test_entrypoint_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = _load_entrypoint().main(["--config", str(_write(tmp_path, {**VALID, "metrics_prot": 9000}))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unknown key metrics_prot" in err, err


def test_ray_job_submit_end_to_end(tmp_path, ray_cluster, opt_preln_dir):
    """`ray job submit --working-dir <repo>` as the README documents it, against the fixture's head: the Ray CLI
    uploads the repository (without .gitignored paths), the job's driver joins through RAY_ADDRESS, and two stage
    actors stream offloaded weights and KV cache through the disk tier."""
    prompts = PROMPTS[:4]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    output, offload = tmp_path / "out" / "results.jsonl", tmp_path / "offload"
    config = _write(tmp_path, {
        "model": str(opt_preln_dir), "device": "cpu", "dtype": "float32", "stages": 2,
        "policy": {"gpu_batch_size": 2, "num_gpu_batches": 1, "w_gpu_percent": 30, "w_cpu_percent": 30,
                   "cache_gpu_percent": 30, "cache_cpu_percent": 30},
        "input": {"prompts": str(prompts_file)}, "max_new_tokens": MAX_NEW,
        "output": str(output), "offload_dir": str(offload),
    })
    ray_cli = Path(sys.executable).parent / "ray"
    # The cluster's PATH need not hold the venv: name its python. The env carries the fixture's auth token.
    proc = subprocess.run(
        [str(ray_cli), "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(REPO),
         "--log-style", "record", "--", sys.executable, "launch/generate_job.py", "--config", str(config)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ), cwd=REPO)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in logs, logs[-4000:]

    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"model"')][-1])
    assert (summary["executor"], summary["stages"], summary["sequences"]) == ("ray", 2, len(prompts))
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [str(i) for i in range(len(prompts))]  # every prompt exactly once
    by_id = {r["id"]: r["output_ids"] for r in records}
    assert [by_id[str(i)] for i in range(len(prompts))] == hf_greedy(opt_preln_dir, prompts, MAX_NEW)
    assert not [p for p in offload.rglob("*") if p.is_file()], "stages must delete their offload files"
