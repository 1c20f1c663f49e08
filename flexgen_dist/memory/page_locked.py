"""Page-locked CPU buffers for a GPU device, kept for reuse when released.

A block's CPU-tier KV cache homes are page-locked in place (cudaHostRegister) when the block starts and were unlocked
when it ended: with many blocks, both sat between blocks on the hot path, and locking costs time in proportion to the
bytes (the kernel pins every page) while unlocking first waits for the device. Released buffers are now kept, still
locked, and handed to the next request of the same shape and dtype; a run's blocks have the same shapes, save a
smaller last one. The buffers kept spare plus those in use never exceed the most ever in use at once, so reuse holds
no more memory than the run already held at its peak.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import torch


class PageLockedBuffers:
    """`allocate(shape, dtype)` makes a CPU tensor, `lock(t)` / `unlock(t)` page-lock it and undo that (on a GPU
    device: cudaHostRegister and, after a device sync, cudaHostUnregister). Thread-safe: I/O lanes free buffers too."""

    def __init__(self, allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
                 lock: Callable[[torch.Tensor], None], unlock: Callable[[torch.Tensor], None]) -> None:
        self._allocate, self._lock_fn, self._unlock_fn = allocate, lock, unlock
        self._mutex = threading.Lock()
        self._in_use: dict[int, torch.Tensor] = {}  # data_ptr -> buffer
        self._spare: list[torch.Tensor] = []  # released, still locked; oldest first
        self._in_use_bytes = self._spare_bytes = self._peak_bytes = 0
        self.locks = self.reuses = 0  # how many buffers were locked, and how many requests a spare served

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A locked buffer of `shape` and `dtype`: a spare one when one fits exactly, else a new one."""
        shape, nbytes = tuple(shape), math.prod(shape) * dtype.itemsize
        with self._mutex:
            for i, t in enumerate(self._spare):
                if tuple(t.shape) == shape and t.dtype == dtype:
                    del self._spare[i]
                    self._spare_bytes -= nbytes
                    self._hold(t, nbytes)
                    self.reuses += 1
                    return t
            # Unlock the oldest spares until spare + in use + this one stays within the peak this one makes.
            peak = max(self._peak_bytes, self._in_use_bytes + nbytes)
            evicted = []
            while self._spare and self._in_use_bytes + nbytes + self._spare_bytes > peak:
                evicted.append(self._spare.pop(0))
                self._spare_bytes -= evicted[-1].nbytes
        for t in evicted:
            self._unlock_fn(t)
        t = self._allocate(shape, dtype)
        self._lock_fn(t)
        with self._mutex:
            self._hold(t, nbytes)
            self.locks += 1
        return t

    def _hold(self, t: torch.Tensor, nbytes: int) -> None:
        self._in_use[t.data_ptr()] = t
        self._in_use_bytes += nbytes
        self._peak_bytes = max(self._peak_bytes, self._in_use_bytes)

    def release(self, t: torch.Tensor) -> None:
        """Keep `t` for reuse, if it is one of these buffers (others are not locked: nothing to do)."""
        with self._mutex:
            if self._in_use.pop(t.data_ptr(), None) is None:
                return
            self._in_use_bytes -= t.nbytes
            self._spare.append(t)
            self._spare_bytes += t.nbytes

    def close(self) -> None:
        """Unlock every buffer, in use or spare, so that each can be freed."""
        with self._mutex:
            buffers = [*self._in_use.values(), *self._spare]
            self._in_use, self._spare = {}, []
            self._in_use_bytes = self._spare_bytes = 0
        for t in buffers:
            self._unlock_fn(t)
