"""The durable feedback log: local group-commit segments, crash safety, readers, lake ingest,
and the NATS JetStream / Redis Streams backends against the real local servers."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from serving.eventlog import events_frame, open_log, read_events
from serving.eventlog.base import EventLogError
from serving.eventlog.local import HEADER, CorruptLogError, LocalEventLog, read_segment

REPO = Path(__file__).resolve().parents[1]


def _event(i: int, user: str = "u1") -> dict:
    return {"user_id": user, "item_id": f"i{i}", "event_type": "click", "value": 1.0,
            "timestamp": f"2024-01-0{1 + i % 3}T10:00:{i % 60:02d}+00:00", "context": '{"device": "web"}'}


def test_local_roundtrip_and_cursor(tmp_path: Path) -> None:
    log = LocalEventLog(tmp_path)
    log.append_sync("events", [_event(i) for i in range(5)])
    first = log.read_sync("events")
    assert [r["item_id"] for r in first.records] == [f"i{i}" for i in range(5)]
    log.append_sync("events", [_event(9)])
    more = log.read_sync("events", cursor=first.cursor)
    assert [r["item_id"] for r in more.records] == ["i9"]
    assert log.read_sync("events", cursor=more.cursor).records == []
    limited = log.read_sync("events", limit=2)
    assert len(limited.records) == 2
    rest = log.read_sync("events", cursor=limited.cursor)
    assert [r["item_id"] for r in rest.records] == ["i2", "i3", "i4", "i9"]
    log.close_sync()


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    log = LocalEventLog(tmp_path)
    barrier = threading.Barrier(16)

    def worker(w: int) -> None:
        barrier.wait()
        for j in range(50):
            log.append_sync("events", [_event(j, user=f"u{w}")])

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer = log.writer("events")
    assert writer.records == 800
    assert writer.commits < writer.records  # concurrent appends were batched into shared fsyncs
    assert len(log.read_sync("events").records) == 800
    log.close_sync()


def test_segments_rotate_and_each_process_writes_its_own(tmp_path: Path) -> None:
    log = LocalEventLog(tmp_path, segment_max_bytes=4096)
    for i in range(100):
        log.append_sync("events", [_event(i)])
    log.close_sync()
    other = LocalEventLog(tmp_path)  # a second writer (another worker / a restart) never reuses a segment
    other.append_sync("events", [_event(500)])
    other.close_sync()
    segs = LocalEventLog(tmp_path).segments("events")
    assert len(segs) > 2
    got = LocalEventLog(tmp_path).read_sync("events").records
    assert len(got) == 101 and {r["item_id"] for r in got} >= {"i0", "i99", "i500"}


def test_torn_tail_is_skipped_and_corruption_inside_raises(tmp_path: Path) -> None:
    log = LocalEventLog(tmp_path)
    log.append_sync("events", [_event(i) for i in range(3)])
    log.close_sync()
    seg = log.segments("events")[0]
    whole = seg.read_bytes()
    with open(seg, "ab") as fh:  # a crash in the middle of the next record
        fh.write(HEADER.pack(500, 0) + b'{"user_id": "u')
    payloads, end = read_segment(seg)
    assert len(payloads) == 3 and end == len(whole)
    # flip a byte inside the first record: with data after it, that is corruption, not a torn tail
    data = bytearray(whole)
    data[HEADER.size + 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match="checksum"):
        read_segment(seg)


def test_append_after_close_is_refused(tmp_path: Path) -> None:
    log = LocalEventLog(tmp_path)
    w = log.writer("events")
    w.close()
    with pytest.raises(EventLogError, match="closed"):
        w.submit([b"{}"])
    with pytest.raises(ValueError, match="unknown stream"):
        log.writer("clicks")


def test_acknowledged_appends_survive_kill_9(tmp_path: Path) -> None:
    """A writer process prints each acknowledged id, then is SIGKILLed mid-stream: every id it
    reported as acknowledged must be in the log when it is reopened."""
    script = textwrap.dedent(f"""
        import sys, itertools
        sys.path.insert(0, {str(REPO)!r})
        from serving.eventlog.local import LocalEventLog
        log = LocalEventLog({str(tmp_path)!r})
        for i in itertools.count():
            log.append_sync("events", [{{"user_id": "u", "item_id": f"i{{i}}", "event_type": "view",
                                          "value": 1.0, "timestamp": "2024-01-01T00:00:00+00:00"}}])
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            acked.append(int(line))
            if len(acked) >= 300:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(acked) >= 300
    got = {r["item_id"] for r in LocalEventLog(tmp_path).read_sync("events").records}
    assert {f"i{i}" for i in acked} <= got


