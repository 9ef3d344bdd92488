"""Open-loop HTTP load generator: ``GET /v1/recommendations/{user}?k=20`` on a fixed schedule.

Requests are *due* at ``start + i / rate``; latency counts from the due time, so a stalled server
is charged for the queue it causes (no coordinated omission), or from the send when the loop's
millisecond-step timer fired before the due time (never from before the request left). Each request goes out on an idle
keep-alive connection of a fixed pool (a due request finding none idle waits in a FIFO, and that
wait counts too).

Why not a simpler asyncio client: this process shares the benchmark machine's two cores with the
server it measures, so every millisecond of client CPU is taken from the server and shows up as
server latency. An asyncio streams client (``StreamReader`` / ``wait_for`` / a queue task per
connection) cost ~0.11-0.2 ms of CPU per request; this one is a bare ``asyncio.Protocol`` per
connection on uvloop (when installed), timers scheduled in slices, responses parsed with bytes
searches, and costs several times less (it reports its own CPU per request).

    python benchmarks/open_loop_client.py HOST PORT RATE DURATION_S USERS_JSON [CONNECTIONS]

Prints one JSON line: sent, ok, errors, p50/p95/p99 ms, client CPU ms per request, and where the
time of the median and of the slowest 1% of requests went (the server's own ``timings_ms``).
"""
from __future__ import annotations

import asyncio
import collections
import json
import random
import resource
import sys
import time

TIMEOUT_S = 5.0
SLICE_S = 0.05  # timers are scheduled this far ahead, so a long run does not hold every handle at once


def timings_text(buf: bytearray, end: int) -> bytes | None:
    """The response's ``timings_ms`` object as raw JSON text (the server's own stage times; ``None``
    without one): a bytes search and a slice per response, parsed only after the measured run
    (:func:`parse_timings`), so the client spends no CPU on it while the server is measured."""
    at = buf.find(b'"timings_ms":', 0, end)
    if at < 0:
        return None
    close = buf.find(b"}", at, end)
    return bytes(buf[at + 13:close + 1]) if close > 0 else None


def parse_timings(text: bytes | None) -> dict | None:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def where_time_went(latencies: list[float], timings: list[dict | None], lo: float, hi: float) -> dict | None:
    """Means over the answered requests whose latency ranks in ``[lo, hi)`` (fractions): the
    client's latency, the server's ``total`` (handler start to end), its ``model`` (the wall time of
    the micro-batch the request rode) and ``features``, and the rest of the latency (the request
    waiting for the server's event loop or the client's, and the network) -- which part of a slow
    request was the handler's."""
    rows = sorted(((lat, t) for lat, t in zip(latencies, timings) if t and "total" in t), key=lambda row: row[0])
    part = rows[int(lo * len(rows)):max(int(hi * len(rows)), int(lo * len(rows)) + 1)] if rows else []
    if not part:
        return None
    mean = lambda f: round(sum(f(lat, t) for lat, t in part) / len(part), 3)  # noqa: E731
    return {"requests": len(part), "latency_ms": mean(lambda lat, t: lat), "server_total_ms": mean(lambda lat, t: t["total"]),
            "server_model_ms": mean(lambda lat, t: t.get("model", 0.0)),
            "server_features_ms": mean(lambda lat, t: t.get("features", 0.0)),
            "outside_server_ms": mean(lambda lat, t: lat - t["total"])}


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self, client: "Client"):
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due: float | None = None  # due time of the outstanding request
        self.need: int | None = None  # total bytes of the response being read (head + body)
        self.ok = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client.idle.append(self)
        self.client.dispatch()

    def send(self, due: float, path: bytes) -> None:
        self.due, self.need = due, None
        self.sent = time.perf_counter()
        self.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            at = head.find(b"content-length:")
            if at < 0:
                self.fail("response without content-length")
                return
            line_end = head.find(b"\r\n", at)
            self.need = end + 4 + int(head[at + 15:line_end if line_end > 0 else None])
            self.ok = head.startswith(b"http/1.1 200")
        if len(self.buf) >= self.need:
            timings = timings_text(self.buf, self.need) if self.ok else None
            del self.buf[:self.need]
            due, self.due, self.need = self.due, None, None
            self.client.done(self, min(due, self.sent), self.ok, timings)

    def fail(self, why: str) -> None:
        self.client.errors.append(why)
        self.due = None
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        if self.due is not None:
            self.client.errors.append(f"connection lost: {exc!r}")
        if self in self.client.idle:
            self.client.idle.remove(self)
        self.client.conns.discard(self)
        if not self.client.finished:
            self.client.loop.create_task(self.client.connect())


