"""Cost model: the step time and memory of a policy on a hardware profile, as expressions linear in the placement.

How the engine spends a step (engine.py): layer by layer, all GPU batches of the block compute layer j while the
weight lane loads layer j+1 and the cache lane moves the next batch's KV cache. A layer's window therefore lasts as
long as its busiest resource: the compute device, the disk, the host->device link, the device->host link. On a CPU
compute device the copies between memory tiers and dequantization run on the cores that compute, so they add to
compute; only disk I/O overlaps it. With overlap off every term adds up.

Each resource's time is linear in the placement fractions (w_gpu, w_cpu, w_disk, cache_gpu, cache_cpu, cache_disk)
and one 0/1 variable, w_staged (the layer is gathered into a staging buffer rather than used where it lives). The same
expressions give the LP's constraints (policy_search.py) and the prediction for a fixed policy, so the search
optimizes exactly what `predict` reports.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from flexgen_dist.base.devices import dtype_name
from flexgen_dist.engine.policy import Policy
from flexgen_dist.memory.compression import QuantConfig, record_nbytes
from flexgen_dist.memory.placement import single_tier
from flexgen_dist.memory.tiers import TIERS, Tier
from flexgen_dist.memory.weight_home import FlatLayout, PackedLayout
from flexgen_dist.models.family import ModelConfig
from flexgen_dist.models.layout import LayerSpec
from flexgen_dist.policy.hardware import DtypeSpeeds, HardwareProfile
from flexgen_dist.policy.memory_plan import CACHE_LOADS_IN_FLIGHT, plan_bytes, workspace_bytes

WEIGHT_VARS = {Tier.GPU: "w_gpu", Tier.CPU: "w_cpu", Tier.DISK: "w_disk"}
CACHE_VARS = {Tier.GPU: "cache_gpu", Tier.CPU: "cache_cpu", Tier.DISK: "cache_disk"}
STAGED = "w_staged"

# Bytes touched per token and hidden unit by the elementwise work around the GEMMs (LayerNorm read+write, query
# scaling, head split and merge, residual add): attention layers; MLP layers add their activation over ffn_dim.
_ATTENTION_ELEMENTWISE = 15
_MLP_ELEMENTWISE = 5


@dataclass(frozen=True)
class Linear:
    """const + sum(coef * variable): a resource's seconds or a tier's bytes as a function of the placement."""

    const: float = 0.0
    terms: Mapping[str, float] = field(default_factory=dict)

    def __add__(self, other: "Linear | float") -> "Linear":
        if not isinstance(other, Linear):
            return Linear(self.const + other, self.terms)
        terms = dict(self.terms)
        for k, v in other.terms.items():
            terms[k] = terms.get(k, 0.0) + v
        return Linear(self.const + other.const, terms)

    __radd__ = __add__

    def __mul__(self, factor: float) -> "Linear":
        return Linear(self.const * factor, {k: v * factor for k, v in self.terms.items()})

    __rmul__ = __mul__

    def value(self, x: Mapping[str, float]) -> float:
        return self.const + sum(c * x[k] for k, c in self.terms.items())


def var(name: str, coef: float = 1.0) -> Linear:
    return Linear(0.0, {name: coef})


def fractions(variables: Mapping[Tier, str], tiers: set[Tier] | None = None, coef: float = 1.0) -> Linear:
    """coef x (sum of the fractions of `tiers`, all by default)."""
    return Linear(0.0, {v: coef for t, v in variables.items() if tiers is None or t in tiers})


@dataclass(frozen=True)
class Window:
    """One layer's time window in a step: per resource, its seconds."""

    compute: Linear
    disk: Linear
    h2d: Linear
    d2h: Linear

    def resources(self) -> tuple[Linear, ...]:
        return self.compute, self.disk, self.h2d, self.d2h

    def bounds(self, overlap: bool, compute_io_overlap: float) -> list[Linear]:
        """Expressions whose maximum is the window's time. Overlapped, each resource bounds it, and compute and
        disk reads together at least as long as the longer plus the unhidden share of the shorter
        (max(c, d) + (1 - a) min(c, d) = max(c + (1 - a) d, d + (1 - a) c)); serial, their sum."""
        if not overlap:
            return [sum(self.resources(), Linear())]
        hidden_not = 1 - compute_io_overlap
        return [self.compute + self.disk * hidden_not, self.disk + self.compute * hidden_not, self.h2d, self.d2h]

    def seconds(self, x: Mapping[str, float], overlap: bool, compute_io_overlap: float) -> float:
        return max(b.value(x) for b in self.bounds(overlap, compute_io_overlap))


