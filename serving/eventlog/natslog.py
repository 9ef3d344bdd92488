"""NATS JetStream backend: one file-storage stream per log stream.

An append publishes every record asynchronously and returns when all PubAcks arrived, i.e.
when the server has stored them (the server's ``sync_interval`` decides when it fsyncs; set
``sync_interval: always`` on the server for fsync-before-ack). Records carry ``Nats-Msg-Id``
(event id / request id), so a client retry within the stream's duplicate window is stored once.
The read cursor is the last consumed stream sequence number.
"""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

from serving.eventlog.base import EventLog, EventLogError, ReadResult, check_stream, decode, encode


class NatsEventLog(EventLog):
    backend = "nats"

    def __init__(self, url: str, *, prefix: str = "recsys", timeout_s: float = 5.0):
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._nc = None
        self._js = None
        self._start_lock: asyncio.Lock | None = None
        self.durability_note = "stored on PubAck; fsync per the server's sync_interval"

    def stream_name(self, stream: str) -> str:
        return f"{self.prefix}-{check_stream(stream)}"

    def subject(self, stream: str) -> str:
        return f"{self.prefix}.{check_stream(stream)}"

    async def start(self) -> None:
        if self._js is not None:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._js is not None:
                return
            import nats
            from nats.js.api import StorageType, StreamConfig

            try:
                nc = await nats.connect(self.url, connect_timeout=self.timeout_s, max_reconnect_attempts=3,
                                        allow_reconnect=True)
                js = nc.jetstream(timeout=self.timeout_s)
                for s in ("events", "impressions"):
                    cfg = StreamConfig(name=self.stream_name(s), subjects=[self.subject(s)], storage=StorageType.FILE)
                    try:
                        await js.add_stream(cfg)
                    except Exception:  # already exists with a compatible config
                        await js.stream_info(self.stream_name(s))
            except Exception as exc:  # noqa: BLE001 - connection errors come in many types
                raise EventLogError(f"NATS JetStream at {self.url} is not usable: {exc}") from exc
            self._nc, self._js = nc, js

    async def append(self, stream: str, records: Sequence[dict[str, Any]], *, keys: Sequence[str] | None = None) -> None:
        if not records:
            return
        await self.start()
        subject = self.subject(stream)
        try:
            futures = []
            for i, r in enumerate(records):
                headers = {"Nats-Msg-Id": str(keys[i])} if keys is not None else None
                futures.append(await self._js.publish_async(subject, encode(r), headers=headers))  # type: ignore[union-attr]
            acks = await asyncio.wait_for(asyncio.gather(*futures), timeout=self.timeout_s)
        except EventLogError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise EventLogError(f"NATS publish to {subject} failed: {type(exc).__name__}: {exc}") from exc
        for ack in acks:
            if getattr(ack, "stream", None) != self.stream_name(stream):
                raise EventLogError(f"NATS stored a record in {getattr(ack, 'stream', None)!r}, expected {self.stream_name(stream)!r}")

    async def read(self, stream: str, *, cursor: dict[str, Any] | None = None, limit: int | None = None) -> ReadResult:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await self.start()
        name = self.stream_name(stream)
        last = int((cursor or {}).get("seq", 0))
        info = await self._js.stream_info(name)  # type: ignore[union-attr]
        end = info.state.last_seq
        records: list[dict[str, Any]] = []
        if end <= last:
            return ReadResult(records, {"seq": last})
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1,
                             ack_policy=AckPolicy.NONE, inactive_threshold=30.0)
        sub = await self._js.pull_subscribe(self.subject(stream), stream=name, config=cfg)  # type: ignore[union-attr]
        try:
            while last < end and (limit is None or len(records) < limit):
                want = 1000 if limit is None else min(1000, limit - len(records))
                try:
                    msgs = await sub.fetch(want, timeout=self.timeout_s)
                except asyncio.TimeoutError:
                    break
                for m in msgs:
                    seq = m.metadata.sequence.stream
                    if seq > end:
                        break
                    records.append(decode(m.data))
                    last = seq
        finally:
            await sub.unsubscribe()
        return ReadResult(records, {"seq": last})

    async def ping(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def delete_streams(self) -> None:
        """Drop both streams (tests use unique prefixes and clean up)."""
        await self.start()
        for s in ("events", "impressions"):
            try:
                await self._js.delete_stream(self.stream_name(s))  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - already gone
                pass

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc, self._js = self._nc, None, None
            try:
                await nc.drain()
            except Exception:  # noqa: BLE001 - closing a dead connection
                await nc.close()
