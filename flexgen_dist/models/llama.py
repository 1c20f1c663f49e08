"""The Llama family (Llama 2/3, Mistral, Qwen2), one model family (models/family.py): the size table, the config
reader, the weight layout and the pure layer math.

RMSNorm, rotary position embeddings (with linear or Llama 3 frequency scaling), a SwiGLU MLP and grouped-query
attention: n key/value heads shared by N query heads, so the KV cache holds n heads. Mistral is Llama without
sliding windows here; Qwen2 adds q/k/v biases. Shapes: B batch, S query length, H hidden, N query heads, n key/value
heads, D head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from flexgen_dist.base.errors import UserError
from flexgen_dist.models.layout import LayerSpec, WeightSpec, linear_weights, norm_weights
from flexgen_dist.models.prepack import linear

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class RopeScaling:
    """How a checkpoint stretches its rotary frequencies past the context it was trained on."""

    kind: str  # "linear": every frequency / factor; "llama3": low frequencies / factor, a smooth ramp between
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    family: ClassVar[str] = "llama"
    ffn_temporaries: ClassVar[int] = 2  # [tokens, ffn_dim] tensors the MLP holds at once (gate and up)
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_positions: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (Llama's attention_bias)
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
    mlp_bias: bool = False
    model_type: str = "llama"  # "llama", "mistral" or "qwen2": the HF class a checkpoint of it is written as
    pad_token_id: int = 0  # padding is masked, so any id works; HF pads with EOS where a config names no pad
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)

    @property
    def embed_dim(self) -> int:
        return self.hidden_size

    @property
    def kv_dim(self) -> int:
        """Width of one position's keys (and of its values) in the cache."""
        return self.num_kv_heads * self.head_dim

    def layer_param_count(self) -> int:
        """Parameters of one decoder layer (attention + MLP, with norms and biases)."""
        h, q, kv, f = self.hidden_size, self.num_heads * self.head_dim, self.kv_dim, self.ffn_dim
        biases = (q + 2 * kv) * (self.qkv_bias or self.attention_bias) + h * self.attention_bias
        return 2 * h + 2 * h * q + 2 * h * kv + biases + 3 * h * f + (2 * f + h) * self.mlp_bias

    def param_count(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_param_count() + embeddings + self.hidden_size

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int:
        """KV cache of all layers for `batch` sequences of `seq_len` positions: key/value heads only."""
        return 2 * self.num_layers * batch * seq_len * self.kv_dim * dtype_bytes


_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA3 = dict(vocab_size=128256, max_positions=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
               bos_token_id=128000, eos_token_ids=(128001,), pad_token_id=128001)
_MISTRAL = dict(vocab_size=32768, max_positions=32768, rope_theta=1e6, model_type="mistral", pad_token_id=2)
_QWEN25 = dict(vocab_size=152064, max_positions=32768, rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
               model_type="qwen2", bos_token_id=151643, eos_token_ids=(151643,), pad_token_id=151643)

LLAMA_SIZES: dict[str, LlamaConfig] = {
    c.name: c
    for c in (
        LlamaConfig("llama-3.2-1b", 2048, 16, 32, 8, 8192, head_dim=64, tie_word_embeddings=True,
                    **{**_LLAMA3, "rope_scaling": RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)}),
        LlamaConfig("llama-3.1-8b", 4096, 32, 32, 8, 14336, head_dim=128, **_LLAMA3),
        LlamaConfig("llama-3.1-70b", 8192, 80, 64, 8, 28672, head_dim=128, **_LLAMA3),
        LlamaConfig("mistral-7b", 4096, 32, 32, 8, 14336, head_dim=128, **_MISTRAL),
        LlamaConfig("qwen2.5-7b", 3584, 28, 28, 4, 18944, head_dim=128, **_QWEN25),
    )
}


