"""Ingest the serving event log into the lake, idempotently and resumably.

Why both a cursor and idempotency: the cursor (saved only *after* the lake write succeeded)
avoids re-reading the whole log each run; the lake's merge on ``event_id`` makes a re-read
harmless, so a crash between the lake write and the cursor save costs time, never duplicates.

Events go through the one ingest path (``pipelines.ingest.ingest(..., dataset=...)``), so they
get the same checks and partitioning as any other source. Impressions have no core table:
they are kept under ``<lake>/impressions/date=YYYY-MM-DD/part-0.parquet`` merged on
(request_id, position), for joins with clicks and off-policy estimates.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import Settings
from core.schemas import Dataset


@dataclass
class EventLogIngestReport:
    backend: str
    events_read: int
    events_added: int
    impressions_read: int
    impressions_added: int
    partitions: list[dict] = field(default_factory=list)
    cursors: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _checkpoint_path(settings: Settings, stream: str) -> Path:
    from serving.eventlog.base import resolve

    cfg = settings.eventlog
    return resolve(settings.paths.root, cfg.checkpoint_dir) / f"{cfg.backend}-{cfg.stream_prefix}-{stream}.json"


def load_cursor(settings: Settings, stream: str) -> dict[str, Any] | None:
    path = _checkpoint_path(settings, stream)
    return json.loads(path.read_text()) if path.is_file() else None


def save_cursor(settings: Settings, stream: str, cursor: dict[str, Any]) -> None:
    """Write the cursor atomically (temp file + rename) so a crash leaves the old one."""
    import os

    path = _checkpoint_path(settings, stream)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cursor, sort_keys=True))
    os.replace(tmp, path)


def impressions_dir(settings: Settings) -> Path:
    return settings.paths.lake_dir / "impressions"


def write_impressions(settings: Settings, frame: pd.DataFrame) -> int:
    """Merge impression rows into their day partitions on (request_id, position); returns rows added."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.lake import _atomic_write  # the lake's one crash-safe writer

    if frame.empty:
        return 0
    added = 0
    for day, batch in frame.groupby(frame["timestamp"].dt.date, sort=True):
        path = impressions_dir(settings) / f"date={day.isoformat()}" / "part-0.parquet"
        batch = batch.drop_duplicates(["request_id", "position"])
        if path.exists():
            old = pq.read_table(path).to_pandas()
            key = old["request_id"].astype(str) + "#" + old["position"].astype(str)
            new = batch[~(batch["request_id"].astype(str) + "#" + batch["position"].astype(str)).isin(key)]
            if new.empty:
                continue
            merged = pd.concat([old, new], ignore_index=True)
        else:
            new = merged = batch
        merged = merged.sort_values(["timestamp", "request_id", "position"], kind="stable")
        _atomic_write(pa.Table.from_pandas(merged, preserve_index=False), path)
        added += len(new)
    return added


def read_impressions_lake(settings: Settings) -> pd.DataFrame:
    """All impressions kept in the lake (empty frame with the right columns when none)."""
    import pyarrow.parquet as pq

    from serving.eventlog import IMPRESSION_COLUMNS

    files = sorted(impressions_dir(settings).glob("date=*/part-0.parquet"))
    if not files:
        return pd.DataFrame(columns=IMPRESSION_COLUMNS)
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def ingest_eventlog(settings: Settings, *, resume: bool = True, limit: int | None = None,
                    impressions: bool = True) -> EventLogIngestReport:
    """Read the log after the saved cursors (all of it with ``resume=False``) into the lake."""
    from pipelines.ingest import ingest
    from serving.eventlog import events_frame, impressions_frame, open_log

    import asyncio

    backend = settings.eventlog.backend

    async def _read(stream: str, cursor):
        log = open_log(settings)
        await log.start()
        try:
            return await log.read(stream, cursor=cursor, limit=limit)
        finally:
            await log.close()

    cursor = load_cursor(settings, "events") if resume else None
    res = asyncio.run(_read("events", cursor))
    report = EventLogIngestReport(backend, len(res.records), 0, 0, 0)
    if res.records:
        events = events_frame(res.records, source=f"eventlog:{backend}")
        rep = ingest(f"eventlog:{backend}", settings=settings, dataset=Dataset(name=f"eventlog:{backend}", events=events))
        report.events_added, report.partitions = rep.events_added, rep.partitions
    save_cursor(settings, "events", res.cursor)
    report.cursors["events"] = res.cursor
    if impressions:
        icur = load_cursor(settings, "impressions") if resume else None
        ires = asyncio.run(_read("impressions", icur))
        report.impressions_read = len(ires.records)
        if ires.records:
            report.impressions_added = write_impressions(settings, impressions_frame(ires.records))
        save_cursor(settings, "impressions", ires.cursor)
        report.cursors["impressions"] = ires.cursor
    return report
