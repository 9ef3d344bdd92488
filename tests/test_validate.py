"""The data-validation gate: each fault class is caught by the right expectation, the batch is
quarantined with its evidence and nothing is lost; clean batches pass; warn-only downgrades.

Lakes are built with the synthetic generator + ingest. Faults that ingest itself refuses (nulls,
a renamed column, an empty file) are written straight to Parquet, as a broken upstream writer
would. One GX context serves the whole module (GX takes seconds to start).
"""
from __future__ import annotations

import json
import shutil
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.lake import Lake
from core.schemas import EVENT_SCHEMA, Dataset, make_event_ids

DAY = date(2024, 1, 14)  # the incoming batch; days 1..13 are accepted history
NOW = datetime(2024, 1, 15, 6, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def base_lake(tmp_path_factory, tiny_dataset) -> tuple[Path, pd.DataFrame]:
    """A lake holding days 1..13 plus the catalog, and day 14's clean events (not yet ingested)."""
    from core.config import load_settings
    from pipelines.ingest import ingest

    root = tmp_path_factory.mktemp("base")
    s = load_settings(root=root, environ={}, overrides={"environment": "test"})
    events = tiny_dataset.events
    history = events[events["timestamp"].dt.date < DAY]
    ingest("synthetic", settings=s, dataset=Dataset("synthetic", history, tiny_dataset.items, tiny_dataset.users))
    incoming = events[events["timestamp"].dt.date == DAY].reset_index(drop=True)
    return s.paths.lake_dir, incoming


@pytest.fixture
def lake_settings(settings, base_lake):
    lake_dir, _ = base_lake
    shutil.copytree(lake_dir, settings.paths.lake_dir)
    return settings


@pytest.fixture
def incoming(base_lake) -> pd.DataFrame:
    return base_lake[1].copy()


def _ingest(settings, events: pd.DataFrame) -> None:
    from pipelines.ingest import ingest

    ingest("synthetic", settings=settings, dataset=Dataset("synthetic", events))


def _write_raw(settings, day: date, table: pa.Table) -> None:
    """Write a partition file directly, bypassing ingest's checks (a broken upstream writer)."""
    path = Lake(settings.paths.lake_dir).partition_dir(day) / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _as_table(events: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(events, schema=EVENT_SCHEMA, preserve_index=False)


def _expect_quarantined(settings, day: date, check: str, rows_before: int, **kwargs):
    """Validate ``day``; assert ``check`` failed and the batch moved to quarantine intact with evidence."""
    from pipelines.validate import ValidationFailed, validate_partition

    lake = Lake(settings.paths.lake_dir)
    with pytest.raises(ValidationFailed) as info:
        validate_partition(day, settings=settings, now=NOW, **kwargs)
    report = info.value.report
    failed = {c.name for c in report.failed}
    assert check in failed, f"{check} not among failed checks {sorted(failed)}"
    assert check in str(info.value)  # the one-screen summary names it
    qdir = lake.quarantine_dir("events", day)
    assert report.quarantine_dir == str(qdir)
    assert day not in lake.partitions() and not lake.partition_dir(day).exists()
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in qdir.glob("*.parquet")) == rows_before
    result = json.loads((qdir / "validation_result.json").read_text())
    assert result["success"] is False
    names = {r["expectation_config"]["meta"]["name"]: r["success"] for r in result["results"]}
    assert names[check] is False
    assert Path(report.docs_path).is_file() and Path(report.docs_path).suffix == ".html"
    assert (qdir / "data_docs" / "index.html").is_file()
    saved = json.loads((qdir / "report.json").read_text())
    assert check in {c["name"] for c in saved["checks"] if not c["success"]}
    assert (qdir / "summary.txt").read_text().startswith("validation FAILED")
    return report


# ---- clean batches ----------------------------------------------------------------------------
def test_clean_batch_passes_and_stays(lake_settings, incoming):
    from pipelines.validate import validate_partition

    _ingest(lake_settings, incoming)
    report = validate_partition(DAY, settings=lake_settings, now=NOW)
    assert report.success and not report.failed and not report.warnings
    assert report.rows == len(incoming)
    names = {c.name for c in report.checks}
    # every class of check ran on this batch (the live day gets freshness; history gives volume)
    for name in ("events.schema", "events.volume", "events.freshness", "events.item_in_catalog", "events.unique_event",
                 "events.timestamp_not_future", "events.timestamp_after_start", "events.bot_share", "events.top_item_share"):
        assert name in names
    assert report.skipped == {}
    assert DAY in Lake(lake_settings.paths.lake_dir).partitions()
    assert not Lake(lake_settings.paths.lake_dir).quarantine_dir("events", DAY).exists()
    assert Path(report.result_path).is_file()


def test_clean_catalog_passes(lake_settings):
    from pipelines.validate import validate_catalog

    reports = validate_catalog(settings=lake_settings, now=NOW)
    assert [r.table for r in reports] == ["items", "users"]
    assert all(r.success for r in reports)


# ---- each fault class -------------------------------------------------------------------------
def test_nulls_are_caught(lake_settings, incoming):
    bad = incoming.copy()
    bad.loc[:4, "user_id"] = None
    _write_raw(lake_settings, DAY, _as_table(bad))
    report = _expect_quarantined(lake_settings, DAY, "events.not_null.user_id", len(bad))
    assert next(c for c in report.failed if c.name == "events.not_null.user_id").unexpected_count == 5


def test_out_of_range_ratings_are_caught(lake_settings, incoming):
    bad = incoming.copy()
    rated = bad.index[bad["event_type"] == "rate"][:3]
    bad.loc[rated, "value"] = 9.0
    _ingest(lake_settings, bad)  # ingest accepts any number: only the gate knows the rating scale
    report = _expect_quarantined(lake_settings, DAY, "events.rating_range", len(bad))
    check = next(c for c in report.failed if c.name == "events.rating_range")
    assert check.unexpected_count == 3 and any("9.0" in e for e in check.examples)


def test_duplicates_are_caught(lake_settings, incoming):
    dup = incoming.iloc[:7].assign(event_id=lambda f: f["event_id"] + "-replayed")
    bad = pd.concat([incoming, dup], ignore_index=True)
    _ingest(lake_settings, bad)  # distinct event ids, so ingest keeps both copies
    _expect_quarantined(lake_settings, DAY, "events.unique_event", len(bad))


def test_unknown_item_ids_are_caught(lake_settings, incoming):
    bad = incoming.copy()
    bad.loc[:5, "item_id"] = "i-not-in-catalog"
    bad["event_id"] = make_event_ids(bad)
    _ingest(lake_settings, bad)
    report = _expect_quarantined(lake_settings, DAY, "events.item_in_catalog", len(bad))
    check = next(c for c in report.failed if c.name == "events.item_in_catalog")
    assert check.unexpected_count == 6
    assert check.examples == ["item_id=i-not-in-catalog (x6)"]


def test_future_timestamps_are_caught(lake_settings, incoming):
    future_day = NOW.date() + timedelta(days=2)
    bad = incoming.copy()
    bad["timestamp"] = bad["timestamp"] + (pd.Timestamp(future_day, tz="UTC") - pd.Timestamp(DAY, tz="UTC"))
    bad["event_id"] = make_event_ids(bad)
    _ingest(lake_settings, bad)  # lands in a partition dated in the future
    _expect_quarantined(lake_settings, future_day, "events.timestamp_not_future", len(bad))


def test_renamed_column_is_caught(lake_settings, incoming):
    table = _as_table(incoming).rename_columns(["event_id", "user_id", "item", "event_type", "value", "timestamp", "context"])
    _write_raw(lake_settings, DAY, table)
    report = _expect_quarantined(lake_settings, DAY, "events.schema", len(incoming))
    schema = next(c for c in report.failed if c.name == "events.schema")
    assert any("item_id" in e for e in schema.examples) and any("'item'" in e for e in schema.examples)


def test_empty_batch_is_caught(lake_settings):
    _write_raw(lake_settings, DAY, EVENT_SCHEMA.empty_table())
    report = _expect_quarantined(lake_settings, DAY, "events.not_empty", 0)
    assert "events.volume" in {c.name for c in report.failed}


def test_volume_spike_is_caught(lake_settings, tiny_dataset):
    events = tiny_dataset.events
    spike = []
    for i in range(1, 11):  # ten earlier days replayed onto DAY: ~10x a normal day
        d = DAY - timedelta(days=i)
        part = events[events["timestamp"].dt.date == d].copy()
        part["timestamp"] = part["timestamp"] + pd.Timedelta(days=i)
        spike.append(part)
    bad = pd.concat(spike, ignore_index=True).drop_duplicates(["user_id", "item_id", "event_type", "timestamp"])
    bad["event_id"] = make_event_ids(bad)
    _ingest(lake_settings, bad)
    report = _expect_quarantined(lake_settings, DAY, "events.volume", len(bad))
    assert {c.name for c in report.failed} == {"events.volume"}
    assert "band x5" in next(c for c in report.failed if c.name == "events.volume").expected


def test_bots_are_caught(settings, base_lake, incoming):
    from core.config import load_settings

    s = load_settings(root=settings.paths.root, environ={},
                      overrides={"environment": "test", "validation": {"max_events_per_user_per_day": 100}})
    shutil.copytree(base_lake[0], s.paths.lake_dir)
    start = pd.Timestamp(DAY, tz="UTC")
    bots = pd.DataFrame({
        "user_id": ["bot-a"] * 150 + ["bot-b"] * 150,
        "item_id": incoming["item_id"].iloc[0],
        "event_type": "view",
        "value": 1.0,
        "timestamp": [start + pd.Timedelta(seconds=10 * i) for i in range(300)],
    })
    bad = pd.concat([incoming, bots], ignore_index=True)
    bad["event_id"] = make_event_ids(bad)
    _ingest(s, bad)
    report = _expect_quarantined(s, DAY, "events.bot_share", len(bad))
    check = next(c for c in report.failed if c.name == "events.bot_share")
    assert set(check.examples) == {"user_id=bot-a (150 events)", "user_id=bot-b (150 events)"}


def test_stale_live_partition_fails_freshness(lake_settings, incoming):
    early = incoming[incoming["timestamp"].dt.hour < 10]
    _ingest(lake_settings, early)
    _expect_quarantined(lake_settings, DAY, "events.freshness", len(early))


def test_broken_catalog_is_quarantined(lake_settings):
    from pipelines.validate import ValidationFailed, validate_catalog, validate_partition

    lake = Lake(lake_settings.paths.lake_dir)
    items = lake.read_table("items")
    bad = pd.concat([items, items.iloc[:2]], ignore_index=True)  # duplicated ids
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False), lake.table_path("items"))
    with pytest.raises(ValidationFailed) as info:
        validate_catalog(settings=lake_settings, now=NOW)
    assert [r.table for r in info.value.reports] == ["items"]
    assert "items.item_id_unique" in {c.name for c in info.value.report.failed}
    qdir = lake.quarantine_dir("items", NOW.date())
    assert pq.ParquetFile(qdir / "items.parquet").metadata.num_rows == len(bad)
    assert not lake.table_path("items").exists()
    assert (qdir / "validation_result.json").is_file()
    # with the catalog in quarantine, events cannot pass referential integrity by default
    with pytest.raises(ValidationFailed) as info:
        validate_partition(date(2024, 1, 13), settings=lake_settings, now=NOW, quarantine=False)
    check = next(c for c in info.value.report.failed if c.name == "events.item_in_catalog")
    assert "catalog is in quarantine" in check.expected


