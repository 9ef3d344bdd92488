"""Micro-batching of the request path (no server): concurrent jobs share one call, and jobs whose
caller gave up (deadline) are not computed, so an overloaded worker does not spend its CPU on
answers nobody waits for."""
from __future__ import annotations

import asyncio
import dataclasses
import threading


def test_concurrent_jobs_share_a_batch_and_cancelled_jobs_are_skipped() -> None:
    from serving.recommend import MicroBatcher

    calls: list[list[str]] = []
    gate = threading.Event()

    def fn(jobs):
        calls.append([j.user_id for j in jobs])
        gate.wait(5)  # the first batch blocks until the test has queued (and cancelled) more jobs
        return [j.user_id.upper() for j in jobs]

    async def scenario():
        b = MicroBatcher(fn, max_batch=8)
        first = b.enqueue("a", 1, None)
        await asyncio.sleep(0.05)  # batch ["a"] is running
        rest = [b.enqueue(u, 1, None) for u in ("b", "c", "d")]
        rest[1].cancel()  # "c" timed out while queued
        gate.set()
        out = [await first, await rest[0], await rest[2]]
        b.close()
        return out

    assert asyncio.run(scenario()) == ["A", "B", "D"]
    assert calls == [["a"], ["b", "d"]]


def test_linger_waits_from_the_oldest_request_not_per_batch() -> None:
    """``wait_ms``: a lone request waits for company at most that long (counted from its own
    arrival); requests that queued behind a running batch have waited already and go at once."""
    import time

    from serving.recommend import MicroBatcher

    calls: list[tuple[list[str], float]] = []
    gate = threading.Event()

    def fn(jobs):
        calls.append(([j.user_id for j in jobs], time.monotonic()))
        if jobs[0].user_id == "a":
            gate.wait(5)
        return [j.user_id for j in jobs]

    async def scenario():
        b = MicroBatcher(fn, max_batch=8, wait_ms=150)
        t0 = time.monotonic()
        first = b.enqueue("a", 1, None)
        await asyncio.sleep(0.05)
        second = b.enqueue("b", 1, None)  # arrives within a's linger: same batch
        await asyncio.sleep(0.3)  # batch [a, b] is running (blocked on the gate)
        rest = [b.enqueue(u, 1, None) for u in ("c", "d")]
        await asyncio.sleep(0.2)  # c and d have now waited longer than the linger
        t_release = time.monotonic()
        gate.set()
        out = [await f for f in (first, second, *rest)]
        b.close()
        return out, t0, t_release

    out, t0, t_release = asyncio.run(scenario())
    assert out == ["a", "b", "c", "d"]
    assert [c[0] for c in calls] == [["a", "b"], ["c", "d"]]
    assert calls[0][1] - t0 >= 0.14  # the first batch waited out a's linger
    assert calls[1][1] - t_release < 0.1  # the second did not linger again


def test_linger_ends_when_the_batch_fills_and_ignores_requests_that_gave_up() -> None:
    import time

    from serving.recommend import MicroBatcher

    calls: list[tuple[list[str], float]] = []

    def fn(jobs):
        calls.append(([j.user_id for j in jobs], time.monotonic()))
        return [j.user_id for j in jobs]

    async def scenario():
        b = MicroBatcher(fn, max_batch=2, wait_ms=400)
        t0 = time.monotonic()
        first = [b.enqueue("a", 1, None)]
        await asyncio.sleep(0.02)
        first.append(b.enqueue("b", 1, None))  # fills the batch: it goes now, not at 400 ms
        await asyncio.gather(*first)
        b.close()
        b2 = MicroBatcher(fn, max_batch=8, wait_ms=400)
        t1 = time.monotonic()
        gone = b2.enqueue("c", 1, None)
        await asyncio.sleep(0.3)
        late = b2.enqueue("d", 1, None)  # queued 300 ms after c; then c gives up
        gone.cancel()
        out = await late
        b2.close()
        return t0, t1, out

    t0, t1, out = asyncio.run(scenario())
    assert out == "d"
    assert [c[0] for c in calls] == [["a", "b"], ["d"]]
    assert calls[0][1] - t0 < 0.2  # full batch: no linger
    assert calls[1][1] - t1 >= 0.3 + 0.35  # d waited its own linger, not c's remaining 100 ms