def _zero() -> Linear:
    return Linear()


@dataclass(frozen=True)
class CostModel:
    """The cost of one pipeline stage (`layers`, the whole model for one stage) under a policy's shape: its batch
    sizes, compression, CPU attention, activation tier and overlap. Its placement fractions are the variables."""

    cfg: ModelConfig
    layers: list[LayerSpec]
    policy: Policy
    hardware: HardwareProfile
    dtype: torch.dtype
    prompt_len: int
    gen_len: int

    @property
    def speeds(self) -> DtypeSpeeds:
        return self.hardware.speeds(dtype_name(self.dtype))

    @property
    def cpu_device(self) -> bool:
        return self.hardware.shared_memory

    def addressable(self, tier: Tier) -> bool:
        return tier is Tier.GPU or (tier is Tier.CPU and self.cpu_device)

    # ---- bytes ----

    def stored_weight_bytes(self, layer: LayerSpec) -> int:
        """Layers of one kind have one shape: sized once per kind."""
        sizes = self._stored_sizes
        if layer.kind not in sizes:
            sizes[layer.kind] = _stored_bytes(layer, self.dtype, self.policy.weight_quant)
        return sizes[layer.kind]

    @functools.cached_property
    def _stored_sizes(self) -> dict[str, int]:
        return {}

    def cache_position_bytes(self) -> float:
        """Stored K+V bytes of one position of one head."""
        quant = self.policy.cache_quant(self.cfg.head_dim)
        return 2 * (record_nbytes(self.cfg.head_dim, quant) if quant else self.cfg.head_dim * self.dtype.itemsize)

    # ---- compute of one GPU batch on one layer ----

    def _elementwise(self, nbytes: float) -> float:
        return nbytes / (2 * self.hardware.memory_bytes_per_s)  # a copy's bandwidth counts each byte read and written

    def _gemm(self, out_features: int, in_features: int, rows: int) -> Linear:
        """A GEMM on the layer's weights: with the packed kernel where the profile measured one (the engine packs
        resident weights, prepack.py) and the layer is used in place; on a staged or dequantized copy, F.linear."""
        s = self.speeds
        plain = s.gemm_seconds(out_features, in_features, rows)
        if self.policy.compress_weight or not s.packed_gemm_flops:
            return Linear(plain)
        packed = s.gemm_seconds(out_features, in_features, rows, packed=True)
        return Linear(packed) + var(STAGED, plain - packed)

    def _compute_batch(self, layer: LayerSpec, query_len: int, past: int) -> Linear:
        cfg, s, item = self.cfg, self.speeds, self.dtype.itemsize
        batch = self.policy.gpu_batch_size
        rows, h = batch * query_len, cfg.hidden_size
        # A decode step runs each layer's GEMMs once over all the block's batches (stage_engine._decode_layer):
        # one GPU batch's share of a GEMM over num_gpu_batches times its rows.
        merged = self.policy.num_gpu_batches if past else 1

        def gemm(out_features: int, in_features: int, gemm_rows: int) -> Linear:
            return self._gemm(out_features, in_features, gemm_rows * merged) * (1 / merged)

        # The layer's GEMMs, from its weight shapes: every family's projections (OPT's 4 square ones, Llama's
        # narrower k/v under GQA and its three-matrix MLP) are priced as what they are.
        shapes = layer.linear_shapes
        if layer.kind == "embed":
            return sum((self._gemm(o, i, rows) for o, i in shapes), Linear(self._elementwise(3 * rows * h * item)))
        if layer.kind == "head":  # the final norm and the LM head on each sequence's last position only
            return sum((gemm(o, i, batch) for o, i in shapes),
                       Linear(self._elementwise(batch * cfg.vocab_size * (item + 4))))
        if layer.kind == "mlp":
            width = cfg.ffn_temporaries * cfg.ffn_dim
            return sum((gemm(o, i, rows) for o, i in shapes),
                       Linear(self._elementwise(rows * (_MLP_ELEMENTWISE * h + 2 * width) * item)))
        t = sum((gemm(o, i, rows) for o, i in shapes), Linear(self._elementwise(_ATTENTION_ELEMENTWISE * rows * h * item)))
        if past == 0:  # prefill: softmax(QK^T)V over the prompt, and the new K, V written to the cache homes
            t += 4 * batch * cfg.num_heads * query_len * query_len * cfg.head_dim / s.attention_flops
            return t + self._cache_store(rows)
        return t + self._decode_attention(past)

    def _cache_store(self, rows: int) -> Linear:
        """Prefill's K, V of `rows` tokens written into the cache homes that compute can address (a memory copy);
        quantized on the device first when compressed."""
        kv, item = self.cfg.kv_dim, self.dtype.itemsize
        t = fractions(CACHE_VARS, {t for t in TIERS if self.addressable(t)}, self._elementwise(4 * rows * kv * item))
        if self.policy.compress_cache:
            t += Linear(2 * rows * kv / self.speeds.dequantize_elements_per_s)
        return t

    def _decode_attention(self, past: int) -> Linear:
        """Attention of one decode token over the cache: a home used in place is read over its whole capacity (the
        engine attends over the contiguous buffer), a staged copy over the cached prefix; dequantized first when
        compressed."""
        cfg, s, p = self.cfg, self.speeds, self.policy
        batch, item, capacity = p.gpu_batch_size, self.dtype.itemsize, self.prompt_len + self.gen_len
        per_position = 2 * batch * cfg.kv_dim * item
        t = Linear()
        for tier in TIERS:
            on_cpu = tier is Tier.CPU and p.cpu_cache_compute and not self.cpu_device
            in_place = (self.addressable(tier) or on_cpu) and not p.compress_cache
            positions = capacity if in_place else past + 1
            rate = s.cpu_decode_attention_bytes_per_s if on_cpu else s.decode_attention_bytes_per_s
            seconds = positions * per_position / rate
            if p.compress_cache:
                seconds += past * 2 * batch * cfg.kv_dim / s.dequantize_elements_per_s
            t += var(CACHE_VARS[tier], seconds)
        return t

    # ---- transfers ----

    def _disk_cpu_share(self) -> float:
        """Compute seconds lost per byte read from disk on a CPU device: the kernel's CPU time for the read, taken
        from the cores compute runs on (spread over all of them)."""
        return self.hardware.disk_read_cpu_seconds_per_byte / max(1, torch.get_num_threads()) if self.cpu_device else 0.0

    def _weight_load(self, layer: LayerSpec) -> Window:
        """Loading one layer's weights for use: disk reads, host->device copies, gathering, dequantization."""
        hw, nbytes = self.hardware, self.stored_weight_bytes(layer)
        disk = var(WEIGHT_VARS[Tier.DISK], nbytes / hw.disk_read_bytes_per_s)
        compute = Linear()
        if self.cpu_device:
            # The weight lane copies the memory pieces of a staged layer into the staging buffer on the cores
            # compute uses, and the kernel's disk reads take their share of them.
            copy = var(STAGED, nbytes / hw.memory_bytes_per_s) + var(WEIGHT_VARS[Tier.DISK], -nbytes / hw.memory_bytes_per_s)
            compute += copy + var(WEIGHT_VARS[Tier.DISK], nbytes * self._disk_cpu_share())
            h2d = Linear()
        else:  # CPU pieces, and disk pieces through the pinned bounce buffer, cross the link
            h2d = fractions(WEIGHT_VARS, {Tier.CPU, Tier.DISK}, nbytes / hw.host_to_device_bytes_per_s)
        if self.policy.compress_weight:
            compute += Linear(sum(w.numel for w in layer.weights) / self.speeds.dequantize_elements_per_s)
        return Window(compute, disk, h2d, _zero())

    def _cache_io(self, query_len: int, past: int) -> Window:
        """One GPU batch's KV cache traffic on an attention layer: at decode the cached prefix is read from the
        tiers compute cannot address and the new position written back; at prefill the prompt's K, V are written."""
        hw, p = self.hardware, self.policy
        heads_bytes = p.gpu_batch_size * self.cfg.num_kv_heads * self.cache_position_bytes()
        read_positions, written_positions = (past, 1) if past else (0, query_len)
        disk = var(CACHE_VARS[Tier.DISK], read_positions * heads_bytes / hw.disk_read_bytes_per_s
                   + written_positions * heads_bytes / hw.disk_write_bytes_per_s)
        h2d, d2h = Linear(), Linear()
        if not self.cpu_device:
            moved = {Tier.DISK} if p.cpu_cache_compute else {Tier.CPU, Tier.DISK}
            value_share = (1 + p.attn_sparsity) / 2  # sparse attention fetches only the kept value rows
            h2d = fractions(CACHE_VARS, moved, read_positions * heads_bytes * value_share / hw.host_to_device_bytes_per_s)
            d2h = fractions(CACHE_VARS, {Tier.CPU, Tier.DISK}, written_positions * heads_bytes / hw.device_to_host_bytes_per_s)
        return Window(_zero(), disk, h2d, d2h)

    def _activation_io(self, query_len: int) -> Window:
        """Hidden states between layers, stored on the activation tier when compute cannot address it."""
        tier = single_tier(self.policy.act_percents())
        nbytes = self.policy.gpu_batch_size * query_len * self.cfg.hidden_size * self.dtype.itemsize
        hw = self.hardware
        if tier is Tier.DISK:
            return Window(_zero(), Linear(nbytes / hw.disk_write_bytes_per_s + nbytes / hw.disk_read_bytes_per_s),
                          _zero(), _zero())
        if self.addressable(tier):
            return Window(_zero(), _zero(), _zero(), _zero())
        return Window(_zero(), _zero(), Linear(nbytes / hw.host_to_device_bytes_per_s),
                      Linear(nbytes / hw.device_to_host_bytes_per_s))

    # ---- a step ----

    def step_windows(self, past: int) -> list[tuple[int, Window]]:
        """(count, window) pairs whose sum is one step: prefill when `past` is 0, else a decode step with `past`
        positions cached. Identical windows (every decoder layer looks alike) are merged with a count."""
        if past not in self._windows:
            self._windows[past] = self._step_windows(past)
        return self._windows[past]

    @functools.cached_property
    def _windows(self) -> dict[int, list[tuple[int, Window]]]:
        return {}

    def _step_windows(self, past: int) -> list[tuple[int, Window]]:
        query_len = self.prompt_len if past == 0 else 1
        batches = self.policy.num_gpu_batches
        acts = self._activation_io(query_len)
        # Layers of one kind have the same shapes: build each distinct (layer, next layer) window once.
        firsts: dict[tuple[str, str], int] = {}
        counts: dict[tuple[str, str], int] = {}
        for j, layer in enumerate(self.layers):
            key = (layer.kind, self.layers[j + 1].kind if j + 1 < len(self.layers) else "")
            firsts.setdefault(key, j)
            counts[key] = counts.get(key, 0) + 1
        merged = [(1, self._weight_load(self.layers[0]))]  # nothing computes while the first layer loads
        hw = self.hardware
        for key, j in firsts.items():
            layer = self.layers[j]
            overhead = hw.layer_overhead_s + batches * hw.batch_layer_overhead_s
            if layer.kind == "attention" and self.policy.compress_cache:
                overhead += batches * hw.cache_codec_overhead_s
            window = Window(self._compute_batch(layer, query_len, past) * batches + overhead, _zero(), _zero(), _zero())
            if layer.kind != "embed":
                window = _sum(window, _scaled(acts, batches))
            if layer.kind == "attention":
                window = _sum(window, _scaled(self._cache_io(query_len, past), batches))
            if key[1]:
                window = _sum(window, self._weight_load(self.layers[j + 1]))
            merged.append((counts[key], window))
        return merged

    def decode_steps(self) -> range:
        """`past` of each decode step: the prompt, then one more position per step."""
        return range(self.prompt_len, self.prompt_len + self.gen_len - 1)

    def mean_decode_past(self) -> int:
        steps = self.decode_steps()
        return (steps.start + steps.stop - 1) // 2 if len(steps) else self.prompt_len

    # ---- memory (the LP's constraints; plan.py's plan_bytes is the exact figure for a concrete policy) ----

    def weight_bytes(self) -> int:
        return sum(self.stored_weight_bytes(layer) for layer in self.layers)

    def cache_bytes(self, blocks_in_flight: int = 1) -> int:
        """The KV cache of the blocks in flight, as stored (compressed or not)."""
        p = self.policy
        num_attention = sum(layer.kind == "attention" for layer in self.layers)
        per_head = p.gpu_batch_size * (self.prompt_len + self.gen_len) * self.cache_position_bytes()
        return blocks_in_flight * num_attention * p.num_gpu_batches * self.cfg.num_kv_heads * per_head

    def tier_bytes(self, blocks_in_flight: int = 1) -> dict[Tier, Linear]:
        """Bytes each tier holds, linear in the placement; mirrors plan_bytes (which rounds to pages and heads)."""
        p, cfg, item = self.policy, self.cfg, self.dtype.itemsize
        mem = {t: Linear() for t in TIERS}
        stored = [self.stored_weight_bytes(layer) for layer in self.layers]
        for t in TIERS:
            mem[t] += var(WEIGHT_VARS[t], sum(stored))
        largest = max(_stored_bytes(layer, self.dtype, None) for layer in self.layers)
        if p.compress_weight:  # dequantized into staging always; packed bytes gathered when split
            mem[Tier.GPU] += Linear(2 * largest) + var(STAGED, 2 * max(stored))
        else:
            mem[Tier.GPU] += var(STAGED, 2 * largest)
        if not self.cpu_device:  # pinned bounce buffers for disk pieces
            mem[Tier.CPU] += var(WEIGHT_VARS[Tier.DISK], 2 * max(stored))

        batch, blocks, capacity = p.gpu_batch_size, p.num_gpu_batches, self.prompt_len + self.gen_len
        head_bytes = 2 * batch * capacity * cfg.head_dim * item
        stored_head = batch * capacity * self.cache_position_bytes()
        for t in TIERS:
            mem[t] += var(CACHE_VARS[t], self.cache_bytes(blocks_in_flight))
            on_cpu = t is Tier.CPU and p.cpu_cache_compute
            if p.compress_cache or not (self.addressable(t) or on_cpu):
                staged_in = Tier.CPU if on_cpu else Tier.GPU
                mem[staged_in] += var(CACHE_VARS[t], CACHE_LOADS_IN_FLIGHT * cfg.num_kv_heads * head_bytes)
                if t is Tier.DISK:
                    mem[Tier.CPU] += var(CACHE_VARS[t], CACHE_LOADS_IN_FLIGHT * cfg.num_kv_heads * stored_head)
        act_tier = single_tier(p.act_percents())
        mem[act_tier] += Linear(blocks_in_flight * blocks * batch * self.prompt_len * cfg.hidden_size * item)
        mem[Tier.GPU] += Linear(workspace_bytes(cfg, batch, self.prompt_len, capacity, item, blocks))
        return mem


