"""The Feast objects (entities, sources, feature views, feature services), declared once.

Both ``pipelines.features.build_features`` (programmatic apply) and ``feast apply`` (through
``feature_defs/repo.py``) get their objects from :func:`feast_objects`, so there is one
declaration. Column lists come from :mod:`feature_defs.schema`; this module only adds Feast
types and wiring. Imports Feast, so import it inside functions (never at CLI start-up).

Choices worth knowing:
- Every view has ``ttl=0`` (no expiry in point-in-time joins): the transforms emit a new
  snapshot row on every day a value can change (activity days and the days events leave each
  window), so the latest snapshot at or before a label's time is always the right one and a
  TTL would only turn correct zeros into nulls.
- Feature tables are Parquet files read by Feast's ``duckdb`` offline store (the ``file``
  store silently drops entity rows with no feature value in range).
- The category vocabulary is data-dependent, so it is recorded as a tag on ``user_activity``
  (``category_vocab``, JSON): ``user_category_counts[i]`` counts events on category
  ``vocab[i]``; the registry carries the vocabulary wherever the features go.
"""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from feature_defs import schema as S

VOCAB_TAG = "category_vocab"


def _types() -> dict[str, Any]:
    from feast.types import Array, Float32, Float64, Int64, String

    types: dict[str, Any] = {}
    for w in (*S.WINDOWS, "total"):
        suffix = f"{w}d" if w != "total" else "total"
        types[f"user_events_{suffix}"] = Int64
        types[f"item_events_{suffix}"] = Int64
    types.update({
        "user_ratings_total": Int64, "user_mean_rating": Float64, "user_last_event_ts": Int64,
        "user_category_counts": Array(Float32), "recent_items": Array(String),
        "item_ratings_total": Int64, "item_mean_rating": Float64, "item_last_event_ts": Int64,
        "item_categories": Array(String), "item_created_ts": Int64,
    })
    missing = {c for cols in S.VIEW_COLUMNS.values() for c in cols} - set(types)
    if missing:  # a column added to the contract without a type is a programming error
        raise RuntimeError(f"no Feast type declared for feature column(s) {sorted(missing)}")
    return types


def table_path(tables_dir: Path, view: str) -> Path:
    """Where the offline table of ``view`` lives (one Parquet file per view)."""
    return Path(tables_dir) / f"{view}.parquet"


def feast_objects(*, tables_dir: Path, category_vocab: Sequence[str]) -> list[Any]:
    """Entities, sources, feature views and feature services, ready for ``FeatureStore.apply``."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType

    types = _types()
    user = Entity(name="user", join_keys=[S.USER_KEY], value_type=ValueType.STRING,
                  description="A person receiving recommendations (the lake's user_id).")
    item = Entity(name="item", join_keys=[S.ITEM_KEY], value_type=ValueType.STRING,
                  description="A catalog item (the lake's item_id).")
    entity_of = {S.USER_KEY: user, S.ITEM_KEY: item}
    descriptions = {
        S.USER_ACTIVITY: "Daily snapshots of a user's activity: event counts over 1/7/30 days and in total, "
                         "ratings, last event time and per-category event counts.",
        S.USER_HISTORY: f"The user's last {S.HISTORY_LENGTH} item ids, newest first (updated in real time).",
        S.ITEM_STATS: "Daily snapshots of an item's popularity over 1/7/30 days and in total, and its ratings.",
        S.ITEM_CATALOG: "Slowly-changing catalog attributes: categories and creation time.",
    }
    views = {}
    for name, columns in S.VIEW_COLUMNS.items():
        source = FileSource(name=f"{name}_source", path=str(table_path(tables_dir, name)), timestamp_field=S.TS)
        tags = {"owner": "feature_defs", "snapshot": "end-of-day" if name != S.ITEM_CATALOG else "created_at"}
        if name == S.USER_ACTIVITY:
            tags[VOCAB_TAG] = json.dumps(list(category_vocab))
        views[name] = FeatureView(
            name=name,
            entities=[entity_of[S.VIEW_KEYS[name]]],
            ttl=timedelta(0),
            schema=[Field(name=c, dtype=types[c]) for c in columns],
            source=source,
            online=True,
            description=descriptions[name],
            tags=tags,
        )
    services = [
        FeatureService(
            name=service,
            features=[views[view][list(cols)] for view, cols in spec.items()],
            description=f"Features of model version {service}; training and serving both read this service.",
        )
        for service, spec in S.SERVICES.items()
    ]
    return [user, item, *views.values(), *services]
