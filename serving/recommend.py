"""The request path: online features -> the two-stage engine (micro-batched) -> fallbacks.

Budgets: every stage has a deadline inside ``total_budget_ms``; a stage that fails or overruns
hands the request to the next fallback, so the answer is always a 200 with
``fallback_reason`` saying what happened:

    models (two-stage)  ->  retrieval only (ranker missing)     fallback_reason=ranker_unavailable
                        ->  popular in context (no models)      model_unavailable
                        ->  popular in context (new user)       cold_start
                        ->  popular in context (stage failed)   model_error / timeout
    features store down -> models with their training-time history   features_unavailable

Micro-batching: concurrent requests of one worker are scored together in one call of the
pipeline (one FAISS search, one DLRM forward), on one model thread. While a batch computes,
new requests queue; the next batch takes them all (like group commit). Optionally
(``serving.microbatch_wait_ms``, Triton's ``max_queue_delay``) a batch smaller than
``microbatch_max`` starts only once its oldest (still waiting) request has waited that long, or
as soon as the queue fills a batch: requests that queued behind a running batch have already
waited and go at once, a lone request on an idle model waits at most that long. Per-request
Python is what the pipeline cannot amortise.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from serving.state import ServingState

log = logging.getLogger(__name__)


@dataclass
class ModelJob:
    user_id: str
    k: int
    history: list[str] | None
    future: asyncio.Future
    engine_versions: dict[str, str] = field(default_factory=dict)
    queued_at: float = 0.0  # time.monotonic() at enqueue


class MicroBatcher:
    """Collects concurrent jobs and runs ``fn(jobs)`` on its own thread (see module docstring).

    The batch thread takes its work straight from the queue the event loop fills: after a batch
    it starts the next one at once if requests queued meanwhile, without a round trip through
    the event loop (which, on a busy machine, may itself be waiting for a CPU), and it is woken
    only when it sleeps for want of work. The loop is woken once per batch, to hand the results
    to their waiters."""

    def __init__(self, fn: Callable[[list[ModelJob]], list[Any]], *, max_batch: int = 64, wait_ms: float = 0.0,
                 on_batch: Callable[[int], None] | None = None, name: str = "model", nice: int = 0):
        """``nice > 0``: the batch thread runs as background CPU work (``core.threads.
        yield_cpu_to_other_threads``; ``serving.model_thread_nice`` says why). ``on_batch(n)`` runs
        on the event loop when a batch of ``n`` jobs has finished."""
        self.fn = fn
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: collections.deque[ModelJob] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._sleeping: str | None = None  # "idle" (no work) / "linger" (waiting for company) / None (busy)
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(name, nice), name=name, daemon=True)
        self._thread.start()

    def enqueue(self, user_id: str, k: int, history: list[str] | None) -> asyncio.Future:
        """Queue a job; returns its future. Cancel the future when its caller gives up (deadline):
        a batch skips cancelled jobs, so an overloaded worker does not keep computing answers
        nobody waits for (which would make every later request miss its deadline too)."""
        job = ModelJob(user_id, k, history, asyncio.get_running_loop().create_future(), queued_at=time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("the micro-batcher is closed")
            self._queue.append(job)
            # wake the thread only if it sleeps for want of work, or lingers and the batch is now full
            if self._sleeping == "idle" or (self._sleeping == "linger" and len(self._queue) >= self.max_batch):
                self._sleeping = None
                self._cond.notify()
        return job.future

    def _next_batch(self) -> list[ModelJob] | None:
        """Blocks until a batch is due (None: closed). Jobs whose caller gave up are dropped here, so
        they neither start a linger's clock nor take a place in a batch."""
        q = self._queue
        with self._cond:
            while True:
                while q and q[0].future.done():
                    q.popleft()
                if self._closed:
                    return None
                if not q:
                    self._sleeping = "idle"
                    self._cond.wait()
                    continue
                if self.wait_s and len(q) < self.max_batch:
                    delay = q[0].queued_at + self.wait_s - time.monotonic()
                    if delay > 0:  # the oldest request has not waited its linger yet
                        self._sleeping = "linger"
                        self._cond.wait(delay)
                        continue  # look again: the oldest may have given up meanwhile, or the batch filled
                self._sleeping = None
                batch: list[ModelJob] = []
                while q and len(batch) < self.max_batch:
                    job = q.popleft()
                    if not job.future.done():
                        batch.append(job)
                if batch:
                    return batch

    def _run(self, name: str, nice: int) -> None:
        _setup_thread(name, nice)
        while (batch := self._next_batch()) is not None:
            try:
                results, error = self.fn(batch), None
            except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                results, error = [None] * len(batch), exc
            groups: dict[asyncio.AbstractEventLoop, list[tuple[ModelJob, Any]]] = {}
            for j, r in zip(batch, results):  # one loop in a server; callers on several loops each get theirs
                groups.setdefault(j.future.get_loop(), []).append((j, r))
            for first, (loop, answers) in enumerate(groups.items()):
                try:
                    loop.call_soon_threadsafe(self._deliver, answers, error, len(batch) if first == 0 else 0)
                except RuntimeError:  # that loop has closed: nobody waits for these answers
                    pass

    def _deliver(self, answers: list[tuple[ModelJob, Any]], error: Exception | None, batch_size: int) -> None:
        """On the event loop: hand each waiter its result (or the batch's error)."""
        if self.on_batch and batch_size:
            self.on_batch(batch_size)
        for j, r in answers:
            if j.future.done():  # its caller gave up meanwhile
                continue
            if error is not None:
                j.future.set_exception(error)
            else:
                j.future.set_result(r)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after its current batch (waited for up to ``timeout_s``, so a shutting-down
        process does not tear the models down under a running batch); queued jobs are cancelled."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        for j in left:
            loop = j.future.get_loop()
            try:
                if loop is _running_loop():
                    j.future.cancel()
                else:
                    loop.call_soon_threadsafe(j.future.cancel)
            except RuntimeError:  # its loop has closed
                pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _setup_thread(name: str, nice: int) -> None:
    from core.threads import name_os_thread, yield_cpu_to_other_threads

    name_os_thread(name)
    why = yield_cpu_to_other_threads(nice)
    if why:
        log.warning("the %s thread keeps its normal priority: %s", name, why)


