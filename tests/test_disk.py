"""Disk tier: O_DIRECT round trips, partial and unaligned reads, the KV-append pattern, fallback and errors."""
import errno
import fcntl
import os
import signal

import pytest
import torch

from flexgen_dist.memory import disk
from flexgen_dist.memory.disk import ALIGN, DiskTensor, aligned_empty, has_room_for_direct_io

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(shape, dtype, unaligned=True):
    """Random data; by default deliberately not ALIGN-aligned in memory (as tensors from a checkpoint would be)."""
    n = torch.Size(shape).numel()
    flat = torch.randn(n + 1).to(dtype)
    return (flat[1:] if unaligned else flat[:n]).view(shape)


def same(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def direct_or_skip(t: DiskTensor) -> None:
    if t._fd_direct is None:
        pytest.skip(f"filesystem of {t.path.parent} has no O_DIRECT (e.g. tmpfs): the direct path cannot be checked")


@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (1000, 13), (0, 4)])
@pytest.mark.parametrize("dtype", [torch.uint8, *DTYPES])
def test_aligned_empty(shape, dtype):
    t = aligned_empty(shape, dtype, pin_memory=True)  # pin_memory is ignored without CUDA
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert t.data_ptr() % ALIGN == 0
    assert has_room_for_direct_io(t, t.numel() * t.element_size())


def test_has_room_rejects_unaligned_or_short():
    base = aligned_empty((2 * ALIGN,), torch.uint8)
    assert has_room_for_direct_io(base, 2 * ALIGN + 1)  # aligned_empty leaves room for the rounded-up block
    assert not has_room_for_direct_io(base[1:], 10)
    assert not has_room_for_direct_io(base, 10 * ALIGN)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unaligned_src", [True, False])
