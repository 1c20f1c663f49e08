"""Durable JSONL results: one object per line, written whole and fsynced, so a crash loses at most
the line in flight and a resumed run can tell exactly which requests are done."""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from flexgen_dist.base.errors import RunFailed, UserError

log = logging.getLogger(__name__)


def _record_id(raw: bytes) -> str | None:
    """The id of one stored line, or None when the line is not a valid record."""
    try:
        rec = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both derive from it
        return None
    if not isinstance(rec, dict):
        return None
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None
    return str(rid)


def read_done_ids(path: str | os.PathLike[str]) -> set[str]:
    """Ids already recorded in `path` (empty when it does not exist).

    A torn last line (no trailing newline, or not a valid record) is what a crash mid-write
    leaves behind: it is cut off in place so later appends start on a clean line. A bad line
    anywhere else is not crash damage, so it is reported rather than silently dropped.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise UserError(f"output file {path}: cannot read ({e.strerror or e})") from None
    body_end = data.rfind(b"\n") + 1  # bytes after the last newline are an unterminated fragment
    entries: list[tuple[int, int, bytes]] = []  # (line number, byte offset, content) of non-blank lines
    offset = 0
    for lineno, raw in enumerate(data[:body_end].split(b"\n")[:-1], start=1):
        if raw.strip():
            entries.append((lineno, offset, raw))
        offset += len(raw) + 1
    keep = body_end
    if body_end == len(data) and entries and _record_id(entries[-1][2]) is None:
        keep = entries.pop()[1]  # no fragment, so a bad last line is the torn write
    done: set[str] = set()
    for lineno, _, raw in entries:
        rid = _record_id(raw)
        if rid is None:
            raise UserError(f"output file {path} line {lineno}: not a JSON object with an 'id'")
        done.add(rid)
    if keep < len(data):
        _truncate(path, keep)
    return done


def _truncate(path: str | os.PathLike[str], size: int) -> None:
    try:
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"output file {path}: cannot repair torn last line ({e.strerror or e})") from None
    log.warning("output file %s: removed a torn last line left by an interrupted run", path)


class ResultWriter:
    """Appends JSON records to a JSONL file; use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> ResultWriter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Raw fd, no user-space buffer: each batch reaches the OS in one write call.
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot open output file {self.path}: {e.strerror or e}") from None
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.close(fd)
            raise UserError(f"output file {self.path} ends with an incomplete line; resume to repair it")
        self._fd = fd
        self._durable = stat.S_ISREG(os.fstat(fd).st_mode)  # fsync means nothing (EINVAL) on /dev/stdout or a pipe
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        """Append all records as lines, then fsync once: one durable step per batch."""
        if self._fd is None:
            raise RuntimeError("ResultWriter used outside its 'with' block")
        # Serialise everything first so a bad record cannot leave half a batch on disk.
        data = memoryview("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        start = os.fstat(self._fd).st_size  # O_APPEND: where this batch begins
        try:
            while data:
                data = data[os.write(self._fd, data):]
            if self._durable:
                os.fsync(self._fd)
        except OSError as e:
            self._cut_batch(start, e)

    def _cut_batch(self, start: int, e: OSError) -> NoReturn:
        """A batch that did not land whole (disk full, I/O error) is cut off, so the file keeps complete lines only and
        a resumed run redoes exactly that batch; then the run stops with one line."""
        if self._durable:
            try:
                os.ftruncate(self._fd, start)
                os.fsync(self._fd)
            except OSError:
                pass  # the next run's read_done_ids cuts the torn line instead
        hint = ": free space on that disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise RunFailed(f"output file {self.path}: cannot write ({e.strerror or e}){hint}; the results written before "
                        "are intact: run the same command again to resume") from None
