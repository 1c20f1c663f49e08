"""OPT, one model family (models/family.py): the size table, the config reader, the weight layout and the pure
layer math.

Weights are arguments (dicts of tensors), never `nn.Parameter`s: the engine streams them through the memory tiers.
A linear weight may be oneDNN-packed (models/prepack.py); `linear` takes either.
No I/O and no placement here. Shapes: B batch, S query length, H hidden, E word-embedding dim, N heads, D head dim,
V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from flexgen_dist.base.errors import UserError
from flexgen_dist.models.layout import LayerSpec, WeightSpec, linear_weights, norm_weights
from flexgen_dist.models.prepack import linear

POSITION_OFFSET = 2  # OPT's learned positions are shifted by 2 (a fairseq legacy)

# relu in place on fc1's fresh output: one [tokens, ffn_dim] temporary, not two (OptConfig.ffn_temporaries).
ACTIVATIONS = {"relu": F.relu_, "gelu": F.gelu}


@dataclass(frozen=True)
class OptConfig:
    family: ClassVar[str] = "opt"
    ffn_temporaries: ClassVar[int] = 1  # [tokens, ffn_dim] tensors the MLP holds at once (fc1's output)
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    vocab_size: int = 50272
    max_positions: int = 2048
    word_embed_proj_dim: int | None = None  # None: same as hidden_size (every size except 350m)
    do_layer_norm_before: bool = True  # False: post-LayerNorm layers (350m)
    has_final_layer_norm: bool = True  # HF: do_layer_norm_before and not _remove_final_layer_norm
    activation: str = "relu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of one position's keys (and of its values) in the cache."""
        return self.hidden_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def projects_embeddings(self) -> bool:
        return self.embed_dim != self.hidden_size

    def layer_param_count(self) -> int:
        """Parameters of one decoder layer (attention + MLP, with biases and LayerNorms)."""
        h, f = self.hidden_size, self.ffn_dim
        return 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h

    def embedding_param_count(self) -> int:
        projections = 2 * self.embed_dim * self.hidden_size if self.projects_embeddings else 0
        return self.vocab_size * self.embed_dim + (self.max_positions + POSITION_OFFSET) * self.hidden_size + projections

    def param_count(self) -> int:
        return self.num_layers * self.layer_param_count() + self.embedding_param_count() + 2 * self.hidden_size

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int:
        """KV cache of all layers for `batch` sequences of `seq_len` positions."""
        return 2 * self.num_layers * batch * seq_len * self.hidden_size * dtype_bytes


def _size(name: str, hidden: int, layers: int, heads: int, **kw) -> OptConfig:
    return OptConfig(name=name, hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_dim=4 * hidden, **kw)


OPT_SIZES: dict[str, OptConfig] = {
    c.name: c
    for c in (
        _size("opt-125m", 768, 12, 12),
        _size("opt-350m", 1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False, has_final_layer_norm=False),
        _size("opt-1.3b", 2048, 24, 32),
        _size("opt-2.7b", 2560, 32, 32),
        _size("opt-6.7b", 4096, 32, 32),
        _size("opt-13b", 5120, 40, 40),
        _size("opt-30b", 7168, 48, 56),
        _size("opt-66b", 9216, 64, 72),
        _size("opt-175b", 12288, 96, 96),
    )
}


def hf_config(cfg: OptConfig) -> dict:
    """The config.json of an OPTForCausalLM checkpoint with these sizes (config_from_hf's inverse)."""
    return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "ffn_dim": cfg.ffn_dim,
            "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_positions,
            "do_layer_norm_before": cfg.do_layer_norm_before, "word_embed_proj_dim": cfg.embed_dim,
            "_remove_final_layer_norm": cfg.do_layer_norm_before and not cfg.has_final_layer_norm,
            "activation_function": cfg.activation, "enable_bias": True, "layer_norm_elementwise_affine": True,
            "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}


def config_from_hf(hf: dict, name: str) -> OptConfig:
    """An OptConfig from a checkpoint's config.json (as a dict)."""
    if hf.get("model_type", "opt") != "opt":
        raise UserError(f"{name}: model_type {hf.get('model_type')!r} is not 'opt'")
    if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
        raise UserError(f"{name}: OPT variants without biases or LayerNorm affine parameters are not supported")
    activation = hf.get("activation_function", "relu")
    if activation not in ACTIVATIONS:
        raise UserError(f"{name}: activation {activation!r} is not supported ({', '.join(ACTIVATIONS)})")
    try:
        pre_ln = bool(hf.get("do_layer_norm_before", True))
        cfg = OptConfig(
            name=name,
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            ffn_dim=int(hf["ffn_dim"]),
            vocab_size=int(hf["vocab_size"]),
            max_positions=int(hf.get("max_position_embeddings", 2048)),
            word_embed_proj_dim=int(hf.get("word_embed_proj_dim") or hf["hidden_size"]),
            do_layer_norm_before=pre_ln,
            has_final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
            activation=activation,
            pad_token_id=int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 1),
            bos_token_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 2),
            eos_token_id=int(hf.get("eos_token_id") if hf.get("eos_token_id") is not None else 2),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{name}: config.json lacks or mangles {e}") from None
    if cfg.hidden_size % cfg.num_heads:
        raise UserError(f"{name}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_heads}")
    if cfg.word_embed_proj_dim == cfg.hidden_size:
        cfg = replace(cfg, word_embed_proj_dim=None)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Weight layout: which weights each engine layer holds. Checkpoint keys are OPTForCausalLM's without "model.".


