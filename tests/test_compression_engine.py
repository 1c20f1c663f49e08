"""Compressed weights and KV cache inside the engine, on float32 tiny checkpoints.

Oracles: (1) with --compress-weight, greedy output equals HF `generate` on a copy of the checkpoint whose matrices
were replaced by their quantize -> dequantize round trip (so the engine must store, move and dequantize exactly what
the quantizer defines, in every tier); (2) a compressed KV cache is quantized per position and head, independent of
where it lives, so every cache placement, with and without CPU attention, gives the same tokens as the cache on the
compute device; the first token comes from the (unquantized) prefill and equals HF's.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_oracle import hf_greedy
from test_parity import MAX_NEW, PROMPTS, run_cli
from transformers import AutoModelForCausalLM

from flexgen_dist.cli import main
from flexgen_dist.memory.compression import QuantConfig, dequantize, quantize

WEIGHT_PLACEMENTS = {"device": "100 0 100 0 100 0", "cpu": "0 100 100 0 100 0", "disk": "0 0 100 0 100 0",
                     "mixed": "30 30 100 0 100 0"}
CACHE_PLACEMENTS = {"cache-cpu": "100 0 0 100 100 0", "cache-disk": "100 0 0 0 100 0",
                    "cache-mixed": "100 0 30 30 100 0", "everything-offloaded": "0 50 30 30 0 100"}


def _round_trip_checkpoint(model_dir, out_dir, bits: int):
    """A copy of the checkpoint with every matrix quantized along its output channels and dequantized back."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = QuantConfig(bits=bits, group_size=64, dim=0)
    with torch.no_grad():
        for _, p in model.named_parameters():  # a tied lm_head is the embedding, visited once
            if p.dim() == 2:
                p.copy_(dequantize(quantize(p, cfg), torch.float32))
    model.save_pretrained(out_dir)
    for f in model_dir.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, out_dir / f.name)
    return out_dir


@pytest.fixture(scope="module", params=[("opt_preln_dir", 4), ("opt_postln_dir", 4), ("opt_preln_dir", 8), ("llama_dir", 4)],
                ids=["preln-4bit", "postln-4bit", "preln-8bit", "llama-4bit"])
def round_trip(request, tmp_path_factory):
    model_name, bits = request.param
    model_dir = request.getfixturevalue(model_name)
    reference = _round_trip_checkpoint(model_dir, tmp_path_factory.mktemp("roundtrip"), bits)
    return model_dir, bits, hf_greedy(reference, PROMPTS, MAX_NEW)


@pytest.mark.parametrize("placement", WEIGHT_PLACEMENTS)
def test_compressed_weights_equal_hf_on_the_round_tripped_checkpoint(tmp_path, round_trip, placement):
    model_dir, bits, expected = round_trip
    ours, _ = run_cli(tmp_path, model_dir, "--percent", *WEIGHT_PLACEMENTS[placement].split(), "--compress-weight",
                      "--compress-bits", str(bits), "--gpu-batch-size", "2", "--num-gpu-batches", "2")
    assert ours == expected


def test_compression_changes_the_weights_used(tmp_path, opt_preln_dir):
    """Guards the oracle above: 4-bit weights do change this model's greedy output somewhere."""
    ours, _ = run_cli(tmp_path, opt_preln_dir, "--compress-weight", "--max-new-tokens", str(MAX_NEW))
    assert ours != hf_greedy(opt_preln_dir, PROMPTS, MAX_NEW)


COMPRESSED = {"cache": ["--compress-cache"], "weights-and-cache": ["--compress-weight", "--compress-cache"]}


@pytest.fixture(scope="module", params=[(m, c) for m in ("opt_preln_dir", "llama_dir") for c in COMPRESSED],
                ids=[f"{m.removesuffix('_dir')}-{c}" for m in ("opt_preln_dir", "llama_dir") for c in COMPRESSED])
