"""Stop strings, per-prompt sampling and log-probabilities (issue 21), through the CLI: greedy output with stop strings
equals HF generate cut the same way, log-probabilities equal HF's float32 log-softmax, sampled output does not depend
on block shape or pipeline, the decode rows spent on sequences that already stopped are counted, and bad settings are
one line and exit 2."""

from __future__ import annotations

import json

import pytest
from hf_oracle import hf_greedy, hf_log_softmax
from test_cli_errors import _fails, _prompts
from test_parity import PROMPTS

from flexgen_dist import run as run_module
from flexgen_dist.cli import main
from flexgen_dist.observability.metrics import RunMetrics

MAX_NEW = 12
TOL = 1e-5


def _generate(tmp_path, model_dir, lines, *flags, max_new=MAX_NEW, executor="local"):
    """Run `generate` on prompt lines (dicts without "id": numbered in order); the records in that order."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, **line}) + "\n" for i, line in enumerate(lines)))
    argv = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", str(max_new),
            "--dtype", "float32", "--device", "cpu", "--output", str(out), "--quiet", "--executor", executor, *flags]
    assert main(argv) == 0
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return [records[str(i)] for i in range(len(lines))]


@pytest.fixture(scope="module")
def tokenizer(opt_preln_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(opt_preln_dir))


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def _cut_at_stop(tokenizer, ids, stops):
    """HF's tokens up to the one whose text first holds a stop string, and the text before it (None: no stop)."""
    for n in range(1, len(ids) + 1):
        text = _decode(tokenizer, ids[:n])
        found = [text.find(s) for s in stops if s in text]
        if found:
            return ids[:n], text[: min(found)]
    return None


def test_stop_strings_cut_hf_greedy_output(tmp_path, opt_preln_dir, tokenizer):
    expected = hf_greedy(opt_preln_dir, PROMPTS, MAX_NEW)
    texts = [_decode(tokenizer, ids) for ids in expected]
    # Per prompt: a stop string from the middle of HF's own output, one that never occurs, or none (the run's).
    lines = [{"input_ids": p} for p in PROMPTS]
    lines[0]["stop"] = [texts[0][4:7]]
    lines[1]["stop"] = ["never in any output \u2603", texts[1][-3:]]
    lines[2]["stop"] = []  # no stop strings, whatever --stop says
    records = _generate(tmp_path, opt_preln_dir, lines, "--gpu-batch-size", "2", "--num-gpu-batches", "2",
                        "--stop", "\u2603\u2603")
    for i in (0, 1):
        ids, text = _cut_at_stop(tokenizer, expected[i], lines[i]["stop"])
        assert (records[i]["output_ids"], records[i]["text"], records[i]["finish_reason"]) == (ids, text, "stop")
        assert len(ids) < len(expected[i]) or i == 1  # a stop string ends the sequence early
    for i in (2, 3, 4):
        assert records[i]["output_ids"] == expected[i] and records[i]["text"] == texts[i]
        ended_by_eos = expected[i][-1] == 2 and len(expected[i]) < MAX_NEW
        assert records[i]["finish_reason"] == ("eos" if ended_by_eos else "length")


def _close(ours, hf):
    """Within 1e-5, absolute or relative: on these fixtures (logits up to ~17) HF's own eager and SDPA attention, or
    one prompt alone and left-padded in a batch, differ by up to 1.3e-5 in float32 log-softmax."""
    return ours == pytest.approx(float(hf), rel=TOL, abs=TOL)


def _assert_logprobs_match(got_value, got_top, hf_row, target, k):
    assert _close(got_value, hf_row[target])
    top = hf_row.topk(k)
    assert [e["id"] for e in got_top] == top.indices.tolist()
    assert all(_close(e["logprob"], v) for e, v in zip(got_top, top.values)), got_top


