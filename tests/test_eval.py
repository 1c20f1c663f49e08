"""`flexgen-dist eval` (issue 21): lm-eval tasks defined by local YAMLs over local JSONL files, run through the engine,
equal lm-eval's own `hf` backend on the same float32 checkpoint, document by document: accuracies, is_greedy and
generated text identical, log-likelihoods and perplexities within 1e-4 relative. Resident, with weights and KV cache
on disk, and as a 2-stage Ray pipeline; each request kind is one job; bad input is one line and exit 2."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_oracle import hf_greedy, hf_log_softmax
from test_cli_errors import _fails

from flexgen_dist.base.errors import UserError
from flexgen_dist.cli import main
from flexgen_dist.engine.scoring import ScoredSequence
from flexgen_dist.evaluation.local_tasks import write_local_task

REPO = Path(__file__).resolve().parent.parent
REL_TOL = 1e-4
GEN_UNTIL = ["sel", " I"]  # strings this random model does generate
GEN_TOKENS = 10
HF_TASKS = ["fg_mc", "fg_greedy", "fg_ppl", "fg_gen"]  # HF generate refuses fg_sample's seed (not a model kwarg)
TASKS = [*HF_TASKS, "fg_sample"]

QUESTIONS = ["Which license applies", "What does the software grant", "Who may copy the program",
             "What is distributed", "Where are the terms", "When does the grant end", "How is the work modified",
             "Why keep the notice"]
CHOICES = ["the license", "no warranty", "any person", "source code", "this file", "never", "with notice",
           "to copy"]
CONTEXTS = ["Permission is hereby granted, free of", "The above copyright notice and this", "THE SOFTWARE IS ",
            "This program is free software; you can redistribute it", "Licensed under the Apache License, ",
            "You may obtain a copy of the"]
PROMPTS = ["Permission is hereby granted", "The licenses for most software", "import argparse",
           "def fill(text, width", "This License applies to", "Copyright (C) 2007 Free Software"]
TEXTS = ["GNU GENERAL PUBLIC LICENSE. Version 3, 29 June 2007.",
         "Everyone is permitted to copy and distribute verbatim copies of this license document. " * 6,
         "class HelpFormatter(object): Formatter for generating usage messages and argument help strings.",
         "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED. " * 4,
         "Text wrapping and filling.",
         "The precise terms and conditions for copying, distribution and modification follow."]


def _cut(text: str, until: list[str]) -> str:
    """HFLM's cut of generated text, written out here so the expected targets do not lean on the code under test."""
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, opt_preln_dir) -> Path:
    """Five tiny tasks. Half of fg_greedy's continuations are the model's greedy next token and half of fg_gen's
    targets its greedy output (from HF directly), so is_greedy and exact_match are neither all 0 nor all 1."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(opt_preln_dir))
    out = tmp_path_factory.mktemp("eval_tasks")
    rng = random.Random(3)
    mc = [{"question": q, "choices": rng.sample(CHOICES, 4), "answer": rng.randrange(4)} for q in QUESTIONS]
    write_local_task(out, "fg_mc", mc, output_type="multiple_choice", doc_to_text="Question: {{question}}\nAnswer:",
          doc_to_choice="choices", doc_to_target="answer", num_fewshot=1,
          metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    greedy = []
    for i, context in enumerate(CONTEXTS):
        best = int(hf_log_softmax(opt_preln_dir, tokenizer(context).input_ids)[-1].argmax())
        greedy.append({"context": context, "continuation": tokenizer.decode([best]) if i % 2 == 0 else " zebra"})
    write_local_task(out, "fg_greedy", greedy, output_type="loglikelihood", doc_to_text="{{context}}",
          doc_to_target="{{continuation}}", target_delimiter="", metric_list=[{"metric": "acc"},
                                                                             {"metric": "perplexity"}])
    write_local_task(out, "fg_ppl", [{"text": t} for t in TEXTS], output_type="loglikelihood_rolling", doc_to_text="",
          doc_to_target="{{text}}", metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                                         "bits_per_byte")])
    outputs = [tokenizer.decode(ids, skip_special_tokens=True)
               for ids in hf_greedy(opt_preln_dir, [tokenizer(p).input_ids for p in PROMPTS], GEN_TOKENS)]
    texts = [_cut(text, GEN_UNTIL) for text in outputs]
    assert texts != outputs, "some greedy output should hold a stop string"
    gen = [{"prompt": p, "target": t if i % 2 == 0 else "no"} for i, (p, t) in enumerate(zip(PROMPTS, texts))]
    until = {"until": GEN_UNTIL, "max_gen_toks": GEN_TOKENS}
    write_local_task(out, "fg_gen", gen, output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{target}}",
          generation_kwargs={**until, "do_sample": False}, metric_list=[{"metric": "exact_match"}])
    write_local_task(out, "fg_sample", gen, output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{target}}",
          generation_kwargs={**until, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "seed": 7},
          metric_list=[{"metric": "exact_match"}])
    return out


@pytest.fixture(scope="module")
def hf_results(tasks_dir, opt_preln_dir) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={opt_preln_dir},dtype=float32",
                                      device="cpu", batch_size=4, tasks=HF_TASKS, log_samples=True,
                                      task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    from lm_eval.utils import handle_non_serializable

    for task, metric in (("fg_greedy", "acc,none"), ("fg_gen", "exact_match,none")):
        assert 0 < results["results"][task][metric] < 1, f"{task}: the test data should mix hits and misses"
    return json.loads(json.dumps(results, default=handle_non_serializable))  # as `eval` writes its results


def _eval(tmp_path: Path, model_dir, tasks_dir, *flags, tasks=TASKS, executor="local", capsys=None) -> dict:
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(model_dir), "--tasks", ",".join(tasks), "--include-path", str(tasks_dir),
            "--output", str(out), "--log-samples", "--dtype", "float32", "--device", "cpu", "--quiet",
            "--executor", executor, *flags]
    assert main(argv) == 0
    if capsys is not None:
        table = capsys.readouterr().out
        assert all(task in table for task in tasks) and "exact_match" in table, table
    return json.loads(out.read_text())


def _assert_same(ours, theirs, where: str) -> None:
    """Numbers within REL_TOL (accuracies are exact by their own check), everything else equal."""
    if isinstance(theirs, bool) or isinstance(theirs, str) or theirs is None:
        assert ours == theirs, where
    elif isinstance(theirs, (int, float)):
        assert ours == pytest.approx(theirs, rel=REL_TOL), where
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key, value in theirs.items():
            _assert_same(ours[key], value, f"{where}.{key}")
    else:
        raise AssertionError(f"{where}: unexpected {type(theirs).__name__}")


def _assert_matches_hf(ours: dict, hf: dict, tasks=HF_TASKS) -> None:
    for task in tasks:
        for key, value in hf["results"][task].items():
            if key.startswith(("acc,", "acc_norm,", "exact_match,")):
                assert ours["results"][task][key] == value, f"{task} {key}"
            elif isinstance(value, float) and "stderr" not in key:  # stderrs of perplexities are bootstrapped
                assert ours["results"][task][key] == pytest.approx(value, rel=REL_TOL), f"{task} {key}"
        theirs = {s["doc_id"]: s for s in hf["samples"][task]}
        mine = {s["doc_id"]: s for s in ours["samples"][task]}
        assert mine.keys() == theirs.keys()
        for doc_id, sample in theirs.items():
            _assert_same(mine[doc_id]["arguments"], sample["arguments"], f"{task} doc {doc_id} arguments")
            _assert_same(mine[doc_id]["resps"], sample["resps"], f"{task} doc {doc_id} resps")


def _assert_one_job_per_request_kind(results: dict) -> None:
    jobs = results["flexgen_dist"]["jobs"]
    kinds = sorted(job["request_type"] for job in jobs)
    assert kinds == ["generate_until", "loglikelihood", "loglikelihood_rolling"]
    requests = {job["request_type"]: job["requests"] for job in jobs}
    assert requests == {"loglikelihood": 4 * len(QUESTIONS) + len(CONTEXTS), "loglikelihood_rolling": len(TEXTS),
                        "generate_until": 2 * len(PROMPTS)}
    scoring = next(job for job in jobs if job["request_type"] == "loglikelihood")
    # A multiple-choice document's 4 requests share its context: one row each; fg_greedy's contexts all differ.
    assert scoring["rows"] == len(QUESTIONS) + len(CONTEXTS) and scoring["shared_tokens_saved"] > 0, scoring
    windows = next(job["sequences"] for job in jobs if job["request_type"] == "loglikelihood_rolling")
    assert windows > len(TEXTS), "a document longer than the model's positions is scored in several windows"
    lengths = next(job["output_tokens_quartiles"] for job in jobs if job["request_type"] == "generate_until")
    assert len(lengths) == 5 and lengths == sorted(lengths) and 1 <= lengths[0] and lengths[-1] <= GEN_TOKENS


@pytest.fixture(scope="module")
def resident(tmp_path_factory, opt_preln_dir, tasks_dir) -> dict:
    return _eval(tmp_path_factory.mktemp("resident"), opt_preln_dir, tasks_dir, "--batch-size", "3",
                 "--num-gpu-batches", "2")


def test_resident_eval_equals_hf_backend(resident, hf_results):
    _assert_matches_hf(resident, hf_results)
    _assert_one_job_per_request_kind(resident)


def test_sampled_requests_follow_their_settings(resident):
    greedy = {s["doc_id"]: s["resps"] for s in resident["samples"]["fg_gen"]}
    sampled = {s["doc_id"]: s["resps"] for s in resident["samples"]["fg_sample"]}
    assert sampled != greedy, "do_sample with temperature 1.5 should change some output"


def test_eval_with_weights_and_cache_on_disk_equals_hf_backend(tmp_path, opt_preln_dir, tasks_dir, hf_results,
                                                               resident, capsys):
    # With refill too: a generate_until request whose sequence stops gives its row to a waiting one.
    ours = _eval(tmp_path, opt_preln_dir, tasks_dir, "--percent", *"0 0 0 0 100 0".split(), "--offload-dir",
                 str(tmp_path / "offload"), "--gpu-batch-size", "2", "--refill", capsys=capsys)
    _assert_matches_hf(ours, hf_results)
    generating = next(job for job in ours["flexgen_dist"]["jobs"] if job["request_type"] == "generate_until")
    assert generating["refilled_sequences"] > 0
    assert ours["samples"]["fg_sample"] == resident["samples"]["fg_sample"], "seeded sampling is block-independent"
    assert not any((tmp_path / "offload").rglob("*.bin")), "offload files must be removed when the jobs end"


def test_eval_job_on_two_ray_stages_equals_hf_backend(tmp_path, ray_cluster, opt_preln_dir, tasks_dir, hf_results,
                                                       resident):
    """An evaluation job YAML through `ray job submit --working-dir <repo>`, as the README documents it: the job's
    driver joins the fixture's head through RAY_ADDRESS and runs two stage actors."""
    # Without the rolling-perplexity task, whose job is the same scoring path as the cloze tasks': each job starts
    # the stage actors anew.
    tasks = ["fg_mc", "fg_greedy", "fg_gen", "fg_sample"]
    output = tmp_path / "results.json"
    config = tmp_path / "eval-job.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": str(opt_preln_dir), "device": "cpu", "dtype": "float32", "stages": 2,
        "policy": {"gpu_batch_size": 2, "num_gpu_batches": 2}, "output": str(output),
        "eval": {"tasks": ",".join(tasks), "include_path": str(tasks_dir), "log_samples": True}}))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster["dashboard"],
         "--working-dir", str(REPO), "--log-style", "record", "--", sys.executable, "launch/generate_job.py",
         "--config", str(config)], capture_output=True, text=True, timeout=300, env=dict(os.environ), cwd=REPO)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in logs, logs[-4000:]
    last = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"results"')][-1])
    assert sorted(last["results"]) == sorted(tasks)
    ours = json.loads(output.read_text())
    _assert_matches_hf(ours, hf_results, [t for t in tasks if t in HF_TASKS])
    assert sorted(job["request_type"] for job in ours["flexgen_dist"]["jobs"]) == ["generate_until", "loglikelihood"]
    assert all(job["stages"] == 2 for job in ours["flexgen_dist"]["jobs"])
    assert ours["samples"]["fg_sample"] == resident["samples"]["fg_sample"]


