"""The group-wise quantizer: error bounds per group, packing, odd sizes and padding, constant groups, byte counts."""

from __future__ import annotations

import pytest
import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.memory.compression import (
    QuantConfig,
    dequantize,
    dequantize_into,
    from_records,
    quantize,
    quantized_nbytes,
    record_nbytes,
    to_records,
)

CONFIGS = [QuantConfig(bits=b, symmetric=s, group_size=g) for b in (4, 8) for s in (False, True) for g in (64, 32)]


def _groups_along(x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    x = x.movedim(cfg.dim, -1)
    n = x.shape[-1] - x.shape[-1] % cfg.group_size
    return x[..., :n].reshape(*x.shape[:-1], -1, cfg.group_size)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.bits}b-{'sym' if c.symmetric else 'asym'}-g{c.group_size}")
def test_round_trip_error_within_half_a_step_per_group(cfg):
    x = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 256)
    q = quantize(x, cfg)
    err = (dequantize(q, torch.float32) - x).abs()
    groups, errs = _groups_along(x, cfg), _groups_along(err, cfg)
    if cfg.symmetric:
        step = groups.abs().amax(-1) / (cfg.max_code // 2)
    else:
        step = (groups.amax(-1) - groups.amin(-1)) / cfg.max_code
    # Half a quantization step, plus float16 rounding of the stored scale and minimum.
    bound = 0.5 * step * (1 + 2e-3) + groups.abs().amax(-1) * 2e-3
    assert (errs.amax(-1) <= bound).all()


def test_eight_bits_are_much_closer_than_four():
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    err4 = (dequantize(quantize(x, QuantConfig(bits=4)), torch.float32) - x).abs().mean()
    err8 = (dequantize(quantize(x, QuantConfig(bits=8)), torch.float32) - x).abs().mean()
    assert err8 < err4 / 10


def test_four_bit_codes_are_packed_two_per_byte():
    # One group holding 0..15 four times: min 0, max 15, so scale 1 and each code equals its value.
    x = torch.arange(16.0).repeat(4)[None]
    q = quantize(x, QuantConfig(bits=4))
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (1, 32)
    # Element i in the low nibble of byte i, element i + 32 in its high nibble.
    expected = [v | (v << 4) for v in range(16)] * 2
    assert q.codes.flatten().tolist() == expected
    assert torch.equal(dequantize(q, torch.float32), x)
    assert quantize(x, QuantConfig(bits=8)).codes.shape == (1, 64)


@pytest.mark.parametrize("shape,dim", [((3, 100), -1), ((100, 3), 0), ((2, 5, 7, 65), -1), ((1, 1), -1), ((5, 63), 1)])
def test_odd_sizes_are_padded_and_restored(shape, dim):
    cfg = QuantConfig(bits=8, group_size=64, dim=dim)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    back = dequantize(quantize(x, cfg), torch.float32)
    assert back.shape == x.shape
    assert (back - x).abs().max() <= x.abs().max() * 2 / 255 + 1e-6
    assert quantize(x, cfg).nbytes == quantized_nbytes(shape, cfg)


def test_padding_does_not_widen_the_last_group():
    x = torch.cat([torch.full((1, 64), 5.0), torch.linspace(10.0, 10.5, 6)[None]], dim=1)  # last group: 6 of 64 real
    q = quantize(x, QuantConfig(bits=4))
    assert float(q.minimum[0, 1]) == pytest.approx(10.0, abs=1e-2)  # zero padding would have dragged it to 0
    assert (dequantize(q, torch.float32) - x).abs().max() < 0.5 / 15 + 1e-2


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: f"{c.bits}b-{'sym' if c.symmetric else 'asym'}")
@pytest.mark.parametrize("value", [0.0, 1.25, -3.0])
def test_constant_groups_round_trip_without_nan(cfg, value):
    x = torch.full((4, 128), value)
    back = dequantize(quantize(x, cfg), torch.float32)
    assert torch.isfinite(back).all()
    assert torch.allclose(back, x, atol=abs(value) * 2e-3 + 1e-6)


def test_bf16_weights_compress_to_under_30_percent():
    shape = (4096, 4096)
    assert quantized_nbytes(shape, QuantConfig(bits=4)) <= 0.30 * 4096 * 4096 * 2
    x = torch.randn(256, 4096).to(torch.bfloat16)
    q = quantize(x, QuantConfig(bits=4))
    assert q.nbytes <= 0.30 * x.numel() * 2
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs", [{"bits": 3}, {"group_size": 63}, {"group_size": 0}])
def test_bad_configs_are_user_errors(kwargs):
    with pytest.raises(UserError):
        QuantConfig(**kwargs)


def test_rows_of_a_matrix_grouped_along_rows_quantize_independently():
    """Chunks of whole groups of rows give the same codes and metadata as the whole matrix (so weights can be
    quantized a chunk at a time straight into their packed layout)."""
    x = torch.randn(200, 48, generator=torch.Generator().manual_seed(3))
    cfg = QuantConfig(bits=4, group_size=64, dim=0)
    whole = quantize(x, cfg)
    top, rest = quantize(x[:128], cfg), quantize(x[128:], cfg)
    assert torch.equal(torch.cat([top.codes, rest.codes]), whole.codes)
    assert torch.equal(torch.cat([top.scale, rest.scale]), whole.scale)
    assert torch.equal(torch.cat([top.minimum, rest.minimum]), whole.minimum)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.bits}b-{'sym' if c.symmetric else 'asym'}-g{c.group_size}")
def test_records_round_trip_into_strided_outputs(cfg):
    """A KV cache stores one byte record per (position, batch, head) and dequantizes into a permuted staging view."""
    x = torch.randn(5, 2, 3, 96, generator=torch.Generator().manual_seed(4))  # [S, B, h, D]
    q = quantize(x, QuantConfig(cfg.bits, cfg.group_size, -1, cfg.symmetric))
    records = to_records(q)
    assert records.dtype == torch.uint8 and records.shape == (5, 2, 3, record_nbytes(96, cfg))
    staged = torch.zeros(2, 3, 6, 96)  # [B, h, S + 1, D], as the engine stages it
    dequantize_into(from_records(records, 96, cfg), staged[:, :, :5].permute(2, 0, 1, 3))
    torch.testing.assert_close(staged[:, :, :5].permute(2, 0, 1, 3), dequantize(q, torch.float32))
    assert (staged[:, :, 5] == 0).all()


def test_dequantize_into_bf16_stays_within_bf16_rounding_of_float32():
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(5))
    q = quantize(x, QuantConfig(bits=8, dim=0))
    exact = dequantize(q, torch.float32)
    torch.testing.assert_close(dequantize(q, torch.bfloat16).float(), exact, rtol=2 ** -7, atol=2 ** -7 * exact.abs().max().item())