@pytest.mark.parametrize("flags", [["--gpu-batch-size", "2", "--num-gpu-batches", "2"],
                                   ["--gpu-batch-size", "3", "--stages", "2", "--prefill-chunks", "4"]],
                         ids=["2x2", "stages-2-prefill-parts"])
def test_logprobs_and_echo_match_hf_log_softmax(tmp_path, opt_preln_dir, tokenizer, flags):
    lines = [{"input_ids": p, "logprobs": k, "echo": echo}
             for p, k, echo in zip(PROMPTS, (3, 0, 5, 2, 1), (True, False, True, False, True))]
    lines[3] = {"input_ids": PROMPTS[3]}  # shares a GPU batch with sequences that ask: gets no logprobs
    records = _generate(tmp_path, opt_preln_dir, lines, *flags)
    assert "logprobs" not in records[3]
    for line, rec in zip(lines, records):
        if "logprobs" not in line:
            continue
        k, lp = line["logprobs"], rec["logprobs"]
        hf = hf_log_softmax(opt_preln_dir, line["input_ids"] + rec["output_ids"])
        n = len(line["input_ids"])
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(rec["output_ids"])
        assert lp["tokens"] == [tokenizer.decode([t]) for t in rec["output_ids"]]
        for j, token in enumerate(rec["output_ids"]):
            _assert_logprobs_match(lp["token_logprobs"][j], lp["top_logprobs"][j], hf[n - 1 + j], token, k)
            assert all(e["text"] == tokenizer.decode([e["id"]]) for e in lp["top_logprobs"][j])
        if not line["echo"]:
            assert "prompt_logprobs" not in lp
            continue
        assert lp["prompt_logprobs"][0] is None and lp["prompt_top_logprobs"][0] is None
        assert len(lp["prompt_logprobs"]) == n
        for t in range(1, n):
            _assert_logprobs_match(lp["prompt_logprobs"][t], lp["prompt_top_logprobs"][t], hf[t - 1],
                                   line["input_ids"][t], k)


def test_run_wide_logprobs_without_tokenizer_and_echo_alone(tmp_path, opt_preln_dir):
    """--logprobs K applies to prompts that do not say; echo without logprobs gives the prompt's, no alternatives."""
    lines = [{"input_ids": PROMPTS[0]}, {"input_ids": PROMPTS[2], "echo": True}]
    records = _generate(tmp_path, opt_preln_dir, lines, "--logprobs", "2")
    assert all(len(top) == 2 for top in records[0]["logprobs"]["top_logprobs"])
    assert len(records[1]["logprobs"]["prompt_logprobs"]) == len(PROMPTS[2])
    no_run_default = _generate(tmp_path / "b", opt_preln_dir, [{"input_ids": PROMPTS[2], "echo": True}])
    assert all(top == [] for top in no_run_default[0]["logprobs"]["top_logprobs"])


SAMPLED = [{"input_ids": PROMPTS[0], "temperature": 1.0, "top_p": 0.9},
           {"input_ids": PROMPTS[1], "temperature": 0.7, "seed": 11},
           {"input_ids": PROMPTS[2]},  # the run's: greedy
           {"input_ids": PROMPTS[3], "temperature": 1.3, "max_new_tokens": 5},
           {"input_ids": PROMPTS[4], "temperature": 1.0, "seed": 11},
           {"input_ids": PROMPTS[1], "temperature": 0.7, "seed": 11}]  # the same prompt and seed as line 1


def _sampled(records):
    return [r["output_ids"] for r in records]


def test_per_prompt_sampling_does_not_depend_on_blocks(tmp_path, opt_preln_dir):
    runs = [_sampled(_generate(tmp_path / f"r{i}", opt_preln_dir, SAMPLED, "--gpu-batch-size", gbs,
                               "--num-gpu-batches", ngb))
            for i, (gbs, ngb) in enumerate([("1", "1"), ("2", "2"), ("6", "1"), ("4", "1")])]
    assert all(run == runs[0] for run in runs[1:])
    outputs = runs[0]
    assert outputs[1] == outputs[5]  # a prompt's own seed, not its id, seeds it
    assert outputs[2] == hf_greedy(opt_preln_dir, [PROMPTS[2]], MAX_NEW)[0]
    assert len(outputs[3]) <= 5
    other_seed = _sampled(_generate(tmp_path / "seed", opt_preln_dir, SAMPLED, "--seed", "1"))
    assert other_seed[0] != outputs[0] and other_seed[1] == outputs[1]  # the run's seed only seeds prompts without


