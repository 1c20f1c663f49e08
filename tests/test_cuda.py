"""The CUDA paths (device tier, pinned CPU tier, streams, bounce buffers): HF parity on a GPU when one is present."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import hf_greedy
from test_parity import CASES, MAX_NEW, PROMPTS, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.mark.parametrize("name,percent,gbs,ngb,extra", CASES, ids=[c[0] for c in CASES])
def test_greedy_matches_hf_on_cuda(tmp_path, opt_postln_dir, name, percent, gbs, ngb, extra):
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity needs true fp32 matmuls
    ours, _ = run_cli(tmp_path, opt_postln_dir, "--percent", *percent.split(), "--gpu-batch-size", str(gbs),
                      "--num-gpu-batches", str(ngb), *extra, device="cuda")
    assert ours == hf_greedy(opt_postln_dir, PROMPTS, MAX_NEW)
