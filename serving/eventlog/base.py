"""What every event-log backend promises, and the record codec they share.

Two streams: ``events`` (the feedback the training pipeline ingests: core event schema) and
``impressions`` (what was served: request id, items, positions, scores, propensities, model
versions, variant), so training can join impressions with clicks and off-policy estimators
know what the logging policy showed.

Contract of :meth:`EventLog.append`: when the coroutine returns, the records are as durable as
the backend can make them (``durable`` says whether that means "on disk"); the HTTP layer
answers 202 only after it returns. :meth:`EventLog.append_nowait` is fire-and-forget (used for
impressions, so logging never adds an fsync to the recommendation path).

Reading goes through a *cursor* (a JSON-able dict, backend-specific) so the ingest step can
resume where it stopped; together with the lake's merge on ``event_id`` that gives
exactly-once *effect* from at-least-once delivery.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import orjson

STREAMS: tuple[str, ...] = ("events", "impressions")


class EventLogError(RuntimeError):
    """The log could not durably accept or return records (backend down, timeout, disk error)."""


def check_stream(stream: str) -> str:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r} (known: {', '.join(STREAMS)})")
    return stream


def encode(record: dict[str, Any]) -> bytes:
    """One record -> bytes (orjson: datetimes become RFC 3339 strings, numpy scalars are refused)."""
    return orjson.dumps(record, option=orjson.OPT_NAIVE_UTC | orjson.OPT_SERIALIZE_NUMPY)


def decode(blob: bytes) -> dict[str, Any]:
    return orjson.loads(blob)


@dataclass
class ReadResult:
    """Records read from one stream, and the cursor to resume after them."""

    records: list[dict[str, Any]]
    cursor: dict[str, Any] = field(default_factory=dict)


class EventLog(abc.ABC):
    """A durable, append-only log of two streams (see module docstring)."""

    backend: str = "abstract"
    #: True when an acknowledged append is on disk (checked at start for brokers).
    durable: bool = True
    #: Why ``durable`` is False, for /readyz and the logs.
    durability_note: str = ""

    async def start(self) -> None:
        """Connect / open files. Idempotent."""

    @abc.abstractmethod
    async def append(self, stream: str, records: Sequence[dict[str, Any]], *, keys: Sequence[str] | None = None) -> None:
        """Append records and return once they are acknowledged (see module docstring).

        ``keys`` are idempotency keys (event ids / request ids) where the backend can dedupe."""

    def append_nowait(self, stream: str, records: Sequence[dict[str, Any]]) -> None:
        """Append without waiting; failures are counted by the caller's metrics, never raised."""
        import asyncio

        task = asyncio.get_running_loop().create_task(self.append(stream, records))
        _BACKGROUND.add(task)
        task.add_done_callback(_finish_background)

    @abc.abstractmethod
    async def read(self, stream: str, *, cursor: dict[str, Any] | None = None, limit: int | None = None) -> ReadResult:
        """Records after ``cursor`` (all when None), oldest first, at most ``limit``."""

    async def ping(self) -> bool:
        """Is the backend reachable right now (for /readyz)?"""
        return True

    async def close(self) -> None:
        """Flush and release resources. Idempotent."""


_BACKGROUND: set = set()
#: Failures of fire-and-forget appends; the app exports this as a metric.
BACKGROUND_FAILURES = [0]


def _finish_background(task) -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled() and task.exception() is not None:
        BACKGROUND_FAILURES[0] += 1


def resolve(root: Path, p: Path) -> Path:
    """Relative paths in settings resolve against the project root."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else Path(root) / p
