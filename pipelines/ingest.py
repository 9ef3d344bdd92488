"""Ingest step: load a source, keep one day (or all), merge it into the lake idempotently.

``source`` names a dataset (``ml-100k``, ``ml-1m``, ``ml-latest-small``, ``synthetic``) or a
file (``csv:PATH``, ``parquet:PATH``, or a path ending in .csv/.tsv/.parquet) read with the
generic loader and a column mapping. Re-running the same day leaves exactly one copy of each
event, because events are merged on their deterministic ``event_id``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Mapping

from core.config import Settings
from core.datasets import LOADERS, load_interactions
from core.lake import Lake
from core.schemas import DataError, Dataset


@dataclass
class IngestReport:
    source: str
    date: str | None
    events_read: int
    events_added: int
    partitions: list[dict] = field(default_factory=list)
    items: int = 0
    users: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def dataset_folder(name: str, settings: Settings, path: Path | None = None) -> Path:
    """Where to read dataset ``name``: ``path``, else a fetched copy under ``var/data``, else ``../shared/data``."""
    if path is not None:
        return Path(path)
    for base in (settings.paths.data_dir, settings.paths.shared_data_dir):
        if (base / name).is_dir():
            return base / name
    raise DataError(
        f"dataset {name!r} not found under {settings.paths.data_dir} or {settings.paths.shared_data_dir}; "
        f"run `recsys data fetch {name}` or pass --path",
    )


def load_source(
    source: str,
    settings: Settings,
    *,
    path: Path | None = None,
    columns: Mapping[str, str] | None = None,
    sep: str = ",",
    timestamp_unit: str | None = None,
) -> Dataset:
    """Load ``source`` (see module docstring) into the platform's schemas."""
    if source == "synthetic":
        from core.synthetic import generate

        d = settings.data
        return generate(n_users=d.synthetic_users, n_items=d.synthetic_items, n_events=d.synthetic_events,
                        n_days=d.synthetic_days, seed=d.seed)
    if source in LOADERS:
        return LOADERS[source](dataset_folder(source, settings, path))
    for prefix in ("csv:", "parquet:"):
        if source.startswith(prefix):
            return load_interactions(Path(source[len(prefix):]), columns=columns, sep=sep, timestamp_unit=timestamp_unit)
    if Path(source).suffix in (".csv", ".tsv", ".parquet", ".gz"):
        return load_interactions(Path(source), columns=columns, sep="\t" if source.endswith(".tsv") else sep,
                                 timestamp_unit=timestamp_unit)
    raise DataError(f"unknown source {source!r}: use ml-100k, ml-1m, ml-latest-small, synthetic, csv:PATH or parquet:PATH")


def ingest(
    source: str,
    *,
    settings: Settings,
    day: date | None = None,
    path: Path | None = None,
    columns: Mapping[str, str] | None = None,
    sep: str = ",",
    timestamp_unit: str | None = None,
    dataset: Dataset | None = None,
) -> IngestReport:
    """Merge ``source``'s events (only ``day``'s, if given) into the lake; upsert items and users.

    Everything is checked before anything is written, so a bad file writes nothing.
    """
    ds = dataset if dataset is not None else load_source(source, settings, path=path, columns=columns, sep=sep,
                                                         timestamp_unit=timestamp_unit)
    if not ds.has_timestamps:
        raise DataError(f"{ds.name} has no timestamps, so it cannot be partitioned by date; "
                        "use it directly with the RecBole protocol (it needs none)")
    events = ds.events
    if day is not None:
        events = events[events["timestamp"].dt.date == day]
    lake = Lake(settings.paths.lake_dir)
    writes = lake.write_events(events) if len(events) else []
    items = lake.upsert("items", ds.items) if len(ds.items) else len(lake.read_table("items"))
    users = lake.upsert("users", ds.users) if len(ds.users) else len(lake.read_table("users"))
    return IngestReport(
        source=source,
        date=day.isoformat() if day else None,
        events_read=int(len(events)),
        events_added=sum(w.added for w in writes),
        partitions=[{"date": w.date.isoformat(), "incoming": w.incoming, "added": w.added, "total": w.total} for w in writes],
        items=items,
        users=users,
    )