def test_per_prompt_sampling_through_a_ray_pipeline(tmp_path, ray_cluster, opt_preln_dir):
    lines = [{**line, "logprobs": 1} for line in SAMPLED]
    local = _generate(tmp_path / "local", opt_preln_dir, lines, "--gpu-batch-size", "1")
    ray = _generate(tmp_path / "ray", opt_preln_dir, lines, "--gpu-batch-size", "2", "--stages", "2",
                    "--ray-address", ray_cluster["address"], executor="ray")
    assert _sampled(ray) == _sampled(local)
    for a, b in zip(ray, local):
        assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=TOL)


# Prompt lengths fall line by line, so blocks take the lines in order (a run sorts them longest first).
BUDGETS = [{"input_ids": list(range(10, 18 - i)), "max_new_tokens": n} for i, n in enumerate((2, 8, 4, 4))]


def _row_steps(tmp_path, model_dir, monkeypatch, capsys, lines, *flags, executor="local"):
    """Run `lines` with EOS ignored; the summary's decode row-step counts and the exporter's (live, finished)."""
    made: list[RunMetrics] = []

    def recorded() -> RunMetrics:
        made.append(RunMetrics())
        return made[-1]

    monkeypatch.setattr(run_module, "RunMetrics", recorded)
    records = _generate(tmp_path, model_dir, lines, "--ignore-eos", *flags, executor=executor)
    assert [len(r["output_ids"]) for r in records] == [line["max_new_tokens"] for line in lines]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    exported = [made[0].registry.get_sample_value("flexgen_decode_row_steps_total", {"state": state})
                for state in ("live", "finished")]
    return (summary["decode_row_steps"], summary["finished_row_steps"], summary["finished_row_share"]), exported


@pytest.mark.parametrize("flags,expected", [
    # Blocks (2, 8) and (4, 4): 7 decode steps x 2 rows, the first sequence live in 1 of them; 3 x 2, none wasted.
    (["--gpu-batch-size", "2"], (20, 6, 0.3)),
    (["--gpu-batch-size", "1", "--num-gpu-batches", "2", "--stages", "2", "--prefill-chunks", "2"], (20, 6, 0.3)),
    # One block: 7 decode steps x 4 rows; live 1 + 7 + 3 + 3 of them.
    (["--gpu-batch-size", "4"], (28, 14, 0.5)),
], ids=["blocks-of-2", "stages-2-gpu-batches", "one-block"])
def test_rows_of_stopped_sequences_are_counted(tmp_path, opt_preln_dir, monkeypatch, capsys, flags, expected):
    counts, exported = _row_steps(tmp_path, opt_preln_dir, monkeypatch, capsys, BUDGETS, *flags)
    assert counts == expected
    assert exported == [expected[0] - expected[1], expected[1]]


def test_rows_of_stopped_sequences_are_counted_through_a_ray_pipeline(tmp_path, ray_cluster, opt_preln_dir,
                                                                      monkeypatch, capsys):
    counts, exported = _row_steps(tmp_path, opt_preln_dir, monkeypatch, capsys, BUDGETS, "--gpu-batch-size", "2",
                                  "--stages", "2", "--ray-address", ray_cluster["address"], executor="ray")
    assert counts == (20, 6, 0.3) and exported == [14.0, 6.0]


