"""The Llama family (Llama, Mistral, Qwen2) through the same engine: greedy float32 output equals HF `generate` token
for token in every placement of the OPT parity matrix, at one and two stages, with CPU attention (through Ray:
test_pipeline.py); configs, sizes and checkpoints read and written as HF does; unsupported features refused in one
line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LLAMA_FAMILY, tiny_llama_family
from hf_oracle import hf_greedy
from test_parity import CASES, MAX_NEW, PROMPTS, run_cli

from flexgen_dist.base.errors import UserError
from flexgen_dist.cli import main
from flexgen_dist.io.weights import open_checkpoint
from flexgen_dist.models import llama
from flexgen_dist.models.family import SIZES, config_by_name, config_from_hf, model_layers


@pytest.fixture(scope="module")
def family_and_oracle(llama_family_dir):
    return llama_family_dir, hf_greedy(llama_family_dir, PROMPTS, MAX_NEW)


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("name,percent,gbs,ngb,extra", CASES, ids=[c[0] for c in CASES])
def test_greedy_matches_hf(tmp_path, family_and_oracle, name, percent, gbs, ngb, extra, stages):
    """Every placement, as one stage and cut into two (in process here; through Ray below)."""
    model_dir, expected = family_and_oracle
    ours, _ = run_cli(tmp_path, model_dir, "--percent", *percent.split(), "--gpu-batch-size", str(gbs),
                      "--num-gpu-batches", str(ngb), "--stages", str(stages), *extra)
    assert ours == expected


def test_the_oracle_is_not_degenerate(family_and_oracle):
    """Outputs that differ between prompts and stop at EOS now and then: a broken engine could not match by luck."""
    _, expected = family_and_oracle
    assert len({tuple(e) for e in expected}) == len(expected)
    assert all(len(set(e)) > 2 for e in expected if len(e) == MAX_NEW)


@pytest.mark.parametrize("name", ["cache-cpu", "cache-mixed"])
def test_cpu_cache_compute_matches_hf(tmp_path, family_and_oracle, name):
    model_dir, expected = family_and_oracle
    percent = {"cache-cpu": "100 0 0 100 100 0", "cache-mixed": "100 0 30 30 100 0"}[name]
    ours, _ = run_cli(tmp_path, model_dir, "--percent", *percent.split(), "--gpu-batch-size", "2",
                      "--num-gpu-batches", "2", "--cpu-cache-compute")
    assert ours == expected


def test_text_in_and_out_through_the_tokenizer(tmp_path, llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    text = "Permission is hereby granted"
    expected = hf_greedy(llama_dir, [tok(text).input_ids], 6)[0]
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(llama_dir), "--prompt", text, "--max-new-tokens", "6", "--dtype", "float32",
                 "--output", str(out), "--quiet", "--executor", "local"]) == 0
    record = json.loads(out.read_text())
    assert record["output_ids"] == expected and record["text"] == tok.decode(expected, skip_special_tokens=True)


# --- configs, sizes, checkpoints --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LLAMA_FAMILY))
def test_config_layout_and_counts_match_hf(kind, tmp_path):
    model = tiny_llama_family(kind)
    model.save_pretrained(tmp_path)
    cfg, source = open_checkpoint(tmp_path)  # every weight present with the shape our layout says
    hf_params = sum(p.numel() for p in model.parameters())  # a tied head counted once, as param_count does
    assert cfg.param_count() == hf_params
    assert sum(w.numel for layer in model_layers(cfg) for w in layer.weights if w.name != "lm_head" or
               not cfg.tie_word_embeddings) == hf_params
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.kv_dim) == (4, 2, 16, 32)
    assert cfg.tie_word_embeddings == (kind == "qwen2") and cfg.qkv_bias == (kind == "qwen2")
    assert config_from_hf(llama.hf_config(cfg), cfg.name) == cfg  # the writer's config reads back the same


def test_llama3_rope_frequencies_equal_hf():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_llama_family("llama").config
    ours = llama._inverse_frequencies(config_from_hf(hf.to_dict(), "t"), torch.device("cpu"))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**hf.to_dict()), torch.device("cpu"))
    assert torch.equal(ours, expected)
    plain = llama._inverse_frequencies(config_from_hf({**hf.to_dict(), "rope_parameters": None}, "t"), "cpu")
    assert not torch.equal(ours, plain)  # the scaling changed some frequencies


@pytest.mark.parametrize("size", list(llama.LLAMA_SIZES))
def test_named_sizes_have_their_published_parameter_counts(size):
    published = {"llama-3.2-1b": 1.236e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.55e9, "mistral-7b": 7.248e9,
                 "qwen2.5-7b": 7.616e9}
    cfg = config_by_name(size)
    assert cfg.param_count() == pytest.approx(published[size], rel=0.005)
    assert config_by_name(f"someone/{size.upper()}") is cfg and size in SIZES


def test_a_written_checkpoint_reads_back_in_hf(tmp_path):
    """`flexgen-dist checkpoint` for a Llama config: HF loads it, with our dummy weights under its own names."""
    from transformers import AutoModelForCausalLM

    from flexgen_dist.io.checkpoint_writer import write_random_checkpoint
    from flexgen_dist.io.weights import DummyWeights

    cfg = config_from_hf({**tiny_llama_family("llama").config.to_dict()}, "tiny")
    write_random_checkpoint(cfg, tmp_path / "ckpt", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    spec = next(w for layer in model_layers(cfg) for w in layer.weights if w.name == "lm_head")
    ours = torch.empty(spec.numel)
    DummyWeights(0).read(spec, 0, spec.numel, ours)
    assert torch.equal(model.lm_head.weight.flatten(), ours)
    assert model.config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral", "sliding_window": 32}, "sliding-window attention (window 32)"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}, "sliding-window attention"),
    ({"model_type": "mixtral", "num_local_experts": 8}, "mixture-of-experts"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
])
def test_unsupported_features_are_refused_in_one_line(tmp_path, llama_dir, change, message, capsys):
    config = {**json.loads((llama_dir / "config.json").read_text()), **change}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf(config, "m")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(model), "--prompt", "hi", "--dummy-weights", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_policy_prices_llama_70b_on_the_paper_node(capsys):
    """GQA's cache is an eighth of what 64 full heads would need; the plan says so and fits a T4."""
    assert main(["policy", "--model", "llama-3.1-70b", "--hardware", "configs/hardware/t4-paper.yaml",
                 "--prompt-len", "512", "--gen-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out or "throughput" in out
    cfg = config_by_name("llama-3.1-70b")
    assert cfg.cache_bytes(1, 1, 2) * 8 == 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 2


def test_bench_runs_both_hf_baselines_on_a_llama_checkpoint(tmp_path, llama_dir, capsys):
    """HF generate (resident) and accelerate (under a budget below the model: weights partly on disk) load the
    family's checkpoint as it is."""
    base = ["bench", "--model", str(llama_dir), "--prompt-len", "8", "--gen-len", "4", "--sweep", "2x1", "--device",
            "cpu", "--dtype", "float32", "--executor", "local", "--offload-dir", str(tmp_path / "offload"), "--no-roofline"]
    budget = ["--max-memory", "gpu=512KiB,cpu=64KiB", "--percent", "0", "0", "100", "0", "100", "0"]
    for system, flags in (("hf", []), ("accelerate", budget)):
        assert main([*base, "--baseline", system, *flags]) == 0
        points = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["points"]
        assert {p["system"] for p in points if p.get("generation_throughput_tok_s", 0) > 0} == {"flexgen_dist", system}
    assert all(p["disk_offload_bytes"] > 0 for p in points if p["system"] == "accelerate")


def test_random_baseline_weights_take_the_size_table_config():
    """bench's HF baseline on a size name builds the family's transformers model from our config."""
    from flexgen_dist.bench.baselines import _hf_config

    hf = _hf_config(config_by_name("llama-3.1-8b"))
    assert type(hf).__name__ == "LlamaConfig" and hf.num_key_value_heads == 8 and hf.head_dim == 128
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 8.0
    assert type(_hf_config(config_by_name("qwen2.5-7b"))).__name__ == "Qwen2Config"
