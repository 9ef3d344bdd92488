"""The lake and the ingest step: partitioning by date, idempotency, nothing partial on bad input."""
from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from core.lake import Lake
from core.schemas import DataError
from pipelines.ingest import ingest


def test_ingest_partitions_by_day_and_is_idempotent(settings, tiny_dataset) -> None:
    report = ingest("synthetic", settings=settings, dataset=tiny_dataset)
    lake = Lake(settings.paths.lake_dir)
    days = lake.partitions()
    assert len(days) == 14 and days[0] == date(2024, 1, 1)
    assert report.events_added == len(tiny_dataset.events)
    for d in days:
        assert (settings.paths.lake_dir / "events" / f"date={d.isoformat()}" / "part-0.parquet").is_file()
    again = ingest("synthetic", settings=settings, dataset=tiny_dataset)
    assert again.events_added == 0
    stored = lake.read_events()
    assert len(stored) == len(tiny_dataset.events) and stored["event_id"].is_unique
    assert set(stored["event_id"]) == set(tiny_dataset.events["event_id"])  # nothing lost
    assert len(lake.read_table("items")) == 120 and len(lake.read_table("users")) == 200


def test_ingest_one_day_twice_and_then_the_rest(settings, tiny_dataset) -> None:
    day = date(2024, 1, 5)
    first = ingest("synthetic", settings=settings, dataset=tiny_dataset, day=day)
    second = ingest("synthetic", settings=settings, dataset=tiny_dataset, day=day)
    expected = int((tiny_dataset.events["timestamp"].dt.date == day).sum())
    assert first.events_added == expected and second.events_added == 0
    lake = Lake(settings.paths.lake_dir)
    assert lake.partitions() == [day] and len(lake.read_events()) == expected
    ingest("synthetic", settings=settings, dataset=tiny_dataset)
    assert len(lake.read_events()) == len(tiny_dataset.events)


def test_partial_overlap_adds_only_new_events(settings, tiny_dataset) -> None:
    ev = tiny_dataset.events
    day = date(2024, 1, 3)
    on_day = ev[ev["timestamp"].dt.date == day]
    half = len(on_day) // 2
    lake = Lake(settings.paths.lake_dir)
    lake.write_events(on_day.iloc[:half])
    writes = lake.write_events(on_day)
    assert writes[0].added == len(on_day) - half and writes[0].total == len(on_day)


def test_duckdb_views(settings, tiny_dataset) -> None:
    ingest("synthetic", settings=settings, dataset=tiny_dataset)
    lake = Lake(settings.paths.lake_dir)
    n = lake.query("SELECT count(*) AS n FROM events WHERE timestamp >= TIMESTAMPTZ '2024-01-08'")["n"].iloc[0]
    assert n == int((tiny_dataset.events["timestamp"] >= pd.Timestamp("2024-01-08", tz="UTC")).sum())
    joined = lake.query("SELECT count(*) AS n FROM events e JOIN items i USING (item_id)")["n"].iloc[0]
    assert joined == len(tiny_dataset.events)


def test_empty_lake_queries(settings) -> None:
    lake = Lake(settings.paths.lake_dir)
    assert lake.partitions() == [] and lake.read_events().empty
    assert lake.query("SELECT count(*) AS n FROM events")["n"].iloc[0] == 0


def test_bad_file_writes_nothing(settings, tmp_path: Path) -> None:
    f = tmp_path / "events.csv"
    f.write_text("user_id,item_id,timestamp\n1,2,2024-01-01T00:00:00Z\n3,4,not-a-time\n")
    with pytest.raises(DataError, match="row 3, column 'timestamp'"):
        ingest(f"csv:{f}", settings=settings)
    assert not settings.paths.lake_dir.exists() or Lake(settings.paths.lake_dir).partitions() == []


def test_timestampless_dataset_refused(settings, tiny_dataset) -> None:
    from core.schemas import Dataset

    ds = Dataset("x", tiny_dataset.events.assign(timestamp=pd.NaT), has_timestamps=False)
    with pytest.raises(DataError, match="no timestamps"):
        ingest("x", settings=settings, dataset=ds)


def test_ingest_real_ml100k_day(settings, shared_data: Path) -> None:
    report = ingest("ml-100k", settings=settings, path=shared_data / "ml-100k", day=date(1997, 9, 22))
    assert report.events_read > 0 and report.events_added == report.events_read
    assert ingest("ml-100k", settings=settings, path=shared_data / "ml-100k", day=date(1997, 9, 22)).events_added == 0
