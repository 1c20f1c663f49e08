"""The three memory tiers of one engine: compute device ("gpu"), CPU memory, disk files, with byte accounting.

On a CPU-only machine the "gpu" tier is the compute device's memory, which is CPU memory: both memory tiers are then
addressable by compute, and the engine skips copies between them.
"""

from __future__ import annotations

import enum
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.memory.disk import DiskTensor, aligned_empty
from flexgen_dist.memory.page_locked import PageLockedBuffers
from flexgen_dist.memory.stats import TransferStats


class Tier(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


TIERS = (Tier.GPU, Tier.CPU, Tier.DISK)

Stored = torch.Tensor | DiskTensor


def ensure_offload_root(root: str | Path | None) -> Path:
    """The directory offload files go under (created if needed), or a one-line UserError."""
    path = Path(root).expanduser() if root else Path(tempfile.gettempdir())
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create offload directory {path}: {e.strerror}") from None
    return path


_RUN_ID = re.compile(r"[0-9a-f]{16}")


def new_run_id() -> str:
    """Names a run's stage directories: random, so two runs sharing an offload root never meet."""
    return secrets.token_hex(8)


def stage_offload_dir(root: str | Path | None, run_id: str, stage: int) -> Path:
    """The directory stage `stage` of run `run_id` keeps its offload files under (created on first use, by TierSet).

    One already there belongs to this very stage in a process that died (Ray restarts a lost stage actor in a new
    process, which calls this again): nothing else can bear the name, and nothing else would ever delete its files,
    so it is removed. Only a real directory of exactly this name is; anything else there is refused."""
    if not _RUN_ID.fullmatch(run_id) or stage < 0:
        raise ValueError(f"bad run id {run_id!r} or stage {stage}")
    path = (Path(root).expanduser() if root else Path(tempfile.gettempdir())) / f"flexgen-{run_id}-stage{stage}"
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"offload path {path} exists and is not a directory this run made; remove it")
    if path.exists():
        shutil.rmtree(path)
    return path


class TierSet:
    """Allocates tensors in a tier and keeps current and peak bytes per tier (the summary's `peak_bytes`)."""

    def __init__(self, device: torch.device, offload_dir: str | Path | None) -> None:
        self.device = device
        self.pin_memory = device.type == "cuda"
        self._offload_root = offload_dir
        self._dir: Path | None = None  # created on first disk allocation; the engine deletes only this directory
        self._files = 0
        self._lock = threading.Lock()  # I/O threads allocate and free staging buffers too
        self.stats = TransferStats()
        self.current = {t: 0 for t in TIERS}
        self.peak = {t: 0 for t in TIERS}
        self.page_locked = PageLockedBuffers(aligned_empty, self._page_lock, self._page_unlock)  # lasting CPU tensors

    def addressable(self, tier: Tier) -> bool:
        """Can compute read this tier's tensors in place?"""
        return tier is Tier.GPU or (tier is Tier.CPU and self.device.type == "cpu")

    def _count(self, tier: Tier, nbytes: int) -> None:
        with self._lock:
            self.current[tier] += nbytes
            self.peak[tier] = max(self.peak[tier], self.current[tier])

    def empty(self, tier: Tier, shape: tuple[int, ...], dtype: torch.dtype, name: str = "t",
              lasting: bool = False) -> Stored:
        """`lasting`: held for the run or a block (homes, staging slots), so a CPU-tier tensor is page-locked in place
        at its exact size; transient ones (per-step staging) come from torch's caching pinned allocator, which reuses
        them step after step."""
        if tier is Tier.DISK:
            stored: Stored = DiskTensor(self._new_path(name), tuple(shape), dtype)
        elif tier is Tier.GPU and self.device.type != "cpu":
            stored = torch.empty(shape, dtype=dtype, device=self.device)
        else:
            # Page-aligned so disk reads can land here directly; pinned on CUDA for async copies.
            if self.pin_memory and lasting:
                stored = self.page_locked.take(tuple(shape), dtype)
            else:
                stored = aligned_empty(tuple(shape), dtype, pin_memory=self.pin_memory)
        self._count(tier, stored.nbytes)
        return stored

    @staticmethod
    def _page_lock(t: torch.Tensor) -> None:
        """Page-lock a CPU tensor in place. torch's pinned allocator rounds every block up to a power of two, which
        took an opt-6.7b run's 8.7 GB CPU-tier cache to 18.4 GB of RSS on an H100 host: registering costs the bytes
        asked for."""
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.nbytes, 0)
        if int(err) != 0:
            raise UserError(f"cannot page-lock {t.nbytes} B of CPU memory for the GPU "
                            f"(cudaHostRegister error {int(err)}); lower the cpu budget or the ulimit -l")

    def _page_unlock(self, t: torch.Tensor) -> None:
        torch.cuda.synchronize(self.device)  # no copy may still read it
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())

    def release(self, tier: Tier, stored: Stored) -> None:
        self._count(tier, -stored.nbytes)
        if isinstance(stored, DiskTensor):
            stored.delete()
        elif self.pin_memory:
            self.page_locked.release(stored)  # kept locked for the next block's homes (page_locked.py)

    def _new_path(self, name: str) -> Path:
        with self._lock:
            if self._dir is None:
                root = ensure_offload_root(self._offload_root)
                try:
                    self._dir = Path(tempfile.mkdtemp(prefix="flexgen-", dir=root))
                except OSError as e:
                    raise UserError(f"cannot create offload directory under {root}: {e.strerror}") from None
            self._files += 1
            return self._dir / f"{self._files:06d}-{name}.bin"

    def close(self) -> None:
        """Remove the offload files this engine created (only its own directory); unpin what is still pinned."""
        self.page_locked.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def peak_bytes(self) -> dict[str, int]:
        return {t.value: self.peak[t] for t in TIERS}