_ID_STATE: tuple[int, str] = (0, "")  # (pid, random prefix): a forked child draws its own prefix
_ID_COUNTER = itertools.count()


def _request_id() -> str:
    """32 hex characters, unique across workers and restarts: a random per-process prefix plus a
    counter (``uuid4`` reads the OS random source on every request)."""
    global _ID_STATE
    pid = os.getpid()
    if _ID_STATE[0] != pid:
        _ID_STATE = (pid, uuid.uuid4().hex[:16])
    return f"{_ID_STATE[1]}{next(_ID_COUNTER):016x}"


def run_model_batch(state: "ServingState", jobs: list[ModelJob]) -> list[Any]:
    """Runs on the model thread: one engine (read once: swap-safe), one pipeline call."""
    engine = state.models.engine
    if engine is None:
        raise RuntimeError("no engine")
    k = max(j.k for j in jobs)
    histories = [j.history for j in jobs]  # None entries: online features unavailable for that request
    blocked = [state.settings.serving.blocked_items] * len(jobs) if state.settings.serving.blocked_items else None
    t = time.perf_counter()
    recs, timings = engine.recommend([j.user_id for j in jobs], k=k, histories=histories, blocked=blocked)
    timings["model"] = time.perf_counter() - t
    from serving.metrics import observe_many

    for stage, sec in timings.items():  # once per batch, counted once per request of the batch
        observe_many(state.metrics.child("stage", stage), sec, len(jobs))
    return [(items[: j.k], scores[: j.k], timings, engine) for j, (items, scores) in zip(jobs, recs)]


async def recommend(state: "ServingState", user_id: str, *, k: int, context: str | None) -> dict[str, Any]:
    """One recommendation response (never raises for a model/store problem: see module docstring)."""
    cfg = state.settings.serving
    m = state.metrics
    t0 = time.perf_counter()
    deadline = t0 + cfg.total_budget_ms / 1000.0
    request_id = _request_id()
    reason: str | None = None
    timings: dict[str, float] = {}

    # 1. online features: the user's recent history (None = store unavailable)
    history: list[str] | None = None
    ts = time.perf_counter()
    try:
        history = await state.features.user_history(user_id, timeout_s=min(cfg.features_budget_ms / 1000.0, deadline - ts))
    except Exception as exc:  # noqa: BLE001 - store down / slow: serve without fresh features
        reason = "features_unavailable"
        state.note_failure("features", exc)
    timings["features"] = time.perf_counter() - ts
    m.record(m.child("stage", "features"), timings["features"])

    engine = state.models.engine
    items: list[str] = []
    scores: list[float] = []
    versions: dict[str, str] = {}
    known = engine is not None and (user_id in engine.users.index or bool(history))
    if engine is None:
        reason = "model_unavailable"
    elif not known:
        reason = "cold_start"
    else:
        remaining = deadline - time.perf_counter()
        try:
            budget = min(cfg.model_budget_ms / 1000.0, remaining)
            if budget <= 0:
                raise asyncio.TimeoutError
            fut = state.batcher.enqueue(user_id, k, history)
            # on expiry the job future is cancelled (not computed if its batch has not started yet);
            # ``asyncio.timeout`` costs one timer, ``wait_for(shield(...))`` an extra task per request
            async with asyncio.timeout(budget):
                res = await fut
            items, scores, stage_t, used = res
            versions = dict(used.versions)
            timings.update(stage_t)  # observed in the metrics once per batch (run_model_batch)
            if used.degraded and reason is None:
                reason = "ranker_unavailable"
        except asyncio.TimeoutError:
            reason = "timeout"
        except Exception as exc:  # noqa: BLE001
            reason = "model_error"
            state.note_failure("model", exc)
    served_by_models = bool(items) and reason not in ("model_unavailable", "cold_start", "timeout", "model_error")
    if not served_by_models:
        items, scores = [], []
    if len(items) < k:  # popularity fills (or provides) the list; it needs nothing but memory
        pop_items, pop_scores, _ = state.popularity.top(k - len(items), context=context,
                                                       exclude=list(items) + list(history or []))
        items, scores = items + pop_items, scores + pop_scores
        if not served_by_models and reason is None:
            reason = "no_candidates"
    if reason:
        m.record(m.child("fallbacks", reason))
    total = time.perf_counter() - t0
    timings["total"] = total
    m.record(m.child("stage", "total"), total)
    if cfg.log_impressions:
        state.log_impression(request_id=request_id, user_id=user_id, items=items, scores=scores, versions=versions,
                             reason=reason, context=context)
    return {
        "request_id": request_id,
        "user_id": user_id,
        "items": [{"item_id": i, "score": float(s), "position": p} for p, (i, s) in enumerate(zip(items, scores))],
        "model_versions": versions,
        "variant": None,
        "fallback_reason": reason,
        "context": context,
        "timings_ms": {k2: round(v * 1000.0, 3) for k2, v in timings.items()},
    }
