"""The platform's table schemas (events, items, users) and the one place that coerces raw frames to them.

Every loader, the synthetic generator and the event log produce frames through
:func:`coerce_events` / :func:`coerce_items` / :func:`coerce_users`, so a bad file fails with one
message naming the file, the row and the column before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

EVENT_TYPES: tuple[str, ...] = ("view", "click", "like", "rate", "purchase")

EVENT_COLUMNS = ["event_id", "user_id", "item_id", "event_type", "value", "timestamp", "context"]
ITEM_COLUMNS = ["item_id", "title", "categories", "created_at"]
USER_COLUMNS = ["user_id", "age", "gender", "occupation", "zip_code", "created_at"]

EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("value", pa.float64()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("context", pa.string()),
    ]
)
ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
USER_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("age", pa.int32()),
        ("gender", pa.string()),
        ("occupation", pa.string()),
        ("zip_code", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


class DataError(ValueError):
    """Input data is unusable. The message names the file, the row and the column."""

    def __init__(self, message: str, *, source: str = "", row: int | None = None, column: str | None = None):
        where = [p for p in (source, f"row {row}" if row is not None else "", f"column '{column}'" if column else "") if p]
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.source, self.row, self.column = source, row, column


@dataclass
class Dataset:
    """A loaded dataset in the platform's schemas. ``events.timestamp`` may be all-null
    (``has_timestamps=False``) for sources without time, such as ML-1M's timestamp-less file."""

    name: str
    events: pd.DataFrame
    items: pd.DataFrame = field(default_factory=lambda: empty_items())
    users: pd.DataFrame = field(default_factory=lambda: empty_users())
    has_timestamps: bool = True

    def summary(self) -> dict[str, object]:
        ts = self.events["timestamp"]
        return {
            "dataset": self.name,
            "events": int(len(self.events)),
            "users": int(self.events["user_id"].nunique()),
            "items_with_events": int(self.events["item_id"].nunique()),
            "catalog_items": int(len(self.items)),
            "user_profiles": int(len(self.users)),
            "first_event": None if not self.has_timestamps else str(ts.min()),
            "last_event": None if not self.has_timestamps else str(ts.max()),
        }


def empty_items() -> pd.DataFrame:
    return ITEM_SCHEMA.empty_table().to_pandas()


def empty_users() -> pd.DataFrame:
    return USER_SCHEMA.empty_table().to_pandas()


def _first_bad(mask: pd.Series) -> int:
    """Index position (0-based data row) of the first True in ``mask``."""
    return int(np.flatnonzero(mask.to_numpy())[0])


def _require_columns(df: pd.DataFrame, required: list[str], source: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"missing required column(s) {missing}; found {list(df.columns)}",
            source=source,
            column=missing[0],
        )


def _ids(series: pd.Series, name: str, source: str, row_offset: int) -> pd.Series:
    if series.isna().any():
        raise DataError("empty id", source=source, row=_first_bad(series.isna()) + row_offset, column=name)
    out = series.astype(str).str.strip()
    if (out == "").any():
        raise DataError("empty id", source=source, row=_first_bad(out == "") + row_offset, column=name)
    return out


def parse_timestamps(series: pd.Series, *, source: str, column: str = "timestamp", unit: str | None = None, row_offset: int = 1) -> pd.Series:
    """Parse epoch numbers (``unit``, default seconds) or ISO strings to UTC; name the first bad row."""
    if pd.api.types.is_datetime64_any_dtype(series):
        out = series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
    elif pd.api.types.is_numeric_dtype(series):
        out = pd.to_datetime(series, unit=unit or "s", utc=True, errors="coerce")
        bad = out.isna() & series.notna()
        if bad.any():
            raise DataError(f"timestamp {series[bad].iloc[0]!r} is out of range", source=source, row=_first_bad(bad) + row_offset, column=column)
    else:
        numeric = pd.to_numeric(series, errors="coerce")
        if numeric.notna().all() and len(series):
            return parse_timestamps(numeric, source=source, column=column, unit=unit, row_offset=row_offset)
        out = pd.to_datetime(series, utc=True, errors="coerce", format="mixed")
        bad = out.isna() & series.notna()
        if bad.any():
            raise DataError(f"unparsable timestamp {series[bad].iloc[0]!r}", source=source, row=_first_bad(bad) + row_offset, column=column)
    if out.isna().any():
        raise DataError("missing timestamp", source=source, row=_first_bad(out.isna()) + row_offset, column=column)
    return out.astype("datetime64[us, UTC]")


def make_event_ids(df: pd.DataFrame) -> pd.Series:
    """Deterministic id of an event: the same (user, item, type, timestamp) always hashes the same,
    which is what makes re-ingesting a day idempotent. pandas' row hash uses a fixed key, so ids
    are stable across processes and versions of this code."""
    keys = df[["user_id", "item_id", "event_type"]].copy()
    keys["ts"] = df["timestamp"].astype("int64") if df["timestamp"].notna().all() else df["timestamp"].astype(str)
    hashed = pd.util.hash_pandas_object(keys, index=False).to_numpy(dtype=np.uint64)
    return pd.Series(np.char.mod("%016x", hashed), index=df.index, dtype=object)


