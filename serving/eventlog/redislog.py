"""Redis Streams backend: ``XADD`` per record in one pipeline; cursor = last stream entry id.

Durability depends on the server: an acknowledged XADD is on disk only with
``appendonly yes`` and ``appendfsync always`` (Redis >= 7.2 also offers ``WAITAOF``, used when
available). :meth:`start` inspects the server and sets ``durable``/``durability_note`` so
/readyz tells the truth instead of promising what Redis does not do.
"""
from __future__ import annotations

from typing import Any, Sequence

from serving.eventlog.base import EventLog, EventLogError, ReadResult, check_stream, decode, encode


class RedisEventLog(EventLog):
    backend = "redis"

    def __init__(self, url: str, *, prefix: str = "recsys", timeout_s: float = 5.0, maxlen: int | None = None):
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.maxlen = maxlen
        self._r = None
        self._waitaof = False
        self.durable = False
        self.durability_note = "not checked yet"

    def key(self, stream: str) -> str:
        return f"{self.prefix}:{check_stream(stream)}"

    async def start(self) -> None:
        if self._r is not None:
            return
        import redis.asyncio as aioredis

        r = aioredis.from_url(self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s)
        try:
            info = await r.info("server")
            version = tuple(int(x) for x in str(info.get("redis_version", "0.0.0")).split(".")[:2])
            try:
                aof = (await r.config_get("appendonly")).get("appendonly")
                fsync = (await r.config_get("appendfsync")).get("appendfsync")
            except Exception:  # noqa: BLE001 - CONFIG may be disabled on managed servers
                aof, fsync = None, None
        except Exception as exc:  # noqa: BLE001
            await r.aclose()
            raise EventLogError(f"Redis at {self.url} is not usable: {exc}") from exc
        if aof == "yes" and fsync == "always":
            self.durable, self.durability_note = True, "appendonly yes + appendfsync always"
        elif aof == "yes" and version >= (7, 2):
            self._waitaof = True
            self.durable, self.durability_note = True, "WAITAOF after each append"
        else:
            self.durable = False
            self.durability_note = (f"Redis {'.'.join(map(str, version))} with appendonly={aof} appendfsync={fsync}: "
                                    "acknowledged appends are in memory only")
        self._r = r

    async def append(self, stream: str, records: Sequence[dict[str, Any]], *, keys: Sequence[str] | None = None) -> None:
        if not records:
            return
        await self.start()
        key = self.key(stream)
        try:
            pipe = self._r.pipeline(transaction=False)  # type: ignore[union-attr]
            for r in records:
                if self.maxlen:
                    pipe.xadd(key, {"d": encode(r)}, maxlen=self.maxlen, approximate=True)
                else:
                    pipe.xadd(key, {"d": encode(r)})
            if self._waitaof:
                pipe.execute_command("WAITAOF", 1, 0, int(self.timeout_s * 1000))
            await pipe.execute()
        except Exception as exc:  # noqa: BLE001
            raise EventLogError(f"Redis XADD to {key} failed: {type(exc).__name__}: {exc}") from exc

    async def read(self, stream: str, *, cursor: dict[str, Any] | None = None, limit: int | None = None) -> ReadResult:
        await self.start()
        key = self.key(stream)
        last = str((cursor or {}).get("id", "0-0"))
        records: list[dict[str, Any]] = []
        while limit is None or len(records) < limit:
            count = 1000 if limit is None else min(1000, limit - len(records))
            rows = await self._r.xrange(key, min=f"({last}", max="+", count=count)  # type: ignore[union-attr]
            if not rows:
                break
            for entry_id, fields in rows:
                records.append(decode(fields[b"d"]))
                last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return ReadResult(records, {"id": last})

    async def ping(self) -> bool:
        try:
            return bool(self._r is not None and await self._r.ping())
        except Exception:  # noqa: BLE001
            return False

    async def delete_streams(self) -> None:
        await self.start()
        await self._r.delete(self.key("events"), self.key("impressions"))  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._r is not None:
            r, self._r = self._r, None
            await r.aclose()
