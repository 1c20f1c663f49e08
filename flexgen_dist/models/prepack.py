"""Linear weights packed once into oneDNN's blocked layout, for a CPU compute device in bf16.

torch's `F.linear` on CPU bf16 reorders the weight into oneDNN's blocked layout on every call. A layer that stays in
compute memory for the whole run can be reordered once, when it is loaded. Measured on the 2-core AVX-512-bf16
EPYC with benchmarks/profile_step.py (4 layers of opt-1.3b, 32 x 128 tokens; docs/benchmark-history.md): a decode step went from
0.088 to 0.075 s, the prefill from 4.35 to 4.16 s. For contiguous inputs the results are bit-identical to `F.linear`.

Only the math's `linear` knows about packed weights: a packed weight is a tensor with `is_mkldnn` set, and anything
else goes through `F.linear` unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

DISABLE_ENV = "FLEXGEN_CPU_PREPACK"  # "0" turns packing off (A/B measurements, and the tests that compare both)


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights resident in compute memory get packed: a CPU device, bf16 with oneDNN's bf16 kernels."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and os.environ.get(DISABLE_ENV, "1") != "0"
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """The [out, in] weight in oneDNN's layout. `rows_hint`: the input rows the kernel is tuned for (the GPU batch
    size: decode's GEMMs have that many rows, and prefill's many more, which any choice runs near the peak)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, also for a packed weight (which needs a contiguous input: oneDNN reads strided ones wrongly)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
