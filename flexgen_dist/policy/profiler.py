"""`flexgen-dist profile`: measure this machine's hardware constants with the engine's own kernels and I/O path.

Every figure is timed with the code the engine runs (model math from models/, the quantizer's dequantization,
DiskTensor's O_DIRECT reads and writes), so the cost model predicts the engine rather than an idealized machine.
"""

from __future__ import annotations

import itertools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from flexgen_dist.base.devices import dtype_name
from flexgen_dist.memory.compression import QuantConfig, dequantize_into, quantize
from flexgen_dist.memory.disk import ALIGN, DiskTensor, aligned_empty
from flexgen_dist.memory.tiers import ensure_offload_root
from flexgen_dist.models import opt, prepack
from flexgen_dist.models.attention import attend, attention_mask
from flexgen_dist.policy.hardware import DtypeSpeeds, HardwareProfile, detect_capacities, gemm_shape_key

GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
HEAD_ROWS = GEMM_ROWS[:-1]  # the LM head multiplies one row per sequence
DEFAULT_HIDDEN = (2048, 4096)  # opt-1.3b and opt-6.7b; the cost model uses the nearest measured shape
VOCAB = 50272
_COLD_BYTES = 512 << 20  # weights rotated through per GEMM measurement: well past any last-level cache
_MIN_SECONDS = 0.3  # time each figure over at least this long (and at least 2 runs)