def test_events_frame_keeps_given_ids_and_hashes_missing(tmp_path: Path) -> None:
    recs = [dict(_event(1), event_id="client-1"), _event(2)]
    frame = events_frame(recs)
    assert list(frame["event_id"])[0] == "client-1"
    again = events_frame([_event(2)])
    assert frame["event_id"].iloc[1] == again["event_id"].iloc[0]  # deterministic
    assert str(frame["timestamp"].dtype) == "datetime64[us, UTC]"


def test_event_ids_without_pandas_frames_match_make_event_ids() -> None:
    """The API's cheap ids are byte-identical to the lake's deterministic ids, so the same event
    gets the same id whether it arrives through POST /v1/events or a batch file."""
    from core.schemas import make_event_ids
    from serving.eventlog import event_ids

    recs = [_event(i, user=f"user-{i % 4}") for i in range(12)] + [
        {**_event(1), "timestamp": "2024-03-05T01:02:03.456789+00:00", "user_id": "ünï"}]
    frame = events_frame(recs)
    us = frame["timestamp"].astype("int64").tolist()
    assert str(frame["timestamp"].dtype) == "datetime64[us, UTC]"
    ids = event_ids(frame["user_id"].tolist(), frame["item_id"].tolist(), frame["event_type"].tolist(), us)
    assert ids == make_event_ids(frame).tolist()
    assert len(set(ids)) == len(ids) and event_ids([], [], [], []) == []
    with pytest.raises(ValueError, match="same length"):
        event_ids(["u"], [], ["click"], [1])


def test_ingest_eventlog_into_lake_is_idempotent_and_resumable(settings) -> None:
    from core.lake import Lake
    from pipelines.ingest_eventlog import ingest_eventlog, read_impressions_lake

    log = open_log(settings)
    log.append_sync("events", [_event(i) for i in range(10)])
    log.append_sync("impressions", [{"request_id": "r1", "user_id": "u1", "items": ["a", "b"], "scores": [0.9, 0.5],
                                     "propensities": [0.7, 0.3], "model_versions": {"two_tower": "1"},
                                     "variant": None, "context": None, "timestamp": "2024-01-02T00:00:00+00:00"}])
    log.close_sync()
    rep = ingest_eventlog(settings)
    assert (rep.events_read, rep.events_added, rep.impressions_added) == (10, 10, 2)
    assert len(Lake(settings.paths.lake_dir).read_events()) == 10
    assert ingest_eventlog(settings).events_read == 0  # resumed after the cursor
    full = ingest_eventlog(settings, resume=False)  # re-reading everything adds nothing
    assert (full.events_read, full.events_added, full.impressions_added) == (10, 0, 0)
    log = open_log(settings)
    log.append_sync("events", [_event(20)])
    log.close_sync()
    assert ingest_eventlog(settings).events_added == 1
    imp = read_impressions_lake(settings)
    assert list(imp["item_id"]) == ["a", "b"] and list(imp["position"]) == [0, 1]
    frame, cursor = read_events(settings)
    assert len(frame) == 11 and cursor


