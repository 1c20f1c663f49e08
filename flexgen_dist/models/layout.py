"""Which weights each engine layer holds, as plain data.

The engine streams "layers" at FlexGen's granularity: the input embedding, then each decoder layer as two layers
(self-attention, MLP) so the double-buffered weights are half a decoder layer, then the head. A pipeline stage is a
contiguous slice of this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flexgen_dist.models.opt import POSITION_OFFSET, OptConfig

LayerKind = Literal["embed", "attention", "mlp", "head"]
EMBEDDING_TABLES = ("embed_tokens", "embed_positions")  # looked up by index; the head's tied copy is "lm_head"


@dataclass(frozen=True)
class WeightSpec:
    name: str  # the name the layer math uses, e.g. "q_proj.weight"
    shape: tuple[int, ...]
    checkpoint_key: str  # canonical key without the "model." prefix, e.g. "decoder.layers.3.self_attn.q_proj.weight"
    init: Literal["normal", "ones", "zeros"]  # for dummy weights: LayerNorm scales 1, biases 0, matrices random

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


def _linear(prefix: str, key: str, out_dim: int, in_dim: int) -> tuple[WeightSpec, WeightSpec]:
    return (
        WeightSpec(f"{prefix}.weight", (out_dim, in_dim), f"{key}.weight", "normal"),
        WeightSpec(f"{prefix}.bias", (out_dim,), f"{key}.bias", "zeros"),
    )


def _layer_norm(prefix: str, key: str, dim: int) -> tuple[WeightSpec, WeightSpec]:
    return (
        WeightSpec(f"{prefix}.weight", (dim,), f"{key}.weight", "ones"),
        WeightSpec(f"{prefix}.bias", (dim,), f"{key}.bias", "zeros"),
    )


def embed_layer(cfg: OptConfig) -> LayerSpec:
    weights = [
        WeightSpec("embed_tokens", (cfg.vocab_size, cfg.embed_dim), "decoder.embed_tokens.weight", "normal"),
        WeightSpec("embed_positions", (cfg.max_positions + POSITION_OFFSET, cfg.hidden_size),
                   "decoder.embed_positions.weight", "normal"),
    ]
    if cfg.projects_embeddings:
        weights.append(WeightSpec("project_in", (cfg.hidden_size, cfg.embed_dim), "decoder.project_in.weight", "normal"))
    return LayerSpec("embed", -1, tuple(weights))


def attention_layer(cfg: OptConfig, i: int) -> LayerSpec:
    h, key = cfg.hidden_size, f"decoder.layers.{i}"
    weights = _layer_norm("self_attn_layer_norm", f"{key}.self_attn_layer_norm", h)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        weights += _linear(proj, f"{key}.self_attn.{proj}", h, h)
    return LayerSpec("attention", i, weights)


def mlp_layer(cfg: OptConfig, i: int) -> LayerSpec:
    h, f, key = cfg.hidden_size, cfg.ffn_dim, f"decoder.layers.{i}"
    weights = _layer_norm("final_layer_norm", f"{key}.final_layer_norm", h)
    weights += _linear("fc1", f"{key}.fc1", f, h) + _linear("fc2", f"{key}.fc2", h, f)
    return LayerSpec("mlp", i, weights)


def head_layer(cfg: OptConfig) -> LayerSpec:
    weights: list[WeightSpec] = []
    if cfg.has_final_layer_norm:
        weights += _layer_norm("final_layer_norm", "decoder.final_layer_norm", cfg.hidden_size)
    if cfg.projects_embeddings:
        weights.append(WeightSpec("project_out", (cfg.embed_dim, cfg.hidden_size), "decoder.project_out.weight", "normal"))
    # The LM head is tied to the token embedding; a checkpoint's own lm_head.weight, when present, wins (weights.py).
    weights.append(WeightSpec("lm_head", (cfg.vocab_size, cfg.embed_dim), "decoder.embed_tokens.weight", "normal"))
    return LayerSpec("head", -1, tuple(weights))


def model_layers(cfg: OptConfig) -> list[LayerSpec]:
    """All engine layers of the model, in execution order."""
    layers = [embed_layer(cfg)]
    for i in range(cfg.num_layers):
        layers += [attention_layer(cfg, i), mlp_layer(cfg, i)]
    return layers + [head_layer(cfg)]
