"""OpenAI Batch API files (issue 21): `generate --prompts` reads /v1/completions request lines and writes the batch
output format; every bad line gets its own error record and the rest run; the completions equal the same requests in
our own format; a run killed outright resumes to every custom_id exactly once, through a 2-stage Ray pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_parity import PROMPTS
from test_shutdown import _lines, sigkill_once_written
from test_stage_restart import _alive_stage_pids

from flexgen_dist.base.errors import UserError
from flexgen_dist.cli import main
from flexgen_dist.io.openai_batch import is_batch_file, load_batch_file
from flexgen_dist.io.prompts import Request

MAX_NEW = 8


def _line(custom_id, body=None, **fields):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body or {}, **fields}


def _write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _argv(model_dir, prompts: Path, out: Path, *flags, executor="local"):
    return ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", str(MAX_NEW),
            "--dtype", "float32", "--device", "cpu", "--output", str(out), "--quiet", "--executor", executor, *flags]


def _run(tmp_path, model_dir, lines, *flags, capsys=None):
    """Run `generate` on batch lines in process; the output lines, and the summary when capsys is given."""
    prompts, out = _write(tmp_path / "batch.jsonl", lines), tmp_path / "out.jsonl"
    assert main(_argv(model_dir, prompts, out, *flags)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1]) if capsys else None
    return [json.loads(line) for line in out.read_text().splitlines()], summary


def _by_custom_id(records):
    return {r["custom_id"]: r for r in records}


# --- reading a batch file -------------------------------------------------------------------------------------------


def test_body_fields_map_onto_a_request(tmp_path):
    path = _write(tmp_path / "b.jsonl", [
        _line("text", {"model": "m", "prompt": "Hello there", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                       "stop": "\n", "logprobs": 3, "echo": True, "seed": 7, "n": 1, "best_of": None,
                       "stream": False, "user": "u", "presence_penalty": 0}),
        "",
        _line("ids", {"prompt": [5, 6, 7], "stop": ["a", "b"]}),
        _line("one-text", {"prompt": ["Hi"]}),
        _line("one-ids", {"prompt": [[8, 9]]}),
    ])
    batch = load_batch_file(path)
    assert batch.errors == []
    assert batch.requests == [
        Request("text", "Hello there", None, 5, ("\n",), 0.5, 0.9, 7, 3, True),
        Request("ids", None, (5, 6, 7), None, ("a", "b")),
        Request("one-text", "Hi", None, None),
        Request("one-ids", None, (8, 9), None),
    ]
    assert batch.models == {"text": "m", "ids": None, "one-text": None, "one-ids": None}
    assert batch.line_of == {"text": 1, "ids": 3, "one-text": 4, "one-ids": 5}


BAD_LINES = [
    ('{"custom_id": "x", "method": ', None, "invalid_json_line", "invalid JSON"),
    ("[1, 2]", None, "invalid_json_line", "expected a JSON object"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "a"}}), None, "invalid_request",
     "'custom_id' must be a non-empty string"),
    (json.dumps(_line(7, {"prompt": "a"})), None, "invalid_request", "'custom_id'"),
    (json.dumps(_line("ok", {"prompt": "a"})), "ok", "duplicate_custom_id", "already used on line 1"),
    (json.dumps(_line("m", {"prompt": "a"}, method="GET")), "m", "invalid_request", "'method' must be \"POST\""),
    (json.dumps(_line("u", {"messages": []}, url="/v1/chat/completions")), "u", "unsupported", "/v1/chat/completions"),
    (json.dumps({**_line("b"), "body": "text"}), "b", "invalid_request", "'body' must be a JSON object"),
    (json.dumps(_line("n", {"prompt": "a", "n": 2})), "n", "unsupported", "'n': 2"),
    (json.dumps(_line("bo", {"prompt": "a", "best_of": 3})), "bo", "unsupported", "'best_of'"),
    (json.dumps(_line("su", {"prompt": "a", "suffix": "end"})), "su", "unsupported", "'suffix'"),
    (json.dumps(_line("st", {"prompt": "a", "stream": True})), "st", "unsupported", "'stream'"),
    (json.dumps(_line("lb", {"prompt": "a", "logit_bias": {"5": 1}})), "lb", "unsupported", "'logit_bias'"),
    (json.dumps(_line("tk", {"prompt": "a", "top_k": 5})), "tk", "unsupported", "body field 'top_k'"),
    (json.dumps(_line("two", {"prompt": ["a", "b"]})), "two", "unsupported", "holds 2 prompts"),
    (json.dumps(_line("none", {"max_tokens": 3})), "none", "invalid_request", "missing 'prompt'"),
    (json.dumps(_line("empty", {"prompt": "  "})), "empty", "invalid_request", "'prompt' is empty"),
    (json.dumps(_line("neg", {"prompt": [3, -1]})), "neg", "invalid_request", "'prompt' must be"),
    (json.dumps(_line("mt", {"prompt": "a", "max_tokens": "4"})), "mt", "invalid_request", "'max_tokens' must be"),
    (json.dumps(_line("sp", {"prompt": "a", "stop": ["x", 3]})), "sp", "invalid_request", "'stop' must be"),
    (json.dumps(_line("lp", {"prompt": "a", "logprobs": 21})), "lp", "invalid_request", "'logprobs' must be"),
    (json.dumps(_line("te", {"prompt": "a", "temperature": "hot"})), "te", "invalid_request", "'temperature'"),
    (json.dumps(_line("mo", {"prompt": "a", "model": 3})), "mo", "invalid_request", "'model' must be a string"),
]


@pytest.mark.parametrize("bad,custom_id,code,needle", BAD_LINES, ids=[b[2] + "-" + b[3][:24] for b in BAD_LINES])
def test_each_bad_line_is_its_own_error(tmp_path, bad, custom_id, code, needle):
    batch = load_batch_file(_write(tmp_path / "b.jsonl", [_line("ok", {"prompt": "fine"}), bad,
                                                           _line("after", {"prompt": [5]})]))
    assert [r.id for r in batch.requests] == ["ok", "after"]  # the lines around it still run
    (error,) = batch.errors
    assert (error.line, error.custom_id, error.code) == (2, custom_id, code)
    assert error.message.startswith("line 2: ") and needle in error.message, error.message


def test_format_detection(tmp_path):
    batch = _write(tmp_path / "b.jsonl", ["", _line("a", {"prompt": "x"})])
    ours = _write(tmp_path / "o.jsonl", [{"id": "a", "prompt": "x"}])
    torn = _write(tmp_path / "t.jsonl", ['{"custom_id": "a", "body": ', _line("b", {"prompt": "x"})])
    assert is_batch_file(batch, "auto") and is_batch_file(torn, "auto") and not is_batch_file(ours, "auto")
    assert is_batch_file(ours, "openai-batch") and not is_batch_file(batch, "flexgen")
    assert not is_batch_file(tmp_path / "missing.jsonl", "auto")  # the prompts reader says what is wrong


def test_an_empty_batch_file_is_bad_input(tmp_path):
    with pytest.raises(UserError, match="contains no requests"):
        load_batch_file(_write(tmp_path / "b.jsonl", ["", "  "]))


def test_our_own_format_still_fails_the_run_on_a_bad_line(tmp_path, opt_preln_dir, capsys):
    batch = _write(tmp_path / "b.jsonl", [_line("a", {"prompt": [5]})])
    assert main(_argv(opt_preln_dir, batch, tmp_path / "out.jsonl", "--prompts-format", "flexgen")) == 2
    assert "missing 'id'" in capsys.readouterr().err
    assert main(["generate", "--model", str(opt_preln_dir), "--prompt", "hi", "--prompts-format", "flexgen"]) == 2
    assert "--prompts-format applies to --prompts" in capsys.readouterr().err


# --- running one ----------------------------------------------------------------------------------------------------


TEXTS = ["The license grants", "import sys\n", "Permission is hereby"]


def _equivalent_lines():
    """(batch body, our own format's line) pairs asking for the same thing."""
    pairs = [({"prompt": PROMPTS[0]}, {"input_ids": PROMPTS[0]}),
             ({"prompt": [PROMPTS[2]], "logprobs": 2}, {"input_ids": PROMPTS[2], "logprobs": 2}),
             ({"prompt": PROMPTS[3], "logprobs": 0, "echo": True}, {"input_ids": PROMPTS[3], "logprobs": 0,
                                                                    "echo": True}),
             ({"prompt": TEXTS[0], "logprobs": 3, "echo": True, "max_tokens": 6},
              {"prompt": TEXTS[0], "logprobs": 3, "echo": True, "max_new_tokens": 6}),
             ({"prompt": TEXTS[1], "temperature": 0.9, "top_p": 0.8, "seed": 4, "logprobs": 1},
              {"prompt": TEXTS[1], "temperature": 0.9, "top_p": 0.8, "seed": 4, "logprobs": 1}),
             ({"prompt": [TEXTS[2]], "temperature": 1.0}, {"prompt": TEXTS[2], "temperature": 1.0}),
             ({"prompt": PROMPTS[1], "echo": True}, {"input_ids": PROMPTS[1], "echo": True})]
    return [(f"r{i}", body, ours) for i, (body, ours) in enumerate(pairs)]


def _with_stop(tmp_path, model_dir, pairs):
    """The pairs, with a stop string taken from the middle of a first run's output where there is one."""
    lines = [{"id": cid, **ours} for cid, _, ours in pairs]
    first = {r["id"]: r for r in _own_run(tmp_path / "probe", model_dir, lines)}
    cid, body, ours = pairs[0]
    stop = first[cid]["text"][2:5]
    assert stop, first[cid]
    return [(cid, {**body, "stop": stop}, {**ours, "stop": [stop]}), *pairs[1:]]


def _own_run(tmp_path, model_dir, lines):
    prompts, out = _write(tmp_path / "own.jsonl", lines), tmp_path / "own-out.jsonl"
    assert main(_argv(model_dir, prompts, out, "--gpu-batch-size", "2")) == 0  # as the batch run: the same blocks
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_completions_equal_our_own_format(tmp_path, opt_preln_dir, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(opt_preln_dir))
    pairs = _with_stop(tmp_path, opt_preln_dir, _equivalent_lines())
    own = {r["id"]: r for r in _own_run(tmp_path, opt_preln_dir, [{"id": c, **ours} for c, _, ours in pairs])}
    records, summary = _run(tmp_path, opt_preln_dir, [_line(c, {"model": "mine", **body} if c == "r0" else body)
                                                      for c, body, _ in pairs], "--gpu-batch-size", "2",
                            capsys=capsys)
    assert summary["sequences"] == len(pairs) and summary["failed_requests"] == 0
    batch = _by_custom_id(records)
    assert set(batch) == set(own) and len(records) == len(pairs)
    assert own["r0"]["finish_reason"] == "stop"  # the stop string cut it
    for cid, body, _ in pairs:
        rec, mine = batch[cid], own[cid]
        assert rec["id"].startswith("batch_req_") and rec["error"] is None
        response = rec["response"]
        assert response["status_code"] == 200 and response["request_id"]
        completion = response["body"]
        assert completion["object"] == "text_completion" and completion["id"].startswith("cmpl-")
        assert completion["model"] == ("mine" if cid == "r0" else opt_preln_dir.name)
        assert isinstance(completion["created"], int)
        (choice,) = completion["choices"]
        echo = body.get("echo", False)
        prompt = body["prompt"]
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):  # a list holding one prompt
            prompt = prompt[0]
        # A text prompt as given; token ids decoded.
        prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=True)
        assert choice["index"] == 0 and choice["text"] == (prompt_text if echo else "") + mine["text"]
        assert choice["token_ids"] == mine["output_ids"]
        assert choice["finish_reason"] == {"eos": "stop"}.get(mine["finish_reason"], mine["finish_reason"])
        n_prompt, n_out = len(mine["input_ids"]), len(mine["output_ids"])
        assert completion["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                       "total_tokens": n_prompt + n_out}
        if "logprobs" not in body:
            assert choice["logprobs"] is None  # echo alone: no log-probabilities, as OpenAI
            continue
        theirs, ours = choice["logprobs"], mine["logprobs"]
        tokens = (ours["prompt_tokens"] if echo else []) + ours["tokens"]
        values = (ours["prompt_logprobs"] if echo else []) + ours["token_logprobs"]
        tops = (ours["prompt_top_logprobs"] if echo else []) + ours["top_logprobs"]
        assert theirs["tokens"] == tokens and theirs["token_logprobs"] == values
        assert (theirs["token_logprobs"][0] is None) == echo
        for top, token, value, entry in zip(tops, tokens, values, theirs["top_logprobs"]):
            if top is None:
                assert entry is None
                continue
            expected = {e["text"]: e["logprob"] for e in top}
            expected.setdefault(token, value)  # the chosen token is always there
            assert entry == expected
        offsets = theirs["text_offset"]
        start = 0 if echo else len(prompt_text)
        assert offsets == [start + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_bad_lines_get_error_records_and_the_rest_run(tmp_path, opt_preln_dir, capsys):
    too_long = list(range(5, 5 + 125))  # + 8 new tokens: beyond the fixture's 128 positions
    lines = [_line("a", {"prompt": PROMPTS[0]}), "not json", _line("b", {"prompt": too_long}),
             _line("c", {"prompt": [600]}), _line("a", {"prompt": PROMPTS[1]}), _line("d", {"prompt": "Some text"})]
    records, summary = _run(tmp_path, opt_preln_dir, lines, capsys=capsys)
    assert summary["sequences"] == 2 and summary["failed_requests"] == 4 and len(records) == 6
    errors = [r for r in records if r["error"] is not None]
    assert all(r["response"] is None and r["id"].startswith("batch_req_") for r in errors)
    assert {(r["custom_id"], r["error"]["code"], r["error"]["line"]) for r in errors} == {
        (None, "invalid_json_line", 2), ("b", "context_length_exceeded", 3), ("c", "invalid_request", 4),
        ("a", "duplicate_custom_id", 5)}
    by_line = {r["error"]["line"]: r["error"]["message"] for r in errors}
    assert "exceed the model's 128 positions" in by_line[3] and "outside the vocabulary" in by_line[4]
    assert len({r["id"] for r in records}) == 6
    done = _by_custom_id(r for r in records if r["error"] is None)
    assert set(done) == {"a", "d"} and done["d"]["response"]["body"]["choices"][0]["text"]


def test_a_file_of_bad_lines_exits_0_with_only_error_records(tmp_path, opt_preln_dir, capsys):
    records, summary = _run(tmp_path, opt_preln_dir, ['{"custom_id": "x"', _line("y", {"prompt": "a", "n": 3})],
                            capsys=capsys)
    assert [r["error"]["code"] for r in records] == ["invalid_json_line", "unsupported"]
    assert summary["sequences"] == 0 and summary["failed_requests"] == 2


def test_rerun_resumes_by_custom_id_and_never_repeats_an_error(tmp_path, opt_preln_dir, capsys):
    lines = ([_line(f"p{i}", {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 3 + i % 4}) for i in range(8)]
             + ["{broken", _line("p1", {"prompt": [5]}), _line("bad", {"prompt": [5], "stream": True})])
    records, _ = _run(tmp_path, opt_preln_dir, lines, "--gpu-batch-size", "2", capsys=capsys)
    out = tmp_path / "out.jsonl"
    # A run cut short: the error records (written first) and the first block survive, the rest is lost.
    out.write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    again, summary = _run(tmp_path, opt_preln_dir, lines, "--gpu-batch-size", "2", capsys=capsys)
    assert summary["failed_requests"] == 0 and summary["sequences"] == 6
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in records)  # each line answered once
    texts = {r["id"]: r["response"] and r["response"]["body"]["choices"][0]["token_ids"] for r in again}
    assert texts == {r["id"]: r["response"] and r["response"]["body"]["choices"][0]["token_ids"] for r in records}
    _, summary = _run(tmp_path, opt_preln_dir, lines, capsys=capsys)
    assert summary["sequences"] == 0 and summary["failed_requests"] == 0
    assert len(out.read_text().splitlines()) == len(lines)


def test_run_flags_fill_what_a_body_leaves_out(tmp_path, opt_preln_dir, capsys):
    lines = [_line("plain", {"prompt": PROMPTS[0]}), _line("own", {"prompt": PROMPTS[0], "max_tokens": 2,
                                                                    "logprobs": 0})]
    records, _ = _run(tmp_path, opt_preln_dir, lines, "--logprobs", "2", "--ignore-eos", capsys=capsys)
    plain, own = (_by_custom_id(records)[c]["response"]["body"]["choices"][0] for c in ("plain", "own"))
    assert len(plain["token_ids"]) == MAX_NEW and len(own["token_ids"]) == 2
    assert {len(top) for top in plain["logprobs"]["top_logprobs"]} <= {2, 3}  # K alternatives, and the chosen token
    assert {len(top) for top in own["logprobs"]["top_logprobs"]} == {1}


def test_token_prompts_run_without_a_tokenizer(tmp_path, opt_preln_dir, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((opt_preln_dir / name).read_bytes())
    lines = [_line("ids", {"prompt": PROMPTS[0], "logprobs": 1, "echo": True}), _line("text", {"prompt": "hello"})]
    records, _ = _run(tmp_path, bare, lines, capsys=capsys)
    done, refused = _by_custom_id(records)["ids"], _by_custom_id(records)["text"]
    assert "text prompts need a tokenizer" in refused["error"]["message"]
    (choice,) = done["response"]["body"]["choices"]
    assert choice["text"] == "" and choice["logprobs"]["text_offset"] is None
    assert choice["logprobs"]["tokens"] == [f"token_id:{i}" for i in PROMPTS[0] + choice["token_ids"]]
    assert all(set(top) <= {f"token_id:{i}" for i in range(512)} for top in choice["logprobs"]["top_logprobs"][1:])


# --- through Ray, killed and resumed --------------------------------------------------------------------------------


def _acceptance_lines() -> list:
    """200 lines: 195 requests (token ids and text, greedy and sampled) and 5 malformed ones."""
    lines: list = []
    for i in range(195):
        body = {"prompt": PROMPTS[i % len(PROMPTS)] if i % 3 else TEXTS[i // 3 % len(TEXTS)], "max_tokens": 2 + i % 5}
        if i % 4 == 0:
            body.update(temperature=0.8, seed=i)
        lines.append(_line(f"req-{i}", body))
    bad = ["{not json", {"method": "POST", "url": "/v1/completions", "body": {"prompt": "a"}},
           _line("req-7", {"prompt": "dup"}), _line("chat", {"messages": []}, url="/v1/chat/completions"),
           _line("many", {"prompt": "a", "n": 2})]
    for at, line in zip((3, 50, 99, 150, 190), bad):
        lines.insert(at, line)
    return lines


def test_200_requests_through_a_2_stage_pipeline_killed_and_resumed(tmp_path, ray_cluster, opt_preln_dir):
    """Issue 21's acceptance: 195 completions and 5 per-line errors; after a SIGKILL of the run mid-way and a re-run
    with the same --output, every line is answered exactly once, as an undisturbed run answers it."""
    lines = _acceptance_lines()
    batch = _write(tmp_path / "batch.jsonl", lines)
    clean_out = tmp_path / "clean.jsonl"
    assert main(_argv(opt_preln_dir, batch, clean_out, "--gpu-batch-size", "8")) == 0  # in process: the reference

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "flexgen_dist", *_argv(opt_preln_dir, batch, out, "--gpu-batch-size", "4",
                                                        "--stages", "2", "--ray-address", ray_cluster["address"],
                                                        executor="ray")]
    sigkill_once_written(cmd, out, 5 + 3 * 4)  # the error records and three blocks written: mid-run
    assert _lines(out) < len(lines), "the kill came after the run"
    deadline = time.monotonic() + 120  # Ray ends the dead driver's stage actors; their CPUs are the re-run's
    while _alive_stage_pids(ray_cluster["dashboard"]):
        assert time.monotonic() < deadline, "the killed run's stages are still alive"
        time.sleep(0.5)
    resumed = subprocess.run(cmd, capture_output=True, text=True)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.splitlines()[-1])["failed_requests"] == 0  # answered before the kill

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 200 and len({r["id"] for r in records}) == 200
    completions = [r for r in records if r["error"] is None]
    errors = [r for r in records if r["error"] is not None]
    assert len(completions) == 195 and len(errors) == 5
    custom_ids = [r["custom_id"] for r in completions]
    assert sorted(custom_ids) == sorted(f"req-{i}" for i in range(195))
    assert sorted(r["error"]["code"] for r in errors) == ["duplicate_custom_id", "invalid_json_line",
                                                          "invalid_request", "unsupported", "unsupported"]

    def answers(records):
        return {r["id"]: r["error"] or [r["response"]["body"]["choices"][0][k] for k in ("text", "token_ids")]
                for r in records}

    assert answers(records) == answers(map(json.loads, clean_out.read_text().splitlines()))


def test_a_job_config_reads_a_batch_file(tmp_path, ray_cluster, opt_preln_dir, monkeypatch, capsys):
    """`launch/generate_job.py` (what `ray job submit` runs) detects the format as `generate` does."""
    from test_ray_job import _load_entrypoint
    from test_ray_job import _write as write_job

    batch = _write(tmp_path / "batch.jsonl", [_line("a", {"prompt": PROMPTS[0], "max_tokens": 3}), "oops"])
    out = tmp_path / "out.jsonl"
    config = write_job(tmp_path, {"model": str(opt_preln_dir), "device": "cpu", "dtype": "float32",
                                  "input": {"prompts": str(batch)}, "output": str(out)})
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster["address"])
    assert _load_entrypoint().main(["--config", str(config)]) == 0
    records = _by_custom_id(json.loads(line) for line in out.read_text().splitlines())
    assert set(records) == {"a", None} and records[None]["error"]["code"] == "invalid_json_line"
    assert len(records["a"]["response"]["body"]["choices"][0]["token_ids"]) <= 3


def test_error_records_count_in_the_requests_metric(tmp_path, opt_preln_dir, capsys, monkeypatch):
    """flexgen_requests_total{status="error"} counts the run's error records, as the summary's failed_requests does."""
    from flexgen_dist.observability.metrics import RunMetrics

    counted = []
    original = RunMetrics.requests_refused
    monkeypatch.setattr(RunMetrics, "requests_refused", lambda self, n: (counted.append(n), original(self, n))[1])
    _, summary = _run(tmp_path, opt_preln_dir, [_line("a", {"prompt": PROMPTS[0]}), "not json", "{}"], capsys=capsys)
    assert counted == [summary["failed_requests"]] == [2]
