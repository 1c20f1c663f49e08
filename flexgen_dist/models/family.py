"""The model families the engine runs, and the one interface each implements.

A family is a module (models/opt.py, models/llama.py) that holds everything family-specific: its config class and
size table, its config reader and writer, its per-layer weight layout (names, shapes, checkpoint keys) and its layer
math as pure functions. Everything else (placement, the zig-zag schedule, compression, the policy search, the Ray
pipeline) sees only the `ModelConfig` attributes and the `ModelFamily` functions below, and the KV cache shape they
imply: [batch, num_kv_heads, positions, head_dim] per attention layer. Attention itself is shared (attention.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.models import llama, opt
from flexgen_dist.models.layout import LayerSpec


class ModelConfig(Protocol):
    """What the engine, the policy search and the I/O read of any family's config."""

    family: str  # a key of FAMILIES
    ffn_temporaries: int  # [tokens, ffn_dim] tensors the MLP holds at once (for workspace sizing)
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int  # query heads
    ffn_dim: int
    vocab_size: int
    max_positions: int
    pad_token_id: int
    bos_token_id: int

    @property
    def num_kv_heads(self) -> int: ...  # key/value heads: what the cache holds (fewer than num_heads under GQA)

    @property
    def head_dim(self) -> int: ...

    @property
    def kv_dim(self) -> int: ...  # num_kv_heads * head_dim: one position's keys in the cache

    @property
    def embed_dim(self) -> int: ...  # the width of the token embedding and the LM head

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def param_count(self) -> int: ...

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int: ...


class ModelFamily(Protocol):
    """The functions a family module defines. Weights `w` map a layer's short names (layers()) to tensors."""

    def config_from_hf(self, hf: dict, name: str) -> ModelConfig: ...

    def hf_config(self, cfg: ModelConfig) -> dict: ...

    def layers(self, cfg: ModelConfig) -> list[LayerSpec]: ...

    def embed(self, cfg: ModelConfig, w: dict, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor: ...

    # What every attention layer of a step takes of its position ids [B, S] (Llama: the rotary cos and sin), made
    # once a step, not once a layer. Its first dimension is the batch: the engine takes rows of it and joins GPU
    # batches' along it.
    def attention_positions(self, cfg: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ...

    def attention_input(self, cfg: ModelConfig, w: dict, hidden: torch.Tensor, positions: torch.Tensor): ...

    def attention_output(self, cfg: ModelConfig, w: dict, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...

    def mlp(self, cfg: ModelConfig, w: dict, hidden: torch.Tensor) -> torch.Tensor: ...

    def lm_head(self, cfg: ModelConfig, w: dict, hidden: torch.Tensor) -> torch.Tensor: ...


FAMILIES: dict[str, ModelFamily] = {"opt": opt, "llama": llama}
SIZES: dict[str, ModelConfig] = {**opt.OPT_SIZES, **llama.LLAMA_SIZES}
_MODEL_TYPES = {"opt": opt, **{t: llama for t in llama.ARCHITECTURES}}  # config.json's model_type -> family
_MIXTURES = ("num_local_experts", "num_experts", "n_routed_experts")  # config keys of mixture-of-experts models


def family_of(cfg: ModelConfig) -> ModelFamily:
    return FAMILIES[cfg.family]


def model_layers(cfg: ModelConfig) -> list[LayerSpec]:
    """All engine layers of the model, in execution order."""
    return family_of(cfg).layers(cfg)


def config_by_name(name: str) -> ModelConfig:
    """A named size (dummy weights): opt-1.3b, llama-3.1-8b, …; a repo prefix (facebook/, …) is ignored."""
    key = name.lower().rsplit("/", 1)[-1]
    if key not in SIZES:
        raise UserError(f"unknown model {name!r}: expected one of {', '.join(SIZES)} or a checkpoint directory")
    return SIZES[key]


def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """A checkpoint's config.json (as a dict), read by its family; one line naming what is not supported."""
    model_type = hf.get("model_type", "opt")
    if any(hf.get(k) for k in _MIXTURES):
        raise UserError(f"{name}: mixture-of-experts models ({model_type}) are not supported")
    if model_type not in _MODEL_TYPES:
        raise UserError(f"{name}: model_type {model_type!r} is not supported (supported: {', '.join(_MODEL_TYPES)})")
    return _MODEL_TYPES[model_type].config_from_hf(hf, name)
