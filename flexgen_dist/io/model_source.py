"""Resolving `--model`: a size name with dummy weights, or an HF checkpoint directory with its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.io.weights import DummyWeights, WeightSource, load_checkpoint_config, open_checkpoint
from flexgen_dist.models.family import ModelConfig, config_by_name

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


@dataclass
class ModelSource:
    config: ModelConfig
    weights: WeightSource
    tokenizer: object | None  # a transformers tokenizer, when the checkpoint ships one


def load_tokenizer(directory: Path) -> object | None:
    if not any((directory / f).exists() for f in _TOKENIZER_FILES):
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: tokenizers come from the directory only
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # transformers raises many types for a broken tokenizer; all mean the same to the user
        raise UserError(f"{directory}: unreadable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def model_config(model: str) -> ModelConfig:
    """The model's configuration, without touching its weights or tokenizer (for synthetic prompts)."""
    path = Path(model).expanduser()
    return load_checkpoint_config(path) if path.is_dir() else config_by_name(model)


def resolve_model(model: str, dummy_weights: bool, seed: int, device: torch.device | str = "cpu") -> ModelSource:
    """`device`: where dummy weights are drawn (the compute device of whoever reads them)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if dummy_weights:
            return ModelSource(load_checkpoint_config(path), DummyWeights(seed, device), load_tokenizer(path))
        cfg, weights = open_checkpoint(path)
        return ModelSource(cfg, weights, load_tokenizer(path))
    if path.exists() or os.sep in model:
        raise UserError(f"--model {model}: not a checkpoint directory")
    cfg = config_by_name(model)
    if not dummy_weights:
        raise UserError(f"--model {model}: no weights can be downloaded here; pass a checkpoint directory or --dummy-weights")
    return ModelSource(cfg, DummyWeights(seed, device), None)
