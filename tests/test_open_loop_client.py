"""The serving benchmark's open-loop load generator against a minimal local HTTP server: every
scheduled request is sent, answered ones are timed from their due time, non-200 answers and
unanswered requests are errors (never silently dropped)."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.open_loop_client import run  # noqa: E402


def test_open_loop_client_counts_every_request_and_its_outcome() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            path = head.split(b" ", 2)[1]
            seen.append(path)
            if b"/slow" in path:
                await asyncio.sleep(0.02)
            ok = b"/missing" not in path
            body = b'{"ok": true}' if ok else b'{"error": "unknown user"}'
            if b"/slow" in path:  # as the recommendation route: the server's own stage times last
                body = b'{"items": [], "timings_ms": {"features": 0.5, "model": 15.0, "total": 20.0}}'
            status = b"200 OK" if ok else b"404 Not Found"
            # headers and body in separate writes, as uvicorn sends them
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n")
            await writer.drain()
            writer.write(body)
            await writer.drain()
        writer.close()

    async def scenario() -> dict:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await run("127.0.0.1", port, rate=200.0, duration=0.5, users=["a", "slow", "missing"], connections=4)
        finally:
            server.close()
            await server.wait_closed()

    res = asyncio.run(scenario())
    assert res["sent"] == 100 and len(seen) == 100
    assert all(p.startswith(b"/v1/recommendations/") and p.endswith(b"?k=20") for p in seen)
    missing = sum(b"/missing" in p for p in seen)
    assert 0 < missing < 100
    assert res["errors"] == missing and res["ok"] == 100 - missing  # ok + errors == sent
    assert res["error_kinds"] == {"non-200": missing}
    slow = sum(b"/slow" in p for p in seen)
    assert slow and res["p99_ms"] >= 20.0  # latency includes the server's time
    assert 0 < res["p50_ms"] <= res["p95_ms"] <= res["p99_ms"]
    assert res["client_cpu_ms_per_request"] > 0
    # the slowest request is a /slow one: its server-side times come from its body
    tail = res["where_time_went"]["slowest_1pct"]
    assert tail["requests"] == 1 and tail["server_total_ms"] == 20.0 and tail["server_model_ms"] == 15.0
    assert tail["server_features_ms"] == 0.5 and tail["outside_server_ms"] == pytest.approx(tail["latency_ms"] - 20.0, abs=1e-3)
    assert tail["latency_ms"] >= 20.0 and res["where_time_went"]["p45_p55"]["requests"] >= 1


def test_latency_starts_at_the_due_time_or_at_an_early_send() -> None:
    """A timer that fires before the due time (uvloop's clock has millisecond steps) sends early:
    that request's latency counts from its send, not from the later due time; a late send is
    charged from the due time (the client's queue counts)."""
    import time

    from benchmarks.open_loop_client import Client, Connection

    async def scenario() -> list[float]:
        client = Client("127.0.0.1", 9, ["u"])
        conn = Connection(client)
        conn.transport = type("T", (), {"write": lambda self, data: None})()
        now = time.perf_counter()
        for due, sent in ((now + 1.0, now - 0.004), (now - 0.006, now - 0.001)):  # early, then late
            conn.send(due, b"/v1/recommendations/u?k=20")
            conn.sent = sent
            conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        return client.latencies

    early, late = asyncio.run(scenario())
    assert 4.0 <= early < 100.0 and 6.0 <= late < 100.0


def test_where_time_went_bands_by_latency_with_ties() -> None:
    from benchmarks.open_loop_client import where_time_went

    lat = [5.0, 5.0, 1.0, 9.0, 5.0]  # equal latencies: rows are ordered by latency alone
    t = [{"total": 4.0, "model": 2.0}, {"total": 3.0}, {"total": 0.5, "features": 0.1}, {"total": 8.0, "model": 6.0}, None]
    assert where_time_went(lat, t, 0.99, 1.0) == {"requests": 1, "latency_ms": 9.0, "server_total_ms": 8.0,
                                                  "server_model_ms": 6.0, "server_features_ms": 0.0, "outside_server_ms": 1.0}
    assert where_time_went(lat, t, 0.0, 0.25)["latency_ms"] == 1.0  # the fastest of the four with timings
    assert where_time_went([], [], 0.99, 1.0) is None