@dataclass(frozen=True)
class ProfileScope:
    """What a profile measures and within how much memory. `flexgen-dist profile` measures broadly (two hidden
    sizes, 2 GiB disk rounds); a run's stages measure their own model's shapes within the run's budget, in well under
    a minute (issue 19: the broad profile took 2 min 38 s and 4.6 GB, and a first auto run under `memlimit 3G`
    thrashed)."""

    hidden_sizes: tuple[int, ...] = DEFAULT_HIDDEN
    memory_bytes: int = 4 << 30  # the most the measurements hold at once
    disk_sample_bytes: int = 2 << 30  # written and read per disk round
    min_seconds: float = _MIN_SECONDS  # each figure timed over at least this long (and at least 2 runs)
    overlap_rounds: int = 5  # the compute/disk overlap is the median of this many measurements (it wanders)
    overhead_rounds: int = 2  # the step overhead is the least of this many engine runs
    probe_hidden: int = DEFAULT_HIDDEN[0]  # the step-overhead probe's layers are at most this wide

    @classmethod
    def for_run(cls, hidden_size: int, memory_bytes: int) -> ProfileScope:
        """A stage's scope, about 35 s on one core of the AVX2 EPYC measured here (the broad one: 93 s at one hidden
        size, the disk's 47 s of it): its model's layer shapes within `memory_bytes`, disk rounds in proportion to
        it and at most 512 MiB, half the timing window, one round of the overlap and the step overhead, the latter
        on layers at most 1024 wide (its two layers of 2048 took 28 s to build and run 7 times)."""
        disk = min(512 << 20, max(64 << 20, memory_bytes)) // (4 * ALIGN) * 4 * ALIGN
        return cls((hidden_size,), memory_bytes, disk, _MIN_SECONDS / 2, overlap_rounds=1, overhead_rounds=1,
                   probe_hidden=min(hidden_size, 1024))

    @property
    def cold_bytes(self) -> int:
        """Weights rotated through per GEMM measurement: well past any last-level cache, a quarter of the memory."""
        return min(_COLD_BYTES, self.memory_bytes // 4)

    @property
    def copy_bytes(self) -> int:
        """Bytes per copy measurement (three buffers of it on a CPU device)."""
        return max(ALIGN, min(1 << 30, self.disk_sample_bytes, self.memory_bytes // 8) // ALIGN * ALIGN)


def _timed(fn: Callable[[], object], sync: Callable[[], None], min_seconds: float = _MIN_SECONDS) -> float:
    """Mean seconds per run over at least `min_seconds` and 2 runs, after one warm-up run."""
    fn()
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and runs >= 2:
            return elapsed / runs


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _cold_copies(weight: torch.Tensor, cold_bytes: int = _COLD_BYTES) -> list[torch.Tensor]:
    """Copies of `weight` that together exceed any last-level cache: GEMMs rotating through them read their weight
    from memory, as the engine does (it uses each weight once per GPU batch), never from a warm cache."""
    return [weight] + [weight.clone() for _ in range(-(-cold_bytes // weight.nbytes) - 1)]


def gemm_shapes(hidden_sizes: tuple[int, ...]) -> list[tuple[int, int, tuple[int, ...]]]:
    """(out, in, rows) of the matrices of OPT layers with these hidden sizes: q/k/v/out, fc1, fc2, LM head."""
    shapes = []
    for h in hidden_sizes:
        shapes += [(h, h, GEMM_ROWS), (4 * h, h, GEMM_ROWS), (h, 4 * h, GEMM_ROWS), (VOCAB, h, HEAD_ROWS)]
    return shapes


def measure_gemm(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
                 rows_list: tuple[int, ...], max_run_seconds: float = 2.0, packed: bool = False,
                 scope: ProfileScope = ProfileScope()) -> dict[int, float]:
    """FLOP/s of F.linear per row count; `packed`: of the kernel the engine runs on weights packed for that many
    rows (prepack.py). Stops early (flat beyond) where one run would take over `max_run_seconds` (bf16 on a CPU
    without bf16 instructions)."""
    # Warm in the cache, small-row GEMMs would look several times faster than the engine ever sees them.
    weights = _cold_copies(torch.randn(out_features, in_features, device=device).to(dtype), scope.cold_bytes)
    turn = itertools.count()
    table: dict[int, float] = {}
    for rows in rows_list:
        if table and 2 * rows * out_features * in_features / max(table.values()) > max_run_seconds:
            break
        x = torch.randn(rows, in_features, device=device).to(dtype)
        used = [prepack.pack(w, rows) for w in weights] if packed else weights
        seconds = _timed(lambda: prepack.linear(x, used[next(turn) % len(used)]), _sync(device), scope.min_seconds)
        table[rows] = 2 * rows * out_features * in_features / seconds
    return table


def measure_prefill_attention(device: torch.device, dtype: torch.dtype, scope: ProfileScope = ProfileScope()) -> float:
    batch, heads, seq, head_dim = 4, 16, 256, 64
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device).to(dtype) for _ in range(3))
    mask = attention_mask(torch.ones(batch, seq, dtype=torch.bool, device=device), seq)
    seconds = _timed(lambda: attend(q, k, v, mask), _sync(device), scope.min_seconds)
    return 4 * batch * heads * seq * seq * head_dim / seconds


def measure_decode_attention(device: torch.device, dtype: torch.dtype, scope: ProfileScope = ProfileScope()) -> float:
    """Cache bytes (K and V) read per second by one decode step's attention."""
    batch, heads, length, head_dim = 8, 32, 512, 64
    q = torch.randn(batch, heads, 1, head_dim, device=device).to(dtype)
    k, v = (torch.randn(batch, heads, length, head_dim, device=device).to(dtype) for _ in range(2))
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=device)
    seconds = _timed(lambda: attend(q, k, v, mask), _sync(device), scope.min_seconds)
    return 2 * k.numel() * k.element_size() / seconds


def measure_dequantize(device: torch.device, dtype: torch.dtype, scope: ProfileScope = ProfileScope()) -> float:
    """Elements per second of 4-bit codes dequantized into this dtype, codes and outputs rotated out of the cache
    as the engine's are (it dequantizes each layer once per use, into a staging buffer)."""
    x = torch.randn(2048, 2048)
    packed = quantize(x, QuantConfig(4, 64, 0))
    packed = type(packed)(packed.codes.to(device), packed.scale.to(device), packed.minimum.to(device), packed.shape,
                          packed.config)
    copies = -(-scope.cold_bytes // packed.codes.nbytes)
    sources = [type(packed)(packed.codes.clone(), packed.scale.clone(), packed.minimum.clone(), packed.shape,
                            packed.config) for _ in range(copies)]
    outs = _cold_copies(torch.empty(x.shape, dtype=dtype, device=device), scope.cold_bytes)
    turn = itertools.count()

    def one() -> None:
        i = next(turn)
        dequantize_into(sources[i % len(sources)], outs[i % len(outs)])

    return x.numel() / _timed(one, _sync(device), scope.min_seconds)


def measure_copy(src: torch.Tensor, dst: torch.Tensor, min_seconds: float = _MIN_SECONDS) -> float:
    """Bytes per second of dst.copy_(src) (pinned host <-> device, or a plain memory copy)."""
    device = dst.device if dst.device.type == "cuda" else src.device
    seconds = _timed(lambda: dst.copy_(src, non_blocking=True), _sync(device), min_seconds)
    return src.numel() * src.element_size() / seconds


def measure_disk(offload_dir: str | None, nbytes: int = 512 << 20, files: int = 4) -> tuple[float, float, float]:
    """(read, write) bytes per second through DiskTensor, the engine's O_DIRECT path, and the CPU seconds spent per
    byte read: `files` files of `nbytes` written, then read back in turn, total bytes over total time. A working set
    of several GiB keeps a virtual disk's host-side cache from passing for the disk (reads of one small file ran 40%
    faster than the engine's)."""
    root = ensure_offload_root(offload_dir)
    buf = aligned_empty((nbytes,), torch.uint8)
    # Random bytes (storage may treat repeated blocks specially), one MiB of them tiled: random_ on the whole buffer
    # took ~3 s per 512 MiB on one core.
    tile = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    for start in range(0, nbytes, tile.numel()):
        piece = buf[start:start + tile.numel()]
        piece.copy_(tile[:piece.numel()])
    tensors = []
    try:
        start = time.perf_counter()
        for i in range(files):
            tensors.append(DiskTensor(root / f"flexgen-profile-{time.time_ns()}-{i}.bin", (nbytes,), torch.uint8))
            tensors[-1].write_rows(buf)
        write = files * nbytes / (time.perf_counter() - start)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(2):
            for t in tensors:
                t.read_rows_into(buf)
        read = 2 * files * nbytes / (time.perf_counter() - start)
        cpu_per_byte = (time.process_time() - cpu_start) / (2 * files * nbytes)
    finally:
        for t in tensors:
            t.delete()
    return read, write, cpu_per_byte


def measure_compute_io_overlap(offload_dir: str | None, nbytes: int = 1 << 30, rows: int = 256,
                               compute_share: float = 1.0, layers: int = 8, cold_bytes: int = _COLD_BYTES) -> float:
    """The share of the shorter of (GEMMs, O_DIRECT disk reads) hidden under the longer, timed in the engine's own
    rhythm: `layers` layers of nbytes / layers each; per layer the main thread waits for its weights, hands the next
    layer's read to a lane thread, and computes `rows`-row GEMMs over weights rotated out of the cache for about
    `compute_share` of a layer's read time (256 rows as long as the read: a prefill window; a few rows for a third
    of it: a decode window). 1 where compute and reads share nothing; lower where compute threads spinning on every
    core starve the reading ones."""
    from concurrent.futures import ThreadPoolExecutor

    root = ensure_offload_root(offload_dir)
    layer_bytes = nbytes // layers // ALIGN * ALIGN
    staging = [aligned_empty((layer_bytes,), torch.uint8) for _ in range(2)]
    staging[0].random_(0, 255)
    x = torch.randn(rows, 2048)
    weights = _cold_copies(torch.randn(8192, 2048), cold_bytes)
    files: list[DiskTensor] = []
    lane = ThreadPoolExecutor(1, thread_name_prefix="flexgen-profile-lane")

    def step(gemms: int, read: bool) -> float:
        start = time.perf_counter()
        pending = lane.submit(files[0].read_rows_into, staging[0]) if read else None
        for j in range(layers):
            if pending is not None:
                pending.result()
                pending = lane.submit(files[j + 1].read_rows_into, staging[(j + 1) % 2]) if j + 1 < layers else None
            for g in range(gemms):
                F.linear(x, weights[(j * gemms + g) % len(weights)])
        return time.perf_counter() - start

    try:
        for i in range(layers):
            files.append(DiskTensor(root / f"flexgen-profile-{time.time_ns()}-{i}.bin", (layer_bytes,), torch.uint8))
            files[-1].write_rows(staging[0])
        read_s = step(0, True)
        one_gemm_s = _timed(lambda: [F.linear(x, w) for w in weights[:4]], lambda: None) / 4
        gemms = max(1, round(compute_share * read_s / layers / one_gemm_s))
        compute_s = step(gemms, False)
        both_s = step(gemms, True)
    finally:
        lane.shutdown()
        for f in files:
            f.delete()
    hidden = read_s + compute_s - both_s
    return min(1.0, max(0.0, hidden / min(read_s, compute_s)))


def measure_step_overhead(device: torch.device, dtype: torch.dtype, offload_dir: str | None,
                          profile: HardwareProfile, hidden_size: int = DEFAULT_HIDDEN[0], gpu_batch_size: int = 4,
                          batches: int = 4, steps: int = 16, rounds: int = 2) -> tuple[float, float, float]:
    """(seconds per layer window, seconds per GPU batch in a window, seconds per GPU batch in an attention window
    with a compressed cache) of a decode step that the cost model's other terms leave out: the engine's
    bookkeeping, and the dispatch and thread wake-ups of a layer's dozens of small kernels (a LayerNorm of 4 x 2048
    values took 95 us; the 4-bit cache's quantize and dequantize are dozens more). Timed with the engine itself on
    two decoder layers of `hidden_size` (a small vocabulary) with 1 and `batches` GPU batches, and with `batches`
    and a compressed cache; `profile` (without overheads) predicts the rest."""
    from flexgen_dist.engine.generation import BlockRun, Sequence
    from flexgen_dist.engine.policy import Policy
    from flexgen_dist.engine.stage_engine import BatchInput, StageEngine
    from flexgen_dist.io.weights import DummyWeights
    from flexgen_dist.models.family import model_layers
    from flexgen_dist.policy.cost_model import CostModel, placement_values, step_seconds

    prompt_len = 16
    cfg = opt.OptConfig("overhead-probe", hidden_size=hidden_size, num_layers=2, num_heads=hidden_size // 64,
                        ffn_dim=4 * hidden_size, vocab_size=512, max_positions=prompt_len + steps + 4)
    layers = model_layers(cfg)

    def residual_s(num_batches: int, compress_cache: bool = False) -> float:
        """The median decode step's measured time less the cost model's prediction of it."""
        policy = Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_batches, compress_cache=compress_cache)
        engine = StageEngine(cfg, layers, policy, DummyWeights(device=device), device, dtype, offload_dir)
        try:
            sequences = [Sequence(list(range(1, prompt_len + 1)), steps + 3) for _ in range(policy.block_size)]
            block = BlockRun(0, sequences, gpu_batch_size, 0, (1,), True)
            engine.start_block(0, block.batch_sizes, block.capacity)
            model = CostModel(cfg, layers, policy, profile, dtype, prompt_len, steps + 3)
            placement = placement_values(policy, profile.shared_memory)
            residuals = []
            for i in range(steps + 2):  # the prefill and the first decode step warm up
                start = time.perf_counter()
                logits = engine.step(0, [BatchInput(t, v) for t, v in zip(block.tokens, block.valid)])
                _sync(device)()
                if i >= 2:
                    residuals.append(time.perf_counter() - start - step_seconds(model, prompt_len + i - 1, placement))
                block.advance([x.argmax(-1) for x in logits])
            return sorted(residuals)[len(residuals) // 2]
        finally:
            engine.close()

    residual_s(1)  # first use of the kernels
    one, many, compressed = (min(residual_s(n, c) for _ in range(rounds)) for n, c in ((1, False), (batches, False),
                                                                                       (batches, True)))
    per_batch = max(0.0, (many - one) / (batches - 1) / len(layers))
    codec = max(0.0, (compressed - many) / batches / cfg.num_layers)
    return max(0.0, one / len(layers) - per_batch), per_batch, codec


def gemm_tables(device: torch.device, dtype: torch.dtype, scope: ProfileScope,
                log: Callable[[str], None] = lambda _: None) -> tuple[dict[str, dict[int, float]], ...]:
    """(plain, packed) GEMM tables for the layer shapes of `scope.hidden_sizes`. A weight larger than half the cold
    set (the LM head: 412 MB at hidden 2048 in float32) is measured on a slice of its rows, under the slice's key."""
    gemm, packed = {}, {}
    for out_features, in_features, rows in gemm_shapes(scope.hidden_sizes):
        out_features = min(out_features, max(64, scope.cold_bytes // 2 // (in_features * dtype.itemsize)) // 64 * 64)
        log(f"{dtype_name(dtype)}: GEMM {out_features}x{in_features}")
        key = gemm_shape_key(out_features, in_features)
        gemm[key] = measure_gemm(device, dtype, out_features, in_features, rows, scope=scope)
        if prepack.supported(device, dtype):
            packed[key] = measure_gemm(device, dtype, out_features, in_features, rows, packed=True, scope=scope)
    return gemm, packed


def _probe_hidden(scope: ProfileScope, dtype: torch.dtype) -> int:
    """The hidden size of the step-overhead probe's two layers: the first measured one, at most the scope's, and
    smaller where their weights (24 h^2 values) would take over a quarter of the memory allowance."""
    fits = int((scope.memory_bytes / 4 / (24 * dtype.itemsize)) ** 0.5) // 64 * 64
    return max(64, min(scope.hidden_sizes[0], scope.probe_hidden, fits))


def measure_profile(device: torch.device, dtypes: list[torch.dtype], offload_dir: str | None,
                    scope: ProfileScope = ProfileScope(),
                    log: Callable[[str], None] = lambda _: None) -> HardwareProfile:
    gpu_mem, cpu_mem, disk_free = detect_capacities(device.type, offload_dir)
    speeds: dict[str, DtypeSpeeds] = {}
    for dtype in dtypes:
        gemm, packed = gemm_tables(device, dtype, scope, log)
        log(f"{dtype_name(dtype)}: attention and dequantization")
        speeds[dtype_name(dtype)] = DtypeSpeeds(
            gemm_flops=gemm,
            packed_gemm_flops=packed,
            attention_flops=measure_prefill_attention(device, dtype, scope),
            decode_attention_bytes_per_s=measure_decode_attention(device, dtype, scope),
            cpu_decode_attention_bytes_per_s=measure_decode_attention(torch.device("cpu"), dtype, scope),
            dequantize_elements_per_s=measure_dequantize(device, dtype, scope),
        )
    log("memory and transfer bandwidths")
    size = scope.copy_bytes
    host = aligned_empty((size,), torch.uint8, pin_memory=device.type == "cuda")
    on_device = torch.empty(size, dtype=torch.uint8, device=device)
    memory = measure_copy(on_device, torch.empty_like(on_device), scope.min_seconds)
    h2d = measure_copy(host, on_device, scope.min_seconds)
    d2h = measure_copy(on_device, host, scope.min_seconds)
    del host, on_device
    log("disk")
    sample = scope.disk_sample_bytes
    file_bytes = max(ALIGN, min(sample // 4, scope.memory_bytes // 4) // ALIGN * ALIGN)
    files = max(4, sample // file_bytes)
    rounds = [measure_disk(offload_dir, file_bytes, files) for _ in range(3)]  # a virtual disk's speed wanders
    disk_read, disk_write, disk_cpu = (sorted(column)[1] for column in zip(*rounds))
    # Compute and disk reads share a CPU device's cores; a GPU computes apart from the host's I/O.
    overlap = decode_overlap = 1.0
    if device.type == "cpu":
        # Its staging buffers hold a quarter of the bytes it reads: within a quarter of the allowance.
        overlap_bytes = min(sample // 2, scope.memory_bytes)
        cold = scope.cold_bytes

        def median(**shape) -> float:
            measured = sorted(measure_compute_io_overlap(offload_dir, overlap_bytes, cold_bytes=cold, **shape)
                              for _ in range(scope.overlap_rounds))
            return measured[len(measured) // 2]

        overlap = median(rows=256, compute_share=1.0)
        decode_overlap = median(rows=16, compute_share=1 / 3)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    profile = HardwareProfile(
        name=f"{platform.node()} {device.type} ({name})",
        device=device.type,
        device_memory_bytes=gpu_mem,
        cpu_memory_bytes=cpu_mem,
        disk_bytes=disk_free,
        host_to_device_bytes_per_s=h2d,
        device_to_host_bytes_per_s=d2h,
        disk_read_bytes_per_s=disk_read,
        disk_write_bytes_per_s=disk_write,
        memory_bytes_per_s=memory,
        dtypes=speeds,
        disk_read_cpu_seconds_per_byte=disk_cpu,
        compute_io_overlap=overlap,
        decode_compute_io_overlap=decode_overlap,
        note=f"measured by flexgen-dist profile on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; disk under {Path(offload_dir or '/tmp')}",
    )
    if device.type == "cuda":  # the host's launches run ahead of the device's queue
        return profile
    # On a CPU they take the cores that compute.
    log("step overhead")
    per_window, per_batch, codec = measure_step_overhead(device, dtypes[0], offload_dir, profile,
                                                         _probe_hidden(scope, dtypes[0]), rounds=scope.overhead_rounds)
    return replace(profile, layer_overhead_s=per_window, batch_layer_overhead_s=per_batch,
                   cache_codec_overhead_s=codec)
