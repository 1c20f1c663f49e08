"""A layer's weights as one flat buffer whose element ranges live on the tiers the policy gives them.

Packing a layer into one flat buffer makes any percentage split exact (to one page) for any layer shape, and makes
loading a layer a few large copies: each tier's piece lands in its slice of a staging buffer on the compute device,
and the weights are views of that buffer. A layer wholly on a compute-addressable tier is used in place; on a CPU
compute device in bf16 its matrices are packed once into oneDNN's layout instead (models/prepack.py).

Compressed (`quant`), the stored buffer is the layer's bytes in a PackedLayout: the tiers hold and move only the
compressed bytes, which are gathered on the compute device and dequantized into the staging buffer just before use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexgen_dist.io.weights import WeightSource
from flexgen_dist.memory.compression import (
    META_DTYPE,
    QuantConfig,
    Quantized,
    code_shape,
    dequantize_into,
    meta_shape,
    quantize,
)
from flexgen_dist.memory.disk import ALIGN, DiskTensor, aligned_empty
from flexgen_dist.memory.placement import split_elements
from flexgen_dist.memory.tiers import Tier, TierSet
from flexgen_dist.models import prepack
from flexgen_dist.models.layout import LayerSpec, WeightSpec

_WEIGHT_ALIGN = 32  # elements: keeps every weight view SIMD-aligned inside the flat buffer
_FILL_CHUNK_BYTES = 64 << 20  # disk pieces are generated/copied through a bounded staging buffer
_QUANTIZE_CHUNK_BYTES = 4 << 20  # float32 rows quantized at a time: its temporaries stay off the page-fault path
_PART_ALIGN = 64  # bytes: every part of a packed layer starts cache-line aligned (and so float16-aligned)


@dataclass(frozen=True)
class FlatLayout:
    offsets: dict[str, int]  # weight name -> element offset
    numel: int  # padded so a disk piece ending the buffer is a whole number of pages

    @staticmethod
    def of(layer: LayerSpec, dtype: torch.dtype) -> "FlatLayout":
        page = ALIGN // dtype.itemsize
        offsets, pos = {}, 0
        for w in layer.weights:
            offsets[w.name] = pos
            pos += -(-w.numel // _WEIGHT_ALIGN) * _WEIGHT_ALIGN
        return FlatLayout(offsets, -(-pos // page) * page)

    def views(self, layer: LayerSpec, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {w.name: flat[self.offsets[w.name] : self.offsets[w.name] + w.numel].view(w.shape) for w in layer.weights}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class PackedLayout:
    """A compressed layer's bytes: each matrix as codes, scales (and minimums) in compression.py's layout, grouped
    along its output channels; vectors (biases, LayerNorm) stay in the compute dtype, as FlexGen keeps them."""

    quant: QuantConfig
    dtype: torch.dtype
    parts: dict[str, tuple[int, ...]]  # weight name -> byte offsets of (codes, scale[, minimum]) or (values,)
    nbytes: int  # padded to whole pages, like FlatLayout

    @staticmethod
    def of(layer: LayerSpec, dtype: torch.dtype, quant: QuantConfig) -> "PackedLayout":
        parts, pos = {}, 0
        for w in layer.weights:
            if len(w.shape) == 2:
                sizes = [_nbytes(code_shape(w.shape, quant), torch.uint8)]
                sizes += [_nbytes(meta_shape(w.shape, quant), META_DTYPE)] * quant.meta_per_group
            else:
                sizes = [_nbytes(w.shape, dtype)]
            offsets = []
            for size in sizes:
                offsets.append(pos)
                pos += -(-size // _PART_ALIGN) * _PART_ALIGN
            parts[w.name] = tuple(offsets)
        return PackedLayout(quant, dtype, parts, -(-pos // ALIGN) * ALIGN)

    def _quantized(self, w: WeightSpec, packed: torch.Tensor) -> Quantized:
        """Views of one matrix's codes and metadata inside the packed bytes."""
        codes_at, *meta_at = self.parts[w.name]
        codes_shape, groups_shape = code_shape(w.shape, self.quant), meta_shape(w.shape, self.quant)
        codes = packed[codes_at : codes_at + _nbytes(codes_shape, torch.uint8)].view(codes_shape)
        meta = [packed[at : at + _nbytes(groups_shape, META_DTYPE)].view(META_DTYPE).view(groups_shape) for at in meta_at]
        return Quantized(codes, meta[0], meta[1] if len(meta) > 1 else None, w.shape, self.quant)

    def _vector(self, w: WeightSpec, packed: torch.Tensor) -> torch.Tensor:
        """A view of one uncompressed weight (a bias or LayerNorm vector) inside the packed bytes."""
        (at,) = self.parts[w.name]
        return packed[at : at + _nbytes(w.shape, self.dtype)].view(self.dtype).view(w.shape)

    def encode(self, layer: LayerSpec, source: WeightSource) -> torch.Tensor:
        """The layer's packed bytes in a page-aligned host buffer. Matrices are read and quantized a bounded chunk of
        whole groups of rows at a time (rows of a group-along-rows matrix map to contiguous codes and metadata)."""
        packed = aligned_empty((self.nbytes,), torch.uint8)
        packed.zero_()
        for w in layer.weights:
            if len(w.shape) != 2:
                source.read(w, 0, w.numel, self._vector(w, packed).view(-1))
                continue
            target = self._quantized(w, packed)
            rows, cols = w.shape
            group = self.quant.group_size
            # Rows are read in large chunks (a source produces big ranges cheaply: dummy weights are seeded per
            # 4M elements) and quantized in small ones (whose temporaries stay off the page-fault path).
            read_rows = max(group, _FILL_CHUNK_BYTES // (4 * cols) // group * group)
            quantize_rows = min(read_rows, max(group, _QUANTIZE_CHUNK_BYTES // (4 * cols) // group * group))
            host = torch.empty(min(read_rows, rows) * cols, dtype=torch.float32)  # quantize from full precision
            for r0 in range(0, rows, read_rows):
                r1 = min(rows, r0 + read_rows)
                source.read(w, r0 * cols, r1 * cols, host[: (r1 - r0) * cols])
                for q0 in range(r0, r1, quantize_rows):
                    q1 = min(r1, q0 + quantize_rows)
                    q = quantize(host[(q0 - r0) * cols : (q1 - r0) * cols].view(q1 - q0, cols), self.quant)
                    g0, g1 = q0 // group, -(-q1 // group)
                    target.codes[q0:q1].copy_(q.codes)
                    target.scale[g0:g1].copy_(q.scale)
                    if q.minimum is not None:
                        target.minimum[g0:g1].copy_(q.minimum)
        return packed

    def decode(self, layer: LayerSpec, packed: torch.Tensor, layout: FlatLayout, out: torch.Tensor) -> None:
        """Dequantize the packed layer (on the compute device) into `out`, a buffer in FlatLayout `layout`."""
        views = layout.views(layer, out)
        for w in layer.weights:
            if len(w.shape) == 2:
                dequantize_into(self._quantized(w, packed), views[w.name])
            else:
                views[w.name].copy_(self._vector(w, packed))


def _fill(layer: LayerSpec, layout: FlatLayout, source: WeightSource, start: int, stop: int, out: torch.Tensor) -> None:
    """Write the layer's flat elements [start, stop) into `out` (1-D, on CPU); padding becomes zeros."""
    out.zero_()
    for w in layer.weights:
        lo, hi = max(start, layout.offsets[w.name]), min(stop, layout.offsets[w.name] + w.numel)
        if lo < hi:
            base = layout.offsets[w.name]
            source.read(w, lo - base, hi - base, out[lo - start : hi - start])


class WeightHome:
    """Where one layer's weights live between uses, and how they come back to the compute device."""

    def __init__(self, layer: LayerSpec, tiers: TierSet, percents: tuple[float, float, float], dtype: torch.dtype,
                 source: WeightSource, quant: QuantConfig | None = None, pack_rows: int | None = None) -> None:
        """`pack_rows`: pack a layer used in place for GEMMs of about that many rows (see _pack_in_place)."""
        self.layer, self.tiers, self.dtype = layer, tiers, dtype
        self.layout = FlatLayout.of(layer, dtype)
        self.packed = PackedLayout.of(layer, dtype, quant) if quant is not None else None
        self.stored_dtype = torch.uint8 if self.packed else dtype
        page = ALIGN // self.stored_dtype.itemsize
        self.pieces: list[tuple[Tier, int, int, torch.Tensor | DiskTensor]] = []
        host = self.packed.encode(layer, source) if self.packed else None
        for tier, (start, stop) in split_elements(self.stored_numel, percents, page).items():
            stored = tiers.empty(tier, (stop - start,), self.stored_dtype, name=layer.label, lasting=True)
            self.pieces.append((tier, start, stop, stored))
            if host is None:
                self._populate(source, start, stop, stored)
            elif isinstance(stored, DiskTensor):
                stored.write_rows(host[start:stop])
            else:
                stored.copy_(host[start:stop])
        self.kernel_weights: dict[str, torch.Tensor] | None = None
        if pack_rows is not None and self.packed is None and self.stored_in_place and \
                any(w.is_linear for w in layer.weights):
            self._pack_in_place(pack_rows)

    def _pack_in_place(self, rows_hint: int) -> None:
        """Replace the in-place flat buffer by the matrices in oneDNN's layout (and copies of the small vectors).
        The flat tensor's storage is freed but the tensor kept, as FSDP frees parameters: the tier goes on counting
        its bytes, which the packed copy now occupies."""
        flat = self.pieces[0][3]
        assert isinstance(flat, torch.Tensor)
        views = self.layout.views(self.layer, flat)
        self.kernel_weights = {w.name: prepack.pack(views[w.name], rows_hint) if w.is_linear else views[w.name].clone()
                               for w in self.layer.weights}
        flat.untyped_storage().resize_(0)

    def _populate(self, source: WeightSource, start: int, stop: int, stored: torch.Tensor | DiskTensor) -> None:
        if not isinstance(stored, DiskTensor):
            if stored.device.type == "cpu":
                _fill(self.layer, self.layout, source, start, stop, stored)
            else:
                host = torch.empty(stop - start, dtype=self.dtype)
                _fill(self.layer, self.layout, source, start, stop, host)
                stored.copy_(host)
            return
        chunk = _FILL_CHUNK_BYTES // stored.row_nbytes
        buf = aligned_empty((min(chunk, stop - start),), self.dtype)
        for pos in range(start, stop, chunk):
            n = min(chunk, stop - pos)
            _fill(self.layer, self.layout, source, pos, pos + n, buf[:n])
            stored.write_rows(buf[:n], pos - start)

    @property
    def numel(self) -> int:
        """Elements of the layer's weights on the compute device (the staging buffer's size)."""
        return self.layout.numel

    @property
    def stored_numel(self) -> int:
        """Elements (of stored_dtype) the tiers hold: compressed bytes, or the compute-dtype weights."""
        return self.packed.nbytes if self.packed else self.layout.numel

    @property
    def stored_in_place(self) -> bool:
        """True when compute can read the stored buffer directly (no gathering copy)."""
        return len(self.pieces) == 1 and self.tiers.addressable(self.pieces[0][0])

    @property
    def needs_staging(self) -> bool:
        """True when the weights compute uses live in a staging buffer (gathered, or dequantized)."""
        return self.packed is not None or not self.stored_in_place

    def nbytes(self, tier: Tier) -> int:
        return sum((stop - start) for t, start, stop, _ in self.pieces if t is tier) * self.stored_dtype.itemsize

    def load(self, staging: torch.Tensor | None, packed_staging: torch.Tensor | None,
             bounce: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The layer's weights on the compute device. `staging`: flat compute-dtype buffer there (if needs_staging);
        `packed_staging`: byte buffer there to gather compressed pieces into (compressed, not stored_in_place);
        `bounce`: page-aligned pinned host buffer of stored_dtype for disk pieces when compute is a GPU."""
        return self.decode(self.fetch(staging, packed_staging, bounce), staging)

    def fetch(self, staging: torch.Tensor | None, packed_staging: torch.Tensor | None,
              bounce: torch.Tensor | None) -> torch.Tensor | None:
        """load's moving half: the stored buffer on the compute device (None where the kernel weights are ready)."""
        if self.kernel_weights is not None:
            return None
        return self._gather(packed_staging if self.packed else staging, bounce)

    def decode(self, stored: torch.Tensor | None, staging: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """load's computing half: the weights from fetch's buffer, dequantized into `staging` when compressed."""
        if stored is None:
            assert self.kernel_weights is not None
            return self.kernel_weights
        if self.packed is None:
            return self.layout.views(self.layer, stored)
        assert staging is not None
        with self.tiers.stats.timed("dequantize", Tier.GPU.value, Tier.GPU.value, self.numel * staging.element_size()):
            self.packed.decode(self.layer, stored, self.layout, staging)
        return self.layout.views(self.layer, staging)

    def _gather(self, dst: torch.Tensor | None, bounce: torch.Tensor | None) -> torch.Tensor:
        """The stored buffer on the compute device: in place, or its pieces copied into `dst`."""
        if self.stored_in_place:
            stored = self.pieces[0][3]
            assert isinstance(stored, torch.Tensor)
            return stored
        assert dst is not None
        item = dst.element_size()
        for tier, start, stop, stored in self.pieces:
            part = dst[start:stop]
            with self.tiers.stats.timed("weights", tier.value, Tier.GPU.value, (stop - start) * item):
                if not isinstance(stored, DiskTensor):
                    part.copy_(stored, non_blocking=True)
                elif part.device.type == "cpu":
                    stored.read_rows_into(part)  # straight into the staging buffer, O_DIRECT
                else:
                    assert bounce is not None
                    stored.read_rows_into(bounce[: stop - start])
                    part.copy_(bounce[: stop - start], non_blocking=True)
        return dst

    def release(self) -> None:
        for tier, _, _, stored in self.pieces:
            self.tiers.release(tier, stored)
        self.pieces = []
        self.kernel_weights = None
