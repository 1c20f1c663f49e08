"""The KV cache of one attention layer for one GPU batch, split along heads across tiers.

Attention is independent per head, so each tier's piece (a range of heads) is attended separately and nothing is
concatenated except the small per-head outputs. Memory pieces are [B, h, capacity, D] (a prefix of positions is a
strided view compute reads in place); disk pieces are position-major [capacity, B, h, D] so the cached prefix is one
contiguous read and a new token is one contiguous row write.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_dist.memory.disk import DiskTensor
from flexgen_dist.memory.placement import split_heads
from flexgen_dist.memory.tiers import Tier, TierSet


@dataclass
class CachePiece:
    tier: Tier
    head_start: int
    head_stop: int
    k: torch.Tensor | DiskTensor
    v: torch.Tensor | DiskTensor


@dataclass
class LoadedPiece:
    """A piece's keys and values on the compute device, with room to write the position being decoded."""

    piece: CachePiece
    k: torch.Tensor  # [B, h, span, D]: the home itself (span = capacity) or a staged copy (span = cached + 1)
    v: torch.Tensor
    staged: bool  # a copy of the home (write-back needed), not the home itself


class CacheHome:
    def __init__(self, tiers: TierSet, batch: int, num_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 percents: tuple[float, float, float], label: str) -> None:
        self.tiers, self.capacity = tiers, capacity
        self.pieces: list[CachePiece] = []
        for tier, (h0, h1) in split_heads(num_heads, percents).items():
            shape = (capacity, batch, h1 - h0, head_dim) if tier is Tier.DISK else (batch, h1 - h0, capacity, head_dim)
            k = tiers.empty(tier, shape, dtype, name=f"{label}-k")
            v = tiers.empty(tier, shape, dtype, name=f"{label}-v")
            if not isinstance(k, DiskTensor):
                # Decode attends over a home's whole capacity (contiguous, so bf16 bmm does not copy it): the
                # not-yet-written positions are masked, and must be finite so masked probabilities (0) times them stay 0.
                k.zero_()
                v.zero_()
            self.pieces.append(CachePiece(tier, h0, h1, k, v))

    def store_prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the prompt's keys/values. k, v: [B, N, S, D] on the compute device."""
        s = k.shape[2]
        for p in self.pieces:
            for home, new in ((p.k, k), (p.v, v)):
                part = new[:, p.head_start : p.head_stop]
                if isinstance(home, DiskTensor):
                    home.write_rows(part.permute(2, 0, 1, 3).contiguous().cpu(), 0)
                else:
                    home[:, :, :s].copy_(part, non_blocking=True)

    def load(self, length: int, cpu_attention: bool = False) -> list[LoadedPiece]:
        """Each piece with its first `length` positions valid, where attention will read it: on the compute device,
        or (`cpu_attention`) a CPU-tier piece in place, for attention to run on the CPU."""
        loaded = []
        for p in self.pieces:
            if self.tiers.addressable(p.tier) or (cpu_attention and p.tier is Tier.CPU):
                loaded.append(LoadedPiece(p, p.k, p.v, False))
                continue
            prefix = p.k.row_nbytes * length if isinstance(p.k, DiskTensor) else p.k[:, :, :length].nbytes
            with self.tiers.stats.timed("cache", p.tier.value, Tier.GPU.value, 2 * prefix):
                if isinstance(p.k, DiskTensor):
                    loaded.append(LoadedPiece(p, self._from_disk(p.k, length), self._from_disk(p.v, length), True))
                else:
                    b, h, _, d = p.k.shape
                    k, v = self._staging((b, h, length + 1, d), p.k.dtype), self._staging((b, h, length + 1, d), p.v.dtype)
                    k[:, :, :length].copy_(p.k[:, :, :length], non_blocking=True)
                    v[:, :, :length].copy_(p.v[:, :, :length], non_blocking=True)
                    loaded.append(LoadedPiece(p, k, v, True))
        return loaded

    def _staging(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        staged = self.tiers.empty(Tier.GPU, tuple(shape), dtype, name="kv-staging")
        assert isinstance(staged, torch.Tensor)
        return staged

    def _from_disk(self, home: DiskTensor, length: int) -> torch.Tensor:
        _, b, h, d = home.shape
        host = self.tiers.empty(Tier.CPU, (length, b, h, d), home.dtype, name="kv-bounce")
        assert isinstance(host, torch.Tensor)
        home.read_rows_into(host, 0, length)
        out = self._staging((b, h, length + 1, d), home.dtype)
        out[:, :, :length].copy_(host.permute(1, 2, 0, 3), non_blocking=True)
        if out.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the bounce buffer is freed next
        self.tiers.release(Tier.CPU, host)
        return out

    def store_token(self, loaded: list[LoadedPiece], pos: int) -> None:
        """Write back position `pos` of the staged pieces to their homes, then free the staging buffers."""
        for lp in loaded:
            if not lp.staged:
                continue
            with self.tiers.stats.timed("cache", Tier.GPU.value, lp.piece.tier.value, 2 * lp.k[:, :, pos].nbytes):
                for home, new in ((lp.piece.k, lp.k), (lp.piece.v, lp.v)):
                    row = new[:, :, pos]  # [B, h, D]
                    if isinstance(home, DiskTensor):
                        home.write_rows(row.unsqueeze(0).contiguous().cpu(), pos)
                    else:
                        home[:, :, pos].copy_(row, non_blocking=True)
            if lp.k.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            self.tiers.release(Tier.GPU, lp.k)
            self.tiers.release(Tier.GPU, lp.v)

    def release(self) -> None:
        for p in self.pieces:
            self.tiers.release(p.tier, p.k)
            self.tiers.release(p.tier, p.v)
        self.pieces = []