def coerce_events(
    df: pd.DataFrame,
    *,
    source: str,
    row_offset: int = 1,
    allow_missing_timestamps: bool = False,
    timestamp_unit: str | None = None,
) -> pd.DataFrame:
    """Check and convert a raw interactions frame to the event schema.

    ``row_offset`` maps frame positions to the row numbers a person sees in the file
    (1 for a headerless file, 2 for a CSV with a header). Raises :class:`DataError`.
    """
    if len(df) == 0:
        raise DataError("no rows (empty input)", source=source)
    _require_columns(df, ["user_id", "item_id"], source)
    out = pd.DataFrame(index=df.index)
    out["user_id"] = _ids(df["user_id"], "user_id", source, row_offset)
    out["item_id"] = _ids(df["item_id"], "item_id", source, row_offset)
    if "event_type" in df.columns:
        et = df["event_type"].astype(str).str.strip().str.lower()
        bad = ~et.isin(EVENT_TYPES)
        if bad.any():
            raise DataError(
                f"unknown event_type {df['event_type'][bad].iloc[0]!r} (allowed: {', '.join(EVENT_TYPES)})",
                source=source, row=_first_bad(bad) + row_offset, column="event_type",
            )
        out["event_type"] = et
    else:
        out["event_type"] = "rate" if "value" in df.columns else "view"
    if "value" in df.columns:
        value = pd.to_numeric(df["value"], errors="coerce")
        bad = value.isna() & df["value"].notna()
        if bad.any():
            raise DataError(f"value {df['value'][bad].iloc[0]!r} is not a number", source=source, row=_first_bad(bad) + row_offset, column="value")
        out["value"] = value.fillna(1.0).astype("float64")
    else:
        out["value"] = 1.0
    if "timestamp" in df.columns and not (allow_missing_timestamps and df["timestamp"].isna().all()):
        out["timestamp"] = parse_timestamps(df["timestamp"], source=source, unit=timestamp_unit, row_offset=row_offset)
    elif allow_missing_timestamps:
        out["timestamp"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[us, UTC]")
    else:
        raise DataError(f"missing required column(s) ['timestamp']; found {list(df.columns)}", source=source, column="timestamp")
    out["context"] = df["context"].astype(str).where(df["context"].notna(), None) if "context" in df.columns else None
    if "event_id" in df.columns and df["event_id"].notna().all():
        out["event_id"] = df["event_id"].astype(str)
    else:
        out["event_id"] = make_event_ids(out)
    return out[EVENT_COLUMNS].reset_index(drop=True)


def coerce_items(df: pd.DataFrame, *, source: str, row_offset: int = 1) -> pd.DataFrame:
    """Check and convert an item catalog. ``categories`` may be a list or a ``|``-separated string."""
    _require_columns(df, ["item_id"], source)
    out = pd.DataFrame(index=df.index)
    out["item_id"] = _ids(df["item_id"], "item_id", source, row_offset)
    dup = out["item_id"].duplicated()
    if dup.any():
        raise DataError(f"duplicate item_id {out['item_id'][dup].iloc[0]!r}", source=source, row=_first_bad(dup) + row_offset, column="item_id")
    out["title"] = df["title"].astype(str) if "title" in df.columns else out["item_id"]
    if "categories" in df.columns:
        out["categories"] = df["categories"].map(_as_category_list)
    else:
        out["categories"] = [[] for _ in range(len(df))]
    if "created_at" in df.columns and df["created_at"].notna().any():
        filled = df["created_at"].fillna(df["created_at"].dropna().iloc[0])
        out["created_at"] = parse_timestamps(filled, source=source, column="created_at", row_offset=row_offset)
    else:
        out["created_at"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[us, UTC]")
    return out[ITEM_COLUMNS].reset_index(drop=True)


def _as_category_list(value: object) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    return [v for v in str(value).replace(",", "|").split("|") if v and v != "(no genres listed)"]


def coerce_users(df: pd.DataFrame, *, source: str, row_offset: int = 1) -> pd.DataFrame:
    """Check and convert a user-profile table; optional columns become nulls."""
    _require_columns(df, ["user_id"], source)
    out = pd.DataFrame(index=df.index)
    out["user_id"] = _ids(df["user_id"], "user_id", source, row_offset)
    dup = out["user_id"].duplicated()
    if dup.any():
        raise DataError(f"duplicate user_id {out['user_id'][dup].iloc[0]!r}", source=source, row=_first_bad(dup) + row_offset, column="user_id")
    out["age"] = pd.to_numeric(df["age"], errors="coerce").astype("Int32") if "age" in df.columns else pd.array([pd.NA] * len(df), dtype="Int32")
    for col in ("gender", "occupation", "zip_code"):
        out[col] = df[col].astype(str) if col in df.columns else None
    if "created_at" in df.columns and df["created_at"].notna().any():
        out["created_at"] = parse_timestamps(df["created_at"], source=source, column="created_at", row_offset=row_offset)
    else:
        out["created_at"] = pd.Series(pd.NaT, index=df.index, dtype="datetime64[us, UTC]")
    return out[USER_COLUMNS].reset_index(drop=True)
