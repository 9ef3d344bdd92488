"""Prometheus metrics for the API, safe with several uvicorn worker processes.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``recsys serve`` sets it, and empties the folder, before
the workers start) every worker writes its samples to memory-mapped files there and
``/metrics`` aggregates all workers; without it (an in-process app in a test) the default
registry is used. Info metrics do not exist in multiprocess mode, so model versions are a
gauge ``recsys_model_info{model,version,alias} = 1`` (``livemax``: dead workers drop out).
"""
from __future__ import annotations

import asyncio
import bisect
import os
import re
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Latency buckets in seconds: fine below 10 ms, where the budgets live.
BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGES = ("features", "retrieval", "filter", "ranking", "diversity", "model", "total")


@dataclass
class Metrics:
    requests: Counter
    latency: Histogram
    stage: Histogram
    fallbacks: Counter
    events: Counter
    impressions: Counter
    batch_size: Histogram
    model_info: Gauge
    ready: Gauge
    swaps: Counter
    feature_cache: Counter
    _children: dict[tuple[str, tuple[str, ...]], Any] = field(default_factory=dict, repr=False)
    _pending: list[tuple[Any, float]] = field(default_factory=list, repr=False)  # (child, value) of this loop turn
    _flush_on: Any = field(default=None, repr=False)  # the loop a flush is scheduled on, if any

    def child(self, name: str, *values: str) -> Any:
        """``getattr(self, name).labels(*values)``, cached: ``labels()`` validates the label values
        and takes a lock on every call (~1 us; four per recommendation on the event loop)."""
        key = (name, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self, name).labels(*values)
        return found

    def record(self, child: Any, value: float = 1.0) -> None:
        """``child.inc(value)`` (counter) or ``child.observe(value)`` (histogram), written together
        with every other update of this event-loop turn (:meth:`flush`, scheduled with ``call_soon``).

        In multiprocess mode each update is a locked write to a memory-mapped file: a
        recommendation made seven of them on the event loop (~12% of its CPU under load). The
        requests a finished micro-batch releases all resume in one loop turn, so their updates
        collapse into one write per touched counter / bucket. They land before the loop next polls
        for I/O, so a ``/metrics`` read after a response (on any worker) sees them as before: the
        updates were written after the response was sent already. Event-loop thread only; without
        a running loop the update is written at once."""
        self._pending.append((child, value))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop (a script, a test): write now
            self.flush()
            return
        if self._flush_on is not loop:  # none scheduled on this loop (a loop stopped before its flush ran: again here)
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the pending updates, one write per touched counter and histogram bucket."""
        pending, self._pending, self._flush_on = self._pending, [], None
        grouped: dict[Any, list[float]] = {}  # metric children hash by identity
        for child, value in pending:
            grouped.setdefault(child, []).append(value)
        for child, values in grouped.items():
            if isinstance(child, Histogram):
                observe_values(child, values)
            else:
                child.inc(sum(values))

    def set_model(self, model: str, version: str | None, alias: str, previous: str | None = None) -> None:
        if previous is not None and previous != version:
            self.model_info.labels(model=model, version=previous, alias=alias).set(0)
        self.model_info.labels(model=model, version=str(version), alias=alias).set(1)


_METRICS: Metrics | None = None


def observe_many(child: Histogram, amount: float, count: int) -> None:
    """``count`` observations of one ``amount`` at the cost of one: a micro-batch's stage time is the
    stage time of each of its requests, so the model stages are recorded once per batch with the
    batch's size as the count (per request, in multiprocess mode, each observation is two locked
    memory-mapped writes on the event loop). Uses the histogram's value objects directly; if a
    prometheus_client release renames them, it falls back to ``count`` plain observations."""
    if count <= 0:
        return
    try:
        bounds, buckets, total = child._upper_bounds, child._buckets, child._sum  # noqa: SLF001
    except AttributeError:
        for _ in range(count):
            child.observe(amount)
        return
    total.inc(amount * count)
    for bound, bucket in zip(bounds, buckets):
        if amount <= bound:
            bucket.inc(count)
            break


def observe_values(child: Histogram, values: list[float]) -> None:
    """``child.observe(v)`` for each of ``values`` with one write per touched bucket plus one for the
    sum (the histogram's value objects, as :func:`observe_many`; plain observations if a
    prometheus_client release renames them)."""
    try:
        bounds, buckets, total = child._upper_bounds, child._buckets, child._sum  # noqa: SLF001
    except AttributeError:
        for v in values:
            child.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)  # the first bound >= v, as ``observe``'s ``amount <= bound``
        counts[i] = counts.get(i, 0) + 1
    total.inc(sum(values))
    for i, n in counts.items():
        buckets[i].inc(n)


def counter_by_label(metrics_text: str, counter: str, label: str) -> dict[str, float]:
    """A one-label counter's values by label value in a Prometheus text (what ``/metrics`` serves),
    e.g. ``counter_by_label(text, "recsys_feature_cache_lookups", "outcome")``: for tests and
    benchmarks that read the server from outside."""
    pattern = rf'^{re.escape(counter)}_total\{{{re.escape(label)}="([^"]+)"\}} ([\d.e+]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, metrics_text, flags=re.M)}


def metrics() -> Metrics:
    """The process's metric objects (created once; prometheus_client forbids duplicates)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics(
            requests=Counter("recsys_http_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"]),
            latency=Histogram("recsys_http_request_seconds", "HTTP request latency by endpoint", ["endpoint"], buckets=BUCKETS),
            stage=Histogram("recsys_stage_seconds", "Recommendation latency per stage (features, retrieval, ranking, total ...)",
                            ["stage"], buckets=BUCKETS),
            fallbacks=Counter("recsys_fallbacks", "Recommendations served by a fallback, by reason", ["reason"]),
            events=Counter("recsys_events", "Feedback events by outcome", ["outcome"]),
            impressions=Counter("recsys_impressions_logged", "Impression records handed to the event log", ["outcome"]),
            batch_size=Histogram("recsys_model_batch_size", "Requests scored together in one batched model call",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128)),
            model_info=Gauge("recsys_model_info", "Model versions being served (1 = current)", ["model", "version", "alias"],
                             multiprocess_mode="livemax"),
            ready=Gauge("recsys_ready", "1 when models and stores are loaded", multiprocess_mode="livemin"),
            swaps=Counter("recsys_model_swaps", "Hot swaps after an alias moved, by outcome", ["model", "outcome"]),
            feature_cache=Counter("recsys_feature_cache_lookups",
                                  "Per-process user-feature cache lookups by outcome: hit, miss (absent or past the TTL), "
                                  "changed (a write on this host since the entry was read)", ["outcome"]),
        )
    return _METRICS


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics (all workers when in multiprocess mode)."""
    if _METRICS is not None:
        _METRICS.flush()  # this worker's updates of the current loop turn, if any
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead() -> None:
    """Drop this worker's live gauges at shutdown (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