# ---- warn-only and dry runs -------------------------------------------------------------------
def _spike(lake_settings, incoming) -> int:
    big = pd.concat([incoming.assign(timestamp=incoming["timestamp"] + pd.Timedelta(seconds=i)) for i in range(8)],
                    ignore_index=True)
    big["event_id"] = make_event_ids(big)
    _ingest(lake_settings, big)
    return len(Lake(lake_settings.paths.lake_dir).read_events(DAY, DAY))  # ingest merged colliding ids


def test_warn_only_reports_but_does_not_fail(lake_settings, incoming):
    from pipelines.validate import validate_partition

    _spike(lake_settings, incoming)
    report = validate_partition(DAY, settings=lake_settings, now=NOW, warn_only=["events.vol*"])
    assert report.success
    assert [c.name for c in report.warnings] == ["events.volume"]
    assert DAY in Lake(lake_settings.paths.lake_dir).partitions()
    result = json.loads(Path(report.result_path).read_text())
    volume = next(r for r in result["results"] if r["expectation_config"]["meta"]["name"] == "events.volume")
    assert volume["success"] is False and volume["expectation_config"]["severity"] == "warning"


def test_warn_only_from_settings(settings, base_lake, incoming):
    from core.config import load_settings
    from pipelines.validate import validate_partition

    s = load_settings(root=settings.paths.root, environ={},
                      overrides={"environment": "test", "validation": {"warn_only": ["events.volume"]}})
    shutil.copytree(base_lake[0], s.paths.lake_dir)
    _spike(s, incoming)
    assert validate_partition(DAY, settings=s, now=NOW).warnings[0].name == "events.volume"


