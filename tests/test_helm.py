"""HELM through the engine (issue 21, deliverable 5): real helm-runs in .venv-helm (launch/setup_helm.sh) on the tiny
float32 OPT, over local scenarios: a multiple-choice file scored by echoing each choice (custom_mcqa, the "separate"
method), greedy generation with stop sequences and sampled generation with two completions (synthetic_reasoning).
Each run is ONE engine job (its summary in the run's directory) through 2 stages in blocks of 2x2 (in process: the Ray
pipeline's paths are tested through `generate` and `eval`), and equals HELM's own HuggingFaceClient on the same
checkpoint: prompts and greedy texts identical, echoed log-probabilities within 1e-4, the same exact_match. Skipped
when .venv-helm does not exist."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HELM_PYTHON = REPO / ".venv-helm" / "bin" / "python"
pytestmark = pytest.mark.skipif(not HELM_PYTHON.exists(), reason=".venv-helm does not exist (bash launch/setup_helm.sh "
                                                                 "builds it: about 3.5 minutes, 1.9 GB)")

LOGPROB_TOL = 1e-4
INSTANCES = 8
GREEDY = "synthetic_reasoning:mode=pattern_match,add_to_stop=is"  # " is" is frequent in this model's output
SAMPLED = "synthetic_reasoning:mode=pattern_match,temperature=0.7,num_outputs=2"
HF_NAME = "huggingface/tiny-opt"


def _mc_entry(path: Path) -> str:
    return f"custom_mcqa:path={path},method=multiple_choice_separate_original"


def _helm(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM_PYTHON), *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _runs(output: Path, suite: str) -> dict[str, dict]:
    """Each run of the suite by its run entry's head (custom_mcqa, synthetic_reasoning, ..._num_outputs=2): its
    scenario state, stats and, where written, our engine jobs."""
    runs = {}
    for run in (output / "runs" / suite).iterdir():
        if run.name == "eval_cache":
            continue
        key = run.name.split(",")[0].split(":")[0] + (",num_outputs=2" if "num_outputs=2" in run.name else "")
        jobs = run / "flexgen_dist_jobs.json"
        runs[key] = {"state": json.loads((run / "scenario_state.json").read_text()),
                     "stats": json.loads((run / "stats.json").read_text()),
                     "jobs": json.loads(jobs.read_text()) if jobs.exists() else None}
    return runs


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory) -> Path:
    """Parity questions: the references are " even" and " odd", one token or two, so the echoed choices differ."""
    path = tmp_path_factory.mktemp("helm_data") / "parity.jsonl"
    lines = []
    for n in (4, 7, 12, 23, 38, 41, 56, 65):
        refs = [{"output": {"text": text}, "tags": ["correct"] if (n % 2 == 0) == (text == "even") else []}
                for text in ("even", "odd")]
        lines.append({"input": {"text": f"Is {n} even or odd?"}, "references": refs, "split": "test"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def ours(tmp_path_factory, opt_preln_dir, mc_file) -> dict:
    work = tmp_path_factory.mktemp("helm_ours")
    proc = _helm(["-m", "flexgen_dist.evaluation.helm_run", "--model", str(opt_preln_dir), "--dtype", "float32",
                  "--device", "cpu", "--quiet", "--stages", "2", "--executor", "local", "--gpu-batch-size", "2",
                  "--num-gpu-batches", "2", "--", "--run-entries", _mc_entry(mc_file), GREEDY, SAMPLED, "--suite", "ours",
                  "--max-eval-instances", str(INSTANCES), "-o", str(work / "out"), "--local-path",
                  str(work / "prod_env"), "--disable-cache"], work)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return _runs(work / "out", "ours")


@pytest.fixture(scope="module")
def hf(tmp_path_factory, opt_preln_dir, mc_file) -> dict:
    """HELM's HuggingFaceClient on the same checkpoint, registered in its local path with the window our deployment
    gets (128 positions, less the BOS the tokenizer adds and the token an echo generates), so prompts are the same."""
    work = tmp_path_factory.mktemp("helm_hf")
    env = work / "prod_env"
    env.mkdir()
    spec = {"pretrained_model_name_or_path": str(opt_preln_dir)}
    configs = {  # JSON is YAML
        "model_metadata.yaml": {"models": [{"name": HF_NAME, "display_name": "tiny", "description": "tiny",
                                            "creator_organization_name": "test", "access": "open",
                                            "tags": ["TEXT_MODEL_TAG", "FULL_FUNCTIONALITY_TEXT_MODEL_TAG"]}]},
        "tokenizer_configs.yaml": {"tokenizer_configs": [{
            "name": HF_NAME, "end_of_text_token": "</s>", "prefix_token": "</s>",
            "tokenizer_spec": {"class_name": "helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer",
                               "args": spec}}]},
        "model_deployments.yaml": {"model_deployments": [{
            "name": HF_NAME, "model_name": HF_NAME, "tokenizer_name": HF_NAME, "max_sequence_length": 128 - 2,
            "client_spec": {"class_name": "helm.clients.huggingface_client.HuggingFaceClient", "args": spec}}]}}
    for name, config in configs.items():
        (env / name).write_text(json.dumps(config))
    proc = _helm([str(HELM_PYTHON.parent / "helm-run"), "--run-entries", _mc_entry(mc_file), GREEDY,
                  "--models-to-run", HF_NAME, "--suite", "hf", "--max-eval-instances", str(INSTANCES), "-o",
                  str(work / "out"), "--local-path", str(env), "--disable-cache"], work)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return _runs(work / "out", "hf")


def _exact_match(run: dict) -> dict:
    return {stat["name"].get("split"): stat["mean"] for stat in run["stats"]
            if stat["name"]["name"] == "exact_match" and "perturbation" not in stat["name"]}


def test_each_run_is_one_engine_job(ours):
    assert sorted(ours) == ["custom_mcqa", "synthetic_reasoning", "synthetic_reasoning,num_outputs=2"]
    for key, run in ours.items():
        states = run["state"]["request_states"]
        assert run["jobs"] is not None and len(run["jobs"]) == 1, key
        job = run["jobs"][0]
        completions = sum(s["request"]["num_completions"] for s in states)
        assert job["helm_requests"] == len(states) and job["sequences"] == completions, key
        assert job["stages"] == 2 and job["policy"]["gpu_batch_size"] == 2 and job["policy"]["num_gpu_batches"] == 2
        assert all(s["result"]["batch_size"] == len(states) for s in states), key
    assert len(ours["custom_mcqa"]["state"]["request_states"]) == 2 * INSTANCES  # each choice echoed on its own


def test_greedy_text_equals_hf_client(ours, hf):
    mine, theirs = ours["synthetic_reasoning"]["state"], hf["synthetic_reasoning"]["state"]
    assert len(mine["request_states"]) == len(theirs["request_states"]) > 0
    reasons = []
    for a, b in zip(mine["request_states"], theirs["request_states"]):
        assert a["request"]["prompt"] == b["request"]["prompt"]
        assert a["request"]["stop_sequences"] == ["\n", "is"] and a["request"]["temperature"] == 0
        ours_out, hf_out = a["result"]["completions"][0], b["result"]["completions"][0]
        assert ours_out["text"] == hf_out["text"]
        assert 0 < len(ours_out["tokens"]) <= a["request"]["max_tokens"] or ours_out["text"] == ""
        assert ours_out["logprob"] == pytest.approx(sum(t["logprob"] for t in ours_out["tokens"]))
        reasons.append(ours_out["finish_reason"]["reason"])
    assert "stop" in reasons, reasons
    assert _exact_match(ours["synthetic_reasoning"]) == _exact_match(hf["synthetic_reasoning"])


def test_echoed_choices_equal_hf_client(ours, hf):
    mine, theirs = ours["custom_mcqa"]["state"], hf["custom_mcqa"]["state"]
    assert len(mine["request_states"]) == len(theirs["request_states"]) == 2 * INSTANCES
    for a, b in zip(mine["request_states"], theirs["request_states"]):
        assert a["request"]["prompt"] == b["request"]["prompt"]
        assert a["request"]["echo_prompt"] and a["request"]["max_tokens"] == 0
        ours_out, hf_out = a["result"]["completions"][0], b["result"]["completions"][0]
        assert ours_out["text"] == hf_out["text"]  # the prompt, BOS included, decoded with special tokens
        assert [t["text"] for t in ours_out["tokens"]] == [t["text"] for t in hf_out["tokens"]]
        for x, y in zip(ours_out["tokens"], hf_out["tokens"]):
            assert x["logprob"] == pytest.approx(y["logprob"], abs=LOGPROB_TOL)
        assert ours_out["logprob"] == pytest.approx(hf_out["logprob"], abs=LOGPROB_TOL * len(ours_out["tokens"]))
    accuracy = _exact_match(ours["custom_mcqa"])
    assert accuracy == _exact_match(hf["custom_mcqa"]) and accuracy, "HELM's metrics are written and equal"


def test_sampled_requests_get_distinct_completions(ours):
    states = ours["synthetic_reasoning,num_outputs=2"]["state"]["request_states"]
    assert all(s["request"]["temperature"] == 0.7 and len(s["result"]["completions"]) == 2 for s in states)
    assert any(s["result"]["completions"][0]["text"] != s["result"]["completions"][1]["text"] for s in states)
    greedy = [s["result"]["completions"][0]["text"] for s in ours["synthetic_reasoning"]["state"]["request_states"]]
    assert [s["result"]["completions"][0]["text"] for s in states] != greedy


def test_refused_request_stops_the_command_with_one_line(tmp_path, opt_preln_dir):
    proc = _helm(["-m", "flexgen_dist.evaluation.helm_run", "--model", str(opt_preln_dir), "--device", "cpu",
                  "--executor", "local", "--", "--run-entries", "synthetic_reasoning:mode=pattern_match,temperature=-1",
                  "--suite", "bad", "--max-eval-instances", "2", "-o", str(tmp_path / "out"), "--local-path",
                  str(tmp_path / "prod_env"), "--disable-cache"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("flexgen-dist: error: HELM request") and "temperature -1" in proc.stderr


def test_other_models_are_refused(tmp_path, opt_preln_dir):
    proc = _helm(["-m", "flexgen_dist.evaluation.helm_run", "--model", str(opt_preln_dir), "--", "--run-entries",
                  "simple1", "--models-to-run", "simple/model1", "--max-eval-instances", "2"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "--models-to-run simple/model1" in proc.stderr and "flexgen-dist/" in proc.stderr


# --- the mapping, in .venv-helm's python -----------------------------------------------------------------------------


def _in_helm_venv(code: str):
    """Run `code` (which prints one JSON value last) with .venv-helm's python; -> that value."""
    proc = _helm(["-c", code], REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_what_the_engine_cannot_honour_is_refused():
    refused = _in_helm_venv("""
import json
from helm.common.request import Request
from helm.common.media_object import MultimediaObject
from helm.common.response_format import ResponseFormat
from flexgen_dist.evaluation.helm_requests import refusal
cases = {"messages": Request(messages=[{"role": "user", "content": "hi"}]),
         "multimodal": Request(multimodal_prompt=MultimediaObject([])), "embedding": Request(embedding=True),
         "response_format": Request(prompt="a", response_format=ResponseFormat(json_schema={})),
         "penalties": Request(prompt="a", presence_penalty=0.5, frequency_penalty=0.1),
         "nothing": Request(prompt="a", max_tokens=0), "empty_stop": Request(prompt="a", stop_sequences=[""]),
         "top_p": Request(prompt="a", top_p=0), "fine": Request(prompt="a", top_k_per_token=5),
         "echo_only": Request(prompt="a", max_tokens=0, echo_prompt=True)}
print(json.dumps({k: refusal(v) for k, v in cases.items()}))
""")
    assert refused.pop("fine") is None and refused.pop("echo_only") is None
    expected = {"messages": "chat messages", "multimodal": "multimodal", "embedding": "embeddings",
                "response_format": "response_format", "penalties": "presence_penalty, frequency_penalty",
                "nothing": "max_tokens 0", "empty_stop": "stop_sequences", "top_p": "top_p 0"}
    assert refused.keys() == expected.keys()
    for key, words in expected.items():
        assert words in refused[key], (key, refused[key])


def test_requests_map_to_engine_sequences():
    mapped = _in_helm_venv("""
import json
from helm.common.request import Request
from flexgen_dist.evaluation.helm_requests import engine_requests
def show(r):
    return [[s.prompt, s.max_new_tokens, s.stop, s.temperature, s.top_p, s.seed, s.logprobs, s.echo]
            for s in engine_requests(r, 0)]
print(json.dumps({
    "greedy": show(Request(prompt="p", max_tokens=5, stop_sequences=["\\n"], temperature=0, num_completions=3)),
    "sampled": show(Request(prompt="p", max_tokens=5, temperature=0.5, top_p=0.9, num_completions=2)),
    "other_random": show(Request(prompt="p", max_tokens=5, temperature=0.5, top_p=0.9, num_completions=2,
                                 random="1")),
    "echo_only": show(Request(prompt="p", max_tokens=0, echo_prompt=True, temperature=0))}))
""")
    assert mapped["greedy"] == [["p", 5, ["\n"], 0, 1, None, 0, False]] * 3  # equal: one sequence computes them
    first, second = mapped["sampled"]
    assert first[:5] == ["p", 5, None, 0.5, 0.9] and first[5] != second[5]
    assert {s[5] for s in mapped["other_random"]}.isdisjoint({s[5] for s in mapped["sampled"]})
    assert mapped["echo_only"] == [["p", 1, None, 0, 1, None, 0, True]]


def test_records_become_helm_completions(opt_preln_dir):
    """Made-up engine records through `completion`, with the tiny tokenizer: EOS dropped, a stop sequence cut inside a
    token (that token kept, as HELM keeps it), an echo's extra token dropped."""
    out = _in_helm_venv(f"""
import json
from transformers import AutoTokenizer
from helm.common.request import Request
from flexgen_dist.evaluation.helm_requests import completion
tok = AutoTokenizer.from_pretrained({str(opt_preln_dir)!r})
ids = tok(" the license is granted", add_special_tokens=False).input_ids
def record(input_ids, output_ids, reason, prompt_logprobs=None):
    lp = {{"tokens": [tok.decode([i]) for i in output_ids],
          "token_logprobs": [-1.0 - k for k in range(len(output_ids))]}}
    if prompt_logprobs is not None:
        lp.update(prompt_tokens=[tok.decode([i]) for i in input_ids], prompt_logprobs=prompt_logprobs)
    return {{"input_ids": input_ids, "output_ids": output_ids, "finish_reason": reason, "logprobs": lp}}
def show(c):
    return {{"text": c.text, "logprob": c.logprob, "tokens": [[t.text, t.logprob] for t in c.tokens],
             "reason": c.finish_reason["reason"]}}
cut = next(k for k in range(1, len(ids) + 1) if "cens" in tok.decode(ids[:k]))  # the engine stops at this token
print(json.dumps({{
    "full": tok.decode(ids), "ids": len(ids),
    "eos": show(completion(record([2, 5], ids + [2], "eos"), Request(prompt="a", max_tokens=20), tok.decode)),
    "stop": show(completion(record([2, 5], ids[:cut], "stop"), Request(prompt="a", stop_sequences=["cens"]),
                            tok.decode)),
    "echo": show(completion(record([2] + ids, [7], "length", [None] + [-0.5] * len(ids)),
                            Request(prompt="a", max_tokens=0, echo_prompt=True), tok.decode))}}))
""")
    full, n = out["full"], out["ids"]
    eos = out["eos"]
    assert eos["text"] == full and len(eos["tokens"]) == n and eos["reason"] == "endoftext"
    assert eos["logprob"] == -sum(1.0 + k for k in range(n))
    stop = out["stop"]
    assert stop["text"] == full.split("cens")[0] and stop["reason"] == "stop"
    spelled = [t for t, _ in stop["tokens"]]
    assert "".join(spelled).startswith(stop["text"]) and len("".join(spelled[:-1])) < len(stop["text"])
    assert stop["logprob"] == sum(v for _, v in stop["tokens"])
    echo = out["echo"]
    assert echo["text"] == "</s>" + full and echo["reason"] == "length"
    assert echo["tokens"][0] == ["</s>", 0.0] and len(echo["tokens"]) == n + 1  # the generated token is dropped
    assert echo["logprob"] == -0.5 * n
