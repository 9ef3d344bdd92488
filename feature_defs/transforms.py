"""Feature transforms: plain pandas/DuckDB functions from lake frames to feature tables.

Every table is a set of *snapshots*: a row with ``event_timestamp = D+1 00:00 UTC`` holds the
entity's features computed from its events strictly before that instant (through day D).
Rows are emitted only on days a value can change (an activity day ``a``, and ``a + w`` for
each window ``w`` when that day's events leave the window), which keeps the tables small
(ML-100K: ~60K user rows instead of 943 x 213) while the latest row at or before any time is
exact. Nothing here knows about Feast; :mod:`pipelines.features` writes the frames and applies
the definitions.

The same module holds the pure functions used at request time, so training and serving
compute derived features and real-time updates with one piece of code:
:func:`derive_user_features`, :func:`derive_item_features`, :func:`update_user_state`.
"""
from __future__ import annotations

import re
from datetime import date, datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from core.schemas import DataError
from feature_defs import schema as S

DAY_S = 86_400.0
_EVENT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "value", "timestamp")


def _connect() -> Any:
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # day boundaries are UTC days, as in the lake's partitions
    con.execute("SET enable_progress_bar = false")  # DuckDB draws bars straight to the terminal
    return con


def _check_events(events: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in _EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise DataError(f"events frame lacks column(s) {missing}; found {list(events.columns)}")
    if events["timestamp"].isna().any():
        raise DataError("events without timestamps cannot be turned into point-in-time features", column="timestamp")
    return events[list(_EVENT_COLUMNS)]


def category_vocabulary(items: pd.DataFrame) -> list[str]:
    """Sorted distinct categories of the catalog: the index space of ``user_category_counts``."""
    if len(items) == 0:
        return []
    return sorted({str(c) for cats in items["categories"] if cats is not None for c in cats})


def _snapshot_offsets() -> list[int]:
    return sorted({0, *S.WINDOWS})


def activity_snapshots(
    events: pd.DataFrame,
    *,
    key: str,
    prefix: str,
    end_day: date,
    items: pd.DataFrame | None = None,
    category_vocab: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Counters of one entity (``key`` = ``user_id`` or ``item_id``) as end-of-day snapshots.

    Columns: ``<key>``, ``event_timestamp``, ``<prefix>_events_{w}d`` for each window (events on
    the ``w`` days ending with the snapshot day), ``<prefix>_events_total``,
    ``<prefix>_ratings_total``, ``<prefix>_mean_rating`` (over ``rate`` events; null with none),
    ``<prefix>_last_event_ts`` (epoch seconds) and, when ``category_vocab`` is given,
    ``<prefix>_category_counts`` (per-category event counts, in vocabulary order).
    Only events on or before ``end_day`` are used; no snapshot is dated after it.
    """
    if key not in (S.USER_KEY, S.ITEM_KEY):
        raise ValueError(f"key must be {S.USER_KEY!r} or {S.ITEM_KEY!r}, got {key!r}")
    ev = _check_events(events)
    offsets = _snapshot_offsets()
    longest = max(S.WINDOWS)
    window_cols = ",\n".join(
        f"coalesce(sum(d.n) FILTER (WHERE d.day > s.snap - {w}), 0)::BIGINT AS {prefix}_events_{w}d" for w in S.WINDOWS
    )
    con = _connect()
    try:
        con.register("ev_in", ev)
        con.execute(f"""
            CREATE TEMP TABLE daily AS
            SELECT {key} AS k, CAST(timestamp AS DATE) AS day, count(*) AS n,
                   count(*) FILTER (WHERE event_type = '{S.RATING_EVENT}') AS rn,
                   sum(value) FILTER (WHERE event_type = '{S.RATING_EVENT}') AS rsum,
                   floor(max(epoch(timestamp)))::BIGINT AS last_ts
            FROM ev_in WHERE CAST(timestamp AS DATE) <= $end GROUP BY ALL""", {"end": end_day})
        con.execute(f"""
            CREATE TEMP TABLE snaps AS
            SELECT DISTINCT k, (day + o.off)::DATE AS snap FROM daily, unnest({offsets}) AS o(off)
            WHERE day + o.off <= $end""", {"end": end_day})
        out = con.execute(f"""
            WITH cum AS (
                SELECT k, day,
                       sum(n) OVER w AS n_total, sum(rn) OVER w AS r_total,
                       sum(rsum) OVER w AS r_sum, max(last_ts) OVER w AS last_ts
                FROM daily WINDOW w AS (PARTITION BY k ORDER BY day ROWS UNBOUNDED PRECEDING)),
            win AS (
                SELECT s.k, s.snap, {window_cols}
                FROM snaps s LEFT JOIN daily d ON d.k = s.k AND d.day > s.snap - {longest} AND d.day <= s.snap
                GROUP BY s.k, s.snap)
            SELECT win.k AS {key}, (win.snap + 1)::TIMESTAMPTZ AS {S.TS},
                   {", ".join(f"{prefix}_events_{w}d" for w in S.WINDOWS)},
                   c.n_total::BIGINT AS {prefix}_events_total,
                   c.r_total::BIGINT AS {prefix}_ratings_total,
                   CASE WHEN c.r_total > 0 THEN c.r_sum / c.r_total END AS {prefix}_mean_rating,
                   c.last_ts AS {prefix}_last_event_ts
            FROM win ASOF JOIN cum c ON win.k = c.k AND win.snap >= c.day
            ORDER BY 1, 2""").df()
        if category_vocab is not None:
            counts = _category_counts(con, key, ev, items, category_vocab)
            out = out.merge(counts, on=[key, S.TS], how="left")
            empty = np.zeros(len(category_vocab), dtype=np.float32)
            out[f"{prefix}_category_counts"] = [
                np.asarray(v, dtype=np.float32) if isinstance(v, (list, np.ndarray)) else empty
                for v in out.pop("_cat_counts")
            ]
    finally:
        con.close()
    return _finish(out, key)


def _category_counts(con: Any, key: str, ev: pd.DataFrame, items: pd.DataFrame | None,
                     vocab: Sequence[str]) -> pd.DataFrame:
    """Cumulative per-category event counts at every snapshot (uses the ``daily``/``snaps`` tables)."""
    if items is None:
        raise ValueError("category counts need the items frame (item_id, categories)")
    if not vocab:
        return pd.DataFrame({key: pd.Series(dtype=object), S.TS: pd.Series(dtype="datetime64[us, UTC]"),
                             "_cat_counts": pd.Series(dtype=object)})
    con.register("items_in", items[["item_id", "categories"]])
    con.register("vocab_in", pd.DataFrame({"cat": list(vocab), "idx": np.arange(len(vocab), dtype=np.int64)}))
    return con.execute(f"""
        WITH icat AS (
            SELECT i.item_id, v.idx FROM (SELECT item_id, unnest(categories) AS cat FROM items_in) i
            JOIN vocab_in v USING (cat)),
        cd AS (
            SELECT e.{key} AS k, CAST(e.timestamp AS DATE) AS day, ic.idx, count(*)::DOUBLE AS n
            FROM ev_in e JOIN icat ic USING (item_id) GROUP BY ALL),
        cc AS (
            SELECT k, idx, day, sum(n) OVER (PARTITION BY k, idx ORDER BY day ROWS UNBOUNDED PRECEDING) AS cum FROM cd),
        grid AS (SELECT s.k, s.snap, v.idx FROM snaps s CROSS JOIN vocab_in v),
        joined AS (
            SELECT g.k, g.snap, g.idx, coalesce(cc.cum, 0) AS cum
            FROM grid g ASOF LEFT JOIN cc ON g.k = cc.k AND g.idx = cc.idx AND g.snap >= cc.day)
        SELECT k AS {key}, (snap + 1)::TIMESTAMPTZ AS {S.TS}, list(cum ORDER BY idx) AS _cat_counts
        FROM joined GROUP BY k, snap""").df()


def history_snapshots(events: pd.DataFrame, *, end_day: date, length: int = S.HISTORY_LENGTH) -> pd.DataFrame:
    """``recent_items``: each user's last ``length`` item ids (newest first) at the end of every
    day the user was active. Ties in time are broken by ``event_id`` (as :func:`update_user_state` does)."""
    if length < 1:
        raise ValueError(f"history length must be >= 1, got {length}")
    ev = _check_events(events)
    con = _connect()
    try:
        con.register("ev_in", ev)
        out = con.execute(f"""
            WITH h AS (
                SELECT user_id, CAST(timestamp AS DATE) AS day,
                       list(item_id) OVER (PARTITION BY user_id ORDER BY timestamp, event_id
                                           ROWS BETWEEN {length - 1} PRECEDING AND CURRENT ROW) AS items,
                       row_number() OVER (PARTITION BY user_id, CAST(timestamp AS DATE)
                                          ORDER BY timestamp DESC, event_id DESC) AS rn
                FROM ev_in WHERE CAST(timestamp AS DATE) <= $end)
            SELECT user_id, (day + 1)::TIMESTAMPTZ AS {S.TS}, list_reverse(items) AS recent_items
            FROM h WHERE rn = 1 ORDER BY 1, 2""", {"end": end_day}).df()
    finally:
        con.close()
    out["recent_items"] = [list(v) for v in out["recent_items"]]
    return _finish(out, S.USER_KEY)


def catalog_table(items: pd.DataFrame) -> pd.DataFrame:
    """``item_categories`` and ``item_created_ts``; valid from the item's ``created_at``
    (from 1970 when unknown, so cold items still have their categories)."""
    created = items["created_at"]
    ts = created.fillna(pd.Timestamp(0, tz="UTC"))
    out = pd.DataFrame({
        S.ITEM_KEY: items["item_id"].astype(str).to_numpy(),
        S.TS: ts.to_numpy(),
        "item_categories": [list(map(str, c)) if c is not None else [] for c in items["categories"]],
        "item_created_ts": pd.array((created.astype("int64") // 10**6).where(created.notna()), dtype="Int64")
        if len(items) else pd.array([], dtype="Int64"),
    })
    out[S.TS] = pd.to_datetime(out[S.TS], utc=True)
    return _finish(out, S.ITEM_KEY)


def _finish(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    frame[key] = frame[key].astype(str)
    frame[S.TS] = pd.to_datetime(frame[S.TS], utc=True).astype("datetime64[us, UTC]")
    return frame.reset_index(drop=True)


def feature_tables(events: pd.DataFrame, items: pd.DataFrame, *, end_day: date) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """All four feature tables (by view name) and the category vocabulary."""
    vocab = category_vocabulary(items)
    tables = {
        S.USER_ACTIVITY: activity_snapshots(events, key=S.USER_KEY, prefix="user", end_day=end_day,
                                            items=items, category_vocab=vocab),
        S.USER_HISTORY: history_snapshots(events, end_day=end_day),
        S.ITEM_STATS: activity_snapshots(events, key=S.ITEM_KEY, prefix="item", end_day=end_day),
        S.ITEM_CATALOG: catalog_table(items),
    }
    return tables, vocab


# ---- request-time functions (shared by training_set and the online client) --------------------

def _seconds(now: Any) -> Any:
    """Epoch seconds of a Timestamp/datetime/array of them (float)."""
    if isinstance(now, (int, float, np.floating, np.integer)):
        return float(now)
    if isinstance(now, (pd.Series, pd.Index, np.ndarray)):
        return pd.to_datetime(pd.Series(now), utc=True).astype("datetime64[us, UTC]").astype("int64").to_numpy() / 1e6
    ts = pd.Timestamp(now)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts).value / 1e9


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_FRACTION_BEYOND_US = re.compile(r"\.\d{7,}")  # nanoseconds: datetime keeps microseconds only


def _event_seconds(raw: Any) -> float:
    """Epoch seconds of one event's timestamp, the same float :func:`_seconds` (pandas) gives: the
    real-time path reads ISO strings and datetimes with the standard library (2.4 us against 6.2
    for ``pd.Timestamp`` with an offset, measured here) and leaves pandas the other formats it
    accepts, and nanoseconds."""
    if isinstance(raw, (int, float, np.integer, np.floating)):
        return float(raw)
    when = None
    if isinstance(raw, str) and not _FRACTION_BEYOND_US.search(raw):
        try:
            when = datetime.fromisoformat(raw.strip())
        except ValueError:
            pass
    elif type(raw) is datetime:
        when = raw
    if when is None:
        return _seconds(pd.Timestamp(raw))
    d = (when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)) - _EPOCH
    return ((d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds) * 1_000 / 1e9  # ns / 1e9, as pandas


def _days_since(last: pd.Series, now_s: Any) -> np.ndarray:
    """Days from the epoch seconds in ``last`` (nullable) to ``now_s`` (scalar or per row); NaN where unknown."""
    last_f = pd.to_numeric(last, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return (np.asarray(now_s, dtype=float) - last_f) / DAY_S


def affinity(counts: Any) -> np.ndarray | None:
    """Per-category counts -> shares summing to 1 (None when there are none)."""
    if counts is None:
        return None
    arr = np.asarray(counts, dtype=np.float32)
    total = float(arr.sum())
    return arr / total if total > 0 else None


def derive_user_features(frame: pd.DataFrame, now: Any) -> pd.DataFrame:
    """Add ``user_days_since_last_event`` and ``user_category_affinity`` relative to ``now``
    (a scalar time, or per-row times such as a training set's ``event_timestamp``)."""
    out = frame
    now_s = _seconds(now)
    if "user_last_event_ts" in out.columns:
        out["user_days_since_last_event"] = _days_since(out["user_last_event_ts"], now_s)
    if "user_category_counts" in out.columns:
        out["user_category_affinity"] = [affinity(c) for c in out["user_category_counts"]]
    return out


def derive_user_dict(features: dict[str, Any], now_s: float) -> dict[str, Any]:
    """:func:`derive_user_features` for one user's dict (the serving path; no pandas)."""
    last = features.get("user_last_event_ts")
    if "user_last_event_ts" in features:
        features["user_days_since_last_event"] = None if last is None else (now_s - float(last)) / DAY_S
    if "user_category_counts" in features:
        features["user_category_affinity"] = affinity(features["user_category_counts"])
    return features


def derive_item_features(frame: pd.DataFrame, now: Any) -> pd.DataFrame:
    """Add ``item_age_days`` and ``item_days_since_last_event`` relative to ``now``."""
    now_s = _seconds(now)
    if "item_created_ts" in frame.columns:
        frame["item_age_days"] = _days_since(frame["item_created_ts"], now_s)
    if "item_last_event_ts" in frame.columns:
        frame["item_days_since_last_event"] = _days_since(frame["item_last_event_ts"], now_s)
    return frame


def empty_user_state(n_categories: int) -> dict[str, Any]:
    """The stored features of a user with no events (what a brand-new user starts from)."""
    state: dict[str, Any] = {f"user_events_{w}d": 0 for w in S.WINDOWS}
    state.update({"user_events_total": 0, "user_ratings_total": 0, "user_mean_rating": None,
                  "user_last_event_ts": None,
                  "user_category_counts": np.zeros(n_categories, dtype=np.float32), "recent_items": []})
    return state


def event_records(events: pd.DataFrame | Sequence[Mapping[str, Any]], *, source: str = "events") -> list[dict[str, Any]]:
    """Check new events and turn them into plain dicts (the real-time path avoids pandas per event).

    Required: ``user_id``, ``item_id``, ``timestamp`` (datetime, ISO string or epoch seconds);
    optional: ``event_type`` (default ``view``, must be a known type), ``value`` (default 1.0),
    ``event_id`` (ties in time are broken by it, as in the batch transforms). Each record gets
    ``ts`` (epoch seconds, float). Raises :class:`DataError` naming the row and column.
    """
    from core.schemas import EVENT_TYPES

    rows = events.to_dict("records") if isinstance(events, pd.DataFrame) else [dict(e) for e in events]
    out = []
    for n, row in enumerate(rows):
        for col in ("user_id", "item_id", "timestamp"):
            v = row.get(col)
            if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
                raise DataError("missing value", source=source, row=n, column=col)
        etype = str(row.get("event_type") or "view").strip().lower()
        if etype not in EVENT_TYPES:
            raise DataError(f"unknown event_type {etype!r} (allowed: {', '.join(EVENT_TYPES)})", source=source, row=n,
                            column="event_type")
        raw_ts = row["timestamp"]
        try:
            when = _event_seconds(raw_ts)
        except (ValueError, TypeError) as exc:
            raise DataError(f"unparsable timestamp {raw_ts!r} ({exc})", source=source, row=n, column="timestamp") from None
        value = row.get("value")
        try:
            value = 1.0 if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)
        except (TypeError, ValueError):
            raise DataError(f"value {value!r} is not a number", source=source, row=n, column="value") from None
        out.append({"event_id": str(row.get("event_id") or ""), "user_id": str(row["user_id"]).strip(),
                    "item_id": str(row["item_id"]).strip(), "event_type": etype, "value": value, "ts": when})
    return out


def update_user_state(
    state: Mapping[str, Any],
    events: pd.DataFrame | Sequence[Mapping[str, Any]],
    *,
    item_category_index: Mapping[str, Sequence[int]],
    n_categories: int,
    length: int = S.HISTORY_LENGTH,
) -> dict[str, Any]:
    """Fold one user's new ``events`` into their stored features (the real-time write path).

    Cumulative features (totals, mean rating, last event, category counts, history) come out
    exactly as the batch transforms would compute them with these events included. Window
    counters are incremented but only *decay* when the next daily snapshot is materialised,
    so between materialisations ``user_events_1d`` can over-count by the previous day's events
    (see docs/features.md). ``events``: a frame or :func:`event_records` dicts;
    ``item_category_index`` maps item id -> vocabulary indices.
    """
    recs = events if (not isinstance(events, pd.DataFrame) and all("ts" in r for r in events)) else event_records(events)
    recs = sorted(recs, key=lambda r: (r["ts"], r["event_id"]))
    new = dict(state)
    n = len(recs)
    for w in S.WINDOWS:
        new[f"user_events_{w}d"] = int(state.get(f"user_events_{w}d") or 0) + n
    new["user_events_total"] = int(state.get("user_events_total") or 0) + n
    rated = [r["value"] for r in recs if r["event_type"] == S.RATING_EVENT]
    old_rn = int(state.get("user_ratings_total") or 0)
    old_mean = state.get("user_mean_rating")
    if old_mean is not None and np.isnan(old_mean):
        old_mean = None
    if rated:
        old_sum = (float(old_mean) * old_rn) if (old_rn and old_mean is not None) else 0.0
        new["user_mean_rating"] = (old_sum + float(sum(rated))) / (old_rn + len(rated))
    else:
        new["user_mean_rating"] = old_mean
    new["user_ratings_total"] = old_rn + len(rated)
    known = [int(v) for v in (state.get("user_last_event_ts"),) if v is not None]
    if n:
        known.append(int(max(r["ts"] for r in recs)))
    new["user_last_event_ts"] = max(known) if known else None
    old_counts = state.get("user_category_counts")
    counts = np.zeros(n_categories, dtype=np.float32)
    if old_counts is not None and len(old_counts):
        counts[: min(n_categories, len(old_counts))] = np.asarray(old_counts, dtype=np.float32)[:n_categories]
    for r in recs:
        for idx in item_category_index.get(r["item_id"], ()):
            counts[idx] += 1.0
    new["user_category_counts"] = counts
    history = [r["item_id"] for r in reversed(recs)] + list(state.get("recent_items") or [])
    new["recent_items"] = history[:length]
    return new