def _rope_scaling(hf: dict, name: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either config format: transformers 5's `rope_parameters`, or the older top-level
    `rope_theta` with a `rope_scaling` dict."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UserError(f"{name}: partial rotary embeddings (partial_rotary_factor) are not supported")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                                  float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    raise UserError(f"{name}: rope scaling {kind!r} is not supported (default, linear, llama3)")


def _refuse_unsupported(hf: dict, name: str) -> None:
    """One line naming a feature this engine's math does not have, before anything is loaded."""
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", hf.get("model_type") == "mistral")
    if uses_window and window is not None and int(window) < int(hf.get("max_position_embeddings", 0) or 0):
        raise UserError(f"{name}: sliding-window attention (window {window}) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{name}: activation {hf.get('hidden_act')!r} is not supported (silu)")
    if hf.get("layer_types") and any(t != "full_attention" for t in hf["layer_types"]):
        raise UserError(f"{name}: per-layer attention types other than full attention are not supported")


def config_from_hf(hf: dict, name: str) -> LlamaConfig:
    """A LlamaConfig from a Llama, Mistral or Qwen2 checkpoint's config.json (as a dict)."""
    model_type = hf.get("model_type")
    _refuse_unsupported(hf, name)
    try:
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [2]))
        theta, scaling = _rope_scaling(hf, name)
        cfg = LlamaConfig(
            name=name,
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            ffn_dim=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            max_positions=int(hf.get("max_position_embeddings", 2048)),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)) and model_type == "llama",
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)) and model_type == "llama",
            model_type=model_type,
            pad_token_id=int(hf["pad_token_id"]) if hf.get("pad_token_id") is not None else eos_ids[0],
            bos_token_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1),
            eos_token_ids=eos_ids,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{name}: config.json lacks or mangles {e}") from None
    if cfg.num_heads % cfg.num_kv_heads:
        raise UserError(f"{name}: num_attention_heads {cfg.num_heads} is not a multiple of num_key_value_heads "
                        f"{cfg.num_kv_heads}")
    return cfg