def test_the_next_batch_starts_without_waiting_for_the_event_loop() -> None:
    """The batch thread takes queued jobs itself: with the event loop busy (here: blocked) when a
    batch ends, the jobs that queued behind it start at once, not when the loop next runs."""
    import time

    from serving.recommend import MicroBatcher

    started: dict[str, float] = {}
    gate = threading.Event()

    def fn(jobs):
        started[jobs[0].user_id] = time.monotonic()
        if jobs[0].user_id == "a":
            gate.wait(5)
        return [j.user_id for j in jobs]

    async def scenario():
        b = MicroBatcher(fn, max_batch=8)
        first = b.enqueue("a", 1, None)
        await asyncio.sleep(0.05)  # batch [a] is running
        second = b.enqueue("b", 1, None)
        threading.Timer(0.05, gate.set).start()
        time.sleep(1.0)  # the loop is busy elsewhere while [a] ends
        unblocked_at = time.monotonic()
        out = [await first, await second]
        b.close()
        return out, unblocked_at

    out, unblocked_at = asyncio.run(scenario())
    assert out == ["a", "b"]
    assert started["b"] < unblocked_at  # [b] started while the loop was still blocked


def test_close_cancels_queued_jobs_and_refuses_new_ones() -> None:
    import pytest

    from serving.recommend import MicroBatcher

    gate = threading.Event()

    def fn(jobs):
        gate.wait(5)
        return [j.user_id for j in jobs]

    async def scenario():
        b = MicroBatcher(fn, max_batch=1)
        running = b.enqueue("a", 1, None)
        await asyncio.sleep(0.05)
        queued = b.enqueue("b", 1, None)
        threading.Timer(0.1, gate.set).start()
        b.close()  # returns once the running batch has ended
        assert not b._thread.is_alive()  # noqa: SLF001
        with pytest.raises(RuntimeError, match="closed"):
            b.enqueue("c", 1, None)
        return await running, queued.cancelled()

    assert asyncio.run(scenario()) == ("a", True)  # the running batch still answers


def test_a_failing_batch_fails_each_waiter_not_the_worker() -> None:
    from serving.recommend import MicroBatcher

    def fn(jobs):
        raise RuntimeError("model exploded")

    async def scenario():
        b = MicroBatcher(fn)
        futs = [b.enqueue(u, 1, None) for u in ("x", "y")]
        errors = []
        for f in futs:
            try:
                await f
            except RuntimeError as exc:
                errors.append(str(exc))
        b.close()
        return errors

    assert asyncio.run(scenario()) == ["model exploded", "model exploded"]


def test_observe_many_equals_repeated_observations() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from serving.metrics import BUCKETS, observe_many

    reg = CollectorRegistry()
    once = Histogram("batched", "x", buckets=BUCKETS, registry=reg)
    each = Histogram("single", "x", buckets=BUCKETS, registry=reg)
    for amount, n in ((0.004, 3), (0.2, 2), (9.0, 1), (0.001, 0)):
        observe_many(once, amount, n)
        for _ in range(n):
            each.observe(amount)
    def samples_of(name):
        return [(s.name.replace(name, "h"), s.labels.get("le"), s.value) for m in reg.collect() if m.name == name
                for s in m.samples if not s.name.endswith("_created")]

    assert samples_of("batched") == samples_of("single")
    samples = {(s.name, s.labels.get("le")): s.value for m in reg.collect() if m.name == "batched" for s in m.samples}
    assert samples[("batched_count", None)] == 6 and samples[("batched_bucket", "0.005")] == 3


