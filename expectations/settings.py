"""Configuration of the data-validation gate (owned by ``expectations/``)."""
from __future__ import annotations

from pydantic import Field

from core.settings_base import Section


class ValidationSettings(Section):
    """Thresholds for the Great Expectations suites that gate every batch."""

    enabled: bool = True
    volume_band: float = Field(5.0, gt=1.0, description="A batch may hold at most this many times (and at least 1/this) the mean of the previous partitions' row counts.")
    max_top_item_share: float = Field(0.5, gt=0, le=1)
    max_events_per_user_per_day: int = Field(2_000, ge=1, description="Above this a user is counted as a bot.")
    max_bot_share: float = Field(0.01, ge=0, le=1)
    warn_only: list[str] = Field(default_factory=list, description="Expectation names that warn instead of failing the batch.")
