"""Writing a random OPT checkpoint of a real size as HF safetensors shards (our dummy weights, saved): what the
offloaded baselines (HF accelerate) and our engine both read when they are compared on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.io.weights import DummyWeights
from flexgen_dist.models.layout import model_layers
from flexgen_dist.models.opt import OptConfig

SHARD_BYTES = 2 << 30  # at most one shard is in RAM while writing


def hf_config(cfg: OptConfig):
    """The transformers OPTConfig of one of our model configs."""
    from transformers import OPTConfig

    return OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                     ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
                     do_layer_norm_before=cfg.do_layer_norm_before, word_embed_proj_dim=cfg.embed_dim,
                     _remove_final_layer_norm=cfg.do_layer_norm_before and not cfg.has_final_layer_norm,
                     pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


def write_random_checkpoint(cfg: OptConfig, directory: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """Our seeded dummy weights in `dtype`, as OPTForCausalLM safetensors shards with an index and config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.glob("*.safetensors")):
        raise UserError(f"{directory}: already holds a checkpoint; choose an empty directory")
    source = DummyWeights(seed)
    weights = {w.checkpoint_key: w for layer in model_layers(cfg) for w in layer.weights}  # the tied head once
    index: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_count = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, shard_count
        name = f"model-{shard_count + 1:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        index.update({key: name for key in shard})
        shard, shard_bytes, shard_count = {}, 0, shard_count + 1

    for key, w in weights.items():
        tensor = torch.empty(w.numel, dtype=dtype)
        source.read(w, 0, w.numel, tensor)
        shard[f"model.{key}"] = tensor.view(w.shape)
        shard_bytes += tensor.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(w.numel for w in weights.values()) * torch.finfo(dtype).bits // 8
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    config = hf_config(cfg)
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)  # renamed in transformers 4.56
    config.save_pretrained(str(directory))
    return directory
