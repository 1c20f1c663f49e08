"""Disk tier: tensors stored in files under the offload directory, moved with O_DIRECT.

Why O_DIRECT: on the target machine buffered reads are several times slower than direct ones, and the page cache counts
against the cgroup memory limit, which would silently turn the "disk" tier into RAM.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, TypeVar

import torch

ALIGN = 4096
CHUNK = 8 << 20  # bytes per syscall in bulk transfers (measured with benchmarks/bench_disk.py)
THREADS = 4  # concurrent preadv/pwritev calls keep the device queue full; os.preadv releases the GIL
_WINDOW = CHUNK * THREADS  # bounce-buffer size: one chunk per worker

_log = logging.getLogger(__name__)


def _new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(THREADS, thread_name_prefix="disk-io")  # threads start on first submit


# A persistent pool: creating threads per call costs ~1 ms on 2 cores. A forked child inherits none of the threads.
_pool = _new_pool()
os.register_at_fork(after_in_child=lambda: globals().update(_pool=_new_pool()))
_F = TypeVar("_F", bound=Callable)


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, pin_memory: bool = False) -> torch.Tensor:
    """A contiguous CPU tensor whose data_ptr is ALIGN-aligned and whose backing storage extends at least to the next
    multiple of ALIGN past its end (so an O_DIRECT transfer rounded up to ALIGN may touch it safely).
    pin_memory is ignored without CUDA."""
    nbytes = math.prod(shape) * dtype.itemsize
    pin = pin_memory and torch.cuda.is_available()
    base = torch.empty(nbytes + 2 * ALIGN, dtype=torch.uint8, pin_memory=pin)
    off = -base.data_ptr() % ALIGN
    return base[off:off + nbytes].view(dtype).view(shape)


def has_room_for_direct_io(t: torch.Tensor, nbytes: int) -> bool:
    """True if t's memory is ALIGN-aligned and its storage holds round_up(nbytes) bytes from t.data_ptr()."""
    s = t.untyped_storage()
    room = s.data_ptr() + s.nbytes() - t.data_ptr()
    return t.device.type == "cpu" and t.data_ptr() % ALIGN == 0 and room >= _round_up(nbytes)


def _mem(ptr: int, n: int) -> memoryview:
    """Raw memory as a writable buffer for os.preadv/os.pwritev (works for any dtype, bfloat16 included)."""
    return memoryview((ctypes.c_char * n).from_address(ptr)).cast("B")


def _pio(fd: int, write: bool, ptr: int, off: int, n: int) -> None:
    """pwrite/pread of exactly n bytes, retrying short transfers (Linux caps one syscall at ~2 GiB)."""
    while n:
        done = os.pwritev(fd, [_mem(ptr, n)], off) if write else os.preadv(fd, [_mem(ptr, n)], off)
        if done == 0:
            raise OSError(errno.EIO, f"unexpected end of file at offset {off}")
        ptr, off, n = ptr + done, off + done, n - done


@functools.lru_cache(maxsize=None)
def _note_no_direct(directory: Path) -> None:
    """Logged once per directory, not once per tensor file."""
    _log.info("O_DIRECT unsupported under %s; using buffered I/O with FADV_DONTNEED", directory)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class OffloadDiskFull(OSError):
    """No space (or quota) left for an offload file. Still an OSError with its errno and path, but its line says what
    to do: the CLI prints str() (exit 1), and a resumed run picks up from the results written."""

    def __str__(self) -> str:
        return (f"no space left for offload file {self.filename} ({self.strerror}): free space on that disk or point "
                "--offload-dir at a larger one; results already written are kept: run again with the same --output "
                "to resume")


