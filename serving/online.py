"""Online features for the request path, through ``pipelines.features.OnlineFeatureClient``.

Reads run on a small thread pool with a deadline, so a slow or dead store (Redis down, SQLite
file gone) costs at most ``features_budget_ms`` and the request goes on without fresh features.
The client's per-process cache is the documented consistency trade-off (docs/features.md): with
the host's change stamps (the default) every worker on the host stops serving a user's cached
features as soon as any of them applies that user's events; the TTL
(``features.online_cache_ttl_s``, ``FeatureSettings.cache_ttl_s``) bounds only writes made on other hosts. Each lookup is counted
in ``recsys_feature_cache_lookups{outcome=hit|miss|changed}``.

Event updates are applied by one background task per worker, in arrival order, batched
(many events -> one ``apply_events`` call), right after the events are durable; the 202 does
not wait for it unless the client asks (``?sync_features=true``), because a Feast write costs
milliseconds and ingest must sustain thousands of events per second.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

from feature_defs.schema import USER_HISTORY_COLUMNS
from serving.metrics import metrics

if TYPE_CHECKING:  # pragma: no cover
    from core.config import Settings

log = logging.getLogger(__name__)

#: the stored user features the request path uses (the recent items; the models hold everything
#: else they need), as the feature contract declares them
HISTORY = USER_HISTORY_COLUMNS
#: the ``k`` a feature-read job carries on the shared MicroBatcher: a request's read (cache miss)
#: or a refresh-ahead read (the entry is still fresh but is read again)
MISS_READ, REFRESH_READ = 0, 1


class FeaturesUnavailable(RuntimeError):
    """The online store is not loaded or not answering."""


class OnlineFeatures:
    def __init__(self, settings: "Settings"):
        self.settings = settings
        self.client: Any = None
        self.error: str | None = None
        from core.threads import name_os_thread

        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="feature-updates", initializer=name_os_thread)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._batcher: Any = None  # serving.recommend.MicroBatcher of feature reads, made on first use
        self._refreshing: set[str] = set()  # users with a refresh-ahead read queued or running
        self.refreshes = 0
        self.applied = 0
        self.apply_failures = 0

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Open the feature store (never raises: without it requests use the models' own history)."""
        try:
            from pipelines.features import OnlineFeatureClient

            self.client = OnlineFeatureClient(self.settings)
            self.client.start_auto_refresh()
            self.error = None
        except Exception as exc:  # noqa: BLE001 - not built yet, store down ...
            self.client = None
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("online features unavailable: %s", self.error)
            return
        try:  # the first read pays Feast's lazy set-up (tens of ms): not on a user's request
            self.client.user_features("__warmup__")
            self.client.invalidate("__warmup__")
        except Exception as exc:  # noqa: BLE001 - loaded but not answering: requests fall back per call
            log.warning("online features warm-up failed: %s: %s", type(exc).__name__, exc)

    def ok(self) -> bool:
        return self.client is not None

    def status(self) -> dict[str, Any]:
        return {"loaded": self.client is not None, "error": self.error, "applied_events": self.applied,
                "apply_failures": self.apply_failures, "refresh_ahead_reads": self.refreshes}

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._batcher is not None:
            self._batcher.close()
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- reads --------------------------------------------------------------------------------
    def _histories(self, jobs: list[Any]) -> list[Any]:
        """One pool hop and ONE store read for every request queued meanwhile (cache misses, and
        ``REFRESH_READ`` jobs, read even though their entry is still fresh); a failing read becomes
        each request's exception (raised in its own task), not the batch's."""
        try:
            feats = self.client.users_features([job.user_id for job in jobs], derived=False, columns=HISTORY,
                                               refresh=any(job.k == REFRESH_READ for job in jobs))
        except Exception as exc:  # noqa: BLE001 - returned, raised in each request's task
            return [exc] * len(jobs)
        return [[str(i) for i in (f.get("recent_items") or [])] for f in feats]

    async def user_history(self, user_id: str, *, timeout_s: float) -> list[str]:
        """The user's recent items, newest first ([] for a user the store does not know).

        Concurrent reads of a worker are micro-batched like model calls (``MicroBatcher``): one
        thread hop per batch instead of per request, which is what the event loop pays most for
        under load."""
        if self.client is None:
            raise FeaturesUnavailable(self.error or "online features not loaded")
        if timeout_s <= 0:
            raise asyncio.TimeoutError
        cached, outcome = self.client.cache_lookup(user_id, columns=HISTORY)
        m = metrics()
        m.record(m.child("feature_cache", outcome))
        if cached is not None:  # fresh in this worker's cache: no store read, no thread hop
            self._refresh_ahead(user_id)
            return [str(i) for i in (cached.get("recent_items") or [])]
        fut = self._reads().enqueue(user_id, MISS_READ, None)
        async with asyncio.timeout(timeout_s):  # on expiry the awaited job future is cancelled: its batch skips it
            res = await fut
        if isinstance(res, Exception):  # the batch's read failed: a fresh error per request (one shared
            raise FeaturesUnavailable(f"{type(res).__name__}: {res}") from res  # object's traceback would grow)
        return res

    def _reads(self) -> Any:
        if self._batcher is None:
            from serving.recommend import MicroBatcher

            self._batcher = MicroBatcher(self._histories, max_batch=256, name="feature-reads")
        return self._batcher

    def _refresh_ahead(self, user_id: str) -> None:
        """A request found a fresh entry close to expiring (``features.online_cache_refresh_ahead``):
        queue a background read that renews it, so this active user's next request does not wait
        for one. The entry being served is still within the TTL: the staleness bound is unchanged.
        At most one refresh per user is in flight; its result only lands in the cache."""
        feats = self.settings.features
        ahead = feats.online_cache_refresh_ahead * feats.cache_ttl_s()
        if ahead <= 0 or user_id in self._refreshing:
            return
        left = self.client.cache_expires_in(user_id)
        if left is None or left > ahead:
            return
        self._refreshing.add(user_id)
        self.refreshes += 1
        self._reads().enqueue(user_id, REFRESH_READ, None).add_done_callback(lambda _: self._refreshing.discard(user_id))

    # ---- event updates ------------------------------------------------------------------------
    def _apply(self, records: list[dict[str, Any]]) -> None:
        """Runs on the pool: one ``apply_events`` call for all queued records, handed over as the
        plain dicts the handler built (``apply_events`` checks them with
        ``feature_defs.transforms.event_records``, which normalises ids, types and values as
        ``core.schemas.coerce_events`` does). Building a core-schema frame first cost ~5.8 ms of
        CPU per call against ~2 ms for the update itself (pandas per column, event-id hashing
        the update does not use), and this thread's CPU holds the GIL the event loop needs."""
        self.client.apply_events(records)

    async def apply(self, records: list[dict[str, Any]], *, wait: bool = False, timeout_s: float = 5.0) -> bool:
        """Queue (or, with ``wait``, perform) the online update for accepted event records.

        Returns True when the update is known to be applied. Queued updates coalesce: while one
        ``apply_events`` runs, everything that arrives waits and goes in the next call, so the
        cost per event falls as the event rate rises (a frame + a Feast write per batch, not per
        request)."""
        if self.client is None or not records:
            return False
        loop = asyncio.get_running_loop()
        if wait:
            try:
                await asyncio.wait_for(loop.run_in_executor(self._pool, self._apply, list(records)), timeout_s)
                self.applied += len(records)
                return True
            except Exception as exc:  # noqa: BLE001 - the events are durable; features catch up later
                self.apply_failures += 1
                log.warning("online feature update failed: %s: %s", type(exc).__name__, exc)
                return False
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._updater())
        self._queue.put_nowait(records)
        return False

    async def _updater(self) -> None:
        """Applies queued records in arrival order; everything queued meanwhile goes in one call."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = list(await self._queue.get())
            while not self._queue.empty():
                batch.extend(self._queue.get_nowait())
            t = time.perf_counter()
            try:
                await loop.run_in_executor(self._pool, self._apply, batch)
                self.applied += len(batch)
            except Exception as exc:  # noqa: BLE001
                self.apply_failures += 1
                log.warning("online feature update of %d events failed after %.0f ms: %s", len(batch),
                            (time.perf_counter() - t) * 1000, exc)
