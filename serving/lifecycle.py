"""Model lifecycle in serving: load by alias, poll the registry, hot-swap when an alias moves.

- Start: ``models:/<retrieval>@<alias>`` and ``models:/<ranker>@<alias>`` through
  ``models.artifacts.load_from_registry``, which keeps a verified local copy and remembers
  alias -> version, so an unreachable registry at start means "serve the last loaded
  artifacts"; with no copy at all the engine stays ``None`` (popularity fallback, not ready).
- Poll: every ``registry_poll_s`` a background thread asks the registry which versions the
  aliases point to (two cheap calls); when one moved, the new engine is built and warmed up
  *beside* the old one and then swapped in by one reference assignment. A request reads
  ``manager.engine`` once and keeps that object for its whole life, so requests in flight
  finish on the old models and none fails during a swap.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from serving.engine import Engine, build_engine

if TYPE_CHECKING:  # pragma: no cover
    from core.config import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadStatus:
    ok: bool = False
    source: str = "none"  # registry | local-copy | none
    error: str | None = None
    attempted_at: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)


class ModelManager:
    """Owns the current :class:`Engine`; thread-safe swaps (see module docstring)."""

    def __init__(self, settings: "Settings", *, on_swap: Callable[[Engine | None, Engine], None] | None = None):
        self.settings = settings
        self.engine: Engine | None = None
        self.status = LoadStatus()
        self._lock = threading.Lock()  # one load at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_swap = on_swap
        self._seen_marker: int | None = None
        reg, srv = settings.registry, settings.serving
        self.retrieval_uri = f"models:/{reg.retrieval_model}@{srv.retrieval_alias}"
        self.ranking_uri = f"models:/{reg.ranking_model}@{srv.ranking_alias}"

    # ---- loading ------------------------------------------------------------------------------
    def _load_artifacts(self) -> tuple[Any, Any | None, str]:
        from models.artifacts import load_from_registry

        retrieval = load_from_registry(self.retrieval_uri, self.settings)
        try:
            ranker = load_from_registry(self.ranking_uri, self.settings)
        except Exception as exc:  # noqa: BLE001 - no ranker: retrieval-only, reported as degraded
            log.warning("ranker %s unavailable: %s", self.ranking_uri, exc)
            ranker = None
        cached = bool(retrieval.origin.get("cached")) and (ranker is None or bool(ranker.origin.get("cached")))
        return retrieval, ranker, "local-copy" if cached else "registry"

    def load(self) -> Engine | None:
        """Load (or reload) by alias; swap in the result. Never raises: failures keep the old engine."""
        with self._lock:
            self.status.attempted_at = time.time()
            try:
                retrieval, ranker, source = self._load_artifacts()
                versions = self._versions_of(retrieval, ranker)
                if self.engine is not None and versions == self.engine.versions:
                    self.status.ok, self.status.error = True, None
                    return self.engine
                engine = build_engine(retrieval, ranker, n_candidates=self.settings.serving.candidates,
                                      model_threads=self.settings.serving.model_threads,
                                      precision=self.settings.serving.ranker_precision)
                engine.warm_up()
                if engine.degraded:
                    log.warning("serving retrieval only: %s", engine.degraded)
            except Exception as exc:  # noqa: BLE001 - keep serving what we have
                self.status.error = f"{type(exc).__name__}: {exc}"
                self.status.ok = self.engine is not None
                log.warning("model load failed (%s); keeping %s", self.status.error,
                            self.engine.versions if self.engine else "the popularity fallback")
                return self.engine
            old, self.engine = self.engine, engine  # the atomic switch
            self.status = LoadStatus(True, source, None, self.status.attempted_at, dict(engine.versions))
            if self._on_swap is not None:
                self._on_swap(old, engine)
            del old  # the previous engine goes with the last request holding it (reference counting)
            if self.settings.serving.gc_freeze:
                import gc

                # the loading's cyclic garbage goes first (frozen objects are never collected); the
                # collection scans only what is not frozen yet: the new engine, not the start-up heap
                gc.collect()
                gc.freeze()  # the new engine's objects join the frozen heap (see ServingSettings.gc_freeze)
            log.info("serving models %s (from %s)", engine.versions, source)
            return engine

    @staticmethod
    def _versions_of(retrieval: Any, ranker: Any | None) -> dict[str, str]:
        out = {str(retrieval.origin.get("name")): str(retrieval.origin.get("version"))}
        if ranker is not None:
            out[str(ranker.origin.get("name"))] = str(ranker.origin.get("version"))
        return out

    def alias_versions(self) -> dict[str, str]:
        """What the aliases point to right now (raises when the registry is unreachable)."""
        import mlflow

        from core.tracking import configure_mlflow

        configure_mlflow(self.settings)
        client = mlflow.MlflowClient()
        reg, srv = self.settings.registry, self.settings.serving
        out = {}
        for name, alias in ((reg.retrieval_model, srv.retrieval_alias), (reg.ranking_model, srv.ranking_alias)):
            try:
                out[name] = str(client.get_model_version_by_alias(name, alias).version)
            except Exception as exc:  # noqa: BLE001 - a missing ranker alias is allowed
                if name == reg.retrieval_model:
                    raise
                log.debug("no %s@%s: %s", name, alias, exc)
        return out

    def check_once(self) -> bool:
        """Reload when an alias moved (or nothing is loaded yet). Returns True after a swap."""
        before = self.engine
        if before is not None:
            try:
                current = self.alias_versions()
            except Exception as exc:  # noqa: BLE001 - registry down: keep serving
                log.debug("registry poll failed: %s", exc)
                return False
            if current == before.versions:
                return False
        return self.load() is not before

    # ---- background polling -------------------------------------------------------------------
    @property
    def reload_marker(self):
        return self.settings.paths.run_dir / "serving-reload"

    def request_reload_all(self) -> None:
        """Ask every worker to reload (POST /admin/reload reaches one worker; the others watch
        this marker file's mtime once a second)."""
        self.reload_marker.parent.mkdir(parents=True, exist_ok=True)
        self.reload_marker.write_text(str(time.time()))
        self._seen_marker = self.reload_marker.stat().st_mtime_ns

    def _marker_moved(self) -> bool:
        try:
            mtime = self.reload_marker.stat().st_mtime_ns
        except OSError:
            mtime = 0
        moved = self._seen_marker is not None and mtime != self._seen_marker
        self._seen_marker = mtime
        return moved

    def start_polling(self) -> None:
        """Background thread: registry check every ``registry_poll_s``, reload marker every second."""
        interval = self.settings.serving.registry_poll_s
        if self._thread is not None:
            return
        self._marker_moved()  # remember the marker as it is at start

        def loop() -> None:
            from core.threads import name_os_thread

            name_os_thread()
            last = time.monotonic()
            while not self._stop.wait(1.0 if interval <= 0 else min(1.0, interval)):
                try:
                    if self._marker_moved():
                        self.load()
                    if interval > 0 and time.monotonic() - last >= interval:
                        last = time.monotonic()
                        self.check_once()
                except Exception:  # noqa: BLE001 - the poller must never die
                    log.exception("registry poll crashed")

        self._thread = threading.Thread(target=loop, name="registry-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
