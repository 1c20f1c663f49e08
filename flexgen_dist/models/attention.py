"""Masked self-attention over a KV cache, the same for every model family: masks, positions, dense and top-k sparse
attention, with grouped-query attention (fewer key/value heads than query heads).

Shapes: B batch, N query heads, n key/value heads (N a multiple of n, g = N / n query heads share one), S query
length, T key length, D head dim. Query head h reads key/value head h // g, as HF's `repeat_kv` lays them out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Masked attention, q pre-scaled. q [B, N, S, D], k/v [B, n, T, D], mask [B, 1, S, T] bool -> [B, N, S, D].

    `keep` (decode only): top-k sparse attention — each query attends to its `keep` most probable positions and reads
    only those value rows (see top_probabilities).
    """
    if q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1])
    if keep is None or keep >= k.shape[2]:
        # Decode: two small batched matmuls beat SDPA's CPU kernel ~4x in bf16 (measured on AVX-512).
        probs = torch.softmax(decode_scores(q, k, mask), dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).reshape(q.shape)
    top, index = top_probabilities(q, k, mask, keep)
    return attend_rows(top, torch.gather(v, 2, index.flatten(2).unsqueeze(-1).expand(-1, -1, -1, v.shape[-1])))


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """One decode query per head, grouped by the key/value head it reads: [B, N, 1, D] -> [B, n, g, D] (a view; for
    g = 1 the same shape, so multi-head models compute exactly what they did before grouping)."""
    b, heads, _, d = q.shape
    return q.view(b, kv_heads, heads // kv_heads, d)


def decode_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query's masked attention scores. q [B, N, 1, D], k [B, n, T, D], mask [B, 1, 1, T] -> [B, n, g, T]."""
    scores = torch.matmul(_grouped(q, k.shape[1]), k.transpose(-1, -2))
    return scores.masked_fill_(~mask, torch.finfo(q.dtype).min)


def top_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, keep: int):
    """The `keep` largest attention probabilities per query and their positions: ([B, n, g, keep] float32, index).

    The kept positions keep their dense softmax probabilities, not renormalized over the kept set (as FlexGen does):
    on the trained tiny OPT of docs/quality.md, greedy agreement with dense attention was 0.897 vs 0.886 at F = 0.5
    and 0.891 vs 0.666 at F = 0.25 with renormalization.
    """
    return torch.softmax(decode_scores(q, k, mask), dim=-1, dtype=torch.float32).topk(keep, dim=-1)


def attend_rows(top_probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sparse decode attention over the selected positions only. top_probs [B, n, g, keep], rows [B, n, g * keep, D]
    (each query's kept value rows, in index.flatten(2)'s order) -> [B, N, 1, D]."""
    b, kv_heads, group, keep = top_probs.shape
    grouped = rows.view(b, kv_heads, group, keep, rows.shape[-1])
    context = torch.matmul(top_probs.to(rows.dtype).unsqueeze(-2), grouped)  # [B, n, g, 1, D]
    return context.view(b, kv_heads * group, 1, rows.shape[-1])


def attention_mask(valid: torch.Tensor, query_len: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Causal + padding mask for the last `query_len` positions. valid [B, T] bool -> [B, 1, S, T] bool.

    `segments` [B, T] int64 (a scoring row of sequences sharing a prefix, engine.scoring.ScoreRow): a token of segment
    i > 0 sees segment 0 (the shared prefix) and segment i only, so each sequence attends to what it would alone.
    Every query may see itself, so left-padding rows never softmax over nothing (which would give NaN and leak
    through 0 * NaN into the real rows' values).
    """
    q_pos, k_pos = _query_key_positions(valid, query_len)
    return (_visible(valid, query_len, segments) | (k_pos == q_pos))[:, None]


def position_ids(valid: torch.Tensor, query_len: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """HF's positions: the count of real tokens before each one; padding gets 0 (it is masked anyway). -> [B, S].
    With `segments`, the count of the real tokens it sees (attention_mask): a sequence's own tokens follow the shared
    prefix at the positions they would have alone."""
    if segments is not None:
        return (_visible(valid, query_len, segments).sum(dim=-1) - 1).clamp(min=0)
    pos = valid.long().cumsum(dim=1) - 1
    return pos.clamp(min=0)[:, -query_len:]


def _visible(valid: torch.Tensor, query_len: int, segments: torch.Tensor | None) -> torch.Tensor:
    """[B, S, T] bool: the real tokens each of the last `query_len` positions attends to (attention_mask)."""
    q_pos, k_pos = _query_key_positions(valid, query_len)
    seen = (k_pos <= q_pos) & valid[:, None, :]
    if segments is not None:
        keys = segments[:, None, :]
        seen &= (keys == 0) | (keys == segments[:, -query_len:, None])
    return seen


def _query_key_positions(valid: torch.Tensor, query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `query_len` positions of valid [B, T] as [S, 1], and all T as [1, T]."""
    t = valid.shape[1]
    return (torch.arange(t - query_len, t, device=valid.device)[:, None],
            torch.arange(t, device=valid.device)[None, :])