def _embed_layer(cfg: OptConfig) -> LayerSpec:
    weights = [
        WeightSpec("embed_tokens", (cfg.vocab_size, cfg.embed_dim), "decoder.embed_tokens.weight", "normal"),
        WeightSpec("embed_positions", (cfg.max_positions + POSITION_OFFSET, cfg.hidden_size),
                   "decoder.embed_positions.weight", "normal"),
    ]
    if cfg.projects_embeddings:
        weights.append(WeightSpec("project_in", (cfg.hidden_size, cfg.embed_dim), "decoder.project_in.weight", "normal"))
    return LayerSpec("embed", -1, tuple(weights))


def _attention_layer(cfg: OptConfig, i: int) -> LayerSpec:
    h, key = cfg.hidden_size, f"decoder.layers.{i}"
    weights = norm_weights("self_attn_layer_norm", f"{key}.self_attn_layer_norm", h)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        weights += linear_weights(proj, f"{key}.self_attn.{proj}", h, h)
    return LayerSpec("attention", i, weights)


def _mlp_layer(cfg: OptConfig, i: int) -> LayerSpec:
    h, f, key = cfg.hidden_size, cfg.ffn_dim, f"decoder.layers.{i}"
    weights = norm_weights("final_layer_norm", f"{key}.final_layer_norm", h)
    weights += linear_weights("fc1", f"{key}.fc1", f, h) + linear_weights("fc2", f"{key}.fc2", h, f)
    return LayerSpec("mlp", i, weights)


def _head_layer(cfg: OptConfig) -> LayerSpec:
    weights: list[WeightSpec] = []
    if cfg.has_final_layer_norm:
        weights += norm_weights("final_layer_norm", "decoder.final_layer_norm", cfg.hidden_size)
    if cfg.projects_embeddings:
        weights.append(WeightSpec("project_out", (cfg.embed_dim, cfg.hidden_size), "decoder.project_out.weight", "normal"))
    # The LM head is tied to the token embedding; a checkpoint's own lm_head.weight, when present, wins (weights.py).
    weights.append(WeightSpec("lm_head", (cfg.vocab_size, cfg.embed_dim), "decoder.embed_tokens.weight", "normal"))
    return LayerSpec("head", -1, tuple(weights))


def layers(cfg: OptConfig) -> list[LayerSpec]:
    """All engine layers of the model, in execution order."""
    out = [_embed_layer(cfg)]
    for i in range(cfg.num_layers):
        out += [_attention_layer(cfg, i), _mlp_layer(cfg, i)]
    return out + [_head_layer(cfg)]


# ---------------------------------------------------------------------------------------------------------------
# Layer math. `w` maps the short weight names of the layout above to tensors on the compute device.


def embed(cfg: OptConfig, w: dict[str, torch.Tensor], input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Token + learned position embeddings. input_ids, position_ids: [B, S] -> [B, S, H]."""
    tokens = F.embedding(input_ids, w["embed_tokens"])  # [B, S, E]
    if "project_in" in w:
        tokens = linear(tokens, w["project_in"])  # [B, S, H]
    return tokens + F.embedding(position_ids + POSITION_OFFSET, w["embed_positions"])


def _layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[prefix + ".weight"], w[prefix + ".bias"], eps)


def attention_positions(cfg: OptConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """OPT's positions enter once, as learned embeddings (embed); its attention layers take nothing of them, so the
    ids pass through as they are."""
    return position_ids


def attention_input(cfg: OptConfig, w: dict[str, torch.Tensor], hidden: torch.Tensor, positions: torch.Tensor):
    """Queries (pre-scaled), keys and values of a layer's self-attention. hidden [B, S, H] -> 3 x [B, N, S, D].
    OPT's positions are in its embeddings, so `positions` is not used here."""
    x = _layer_norm(hidden, w, "self_attn_layer_norm", cfg.layer_norm_eps) if cfg.do_layer_norm_before else hidden
    b, s, _ = x.shape
    scaling = cfg.head_dim**-0.5

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)

    # HF scales q after its bias; keep the order so float32 runs match token for token.
    q = linear(x, w["q_proj.weight"], w["q_proj.bias"]) * scaling
    k = linear(x, w["k_proj.weight"], w["k_proj.bias"])
    v = linear(x, w["v_proj.weight"], w["v_proj.bias"])
    return heads(q), heads(k), heads(v)


def attention_output(cfg: OptConfig, w: dict[str, torch.Tensor], hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Output projection, residual and (post-LN models) LayerNorm. context [B, N, S, D] -> [B, S, H]."""
    b, _, s, _ = context.shape
    out = linear(context.transpose(1, 2).reshape(b, s, cfg.hidden_size), w["out_proj.weight"], w["out_proj.bias"])
    out = hidden + out
    if not cfg.do_layer_norm_before:
        out = _layer_norm(out, w, "self_attn_layer_norm", cfg.layer_norm_eps)
    return out


def mlp(cfg: OptConfig, w: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The feed-forward half of a decoder layer with its residual. [B, S, H] -> [B, S, H]."""
    x = _layer_norm(hidden, w, "final_layer_norm", cfg.layer_norm_eps) if cfg.do_layer_norm_before else hidden
    x = ACTIVATIONS[cfg.activation](linear(x, w["fc1.weight"], w["fc1.bias"]))
    out = hidden + linear(x, w["fc2.weight"], w["fc2.bias"])
    if not cfg.do_layer_norm_before:
        out = _layer_norm(out, w, "final_layer_norm", cfg.layer_norm_eps)
    return out


def lm_head(cfg: OptConfig, w: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Final LayerNorm, output projection and the (tied) LM head, in float32. [B, S, H] -> [B, S, V]."""
    if cfg.has_final_layer_norm:
        hidden = _layer_norm(hidden, w, "final_layer_norm", cfg.layer_norm_eps)
    if "project_out" in w:
        hidden = linear(hidden, w["project_out"])
    return linear(hidden, w["lm_head"]).float()
