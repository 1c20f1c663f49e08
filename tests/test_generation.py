"""Sampling, per-sequence stopping and resume, through the CLI."""

from __future__ import annotations

import json

import torch
from test_parity import PROMPTS, run_cli

from flexgen_dist.cli import main
from flexgen_dist.engine.generation import Sampling, sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, Sampling(temperature=1.0, top_p=0.7), gen)) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(sample(logits, Sampling(temperature=1.0, top_p=0.4), gen)) for _ in range(100)}
    assert draws == {0}


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 1.0, 1.0]])
    assert sample(logits, Sampling(), torch.Generator()).tolist() == [1, 0]


def test_sampling_is_reproducible_with_a_seed(tmp_path, opt_preln_dir):
    flags = ["--temperature", "1.0", "--top-p", "0.9", "--gpu-batch-size", "2", "--num-gpu-batches", "2"]
    a, _ = run_cli(tmp_path / "a", opt_preln_dir, *flags, "--seed", "3")
    b, _ = run_cli(tmp_path / "b", opt_preln_dir, *flags, "--seed", "3")
    c, _ = run_cli(tmp_path / "c", opt_preln_dir, *flags, "--seed", "4")
    greedy, _ = run_cli(tmp_path / "d", opt_preln_dir)
    assert a == b
    assert a != c and a != greedy


def test_ignore_eos_runs_full_length_and_eos_stops_each_sequence(tmp_path, opt_preln_dir):
    stopped, recs = run_cli(tmp_path / "a", opt_preln_dir, "--gpu-batch-size", "5", max_new=40)
    full, full_recs = run_cli(tmp_path / "b", opt_preln_dir, "--gpu-batch-size", "5", "--ignore-eos", max_new=40)
    assert any(r["finish_reason"] == "eos" for r in recs.values()), "fixture should make some sequences stop"
    assert any(r["finish_reason"] == "length" for r in recs.values())
    for s, f in zip(stopped, full):
        assert len(f) == 40 and f[: len(s)] == s  # stopping one sequence never disturbs the others
        assert len(s) == 40 or s[-1] == 2
    assert all(r["finish_reason"] == "length" for r in full_recs.values())


def test_rerun_resumes_skipping_done_ids(tmp_path, opt_preln_dir, capsys):
    out = tmp_path / "out.jsonl"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(PROMPTS)))
    first = PROMPTS[:2]
    expected, _ = run_cli(tmp_path / "ref", opt_preln_dir, "--gpu-batch-size", "1")
    # A first run that only got through two prompts, its last line torn by a crash.
    lines = [json.dumps({"id": str(i), "input_ids": p, "output_ids": expected[i], "finish_reason": "length"})
             for i, p in enumerate(first)]
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + '{"id": "2", "input_ids": [1')
    capsys.readouterr()
    assert main(["generate", "--model", str(opt_preln_dir), "--prompts", str(prompts), "--max-new-tokens", "12",
                 "--dtype", "float32", "--gpu-batch-size", "1", "--output", str(out), "--quiet", "--executor", "local"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sequences"] == len(PROMPTS) - 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [str(i) for i in range(len(PROMPTS))]
    assert all(r["output_ids"] == expected[int(r["id"])] for r in records)