def test_unknown_warn_only_name_is_rejected(lake_settings, incoming):
    from pipelines.validate import validate_partition

    _ingest(lake_settings, incoming)
    with pytest.raises(ValueError, match="events.volumme.*matches no expectation"):
        validate_partition(DAY, settings=lake_settings, now=NOW, warn_only=["events.volumme"])


def test_dry_run_leaves_the_batch_in_place(lake_settings, incoming):
    from pipelines.validate import ValidationFailed, validate_partition

    n = _spike(lake_settings, incoming)
    with pytest.raises(ValidationFailed) as info:
        validate_partition(DAY, settings=lake_settings, now=NOW, quarantine=False)
    assert info.value.report.quarantine_dir is None
    lake = Lake(lake_settings.paths.lake_dir)
    assert DAY in lake.partitions() and len(lake.read_events(DAY, DAY)) == n


def test_disabled_gate_lets_batches_through(settings, base_lake):
    from core.config import load_settings
    from pipelines.validate import validate_partition

    s = load_settings(root=settings.paths.root, environ={}, overrides={"environment": "test", "validation": {"enabled": False}})
    shutil.copytree(base_lake[0], s.paths.lake_dir)
    _write_raw(s, DAY, EVENT_SCHEMA.empty_table())
    report = validate_partition(DAY, settings=s, now=NOW)
    assert report.success and report.checks == [] and "enabled is false" in report.skipped["*"]
    assert DAY in Lake(s.paths.lake_dir).partitions()


