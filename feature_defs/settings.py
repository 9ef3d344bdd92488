"""Configuration of the Feast feature store (owned by ``feature_defs/``)."""
from __future__ import annotations

from typing import Literal

from core.settings_base import Section


class FeatureSettings(Section):
    """Where the Feast repo keeps its registry and online store."""

    project: str = "recsys"
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    online_cache_ttl_s: float = 5.0
