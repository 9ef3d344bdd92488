"""Embedded event log: append-only segment files with group-commit fsync.

Why this design:
- *Acknowledged means on disk*: an append returns only after ``fdatasync`` of the bytes.
- *Group commit*: one writer thread per stream drains everything queued while the previous
  fsync ran and writes it with one ``write`` + one ``fdatasync``; under load many concurrent
  appends share one fsync, so throughput is bounded by bandwidth, not by fsync latency, and a
  lone append waits for exactly one fsync (no timer adds latency).
- *One segment per writer process*: uvicorn workers are separate processes; each writes its
  own segment files (``<time>-<pid>-<rand>.seg``), so no cross-process locking is needed and a
  crashed process can only leave a torn record at the *end* of its own segment, which readers
  skip (a corrupt record followed by more data is real corruption and raises).

Record framing: ``<u32 length><u32 crc32(payload)><payload>`` (little-endian), payload JSON.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Sequence

from serving.eventlog.base import EventLog, EventLogError, ReadResult, check_stream, decode, encode

HEADER = struct.Struct("<II")
SEGMENT_SUFFIX = ".seg"


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class CorruptLogError(EventLogError):
    """A record inside a segment (not at its torn tail) fails its checksum."""


class GroupCommitWriter:
    """Appends framed records to this process's segment of one stream; thread-safe.

    ``submit`` returns a future resolved after the batch containing the records is fsynced.
    """

    def __init__(self, directory: Path, *, segment_max_bytes: int = 64 * 1024 * 1024, fsync: bool = True):
        self.directory = Path(directory)
        self.segment_max_bytes = segment_max_bytes
        self.fsync = fsync
        self._cv = threading.Condition()
        self._pending: list[tuple[bytes, concurrent.futures.Future | None]] = []
        self._closing = False
        self._fd: int | None = None
        self._size = 0
        self.segment: Path | None = None
        self.commits = 0  # number of fsyncs (for tests/benchmarks: appends per fsync)
        self.records = 0
        self._thread = threading.Thread(target=self._run, name=f"eventlog-{self.directory.name}", daemon=True)
        self._thread.start()

    # ---- producer side ----------------------------------------------------------------
    def submit(self, blobs: Sequence[bytes], *, wait: bool = True) -> concurrent.futures.Future | None:
        data = b"".join(frame(b) for b in blobs)
        fut: concurrent.futures.Future | None = concurrent.futures.Future() if wait else None
        with self._cv:
            if self._closing:
                raise EventLogError(f"event log {self.directory} is closed")
            self._pending.append((data, fut))
            self._cv.notify()
        return fut

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- writer thread ----------------------------------------------------------------
    def _open_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}"
        self.segment = self.directory / name
        self._fd = os.open(self.segment, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._size = 0
        if self.fsync:  # the new file's directory entry must survive a crash too
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)  # type: ignore[arg-type]
            view = view[n:]

    def _run(self) -> None:
        from core.threads import name_os_thread

        name_os_thread()
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                batch, self._pending = self._pending, []
                closing = self._closing
            if batch:
                futures = [f for _, f in batch if f is not None]
                try:
                    data = b"".join(d for d, _ in batch)
                    if self._fd is None or (self._size and self._size + len(data) > self.segment_max_bytes):
                        self._open_segment()
                    self._write_all(data)
                    self._size += len(data)
                    if self.fsync:
                        os.fdatasync(self._fd)  # type: ignore[arg-type]
                    self.commits += 1
                    self.records += len(batch)
                except BaseException as exc:  # noqa: BLE001 - every waiter must learn about it
                    err = EventLogError(f"event log write to {self.segment} failed: {exc}")
                    for f in futures:
                        f.set_exception(err)
                    # a failed write may have left a partial record: start a fresh segment
                    try:
                        if self._fd is not None:
                            os.close(self._fd)
                    except OSError:
                        pass
                    self._fd = None
                    continue
                for f in futures:
                    f.set_result(None)
            if closing and not batch:
                with self._cv:
                    if self._pending:
                        continue
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                return


def read_segment(path: Path, offset: int = 0) -> tuple[list[bytes], int]:
    """Payloads in ``path`` from byte ``offset``; returns them and the offset after the last whole record.

    A torn record at the end (crash mid-write, or a write still in progress) is not returned
    and the offset stays before it; a bad checksum followed by more data raises.
    """
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    out: list[bytes] = []
    pos = 0
    while pos + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER.size + length
        if end > len(data):
            break  # torn tail
        payload = data[pos + HEADER.size:end]
        if zlib.crc32(payload) != crc:
            if end >= len(data):
                break  # a torn tail whose length field happened to fit
            raise CorruptLogError(f"{path}: record at byte {offset + pos} fails its checksum")
        out.append(payload)
        pos = end
    return out, offset + pos


class LocalEventLog(EventLog):
    """The embedded default (see module docstring)."""

    backend = "local"
    durable = True

    def __init__(self, root: Path, *, segment_max_bytes: int = 64 * 1024 * 1024, fsync: bool = True):
        self.root = Path(root)
        self.segment_max_bytes = segment_max_bytes
        self.fsync = fsync
        self.durable = fsync
        self.durability_note = "" if fsync else "fsync disabled"
        self._writers: dict[str, GroupCommitWriter] = {}
        self._lock = threading.Lock()

    def writer(self, stream: str) -> GroupCommitWriter:
        check_stream(stream)
        w = self._writers.get(stream)
        if w is None:
            with self._lock:
                w = self._writers.get(stream)
                if w is None:
                    w = GroupCommitWriter(self.root / stream, segment_max_bytes=self.segment_max_bytes, fsync=self.fsync)
                    self._writers[stream] = w
        return w

    def append_sync(self, stream: str, records: Sequence[dict[str, Any]], timeout: float | None = 30.0) -> None:
        """Blocking append for scripts and tests (the server uses :meth:`append`)."""
        fut = self.writer(stream).submit([encode(r) for r in records])
        assert fut is not None
        fut.result(timeout)

    async def append(self, stream: str, records: Sequence[dict[str, Any]], *, keys: Sequence[str] | None = None) -> None:
        if not records:
            return
        fut = self.writer(stream).submit([encode(r) for r in records])
        assert fut is not None
        await asyncio.wrap_future(fut)

    def append_nowait(self, stream: str, records: Sequence[dict[str, Any]]) -> None:
        if records:
            self.writer(stream).submit([encode(r) for r in records], wait=False)

    def segments(self, stream: str) -> list[Path]:
        d = self.root / check_stream(stream)
        return sorted(d.glob(f"*{SEGMENT_SUFFIX}")) if d.is_dir() else []

    def read_sync(self, stream: str, *, cursor: dict[str, Any] | None = None, limit: int | None = None) -> ReadResult:
        """Cursor = ``{segment file name: byte offset already consumed}``."""
        cur = dict(cursor or {})
        records: list[dict[str, Any]] = []
        for seg in self.segments(stream):
            start = int(cur.get(seg.name, 0))
            payloads, end = read_segment(seg, start)
            if limit is not None and len(records) + len(payloads) > limit:
                keep = limit - len(records)
                payloads = payloads[:keep]
                end = start + sum(HEADER.size + len(p) for p in payloads)
            records.extend(decode(p) for p in payloads)
            cur[seg.name] = end
            if limit is not None and len(records) >= limit:
                break
        return ReadResult(records, cur)

    async def read(self, stream: str, *, cursor: dict[str, Any] | None = None, limit: int | None = None) -> ReadResult:
        return await asyncio.to_thread(self.read_sync, stream, cursor=cursor, limit=limit)

    async def close(self) -> None:
        self.close_sync()

    def close_sync(self) -> None:
        with self._lock:
            writers, self._writers = list(self._writers.values()), {}
        for w in writers:
            w.close()