def test_missing_partition_is_a_clear_error(lake_settings):
    from core.schemas import DataError
    from pipelines.validate import validate_partition

    with pytest.raises(DataError, match="no events partition for 2030-01-01"):
        validate_partition(date(2030, 1, 1), settings=lake_settings, now=NOW)


# ---- derived columns, demo, CLI ---------------------------------------------------------------
def test_derived_columns():
    from expectations.derived import IN_CATALOG, ITEM_SHARE, USER_EVENTS, add_event_columns

    events = pd.DataFrame({"user_id": ["a", "a", "b", "a"], "item_id": ["x", "y", None, "x"]})
    out = add_event_columns(events, catalog_item_ids=["x"])
    assert out[IN_CATALOG].tolist() == [True, False, None, True]
    assert out[ITEM_SHARE].tolist() == [0.5, 0.25, 0.25, 0.5]
    assert out[USER_EVENTS].isna().tolist() == [False, True, False, True]  # one value per user...
    assert out[USER_EVENTS].dropna().tolist() == [3.0, 1.0]  # ...on the user's first row
    assert IN_CATALOG not in add_event_columns(events, catalog_item_ids=None).columns
    assert list(add_event_columns(events.rename(columns={"item_id": "item"}), catalog_item_ids=["x"]).columns) == \
        ["user_id", "item", USER_EVENTS]


@pytest.mark.slow
def test_demo_step_quarantines_a_poisoned_copy_only(lake_settings, incoming):
    from pipelines.demo import DemoState
    from pipelines.validate import step_validate

    _ingest(lake_settings, incoming)
    lake = Lake(lake_settings.paths.lake_dir)
    before = lake.partitions()
    state = DemoState(values={"partitions": [d.isoformat() for d in before]})
    quick = lake_settings.model_copy(update={"validation": lake_settings.validation.model_copy(
        update={"demo_recent_partitions": 2})})
    line = step_validate(quick, state)
    assert "validated the 2 newest partitions" in line
    assert "all passed" in line and "quarantined by" in line
    assert lake.partitions() == before and not (lake.root / "quarantine").exists()  # the real lake is untouched
    poisoned = state.values["validation"]["poisoned"]
    assert {c["name"] for c in poisoned["checks"] if not c["success"]} >= {
        "events.item_in_catalog", "events.rating_range", "events.not_null.user_id", "events.unique_event"}
    assert Path(poisoned["docs_path"]).is_file()


@pytest.mark.slow
def test_cli_exits_non_zero_with_the_summary(lake_settings, incoming, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from pipelines.cli_validate import app

    root = typer.Typer()
    root.add_typer(app, name="validate")

    @root.command()
    def noop() -> None:  # a second command so "validate" stays a named group
        pass

    bad = incoming.copy()
    bad.loc[:2, "item_id"] = "ghost"
    bad["event_id"] = make_event_ids(bad)
    _ingest(lake_settings, bad)
    monkeypatch.setenv("RECSYS_PATHS__ROOT", str(lake_settings.paths.root))
    runner = CliRunner()
    ok = runner.invoke(root, ["validate", "--date", "2024-01-13", "--no-catalog", "--now", NOW.isoformat()])
    assert ok.exit_code == 0, ok.output
    assert "PASSED events date=2024-01-13" in ok.output
    res = runner.invoke(root, ["validate", "--date", "2024-01-12", "--date", DAY.isoformat(), "--no-catalog",
                               "--now", NOW.isoformat()])
    assert res.exit_code == 1
    assert "PASSED events date=2024-01-12" in res.output  # the good day is reported beside the bad one
    assert "events.item_in_catalog" in res.output and "item_id=ghost (x3)" in res.output
    assert "quarantined to" in res.output
    listed = runner.invoke(root, ["validate", "--list-checks"])
    assert listed.exit_code == 0 and "events.bot_share" in listed.output
