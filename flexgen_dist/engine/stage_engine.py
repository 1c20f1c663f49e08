"""The offloading engine over a contiguous slice of layers (one pipeline stage; the whole model is one slice).

One `step` runs every GPU batch of a block through the slice in FlexGen's zig-zag order: layer by layer, and within
a layer batch by batch, so each layer's weights are loaded once per block and reused by all its batches. While batch
k of layer j computes, the weight lane loads layer j+1 and the cache lane loads batch k+1's KV cache and writes back
batch k-1's new token. Once layer j is done, layer j+2 starts loading into the staging slot j used, beside j+1's
load: when loads are slower than compute, the disk's queue does not drain at each layer boundary (docs/benchmark-history.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from flexgen_dist.engine.packing import TokenPacking
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.transfer import Lane
from flexgen_dist.io.weights import WeightSource
from flexgen_dist.memory.cache_home import CacheHome, LoadedPiece
from flexgen_dist.memory.disk import DiskTensor, aligned_empty
from flexgen_dist.memory.placement import single_tier
from flexgen_dist.memory.tiers import Tier, TierSet
from flexgen_dist.memory.weight_home import WeightHome
from flexgen_dist.models import prepack
from flexgen_dist.models.attention import attend, attend_rows, attention_mask, position_ids, top_probabilities
from flexgen_dist.models.family import ModelConfig, family_of
from flexgen_dist.models.layout import LayerSpec

# On a CPU device a step runs each GPU batch in chunks of whole sequences of about this many tokens (in practice the
# prefill: a decode step has one token per sequence). A chunk's temporaries stay in cache and in malloc's heap (larger
# ones are fresh mmaps that page-fault on first touch). With memory/host_heap.py, a 4-layer opt-1.3b prefill of
# 32 x 128 tokens went from 4.67 to 4.27 s on the 2-core AVX-512-bf16 EPYC (docs/benchmark-history.md). Exact: every row's
# result is the same either way.
_CPU_CHUNK_TOKENS = 512


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _unpacked(hidden: torch.Tensor, packing: TokenPacking | None) -> torch.Tensor:
    return hidden if packing is None else packing.unpack(hidden)


def _live_rows(valid: list[torch.Tensor]) -> torch.Tensor | None:
    """A decode step's rows, over all its GPU batches, whose sequence still generates: a finished sequence's new
    position is padding (generation.BlockRun.advance). None: every row."""
    live = _cat([v[:, -1] for v in valid])
    return None if bool(live.all()) else live.nonzero().squeeze(1)


def _scatter_rows(rows: torch.Tensor, live_rows: torch.Tensor | None, total: int,
                  base: torch.Tensor | None = None) -> torch.Tensor:
    """`rows` computed for live_rows placed among `total` rows: into a copy of `base` (the finished rows keep theirs),
    or zeros. live_rows None: `rows` is every row already."""
    if live_rows is None:
        return rows
    out = rows.new_zeros((total, *rows.shape[1:])) if base is None else base.clone()
    return out.index_copy_(0, live_rows, rows)


@dataclass
class BatchInput:
    """One GPU batch's input to a stage for one step."""

    data: torch.Tensor  # token ids [B, S] for a stage holding the embedding, else hidden states [B, S, H]
    valid: torch.Tensor  # [B, T] bool, T = cached + S positions: which are real tokens (False = left padding)
    # [B, T] int64 for a scoring prefill whose rows feed several sequences after a shared prefix (scoring.ScoreRow):
    # which tokens each token attends to (models.attention.attention_mask). None: plain causal.
    segments: torch.Tensor | None = None


@dataclass(frozen=True)
class PrefillPart:
    """Sequences [start, stop) of GPU batch `batch`: one pipeline step of a prefill cut into parts. A prompt's
    prefill reads no other sequence, so the parts compute exactly what one whole step would."""

    batch: int
    start: int
    stop: int


@dataclass(frozen=True)
class RefillRows:
    """Rows `rows` of GPU batch `batch` given new sequences in the middle of a block (generation.BlockRun): their
    prompts but the last token, left padded to one width, computed inside the block's next decode step, layer by
    layer with the weights that step loads, as a prefill of those rows alone (a refilled row attends to its own
    positions only), and cached at positions [column, column + width). The prompt's last token is the row's input to
    that decode step, whose output is its first token. `heads`: what the last stage does with each row's logits
    from then on (generation.SequenceHead)."""

    batch: int
    rows: tuple[int, ...]
    column: int
    heads: tuple = ()


@dataclass
class _Prompt:
    """Input computed as a prefill within a step: a GPU batch of a prefill, a part of one, or a refill."""

    slot: int  # where its hidden states live in the block's ActivationStore (and the head's input index)
    data: torch.Tensor  # token ids [b, S] or hidden states [b, S, H]
    batch: int  # the block's GPU batch whose KV cache it writes
    rows: slice | torch.Tensor  # of that batch: a slice, or (refill) an index
    column: int  # the first cache position written
    mask: torch.Tensor
    positions: torch.Tensor
    attn_positions: torch.Tensor | None  # None for a refill: its attention layers take the step's mixed positions
    logits: bool  # False: a refill, whose last token's logits come from the decode step
    # Its real tokens, when it has padding (a refill: always): its hidden states are then kept packed [1, T, H]
    # between layers, and `packed_attn_positions` are the attention layers' positions for them (a prefill's).
    packing: TokenPacking | None = None
    packed_attn_positions: torch.Tensor | None = None


class ActivationStore:
    """Hidden states between layers, per GPU batch, kept on the policy's activation tier."""

    def __init__(self, tiers: TierSet, tier: Tier) -> None:
        self.tiers, self.tier = tiers, tier
        self._items: dict[int, torch.Tensor | DiskTensor] = {}

    def put(self, k: int, hidden: torch.Tensor) -> None:
        if self.tiers.addressable(self.tier):
            self._items[k] = hidden
            return
        self._drop(k)
        stored = self.tiers.empty(self.tier, tuple(hidden.shape), hidden.dtype, name=f"act{k}")
        if isinstance(stored, DiskTensor):
            stored.write_rows(hidden.contiguous().cpu())
        else:
            stored.copy_(hidden)
        self._items[k] = stored

    def get(self, k: int) -> torch.Tensor:
        stored = self._items[k]
        if isinstance(stored, DiskTensor):
            host = aligned_empty(stored.shape, stored.dtype)
            stored.read_rows_into(host)
            return host.to(self.tiers.device)
        return stored.to(self.tiers.device)

    def _drop(self, k: int) -> None:
        old = self._items.pop(k, None)
        if old is not None and not self.tiers.addressable(self.tier):
            self.tiers.release(self.tier, old)

    def clear(self) -> None:
        for k in list(self._items):
            self._drop(k)


@dataclass
class _Block:
    caches: dict[tuple[int, int], CacheHome]  # (layer index, GPU batch) -> KV cache
    acts: ActivationStore


def _place_refill(loaded: list[LoadedPiece], rows: torch.Tensor, column: int, keys: torch.Tensor,
                  values: torch.Tensor) -> None:
    """Refilled rows' prompt keys and values [b, n, S, D] into a loaded cache at positions [column, column + S)."""
    width = keys.shape[2]
    for lp in loaded:
        h0, h1, where = lp.piece.head_start, lp.piece.head_stop, lp.k.device
        index = rows.to(where)
        lp.k[index, :, column : column + width] = keys[:, h0:h1].to(where, lp.k.dtype)
        if lp.v is not None:  # sparse attention fetches value rows from the home (refill needs dense attention)
            lp.v[index, :, column : column + width] = values[:, h0:h1].to(where, lp.v.dtype)


def _used_by_compute(loaded: list[LoadedPiece]) -> None:
    """Staged cache copies were allocated on a lane's CUDA stream; keep the allocator from reusing them while the
    compute stream still reads them. Sparse attention stages keys only (v is None until the kept rows are fetched)."""
    for lp in loaded:
        if lp.staged and lp.k.is_cuda:
            for staged in (lp.k, lp.v):
                if staged is not None:
                    staged.record_stream(torch.cuda.current_stream())


