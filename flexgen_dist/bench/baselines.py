"""What users would otherwise run, on the same work: HF transformers `generate` with every weight resident, and HF
accelerate's big-model offload (`device_map` with `max_memory` and `offload_folder`, the FlexGen paper's baseline).

Each baseline runs in its own process (`python -m flexgen_dist.bench.baselines SPEC.json`), so neither it nor our engine
inherits the other's memory; the bench driver (bench.py) starts it and reads one JSON line back."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexgen_dist.models.family import ModelConfig, family_of

SYSTEMS = ("hf", "accelerate", "vllm")  # vllm runs in its own interpreter: vllm_baseline.py


@dataclass(frozen=True)
class BaselineSpec:
    system: str  # "hf" (resident) or "accelerate" (offloaded)
    model: str  # a size name (random weights, hf only) or a checkpoint directory
    prompts: list[list[int]]
    gen_len: int
    batch_size: int
    device: str
    dtype: str
    max_memory: dict[str, int]  # accelerate: {"gpu"|"cpu": bytes} for the weights it keeps in memory
    offload_dir: str  # accelerate's offload folder is made (and removed) under it


def _hf_config(cfg: ModelConfig):
    """The transformers config of one of our model configs, for random weights of its size."""
    from transformers import AutoConfig

    fields = dict(family_of(cfg).hf_config(cfg))
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _load(spec: BaselineSpec, cfg: ModelConfig | None, offload_folder: str):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec.dtype)
    device = torch.device(spec.device)
    if spec.system == "accelerate":
        max_memory = {("cpu" if tier == "cpu" else 0): size for tier, size in spec.max_memory.items()}
        if device.type == "cpu":  # accelerate counts a CPU run's memory as "cpu" only
            max_memory = {"cpu": sum(spec.max_memory.values())}
        return AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype, device_map="auto", max_memory=max_memory,
                                              offload_folder=offload_folder,
                                              offload_state_dict=True)
    if cfg is None:
        return AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype).to(device)
    torch.manual_seed(0)
    with device:  # random weights drawn where they live: no host copy of the whole model
        return AutoModelForCausalLM.from_config(_hf_config(cfg), dtype=dtype)


def run_baseline(spec: BaselineSpec, cfg: ModelConfig | None = None) -> dict:
    """Greedy, exactly gen_len new tokens per prompt (EOS ignored), in batches of batch_size. Times the generate
    calls only (loading excluded, as for our engine). `cfg`: random weights of that size instead of a checkpoint."""
    Path(spec.offload_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="accelerate-", dir=spec.offload_dir) as folder:  # removed afterwards
        start = time.perf_counter()
        model = _load(spec, cfg, folder).eval()
        load_s = time.perf_counter() - start
        result = _time_generate(spec, model)
    return {**result, "load_s": load_s, "disk_offload_bytes": _disk_offloaded_bytes(model)}


def _disk_offloaded_bytes(model) -> int:
    """Parameter bytes accelerate left on disk (its device map says "disk"; safetensors are read in place)."""
    on_disk = [name for name, where in (getattr(model, "hf_device_map", None) or {}).items() if where == "disk"]
    shapes = dict(model.named_parameters(remove_duplicate=False))  # offloaded ones are meta tensors of the right shape
    return sum(p.numel() * p.element_size() for name, p in shapes.items()
               if any(name == m or name.startswith(m + ".") for m in on_disk))


def _time_generate(spec: BaselineSpec, model) -> dict:
    input_device = next(model.parameters()).device if spec.system == "hf" else torch.device(spec.device)
    generated, elapsed, latencies = 0, 0.0, []
    with torch.inference_mode():
        for i in range(0, len(spec.prompts), spec.batch_size):
            ids = torch.tensor(spec.prompts[i : i + spec.batch_size], device=input_device)
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=spec.gen_len, min_new_tokens=spec.gen_len,
                                 pad_token_id=model.config.pad_token_id)
            if input_device.type == "cuda":
                torch.cuda.synchronize()
            latencies.append(time.perf_counter() - start)
            elapsed += latencies[-1]
            generated += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"system": spec.system, "batch_size": spec.batch_size, "generated_tokens": generated, "total_s": elapsed,
            "latency_s": max(latencies), "generation_throughput_tok_s": generated / elapsed}


def spec_json(spec: BaselineSpec) -> str:
    return json.dumps(asdict(spec))


def main(argv: list[str]) -> int:
    from flexgen_dist.io.model_source import model_config

    spec = BaselineSpec(**json.loads(Path(argv[0]).read_text()))
    cfg = None if Path(spec.model).is_dir() else model_config(spec.model)
    print(json.dumps(run_baseline(spec, cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
