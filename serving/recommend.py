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
import concurrent.futures
import itertools
import logging
import os
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
    queued_at: float = 0.0  # loop time of enqueue


class MicroBatcher:
    """Collects concurrent jobs and runs ``fn(jobs)`` on one worker thread (see module docstring)."""

    def __init__(self, fn: Callable[[list[ModelJob]], list[Any]], *, max_batch: int = 64, wait_ms: float = 0.0,
                 on_batch: Callable[[int], None] | None = None, name: str = "model", nice: int = 0):
        """``nice > 0``: the batch thread runs as background CPU work (``core.threads.
        yield_cpu_to_other_threads``; ``serving.model_thread_nice`` says why)."""
        self.fn = fn
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.on_batch = on_batch
        self._pending: list[ModelJob] = []
        self._draining = False
        self._filled: asyncio.Event | None = None  # set while lingering: the queue reached max_batch
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_setup_thread,
                                                               initargs=(name, nice))

    def enqueue(self, user_id: str, k: int, history: list[str] | None) -> asyncio.Future:
        """Queue a job; returns its future. Cancel the future when its caller gives up (deadline):
        a batch skips cancelled jobs, so an overloaded worker does not keep computing answers
        nobody waits for (which would make every later request miss its deadline too)."""
        loop = asyncio.get_running_loop()
        job = ModelJob(user_id, k, history, loop.create_future(), queued_at=loop.time())
        self._pending.append(job)
        if self._filled is not None and len(self._pending) >= self.max_batch:
            self._filled.set()  # a full batch does not wait out the linger
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return job.future

    async def submit(self, user_id: str, k: int, history: list[str] | None) -> Any:
        return await self.enqueue(user_id, k, history)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                while self._pending and self._pending[0].future.done():
                    self._pending.pop(0)  # a request that gave up does not set the linger's clock
                if not self._pending:
                    break
                if self.wait_s and len(self._pending) < self.max_batch:
                    delay = self._pending[0].queued_at + self.wait_s - loop.time()
                    if delay > 0:  # the oldest request has not waited its linger yet
                        self._filled = asyncio.Event()
                        try:
                            await asyncio.wait_for(self._filled.wait(), delay)
                        except asyncio.TimeoutError:
                            pass
                        finally:
                            self._filled = None
                        continue  # look again: the oldest may have given up meanwhile, or the batch filled
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                batch = [j for j in batch if not j.future.done()]  # timed-out requests are not computed
                if not batch:
                    continue
                if self.on_batch:
                    self.on_batch(len(batch))
                try:
                    results = await loop.run_in_executor(self._executor, self.fn, batch)
                except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                    for j in batch:
                        if not j.future.done():
                            j.future.set_exception(exc)
                    continue
                for j, r in zip(batch, results):
                    if not j.future.done():
                        j.future.set_result(r)
        finally:
            self._draining = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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