def _with_path(e: OSError, path: Path) -> OSError:
    """The error to raise for an OSError on an offload file: pread/pwrite errors carry no filename, so add it."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OffloadDiskFull(e.errno, e.strerror, str(path))
    if e.filename is not None:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


def _path_in_errors(method: _F) -> _F:
    """Re-raise OSErrors from pread/pwrite as `_with_path` gives them, for one-line CLI errors."""
    @functools.wraps(method)
    def wrapper(self: DiskTensor, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            error = _with_path(e, self.path)
            if error is e:
                raise
            raise error from e
    return wrapper  # type: ignore[return-value]


class DiskTensor:
    """A tensor stored in its own file under an offload directory; dim 0 is the "row" dimension."""

    def __init__(self, path: os.PathLike, shape: tuple[int, ...], dtype: torch.dtype):
        self.path = Path(path)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.row_nbytes = math.prod(self.shape[1:]) * dtype.itemsize
        self.nbytes = self.shape[0] * self.row_nbytes
        self.direct_bytes = 0  # bytes moved with O_DIRECT (lets tests and benchmarks see which path ran)
        # Small appends (one KV row) and unaligned writes go through this buffered fd; bulk I/O through the direct one.
        self._fd_direct: int | None = None
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise _with_path(e, self.path) from None
        try:
            os.ftruncate(self._fd, _round_up(self.nbytes))  # direct I/O rounded up to ALIGN stays inside the file
        except OSError as e:
            self.delete()
            raise _with_path(e, self.path) from None
        try:
            self._fd_direct = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                self.delete()
                raise
            _note_no_direct(self.path.parent)

    def _direct(self, write: bool, ptr: int, off: int, n: int) -> None:
        """O_DIRECT transfer of n bytes (ptr, off, n all ALIGN multiples), split in CHUNKs run by the thread pool."""
        self.direct_bytes += n
        chunks = [(ptr + i, off + i, min(CHUNK, n - i)) for i in range(0, n, CHUNK)]
        if len(chunks) == 1:
            return _pio(self._fd_direct, write, *chunks[0])
        futures = [_pool.submit(_pio, self._fd_direct, write, *c) for c in chunks]
        wait(futures)  # all must finish before raising: they may write into memory the caller frees
        for f in futures:
            f.result()

    def _buffered(self, write: bool, ptr: int, off: int, n: int) -> None:
        _pio(self._fd, write, ptr, off, n)
        if self._fd_direct is None:  # fallback mode: keep the page cache from holding the disk tier
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _check(self, t: torch.Tensor, rows: int, what: str) -> None:
        if t.device.type != "cpu" or t.dtype != self.dtype:
            raise ValueError(f"{what} must be a CPU {self.dtype} tensor, got {t.device} {t.dtype}")
        if t.numel() < rows * math.prod(self.shape[1:]):
            raise ValueError(f"{what} of shape {tuple(t.shape)} is too small for {rows} rows of {self.shape}")

    @_path_in_errors
    def write_rows(self, src: torch.Tensor, row_start: int = 0) -> None:
        """Write src (CPU, same dtype, shape [k, *shape[1:]]) to rows [row_start, row_start + k)."""
        if tuple(src.shape[1:]) != tuple(self.shape[1:]) or not 0 <= row_start <= self.shape[0] - len(src):
            raise ValueError(f"cannot write {tuple(src.shape)} at row {row_start} of {tuple(self.shape)}")
        self._check(src, len(src), "src")
        src = src.contiguous()
        off, n = row_start * self.row_nbytes, src.nbytes
        if n == 0:
            return
        # O_DIRECT needs an aligned offset and a whole number of blocks; padding is allowed only past the tensor's end.
        if self._fd_direct is None or off % ALIGN or (n % ALIGN and off + n != self.nbytes):
            return self._buffered(True, src.data_ptr(), off, n)
        if has_room_for_direct_io(src, n):
            return self._direct(True, src.data_ptr(), off, _round_up(n))
        # Unaligned source (e.g. weights from a checkpoint): copy through a bounce buffer, never via the page cache.
        src_b, bounce = _as_bytes(src), aligned_empty((min(_WINDOW, _round_up(n)),), torch.uint8)
        for i in range(0, n, _WINDOW):
            m = min(_WINDOW, n - i)
            bounce[:m].copy_(src_b[i:i + m])
            self._direct(True, bounce.data_ptr(), off + i, _round_up(m))

    @_path_in_errors
    def read_rows_into(self, dst: torch.Tensor, row_start: int = 0, row_stop: int | None = None) -> None:
        """Read rows [row_start, row_stop) into the first elements of dst (contiguous CPU tensor, same dtype).
        Only dst's own bytes are written: a partial last block is read through a small bounce buffer."""
        row_stop = self.shape[0] if row_stop is None else row_stop
        if not 0 <= row_start <= row_stop <= self.shape[0]:
            raise ValueError(f"bad row range [{row_start}, {row_stop}) for {tuple(self.shape)}")
        if not dst.is_contiguous():
            raise ValueError("dst must be contiguous")
        self._check(dst, row_stop - row_start, "dst")
        off, n, ptr = row_start * self.row_nbytes, (row_stop - row_start) * self.row_nbytes, dst.data_ptr()
        if n == 0:
            return
        if self._fd_direct is None:
            return self._buffered(False, ptr, off, n)
        # Fast path: whole blocks straight into dst; whatever is left goes through the bounce path below.
        body = n - n % ALIGN if off % ALIGN == 0 and ptr % ALIGN == 0 else 0
        if body:
            self._direct(False, ptr, off, body)
        if body == n:
            return
        # Slow path: read the aligned superset of [off + body, off + n) window by window and copy out the wanted bytes.
        dst_b, lo, hi = _as_bytes(dst), off + body - (off + body) % ALIGN, _round_up(off + n)
        bounce = aligned_empty((min(_WINDOW, hi - lo),), torch.uint8)
        for w in range(lo, hi, _WINDOW):
            wn = min(_WINDOW, hi - w)
            self._direct(False, bounce.data_ptr(), w, wn)
            a, b = max(w, off + body), min(w + wn, off + n)
            dst_b[a - off:b - off].copy_(bounce[a - w:b - w])

    def delete(self) -> None:
        """Close the file descriptors and remove the file; safe to call more than once."""
        for fd in (self._fd, self._fd_direct):
            if fd is not None:
                os.close(fd)
        self._fd = self._fd_direct = None
        self.path.unlink(missing_ok=True)