def on_device(request, tmp_path_factory):
    """The compressed run with everything on the compute device: the reference for every other placement."""
    model_dir = request.getfixturevalue(request.param[0])
    flags = COMPRESSED[request.param[1]]
    ours, _ = run_cli(tmp_path_factory.mktemp("on-device"), model_dir, *flags, "--gpu-batch-size", "2",
                      "--num-gpu-batches", "2")
    if "--compress-weight" not in flags:
        assert [o[0] for o in ours] == [e[0] for e in hf_greedy(model_dir, PROMPTS, MAX_NEW)]
    return model_dir, flags, ours


@pytest.mark.parametrize("cpu_attention", [False, True], ids=["device-attention", "cpu-attention"])
@pytest.mark.parametrize("placement", CACHE_PLACEMENTS)
def test_compressed_cache_gives_the_same_tokens_in_every_placement(tmp_path, on_device, placement, cpu_attention):
    model_dir, flags, expected = on_device
    ours, _ = run_cli(tmp_path, model_dir, "--percent", *CACHE_PLACEMENTS[placement].split(), *flags,
                      "--gpu-batch-size", "2", "--num-gpu-batches", "2", *(["--cpu-cache-compute"] if cpu_attention else []))
    assert ours == expected


def _summary(capsys, *flags: str) -> dict:
    argv = ["generate", "--model", "opt-125m", "--dummy-weights", "--synthetic", "2", "--prompt-len", "8",
            "--max-new-tokens", "2", "--dtype", "float32", "--device", "cpu", "--executor", "local", "--quiet",
            "--percent", "0", "100", "0", "100", "100", "0", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_compressed_tiers_hold_under_30_percent_of_the_bf16_bytes(capsys):
    """float32 compute (fast on any CPU); the compressed bytes do not depend on the compute dtype."""
    plain = _summary(capsys)
    packed = _summary(capsys, "--compress-weight", "--compress-cache")
    bf16_bytes = plain["peak_bytes"]["cpu"] / 2
    assert packed["peak_bytes"]["cpu"] <= 0.30 * bf16_bytes
    assert packed["planned_bytes"]["cpu"] == packed["peak_bytes"]["cpu"]  # weights and cache only, as planned
    assert packed["policy"]["compress_weight"] and packed["policy"]["compress_cache"]


def _cache_bytes_from_cpu(summary: dict) -> int:
    return summary["stage_stats"][0]["transfers"]["cache:cpu->gpu"]["bytes"]


# Under GQA each of a key/value head's g query heads fetches its own kept rows: the tiny Llama's g = 2 at 0.25
# fetches about as many value rows as OPT at 0.5.
@pytest.mark.parametrize("model,sparsity", [("opt_preln_dir", "0.5"), ("llama_dir", "0.25")])
def test_sparse_attention_fetches_only_the_kept_value_rows(tmp_path, request, model, sparsity, capsys):
    """A compressed CPU-tier cache under --attn-sparsity stages keys only and dequantizes just the value rows top-k
    keeps; a disk-tier cache stages all values. Both must attend to the same rows, so give the same tokens."""
    opt_preln_dir = request.getfixturevalue(model)  # (under GQA, each query head keeps its own rows of its KV head)
    sparse = ["--compress-cache", "--attn-sparsity", sparsity, "--gpu-batch-size", "2", "--num-gpu-batches", "2"]
    on_cpu, _ = run_cli(tmp_path / "cpu", opt_preln_dir, "--percent", "100", "0", "0", "100", "100", "0", *sparse)
    cpu_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    on_disk, _ = run_cli(tmp_path / "disk", opt_preln_dir, "--percent", "100", "0", "0", "0", "100", "0", *sparse)
    assert on_cpu == on_disk
    mixed, _ = run_cli(tmp_path / "mixed", opt_preln_dir, "--percent", "100", "0", "30", "30", "100", "0", *sparse,
                       "--cpu-cache-compute")
    assert mixed == on_disk
    capsys.readouterr()
    run_cli(tmp_path / "dense", opt_preln_dir, "--percent", "100", "0", "0", "100", "100", "0", "--compress-cache",
            "--gpu-batch-size", "2", "--num-gpu-batches", "2")
    dense_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Keys in full, values at about half: well under the dense run's keys and values.
    assert _cache_bytes_from_cpu(cpu_summary) < 0.8 * _cache_bytes_from_cpu(dense_summary)
