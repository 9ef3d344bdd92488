"""Configuration of the data-validation gate (owned by ``expectations/``).

Every threshold the suites in :mod:`expectations.suites` use lives here, so a production config
can tighten or relax one check (``RECSYS_VALIDATION__VOLUME_BAND=3``) without touching code.
"""
from __future__ import annotations

from datetime import date

from pydantic import Field

from core.settings_base import Section


class ValidationSettings(Section):
    """Thresholds for the Great Expectations suites that gate every batch."""

    enabled: bool = True
    # ---- volume -------------------------------------------------------------------------
    volume_band: float = Field(5.0, gt=1.0, description="A batch may hold at most this many times (and at least 1/this) the mean of the previous partitions' row counts.")
    volume_window: int = Field(7, ge=1, description="How many previous partitions the volume band is computed over.")
    volume_min_history: int = Field(3, ge=1, description="Fewer previous partitions than this: the volume check is skipped (no baseline yet).")
    # ---- distribution sanity ------------------------------------------------------------
    max_top_item_share: float = Field(0.5, gt=0, le=1, description="Largest share of a batch's events one item may take.")
    min_rows_for_shares: int = Field(100, ge=1, description="Batches smaller than this skip the top-item-share check (one event is 100% of a one-event day).")
    max_events_per_user_per_day: int = Field(2_000, ge=1, description="Above this a user is counted as a bot.")
    max_bot_share: float = Field(0.01, ge=0, le=1, description="Largest share of a batch's users that may be bots.")
    # ---- ranges -------------------------------------------------------------------------
    rating_min: float = Field(0.5, description="Smallest valid rating (value of 'rate' events); MovieLens uses 0.5 or 1.")
    rating_max: float = Field(5.0, description="Largest valid rating (value of 'rate' events).")
    value_min: float = Field(0.0, description="Smallest valid value of any event.")
    value_max: float = Field(1_000_000.0, description="Largest valid value of any event (guards against unit mix-ups).")
    max_user_age: int = Field(120, ge=1, description="Largest plausible age in the user profiles.")
    # ---- time ---------------------------------------------------------------------------
    dataset_start: date | None = Field(None, description="No event may be older than this; default: the lake's earliest other partition minus backfill_tolerance_days.")
    backfill_tolerance_days: int = Field(7, ge=0, description="Without dataset_start, a batch may reach this many days before the lake's earliest other partition (older needs dataset_start).")
    clock_skew_seconds: int = Field(300, ge=0, description="Events up to this far in the future are tolerated (producer clocks drift).")
    freshness_max_lag_hours: float = Field(12.0, gt=0, description="A live partition's newest event must be at most this old (relative to now, or to the end of its day). 12 h tolerates sparse days (3 of 213 ML-100K days exceed it); tighten it for a busy live stream.")
    freshness_live_days: int = Field(1, ge=0, description="Partitions at most this many days before today are 'live' and get the freshness check; older ones are backfills.")
    # ---- behaviour ----------------------------------------------------------------------
    warn_only: list[str] = Field(default_factory=list, description="Expectation names (or fnmatch patterns such as 'events.*_share') that warn instead of failing the batch.")
    examples: int = Field(5, ge=1, le=50, description="How many example values the failure summary shows per expectation.")
    demo_recent_partitions: int = Field(7, ge=1, description="How many of the newest partitions the demo validates one by one.")
