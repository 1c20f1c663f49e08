"""The KV cache of one attention layer for one GPU batch, split along heads across tiers.

Attention is independent per head, so each tier's piece (a range of heads) is attended separately and nothing is
concatenated except the small per-head outputs. Memory pieces are [B, h, capacity, D] (a prefix of positions is a
strided view compute reads in place); disk pieces are position-major [capacity, B, h, D] so the cached prefix is one
contiguous read and a new token is one contiguous row write.

Compressed (`quant`), every piece in every tier is position-major byte records [capacity, B, h, record] (codes and
group metadata of one head's vector, compression.py), moved compressed and dequantized into a staged copy where
attention runs; each new token is quantized once, when it is written back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_dist.memory.compression import (
    QuantConfig,
    dequantize_into,
    from_records,
    quantize,
    record_nbytes,
    to_records,
)
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
    v: torch.Tensor | None  # like k; None when only the rows sparse attention keeps are fetched (value_rows)
    staged_in: Tier | None  # the tier holding the staged copy (write-back needed); None: the home itself
    new_v: torch.Tensor | None = None  # [B, h, D]: the decoded position's value when v is None

    @property
    def staged(self) -> bool:
        return self.staged_in is not None


class CacheHome:
    def __init__(self, tiers: TierSet, batch: int, num_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 percents: tuple[float, float, float], label: str, quant: QuantConfig | None = None) -> None:
        self.tiers, self.capacity, self.dtype, self.head_dim, self.quant = tiers, capacity, dtype, head_dim, quant
        self.pieces: list[CachePiece] = []
        for tier, (h0, h1) in split_heads(num_heads, percents).items():
            if quant is not None:
                shape, stored_dtype = (capacity, batch, h1 - h0, record_nbytes(head_dim, quant)), torch.uint8
            elif tier is Tier.DISK:
                shape, stored_dtype = (capacity, batch, h1 - h0, head_dim), dtype
            else:
                shape, stored_dtype = (batch, h1 - h0, capacity, head_dim), dtype
            k = tiers.empty(tier, shape, stored_dtype, name=f"{label}-k", lasting=True)
            v = tiers.empty(tier, shape, stored_dtype, name=f"{label}-v", lasting=True)
            if quant is None and not isinstance(k, DiskTensor):
                # Decode attends over a home's whole capacity (contiguous, so bf16 bmm does not copy it): the
                # not-yet-written positions are masked, and must be finite so masked probabilities (0) times them stay 0.
                k.zero_()
                v.zero_()
            self.pieces.append(CachePiece(tier, h0, h1, k, v))

    def store_prefill(self, k: torch.Tensor, v: torch.Tensor, rows: slice | torch.Tensor = slice(None),
                      column: int = 0) -> None:
        """Write the prompt's keys/values of sequences `rows` of the batch (all by default: a prefill cut into parts
        writes each part's rows; a refill, generation.BlockRun.refill, the rows it gave new sequences, an index) at
        positions [column, column + S). k, v: [b, N, S, D] on the compute device."""
        for p in self.pieces:
            if isinstance(rows, slice) and rows != slice(None) and isinstance(p.k, DiskTensor):
                raise ValueError("a disk-tier KV cache takes whole prefills: its positions are rows of every sequence")
            for home, new in ((p.k, k), (p.v, v)):
                self._write_positions(home, new[:, p.head_start : p.head_stop].permute(2, 0, 1, 3), column, rows)

    def load(self, length: int, cpu_attention: bool = False, stage_values: bool = True) -> list[LoadedPiece]:
        """Each piece with its first `length` positions valid, where attention will read it: on the compute device,
        or (`cpu_attention`) a CPU-tier piece in place, for attention to run on the CPU. Without `stage_values`
        (sparse attention), a memory-tier piece that would be staged stages its keys only; disk pieces stage both,
        since top-k rows scattered over a file would cost nearly every 4 KiB block anyway."""
        loaded = []
        for p in self.pieces:
            on_cpu = cpu_attention and p.tier is Tier.CPU
            if self.quant is None and (self.tiers.addressable(p.tier) or on_cpu):
                loaded.append(LoadedPiece(p, p.k, p.v, None))
                continue
            # Compressed pieces are dequantized where attention runs: the CPU for --cpu-cache-compute, else compute.
            where = Tier.CPU if on_cpu else Tier.GPU
            homes = [p.k, p.v] if stage_values or isinstance(p.k, DiskTensor) else [p.k]
            with self.tiers.stats.timed("cache", p.tier.value, where.value,
                                        len(homes) * length * self._position_nbytes(p.k)):
                staged = [self._stage(home, length, where) for home in homes]
            loaded.append(LoadedPiece(p, staged[0], staged[1] if len(staged) > 1 else None, where))
        return loaded

    def _stage(self, home: torch.Tensor | DiskTensor, length: int, where: Tier) -> torch.Tensor:
        """A staged [B, h, length + 1, D] copy of the home's first `length` positions, in `where`."""
        if self.quant is not None or isinstance(home, DiskTensor):
            return self._stage_position_major(home, length, where)
        if home.device.type == "cpu" and self.tiers.device.type == "cuda" and where is Tier.GPU:
            # A strided slice of a CPU home crosses through a pageable gather first (3.1 GB/s on an H100 host); the
            # whole contiguous home copies at the link's speed. The plan counts capacity-sized staging already.
            staged = self._staging(tuple(home.shape), where)
            staged.copy_(home, non_blocking=True)
            return staged
        b, h, _, d = home.shape
        staged = self._staging((b, h, length + 1, d), where)
        staged[:, :, :length].copy_(home[:, :, :length], non_blocking=True)
        return staged

    def value_rows(self, lp: LoadedPiece, index: torch.Tensor, length: int) -> torch.Tensor:
        """The value rows at `index` ([B, h, keep] positions, `length` meaning the token being decoded, lp.new_v) of a
        piece loaded without values, fetched (and dequantized) from its memory-tier home alone: [B, h, keep, D] where
        attention runs."""
        home, where = lp.piece.v, lp.k.device
        assert isinstance(home, torch.Tensor) and lp.new_v is not None
        cached = index.clamp(max=length - 1).to(home.device)  # the new token is not in the home yet
        with self.tiers.stats.timed("cache", lp.piece.tier.value, lp.staged_in.value,
                                    index.shape[-1] * self._position_nbytes(home)):
            if self.quant is not None:  # records [cap, B, h, rec] -> [B, h, keep, rec], then dequantize only those
                records = home[:length].permute(1, 2, 0, 3)
                picked = torch.gather(records, 2, cached.unsqueeze(-1).expand(-1, -1, -1, records.shape[-1]))
                rows = torch.empty((*index.shape, self.head_dim), dtype=self.dtype, device=where)
                dequantize_into(from_records(picked.to(where), self.head_dim, self.quant), rows)
            else:
                rows = torch.gather(home[:, :, :length], 2, cached.unsqueeze(-1).expand(-1, -1, -1, self.head_dim))
                rows = rows.to(where, non_blocking=True)
        is_new = (index == length).unsqueeze(-1).to(where)
        return torch.where(is_new, lp.new_v.unsqueeze(2).to(rows.dtype), rows)

    def _position_nbytes(self, home: torch.Tensor | DiskTensor) -> int:
        """Stored bytes of one position of a home (what moving one cached token costs)."""
        if isinstance(home, DiskTensor):
            return home.row_nbytes
        return home[0].nbytes if self.quant is not None else home[:, :, 0].nbytes

    def _staging(self, shape: tuple[int, ...], tier: Tier) -> torch.Tensor:
        staged = self.tiers.empty(tier, tuple(shape), self.dtype, name="kv-staging")
        assert isinstance(staged, torch.Tensor)
        return staged

    def _write_positions(self, home: torch.Tensor | DiskTensor, values: torch.Tensor, pos: int,
                         rows: slice | torch.Tensor = slice(None)) -> None:
        """Write position-major values [S, b, h, D] at positions [pos, pos + S) of sequences `rows` (a slice, or an
        index of b rows) of a home, in its own layout: quantized records, disk rows (every sequence), or a
        [B, h, capacity, D] memory piece."""
        if self.quant is not None:
            values = to_records(quantize(values, self.quant))
        if isinstance(home, DiskTensor):
            if isinstance(rows, torch.Tensor):  # some sequences' rows of positions: read, change those, write back
                span = torch.empty((len(values), *home.shape[1:]), dtype=home.dtype)
                home.read_rows_into(span, pos, pos + len(values))
                span[:, rows.cpu()] = values.cpu()
                values = span
            home.write_rows(values.contiguous().cpu(), pos)
        elif isinstance(rows, torch.Tensor):  # advanced indexing reads a copy: write through index_put
            index = rows.to(home.device)
            if self.quant is not None:
                home[pos : pos + len(values), index] = values.to(home.device)
            else:
                home[index, :, pos : pos + len(values)] = values.permute(1, 2, 0, 3).to(home.device)
        elif self.quant is not None:
            home[pos : pos + len(values), rows].copy_(values, non_blocking=True)
        elif pos == 0 and values.is_cuda and home.device.type == "cpu":
            # The prompt into a CPU home: a strided device->host copy lands through a pageable bounce at ~1 GB/s (9 s
            # of an opt-6.7b prefill on an H100 host); laid out whole on the device, it crosses the link contiguously.
            target = home[rows]  # leading sequences: contiguous
            whole = torch.zeros(target.shape, dtype=home.dtype, device=values.device)
            whole[:, :, : len(values)] = values.permute(1, 2, 0, 3)
            target.copy_(whole, non_blocking=True)
        else:
            home[rows, :, pos : pos + len(values)].copy_(values.permute(1, 2, 0, 3), non_blocking=True)

    def _stage_position_major(self, home: torch.Tensor | DiskTensor, length: int, where: Tier) -> torch.Tensor:
        """A staged [B, h, length + 1, D] copy of the first `length` positions of a position-major home (a disk
        piece, or any compressed piece), dequantized when compressed."""
        _, b, h, _ = home.shape
        if isinstance(home, DiskTensor):
            rows = self.tiers.empty(Tier.CPU, (length, *home.shape[1:]), home.dtype, name="kv-bounce")
            assert isinstance(rows, torch.Tensor)
            home.read_rows_into(rows, 0, length)
        else:
            rows = home[:length]
        out = self._staging((b, h, length + 1, self.head_dim), where)
        target = out[:, :, :length].permute(2, 0, 1, 3)
        if self.quant is not None:
            dequantize_into(from_records(rows, self.head_dim, self.quant), target)
        else:
            target.copy_(rows, non_blocking=True)
        if isinstance(home, DiskTensor):
            if out.device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # the bounce buffer is freed next
            self.tiers.release(Tier.CPU, rows)
        return out

    def store_token(self, loaded: list[LoadedPiece], pos: int) -> None:
        """Write back position `pos` of the staged pieces to their homes, then free the staging buffers."""
        for lp in loaded:
            if not lp.staged:
                continue
            with self.tiers.stats.timed("cache", lp.staged_in.value, lp.piece.tier.value, 2 * self._position_nbytes(lp.piece.k)):
                new_v = lp.v[:, :, pos] if lp.v is not None else lp.new_v
                for home, row in ((lp.piece.k, lp.k[:, :, pos]), (lp.piece.v, new_v)):  # rows [B, h, D]
                    self._write_positions(home, row.unsqueeze(0), pos)
            if lp.k.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            for staged in (lp.k, lp.v):
                if staged is not None:
                    self.tiers.release(lp.staged_in, staged)

    def release(self) -> None:
        for p in self.pieces:
            self.tiers.release(p.tier, p.k)
            self.tiers.release(p.tier, p.v)
        self.pieces = []
