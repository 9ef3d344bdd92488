"""The feature contract, as plain constants (no Feast import, so transforms and serving can use it).

Why the contract is code and not config: a FeatureService version (``ranker_v1``) is a promise
to the model trained on it. Windows, history length and column names are part of that promise;
changing one means declaring ``ranker_v2`` beside it, never editing v1 in place.

Snapshot semantics (shared by every view): a row with ``event_timestamp = D+1 00:00 UTC``
holds the features computed from events strictly before that instant, i.e. through the end of
day D. A point-in-time join therefore only ever hands a label at time ``t`` a snapshot whose
events all happened before ``t``.
"""
from __future__ import annotations

#: Entity join keys (string ids, as in the lake).
USER_KEY = "user_id"
ITEM_KEY = "item_id"
#: The event-time column of every feature table (Feast's ``timestamp_field``).
TS = "event_timestamp"

#: Sliding windows, in days, of the activity/popularity counters.
WINDOWS: tuple[int, ...] = (1, 7, 30)
#: Length of the recent-history sequence (most recent first).
HISTORY_LENGTH = 20
#: The event type whose ``value`` is a rating (mean ratings use only these).
RATING_EVENT = "rate"

# ---- feature view names ----------------------------------------------------------------
USER_ACTIVITY = "user_activity"
USER_HISTORY = "user_history"
ITEM_STATS = "item_stats"
ITEM_CATALOG = "item_catalog"

# ---- columns per view (order = the order of the Feast schema) -------------------------------
USER_ACTIVITY_COLUMNS: tuple[str, ...] = (
    *(f"user_events_{w}d" for w in WINDOWS),
    "user_events_total",
    "user_ratings_total",
    "user_mean_rating",
    "user_last_event_ts",      # epoch seconds of the user's latest event; recency is derived from it
    "user_category_counts",    # float vector aligned to the category vocabulary (multi-hot sums)
)
USER_HISTORY_COLUMNS: tuple[str, ...] = ("recent_items",)  # last HISTORY_LENGTH item ids, newest first
ITEM_STATS_COLUMNS: tuple[str, ...] = (
    *(f"item_events_{w}d" for w in WINDOWS),
    "item_events_total",
    "item_ratings_total",
    "item_mean_rating",
    "item_last_event_ts",
)
ITEM_CATALOG_COLUMNS: tuple[str, ...] = ("item_categories", "item_created_ts")

VIEW_COLUMNS: dict[str, tuple[str, ...]] = {
    USER_ACTIVITY: USER_ACTIVITY_COLUMNS,
    USER_HISTORY: USER_HISTORY_COLUMNS,
    ITEM_STATS: ITEM_STATS_COLUMNS,
    ITEM_CATALOG: ITEM_CATALOG_COLUMNS,
}
VIEW_KEYS: dict[str, str] = {
    USER_ACTIVITY: USER_KEY,
    USER_HISTORY: USER_KEY,
    ITEM_STATS: ITEM_KEY,
    ITEM_CATALOG: ITEM_KEY,
}
USER_VIEWS = (USER_ACTIVITY, USER_HISTORY)
ITEM_VIEWS = (ITEM_STATS, ITEM_CATALOG)

#: Features computed from stored ones at request/label time (same function online and offline).
USER_DERIVED = ("user_days_since_last_event", "user_category_affinity")
ITEM_DERIVED = ("item_age_days", "item_days_since_last_event")

#: FeatureService name -> {view: columns}. Both training (``training_set``) and serving
#: (``OnlineFeatureClient``) read exactly these.
SERVICES: dict[str, dict[str, tuple[str, ...]]] = {
    "ranker_v1": {
        USER_ACTIVITY: USER_ACTIVITY_COLUMNS,
        USER_HISTORY: USER_HISTORY_COLUMNS,
        ITEM_STATS: ITEM_STATS_COLUMNS,
        ITEM_CATALOG: ITEM_CATALOG_COLUMNS,
    },
    "two_tower_v1": {
        USER_ACTIVITY: ("user_events_total", "user_category_counts"),
        USER_HISTORY: USER_HISTORY_COLUMNS,
        ITEM_STATS: ("item_events_30d", "item_events_total", "item_mean_rating"),
        ITEM_CATALOG: ITEM_CATALOG_COLUMNS,
    },
}


def service_views(service: str) -> dict[str, tuple[str, ...]]:
    """The views and columns of ``service``; a clear error names the known services."""
    try:
        return SERVICES[service]
    except KeyError:
        raise ValueError(f"unknown feature service {service!r} (known: {', '.join(sorted(SERVICES))})") from None