# ---- brokers (real local servers; skipped when absent) ------------------------------------
def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.parametrize("backend,port", [("nats", 4222), ("redis", 6379)])
def test_broker_backend_roundtrip(settings, backend: str, port: int) -> None:
    if not _reachable(port):
        pytest.skip(f"{backend} not reachable on 127.0.0.1:{port}")
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    s = settings.model_copy(update={"eventlog": settings.eventlog.model_copy(update={"backend": backend, "stream_prefix": prefix})})

    async def go() -> None:
        log = open_log(s)
        await log.start()
        try:
            await log.append("events", [_event(i) for i in range(250)], keys=[f"e{i}" for i in range(250)])
            first = await log.read("events", limit=100)
            assert [r["item_id"] for r in first.records] == [f"i{i}" for i in range(100)]
            rest = await log.read("events", cursor=first.cursor)
            assert len(rest.records) == 150
            assert (await log.read("events", cursor=rest.cursor)).records == []
            await log.append("impressions", [{"request_id": "r", "items": ["x"], "scores": [1.0]}], keys=["r"])
            assert len((await log.read("impressions")).records) == 1
            assert await log.ping()
            if backend == "redis":
                assert isinstance(log.durable, bool) and log.durability_note
        finally:
            await log.delete_streams()
            await log.close()

    asyncio.run(go())


@pytest.mark.integration
def test_nats_dedupes_retried_event_ids(settings) -> None:
    if not _reachable(4222):
        pytest.skip("nats not reachable on 127.0.0.1:4222")
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    s = settings.model_copy(update={"eventlog": settings.eventlog.model_copy(update={"backend": "nats", "stream_prefix": prefix})})

    async def go() -> None:
        log = open_log(s)
        await log.start()
        try:
            await log.append("events", [_event(1)], keys=["same"])
            await log.append("events", [_event(1)], keys=["same"])  # a client retry
            assert len((await log.read("events")).records) == 1
        finally:
            await log.delete_streams()
            await log.close()

    asyncio.run(go())


def test_unreachable_broker_fails_clearly(settings) -> None:
    s = settings.model_copy(update={"eventlog": settings.eventlog.model_copy(
        update={"backend": "redis", "redis_url": "redis://127.0.0.1:1/0", "timeout_s": 0.5})})

    async def go() -> None:
        log = open_log(s)
        with pytest.raises(EventLogError, match="Redis at redis://127.0.0.1:1/0 is not usable"):
            await log.start()

    asyncio.run(go())


@pytest.mark.integration
@pytest.mark.parametrize("backend,port", [("local", None), ("nats", 4222), ("redis", 6379)])
def test_impressions_served_just_before_shutdown_are_written(settings, backend: str, port: int | None) -> None:
    """Impressions are handed to the log in bursts (``serving.impression_flush_ms``); the burst still
    in memory when the server stops is written (awaited) before the log closes, on every backend.
    (The burst delay is made longer than the test: nothing is in the log while the server runs, so
    only the shutdown path can write them.)"""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    if port is not None and not _reachable(port):
        pytest.skip(f"{backend} not reachable on 127.0.0.1:{port}")
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    s = settings.model_copy(update={
        "eventlog": settings.eventlog.model_copy(update={"backend": backend, "stream_prefix": prefix}),
        "serving": settings.serving.model_copy(update={"registry_poll_s": 0, "impression_flush_ms": 600_000.0})})

    async def read_back(*, last: bool = True) -> list[str]:
        log = open_log(s)
        await log.start()
        try:
            return [r["request_id"] for r in (await log.read("impressions")).records]
        finally:
            if backend != "local" and last:
                await log.delete_streams()
            await log.close()

    with TestClient(create_app(s)) as c:
        ids = [c.get(f"/v1/recommendations/u{i}", params={"k": 3}).json()["request_id"] for i in range(3)]
        time.sleep(0.2)  # far past the old 5 ms burst: the configured delay holds them
        assert asyncio.run(read_back(last=False)) == []

    assert sorted(asyncio.run(read_back())) == sorted(ids)