class Client:
    def __init__(self, host: str, port: int, users: list[str]):
        self.host, self.port = host, port
        self.paths = [f"/v1/recommendations/{u}?k=20".encode() for u in users]
        self.loop = asyncio.get_running_loop()
        self.idle: collections.deque[Connection] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()  # due times with no idle connection yet
        self.conns: set[Connection] = set()
        self.latencies: list[float] = []
        self.timings: list[bytes | None] = []  # the server's own timings_ms of each answered request (raw)
        self.errors: list[str] = []
        self.finished = False
        self.rng = random.Random(0)
        self.fired = 0  # scheduled requests whose due time has come

    async def connect(self) -> None:
        try:
            _, conn = await self.loop.create_connection(lambda: Connection(self), self.host, self.port)
            self.conns.add(conn)
        except OSError as exc:
            self.errors.append(f"connect: {exc!r}")

    def due(self, due: float) -> None:
        self.fired += 1
        self.waiting.append(due)
        self.dispatch()

    def dispatch(self) -> None:
        while self.waiting and self.idle:
            self.idle.popleft().send(self.waiting.popleft(), self.rng.choice(self.paths))

    def done(self, conn: Connection, start: float, ok: bool, timings: bytes | None = None) -> None:
        """``start``: the request's due time, or its send time when the loop's timer fired early
        (uvloop's clock has millisecond steps): latency never counts time before the request left."""
        if ok:
            self.latencies.append((time.perf_counter() - start) * 1000.0)
            self.timings.append(timings)
        else:
            self.errors.append("non-200")
        self.idle.append(conn)
        self.dispatch()

    def reap(self) -> None:
        """Requests outstanding longer than TIMEOUT_S are errors; their connection is replaced."""
        now = time.perf_counter()
        for conn in list(self.conns):
            if conn.due is not None and now - conn.due > TIMEOUT_S:
                conn.fail("timeout")


async def run(host: str, port: int, rate: float, duration: float, users: list[str], connections: int) -> dict:
    client = Client(host, port, users)
    await asyncio.gather(*(client.connect() for _ in range(connections)))
    loop = client.loop
    n = int(rate * duration)
    # due times are perf_counter values; the loop's timers use loop.time(): one fixed offset maps them
    offset = loop.time() - time.perf_counter()
    start = time.perf_counter() + 0.3
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    i = 0
    while i < n:
        horizon = time.perf_counter() + SLICE_S
        while i < n and start + i / rate <= horizon:
            due = start + i / rate
            loop.call_at(due + offset, client.due, due)
            i += 1
        client.reap()
        await asyncio.sleep(SLICE_S / 2)
    end = start + n / rate + TIMEOUT_S + 1.0
    # every timer fires (the last were scheduled up to a slice ahead), then every request is answered
    while (client.fired < n or client.waiting or any(c.due is not None for c in client.conns)) and time.perf_counter() < end:
        client.reap()
        await asyncio.sleep(0.01)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    timings = [parse_timings(t) for t in client.timings]  # after the measured run: not the client's CPU per request
    client.finished = True
    for conn in list(client.conns):
        conn.transport.close()
    lat = sorted(client.latencies)
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None  # noqa: E731
    cpu_s = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    kinds = collections.Counter(client.errors)
    unanswered = n - len(lat) - sum(kinds[k] for k in ("non-200", "timeout"))  # never sent, lost, or still out
    if unanswered > 0:
        kinds["unanswered"] = unanswered
    return {"sent": n, "ok": len(lat), "errors": n - len(lat),  # every scheduled request not answered 200
            "error_kinds": dict(kinds.most_common(6)),
            "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99), "connections": connections,
            "where_time_went": {"p45_p55": where_time_went(client.latencies, timings, 0.45, 0.55),
                                "slowest_1pct": where_time_went(client.latencies, timings, 0.99, 1.0)},
            "client_cpu_ms_per_request": round(cpu_s * 1000.0 / n, 4) if n else None}


def main(argv: list[str]) -> None:
    host, port, rate, duration, users = argv[0], int(argv[1]), float(argv[2]), float(argv[3]), json.loads(argv[4])
    connections = int(argv[5]) if len(argv) > 5 else 64
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio works too, with more client CPU
        pass
    print(json.dumps(asyncio.run(run(host, port, rate, duration, users, connections))))


if __name__ == "__main__":
    main(sys.argv[1:])
