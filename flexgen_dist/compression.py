"""Group-wise quantization (FlexGen §5): b-bit codes per group of g contiguous elements along one dimension, with a
per-group scale (and minimum, when asymmetric). Pure functions: no placement, no I/O.

Asymmetric (default): x ≈ min + code * scale, code in [0, 2^b - 1], scale = (max - min) / (2^b - 1).
Symmetric:            x ≈ (code - L) * scale, code in [0, 2L], L = 2^(b-1) - 1, scale = max|x| / L.
4-bit codes are packed two per byte. Scales and minimums are float16: 4 bytes per group of 64, so 4-bit weights take
0.5625 bytes per element (28% of bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_dist.errors import UserError

_META_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64
    dim: int = -1  # the dimension groups run along (weights: input features; KV cache: the head dimension)
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group_size < 2 or self.group_size % 2:
            raise UserError(f"quantization group size must be an even number >= 2, got {self.group_size}")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class Quantized:
    codes: torch.Tensor  # uint8 [..., groups, group_size * bits // 8], grouped dimension moved last
    scale: torch.Tensor  # float16 [..., groups, 1]
    minimum: torch.Tensor | None  # float16 [..., groups, 1]; None when symmetric
    shape: tuple[int, ...]  # of the original tensor
    config: QuantConfig

    @property
    def nbytes(self) -> int:
        tensors = [self.codes, self.scale] + ([self.minimum] if self.minimum is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def quantized_nbytes(shape: tuple[int, ...], cfg: QuantConfig) -> int:
    """Bytes `quantize` produces for a tensor of this shape (for memory planning, without quantizing)."""
    n = shape[cfg.dim]
    groups = -(-n // cfg.group_size)
    rows = 1
    for d in shape:
        rows *= d
    rows //= n
    per_group = cfg.group_size * cfg.bits // 8 + _META_DTYPE.itemsize * (1 if cfg.symmetric else 2)
    return rows * groups * per_group


def _grouped(x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """[..., n] with the grouped dimension last, padded to whole groups by repeating the last element (so padding
    never widens a group's range), as float32 [..., groups, group_size]."""
    x = x.movedim(cfg.dim, -1).float()
    pad = -x.shape[-1] % cfg.group_size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, cfg.group_size)


def quantize(x: torch.Tensor, cfg: QuantConfig = QuantConfig()) -> Quantized:
    groups = _grouped(x, cfg)
    if cfg.symmetric:
        levels = cfg.max_code // 2
        scale = groups.abs().amax(dim=-1, keepdim=True) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(_META_DTYPE)  # all-zero group
        codes = torch.round(groups / scale.float()).clamp_(-levels, levels) + levels
        minimum = None
    else:
        lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        minimum = lo.to(_META_DTYPE)
        scale = ((hi - lo) / cfg.max_code)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(_META_DTYPE)  # constant group: codes all 0
        codes = torch.round((groups - minimum.float()) / scale.float()).clamp_(0, cfg.max_code)
    codes = codes.to(torch.uint8)
    if cfg.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Quantized(codes.contiguous(), scale, minimum, tuple(x.shape), cfg)


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    cfg = q.config
    codes = q.codes
    if cfg.bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)
    values = codes.float() * q.scale.float()
    if q.minimum is not None:
        values += q.minimum.float()
    else:
        values -= (cfg.max_code // 2) * q.scale.float()
    moved = list(torch.empty(q.shape, device="meta").movedim(cfg.dim, -1).shape)
    values = values.flatten(-2)[..., : moved[-1]]
    return values.reshape(moved).movedim(-1, cfg.dim).to(dtype)