@functools.cache
def _stored_bytes(layer: LayerSpec, dtype: torch.dtype, quant: QuantConfig | None) -> int:
    """Bytes a layer's weights occupy in the tiers: packed when compressed, else the flat buffer."""
    return PackedLayout.of(layer, dtype, quant).nbytes if quant else FlatLayout.of(layer, dtype).numel * dtype.itemsize


def _scaled(window: Window, factor: float) -> Window:
    return Window(*(r * factor for r in window.resources()))


def _sum(a: Window, b: Window) -> Window:
    return Window(*(x + y for x, y in zip(a.resources(), b.resources())))


def placement_values(policy: Policy, cpu_device: bool) -> dict[str, float]:
    """The variables' values for a concrete policy."""
    x = {WEIGHT_VARS[t]: pct / 100 for t, pct in zip(TIERS, policy.weight_percents())}
    x.update({CACHE_VARS[t]: pct / 100 for t, pct in zip(TIERS, policy.cache_percents())})
    tiers = [t for t, pct in zip(TIERS, policy.weight_percents()) if pct > 0]
    in_place = len(tiers) == 1 and (tiers[0] is Tier.GPU or (tiers[0] is Tier.CPU and cpu_device))
    x[STAGED] = 0.0 if in_place else 1.0
    return x


