"""Which weights each engine layer holds, as plain data, for every model family.

The engine streams "layers" at FlexGen's granularity: the input embedding, then each decoder layer as two layers
(self-attention, MLP) so the double-buffered weights are half a decoder layer, then the head. A pipeline stage is a
contiguous slice of this list. Each family (models/family.py) lists its own layers with these specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LayerKind = Literal["embed", "attention", "mlp", "head"]
EMBEDDING_TABLES = ("embed_tokens", "embed_positions")  # looked up by index; the head's tied copy is "lm_head"


@dataclass(frozen=True)
class WeightSpec:
    name: str  # the name the layer math uses, e.g. "q_proj.weight"
    shape: tuple[int, ...]
    checkpoint_key: str  # the HF key without its "model." prefix, e.g. "decoder.layers.3.self_attn.q_proj.weight"
    init: Literal["normal", "ones", "zeros"]  # for dummy weights: norm scales 1, biases 0, matrices random

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_linear(self) -> bool:
        """A matrix the math only multiplies by (not an embedding table it indexes)."""
        return len(self.shape) == 2 and self.name not in EMBEDDING_TABLES


@dataclass(frozen=True)
class LayerSpec:
    kind: LayerKind
    decoder_index: int  # the decoder layer this belongs to; -1 for embed and head
    weights: tuple[WeightSpec, ...]

    @property
    def numel(self) -> int:
        return sum(w.numel for w in self.weights)

    @property
    def label(self) -> str:
        return self.kind if self.decoder_index < 0 else f"{self.kind}{self.decoder_index}"

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every matrix the layer multiplies by: its GEMMs, for the cost model and the roofline."""
        return [w.shape for w in self.weights if w.is_linear]


def linear_weights(prefix: str, key: str, out_dim: int, in_dim: int, bias: bool = True) -> tuple[WeightSpec, ...]:
    weight = WeightSpec(f"{prefix}.weight", (out_dim, in_dim), f"{key}.weight", "normal")
    return (weight, WeightSpec(f"{prefix}.bias", (out_dim,), f"{key}.bias", "zeros")) if bias else (weight,)


def norm_weights(prefix: str, key: str, dim: int, bias: bool = True) -> tuple[WeightSpec, ...]:
    """A LayerNorm's scale and bias, or (bias=False) an RMSNorm's scale."""
    scale = WeightSpec(f"{prefix}.weight", (dim,), f"{key}.weight", "ones")
    return (scale, WeightSpec(f"{prefix}.bias", (dim,), f"{key}.bias", "zeros")) if bias else (scale,)
