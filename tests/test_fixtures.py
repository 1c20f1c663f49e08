"""The shared checkpoints and the HF oracle are what every engine test trusts: check them first."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from hf_oracle import EOS_ID, hf_greedy
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, OPTForCausalLM

PROMPTS = [[2, 10, 20, 30, 40], [2, 100], [2, 7, 8, 9, 11, 12, 13]]
SENTENCE = "The Software is provided \"as is\", without warranty of any kind: naïve café ☃!"


def _random_prompts(n: int) -> list[list[int]]:
    rng = random.Random(1)
    return [[2] + [rng.randrange(4, 512) for _ in range(rng.randint(1, 20))] for _ in range(n)]


def test_hub_is_offline() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_tokenizer_roundtrip_and_opt_ids(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 2, 3)
    ids = tok(SENTENCE)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 1  # BOS prepended once, as OPT's tokenizer does
    assert all(0 <= i < 512 for i in ids)
    assert len(ids) < len(SENTENCE.encode())  # the BPE merges actually compress text
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE


def test_model_dirs_hold_tokenizer(opt_preln_dir: Path, opt_postln_dir: Path, opt_sharded_dir: Path) -> None:
    for d in (opt_preln_dir, opt_postln_dir, opt_sharded_dir):
        assert AutoTokenizer.from_pretrained(d)("hi")["input_ids"][0] == 2


def test_preln_checkpoint(opt_preln_dir: Path) -> None:
    cfg = AutoConfig.from_pretrained(opt_preln_dir)
    assert cfg.model_type == "opt" and cfg.do_layer_norm_before is True
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.ffn_dim) == (512, 64, 3, 256)
    assert (cfg.num_attention_heads, cfg.max_position_embeddings, cfg.word_embed_proj_dim) == (4, 128, 64)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (1, 2, 2)
    weights = load_file(opt_preln_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert "model.decoder.final_layer_norm.weight" in weights
    assert not any("project_in" in k for k in weights)


def test_postln_checkpoint(opt_postln_dir: Path) -> None:
    cfg = AutoConfig.from_pretrained(opt_postln_dir)
    assert cfg.do_layer_norm_before is False and (cfg.hidden_size, cfg.word_embed_proj_dim) == (64, 32)
    assert not list(opt_postln_dir.glob("*.safetensors"))
    weights = torch.load(opt_postln_dir / "pytorch_model.bin", weights_only=True)
    assert weights["model.decoder.project_in.weight"].shape == (64, 32)
    assert weights["model.decoder.project_out.weight"].shape == (32, 64)
    assert weights["model.decoder.embed_tokens.weight"].shape == (512, 32)
    model = OPTForCausalLM.from_pretrained(opt_postln_dir)
    assert model.model.decoder.project_in is not None and model.model.decoder.final_layer_norm is None


def test_sharded_checkpoint_matches_preln(opt_sharded_dir: Path, opt_preln_dir: Path) -> None:
    index = json.loads((opt_sharded_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(opt_sharded_dir / shard))
    assert set(merged) == set(index["weight_map"])
    single = load_file(opt_preln_dir / "model.safetensors")
    assert set(merged) == set(single)
    assert all(torch.equal(merged[k], single[k]) for k in single)


def test_hf_greedy_is_not_degenerate(opt_preln_dir: Path, opt_postln_dir: Path) -> None:
    for d in (opt_preln_dir, opt_postln_dir):
        outs = hf_greedy(d, PROMPTS, 12)
        assert len({tuple(o) for o in outs}) > 1, outs
        assert len({t for o in outs for t in o}) > 3, outs
        for o in outs:
            assert 1 <= len(o) <= 12
            assert EOS_ID not in o[:-1]  # cut right after the first EOS
            assert len(o) == 12 or o[-1] == EOS_ID
            assert not {0, 1, 3} & set(o)  # the fixtures never emit <s>, <pad>, <unk>


def test_hf_greedy_reaches_eos_sometimes(opt_preln_dir: Path, opt_postln_dir: Path) -> None:
    for d in (opt_preln_dir, opt_postln_dir):
        outs = hf_greedy(d, _random_prompts(16), 24)
        assert any(o[-1] == EOS_ID for o in outs) and any(len(o) == 24 for o in outs)


def test_hf_greedy_batch_matches_single_prompts(opt_preln_dir: Path, opt_postln_dir: Path) -> None:
    # Left padding with a mask must not change any row: the oracle itself must be exact.
    prompts = PROMPTS + _random_prompts(5)
    for d in (opt_preln_dir, opt_postln_dir):
        assert hf_greedy(d, prompts, 16) == [hf_greedy(d, [p], 16)[0] for p in prompts]


def test_sharded_generates_like_preln(opt_sharded_dir: Path, opt_preln_dir: Path) -> None:
    assert hf_greedy(opt_sharded_dir, PROMPTS, 10) == hf_greedy(opt_preln_dir, PROMPTS, 10)
