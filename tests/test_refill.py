"""Refill (issue 21): a block's rows whose sequence has stopped take waiting prompts, computed inside the block's next
decode step. Every output stays what the run without refill gives (itself each sequence alone, test_parity and
test_generation_features): in every cache tier, compressed, for both model families, sampled, with log-probabilities,
through a 2-stage Ray pipeline and through a lost stage's replay; and the rows of stopped sequences stop being
wasted."""

from __future__ import annotations

import json
import random

import pytest
from test_cli_errors import _fails, _prompts
from test_stage_restart import LosingExecutor

from flexgen_dist.cli import main

_rng = random.Random(21)
# Prompts of 1 to 12 tokens (a one-token prompt leaves its refill nothing to compute but its head) with budgets of 1
# to 9 tokens, EOS ignored: in blocks of 2 x 2 rows finish at different steps, and later prompts take their rows.
LINES = [{"input_ids": [_rng.randrange(4, 500) for _ in range(n)], "max_new_tokens": g}
         for n, g in zip((12, 9, 11, 3, 7, 1, 5, 10, 2, 8, 4, 6, 1, 9), (3, 9, 1, 5, 2, 7, 4, 1, 8, 3, 6, 2, 5, 4))]
LINES[3]["logprobs"] = 2
LINES[10]["logprobs"] = 1
BLOCK = ("--gpu-batch-size", "2", "--num-gpu-batches", "2", "--ignore-eos")
SAMPLED = ("--temperature", "0.8", "--top-p", "0.9", "--seed", "5")
TOL = 1e-5


def _run(tmp_path, model_dir, *flags, capsys, executor="local"):
    """`generate` over LINES: (records in line order, the summary)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, **line}) + "\n" for i, line in enumerate(LINES)))
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "9",
                 "--dtype", "float32", "--device", "cpu", "--output", str(out), "--quiet", "--executor", executor,
                 *BLOCK, *flags]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) == len(LINES)
    return [records[str(i)] for i in range(len(LINES))], summary


def _same_outputs(refilled: list[dict], plain: list[dict]) -> None:
    for a, b in zip(refilled, plain):
        assert (a["output_ids"], a["finish_reason"]) == (b["output_ids"], b["finish_reason"])
        if "logprobs" in b:
            assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], rel=TOL, abs=TOL)
            assert [[e["id"] for e in top] for top in a["logprobs"]["top_logprobs"]] == \
                [[e["id"] for e in top] for top in b["logprobs"]["top_logprobs"]]


CASES = {
    "memory": (),
    "cache-on-disk": ("--percent", "100", "0", "0", "0", "100", "0"),
    "cache-across-tiers": ("--percent", "100", "0", "40", "30", "100", "0"),
    "compressed-cache": ("--compress-cache", "--compress-bits", "8"),
    "sampled": SAMPLED,
}


@pytest.mark.parametrize("flags", CASES.values(), ids=CASES.keys())
def test_refill_changes_no_output(tmp_path, opt_preln_dir, capsys, flags):
    plain, plain_summary = _run(tmp_path / "plain", opt_preln_dir, *flags, capsys=capsys)
    refilled, summary = _run(tmp_path / "refill", opt_preln_dir, "--refill", *flags, capsys=capsys)
    _same_outputs(refilled, plain)
    # 14 prompts in blocks of 4: the first 4 start, the rest take rows as they free up (a row waits only while no
    # waiting prompt's generation fits in the block's cache).
    assert summary["refilled_sequences"] >= 6
    assert summary["finished_row_steps"] < plain_summary["finished_row_steps"]
    assert summary["generated_tokens"] == plain_summary["generated_tokens"] == sum(l["max_new_tokens"] for l in LINES)


def test_refill_changes_no_output_of_a_llama(tmp_path, llama_dir, capsys):
    plain, _ = _run(tmp_path / "plain", llama_dir, capsys=capsys)  # rotary positions: a refilled row's restart at 0
    refilled, summary = _run(tmp_path / "refill", llama_dir, "--refill", capsys=capsys)
    _same_outputs(refilled, plain)
    assert summary["refilled_sequences"] >= 6


def test_refill_through_a_ray_pipeline(tmp_path, ray_cluster, opt_preln_dir, capsys):
    """The refilled rows' hidden states travel stage to stage after the batches'; the last stage takes their heads."""
    plain, _ = _run(tmp_path / "plain", opt_preln_dir, *SAMPLED, capsys=capsys)
    refilled, summary = _run(tmp_path / "refill", opt_preln_dir, "--refill", *SAMPLED, "--stages", "2",
                             "--ray-address", ray_cluster["address"], capsys=capsys, executor="ray")
    _same_outputs(refilled, plain)
    assert summary["refilled_sequences"] >= 6


@pytest.mark.parametrize("lose_at", [9, 16])
def test_a_lost_stage_replays_the_refills(tmp_path, opt_preln_dir, monkeypatch, capsys, lose_at):
    """Teacher forcing replays each step as sent, its refills with it: the same caches, the same generators."""
    from flexgen_dist import run

    plain, _ = _run(tmp_path / "plain", opt_preln_dir, "--refill", "--stages", "2", *SAMPLED, capsys=capsys)
    monkeypatch.setattr(run, "make_executor", lambda run: LosingExecutor(run.stages, lose_at=lose_at))
    lost, summary = _run(tmp_path / "lost", opt_preln_dir, "--refill", "--stages", "2", *SAMPLED, capsys=capsys)
    assert summary["stage_restarts"] == 1
    assert lost == plain


def test_refill_needs_dense_attention(capsys, tmp_path, opt_preln_dir):
    path = _prompts(tmp_path, [{"id": "a", "input_ids": [5]}])
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", path, "--refill", "--attn-sparsity", "0.5"],
           "--refill needs dense attention")


def test_a_refilled_rows_sequence_is_written_before_its_block_ends(tmp_path, opt_preln_dir, monkeypatch, capsys):
    """A block with refill may run through a whole job: the sequences whose rows it gives away are written as they go
    (each once), not all when the block ends."""
    from flexgen_dist.io.outputs import ResultWriter

    writes: list[int] = []
    write_many = ResultWriter.write_many

    def counted(self, records):
        writes.append(len(records))
        return write_many(self, records)

    monkeypatch.setattr(ResultWriter, "write_many", counted)
    _, summary = _run(tmp_path, opt_preln_dir, "--refill", capsys=capsys)
    assert sum(writes) == len(LINES)
    assert len(writes) > -(-len(LINES) // 4), "more writes than blocks of 4: some before their block's end"
    assert summary["generated_tokens"] == sum(line["max_new_tokens"] for line in LINES)
