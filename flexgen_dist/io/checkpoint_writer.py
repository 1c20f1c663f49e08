"""Writing a random checkpoint of a real size as HF safetensors shards (our dummy weights, saved): what the
offloaded baselines (HF accelerate) and our engine both read when they are compared on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.io.weights import DummyWeights, hf_key
from flexgen_dist.models.family import ModelConfig, family_of, model_layers

SHARD_BYTES = 2 << 30  # at most one shard is in RAM while writing


def write_random_checkpoint(cfg: ModelConfig, directory: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """Our seeded dummy weights in `dtype`, as the family's *ForCausalLM safetensors shards with an index and
    config.json."""
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
        shard[hf_key(key)] = tensor.view(w.shape)
        shard_bytes += tensor.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(w.numel for w in weights.values()) * torch.finfo(dtype).bits // 8
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    dtype_name = str(dtype).removeprefix("torch.")  # "dtype" since transformers 4.56, "torch_dtype" before
    config = {**family_of(cfg).hf_config(cfg), "dtype": dtype_name, "torch_dtype": dtype_name}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory
