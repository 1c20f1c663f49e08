"""A CPU compute device's kernels and heap: oneDNN-packed resident weights (bf16) give F.linear's numbers with the
same bytes counted, only where a layer lives whole in compute memory; malloc serves large temporaries from its heap."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from flexgen_dist.engine.generation import BlockRun, Sequence
from flexgen_dist.engine.policy import Policy
from flexgen_dist.engine.stage_engine import BatchInput, StageEngine
from flexgen_dist.io.weights import DummyWeights
from flexgen_dist.memory.host_heap import MMAP_THRESHOLD_BYTES, keep_freed_memory
from flexgen_dist.models import prepack
from flexgen_dist.models.family import model_layers
from flexgen_dist.models.opt import OPT_SIZES
from flexgen_dist.policy.hardware import DtypeSpeeds, HardwareProfile
from flexgen_dist.policy.profiler import measure_gemm, measure_step_overhead

CPU = torch.device("cpu")
needs_bf16_kernels = pytest.mark.skipif(not prepack.supported(CPU, torch.bfloat16),
                                        reason="this CPU has no oneDNN bf16 kernels (no AVX512-BF16 or AMX)")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def test_large_temporaries_come_from_the_heap_not_fresh_mmaps():
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _Mallinfo2
    assert keep_freed_memory()
    mapped = mallinfo2().hblkhd  # bytes in blocks malloc mmapped on their own
    t = torch.empty(MMAP_THRESHOLD_BYTES // 2, dtype=torch.uint8)
    assert mallinfo2().hblkhd == mapped and mallinfo2().uordblks >= t.numel()
    del t


@needs_bf16_kernels
@pytest.mark.parametrize("rows_hint", [1, 4, 512])
def test_packed_linear_equals_f_linear(rows_hint):
    torch.manual_seed(0)
    w, b = torch.randn(384, 128, dtype=torch.bfloat16), torch.randn(384, dtype=torch.bfloat16)
    packed = prepack.pack(w, rows_hint)
    assert packed.is_mkldnn
    for x in (torch.randn(4, 128, dtype=torch.bfloat16), torch.randn(4, 9, 128, dtype=torch.bfloat16)):
        assert torch.equal(prepack.linear(x, packed, b), F.linear(x, w, b))
        assert torch.equal(prepack.linear(x, packed), F.linear(x, w))
    strided = torch.randn(9, 4, 128, dtype=torch.bfloat16).transpose(0, 1)  # oneDNN misreads these unless copied
    torch.testing.assert_close(prepack.linear(strided, packed, b), F.linear(strided.contiguous(), w, b))
    plain = torch.randn(384, 128)
    assert torch.equal(prepack.linear(torch.ones(2, 128), plain), F.linear(torch.ones(2, 128), plain))  # float32: F.linear



@needs_bf16_kernels
def test_profiler_times_the_packed_kernel_for_resident_weights():
    plain = measure_gemm(CPU, torch.bfloat16, 256, 256, (1, 16))
    packed = measure_gemm(CPU, torch.bfloat16, 256, 256, (1, 16), packed=True)
    assert set(plain) == set(packed) == {1, 16} and all(rate > 0 for rate in (*plain.values(), *packed.values()))


def test_profiler_times_the_engine_step_overhead(tmp_path):
    """What the engine's decode step spends beyond the cost model's terms: positive, and about a millisecond a window
    (a profile whose compute is free leaves the whole step to it)."""
    speeds = DtypeSpeeds({"256x256": {1: 1e18}}, 1e18, 1e18, 1e18, 1e18)
    free = HardwareProfile("free compute", "cpu", 1 << 34, 1 << 34, 1 << 40, 1e18, 1e18, 1e18, 1e18, 1e18,
                           {"float32": speeds})
    per_window, per_batch, codec = measure_step_overhead(CPU, torch.float32, str(tmp_path), free, hidden_size=64,
                                                         steps=4)
    assert 0 < per_window + per_batch < 0.05 and 0 <= codec < 0.05

def _cfg():
    base = OPT_SIZES["opt-125m"]
    return type(base)(**{**base.__dict__, "num_layers": 2, "name": "opt-125m-2l"})


def _generate(tmp_path, policy: Policy) -> tuple[list[torch.Tensor], StageEngine]:
    cfg = _cfg()
    engine = StageEngine(cfg, model_layers(cfg), policy, DummyWeights(), CPU, torch.bfloat16, str(tmp_path))
    block = BlockRun(0, [Sequence(list(range(4 + i, 20 + i)), 5) for i in range(4)], 2, 1, (2,), ignore_eos=True)
    engine.start_block(0, block.batch_sizes, block.capacity)
    logits = []
    while not block.done:
        step = engine.step(0, [BatchInput(t, v) for t, v in zip(block.tokens, block.valid)])
        logits += step
        block.advance([x.argmax(-1) for x in step])
    engine.end_block(0)
    return logits, engine


@needs_bf16_kernels
@pytest.mark.parametrize("percent", [(100, 0), (0, 100)], ids=["gpu-tier", "cpu-tier"])
def test_engine_packs_resident_layers_and_matches_unpacked(tmp_path, monkeypatch, percent):
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=percent[0], w_cpu_percent=percent[1])
    packed_logits, packed = _generate(tmp_path, policy)
    monkeypatch.setenv(prepack.DISABLE_ENV, "0")
    plain_logits, plain = _generate(tmp_path, policy)
    try:
        assert packed.homes[0].kernel_weights is None  # the embedding: nothing to multiply by
        for home in packed.homes[1:]:
            assert home.kernel_weights is not None
            for w in home.layer.weights:
                assert home.kernel_weights[w.name].is_mkldnn == w.is_linear
        assert all(home.kernel_weights is None for home in plain.homes)
        for a, b in zip(packed_logits, plain_logits, strict=True):
            assert torch.equal(a, b)
        # The packed copies take the flat buffers' place: the tiers count the same bytes.
        assert packed.tiers.peak_bytes() == plain.tiers.peak_bytes()
        assert all(h.pieces[0][3].untyped_storage().nbytes() == 0 for h in packed.homes[1:])
    finally:
        packed.close()
        plain.close()


@needs_bf16_kernels
def test_streamed_and_compressed_layers_are_not_packed(tmp_path):
    cfg = _cfg()
    for policy in (Policy(w_gpu_percent=50, w_cpu_percent=0), Policy(compress_weight=True)):
        engine = StageEngine(cfg, model_layers(cfg), policy, DummyWeights(), CPU, torch.bfloat16, str(tmp_path))
        try:
            assert all(home.kernel_weights is None for home in engine.homes)
        finally:
            engine.close()
