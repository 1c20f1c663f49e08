"""glibc's malloc kept from handing freed memory back to the OS while a CPU device computes.

By default glibc serves large blocks with fresh mmaps and trims the heap top soon after a free, so a step's large
temporaries (activations, MLP outputs) are new pages every time, and each first touch is a page fault that zeroes
4 KiB. With blocks up to glibc's largest mmap threshold (32 MiB) served from the heap, and up to 256 MiB of freed heap
kept, they are reused instead. Together with the engine's 512-token prefill chunks, which keep every temporary under
the threshold, a 4-layer opt-1.3b prefill of 32 x 128 tokens went from 4.67 to 4.27 s on the 2-core AVX-512-bf16 EPYC
(docs/benchmark-history.md).
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """Tune this process's malloc; False where it is not glibc's (nothing changes then)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(mmap_set) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