def test_registered_model_runs_from_model_args(opt_preln_dir, tasks_dir, hf_results):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import flexgen_dist.evaluation.lm  # noqa: F401  (registers "flexgen-dist")

    results = lm_eval.simple_evaluate(
        model="flexgen-dist", model_args=f"model={opt_preln_dir},dtype=float32,device=cpu,executor=local",
        batch_size=4, tasks=["fg_mc"], task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    assert results["results"]["fg_mc"]["acc,none"] == hf_results["results"]["fg_mc"]["acc,none"]


# --- the pieces ------------------------------------------------------------------------------------------------------


def test_continuation_windows_cut_from_the_left_like_hf():
    from flexgen_dist.evaluation.windows import continuation_window, rolling_windows

    seq = continuation_window([1, 2, 3, 4, 5], [6, 7], max_length=4)
    assert seq.input_ids == [3, 4, 5, 6] and seq.targets == [6, 7]
    assert seq.position_targets() == [-100, -100, 6, 7]
    windows = rolling_windows(list(range(10, 20)), prefix_token=2, max_length=4)
    assert [w.targets for w in windows] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert [w.input_ids for w in windows] == [[2, 10, 11, 12], [13, 14, 15, 16], [15, 16, 17, 18]]
    with pytest.raises(UserError, match="empty continuation"):
        continuation_window([1], [], max_length=4)


def test_generation_kwargs_map_like_hf():
    from flexgen_dist.evaluation.generation import generation_settings

    s = generation_settings({"until": "\n\n", "max_new_tokens": 7, "do_sample": False, "temperature": 0.7}, 256, "</s>")
    assert (s.until, s.max_gen_toks, s.temperature, s.top_p, s.seed) == (("\n\n", "</s>"), 7, 0.0, 1.0, None)
    s = generation_settings({"do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 3}, 256, "</s>")
    assert (s.until, s.max_gen_toks, s.temperature, s.top_p, s.seed) == (("</s>",), 256, 0.5, 0.9, 3)
    with pytest.raises(UserError, match="top_k"):
        generation_settings({"until": [], "top_k": 5}, 256, "</s>")


def test_the_head_computes_logits_only_for_scored_positions(opt_preln_dir, monkeypatch):
    from flexgen_dist.engine.policy import Policy
    from flexgen_dist.io.model_source import model_config
    from flexgen_dist.models import opt
    from flexgen_dist.run_config import RunConfig
    from flexgen_dist.score_run import plan_scoring, run_scoring

    widths = []
    lm_head = opt.lm_head

    def counted(cfg, w, hidden):
        widths.append(hidden.shape[1])
        return lm_head(cfg, w, hidden)

    monkeypatch.setattr(opt, "lm_head", counted)
    run = RunConfig(str(opt_preln_dir), Policy(gpu_batch_size=2), dtype="float32", device="cpu", executor="local",
                    progress=False)
    sequences = [ScoredSequence(list(range(10, 40)), targets=[40, 41]), ScoredSequence(list(range(5, 25)), [7]),
                 ScoredSequence(list(range(50, 60)))]
    cfg = model_config(str(opt_preln_dir))
    run_scoring(run, cfg, plan_scoring(run, cfg, torch.float32, torch.device("cpu"), sequences), sequences)
    assert sorted(widths) == [2, 10]  # the block of the two continuations: 2 columns; the whole-sequence score: all
    logprobs = hf_log_softmax(opt_preln_dir, list(range(10, 40)))  # the last two positions predict the targets
    assert sequences[0].nll == pytest.approx(-float(logprobs[28, 40] + logprobs[29, 41]), rel=REL_TOL)
    assert math.isfinite(sequences[2].nll) and sequences[2].scored_tokens == 9


# --- bad input -------------------------------------------------------------------------------------------------------


def test_unknown_task_is_one_line(capsys, opt_preln_dir, tasks_dir):
    _fails(capsys, ["eval", "--model", str(opt_preln_dir), "--tasks", "fg_mc,no_such_task", "--include-path",
                    str(tasks_dir)], "unknown task no_such_task")


def test_missing_include_path_is_one_line(capsys, tmp_path, opt_preln_dir):
    _fails(capsys, ["eval", "--model", str(opt_preln_dir), "--tasks", "fg_mc", "--include-path",
                    str(tmp_path / "nowhere")], "--include-path", "not a directory")


def test_missing_lm_eval_is_one_line(capsys, monkeypatch, opt_preln_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    _fails(capsys, ["eval", "--model", str(opt_preln_dir), "--tasks", "fg_mc"], "pip install", "[eval]")


def test_model_without_tokenizer_is_one_line(capsys, tasks_dir):
    _fails(capsys, ["eval", "--model", "opt-125m", "--dummy-weights", "--tasks", "fg_mc", "--include-path",
                    str(tasks_dir)], "tokenizer")


def test_unsupported_generation_setting_is_one_line(capsys, tmp_path, opt_preln_dir):
    write_local_task(tmp_path, "fg_beams", [{"prompt": "a", "target": "b"}], output_type="generate_until",
          doc_to_text="{{prompt}}", doc_to_target="{{target}}",
          generation_kwargs={"until": ["\n"], "max_gen_toks": 4, "num_beams": 4},
          metric_list=[{"metric": "exact_match"}])
    rc = main(["eval", "--model", str(opt_preln_dir), "--tasks", "fg_beams", "--include-path", str(tmp_path),
               "--executor", "local", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err  # lm-eval's own logging and progress bars come before it
    assert "num_beams" in err.strip().splitlines()[-1] and "not supported" in err.strip().splitlines()[-1], err