def test_recorded_updates_of_a_loop_turn_equal_plain_updates() -> None:
    """``Metrics.record`` defers the per-request metric writes of one event-loop turn and writes
    them grouped: the same samples as plain ``inc`` / ``observe`` calls, written before the loop's
    next turn (and at once without a running loop)."""
    import asyncio

    from prometheus_client import CollectorRegistry, Counter, Histogram

    from serving.metrics import BUCKETS, Metrics

    reg = CollectorRegistry()
    grouped_h = Histogram("grouped_h", "x", ["stage"], buckets=BUCKETS, registry=reg)
    plain_h = Histogram("plain_h", "x", ["stage"], buckets=BUCKETS, registry=reg)
    grouped_c = Counter("grouped_c", "x", ["reason"], registry=reg)
    plain_c = Counter("plain_c", "x", ["reason"], registry=reg)
    m = Metrics(**{f.name: None for f in dataclasses.fields(Metrics) if not f.name.startswith("_")})  # only the batching is used
    values = [0.0005, 0.0004, 0.004, 0.0051, 0.2, 9.0, 0.003, 0.0005]

    def samples_of(name):
        return sorted((s.name.replace(name, "x"), tuple(sorted(s.labels.items())), s.value) for f in reg.collect()
                      if f.name == name for s in f.samples if not s.name.endswith("_created"))

    async def turn() -> int:
        for i, v in enumerate(values):
            stage = "a" if i % 3 else "b"
            m.record(grouped_h.labels(stage), v)
            plain_h.labels(stage).observe(v)
            m.record(grouped_c.labels(stage))
            plain_c.labels(stage).inc()
        m.record(grouped_c.labels("b"), 2.5)
        plain_c.labels("b").inc(2.5)
        unwritten = len(m._pending)  # noqa: SLF001 - nothing written during the turn
        await asyncio.sleep(0)  # the next turn: flushed
        return unwritten

    assert asyncio.run(turn()) == 2 * len(values) + 1
    assert not m._pending  # noqa: SLF001
    assert samples_of("grouped_h") == samples_of("plain_h") and samples_of("grouped_c") == samples_of("plain_c")
    m.record(grouped_c.labels("c"))  # no running loop: written now
    plain_c.labels("c").inc()
    assert samples_of("grouped_c") == samples_of("plain_c")

    # a loop that stopped before its scheduled flush ran must not strand later updates
    m._pending.append((grouped_c.labels("d"), 1.0))  # noqa: SLF001 - as left by a loop that stopped
    m._flush_on = asyncio.new_event_loop()  # noqa: SLF001
    m._flush_on.close()  # noqa: SLF001

    async def later_turn() -> None:
        m.record(grouped_c.labels("d"))
        await asyncio.sleep(0)

    asyncio.run(later_turn())
    plain_c.labels("d").inc(2)
    assert not m._pending and samples_of("grouped_c") == samples_of("plain_c")  # noqa: SLF001


def test_request_ids_are_unique_hex() -> None:
    from serving.recommend import _request_id

    ids = [_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_history_rows_are_distinct_known_items_per_request():
    """The engine's history rows (built straight as CSR arrays): one 1.0 per distinct known item,
    unknown ids and duplicates dropped, empty histories empty, columns sorted."""
    import numpy as np

    from models.base import IdMap
    from serving.engine import Engine

    items = IdMap(tuple(f"i{j}" for j in range(6)))
    eng = Engine(retrieval=None, pipeline=None, items=items, users=IdMap(("u",)), versions={})
    m = eng._history_matrix([["i3", "i1", "i3", "nope"], [], ["i5"], ["nope"]])  # noqa: SLF001
    assert m.shape == (4, 6) and m.nnz == 3
    # the kernels' dtypes as built (no conversion, hence no copy, on the request path)
    assert (m.indptr.dtype, m.indices.dtype, m.data.dtype) == (np.int64, np.int64, np.float32)
    csr = m.tocsr()
    assert csr.has_sorted_indices
    assert csr.toarray().tolist() == [[0, 1, 0, 1, 0, 0], [0] * 6, [0, 0, 0, 0, 0, 1], [0] * 6]
    assert eng._history_matrix([]).shape == (0, 6)  # noqa: SLF001


def test_batch_thread_runs_as_background_cpu_work_and_the_caller_is_untouched() -> None:
    """``nice``: the batch thread is SCHED_BATCH at that niceness (``serving.model_thread_nice``:
    the event loop preempts it); the thread that owns the batcher keeps its priority."""
    import os
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("thread priorities are set on Linux only")
    from serving.recommend import MicroBatcher

    def fn(jobs):
        return [(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))] * len(jobs)

    async def scenario(nice: int):
        b = MicroBatcher(fn, max_batch=8, nice=nice)
        try:
            return await b.enqueue("a", 1, None)
        finally:
            b.close()

    caller = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
    assert asyncio.run(scenario(7)) == (os.SCHED_BATCH, max(7, caller[1]))  # lowered, never raised
    assert asyncio.run(scenario(0)) == caller  # 0: scheduled like the thread that made it
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == caller
