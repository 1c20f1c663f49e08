"""The correctness oracle: greedy float32 output equals HF transformers' generate, token for token, for every
placement, block shape and overlap setting, through the real CLI entry point."""

from __future__ import annotations

import json
import os
import random

import pytest
from hf_oracle import hf_greedy

from flexgen_dist.cli import main
from flexgen_dist.engine import stage_engine as engine

MAX_NEW = 12
# FLEXGEN_TEST_DEVICE=cuda runs every engine test that goes through run_cli on the GPU (docs/testing on a GPU).
TEST_DEVICE = os.environ.get("FLEXGEN_TEST_DEVICE", "cpu")
_rng = random.Random(1)
PROMPTS = [[_rng.randrange(4, 512) for _ in range(n)] for n in (7, 3, 19, 11, 1)]

# (name, --percent, --gpu-batch-size, --num-gpu-batches, extra flags)
CASES = [
    ("all-on-device", "100 0 100 0 100 0", 2, 2, []),
    ("weights-cpu", "0 100 100 0 100 0", 2, 2, []),
    ("weights-disk", "0 0 100 0 100 0", 2, 2, []),
    ("weights-mixed-30-30-40", "30 30 100 0 100 0", 2, 2, []),
    ("cache-cpu", "100 0 0 100 100 0", 2, 2, []),
    ("cache-disk", "100 0 0 0 100 0", 2, 2, []),
    ("cache-mixed", "100 0 30 30 100 0", 2, 2, []),
    ("acts-cpu", "100 0 100 0 0 100", 2, 2, []),
    ("acts-disk", "100 0 100 0 0 0", 1, 3, []),
    ("block-1x1", "30 30 30 30 100 0", 1, 1, []),
    ("block-1x3", "30 30 30 30 100 0", 1, 3, []),
    ("everything-disk-1x3", "0 0 0 0 0 0", 1, 3, []),
    ("mixed-no-overlap", "30 30 30 30 100 0", 2, 2, ["--no-overlap"]),
    ("disk-no-overlap", "0 0 0 0 100 0", 1, 3, ["--no-overlap"]),
]


def _prompts_file(tmp_path, prompts):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def run_cli(tmp_path, model_dir, *flags, prompts=PROMPTS, max_new=MAX_NEW, device=TEST_DEVICE, executor="local"):
    """Run `generate`; the in-process executor unless told otherwise (test_pipeline.py covers Ray)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(model_dir), "--prompts", str(_prompts_file(tmp_path, prompts)),
            "--max-new-tokens", str(max_new), "--dtype", "float32", "--device", device,
            "--offload-dir", str(tmp_path / "offload"), "--output", str(out), "--quiet", "--executor", executor, *flags]
    assert main(argv) == 0
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return [records[str(i)]["output_ids"] for i in range(len(prompts))], records


@pytest.fixture(scope="module", params=["opt_preln_dir", "opt_postln_dir"])
def model_and_oracle(request):
    model_dir = request.getfixturevalue(request.param)
    return model_dir, hf_greedy(model_dir, PROMPTS, MAX_NEW)


@pytest.mark.parametrize("name,percent,gbs,ngb,extra", CASES, ids=[c[0] for c in CASES])
def test_greedy_matches_hf(tmp_path, model_and_oracle, name, percent, gbs, ngb, extra, capsys):
    model_dir, expected = model_and_oracle
    ours, _ = run_cli(tmp_path, model_dir, "--percent", *percent.split(), "--gpu-batch-size", str(gbs),
                      "--num-gpu-batches", str(ngb), *extra)
    assert ours == expected
    offload = tmp_path / "offload"
    assert not offload.exists() or not any(offload.iterdir()), "offload files must be removed when the run ends"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["generated_tokens"] == sum(len(e) for e in expected)


def test_prefill_in_sequence_chunks_matches_hf(tmp_path, model_and_oracle, monkeypatch):
    """A CPU prefill runs a GPU batch in chunks of whole sequences; one sequence a chunk here, padded prompts, the
    cache split over every tier (each chunk's keys and values land in their rows)."""
    monkeypatch.setattr(engine, "_CPU_CHUNK_TOKENS", 1)
    model_dir, expected = model_and_oracle
    ours, _ = run_cli(tmp_path, model_dir, "--percent", "30", "30", "30", "30", "100", "0", "--gpu-batch-size", "3",
                      "--num-gpu-batches", "2")
    assert ours == expected


def test_sharded_safetensors_match_single_file(tmp_path, opt_preln_dir, opt_sharded_dir):
    single, _ = run_cli(tmp_path / "a", opt_preln_dir, "--gpu-batch-size", "5")
    sharded, _ = run_cli(tmp_path / "b", opt_sharded_dir, "--gpu-batch-size", "5", "--percent", *"0 0 100 0 100 0".split())
    assert single == sharded == hf_greedy(opt_preln_dir, PROMPTS, MAX_NEW)


def test_text_prompts_use_the_checkpoint_tokenizer(tmp_path, opt_preln_dir, capsys):
    from transformers import AutoTokenizer

    texts = ["The license grants", "Permission is hereby granted, free of charge"]
    tok = AutoTokenizer.from_pretrained(str(opt_preln_dir))
    ids = [tok(t).input_ids for t in texts]
    expected = hf_greedy(opt_preln_dir, ids, 6)
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(opt_preln_dir), "--prompt", texts[0], "--prompt", texts[1], "--max-new-tokens", "6",
            "--dtype", "float32", "--gpu-batch-size", "2", "--output", str(out), "--quiet", "--executor", "local"]
    assert main(argv) == 0
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert [records["0"]["input_ids"], records["1"]["input_ids"]] == ids
    assert [records["0"]["output_ids"], records["1"]["output_ids"]] == expected
    assert records["0"]["text"] == tok.decode(expected[0], skip_special_tokens=True)


def test_per_prompt_max_new_tokens_and_eos(tmp_path, opt_preln_dir):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "short", "input_ids": PROMPTS[0], "max_new_tokens": 2}) + "\n"
                    + json.dumps({"id": "long", "input_ids": PROMPTS[2]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(opt_preln_dir), "--prompts", str(path), "--max-new-tokens", "30",
                 "--dtype", "float32", "--gpu-batch-size", "2", "--output", str(out), "--quiet", "--executor", "local"]) == 0
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["short"]["output_ids"] == hf_greedy(opt_preln_dir, [PROMPTS[0]], 2)[0]
    assert records["short"]["finish_reason"] == "length"
    long_expected = hf_greedy(opt_preln_dir, [PROMPTS[2]], 30)[0]
    assert records["long"]["output_ids"] == long_expected
    assert records["long"]["finish_reason"] == ("eos" if long_expected[-1] == 2 and len(long_expected) < 30 else "length")
