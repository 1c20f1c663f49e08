"""A layer's weights as one flat buffer whose element ranges live on the tiers the policy gives them.

Packing a layer into one flat buffer makes any percentage split exact (to one page) for any layer shape, and makes
loading a layer a few large copies: each tier's piece lands in its slice of a staging buffer on the compute device,
and the weights are views of that buffer. A layer wholly on a compute-addressable tier is used in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_dist.memory.disk import ALIGN, DiskTensor, aligned_empty
from flexgen_dist.memory.placement import split_elements
from flexgen_dist.memory.tiers import Tier, TierSet
from flexgen_dist.models.layout import LayerSpec
from flexgen_dist.weights import WeightSource

_WEIGHT_ALIGN = 32  # elements: keeps every weight view SIMD-aligned inside the flat buffer
_FILL_CHUNK_BYTES = 64 << 20  # disk pieces are generated/copied through a bounded staging buffer


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
                 source: WeightSource) -> None:
        self.layer, self.tiers, self.dtype = layer, tiers, dtype
        self.layout = FlatLayout.of(layer, dtype)
        page = ALIGN // dtype.itemsize
        self.pieces: list[tuple[Tier, int, int, torch.Tensor | DiskTensor]] = []
        for tier, (start, stop) in split_elements(self.layout.numel, percents, page).items():
            stored = tiers.empty(tier, (stop - start,), dtype, name=layer.label)
            self.pieces.append((tier, start, stop, stored))
            self._populate(source, start, stop, stored)

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
        return self.layout.numel

    @property
    def in_place(self) -> bool:
        """True when compute can use the stored buffer directly (no staging copy)."""
        return len(self.pieces) == 1 and self.tiers.addressable(self.pieces[0][0])

    def nbytes(self, tier: Tier) -> int:
        return sum((stop - start) for t, start, stop, _ in self.pieces if t is tier) * self.dtype.itemsize

    def load(self, staging: torch.Tensor | None, bounce: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The layer's weights on the compute device. `staging`: flat buffer there (unless in_place);
        `bounce`: page-aligned pinned host buffer for disk pieces when compute is a GPU."""
        if self.in_place:
            return self.layout.views(self.layer, self.pieces[0][3])
        assert staging is not None
        item = staging.element_size()
        for tier, start, stop, stored in self.pieces:
            dst = staging[start:stop]
            with self.tiers.stats.timed("weights", tier.value, Tier.GPU.value, (stop - start) * item):
                if not isinstance(stored, DiskTensor):
                    dst.copy_(stored, non_blocking=True)
                elif dst.device.type == "cpu":
                    stored.read_rows_into(dst)  # straight into the staging buffer, O_DIRECT
                else:
                    assert bounce is not None
                    stored.read_rows_into(bounce[: stop - start])
                    dst.copy_(bounce[: stop - start], non_blocking=True)
        return self.layout.views(self.layer, staging)

    def release(self) -> None:
        for tier, _, _, stored in self.pieces:
            self.tiers.release(tier, stored)
        self.pieces = []