@dataclass(frozen=True)
class Prediction:
    prefill_s: float  # one block's prefill step
    decode_s: float  # one block's decode steps, all of them
    block_size: int
    gen_len: int
    peak_bytes: dict[str, int]  # per tier, from the engine's own allocation plan

    @property
    def block_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput_tok_s(self) -> float:
        """Generated tokens per second over full blocks (the summary's generation_throughput_tok_s)."""
        return self.block_size * self.gen_len / self.block_s

    def to_dict(self) -> dict:
        return {"throughput_tok_s": self.throughput_tok_s, "block_s": self.block_s, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "peak_bytes": self.peak_bytes}


def step_seconds(model: CostModel, past: int, x: Mapping[str, float]) -> float:
    overlap = model.hardware.overlap(decode=past > 0)
    return sum(count * window.seconds(x, model.policy.overlap, overlap) for count, window in model.step_windows(past))


def predict(cfg: ModelConfig, layers: list[LayerSpec], policy: Policy, hardware: HardwareProfile, dtype: torch.dtype,
            prompt_len: int, gen_len: int, blocks_in_flight: int = 1) -> Prediction:
    """Predicted time of one block (prefill, then every decode step at its own cache length) and the peak bytes
    per tier for `policy` on one stage holding `layers`."""
    model = CostModel(cfg, layers, policy, hardware, dtype, prompt_len, gen_len)
    x = placement_values(policy, hardware.shared_memory)
    prefill = step_seconds(model, 0, x)
    decode = sum(step_seconds(model, past, x) for past in model.decode_steps())
    plan = plan_bytes(cfg, layers, policy, dtype, torch.device(hardware.device), prompt_len, gen_len, blocks_in_flight)
    return Prediction(prefill, decode, policy.block_size, gen_len, plan.as_dict())
