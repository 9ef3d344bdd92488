"""Configuration of the Feast feature store (owned by ``feature_defs/``).

Only *deployment* choices live here (where the registry, tables and online store are, how long
the serving process may cache). The feature *contract* (which features, windows, history length)
is code in :mod:`feature_defs.schema`: changing it means a new FeatureService version, not a
config flip, so a model trained on ``ranker_v1`` is never served different features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from core.settings_base import Section


class FeatureSettings(Section):
    """Where the Feast repo keeps its registry, feature tables and online store."""

    project: str = Field("recsys", pattern=r"^[A-Za-z0-9][A-Za-z0-9_]*$",
                         description="Feast project; also the suffix of every Redis key Feast writes.")
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_ttl_s: int | None = Field(None, ge=1, description="Expire Redis keys of entities not written for this long (None: never).")
    store_dir: Path = Field(Path("features"), description="Registry, SQLite online store, generated feature_store.yaml and "
                                                          "feature tables; relative to paths.var_dir.")
    online_cache_ttl_s: float | None = Field(
        None, ge=0, description="Per-process cache of a user's online features (0: no cache). With online_change_stamps, "
                                "a write made on this host invalidates the entry at once, and the TTL bounds only writes "
                                "made on other hosts sharing the store (and Redis keys expiring); without them it bounds "
                                "every other process's writes (docs/features.md). None: the bound that fits "
                                "(cache_ttl_s()): 3600 s with the SQLite store and stamps, 60 s with Redis and stamps, 5 s "
                                "without stamps.")
    online_cache_ttl_jitter: float = Field(
        0.2, ge=0, lt=1, description="Each entry lives a random 1 - jitter to 1 times online_cache_ttl_s, so entries "
                                     "written together (a worker's start, a deploy, a burst of traffic) do not all expire "
                                     "in the same instant and send their users to the store at once. The staleness bound "
                                     "stays the TTL.")
    online_cache_max_users: int = Field(
        50_000, ge=1, description="Most users a process keeps in its cache (~4 KB each with 50 recent items): past it, "
                                  "expired entries are dropped first, then the oldest written, so a worker serving "
                                  "millions of users does not grow without bound.")
    online_cache_refresh_ahead: float = Field(
        0.0, ge=0, lt=1, description="The serving path re-reads a user's cached features in the background when a request "
                                     "finds the entry within this fraction of online_cache_ttl_s of expiring (0: off), so "
                                     "active users' requests stop waiting for reads; the staleness bound stays the TTL. "
                                     "Costs extra reads (see docs/serving.md).")
    online_change_stamps: bool = Field(
        True, description="Writers of user features on this host (apply_events, materialisation) bump a per-user counter "
                          "in a memory-mapped file under store_dir; a cache hit counts only while its counter is unchanged.")
    online_change_stamp_slots: int = Field(
        1 << 20, ge=1, le=1 << 28, description="Counters in that file (4 bytes each; users share one by crc32, which only "
                                                "costs spurious re-reads). Applies when the file is created; an existing "
                                                "file keeps its count.")
    item_refresh_interval_s: float = Field(60.0, gt=0, description="How often the serving process checks the registry for a "
                                                                   "newer item materialisation and reloads its item table.")

    def cache_ttl_s(self) -> float:
        """The user-feature cache's TTL: ``online_cache_ttl_s`` if set, else what it has to bound.
        With the change stamps, a cached entry is as fresh as the store for every write made on
        this host, so the TTL bounds only writes the stamps cannot see: none with the SQLite store
        (one file, written on this host only), hence an hour (a memory and liveness bound); other
        hosts' writes and key expiry with Redis, hence a minute. Without the stamps it bounds every
        other process's writes: 5 s."""
        if self.online_cache_ttl_s is not None:
            return float(self.online_cache_ttl_s)
        if not self.online_change_stamps:
            return 5.0
        return 3600.0 if self.online_store == "sqlite" else 60.0

    def resolved_dir(self, var_dir: Path) -> Path:
        """The absolute store directory (``store_dir`` is relative to ``var_dir`` unless absolute)."""
        d = self.store_dir.expanduser()
        return d if d.is_absolute() else (var_dir / d)
