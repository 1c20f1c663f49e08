"""vLLM as a bench baseline: the peer a throughput-minded user would pick instead of us. It runs in its own virtual
environment (vLLM pins its own torch; launch/setup_vllm.sh makes .venv-vllm), through vllm_runner.py, on the same
prompts and the same model: a size name becomes a config.json that vLLM fills with its own dummy weights
(`load_format="dummy"`, as our --dummy-weights: throughput does not depend on the values, EOS being ignored), a
checkpoint directory is read as it is."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

from flexgen_dist.base.devices import DTYPES
from flexgen_dist.base.errors import UserError
from flexgen_dist.bench.baselines import BaselineSpec
from flexgen_dist.memory.budget import format_bytes
from flexgen_dist.models.family import ModelConfig, family_of

PYTHON_ENV = "FLEXGEN_VLLM_PYTHON"
SETUP_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"  # where launch/setup_vllm.sh installs it
SETUP_HINT = "bash launch/setup_vllm.sh installs it in .venv-vllm"
# vLLM's CPU attention kernels take these head sizes only (its CPU build refuses others at load).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_python(explicit: str | None = None) -> str | None:
    """The interpreter that has vLLM: --vllm-python, else $FLEXGEN_VLLM_PYTHON, else the .venv-vllm that
    launch/setup_vllm.sh makes beside this checkout, else this one if it can import vllm; None where there is none."""
    given = explicit or os.environ.get(PYTHON_ENV)
    if given:
        if not (shutil.which(given) or Path(given).is_file()):
            raise UserError(f"--vllm-python {given}: no such interpreter")
        return given
    beside = SETUP_VENV / "bin" / "python"
    if beside.is_file():
        return str(beside)
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """The KV cache vLLM is given: `batch` sequences of `seq_len` positions, rounded up to 16-token pages, and a
    64 MiB margin, so that it never preempts a sequence (vLLM sizes the cache from this, not from the model)."""
    pages = math.ceil(seq_len / 16) * 16
    return cfg.cache_bytes(batch, pages, dtype_bytes) + (64 << 20)


def why_not(cfg: ModelConfig, device: str, batch: int, seq_len: int, dtype: str, memory_limit: int | None) -> str:
    """Why vLLM cannot run this point, or "" where it can."""
    head_size = cfg.head_dim
    if device == "cpu" and head_size not in CPU_HEAD_SIZES:
        return f"vLLM's CPU attention takes head sizes {', '.join(map(str, CPU_HEAD_SIZES))}, not {head_size}"
    dtype_bytes = DTYPES[dtype].itemsize
    need = cfg.param_count() * dtype_bytes + kv_cache_bytes(cfg, batch, seq_len, dtype_bytes)
    if device == "cpu" and memory_limit is not None and need > memory_limit:
        # its CPU build has no weight offload: the weights and the cache live in memory
        return f"does not fit: needs {format_bytes(need)} resident (weights and KV cache), budget {format_bytes(memory_limit)}"
    return ""


def vllm_command(python: str, spec: BaselineSpec, cfg: ModelConfig, tmp: Path) -> list[str]:
    """The command that runs vLLM on the spec's prompts, at most spec.batch_size sequences at a time; its files (the
    runner's spec, a dummy model's config.json) are written under `tmp`."""
    if Path(spec.model).is_dir():
        model_dir, load_format = spec.model, "auto"
    else:
        model_dir, load_format = str(tmp / "model"), "dummy"
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        # vLLM picks its model class by the config's "architectures".
        (Path(model_dir) / "config.json").write_text(json.dumps({**family_of(cfg).hf_config(cfg), "dtype": spec.dtype}))
    seq_len = max(map(len, spec.prompts)) + spec.gen_len
    # On a GPU the memory budget is the device's: what does not fit of the weights goes to vLLM's CPU offload.
    weights = cfg.param_count() * DTYPES[spec.dtype].itemsize
    offload = max(0, weights - spec.max_memory["gpu"]) if spec.device == "cuda" and "gpu" in spec.max_memory else 0
    runner_spec = {"model": model_dir, "load_format": load_format, "prompts": spec.prompts, "gen_len": spec.gen_len,
                   "max_num_seqs": spec.batch_size, "dtype": spec.dtype, "cpu_offload_bytes": offload,
                   "kv_cache_bytes": kv_cache_bytes(cfg, spec.batch_size, seq_len, DTYPES[spec.dtype].itemsize)}
    path = tmp / "vllm-spec.json"
    path.write_text(json.dumps(runner_spec))
    return [python, str(Path(__file__).with_name("vllm_runner.py")), str(path)]
