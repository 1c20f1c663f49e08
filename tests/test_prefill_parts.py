"""A prefill cut into parts (--prefill-chunks) computes exactly what the whole prefill does: greedy output equals HF
and sampled output equals the uncut run's, in process and through Ray, in every in-memory cache layout; where the
cache has a disk share the cut is refused (explicitly) or not made (by default)."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import hf_greedy
from test_parity import MAX_NEW, PROMPTS, run_cli

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.generation import BlockRun, Sequence
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.stage_engine import PrefillPart
from flexgen_dist.run_config import RunConfig
from flexgen_dist.runtime.coordinator import prefill_chunks, prefill_parts, run_blocks


def test_parts_cover_every_sequence_once_within_its_gpu_batch():
    assert prefill_parts([16], 1) == []
    assert prefill_parts([16], 4) == [PrefillPart(0, 0, 4), PrefillPart(0, 4, 8), PrefillPart(0, 8, 12),
                                      PrefillPart(0, 12, 16)]
    assert prefill_parts([3, 2], 10) == [PrefillPart(0, 0, 1), PrefillPart(0, 1, 2), PrefillPart(0, 2, 3),
                                         PrefillPart(1, 0, 1), PrefillPart(1, 1, 2)]
    for sizes, chunks in (([5, 5, 2], 4), ([7], 3), ([1, 1], 8)):
        parts = prefill_parts(sizes, chunks)
        for k, size in enumerate(sizes):
            rows = [r for p in parts if p.batch == k for r in range(p.start, p.stop)]
            assert rows == list(range(size))


def test_chunks_default_to_two_per_stage_and_never_cut_a_disk_cache():
    resident = Policy()
    disk_cache = Policy(cache_gpu_percent=50, cache_cpu_percent=0)
    assert prefill_chunks(None, [resident]) == 1
    assert prefill_chunks(None, [resident] * 3) == 6
    assert prefill_chunks(1, [resident] * 3) == 1
    assert prefill_chunks(None, [resident, disk_cache, resident]) == 1  # any stage's disk cache
    with pytest.raises(UserError, match="needs the KV cache in memory"):
        prefill_chunks(4, [resident, disk_cache])
    with pytest.raises(UserError, match="--prefill-chunks must be >= 1"):
        RunConfig("m", resident, prefill_chunks=0)
    with pytest.raises(UserError, match="--cpus-per-stage must be > 0"):
        RunConfig("m", resident, cpus_per_stage=0)


CACHES = [
    ("cache-device", "100 0 100 0 100 0", []),
    ("cache-cpu", "100 0 0 100 100 0", []),
    ("cache-split", "100 0 40 60 100 0", []),
    ("cache-compressed", "100 0 100 0 100 0", ["--compress-cache", "--compress-group-size", "16"]),
    ("cache-cpu-attention", "50 50 0 100 100 0", ["--cpu-cache-compute"]),
]


@pytest.mark.parametrize("name,percent,extra", CACHES, ids=[c[0] for c in CACHES])
def test_cut_prefill_equals_the_whole_one(tmp_path, opt_postln_dir, name, percent, extra):
    flags = ["--percent", *percent.split(), "--gpu-batch-size", "3", "--num-gpu-batches", "2", "--stages", "2", *extra]
    whole, _ = run_cli(tmp_path / "whole", opt_postln_dir, *flags, "--prefill-chunks", "1")
    cut, _ = run_cli(tmp_path / "cut", opt_postln_dir, *flags, "--prefill-chunks", "5")
    assert cut == whole
    if not extra:
        assert cut == hf_greedy(opt_postln_dir, PROMPTS, MAX_NEW)


def test_cut_prefill_samples_as_the_whole_one(tmp_path, opt_preln_dir):
    flags = ["--gpu-batch-size", "5", "--stages", "2", "--temperature", "0.9", "--top-p", "0.95", "--seed", "7"]
    whole, _ = run_cli(tmp_path / "whole", opt_preln_dir, *flags, "--prefill-chunks", "1")
    cut, _ = run_cli(tmp_path / "cut", opt_preln_dir, *flags, "--prefill-chunks", "5")
    assert cut == whole


def test_cut_prefill_through_ray_matches_hf(tmp_path, ray_cluster, opt_postln_dir):
    ours, _ = run_cli(tmp_path, opt_postln_dir, "--gpu-batch-size", "5", "--stages", "2", "--prefill-chunks", "4",
                      "--cpus-per-stage", "0.5", "--ray-address", ray_cluster["address"], executor="ray")
    assert ours == hf_greedy(opt_postln_dir, PROMPTS, MAX_NEW)


class _Recorder:
    """An executor that records what is submitted, in order, and answers at once."""

    num_stages = 2

    def __init__(self) -> None:
        self.order: list[tuple[int, PrefillPart | None]] = []

    def start_block(self, *args) -> None: ...
    def end_block(self, block_id: int) -> None: ...

    def submit_step(self, block_id, tokens, valid, part=None, refills=()):
        self.order.append((block_id, part))
        rows = tokens[0].shape[0] if part is None else None
        return (block_id, part, rows)

    def wait_any(self, handles) -> int:
        return 0

    def result(self, handle):
        block_id, part, rows = handle
        return [torch.zeros(rows if rows is not None else 4, dtype=torch.long)]


def test_blocks_that_start_together_send_their_parts_in_turn():
    """Stage 1 then finishes block 0's prefill about one part after stage 0 is done, not a whole prefill later."""
    executor = _Recorder()
    blocks = [BlockRun(i, [Sequence([5, 6, 7], 1) for _ in range(4)], 4, 1, (2,), ignore_eos=True) for i in range(2)]
    run_blocks(executor, iter(blocks), lambda block: block.head_task, max_in_flight=2, on_block_done=lambda b: None,
               prefill_chunks=2)
    parts = [PrefillPart(0, 0, 2), PrefillPart(0, 2, 4)]
    assert executor.order == [(0, parts[0]), (1, parts[0]), (0, parts[1]), (1, parts[1])]


def test_progress_output_names_each_stage_placement(tmp_path, opt_preln_dir, capsys):
    from flexgen_dist.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "input_ids": [5, 6, 7]}\n')
    assert main(["generate", "--model", str(opt_preln_dir), "--prompts", str(prompts), "--max-new-tokens", "2",
                 "--dtype", "float32", "--device", "cpu", "--stages", "2", "--executor", "local",
                 "--percent", "100", "0", "50", "50", "100", "0"]) == 0
    err = capsys.readouterr().err
    assert "stage 0: layers 0-" in err and "cache 50/50/0" in err and "stage 1: layers " in err
