"""Where weights come from: HF checkpoint directories (read lazily, tensor by tensor) or seeded dummy weights.

Both sources fill any element range of a layer's flat buffer (memory/weight_home.py), so a layer is never whole in
RAM unless it lives there: a dummy opt-175b can be generated straight onto disk.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Protocol

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.models.family import ModelConfig, config_from_hf, model_layers
from flexgen_dist.models.layout import LayerSpec, WeightSpec

DUMMY_STD = 0.02
_CHUNK = 1 << 22  # dummy weights are seeded per chunk, so any range can be generated without the whole tensor


class WeightSource(Protocol):
    def read(self, weight: WeightSpec, start: int, stop: int, out: torch.Tensor) -> None:
        """Fill `out` (1-D, stop - start elements, target dtype) with the flattened weight's elements [start, stop)."""


class DummyWeights:
    """Seeded random weights: matrices uniform with std DUMMY_STD, LayerNorm scales 1, biases 0.

    One table of _CHUNK random values is drawn per run and dtype, on the compute device; each chunk of a matrix is
    that table rotated and sign-flipped by a seed of (weight, chunk). Filling is a memory copy: drawing every element
    took 49 s of an opt-6.7b load. Any range can be filled alone, and every placement gets the same weights."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.seed, self.device = seed, torch.device(device)
        self._tables: dict[torch.dtype, torch.Tensor] = {}

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._tables:
            bound = DUMMY_STD * 3**0.5
            gen = torch.Generator(self.device)
            gen.manual_seed(self.seed)
            table = torch.empty(_CHUNK, dtype=dtype, device=self.device)
            self._tables[dtype] = table.uniform_(-bound, bound, generator=gen)
        return self._tables[dtype]

    def read(self, weight: WeightSpec, start: int, stop: int, out: torch.Tensor) -> None:
        if weight.init != "normal":
            out.fill_(1.0 if weight.init == "ones" else 0.0)
            return
        table = self._table(out.dtype)
        pos = start
        while pos < stop:
            chunk = pos // _CHUNK
            take = min(stop, (chunk + 1) * _CHUNK) - pos
            draw = zlib.crc32(f"{self.seed}/{weight.checkpoint_key}/{chunk}".encode())
            # Element i of the chunk is table[(shift + i) % _CHUNK]: at most two contiguous slices of the table.
            first = (draw + pos - chunk * _CHUNK) % _CHUNK
            head = min(take, _CHUNK - first)
            dst = out[pos - start : pos - start + take]
            dst[:head].copy_(table[first : first + head])
            dst[head:].copy_(table[: take - head])
            if draw >> 31:
                dst.neg_()
            pos += take


def _canonical(key: str) -> str:
    """Checkpoints name weights `decoder.…` (OPTModel) or `model.decoder.…` (OPTForCausalLM, and `model.layers.…` for
    the Llama family); only an untied head is `lm_head.weight`, outside `model.`."""
    return key.removeprefix("model.")


def hf_key(canonical: str) -> str:
    """The key a *ForCausalLM checkpoint writes for a canonical key: _canonical's inverse."""
    return canonical if canonical.startswith("lm_head.") else f"model.{canonical}"


class CheckpointWeights:
    """An HF checkpoint directory of any supported family: safetensors (memory-mapped) or pytorch_model*.bin (weights_only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, Path] = {}  # canonical key -> file
        self._open: dict[Path, object] = {}
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
        if not files:
            raise UserError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
        for f in files:
            for key in self._handle(f).keys():
                self._files[_canonical(key)] = f
        self._raw_keys = {f: {_canonical(k): k for k in self._handle(f).keys()} for f in files}

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._open[f] = safe_open(str(f), framework="pt")
                else:
                    # weights_only: never unpickle arbitrary objects; mmap: tensors stay on disk until read.
                    self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # truncated or foreign files raise many types; all mean "unreadable"
                raise UserError(f"{f}: unreadable checkpoint file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return self._open[f]

    def _key_for(self, weight: WeightSpec) -> str:
        if weight.name == "lm_head" and "lm_head.weight" in self._files:
            return "lm_head.weight"
        return weight.checkpoint_key

    def _tensor(self, key: str) -> torch.Tensor:
        f = self._files[key]
        handle, raw = self._handle(f), self._raw_keys[f][key]
        try:
            return handle.get_tensor(raw) if f.suffix == ".safetensors" else handle[raw]
        except Exception as e:
            raise UserError(f"{f}: cannot read tensor {raw} ({type(e).__name__})") from None

    def shape(self, weight: WeightSpec) -> tuple[int, ...] | None:
        key = self._key_for(weight)
        if key not in self._files:
            return None
        f = self._files[key]
        if f.suffix == ".safetensors":
            return tuple(self._handle(f).get_slice(self._raw_keys[f][key]).get_shape())
        return tuple(self._handle(f)[self._raw_keys[f][key]].shape)

    def validate(self, layers: list[LayerSpec]) -> None:
        """Every weight present with the configured shape, checked before anything is loaded."""
        for layer in layers:
            for w in layer.weights:
                shape = self.shape(w)
                if shape is None:
                    raise UserError(f"{self.directory}: checkpoint lacks {w.checkpoint_key} (missing or truncated checkpoint)")
                if shape != w.shape:
                    raise UserError(f"{self.directory}: {self._key_for(w)} has shape {list(shape)}, config says {list(w.shape)}")

    def read(self, weight: WeightSpec, start: int, stop: int, out: torch.Tensor) -> None:
        flat = self._tensor(self._key_for(weight)).reshape(-1)
        out.copy_(flat[start:stop])


def load_checkpoint_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory}: no config.json (not an HF checkpoint directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable config ({e})") from None
    return config_from_hf(hf, directory.name)


def open_checkpoint(directory: Path) -> tuple[ModelConfig, CheckpointWeights]:
    """Config and a validated weight source for a checkpoint directory."""
    cfg = load_checkpoint_config(directory)
    source = CheckpointWeights(directory)
    source.validate(model_layers(cfg))
    return cfg, source
