"""Everything one worker process holds while serving, built once at start-up (lifespan)."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


from serving.eventlog import EventLog, open_log
from serving.lifecycle import ModelManager
from serving.metrics import Metrics, metrics
from serving.online import OnlineFeatures
from serving.popularity import Popularity, build_popularity
from serving.recommend import MicroBatcher, run_model_batch

if TYPE_CHECKING:  # pragma: no cover
    from core.config import Settings

log = logging.getLogger(__name__)


@dataclass
class ServingState:
    settings: "Settings"
    metrics: Metrics
    log: EventLog
    popularity: Popularity
    catalog: frozenset[str]
    models: ModelManager
    features: OnlineFeatures
    batcher: MicroBatcher
    started_at: float = field(default_factory=time.time)
    log_ok: bool = True
    _last_warn: dict[str, float] = field(default_factory=dict)
    _impressions: list[dict[str, Any]] = field(default_factory=list)

    # ---- helpers used by the routes ---------------------------------------------------------
    def known_item(self, item_id: str) -> bool:
        """True when the item is in the catalog (lake items or the models'); an empty catalog accepts all."""
        if not self.catalog:
            return True
        if item_id in self.catalog:
            return True
        engine = self.models.engine
        return engine is not None and item_id in engine.items.index

    def note_failure(self, stage: str, exc: BaseException) -> None:
        """Log a failing stage at most every 10 s (a dead store must not flood the logs)."""
        now = time.time()
        if now - self._last_warn.get(stage, 0.0) > 10.0:
            self._last_warn[stage] = now
            log.warning("%s stage failed: %s: %s", stage, type(exc).__name__, exc)

    def log_impression(self, *, request_id: str, user_id: str, items: list[str], scores: list[float],
                       versions: dict[str, str], reason: str | None, context: str | None) -> None:
        """Fire-and-forget: impressions never add an fsync to the recommendation path.

        Propensities: the served list is deterministic given the models, so each shown
        position has propensity 1 under the logging policy (exploration would change this)."""
        record = {"request_id": request_id, "user_id": user_id, "items": items, "scores": scores,
                  "positions": list(range(len(items))), "propensities": [1.0] * len(items),
                  "model_versions": versions, "variant": None, "fallback_reason": reason, "context": context,
                  "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1_000_000:06d}+00:00"}
        self._impressions.append(record)
        if len(self._impressions) == 1:  # first of a burst: hand the burst to the log shortly
            try:
                asyncio.get_running_loop().call_later(self.settings.serving.impression_flush_ms / 1000.0,
                                                      self.flush_impressions)
            except RuntimeError:  # no running loop (called from a script): hand it over now
                self.flush_impressions()

    def flush_impressions(self) -> None:
        """One hand-over to the event log per burst of impressions instead of one per request
        (each hand-over wakes the log's writer thread); unacknowledged by design, so at most
        ``serving.impression_flush_ms`` of them are in memory only."""
        batch, self._impressions = self._impressions, []
        if not batch:
            return
        try:
            self.log.append_nowait("impressions", batch)
            self.metrics.impressions.labels(outcome="queued").inc(len(batch))
        except Exception as exc:  # noqa: BLE001 - losing impressions must not fail requests
            self.metrics.impressions.labels(outcome="failed").inc(len(batch))
            self.note_failure("impressions", exc)

    def readiness(self) -> dict[str, Any]:
        engine = self.models.engine
        status = self.models.status
        ranker = engine.pipeline.ranker if engine is not None and engine.pipeline is not None else None
        return {
            "models_loaded": engine is not None,
            "model_versions": dict(engine.versions) if engine else {},
            "model_source": status.source,
            "model_error": status.error,
            "ranker": None if engine is None else ("ok" if engine.pipeline is not None else engine.degraded),
            "ranker_precision": ranker.precision if ranker is not None else None,
            "ranker_mlp_backends": ranker.mlp_backends if ranker is not None else None,
            "features": self.features.status(),
            "eventlog": {"backend": self.log.backend, "ok": self.log_ok, "durable": self.log.durable,
                         "note": self.log.durability_note},
            "popularity_items": len(self.popularity.ranked.get("", ([], None))[0]),
            "catalog_items": len(self.catalog),
        }

    def is_ready(self) -> bool:
        return self.models.engine is not None and self.log_ok and self.features.ok()


def load_catalog(settings: "Settings") -> frozenset[str]:
    from core.lake import Lake

    items = Lake(settings.paths.lake_dir).read_table("items")
    return frozenset(items["item_id"].astype(str)) if len(items) else frozenset()


async def build_state(settings: "Settings") -> ServingState:
    """Start-up: event log, popularity, catalog, models (by alias), online features."""
    m = metrics()
    log_ = open_log(settings)
    log_ok = True
    try:
        await log_.start()
    except Exception as exc:  # noqa: BLE001 - serve reads; writes answer 503 until it is back
        log.error("event log unavailable: %s", exc)
        log_ok = False
    popularity = await asyncio.to_thread(build_popularity, settings)
    catalog = await asyncio.to_thread(load_catalog, settings)

    def on_swap(old: Any, new: Any) -> None:
        for name, version in new.versions.items():
            prev = old.versions.get(name) if old is not None else None
            alias = settings.serving.retrieval_alias if name == settings.registry.retrieval_model else settings.serving.ranking_alias
            m.set_model(name, version, alias, previous=prev)
            m.swaps.labels(model=name, outcome="swapped").inc()

    models = ModelManager(settings, on_swap=on_swap)
    await asyncio.to_thread(models.load)
    models.start_polling()
    features = OnlineFeatures(settings)
    await asyncio.to_thread(features.start)
    state = ServingState(settings=settings, metrics=m, log=log_, popularity=popularity, catalog=catalog,
                         models=models, features=features, batcher=None, log_ok=log_ok)  # type: ignore[arg-type]
    state.batcher = MicroBatcher(lambda jobs: run_model_batch(state, jobs), max_batch=settings.serving.microbatch_max,
                                 wait_ms=settings.serving.microbatch_wait_ms, nice=settings.serving.model_thread_nice,
                                 on_batch=lambda n: m.batch_size.observe(n))
    m.ready.set(1 if state.is_ready() else 0)
    return state


async def close_state(state: ServingState) -> None:
    state.models.stop()
    state.batcher.close()
    last, state._impressions = state._impressions, []
    if last:  # the last burst is written (awaited: a broker backend's background append would race the close)
        try:
            await state.log.append("impressions", last)
            state.metrics.impressions.labels(outcome="queued").inc(len(last))
        except Exception as exc:  # noqa: BLE001 - shutting down: report, do not block the exit
            state.metrics.impressions.labels(outcome="failed").inc(len(last))
            log.warning("could not write the last %d impressions at shutdown: %s", len(last), exc)
    await state.log.close()
    state.features.close()
