"""A hardware profile: the measured constants the cost model needs, as plain data read from and written to YAML.

Throughputs are per compute dtype because they differ by 400x on some CPUs (bf16 without AVX512-BF16). GEMM
throughput is a table over the number of rows (tokens) multiplied, which covers prefill-shaped GEMMs (many rows,
compute bound) and decode-shaped ones (a few rows, bound by reading the weight) with one curve.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from flexgen_dist.base.errors import UserError
from flexgen_dist.base.typed_fields import known_keys, mapping, typed


def _log_interpolate(points: list[tuple[int, float]], x: float) -> float:
    """y at x from (x, y) points sorted by x, interpolated in log-log, flat beyond the ends."""
    xs = [math.log(px) for px, _ in points]
    lx = math.log(max(x, 1))
    i = bisect.bisect_left(xs, lx)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    t = (lx - xs[i - 1]) / (xs[i] - xs[i - 1])
    return math.exp((1 - t) * math.log(points[i - 1][1]) + t * math.log(points[i][1]))


def gemm_shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


@dataclass(frozen=True)
class DtypeSpeeds:
    """Compute throughputs of one dtype on the compute device (and on the CPU, for CPU attention)."""

    # Weight shape "OUTxIN" -> {rows: FLOP/s of F.linear([rows, IN], [OUT, IN])}. Measured per shape because CPU
    # GEMM kernels differ by 2x between an OPT layer's square, widening and narrowing matrices at equal FLOPs.
    gemm_flops: dict[str, dict[int, float]]
    attention_flops: float  # FLOP/s of prefill attention (softmax(Q K^T) V over the prompt)
    decode_attention_bytes_per_s: float  # decode attention over a KV cache on the device: cache bytes read per s
    cpu_decode_attention_bytes_per_s: float  # the same computed by the CPU on a CPU-tier cache
    dequantize_elements_per_s: float  # 4-bit group-wise codes -> this dtype, on the device
    # The same table for weights packed once into the kernel's layout (models/prepack.py: resident bf16 weights on
    # a CPU device); empty where the engine does not pack.
    packed_gemm_flops: dict[str, dict[int, float]] = field(default_factory=dict)

    def gemm_seconds(self, out_features: int, in_features: int, rows: int, packed: bool = False) -> float:
        """Time of F.linear (or, `packed` where measured, of the packed kernel) on `rows` rows with an [out, in]
        weight: the measured shape nearest in log size on each side, its throughput interpolated in log(rows)."""
        def distance(key: str) -> float:
            o, i = (int(v) for v in key.split("x"))
            return abs(math.log(o / out_features)) + abs(math.log(i / in_features))

        tables = self.packed_gemm_flops if packed and self.packed_gemm_flops else self.gemm_flops
        table = tables[min(tables, key=distance)]
        rate = _log_interpolate(sorted(table.items()), rows)
        return 2 * rows * out_features * in_features / rate


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: str  # "cuda" or "cpu": the compute device the throughputs were measured on
    device_memory_bytes: int  # on a CPU device this is the CPU memory itself (the two memory tiers share it)
    cpu_memory_bytes: int
    disk_bytes: int
    host_to_device_bytes_per_s: float  # CPU tier -> compute device (a memory copy on a CPU device)
    device_to_host_bytes_per_s: float
    disk_read_bytes_per_s: float  # O_DIRECT, the engine's own disk path
    disk_write_bytes_per_s: float
    memory_bytes_per_s: float  # the compute device's own copy bandwidth (elementwise ops, staging copies)
    dtypes: dict[str, DtypeSpeeds] = field(default_factory=dict)
    # CPU seconds the kernel spends per byte read with O_DIRECT: on a CPU compute device they are taken from compute.
    disk_read_cpu_seconds_per_byte: float = 0.0
    # The share of the shorter of compute and disk reads hidden under the longer when both run (1: fully; a 2-core
    # CPU device whose compute threads spin on both cores starves the reading threads), in a prefill window (long
    # compute-bound GEMMs) and in a decode window (short GEMMs of a few rows, leaving the cores free between them).
    compute_io_overlap: float = 1.0
    decode_compute_io_overlap: float = 1.0
    # Seconds a step spends per layer window, and per GPU batch in a window, beyond the math (the engine's bookkeeping
    # and the dispatch of a layer's small kernels): on a CPU device they take the cores that compute.
    layer_overhead_s: float = 0.0
    batch_layer_overhead_s: float = 0.0
    cache_codec_overhead_s: float = 0.0  # per GPU batch in an attention window with a compressed (4-bit) cache

    def overlap(self, decode: bool) -> float:
        return self.decode_compute_io_overlap if decode else self.compute_io_overlap
    note: str = ""

    @property
    def shared_memory(self) -> bool:
        """On a CPU device the "gpu" and "cpu" tiers are the same RAM, and copies between them use the cores that
        compute: they cannot overlap compute the way DMA copies to a GPU do."""
        return self.device == "cpu"

    def speeds(self, dtype: str) -> DtypeSpeeds:
        if dtype not in self.dtypes:
            raise UserError(f"hardware profile {self.name!r} has no {dtype} throughputs (measured: "
                            f"{', '.join(self.dtypes) or 'none'}); run `flexgen-dist profile --dtype {dtype}`")
        return self.dtypes[dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_from_mapping(data: Any, where: str) -> HardwareProfile:
    data = mapping(data, where)
    names = [f.name for f in fields(HardwareProfile)]
    known_keys(data, names, where)
    optional = ("dtypes", "note", "disk_read_cpu_seconds_per_byte", "compute_io_overlap", "decode_compute_io_overlap",
                "layer_overhead_s", "batch_layer_overhead_s", "cache_codec_overhead_s")
    missing = [n for n in names if n not in data and n not in optional]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    kinds = {"name": str, "device": str, "note": str, "device_memory_bytes": int, "cpu_memory_bytes": int,
             "disk_bytes": int}
    values: dict[str, Any] = {}
    for name in names:
        if name == "dtypes" or name not in data:
            continue
        value = typed(data[name], kinds.get(name, float), f"{where}.{name}")
        if name != "note" and name not in ("name", "device") and value < 0:
            raise UserError(f"{where}.{name}: must not be negative, got {value}")
        values[name] = value
    for name in ("compute_io_overlap", "decode_compute_io_overlap"):
        if values.get(name, 1.0) > 1:
            raise UserError(f"{where}.{name}: a share, 0 to 1, got {values[name]}")
    if values["device"] not in ("cuda", "cpu"):
        raise UserError(f"{where}.device: expected cuda or cpu, got {values['device']!r}")
    dtypes = {}
    for dtype, speeds in mapping(data.get("dtypes", {}), f"{where}.dtypes").items():
        dtypes[str(dtype)] = _speeds_from_mapping(speeds, f"{where}.dtypes.{dtype}")
    return HardwareProfile(**values, dtypes=dtypes)


def _speeds_from_mapping(data: Any, where: str) -> DtypeSpeeds:
    data = mapping(data, where)
    names = [f.name for f in fields(DtypeSpeeds)]
    known_keys(data, names, where)
    tables = ("gemm_flops", "packed_gemm_flops")
    missing = [n for n in names if n not in data and n != "packed_gemm_flops"]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    gemm = _gemm_table(data["gemm_flops"], f"{where}.gemm_flops")
    if not gemm:
        raise UserError(f"{where}.gemm_flops: expected at least one weight shape")
    packed = _gemm_table(data.get("packed_gemm_flops", {}), f"{where}.packed_gemm_flops")
    scalars = {n: typed(data[n], float, f"{where}.{n}") for n in names if n not in tables}
    for n, v in scalars.items():
        if v <= 0:
            raise UserError(f"{where}.{n}: must be positive, got {v}")
    return DtypeSpeeds(gemm_flops=gemm, packed_gemm_flops=packed, **scalars)


def _gemm_table(data: Any, where: str) -> dict[str, dict[int, float]]:
    gemm = {}
    for shape, table in mapping(data, where).items():
        at = f"{where}.{shape}"
        if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", str(shape)):
            raise UserError(f"{at}: expected a weight shape OUTxIN such as 4096x4096")
        rows = {typed(r, int, at): typed(v, float, f"{at}.{r}") for r, v in mapping(table, at).items()}
        if not rows or min(rows) < 1 or min(rows.values()) <= 0:
            raise UserError(f"{at}: expected rows >= 1 mapped to positive FLOP/s")
        gemm[str(shape)] = rows
    return gemm


def load_profile(path: str | Path) -> HardwareProfile:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"hardware profile {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"hardware profile {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return profile_from_mapping(data, f"hardware profile {path}")


def profile_yaml(profile: HardwareProfile) -> str:
    import yaml

    return yaml.safe_dump(profile.to_dict(), sort_keys=False)


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    text = profile_yaml(profile)
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise UserError(f"cannot write hardware profile {path}: {e.strerror}") from None


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit (v2 memory.max or v1 memory.limit_in_bytes, the tightest along its path),
    or None without one. psutil reports the machine's RAM; a container or `memlimit` run may have much less."""
    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    places = []
    for _, controllers, rel in (parts for parts in lines if len(parts) == 3):
        if "memory" in controllers.split(","):  # v1
            places.append((Path(root, "memory"), rel, "memory.limit_in_bytes"))
        elif controllers == "":  # v2
            places.append((Path(root), rel, "memory.max"))
    limits = []
    for base, rel, name in places:
        path = base / rel.lstrip("/")
        while True:
            try:
                text = (path / name).read_text().strip()
                if text != "max" and int(text) < 1 << 60:  # v1 writes "unlimited" as a huge number
                    limits.append(int(text))
            except (OSError, ValueError):
                pass
            if path == base or path == path.parent:
                break
            path = path.parent
    return min(limits) if limits else None


def detect_capacities(device: str, offload_dir: str | None) -> tuple[int, int, int]:
    """(device memory, CPU memory, free disk) in bytes on this machine, for the current process."""
    import psutil

    cpu = psutil.virtual_memory().total
    limit = cgroup_memory_limit()
    if limit is not None:
        cpu = min(cpu, limit)
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu = cpu
    root = Path(offload_dir) if offload_dir else Path(tempfile.gettempdir())
    while not root.exists() and root != root.parent:
        root = root.parent
    disk = shutil.disk_usage(root).free if os.access(root, os.R_OK) else 0
    return gpu, cpu, disk