def hf_config(cfg: LlamaConfig) -> dict:
    """The config.json of an HF checkpoint with these sizes (config_from_hf's inverse)."""
    rope = {"rope_type": "default"} if cfg.rope_scaling is None else {
        "rope_type": cfg.rope_scaling.kind, "factor": cfg.rope_scaling.factor,
        **({"low_freq_factor": cfg.rope_scaling.low_freq_factor, "high_freq_factor": cfg.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": cfg.rope_scaling.original_max_positions}
           if cfg.rope_scaling.kind == "llama3" else {})}
    out = {"architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_dim,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.rms_norm_eps,
           "rope_theta": cfg.rope_theta, "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
           "tie_word_embeddings": cfg.tie_word_embeddings, "pad_token_id": cfg.pad_token_id,
           "bos_token_id": cfg.bos_token_id,
           "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)}
    if cfg.model_type == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    else:  # Mistral's and Qwen2's configs carry a window; none here
        out.update(sliding_window=None, use_sliding_window=False)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Weight layout: which weights each engine layer holds. Checkpoint keys are HF's without "model.".


def _attention_layer(cfg: LlamaConfig, i: int) -> LayerSpec:
    h, key = cfg.hidden_size, f"layers.{i}"
    q_dim, bias = cfg.num_heads * cfg.head_dim, cfg.attention_bias or cfg.qkv_bias
    weights = norm_weights("input_layernorm", f"{key}.input_layernorm", h, bias=False)
    weights += linear_weights("q_proj", f"{key}.self_attn.q_proj", q_dim, h, bias)
    weights += linear_weights("k_proj", f"{key}.self_attn.k_proj", cfg.kv_dim, h, bias)
    weights += linear_weights("v_proj", f"{key}.self_attn.v_proj", cfg.kv_dim, h, bias)
    weights += linear_weights("o_proj", f"{key}.self_attn.o_proj", h, q_dim, cfg.attention_bias)
    return LayerSpec("attention", i, weights)


def _mlp_layer(cfg: LlamaConfig, i: int) -> LayerSpec:
    h, f, key = cfg.hidden_size, cfg.ffn_dim, f"layers.{i}"
    weights = norm_weights("post_attention_layernorm", f"{key}.post_attention_layernorm", h, bias=False)
    weights += linear_weights("gate_proj", f"{key}.mlp.gate_proj", f, h, cfg.mlp_bias)
    weights += linear_weights("up_proj", f"{key}.mlp.up_proj", f, h, cfg.mlp_bias)
    weights += linear_weights("down_proj", f"{key}.mlp.down_proj", h, f, cfg.mlp_bias)
    return LayerSpec("mlp", i, weights)


def layers(cfg: LlamaConfig) -> list[LayerSpec]:
    """All engine layers of the model, in execution order."""
    h = cfg.hidden_size
    out = [LayerSpec("embed", -1, (WeightSpec("embed_tokens", (cfg.vocab_size, h), "embed_tokens.weight", "normal"),))]
    for i in range(cfg.num_layers):
        out += [_attention_layer(cfg, i), _mlp_layer(cfg, i)]
    # A tied head reads the token embedding; an untied one its own lm_head.weight (weights.py prefers that key).
    head_key = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    head = norm_weights("norm", "norm", h, bias=False) + (WeightSpec("lm_head", (cfg.vocab_size, h), head_key, "normal"),)
    return out + [LayerSpec("head", -1, head)]


# ---------------------------------------------------------------------------------------------------------------
# Layer math. `w` maps the short weight names of the layout above to tensors on the compute device.


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, scaled in the input's dtype (HF's order, so float32 runs match token for token)."""
    x32 = x.float()
    return scale * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _inverse_frequencies(cfg: LlamaConfig, device: torch.device) -> torch.Tensor:
    """Rotary frequencies [D/2] float32, scaled as the checkpoint says."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(device, torch.float32) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # Llama 3: wavelengths beyond the trained context are stretched by `factor`, short ones kept, a ramp between.
    wavelen = 2 * math.pi / inv
    low, high = s.original_max_positions / s.low_freq_factor, s.original_max_positions / s.high_freq_factor
    scaled = torch.where(wavelen > low, inv / s.factor, inv)
    ramp = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - ramp) * scaled / s.factor + ramp * scaled
    return torch.where((wavelen >= high) & (wavelen <= low), smoothed, scaled)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def embed(cfg: LlamaConfig, w: dict[str, torch.Tensor], input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings; positions enter at every attention layer, as rotations. [B, S] -> [B, S, H]."""
    return F.embedding(input_ids, w["embed_tokens"])


def attention_positions(cfg: LlamaConfig, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rotary cos and sin of position_ids [B, S] (attention.position_ids: correct under left padding), in the
    compute dtype: [B, 2, S, D]. Every attention layer of a step rotates by the same angles, so they are made once."""
    freqs = position_ids[..., None].float() * _inverse_frequencies(cfg, position_ids.device)  # [B, S, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
    return torch.cat((angles.cos(), angles.sin()), dim=1).to(dtype)


def attention_input(cfg: LlamaConfig, w: dict[str, torch.Tensor], hidden: torch.Tensor, rotary: torch.Tensor):
    """Queries (rotated, pre-scaled) [B, N, S, D], and rotated keys and values [B, n, S, D], of a layer's
    self-attention. rotary [B, 2, S, D]: attention_positions' cos and sin."""
    x = _rms_norm(hidden, w["input_layernorm.weight"], cfg.rms_norm_eps)
    b, s, _ = x.shape

    def heads(name: str, count: int) -> torch.Tensor:
        return linear(x, w[f"{name}.weight"], w.get(f"{name}.bias")).view(b, s, count, cfg.head_dim).transpose(1, 2)

    cos, sin = rotary.split(1, dim=1)  # [B, 1, S, D] each, broadcast over the heads
    q = _rotate(heads("q_proj", cfg.num_heads), cos, sin) * cfg.head_dim**-0.5
    return q, _rotate(heads("k_proj", cfg.num_kv_heads), cos, sin), heads("v_proj", cfg.num_kv_heads)


def attention_output(cfg: LlamaConfig, w: dict[str, torch.Tensor], hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Output projection and residual. context [B, N, S, D] -> [B, S, H]."""
    b, heads, s, d = context.shape
    return hidden + linear(context.transpose(1, 2).reshape(b, s, heads * d), w["o_proj.weight"], w.get("o_proj.bias"))


def mlp(cfg: LlamaConfig, w: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The SwiGLU feed-forward half of a decoder layer with its residual. [B, S, H] -> [B, S, H]."""
    x = _rms_norm(hidden, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    # In place on the projections' fresh outputs: gate and up are the only [tokens, ffn_dim] tensors held at once
    # (ffn_temporaries), not a third for the product.
    gate = F.silu(linear(x, w["gate_proj.weight"], w.get("gate_proj.bias")), inplace=True)
    gate.mul_(linear(x, w["up_proj.weight"], w.get("up_proj.bias")))
    return hidden + linear(gate, w["down_proj.weight"], w.get("down_proj.bias"))


def lm_head(cfg: LlamaConfig, w: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm and the LM head, in float32. [B, S, H] -> [B, S, V]."""
    return linear(_rms_norm(hidden, w["norm.weight"], cfg.rms_norm_eps), w["lm_head"]).float()
