"""CPU attention delegation (exact) and top-k sparse decode attention (an approximation, checked against a
reference computed here)."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import hf_greedy
from test_parity import MAX_NEW, PROMPTS, run_cli

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.policy import Policy
from flexgen_dist.models.attention import attend

CACHE_PLACEMENTS = {"cache-cpu": "100 0 0 100 100 0", "cache-mixed": "100 0 30 30 100 0",
                    "cache-disk": "100 0 0 0 100 0", "weights-offloaded-cache-cpu": "0 50 0 100 100 0"}


@pytest.mark.parametrize("model", ["opt_preln_dir", "opt_postln_dir", "llama_dir"])
@pytest.mark.parametrize("name", CACHE_PLACEMENTS)
def test_cpu_cache_compute_matches_hf_for_every_cache_placement(tmp_path, request, model, name):
    model_dir = request.getfixturevalue(model)
    ours, _ = run_cli(tmp_path, model_dir, "--percent", *CACHE_PLACEMENTS[name].split(), "--gpu-batch-size", "2",
                      "--num-gpu-batches", "2", "--cpu-cache-compute")
    assert ours == hf_greedy(model_dir, PROMPTS, MAX_NEW)


def _reference_topk(q, k, v, mask, keep):
    """The kept positions weighted by their dense softmax probabilities (not renormalized), as FlexGen does."""
    probs = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")), dim=-1)  # [B, n, 1, T]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            p = probs[b, h, 0]
            idx = p.topk(keep).indices
            out[b, h, 0] = p[idx] @ v[b, h, idx]
    return out


@pytest.mark.parametrize("keep", [1, 3, 7])
def test_topk_attention_uses_only_the_top_positions(keep):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g),
               torch.randn(2, 3, 10, 8, generator=g))
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :2] = False  # left padding is never among the kept positions
    torch.testing.assert_close(attend(q, k, v, mask, keep), _reference_topk(q, k, v, mask, keep))


def test_topk_with_everything_kept_is_dense_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    torch.testing.assert_close(attend(q, k, v, mask, 6), attend(q, k, v, mask))


@pytest.mark.parametrize("model", ["opt_preln_dir", "llama_dir"])
def test_sparse_decode_keeps_the_dense_prefill_token_and_runs_everywhere(tmp_path, request, model):
    opt_preln_dir = request.getfixturevalue(model)
    expected = hf_greedy(opt_preln_dir, PROMPTS, MAX_NEW)
    for name, percent in {"resident": "100 0 100 0 100 0", "offloaded": "30 30 30 30 100 0"}.items():
        ours, _ = run_cli(tmp_path / name, opt_preln_dir, "--percent", *percent.split(), "--attn-sparsity", "0.5",
                          "--gpu-batch-size", "2", "--num-gpu-batches", "2")
        # The first new token comes from the (dense) prefill; later ones may differ from dense attention.
        assert [o[0] for o in ours] == [e[0] for e in expected]
        assert all(len(o) == MAX_NEW or o[-1] == 2 for o in ours)  # each stops at EOS or runs its full length
    dense_equivalent, _ = run_cli(tmp_path / "all", opt_preln_dir, "--attn-sparsity", "1.0")
    assert dense_equivalent == expected


@pytest.mark.parametrize("keep", [None, 1, 4])
def test_grouped_query_attention_is_attention_over_repeated_heads(keep):
    """GQA: query head h reads key/value head h // g, dense and top-k alike (HF's repeat_kv layout)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 1, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g),
               torch.randn(2, 2, 9, 8, generator=g))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False
    repeated = attend(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), mask, keep)
    torch.testing.assert_close(attend(q, k, v, mask, keep), repeated)
    prompt = torch.randn(2, 6, 5, 8, generator=g)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    torch.testing.assert_close(attend(prompt, k[:, :, :5], v[:, :, :5], causal),
                               attend(prompt, k[:, :, :5].repeat_interleave(3, 1), v[:, :, :5].repeat_interleave(3, 1), causal))


@pytest.mark.parametrize("fields", [{"compress_bits": 3}, {"compress_group_size": 63}, {"compress_group_size": 0}])
def test_bad_compression_settings_are_refused(fields):
    with pytest.raises(UserError, match="quantization"):
        Policy(compress_weight=True, **fields)