class StageEngine:
    def __init__(self, cfg: ModelConfig, layers: list[LayerSpec], policy: Policy, source: WeightSource,
                 device: torch.device, dtype: torch.dtype, offload_dir: str | None = None) -> None:
        self.cfg, self.layers, self.policy, self.device, self.dtype = cfg, layers, policy, device, dtype
        self.model = family_of(cfg)  # the layer math of the model's family
        self.tiers = TierSet(device, offload_dir)
        self.homes: list[WeightHome] = []
        self.act_tier = single_tier(policy.act_percents())
        self.blocks: dict[int, _Block] = {}
        # Two workers: the loads of the two staging slots can run at once (step).
        self._weight_lane = Lane(device, policy.overlap, "flexgen-weights", workers=2)
        self._dequantize_inline = device.type == "cpu"
        self._cache_lane = Lane(device, policy.overlap, "flexgen-cache")
        pack_rows = policy.gpu_batch_size if prepack.supported(device, dtype) else None
        try:
            for layer in layers:
                self.homes.append(WeightHome(layer, self.tiers, policy.weight_percents(), dtype, source,
                                             policy.weight_quant, pack_rows))
            staged = [h for h in self.homes if h.needs_staging]
            gathered = [h for h in self.homes if h.packed is not None and not h.stored_in_place]
            stored_dtype = torch.uint8 if policy.weight_quant else dtype
            # Two slots of each: layer j computes from one while layer j+1 loads into the other (then j+2 into j's).
            self._staging = self._slots(Tier.GPU, max((h.numel for h in staged), default=0), dtype, "w-staging")
            self._packed_staging = self._slots(Tier.GPU, max((h.stored_numel for h in gathered), default=0),
                                               torch.uint8, "w-packed")
            disk = max((h.nbytes(Tier.DISK) for h in self.homes if not h.stored_in_place), default=0)
            self._bounce = self._slots(Tier.CPU, disk // stored_dtype.itemsize if device.type == "cuda" else 0,
                                       stored_dtype, "w-bounce")
        except BaseException:
            self.close()
            raise

    def _slots(self, tier: Tier, numel: int, dtype: torch.dtype, name: str) -> list:
        return [self.tiers.empty(tier, (numel,), dtype, name, lasting=True) for _ in range(2)] if numel else []

    @property
    def has_embedding(self) -> bool:
        return self.layers[0].kind == "embed"

    @property
    def has_head(self) -> bool:
        return self.layers[-1].kind == "head"

    # ---- block lifetime: a block's KV cache lives from its prefill to its last decode step. A pipeline stage holds
    # several blocks at once (one per stage in flight), each under its own id. ----

    def start_block(self, block_id: int, batch_sizes: list[int], capacity: int) -> None:
        """`capacity`: the KV cache's positions; 0: a block computed in one prefill keeps none."""
        self.end_block(block_id)
        caches = {}
        for j, layer in enumerate(self.layers):
            if layer.kind == "attention" and capacity:
                for k, b in enumerate(batch_sizes):
                    caches[j, k] = CacheHome(self.tiers, b, self.cfg.num_kv_heads, self.cfg.head_dim, capacity,
                                             self.dtype, self.policy.cache_percents(), f"{layer.label}-blk{block_id}-b{k}",
                                             self.policy.cache_quant(self.cfg.head_dim))
        self.blocks[block_id] = _Block(caches, ActivationStore(self.tiers, self.act_tier))

    def end_block(self, block_id: int) -> None:
        block = self.blocks.pop(block_id, None)
        if block is not None:
            for home in block.caches.values():
                home.release()
            block.acts.clear()

    # ---- one step (prefill when nothing is cached yet, else one decode token) ----

    def _buffers(self, j: int) -> tuple[torch.Tensor | None, ...]:
        """Layer j's staging, packed staging and bounce buffers (two of each, alternating by layer)."""
        return tuple(slots[j % 2] if slots else None for slots in (self._staging, self._packed_staging, self._bounce))

    def _prefetch_weights(self, j: int) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """The weight lane's work for layer j. On a GPU, all of loading (its dequantization runs on the lane's
        stream); on a CPU device only the fetch: dequantizing in the lane thread while compute runs has both contend
        for the same cores (docs/benchmark-history.md, "Re-measured after the lane fix")."""
        if self._dequantize_inline:
            return self.homes[j].fetch(*self._buffers(j))
        return self.homes[j].load(*self._buffers(j))

    def _weights(self, j: int, prefetched: torch.Tensor | dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        return self.homes[j].decode(prefetched, self._buffers(j)[0]) if self._dequantize_inline else prefetched

    def step(self, block_id: int, inputs: list[BatchInput],
             head: Callable[..., object] | None = None,
             part: PrefillPart | None = None, head_columns: list[int] | None = None,
             refills: list[tuple[RefillRows, BatchInput]] = (), head_rows: list[int] | None = None) -> list:
        """Run all GPU batches of a block through the slice. Returns per batch the last position's float32 logits
        [B, V] when the slice ends with the head, else the hidden states [B, S, H]. `head(k, logits)`: the head
        returns instead what it makes of input k's every-position logits [B, S, V] (scoring: summed NLLs; a prefill
        that echoes: prompt log-probabilities), or with `head_columns` of its last head_columns[k] positions' only.
        With `head_rows`, a prefill's `head(k, logits, rows)` is given the logits of head_rows[k] sequences at a time
        (`rows` a slice of the batch), and input k's output is the list of what it returned (a decode step's logits,
        one position a sequence, go to `head(k, logits)` whole).
        `part`: `inputs` is that part of a prefill, its sequences alone (one BatchInput). `refills` (decode steps):
        rows given new sequences, computed in this step (RefillRows); a slice without the head returns their hidden
        states after the batches'."""
        caches, acts = self.blocks[block_id].caches, self.blocks[block_id].acts
        query_len = inputs[0].data.shape[1]
        past = inputs[0].valid.shape[1] - query_len
        if part is not None and (past or len(inputs) != 1):
            raise ValueError("a prefill part is one GPU batch's sequences, before anything is cached")
        if refills and not past:
            raise ValueError("refills run inside a decode step")
        valid = [x.valid.to(self.device) for x in inputs]
        masks, positions, attn_positions = (list(t) for t in zip(*(self._geometry(x) for x in inputs)))
        if past:  # refills: packed, to join the decode rows' tokens (_mixed_layer)
            prompts = [replace(_Prompt(len(inputs) + i, x.data, refill.batch, torch.tensor(refill.rows), refill.column,
                                       *self._geometry(x, for_attention=False), False),
                               packing=TokenPacking.of(x.valid.to(self.device)))
                       for i, (refill, x) in enumerate(refills)]
        else:
            prompts = [self._packed(_Prompt(k, x.data, part.batch if part else k, slice(part.start, part.stop) if part
                                            else slice(None), 0, masks[k], positions[k], attn_positions[k], True),
                                    x.valid)
                       for k, x in enumerate(inputs)]
        live_rows = _live_rows(valid) if past else None
        decode_positions = _cat(attn_positions) if past else None  # the live rows' only: selected once, not per layer
        if live_rows is not None:
            decode_positions = decode_positions.index_select(0, live_rows)
        mixed_positions = None  # a decode step with refills: the positions of the live rows' and refills' tokens
        if past and prompts:
            live_ids = _cat(positions) if live_rows is None else _cat(positions).index_select(0, live_rows)
            mixed_ids = torch.cat([live_ids.reshape(1, -1), *(p.packing.pack(p.positions) for p in prompts)], dim=1)
            mixed_positions = self.model.attention_positions(self.cfg, mixed_ids, self.dtype)
        if not self.has_embedding:
            for k, x in enumerate(inputs):
                acts.put(k, x.data.to(self.device, self.dtype))
            for p in prompts:
                hidden = p.data.to(self.device, self.dtype)
                acts.put(p.slot, hidden if p.packing is None else p.packing.pack(hidden))
        attention_order = [(j, k) for j, l in enumerate(self.layers) if l.kind == "attention" for k in range(len(inputs))]
        cache_loads = {}
        keep = math.ceil(self.policy.attn_sparsity * (past + 1)) if past and self.policy.attn_sparsity < 1 else None

        def load_cache(at: tuple[int, int]):
            # Sparse decode stages keys only; the value rows top-k keeps are fetched from the home after scoring.
            return self._cache_lane.submit(caches[at].load, past, self.policy.cpu_cache_compute, keep is None)

        def loaded_cache(at: tuple[int, int]) -> list[LoadedPiece]:
            """(layer, batch)'s cache, loaded; the next attention's load starts first, to overlap this compute."""
            pos = attention_order.index(at)
            if pos + 1 < len(attention_order):
                nxt = attention_order[pos + 1]
                cache_loads[nxt] = load_cache(nxt)
            with self.tiers.stats.waiting("cache"):
                loaded = cache_loads.pop(at).result()
            _used_by_compute(loaded)
            return loaded

        if past and attention_order:
            cache_loads[attention_order[0]] = load_cache(attention_order[0])
        weight_loads = {j: self._weight_lane.submit(self._prefetch_weights, j) for j in range(min(2, len(self.layers)))}
        outputs: list[torch.Tensor] = []
        sizes = [x.data.shape[0] for x in inputs]
        for j, layer in enumerate(self.layers):
            with self.tiers.stats.waiting("weights"):
                prefetched = weight_loads.pop(j).result()
            w = self._weights(j, prefetched)
            if mixed_positions is not None and layer.kind in ("attention", "mlp"):
                self._mixed_layer(j, w, sizes, live_rows, acts, caches, masks, past, keep, loaded_cache, prompts,
                                  mixed_positions)
                self._next_weights(j, weight_loads)
                continue
            for p in prompts:
                result = self._prompt_layer(j, w, p, acts, caches, head, head_columns, head_rows)
                if layer.kind == "head" and p.logits:
                    outputs.append(result)
            if past and layer.kind == "embed":
                for k, x in enumerate(inputs):
                    acts.put(k, self.model.embed(self.cfg, w, x.data.to(self.device), positions[k]))
            elif past:
                outputs += self._decode_layer(j, w, sizes, live_rows, acts, caches, masks, decode_positions, past,
                                              keep, head, loaded_cache)
            self._next_weights(j, weight_loads)
        with self.tiers.stats.waiting("drain"):
            self._cache_lane.drain()
            self._weight_lane.drain()
        if self.has_head:
            return outputs
        packings = {p.slot: p.packing for p in prompts}
        slots = range(len(inputs)) if not past else [*range(len(inputs)), *(p.slot for p in prompts)]
        return [_unpacked(acts.get(k), packings.get(k)) for k in slots]

    def _geometry(self, x: BatchInput,
                  for_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """An input's attention mask, positions, and what the attention layers take of them (Llama: rotary cos and
        sin; None unless `for_attention`), made once a step rather than in every layer. From the input's own width: a
        prefill's batches may differ (a scoring block pads each to its own), a decode step's do not."""
        valid, width = x.valid.to(self.device), x.data.shape[1]
        segments = x.segments.to(self.device) if x.segments is not None else None
        positions = position_ids(valid, width, segments)
        attn_positions = self.model.attention_positions(self.cfg, positions, self.dtype) if for_attention else None
        return attention_mask(valid, width, segments), positions, attn_positions

    def _packed(self, p: _Prompt, valid: torch.Tensor) -> _Prompt:
        """A prefill's `p`, with its real tokens' packing when it has padding (packing.py)."""
        valid = valid.to(self.device)
        if bool(valid.all()):
            return p
        packing = TokenPacking.of(valid)
        return replace(p, packing=packing, packed_attn_positions=self.model.attention_positions(
            self.cfg, packing.pack(p.positions), self.dtype))

    def _prompt_layer(self, j: int, w, p: _Prompt, acts: ActivationStore, caches: dict,
                      head: Callable[..., object] | None, head_columns: list[int] | None,
                      head_rows: list[int] | None) -> object:
        """Layer j of a prompt's prefill (a refill's: its embedding only; _mixed_layer computes the rest). Returns the
        head's output, else None."""
        layer = self.layers[j]
        if layer.kind == "embed":
            ids, positions = p.data.to(self.device), p.positions
            if p.packing is not None:
                ids, positions = p.packing.pack(ids), p.packing.pack(positions)
            acts.put(p.slot, self.model.embed(self.cfg, w, ids, positions))
            return None
        if layer.kind == "head" and not p.logits:
            return None
        hidden = acts.get(p.slot)
        if layer.kind == "head":
            hidden = _unpacked(hidden, p.packing)
        if layer.kind == "head" and head is not None:
            # Per GPU batch, so the [B, S, V] float32 logits never exist for the whole block at once.
            needed = hidden if head_columns is None else hidden[:, hidden.shape[1] - head_columns[p.slot] :]
            if head_rows is None:
                return head(p.slot, self.model.lm_head(self.cfg, w, needed))
            rows = [slice(r, r + head_rows[p.slot]) for r in range(0, needed.shape[0], head_rows[p.slot])]
            return [head(p.slot, self.model.lm_head(self.cfg, w, needed[r]), r) for r in rows]
        if layer.kind == "head":
            return self.model.lm_head(self.cfg, w, hidden[:, -1])
        if layer.kind == "mlp":
            if p.packing is None:
                out = _cat([self.model.mlp(self.cfg, w, hidden[c]) for c in self._chunks(*hidden.shape[:2])])
            else:
                out = self._packed_mlp(w, hidden)
            acts.put(p.slot, out)
            return None
        if p.packing is None:
            out, keys, values = self._prefill_attention(w, hidden, p.mask, p.attn_positions)
        else:
            out, keys, values = self._packed_prefill_attention(w, hidden, p)
        cache = caches.get((j, p.batch))
        if cache is not None:
            self._cache_lane.submit(cache.store_prefill, keys, values, p.rows, p.column)
        acts.put(p.slot, out)
        return None

    def _next_weights(self, j: int, weight_loads: dict) -> None:
        if j + 2 < len(self.layers):
            # Layer j's slot is free: its compute is done (on a GPU, queued: the lane's fence waits for it).
            weight_loads[j + 2] = self._weight_lane.submit(self._prefetch_weights, j + 2)

    def _decode_layer(self, j: int, w, sizes: list[int], live_rows: torch.Tensor | None, acts: ActivationStore,
                      caches: dict, masks: list[torch.Tensor], attn_positions: torch.Tensor, past: int,
                      keep: int | None, head, loaded_cache: Callable[[tuple[int, int]], list]) -> list:
        """Layer j of a decode step for every GPU batch of the block at once: its GEMMs run once over all the batches'
        rows (one token each), so the layer's weights are read from memory once per step, not once per batch; only
        attention, which reads each batch's own cache, runs batch by batch. On the 2-core AVX2 EPYC in float32, an
        opt-1.3b layer's GEMMs run at 37-39 GFLOP/s on 16 rows and 87-89 on 1024 (benchmarks/bench_corun.py). Returns the
        head's outputs per batch, else [].

        `live_rows` (None: all): the rows whose sequence still generates (`attn_positions` holds theirs only). The
        GEMMs run on those alone; a finished row keeps its hidden state, gets zero logits, and attends with zero
        queries (its outputs are never read).
        Rows are independent, so a live row computes what it would beside any others."""
        layer = self.layers[j]
        hidden = _cat([acts.get(k) for k in range(len(sizes))])  # [sum B, 1, H]
        live = hidden if live_rows is None else hidden.index_select(0, live_rows)
        if layer.kind == "head":
            logits = _scatter_rows(self.model.lm_head(self.cfg, w, live if head is not None else live[:, -1]),
                                   live_rows, hidden.shape[0])
            return [head(k, part) if head is not None else part for k, part in enumerate(logits.split(sizes))]
        if layer.kind == "mlp":
            out = _scatter_rows(self.model.mlp(self.cfg, w, live), live_rows, hidden.shape[0], hidden)
        else:
            context = self._decode_attention(j, self.model.attention_input(self.cfg, w, live, attn_positions), sizes,
                                             live_rows, caches, masks, past, keep, loaded_cache, {})
            out = _scatter_rows(self.model.attention_output(self.cfg, w, live, context), live_rows, hidden.shape[0],
                                hidden)
        for k, part in enumerate(out.split(sizes)):
            acts.put(k, part)
        return []

    def _decode_attention(self, j: int, qkv: tuple[torch.Tensor, ...], sizes: list[int],
                          live_rows: torch.Tensor | None, caches: dict, masks: list[torch.Tensor], past: int,
                          keep: int | None, loaded_cache: Callable[[tuple[int, int]], list],
                          refilled: dict[int, tuple]) -> torch.Tensor:
        """Layer j's decode attention, GPU batch by GPU batch over each one's cache. qkv: the live rows' queries, keys
        and values [L, N or n, 1, D] -> their contexts [L, N, 1, D].

        `refilled`: per GPU batch, the rows a refill gave new sequences, and their prompts' keys and values this layer
        just computed: written into the loaded cache, where this step's attention reads them (the home's copy is
        written on the cache lane, behind this step's loads)."""
        q, key, value = (_scatter_rows(t, live_rows, sum(sizes)) for t in qkv)  # [sum B, N or n, 1, D]
        contexts, start = [], 0
        for k, size in enumerate(sizes):
            loaded = loaded_cache((j, k))
            if k in refilled:
                _place_refill(loaded, *refilled[k])
            rows = slice(start, start + size)
            contexts.append(self._decode_context(caches[j, k], q[rows], key[rows], value[rows], loaded, masks[k],
                                                 past, keep))
            self._cache_lane.submit(caches[j, k].store_token, loaded, past)
            start += size
        return _cat(contexts) if live_rows is None else _cat(contexts).index_select(0, live_rows)

    def _mixed_layer(self, j: int, w, sizes: list[int], live_rows: torch.Tensor | None, acts: ActivationStore,
                     caches: dict, masks: list[torch.Tensor], past: int, keep: int | None,
                     loaded_cache: Callable[[tuple[int, int]], list], refills: list[_Prompt],
                     positions: torch.Tensor) -> None:
        """Layer j (attention or MLP) of a decode step that also computes refills' prompts. The per-token math runs
        once over the live rows' tokens and the prompts' real tokens together, so the decode's few rows ride in the
        prompts' GEMMs (on the 2-core AVX2 EPYC in float32 a 768 x 3072 GEMM ran at 107 GFLOP/s on 64 rows and 166
        on 512); attention stays apart: the rows over their caches, each prompt over its own tokens. `positions`: the
        attention layers' positions of those tokens, in that order."""
        hidden = _cat([acts.get(k) for k in range(len(sizes))])  # [sum B, 1, H]
        live = hidden if live_rows is None else hidden.index_select(0, live_rows)
        parts = [live.reshape(1, -1, live.shape[-1]), *(acts.get(p.slot) for p in refills)]  # [1, tokens, H] each
        counts = [part.shape[1] for part in parts]
        tokens = torch.cat(parts, dim=1)
        if self.layers[j].kind == "mlp":
            out = self._packed_mlp(w, tokens)
        else:
            qkv = [t.split(counts, dim=2) for t in self.model.attention_input(self.cfg, w, tokens, positions)]
            contexts, refilled = [], {}
            for i, p in enumerate(refills, start=1):
                q, keys, values = (p.packing.unpack_heads(t[i]) for t in qkv)  # [b, N or n, S, D]
                contexts.append(p.packing.pack_heads(attend(q, keys, values, p.mask)))
                self._cache_lane.submit(caches[j, p.batch].store_prefill, keys, values, p.rows, p.column)
                refilled[p.batch] = (p.rows, p.column, keys, values)
            rows_qkv = tuple(t[0][0].transpose(0, 1).unsqueeze(2) for t in qkv)  # [1, N, L, D] -> [L, N, 1, D]
            context = self._decode_attention(j, rows_qkv, sizes, live_rows, caches, masks, past, keep, loaded_cache,
                                             refilled)
            context = torch.cat([context[:, :, 0].transpose(0, 1).unsqueeze(0), *contexts], dim=2)  # [1, N, M, D]
            out = torch.cat([self.model.attention_output(self.cfg, w, tokens[:, c], context[:, :, c])
                             for c in self._chunks(tokens.shape[1], 1)], dim=1)
        rows_out, *refill_outs = out.split(counts, dim=1)
        rows_out = _scatter_rows(rows_out.reshape(-1, 1, rows_out.shape[-1]), live_rows, hidden.shape[0], hidden)
        for k, part in enumerate(rows_out.split(sizes)):
            acts.put(k, part)
        for p, part in zip(refills, refill_outs):
            acts.put(p.slot, part)

    def _packed_mlp(self, w, tokens: torch.Tensor) -> torch.Tensor:
        """The MLP over packed tokens [1, T, H], in chunks of tokens."""
        return torch.cat([self.model.mlp(self.cfg, w, tokens[:, c]) for c in self._chunks(tokens.shape[1], 1)], dim=1)

    def _chunks(self, count: int, tokens_each: int) -> list[slice]:
        """The ranges of `count` items (sequences of `tokens_each` tokens, or single tokens) a step computes in: all
        at once, or on a CPU device chunks of about _CPU_CHUNK_TOKENS tokens."""
        per = count if self.device.type != "cpu" else max(1, _CPU_CHUNK_TOKENS // tokens_each)
        return [slice(i, min(count, i + per)) for i in range(0, count, per)]

    def _prefill_attention(self, w, hidden: torch.Tensor, mask: torch.Tensor,
                           attn_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B, S, H] -> the layer's output, and the keys and values to cache [B, n, S, D]."""
        outs, keys, values = [], [], []
        for c in self._chunks(*hidden.shape[:2]):  # attention is per sequence: chunks of sequences are independent
            q, key, value = self.model.attention_input(self.cfg, w, hidden[c], attn_positions[c])  # [b, N or n, S, D]
            outs.append(self.model.attention_output(self.cfg, w, hidden[c], attend(q, key, value, mask[c])))
            keys.append(key)
            values.append(value)
        return _cat(outs), _cat(keys), _cat(values)

    def _packed_prefill_attention(self, w, hidden: torch.Tensor,
                                  p: _Prompt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [1, T, H], the prompt's real tokens -> the layer's output for them, and the keys and values to cache
        [B, n, S, D] (zeros at the padding). The projections run on the T tokens; the scores on the padded layout."""
        q, keys, values = (p.packing.unpack_heads(t)
                           for t in self.model.attention_input(self.cfg, w, hidden, p.packed_attn_positions))
        batch, _, width, _ = q.shape
        context = p.packing.pack_heads(_cat([attend(q[c], keys[c], values[c], p.mask[c])
                                             for c in self._chunks(batch, width)]))  # [1, N, T, D]
        out = torch.cat([self.model.attention_output(self.cfg, w, hidden[:, c], context[:, :, c])
                         for c in self._chunks(hidden.shape[1], 1)], dim=1)
        return out, keys, values

    def _decode_context(self, cache: CacheHome, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        loaded: list[LoadedPiece], mask: torch.Tensor, past: int, keep: int | None) -> torch.Tensor:
        """One GPU batch's decode attention over its cache, the new token's key and value stored into it first.
        q [B, N, 1, D], key, value [B, n, 1, D] -> context [B, N, 1, D]."""
        contexts, group = [], q.shape[1] // key.shape[1]  # query heads per key/value head
        for lp in loaded:  # one piece per tier holding a range of heads; attention is independent per head
            h0, h1 = lp.piece.head_start, lp.piece.head_stop  # key/value heads; their query heads are g times these
            where = lp.k.device  # the compute device, or the CPU for --cpu-cache-compute: only q and the output move
            lp.k[:, :, past] = key[:, h0:h1, 0].to(where)
            # Half precision attends over the whole contiguous buffer, positions past this token masked out: bf16 bmm
            # copies a strided prefix view. float32 attends over the prefix view, which costs its share: an opt-1.3b
            # layer's decode attention for 64 rows took 4.3 ms over 65 of 192 positions and 11.4 ms over all of them
            # (2-core AVX2 EPYC); with refill the buffer holds twice the longest generation.
            span = past + 1 if self.dtype == torch.float32 else lp.k.shape[2]
            span_mask = F.pad(mask, (0, span - mask.shape[-1]), value=False).to(where)
            q_piece = q[:, h0 * group : h1 * group].to(where)
            if lp.v is None:  # values not staged: fetch only the rows top-k keeps
                lp.new_v = value[:, h0:h1, 0].to(where)
                top, index = top_probabilities(q_piece, lp.k[:, :, :span], span_mask, keep)
                context = attend_rows(top, cache.value_rows(lp, index.flatten(2), past))
            else:
                lp.v[:, :, past] = value[:, h0:h1, 0].to(where)
                context = attend(q_piece, lp.k[:, :, :span], lp.v[:, :, :span], span_mask, keep)
            contexts.append(context.to(self.device))
        return contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=1)

    def close(self) -> None:
        """Free every tier allocation and delete this engine's offload files."""
        for lane in (self._weight_lane, self._cache_lane):
            lane.close()
        for block_id in list(self.blocks):
            self.end_block(block_id)
        for home in self.homes:
            home.release()
        self.homes = []
        self.tiers.close()