def test_no_waste_exports_finished_rows_at_zero(tmp_path, opt_preln_dir, monkeypatch, capsys):
    lines = [{**line, "max_new_tokens": 3} for line in BUDGETS]
    counts, exported = _row_steps(tmp_path, opt_preln_dir, monkeypatch, capsys, lines, "--gpu-batch-size", "2")
    assert counts == (8, 0, 0.0) and exported == [8.0, 0.0]


@pytest.mark.parametrize("line,needle", [
    ({"stop": "###"}, "'stop' must be a list of non-empty strings"),
    ({"stop": ["ok", 3]}, "'stop' must be a list of non-empty strings"),
    ({"logprobs": -1}, "'logprobs' must be an integer from 0 to 20"),
    ({"logprobs": 21}, "'logprobs' must be an integer from 0 to 20"),
    ({"temperature": -0.5}, "'temperature' must be a number >= 0"),
    ({"top_p": 0}, "'top_p' must be a number in (0, 1]"),
    ({"seed": 1.5}, "'seed' must be an integer"),
    ({"echo": "yes"}, "'echo' must be true or false"),
])
def test_bad_per_prompt_settings_name_the_line(capsys, tmp_path, opt_preln_dir, line, needle):
    path = _prompts(tmp_path, [{"id": "a", "input_ids": [5]}, {"id": "b", "input_ids": [5], **line}])
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", path], "p.jsonl line 2", needle)


@pytest.mark.parametrize("flags,needle", [(["--logprobs", "21"], "--logprobs"), (["--logprobs", "-1"], "--logprobs"),
                                          (["--temperature", "-1"], "temperature"), (["--stop", ""], "--stop")])
def test_bad_flags(capsys, tmp_path, opt_preln_dir, flags, needle):
    path = _prompts(tmp_path, [{"id": "a", "input_ids": [5]}])
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", path, *flags], needle)


def test_stop_strings_need_a_tokenizer(capsys):
    _fails(capsys, ["generate", "--model", "opt-125m", "--dummy-weights", "--synthetic", "1", "--prompt-len", "4",
                    "--stop", "\n"], "stop strings", "tokenizer")


def test_logprobs_without_a_tokenizer_have_no_texts(tmp_path, opt_preln_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((opt_preln_dir / name).read_bytes())
    (record,) = _generate(tmp_path / "run", bare, [{"input_ids": PROMPTS[0], "logprobs": 2, "echo": True}])
    assert "text" not in record and set(record["logprobs"]) == {"token_logprobs", "top_logprobs", "prompt_logprobs",
                                                                "prompt_top_logprobs"}
    assert all(set(e) == {"id", "logprob"} for top in record["logprobs"]["top_logprobs"] for e in top)


def test_finished_rows_leave_the_decode_gemms(tmp_path, opt_preln_dir, monkeypatch):
    """Once a sequence stops, the block's decode steps run their GEMMs on the live rows alone, and every output is
    what the sequence gives alone in its own block."""
    from flexgen_dist.models import opt

    decode_rows: list[int] = []
    mlp = opt.mlp

    def counted(cfg, w, hidden):
        if hidden.shape[1] == 1:  # a decode step's [rows, 1, H]
            decode_rows.append(hidden.shape[0])
        return mlp(cfg, w, hidden)

    monkeypatch.setattr(opt, "mlp", counted)
    together = _generate(tmp_path / "block", opt_preln_dir, BUDGETS, "--ignore-eos", "--gpu-batch-size", "2",
                         "--num-gpu-batches", "2")
    layers = len(decode_rows) // 7  # one block of 4, 7 decode steps, each through every layer's MLP
    # Live after each step: 4 (budgets 2, 8, 4, 4), then 3 until the 4s end, then the 8 alone.
    assert decode_rows == [rows for rows in (4, 3, 3, 1, 1, 1, 1) for _ in range(layers)]
    alone = [_generate(tmp_path / f"alone{i}", opt_preln_dir, [line], "--ignore-eos")[0]
             for i, line in enumerate(BUDGETS)]
    assert [r["output_ids"] for r in together] == [r["output_ids"] for r in alone]
