"""What users would otherwise run: HF transformers `generate` on the same work, for side-by-side throughput."""

from __future__ import annotations

import time

import torch

from flexgen_dist.models.opt import OptConfig


def hf_config(cfg: OptConfig):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
                     do_layer_norm_before=cfg.do_layer_norm_before, word_embed_proj_dim=cfg.embed_dim,
                     _remove_final_layer_norm=cfg.do_layer_norm_before and not cfg.has_final_layer_norm,
                     pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


def hf_generate_throughput(cfg: OptConfig, prompts: list[list[int]], gen_len: int, batch_size: int,
                           dtype: torch.dtype) -> dict:
    """HF `generate` with all weights resident, greedy, exactly gen_len new tokens per prompt (EOS ignored), in
    batches of batch_size (prompts of equal length, as in our synthetic runs). Times generate calls only."""
    from transformers import OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM._from_config(hf_config(cfg), dtype=dtype).eval()
    generated, elapsed = 0, 0.0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            ids = torch.tensor(prompts[i : i + batch_size])
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=cfg.pad_token_id)
            elapsed += time.perf_counter() - start
            generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"system": "hf-generate", "batch_size": batch_size, "generated_tokens": generated, "total_s": elapsed,
            "generation_throughput_tok_s": generated / elapsed}
