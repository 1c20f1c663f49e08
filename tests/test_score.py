"""`flexgen-dist score` against HF transformers: the summed NLL of tokens 2..n equals HF's loss x count in float32,
for left-padded mixed lengths, every tier, block shape and stage count, prefill only or with teacher-forced decode
steps, through the real CLI entry point."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hf_oracle import hf_nll

from flexgen_dist.cli import main
from flexgen_dist.models.likelihood import NOT_SCORED, next_token_targets, target_scores

_rng = random.Random(7)
# Mixed lengths so blocks are left-padded; 2 is the shortest scorable sequence (one scored token).
SEQUENCES = [[2] + [_rng.randrange(4, 512) for _ in range(n - 1)] for n in (9, 2, 23, 14, 5, 17)]
REL_TOL = 1e-4

# (name, --percent, --gpu-batch-size, --num-gpu-batches)
PLACEMENTS = [
    ("all-on-device", "100 0 100 0 100 0", 2, 2),
    ("weights-and-cache-disk", "0 0 0 0 100 0", 2, 3),
    ("mixed-acts-cpu", "30 30 30 30 0 100", 4, 1),
    ("acts-disk", "50 0 50 0 0 0", 1, 3),
]


def _score(tmp_path, model_dir, *flags, sequences=SEQUENCES, executor="local"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "input_ids": s}) + "\n" for i, s in enumerate(sequences)))
    argv = ["score", "--model", str(model_dir), "--prompts", str(prompts), "--dtype", "float32", "--device", "cpu",
            "--offload-dir", str(tmp_path / "offload"), "--output", str(out), "--quiet", "--executor", executor, *flags]
    assert main(argv) == 0
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return [records[str(i)] for i in range(len(sequences))]


def _assert_matches_hf(records, expected, sequences=SEQUENCES):
    assert [r["tokens"] for r in records] == [len(s) - 1 for s in sequences]
    for r, e in zip(records, expected):
        assert r["nll"] == pytest.approx(e, rel=REL_TOL)
        assert r["perplexity"] == pytest.approx(math.exp(e / r["tokens"]), rel=REL_TOL)


@pytest.fixture(scope="module", params=["opt_preln_dir", "opt_postln_dir"])
def model_and_nll(request):
    model_dir = request.getfixturevalue(request.param)
    return model_dir, hf_nll(model_dir, SEQUENCES)


@pytest.mark.parametrize("name,percent,gbs,ngb", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_nll_matches_hf(tmp_path, model_and_nll, name, percent, gbs, ngb, capsys):
    model_dir, expected = model_and_nll
    records = _score(tmp_path, model_dir, "--percent", *percent.split(), "--gpu-batch-size", str(gbs),
                     "--num-gpu-batches", str(ngb))
    _assert_matches_hf(records, expected)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokens = sum(len(s) - 1 for s in SEQUENCES)
    assert summary["scored_tokens"] == tokens and summary["prompt_tokens"] == tokens + len(SEQUENCES)
    assert summary["perplexity"] == pytest.approx(math.exp(sum(expected) / tokens), rel=REL_TOL)
    assert summary["scoring_throughput_tok_s"] > 0 and summary["peak_bytes"]["gpu"] > 0
    offload = tmp_path / "offload"
    assert not offload.exists() or not any(offload.rglob("*.bin")), "offload files must be removed when the run ends"


# Decode steps read the KV cache from every tier (and attend on the CPU with --cpu-cache-compute).
DECODE_CASES = [("all-on-device", "100 0 100 0 100 0", []), ("cache-disk", "0 50 0 0 100 0", []),
                ("cache-mixed-cpu-compute", "30 30 30 30 100 0", ["--cpu-cache-compute"])]


@pytest.mark.parametrize("name,percent,extra", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_teacher_forced_decode_steps_match_hf(tmp_path, model_and_nll, name, percent, extra, capsys):
    model_dir, _ = model_and_nll
    sequences = [s for s in SEQUENCES if len(s) > 4]
    records = _score(tmp_path, model_dir, "--decode-tokens", "4", "--percent", *percent.split(), "--gpu-batch-size",
                     "2", "--num-gpu-batches", "2", *extra, sequences=sequences)
    _assert_matches_hf(records, hf_nll(model_dir, sequences), sequences)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["decode_tokens"] == 4


def test_two_ray_stages_match_hf(tmp_path, ray_cluster, opt_postln_dir, capsys):
    records = _score(tmp_path, opt_postln_dir, "--percent", *"30 30 30 30 100 0".split(), "--gpu-batch-size", "2",
                     "--num-gpu-batches", "2", "--stages", "2", "--decode-tokens", "1", "--ray-address",
                     ray_cluster["address"], executor="ray")
    _assert_matches_hf(records, hf_nll(opt_postln_dir, SEQUENCES))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["stage"] for s in summary["stage_stats"]] == [0, 1]


def test_text_prompts_are_scored_after_the_bos_token(tmp_path, opt_preln_dir, capsys):
    from transformers import AutoTokenizer

    texts = ["Permission is hereby granted, free of charge", "The license grants"]
    ids = [AutoTokenizer.from_pretrained(str(opt_preln_dir))(t).input_ids for t in texts]
    assert main(["score", "--model", str(opt_preln_dir), "--prompt", texts[0], "--prompt", texts[1], "--dtype",
                 "float32", "--gpu-batch-size", "2", "--quiet", "--executor", "local"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = {r["id"]: r for r in map(json.loads, lines[:-1])}
    _assert_matches_hf([records["0"], records["1"]], hf_nll(opt_preln_dir, ids), ids)


def test_resume_skips_scored_ids(tmp_path, opt_preln_dir, capsys):
    first = _score(tmp_path, opt_preln_dir, sequences=SEQUENCES[:3])
    capsys.readouterr()
    both = _score(tmp_path, opt_preln_dir)  # same output file: only ids 3.. are new
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == 3 and summary["sequences"] == len(SEQUENCES) - 3
    assert both[:3] == first


@pytest.mark.parametrize("sequence,flags,needle", [([5], [], "at least 2 tokens"), (list(range(4, 140)), [], "positions"),
                                                   ([5, 600], [], "outside the vocabulary"),
                                                   ([5, 6, 7], ["--decode-tokens", "3"], "longer than that"),
                                                   ([5, 6, 7], ["--decode-tokens", "-1"], ">= 0")])
def test_bad_sequences_are_one_line_exit_2(tmp_path, opt_preln_dir, capsys, sequence, flags, needle):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "input_ids": sequence}) + "\n")
    rc = main(["score", "--model", str(opt_preln_dir), "--prompts", str(prompts), "--executor", "local", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_targets_skip_padding_and_the_last_position():
    ids = torch.tensor([[1, 1, 7, 8, 9], [3, 4, 5, 6, 2]])
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    assert next_token_targets(ids, valid).tolist() == [[NOT_SCORED, NOT_SCORED, 8, 9, NOT_SCORED], [4, 5, 6, 2, NOT_SCORED]]


def test_summed_nll_ignores_unscored_positions_even_when_their_logits_are_not_finite():
    logits = torch.log_softmax(torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    targets = torch.tensor([[NOT_SCORED, 4, 0]])
    expected = -(logits[0, 1, 4] + logits[0, 2, 0]).double()
    logits[0, 0] = float("nan")
    torch.testing.assert_close(target_scores(logits, targets).nll, expected.reshape(1, 1))


def test_a_row_of_several_sequences_is_summed_per_sequence():
    """Segments 1 and 2: two sequences after a shared prefix (segment 0, unscored); each gets its own sum and
    greediness, whatever the order of their positions."""
    logits = torch.log_softmax(torch.randn(1, 5, 6, generator=torch.Generator().manual_seed(1)), dim=-1)
    best = logits[0].argmax(dim=-1)
    targets = torch.tensor([[NOT_SCORED, int(best[1]), (int(best[2]) + 1) % 6, int(best[3]), int(best[4])]])
    segments = torch.tensor([[0, 2, 1, 2, 1]])
    scores = target_scores(logits, targets, segments, sequences=2)
    picked = [float(logits[0, i, targets[0, i]]) for i in range(1, 5)]
    torch.testing.assert_close(scores.nll, -torch.tensor([[picked[1] + picked[3], picked[0] + picked[2]]],
                                                         dtype=torch.float64))
    assert scores.greedy.tolist() == [[False, True]]


def test_a_block_scored_in_one_prefill_plans_no_kv_cache(opt_preln_dir):
    """A ScoreBlock keeps a KV cache only for teacher-forced decode steps; the memory plan counts one only then."""
    from flexgen_dist.engine.policy import Policy
    from flexgen_dist.engine.scoring import ScoredSequence
    from flexgen_dist.io.model_source import model_config
    from flexgen_dist.run_config import RunConfig
    from flexgen_dist.score_run import plan_scoring

    run = RunConfig(str(opt_preln_dir), Policy(gpu_batch_size=2, num_gpu_batches=2), dtype="float32", device="cpu",
                    executor="local")
    sequences = [ScoredSequence(s) for s in SEQUENCES]

    def cache_bytes(decode_tokens: int) -> int:
        scoring = plan_scoring(run, model_config(str(opt_preln_dir)), torch.float32, torch.device("cpu"), sequences,
                               decode_tokens)
        return sum(sum(plan.cache.values()) for plan in scoring.stages.plans)

    assert cache_bytes(0) == 0 and cache_bytes(1) > 0
