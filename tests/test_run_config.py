"""Device and dtype defaults."""

from __future__ import annotations

import torch

from flexgen_dist.base.devices import cpu_has_native_bf16, resolve_dtype


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return str(path)


def test_bf16_is_native_only_with_avx512_bf16_or_amx(tmp_path):
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse2 avx2 fma avx512f avx512_bf16"))
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu avx2 amx_bf16 amx_tile"))
    assert not cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse2 avx2 fma avx512f"))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def test_explicit_dtype_wins_and_cuda_defaults_to_fp16():
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is torch.float16
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype(None, torch.device("cpu")) is expected
