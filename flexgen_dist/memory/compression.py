"""Group-wise quantization (FlexGen §5): b-bit codes per group of g contiguous elements along one dimension, with a
per-group scale (and minimum, when asymmetric). Pure functions: no placement, no I/O.

Asymmetric (default): x ≈ min + code * scale, code in [0, 2^b - 1], scale = (max - min) / (2^b - 1).
Symmetric:            x ≈ (code - L) * scale, code in [0, 2L], L = 2^(b-1) - 1, scale = max|x| / L.

Layout: codes keep the tensor's own element order (4-bit codes packed two per byte along the last dimension: element
i in the low nibble of byte i, element i + ceil(n/2) in its high nibble, so unpacking writes two contiguous halves
instead of interleaving — 3-4x faster on CPU), and the float16 scales/minimums have the tensor's shape with the grouped dimension shrunk to the
number of groups. Dequantizing is then a contiguous write of the original layout whatever dimension is grouped
(weights stay [out, in] for the fast GEMM kernels), and a range of rows of a weight grouped along its rows is a
contiguous range of codes and of scales. 4-bit weights take 0.5625 bytes per element (28% of bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexgen_dist.base.errors import UserError

META_DTYPE = torch.float16
_DEQUANT_CHUNK = 1 << 20  # elements per dequantization pass: temporaries stay cache-sized and are never page-faulted


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64
    dim: int = -1  # the dimension groups run along (weights: output channels, dim 0; KV cache: the head dimension)
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group_size < 2 or self.group_size % 2:
            raise UserError(f"quantization group size must be an even number >= 2, got {self.group_size}")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def meta_per_group(self) -> int:
        """float16 values stored per group: the scale, and the minimum when asymmetric."""
        return 1 if self.symmetric else 2


@dataclass(frozen=True)
class Quantized:
    codes: torch.Tensor  # uint8, the tensor's shape with the last dimension packed (4-bit: ceil(n / 2) bytes)
    scale: torch.Tensor  # float16, the tensor's shape with the grouped dimension shrunk to its number of groups
    minimum: torch.Tensor | None  # like scale; None when symmetric
    shape: tuple[int, ...]  # of the original tensor
    config: QuantConfig

    @property
    def nbytes(self) -> int:
        tensors = [self.codes, self.scale] + ([self.minimum] if self.minimum is not None else [])
        return sum(t.nbytes for t in tensors)


def code_shape(shape: tuple[int, ...], cfg: QuantConfig) -> tuple[int, ...]:
    return (*shape[:-1], -(-shape[-1] * cfg.bits // 8))


def meta_shape(shape: tuple[int, ...], cfg: QuantConfig) -> tuple[int, ...]:
    d = cfg.dim % len(shape)
    return (*shape[:d], -(-shape[d] // cfg.group_size), *shape[d + 1 :])


def quantized_nbytes(shape: tuple[int, ...], cfg: QuantConfig) -> int:
    """Bytes `quantize` produces for a tensor of this shape (for memory planning, without quantizing)."""
    meta = math.prod(meta_shape(shape, cfg)) * META_DTYPE.itemsize * cfg.meta_per_group
    return math.prod(code_shape(shape, cfg)) + meta


def quantize(x: torch.Tensor, cfg: QuantConfig = QuantConfig()) -> Quantized:
    d = cfg.dim % x.ndim
    n, g = x.shape[d], cfg.group_size
    xf = x.float()
    pad = -n % g
    if pad:  # repeat the last element: padding never widens a group's range
        xf = torch.cat([xf, xf.narrow(d, n - 1, 1).expand(*xf.shape[:d], pad, *xf.shape[d + 1 :])], dim=d)
    groups = xf.unflatten(d, (-1, g))  # [..., groups, g, ...]
    # One temporary, then in-place passes: fresh large temporaries cost more in page faults than in arithmetic.
    if cfg.symmetric:
        levels = cfg.max_code // 2
        scale = groups.abs().amax(dim=d + 1, keepdim=True) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(META_DTYPE)  # all-zero group
        codes = groups.mul(scale.float().reciprocal()).round_().clamp_(-levels, levels).add_(levels)
        minimum = None
    else:
        lo, hi = groups.amin(dim=d + 1, keepdim=True), groups.amax(dim=d + 1, keepdim=True)
        minimum = lo.to(META_DTYPE)
        scale = (hi - lo) / cfg.max_code
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(META_DTYPE)  # constant group: codes all 0
        codes = groups.sub(minimum.float()).mul_(scale.float().reciprocal()).round_().clamp_(0, cfg.max_code)
    codes = codes.flatten(d, d + 1).narrow(d, 0, n).to(torch.uint8)
    if cfg.bits == 4:
        if codes.shape[-1] % 2:
            codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
        half = codes.shape[-1] // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    scale = scale.squeeze(d + 1).contiguous()
    minimum = None if minimum is None else minimum.squeeze(d + 1).contiguous()
    return Quantized(codes.contiguous(), scale, minimum, tuple(x.shape), cfg)


def dequantize_into(q: Quantized, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized values into `out` (the original shape, any dtype and strides, any device) and return it.

    Works through chunks of the leading dimension (whole groups of it when it is the grouped one): per chunk, the
    codes are unpacked into a small scratch buffer and one fused multiply-add with the broadcast per-group scale and
    offset writes `out`.
    """
    cfg, shape = q.config, q.shape
    d = cfg.dim % len(shape)
    g = cfg.group_size
    rows, row_numel = shape[0], math.prod(shape[1:])
    step = max(1, _DEQUANT_CHUNK // max(1, row_numel))
    if d == 0:
        step = max(g, step // g * g)
    scratch = torch.empty((min(step, rows), *shape[1:]), dtype=out.dtype, device=out.device)
    scale = q.scale.to(out.device, out.dtype)
    offset = q.minimum.to(out.device, out.dtype) if q.minimum is not None else scale * -(cfg.max_code // 2)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codes, values = q.codes[r0:r1].to(out.device, non_blocking=True), scratch[: r1 - r0]
        if cfg.bits == 4:
            half = codes.shape[-1]
            values[..., :half].copy_(codes & 0x0F)
            values[..., half:].copy_(codes[..., : shape[-1] - half] >> 4)
        else:
            values.copy_(codes)
        # Per-group factors for this chunk; along the grouped dimension, whole groups, then a partial last one.
        meta = (slice(r0 // g, -(-r1 // g)) if d == 0 else slice(r0, r1))
        chunk_scale, chunk_offset, chunk_out = scale[meta], offset[meta], out[r0:r1]
        n = values.shape[d]
        full = n - n % g
        for start, length, group_start, groups in ((0, full, 0, full // g), (full, n - full, full // g, 1)):
            if length:
                split = (groups, length // groups)
                torch.addcmul(chunk_offset.narrow(d, group_start, groups).unsqueeze(d + 1),
                              values.narrow(d, start, length).unflatten(d, split),
                              chunk_scale.narrow(d, group_start, groups).unsqueeze(d + 1),
                              out=chunk_out.narrow(d, start, length).unflatten(d, split))
    return out


def dequantize(q: Quantized, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    return dequantize_into(q, torch.empty(q.shape, dtype=dtype, device=device))


# ---- records: a tensor grouped along its last dimension stored as one byte row per vector (codes, then scales,
# then minimums), so a KV cache keeps one contiguous byte row per position and head. ----


def record_nbytes(n: int, cfg: QuantConfig) -> int:
    """Bytes of one record: a vector of n elements grouped along itself."""
    return quantized_nbytes((n,), QuantConfig(cfg.bits, cfg.group_size, -1, cfg.symmetric))


def to_records(q: Quantized) -> torch.Tensor:
    """uint8 [..., record_nbytes(n)] for a tensor quantized along its last dimension."""
    assert q.config.dim % len(q.shape) == len(q.shape) - 1, "records group along the last dimension"
    parts = [q.codes, q.scale.view(torch.uint8)] + ([q.minimum.view(torch.uint8)] if q.minimum is not None else [])
    return torch.cat(parts, dim=-1)


def from_records(records: torch.Tensor, n: int, cfg: QuantConfig) -> Quantized:
    """The inverse of to_records (views where possible): records [..., record_nbytes(n)] -> Quantized of [..., n]."""
    cfg = QuantConfig(cfg.bits, cfg.group_size, -1, cfg.symmetric)
    code_bytes = code_shape((n,), cfg)[0]
    groups = meta_shape((n,), cfg)[0]
    meta = [records[..., code_bytes + i * 2 * groups : code_bytes + (i + 1) * 2 * groups].contiguous().view(META_DTYPE)
            for i in range(cfg.meta_per_group)]
    shape = (*records.shape[:-1], n)
    return Quantized(records[..., :code_bytes], meta[0], None if cfg.symmetric else meta[1], shape, cfg)
