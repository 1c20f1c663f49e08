"""The roofline of a generation run: the least time the hardware profile allows for its work, and the fraction of it
a measured run achieved.

Four roofs, each the run's work over the profile's best measured rate: compute (matmul and attention FLOPs at the
best GEMM rate of the dtype), device memory (weights read once per GPU batch per step, plus the KV cache each decode
step reads), the disk (bytes the run moved from and to the disk tier) and the CPU<->device link (bytes it moved
between the memory tiers). The bound is the largest: the run could at best overlap everything else behind it."""

from __future__ import annotations

from dataclasses import dataclass

from flexgen_dist.base.devices import DTYPES
from flexgen_dist.models.family import ModelConfig, model_layers
from flexgen_dist.policy.hardware import HardwareProfile


@dataclass(frozen=True)
class Workload:
    num_seqs: int
    prompt_len: int
    gen_len: int
    gpu_batch_size: int  # sequences that share one read of the weights in a matmul


def generation_flops(cfg: ModelConfig, w: Workload) -> float:
    """Useful FLOPs: layer matmuls for every position, causal attention, and the LM head for each new token."""
    def weights(kinds: tuple[str, ...]) -> int:  # multiply-adds per token: the matrices the layers multiply by
        return sum(o * i for layer in model_layers(cfg) if layer.kind in kinds for o, i in layer.linear_shapes)

    positions = w.prompt_len + w.gen_len - 1  # the last new token is sampled, never fed back
    matmul = 2 * weights(("attention", "mlp")) * positions
    q_dim = cfg.num_heads * cfg.head_dim
    prefill_attention = 2 * w.prompt_len * w.prompt_len * q_dim  # QK^T and PV over the causal half
    decode_attention = sum(4 * (w.prompt_len + t) * q_dim for t in range(1, w.gen_len))
    attention = (prefill_attention + decode_attention) * cfg.num_layers
    head = 2 * weights(("head",)) * w.gen_len
    return float(w.num_seqs * (matmul + attention + head))


def device_memory_bytes(cfg: ModelConfig, w: Workload, dtype_bytes: int) -> float:
    """Bytes decode must read from device memory at least: every weight once per GPU batch per step, and the cache."""
    batches = -(-w.num_seqs // w.gpu_batch_size)
    weights = cfg.param_count() * dtype_bytes * batches * (w.gen_len - 1)
    cache = sum(cfg.cache_bytes(w.num_seqs, w.prompt_len + t, dtype_bytes) for t in range(1, w.gen_len))
    return float(weights + cache)


def moved_bytes(transfers: dict[str, dict]) -> tuple[float, float, float]:
    """(disk reads, disk writes, CPU<->device bytes) from a run summary's `transfers` ("kind:src->dst")."""
    disk_read = disk_write = link = 0.0
    for key, flow in transfers.items():
        src, dst = key.split(":", 1)[1].split("->")
        if src == "disk":
            disk_read += flow["bytes"]
        elif dst == "disk":
            disk_write += flow["bytes"]
        elif {src, dst} == {"cpu", "gpu"}:
            link += flow["bytes"]
    return disk_read, disk_write, link


def peak_flops(hardware: HardwareProfile, dtype: str) -> float:
    speeds = hardware.speeds(dtype)
    return max(max(points.values()) for points in speeds.gemm_flops.values())


def roofline(cfg: ModelConfig, w: Workload, hardware: HardwareProfile, dtype: str, transfers: dict[str, dict],
             measured_s: float) -> dict:
    """`dtype`: the compute dtype's name ("float16", …); `transfers`: the run summary's, {} for none."""
    dtype_bytes = DTYPES[dtype].itemsize
    disk_read, disk_write, link = moved_bytes(transfers)
    roofs = {
        "compute": generation_flops(cfg, w) / peak_flops(hardware, dtype),
        "device_memory": device_memory_bytes(cfg, w, dtype_bytes) / hardware.memory_bytes_per_s,
        "disk": disk_read / hardware.disk_read_bytes_per_s + disk_write / hardware.disk_write_bytes_per_s,
        "link": link / hardware.host_to_device_bytes_per_s,
    }
    bound_by = max(roofs, key=roofs.get)
    return {"roofs_s": {k: round(v, 4) for k, v in roofs.items()}, "bound_by": bound_by,
            "bound_s": round(roofs[bound_by], 4), "achieved_fraction": round(roofs[bound_by] / measured_s, 4),
            "hardware": hardware.name}