def test_round_trip_odd_shapes(tmp_path, dtype, unaligned_src):
    src = rand((37, 5, 11), dtype, unaligned_src)
    t = DiskTensor(tmp_path / "w.bin", src.shape, dtype)
    assert t.nbytes == src.numel() * src.element_size() and t.row_nbytes == 55 * src.element_size()
    assert os.path.getsize(t.path) == -(-t.nbytes // ALIGN) * ALIGN
    t.write_rows(src)
    for dst in (aligned_empty(src.shape, dtype), torch.empty(src.numel() + 1, dtype=dtype)[1:].view(src.shape)):
        t.read_rows_into(dst)
        assert same(dst, src)
    t.delete()


def test_partial_reads_aligned_and_unaligned_rows(tmp_path):
    src = rand((64, 1024), torch.float32)  # 4 KiB rows: every row offset is aligned
    t = DiskTensor(tmp_path / "a.bin", src.shape, src.dtype)
    t.write_rows(src)
    dst = aligned_empty((37, 1024), src.dtype)
    t.read_rows_into(dst, 3, 40)
    assert same(dst, src[3:40])

    src = rand((50, 333), torch.float16)  # 666-byte rows: row 7 starts mid-block
    u = DiskTensor(tmp_path / "u.bin", src.shape, src.dtype)
    u.write_rows(src)
    for dst in (aligned_empty((22, 333), src.dtype), torch.empty(22 * 333 + 3, dtype=src.dtype)[3:].view(22, 333)):
        u.read_rows_into(dst, 7, 29)
        assert same(dst, src[7:29])
    u.read_rows_into(dst, 5, 5)  # empty range is a no-op


def test_read_only_touches_requested_rows(tmp_path):
    src = rand((20, 333), torch.float16)
    t = DiskTensor(tmp_path / "p.bin", src.shape, src.dtype)
    t.write_rows(src)
    dst = aligned_empty(src.shape, src.dtype).fill_(7.0)
    t.read_rows_into(dst, 0, 5)  # 3330 bytes: not a whole block, must not spill into dst[5:]
    assert same(dst[:5], src[:5]) and bool((dst[5:] == 7.0).all())


def test_direct_path_is_taken(tmp_path):
    src = rand((300, 1000), torch.float32)
    t = DiskTensor(tmp_path / "d.bin", src.shape, src.dtype)
    direct_or_skip(t)
    assert fcntl.fcntl(t._fd_direct, fcntl.F_GETFL) & os.O_DIRECT
    assert not fcntl.fcntl(t._fd, fcntl.F_GETFL) & os.O_DIRECT
    t.write_rows(src)  # unaligned source: through the bounce buffer, still direct
    assert t.direct_bytes >= t.nbytes
    before = t.direct_bytes
    dst = aligned_empty(src.shape, src.dtype)
    t.read_rows_into(dst)
    assert t.direct_bytes - before >= t.nbytes and same(dst, src)


def test_chunked_parallel_io(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "CHUNK", 16 * ALIGN)  # many chunks and windows without big data
    monkeypatch.setattr(disk, "_WINDOW", 48 * ALIGN)
    src = rand((777, 513), torch.bfloat16)
    t = DiskTensor(tmp_path / "c.bin", src.shape, src.dtype)
    t.write_rows(src)
    dst = aligned_empty(src.shape, src.dtype)
    t.read_rows_into(dst)
    assert same(dst, src)
    dst = torch.empty(700 * 513 + 1, dtype=src.dtype)[1:].view(700, 513)
    t.read_rows_into(dst, 77)
    assert same(dst, src[77:])


def test_forked_child_can_read(tmp_path, monkeypatch):
    """The I/O thread pool is not inherited across fork (a stale pool would hang the child)."""
    monkeypatch.setattr(disk, "CHUNK", 4 * ALIGN)
    src = rand((64, 1024), torch.float32)
    t = DiskTensor(tmp_path / "k.bin", src.shape, src.dtype)
    t.write_rows(src)  # starts the pool's threads in the parent
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a hung child dies instead of hanging the test run
        dst = aligned_empty(src.shape, src.dtype)
        t.read_rows_into(dst)
        os._exit(0 if dst.numpy().tobytes() == src.numpy().tobytes() else 1)  # no torch ops: OpenMP dislikes fork
    assert os.waitpid(pid, 0)[1] == 0


def test_kv_append_then_direct_prefix_read(tmp_path):
    """Rows appended one at a time through the buffered fd must be visible to later O_DIRECT prefix reads."""
    kv = rand((100, 3, 7), torch.float16)
    t = DiskTensor(tmp_path / "kv.bin", kv.shape, kv.dtype)
    dst = aligned_empty(kv.shape, kv.dtype)
    for i in range(len(kv)):
        t.write_rows(kv[i:i + 1], i)
        if i % 9 == 0 or i == len(kv) - 1:
            before = t.direct_bytes
            t.read_rows_into(dst, 0, i + 1)
            assert same(dst[:i + 1], kv[:i + 1])
            assert t._fd_direct is None or t.direct_bytes > before
    # Overwrite a direct-written tensor with buffered single rows, then read directly again.
    t.write_rows(torch.zeros_like(kv))
    t.write_rows(kv[41:42], 41)
    t.read_rows_into(dst)
    assert same(dst[41], kv[41]) and bool((dst[:41] == 0).all()) and bool((dst[42:] == 0).all())
    t.delete()


def test_fallback_without_o_direct(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level("INFO", logger=disk.__name__):
        t = DiskTensor(tmp_path / "f.bin", (33, 17), torch.bfloat16)
    assert t._fd_direct is None and "O_DIRECT unsupported" in caplog.text
    src = rand(t.shape, t.dtype)
    t.write_rows(src[:10])
    t.write_rows(src[10:], 10)
    dst = torch.empty(t.shape, dtype=t.dtype)
    t.read_rows_into(dst)
    assert same(dst, src) and t.direct_bytes == 0
    t.delete()


def test_errors(tmp_path, monkeypatch):
    t = DiskTensor(tmp_path / "e.bin", (8, 4), torch.float32)
    with pytest.raises(ValueError):
        t.write_rows(torch.zeros(8, 5))
    with pytest.raises(ValueError):
        t.write_rows(torch.zeros(2, 4), 7)
    with pytest.raises(ValueError):
        t.write_rows(torch.zeros(8, 4, dtype=torch.float16))
    with pytest.raises(ValueError):
        t.read_rows_into(torch.empty(3, 4), 0, 4)
    with pytest.raises(ValueError):
        t.read_rows_into(torch.empty(4, 8)[:, :4], 0, 4)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(OSError) as e:
        t.write_rows(torch.zeros(8, 4))
    assert e.value.errno == errno.ENOSPC and str(t.path) in str(e.value)


def test_delete_is_idempotent(tmp_path):
    t = DiskTensor(tmp_path / "x.bin", (4, 4), torch.float32)
    assert t.path.exists()
    t.delete()
    assert not t.path.exists()
    t.delete()
