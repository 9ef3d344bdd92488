"""Feature store: transforms on hand-made frames, point-in-time training sets, materialisation and
online reads on SQLite, real-time updates, and the same on a real Redis (skipped if unreachable).

Feast apply/materialise is slow-ish, so one store is built per module (on the tiny synthetic
dataset plus a hand-made user whose ratings make leakage visible) and shared by the tests."""
from __future__ import annotations

import socket
import uuid
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.schemas import DataError, coerce_events
from feature_defs import schema as S
from feature_defs import transforms as T

UTC = timezone.utc


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def events_frame(rows: list[tuple]) -> pd.DataFrame:
    """(user, item, type, value, time) tuples -> a frame in the lake's event schema."""
    raw = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value", "timestamp"])
    raw["timestamp"] = pd.to_datetime(raw["timestamp"], utc=True)
    return coerce_events(raw, source="test")


#: A catalog in the lake's item schema (built directly: coerce_items would fill b's unknown created_at).
ITEMS = pd.DataFrame({
    "item_id": ["a", "b", "c"],
    "title": ["A", "B", "C"],
    "categories": [["drama"], ["comedy", "drama"], []],
    "created_at": pd.Series([ts("2023-01-01"), pd.NaT, ts("2023-06-01")], dtype="datetime64[us, UTC]"),
})


# ---- transforms (no Feast) ---------------------------------------------------------------------

def by_day(frame: pd.DataFrame, key: str, entity: str) -> pd.DataFrame:
    out = frame[frame[key] == entity].copy()
    out.index = out[S.TS].dt.strftime("%m-%d")
    return out


def test_activity_snapshots_windows_totals_and_decay_days() -> None:
    ev = events_frame([
        ("u", "a", "rate", 4.0, "2024-01-01 10:00"),
        ("u", "b", "rate", 2.0, "2024-01-01 11:00"),
        ("u", "c", "view", 1.0, "2024-01-03 09:00"),
        ("u", "a", "view", 1.0, "2024-03-01 09:00"),  # after end_day: must be ignored
    ])
    out = T.activity_snapshots(ev, key="user_id", prefix="user", end_day=date(2024, 2, 10),
                               items=ITEMS, category_vocab=T.category_vocabulary(ITEMS))
    snap = by_day(out, "user_id", "u")
    # rows on activity days and on the days events leave the 1/7/30-day windows, dated the next midnight
    assert list(snap.index) == ["01-02", "01-03", "01-04", "01-05", "01-09", "01-11", "02-01", "02-03"]
    assert snap[S.TS].max() <= ts("2024-02-11")
    cols = ["user_events_1d", "user_events_7d", "user_events_30d", "user_events_total"]
    assert snap.loc["01-02", cols].tolist() == [2, 2, 2, 2]
    assert snap.loc["01-03", cols].tolist() == [0, 2, 2, 2]
    assert snap.loc["01-04", cols].tolist() == [1, 3, 3, 3]
    assert snap.loc["01-09", cols].tolist() == [0, 1, 3, 3]   # day 1 left the 7-day window
    assert snap.loc["02-01", cols].tolist() == [0, 0, 1, 3]   # day 1 left the 30-day window
    assert snap.loc["02-03", cols].tolist() == [0, 0, 0, 3]
    assert snap.loc["01-04", "user_ratings_total"] == 2
    assert snap.loc["01-04", "user_mean_rating"] == pytest.approx(3.0)
    assert snap.loc["01-02", "user_last_event_ts"] == int(ts("2024-01-01 11:00").timestamp())
    assert snap.loc["02-03", "user_last_event_ts"] == int(ts("2024-01-03 09:00").timestamp())
    # vocabulary [comedy, drama]: a (drama) + b (comedy, drama); c has no category
    assert T.category_vocabulary(ITEMS) == ["comedy", "drama"]
    assert snap.loc["01-02", "user_category_counts"].tolist() == [1.0, 2.0]
    assert snap.loc["02-03", "user_category_counts"].tolist() == [1.0, 2.0]


def test_activity_without_ratings_has_null_mean_and_item_stats_use_item_key() -> None:
    ev = events_frame([("u1", "a", "view", 1.0, "2024-01-01 10:00"), ("u2", "a", "click", 1.0, "2024-01-01 12:00")])
    users = T.activity_snapshots(ev, key="user_id", prefix="user", end_day=date(2024, 1, 1))
    assert users["user_mean_rating"].isna().all() and (users["user_ratings_total"] == 0).all()
    items = T.activity_snapshots(ev, key="item_id", prefix="item", end_day=date(2024, 1, 1))
    assert items[["item_id", "item_events_1d", "item_events_total"]].values.tolist() == [["a", 2, 2]]
    with pytest.raises(ValueError, match="key must be"):
        T.activity_snapshots(ev, key="session", prefix="x", end_day=date(2024, 1, 1))


def test_history_snapshots_newest_first_truncated_with_stable_ties() -> None:
    rows = [("u", f"i{k}", "view", 1.0, f"2024-01-01 10:{k:02d}") for k in range(5)]
    rows += [("u", "late", "view", 1.0, "2024-01-02 08:00")]
    out = T.history_snapshots(events_frame(rows), end_day=date(2024, 1, 2), length=3)
    snap = by_day(out, "user_id", "u")
    assert snap.loc["01-02", "recent_items"] == ["i4", "i3", "i2"]
    assert snap.loc["01-03", "recent_items"] == ["late", "i4", "i3"]
    with pytest.raises(ValueError, match="history length"):
        T.history_snapshots(events_frame(rows), end_day=date(2024, 1, 2), length=0)


def test_catalog_table_keeps_cold_items_and_null_creation_times() -> None:
    cat = T.catalog_table(ITEMS).set_index("item_id")
    assert cat.loc["b", S.TS] == pd.Timestamp(0, tz="UTC")       # unknown creation: valid from 1970
    assert pd.isna(cat.loc["b", "item_created_ts"])
    assert cat.loc["a", "item_created_ts"] == int(ts("2023-01-01").timestamp())
    assert cat.loc["c", "item_categories"] == []


def test_transforms_reject_frames_without_required_columns() -> None:
    ev = events_frame([("u", "a", "view", 1.0, "2024-01-01 10:00")]).drop(columns=["event_type"])
    with pytest.raises(DataError, match="event_type"):
        T.history_snapshots(ev, end_day=date(2024, 1, 1))


def test_event_records_name_the_bad_row_and_column() -> None:
    good = T.event_records([{"user_id": "u", "item_id": "a", "timestamp": "2024-01-01T00:00:10Z"}])
    assert good[0]["ts"] == ts("2024-01-01 00:00:10").timestamp() and good[0]["event_type"] == "view"
    with pytest.raises(DataError, match=r"row 1, column 'event_type'.*unknown event_type 'teleport'"):
        T.event_records([{"user_id": "u", "item_id": "a", "timestamp": 1.0},
                         {"user_id": "u", "item_id": "a", "timestamp": 1.0, "event_type": "teleport"}])
    with pytest.raises(DataError, match=r"row 0, column 'timestamp'"):
        T.event_records([{"user_id": "u", "item_id": "a", "timestamp": None}])
    with pytest.raises(DataError, match=r"column 'timestamp'.*unparsable"):
        T.event_records([{"user_id": "u", "item_id": "a", "timestamp": "yesterday-ish"}])


def test_event_timestamps_read_by_the_standard_library_equal_pandas() -> None:
    """The real-time path parses ISO strings with ``datetime.fromisoformat``: every form must give
    the float pandas gives (nanoseconds and other formats still go through pandas)."""
    values = ["2024-01-05T15:00:00.123456+00:00", "2024-01-05T15:00:00Z", "2024-01-05T16:00:00+02:00",
              "2024-01-05 15:00:00", "2024-01-05", " 2024-01-05T15:00:00.5Z ", "20240105T150000Z",
              "2024-01-05T15:00:00.123456789Z", "1969-12-31T23:59:59.999999Z", "Jan 5 2024 3pm",
              datetime(2024, 1, 5, 15, 0, 0, 999_999), datetime(2024, 1, 5, 15, tzinfo=timezone.utc),
              pd.Timestamp("2024-01-05 15:00:00.000000001", tz="UTC"), np.datetime64("2024-01-05T15:00:00.25")]
    for v in values:
        want = T._seconds(pd.Timestamp(v.strip() if isinstance(v, str) else v))
        got = T.event_records([{"user_id": "u", "item_id": "a", "timestamp": v}])[0]["ts"]
        assert got == want and type(got) is float, (v, got, want)
    assert [r["ts"] for r in T.event_records([{"user_id": "u", "item_id": "a", "timestamp": t}
                                              for t in (1_704_466_800, 1_704_466_800.5)])] == [1_704_466_800.0, 1_704_466_800.5]


def test_derived_features_are_relative_to_each_rows_time() -> None:
    frame = pd.DataFrame({
        "user_last_event_ts": [int(ts("2024-01-01").timestamp()), None],
        "user_category_counts": [np.array([1.0, 3.0]), None],
    })
    T.derive_user_features(frame, pd.Series([ts("2024-01-03"), ts("2024-01-03")]))
    assert frame["user_days_since_last_event"].iloc[0] == pytest.approx(2.0)
    assert np.isnan(frame["user_days_since_last_event"].iloc[1])
    assert frame["user_category_affinity"].iloc[0].tolist() == pytest.approx([0.25, 0.75])
    assert frame["user_category_affinity"].iloc[1] is None
    one = T.derive_user_dict({"user_last_event_ts": int(ts("2024-01-01").timestamp()), "user_category_counts": [0.0, 0.0]},
                             ts("2024-01-02").timestamp())
    assert one["user_days_since_last_event"] == pytest.approx(1.0) and one["user_category_affinity"] is None


def test_realtime_update_matches_the_batch_recompute(tiny_dataset) -> None:
    """Folding day D's events into the day D-1 snapshot gives the batch day-D snapshot for every
    cumulative feature and the history (window counters only decay at materialisation)."""
    ev, items = tiny_dataset.events, tiny_dataset.items
    vocab = T.category_vocabulary(items)
    d1, d2 = date(2024, 1, 9), date(2024, 1, 10)
    act1 = T.activity_snapshots(ev, key="user_id", prefix="user", end_day=d1, items=items, category_vocab=vocab)
    act2 = T.activity_snapshots(ev, key="user_id", prefix="user", end_day=d2, items=items, category_vocab=vocab)
    hist1, hist2 = T.history_snapshots(ev, end_day=d1), T.history_snapshots(ev, end_day=d2)
    cat_index = {i: [vocab.index(c) for c in cats] for i, cats in zip(items["item_id"], items["categories"])}
    day2 = ev[ev["timestamp"].dt.date == d2]
    checked = 0
    for uid, mine in list(day2.groupby("user_id"))[:25]:
        state = T.empty_user_state(len(vocab))
        before = act1[act1["user_id"] == uid].tail(1)
        if len(before):
            state.update({c: before.iloc[0][c] for c in S.USER_ACTIVITY_COLUMNS})
            h = hist1[hist1["user_id"] == uid].tail(1)
            state["recent_items"] = list(h.iloc[0]["recent_items"]) if len(h) else []
            state["user_mean_rating"] = None if pd.isna(state["user_mean_rating"]) else state["user_mean_rating"]
        new = T.update_user_state(state, mine, item_category_index=cat_index, n_categories=len(vocab))
        want = act2[(act2["user_id"] == uid)].tail(1).iloc[0]
        assert new["user_events_total"] == want["user_events_total"]
        assert new["user_ratings_total"] == want["user_ratings_total"]
        if pd.isna(want["user_mean_rating"]):
            assert new["user_mean_rating"] is None
        else:
            assert new["user_mean_rating"] == pytest.approx(want["user_mean_rating"])
        assert new["user_last_event_ts"] == want["user_last_event_ts"]
        assert new["user_category_counts"].tolist() == want["user_category_counts"].tolist()
        assert new["recent_items"] == hist2[hist2["user_id"] == uid].tail(1).iloc[0]["recent_items"]
        checked += 1
    assert checked >= 10


# ---- Feast-backed: one store per module ---------------------------------------------------------

#: A hand-made user whose two ratings (1 on day 3, 5 on day 5) make any leakage visible.
PIT_USER = "pit-user"
PIT_EVENTS = [
    (PIT_USER, "i1", "rate", 1.0, "2024-01-03 10:00"),
    (PIT_USER, "i2", "rate", 5.0, "2024-01-05 15:00"),
]


def _make_settings(root: Path, *, lake_dir: Path | None = None, **features):
    from core.config import load_settings

    overrides: dict = {"environment": "test", "features": features}
    if lake_dir is not None:
        overrides["paths"] = {"lake_dir": str(lake_dir)}
    return load_settings(root=root, environ={}, overrides=overrides)


def _fill_lake(settings, dataset) -> None:
    from core.lake import Lake

    lake = Lake(settings.paths.lake_dir)
    lake.write_events(pd.concat([dataset.events, events_frame(PIT_EVENTS)], ignore_index=True))
    lake.upsert("items", dataset.items)


@pytest.fixture(scope="module")
def store_settings(tmp_path_factory, tiny_dataset):
    """A lake (tiny synthetic + the PIT user) with its features built and applied (SQLite online store)."""
    from pipelines.features import build_features

    settings = _make_settings(tmp_path_factory.mktemp("features"))
    _fill_lake(settings, tiny_dataset)
    report = build_features(settings=settings)
    assert report.end_day == "2024-01-14" and report.rows[S.USER_ACTIVITY] > 0
    return settings


@pytest.fixture(scope="module")
def materialized(store_settings):
    """Materialise to the end of 2024-01-07, read the PIT user, then incrementally to the end."""
    from pipelines.features import OnlineFeatureClient, materialize

    first = materialize(settings=store_settings, end=date(2024, 1, 7))
    mid = OnlineFeatureClient(store_settings, load_items=False).user_features(PIT_USER)
    second = materialize(settings=store_settings, end=date(2024, 1, 14))
    again = materialize(settings=store_settings, end=date(2024, 1, 14))
    return {"first": first, "mid": mid, "second": second, "again": again}


@pytest.mark.slow
def test_training_set_is_point_in_time_correct(store_settings) -> None:
    from pipelines.features import training_set

    labels = pd.DataFrame({
        "user_id": [PIT_USER, PIT_USER, PIT_USER, PIT_USER, "nobody"],
        "item_id": ["i9", "i9", "i9", "i9", "i1"],
        "event_timestamp": [ts("2024-01-03 09:00"),    # before any event: nulls, row kept
                            ts("2024-01-05 15:00"),    # the second rating's own time: must not see it
                            ts("2024-01-05 23:59:59"),  # later the same day: still must not
                            ts("2024-01-06 00:00"),    # first instant the day-5 snapshot is valid
                            ts("2024-01-10 00:00")],
        "label": [0, 1, 2, 3, 4],
    })
    out = training_set(labels, settings=store_settings, service="ranker_v1")
    assert out["label"].tolist() == [0, 1, 2, 3, 4]          # every row, in input order
    assert pd.isna(out.loc[0, "user_events_total"]) and out.loc[0, "recent_items"] is None
    for row in (1, 2):
        assert out.loc[row, "user_events_total"] == 1
        assert out.loc[row, "user_mean_rating"] == pytest.approx(1.0)
        assert list(out.loc[row, "recent_items"]) == ["i1"]
        assert out.loc[row, "user_last_event_ts"] == int(ts("2024-01-03 10:00").timestamp())
    assert out.loc[3, "user_events_total"] == 2 and out.loc[3, "user_mean_rating"] == pytest.approx(3.0)
    assert list(out.loc[3, "recent_items"]) == ["i2", "i1"]
    assert out.loc[1, "user_days_since_last_event"] == pytest.approx((ts("2024-01-05 15:00") - ts("2024-01-03 10:00")).total_seconds() / 86400)
    assert pd.isna(out.loc[4, "user_events_total"])         # unknown user: nulls, not dropped
    assert out.loc[4, "item_categories"] is not None and not pd.isna(out.loc[4, "item_age_days"])
    chunked = training_set(labels, settings=store_settings, service="ranker_v1", chunk_rows=2)
    pd.testing.assert_frame_equal(chunked.drop(columns=["user_category_affinity"]),
                                  out.drop(columns=["user_category_affinity"]), check_dtype=False)
    # item features are point-in-time too: item i2's count on day 5 includes the rating only from day 6
    stats = training_set(pd.DataFrame({"user_id": [PIT_USER] * 2, "item_id": ["i2", "i2"],
                                       "timestamp": [ts("2024-01-05 16:00"), ts("2024-01-06 00:00")]}),
                         settings=store_settings, service="two_tower_v1")
    assert stats.loc[1, "item_events_total"] > stats.loc[0, "item_events_total"]


def test_training_set_rejects_bad_entity_frames(settings) -> None:
    """Checked before anything is read, so no store is needed."""
    from pipelines.features import training_set

    with pytest.raises(DataError, match="event_timestamp"):
        training_set(pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"]}), settings=settings)
    with pytest.raises(DataError, match="item_id"):
        training_set(pd.DataFrame({"user_id": ["u1"], "event_timestamp": [ts("2024-01-02")]}), settings=settings)
    with pytest.raises(ValueError, match="unknown feature service"):
        training_set(pd.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "event_timestamp": [ts("2024-01-02")]}),
                     settings=settings, service="ranker_v9")


def test_build_refuses_an_empty_lake(settings) -> None:
    from pipelines.features import build_features, materialize

    with pytest.raises(DataError, match="no event partitions"):
        build_features(settings=settings)
    with pytest.raises(FileNotFoundError, match="features build"):
        materialize(settings=settings)


@pytest.mark.slow
def test_materialize_is_incremental_and_online_reads_match_offline(store_settings, materialized) -> None:
    from feature_defs.definitions import table_path
    from pipelines.features import OnlineFeatureClient, feature_paths

    first, second, again = materialized["first"], materialized["second"], materialized["again"]
    # the second run loads only snapshots after the first run's end; the third finds nothing new
    assert first.views[S.USER_ACTIVITY]["to"] == second.views[S.USER_ACTIVITY]["from"]
    assert second.views[S.USER_ACTIVITY]["snapshot_rows"] > 0
    assert again.views[S.USER_ACTIVITY]["snapshot_rows"] == 0
    # after the first run the PIT user's online features are the day-5 snapshot
    assert materialized["mid"]["user_events_total"] == 2 and materialized["mid"]["recent_items"] == ["i2", "i1"]

    client = OnlineFeatureClient(store_settings)
    tables = feature_paths(store_settings).tables_dir
    activity = pd.read_parquet(table_path(tables, S.USER_ACTIVITY))
    for uid in ["u1", "u17", "u150", PIT_USER]:
        want = activity[activity["user_id"] == uid].sort_values(S.TS).iloc[-1]
        got = client.user_features(uid, now=ts("2024-01-15"))
        for col in ("user_events_1d", "user_events_7d", "user_events_30d", "user_events_total", "user_last_event_ts"):
            assert got[col] == want[col], (uid, col)
        assert got["user_category_counts"] == pytest.approx(list(want["user_category_counts"]))
    stats = pd.read_parquet(table_path(tables, S.ITEM_STATS))
    ids = ["i1", "i5", "i40", "not-an-item"]
    batch = client.item_features(ids, now=ts("2024-01-15"))
    assert batch.known.tolist() == [True, True, True, False]
    frame = batch.as_frame()
    for iid in ids[:3]:
        want = stats[stats["item_id"] == iid].sort_values(S.TS).iloc[-1]
        assert frame.loc[iid, "item_events_7d"] == want["item_events_7d"]
        assert frame.loc[iid, "item_mean_rating"] == pytest.approx(want["item_mean_rating"], nan_ok=True)
    assert np.isnan(frame.loc["not-an-item"]).all() and batch.category_multi_hot[3].sum() == 0
    via_feast = client.items_via_feast(ids[:3])
    assert via_feast["item_events_7d"] == frame.loc[ids[:3], "item_events_7d"].astype(int).tolist()
    assert client.refresh_items() is False       # nothing newer materialised


@pytest.mark.slow
def test_apply_events_is_visible_immediately(store_settings, materialized) -> None:
    from pipelines.features import OnlineFeatureClient

    client = OnlineFeatureClient(store_settings)
    assert client.cached_user_features("u3") is None     # nothing read yet
    before = client.user_features("u3")                  # now cached in this process
    cached = client.cached_user_features("u3")
    assert cached is not None and cached["recent_items"] == before["recent_items"]
    cached["recent_items"] = []                           # a copy: the cache is not touched
    assert client.cached_user_features("u3")["recent_items"] == before["recent_items"]
    # the request path reads its one feature alone: the same value, and a history-only cache
    # entry never stands in for a full read
    client.invalidate()
    history = client.users_features(["u3"], derived=False, columns=["recent_items"])
    assert history == [{"recent_items": before["recent_items"]}]
    assert client.cached_user_features("u3", columns=["recent_items"]) == history[0]
    assert client.cached_user_features("u3") is None
    assert client.user_features("u3")["user_events_total"] == before["user_events_total"]
    assert client.cached_user_features("u3", columns=["recent_items"]) == history[0]  # a full entry holds it too
    with pytest.raises(ValueError, match="unknown user feature"):
        client.users_features(["u3"], derived=False, columns=["no_such_feature"])
    with pytest.raises(ValueError, match="derived=False"):
        client.users_features(["u3"], columns=["recent_items"])
    late = ts("2024-01-14 12:00")                         # older than the stored end-of-day snapshot
    result = client.apply_events(pd.DataFrame([
        {"user_id": "u3", "item_id": "i7", "event_type": "rate", "value": 5.0, "timestamp": late},
        {"user_id": "brand-new", "item_id": "i8", "event_type": "view", "value": 1.0, "timestamp": late},
    ]))
    assert result == {"users": 2, "events": 2}
    after = client.user_features("u3")
    assert after["user_events_total"] == before["user_events_total"] + 1
    assert after["recent_items"][0] == "i7" and after["recent_items"][1:] == before["recent_items"][:S.HISTORY_LENGTH - 1]
    assert after["user_ratings_total"] == before["user_ratings_total"] + 1
    # a fresh process (empty cache) reads the same from the online store
    other = OnlineFeatureClient(store_settings, load_items=False)
    assert other.user_features("u3")["user_events_total"] == after["user_events_total"]
    new_user = other.user_features("brand-new")
    assert new_user["user_events_total"] == 1 and new_user["recent_items"] == ["i8"]
    assert new_user["user_mean_rating"] is None
    assert sum(new_user["user_category_counts"]) == float(len(client.items.categories[client.items.index["i8"]]))


@pytest.mark.slow  # importing Feast alone takes seconds
@pytest.mark.slow
def test_user_cache_is_bounded_expired_entries_first_then_the_oldest(store_settings, materialized) -> None:
    """``features.online_cache_max_users``: a process serving millions of users keeps at most that
    many cache entries. Past the bound, expired entries are dropped first, then the oldest written,
    down to 90% of it; what stays is still served from the cache."""
    import time as _time

    from feature_defs.schema import USER_HISTORY_COLUMNS
    from pipelines.features import OnlineFeatureClient

    s = store_settings.model_copy(update={"features": store_settings.features.model_copy(
        update={"online_cache_ttl_s": 60.0, "online_cache_max_users": 10})})
    client = OnlineFeatureClient(s, load_items=False)

    def read(prefix: str, n: int) -> list[str]:
        uids = [f"{prefix}{j}" for j in range(n)]
        for uid in uids:  # one read each: the order of the writes is the order of these users
            client.users_features([uid], derived=False, columns=USER_HISTORY_COLUMNS)
        return uids

    cached = lambda uid: client.cached_user_features(uid, columns=USER_HISTORY_COLUMNS) is not None  # noqa: E731
    old = read("old", 5)
    client.cache_ttl_s = 0.05
    brief = read("brief", 5)  # newer than the old ones, but about to expire
    _time.sleep(0.1)
    client.cache_ttl_s = 60.0
    read("new", 1)  # the 11th entry: the expired ones go, nothing else has to
    assert all(cached(u) for u in old + ["new0"]) and not any(cached(u) for u in brief)
    newer = read("more", 8)  # past the bound again, nothing expired: the oldest written go
    assert len(client._cache) <= 10  # noqa: SLF001
    assert not cached("old0") and not cached("old1") and all(cached(u) for u in newer)
    # the oldest entry now is old4; read again (a refresh) it is the newest: the next trim keeps it
    client.users_features(["old4"], derived=False, columns=USER_HISTORY_COLUMNS, refresh=True)
    read("last", 2)
    assert cached("old4") and not cached("new0")


@pytest.mark.slow
def test_entries_written_together_expire_spread_over_the_last_part_of_the_ttl(store_settings, materialized) -> None:
    """``features.online_cache_ttl_jitter``: users read in one batch (a worker's first requests,
    a deploy) do not all expire in the same instant; none outlives the TTL."""
    from feature_defs.schema import USER_HISTORY_COLUMNS
    from pipelines.features import OnlineFeatureClient

    s = store_settings.model_copy(update={"features": store_settings.features.model_copy(
        update={"online_cache_ttl_s": 100.0, "online_cache_ttl_jitter": 0.2})})
    client = OnlineFeatureClient(s, load_items=False)
    users = [f"u{i}" for i in range(1, 41)]
    client.users_features(users, derived=False, columns=USER_HISTORY_COLUMNS)
    left = sorted(client.cache_expires_in(u) for u in users)
    assert 79.0 < left[0] and left[-1] <= 100.0 and left[-1] - left[0] > 5.0


def _apply_one_event(settings, user_id: str, item_id: str) -> None:
    """A separate process (spawned: its own interpreter, cache and mapping of the stamp file)
    applies one event, as another serving worker on the host would."""
    from pipelines.features import OnlineFeatureClient

    OnlineFeatureClient(settings, load_items=False).apply_events(
        [{"user_id": user_id, "item_id": item_id, "event_type": "click", "timestamp": ts("2024-01-14 20:00")}])


def _apply_many(settings, user_id: str, worker: int, n: int, barrier) -> None:
    """A spawned process applies ``n`` one-event batches of ``user_id``, starting with the others."""
    from pipelines.features import OnlineFeatureClient

    client = OnlineFeatureClient(settings, load_items=False)
    barrier.wait(120)
    for k in range(n):
        client.apply_events([{"user_id": user_id, "item_id": f"race-{worker}-{k}", "event_type": "click",
                              "timestamp": 1_705_300_000 + k}])


@pytest.mark.slow
def test_writers_of_one_user_in_four_processes_lose_no_update(store_settings, materialized) -> None:
    """``apply_events`` is a read-modify-write: four processes applying events of the same user at
    once must queue on the user's write lock (``ChangeStamps.writing``), not overwrite each other."""
    import multiprocessing

    from pipelines.features import OnlineFeatureClient

    ctx = multiprocessing.get_context("spawn")
    barrier, n = ctx.Barrier(4), 30
    procs = [ctx.Process(target=_apply_many, args=(store_settings, "race-user", w, n, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 4
    got = OnlineFeatureClient(store_settings, load_items=False).users_features(["race-user"], derived=False)[0]
    assert got["user_events_total"] == 4 * n
    assert len(set(got["recent_items"])) == len(got["recent_items"]) and all(i.startswith("race-") for i in got["recent_items"])


@pytest.mark.slow
def test_a_write_on_this_host_invalidates_every_process_cache_at_once(store_settings, materialized) -> None:
    """With a one-hour TTL, a user's cached features stop being a hit the moment another process
    on the host applies their events (or a materialisation runs); the writer itself caches what it
    wrote, unless another write came between its read and its bump. Without stamps (the setting
    off), the stale entry is served until the TTL: the trade-off the stamps remove."""
    import multiprocessing

    from feature_defs.schema import USER_HISTORY_COLUMNS
    from pipelines.features import CHANGED, HIT, MISS, OnlineFeatureClient, materialize

    def with_features(**kw):
        return store_settings.model_copy(update={"features": store_settings.features.model_copy(update=kw)})

    long_ttl = with_features(online_cache_ttl_s=3600.0)
    reader, writer = OnlineFeatureClient(long_ttl, load_items=False), OnlineFeatureClient(long_ttl, load_items=False)
    unstamped = OnlineFeatureClient(with_features(online_cache_ttl_s=3600.0, online_change_stamps=False), load_items=False)
    history = lambda c, u: c.users_features([u], derived=False, columns=USER_HISTORY_COLUMNS)[0]["recent_items"]  # noqa: E731
    lookup = lambda c, u: c.cache_lookup(u, columns=USER_HISTORY_COLUMNS)  # noqa: E731

    before = history(reader, "u21")
    assert history(unstamped, "u21") == before
    assert lookup(reader, "u21") == ({"recent_items": before}, HIT)
    proc = multiprocessing.get_context("spawn").Process(target=_apply_one_event, args=(long_ttl, "u21", "i99"))
    proc.start()
    proc.join(180)
    assert proc.exitcode == 0
    assert lookup(reader, "u21") == (None, CHANGED)            # the other process's write, seen at once
    assert history(reader, "u21")[:2] == ["i99", before[0]]     # re-read from the store ...
    assert lookup(reader, "u21")[1] == HIT                      # ... and cached again
    assert lookup(unstamped, "u21") == ({"recent_items": before}, HIT)  # stale, for up to the TTL

    # the writer caches what it wrote (no other write came between): no re-read on its side
    writer.apply_events([{"user_id": "u22", "item_id": "i98", "timestamp": ts("2024-01-14 21:00")}])
    assert lookup(writer, "u22")[0]["recent_items"][0] == "i98"
    # ... but not when a write lands between its read and its bump: what it wrote may not be the
    # newest (on Redis, an older event time loses); the next lookup re-reads. Writers of the same
    # user on this host queue on its write lock, so that write is a materialisation's (its bump)
    read_state = writer._read_state  # noqa: SLF001

    def read_then_another_write(users):
        state = read_state(users)
        reader._stamps.bump_all()  # noqa: SLF001 - what materialize does once it has written
        return state

    history(reader, "u23")
    assert lookup(reader, "u23")[1] == HIT
    writer._read_state = read_then_another_write  # noqa: SLF001
    writer.apply_events([{"user_id": "u23", "item_id": "i96", "timestamp": ts("2024-01-14 21:31")}])
    writer._read_state = read_state  # noqa: SLF001
    assert lookup(writer, "u23") == (None, MISS)
    assert lookup(reader, "u23") == (None, CHANGED)             # the bumps came after the reader's read

    # a materialisation (here: nothing newer to load, still a write pass) invalidates every user
    history(reader, "u21")  # (the global bump above already changed it: read again)
    assert lookup(reader, "u21")[1] == HIT
    materialize(settings=long_ttl, end=date(2024, 1, 14))
    assert lookup(reader, "u21") == (None, CHANGED) and lookup(writer, "u22") == (None, CHANGED)


def test_a_recreated_stamp_file_drops_the_cache(store_settings, materialized) -> None:
    """The serving client re-maps a stamp file that was deleted (or recreated) under it, and drops
    its cache: no writer bumps the old file any more, so its stamps would never move again."""
    from feature_defs.schema import USER_HISTORY_COLUMNS
    from pipelines.features import HIT, MISS, OnlineFeatureClient, feature_paths

    client = OnlineFeatureClient(store_settings, load_items=False)
    client.users_features(["u24"], derived=False, columns=USER_HISTORY_COLUMNS)
    assert client.cache_lookup("u24", columns=USER_HISTORY_COLUMNS)[1] == HIT
    assert client.check_change_stamps() is False
    feature_paths(store_settings).change_stamps.unlink()
    assert client.check_change_stamps() is True
    assert client.cache_lookup("u24", columns=USER_HISTORY_COLUMNS) == (None, MISS)
    assert feature_paths(store_settings).change_stamps.is_file()


def test_online_reads_equal_feasts_get_online_features(store_settings, materialized) -> None:
    """User reads go through the provider's ``online_read`` (no per-call request building); they
    must give exactly what ``get_online_features`` gives, for every column, a column subset,
    unknown users and repeated users; a view with a ttl is refused at start."""
    from datetime import timedelta

    from core.schemas import DataError
    from pipelines.features import OnlineFeatureClient

    client = OnlineFeatureClient(store_settings, load_items=False)
    users = ["u1", "u17", PIT_USER, "nobody", "u1"]
    for refs in (client._user_refs, [r for r in client._user_refs if r.endswith(":recent_items")]):  # noqa: SLF001
        resp = client.store.get_online_features(features=list(refs), entity_rows=[{S.USER_KEY: u} for u in users]).to_dict()
        want = [{r.split(":", 1)[1]: resp[r.split(":", 1)[1]][i] for r in refs} for i in range(len(users))]
        assert client._read_users(users, refs) == want  # noqa: SLF001
    assert client._read_users(["nobody"], client._user_refs)[0] == {c: None for c in client.user_columns}  # noqa: SLF001
    fv = client.store.get_feature_view(S.USER_HISTORY)
    fv.ttl = timedelta(days=1)
    client.store.get_feature_view = lambda name: fv if name == S.USER_HISTORY else type(client.store).get_feature_view(client.store, name)
    with pytest.raises(DataError, match="ttl"):
        client._resolve_views()  # noqa: SLF001


def test_feastignore_leaves_only_the_declarations_module() -> None:
    from feast.repo_operations import get_repo_files

    repo = Path(__file__).resolve().parents[1] / "feature_defs"
    assert [p.name for p in get_repo_files(repo)] == ["repo.py"]


def test_redis_connection_string_from_url() -> None:
    from pipelines.features import redis_connection_string

    assert redis_connection_string("redis://127.0.0.1:6379/2") == "127.0.0.1:6379,db=2"
    assert redis_connection_string("rediss://:p%40ss@cache:6380") == "cache:6380,db=0,password=p@ss,ssl=true"
    with pytest.raises(ValueError, match="redis://"):
        redis_connection_string("http://x")


# ---- real Redis -----------------------------------------------------------------------------------

def _redis_up(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_redis_online_store_end_to_end(tmp_path, store_settings) -> None:
    if not _redis_up():
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    import redis

    from pipelines.features import OnlineFeatureClient, build_features, feature_store, materialize

    project = f"t{uuid.uuid4().hex[:12]}"   # Feast suffixes every Redis key with the project
    settings = _make_settings(tmp_path, lake_dir=store_settings.paths.lake_dir,  # same lake, own registry
                              online_store="redis", project=project, redis_url="redis://127.0.0.1:6379/0")
    conn = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        build_features(settings=settings)
        materialize(settings=settings, end=date(2024, 1, 14))
        assert any(True for _ in conn.scan_iter(match=b"*" + project.encode(), count=1000))
        redis_client = OnlineFeatureClient(settings)
        sqlite_client = OnlineFeatureClient(store_settings, load_items=False)
        for uid in ("u1", "u42", PIT_USER):
            r, s = redis_client.user_features(uid), sqlite_client.user_features(uid)
            assert r["user_events_7d"] == s["user_events_7d"] and r["user_last_event_ts"] == s["user_last_event_ts"]
        assert redis_client.user_features(PIT_USER)["recent_items"] == ["i2", "i1"]
        # a late event (older than the stored snapshot time) is still written: Redis keeps the
        # newest event time, so apply_events dates the write just after the stored one
        redis_client.apply_events(pd.DataFrame([{"user_id": PIT_USER, "item_id": "i3", "event_type": "rate",
                                                 "value": 3.0, "timestamp": ts("2024-01-05 16:00")}]))
        fresh = OnlineFeatureClient(settings, load_items=False).user_features(PIT_USER)
        assert fresh["recent_items"] == ["i3", "i2", "i1"] and fresh["user_mean_rating"] == pytest.approx(3.0)
        assert redis_client.item_features(["i1", "i2"]).known.all()
    finally:
        feature_store(settings).teardown()
        leftovers = list(conn.scan_iter(match=b"*" + project.encode(), count=1000))
        for key in leftovers:
            conn.delete(key)
        conn.close()
    assert not leftovers, f"teardown left {len(leftovers)} Redis keys of project {project}"


@pytest.mark.slow
@pytest.mark.parametrize("ahead", [0.75, 0.0])
def test_serving_features_refresh_ahead_of_expiry(store_settings, materialized, ahead) -> None:
    """The serving path renews an active user's cache entry in the background when a request finds
    it close to expiring (``features.online_cache_refresh_ahead``): the request is answered from
    the cache at once, the entry's expiry moves forward, at most one refresh per user is in flight;
    0 turns it off."""
    import asyncio

    from serving.online import OnlineFeatures

    s = store_settings.model_copy(update={"features": store_settings.features.model_copy(
        update={"online_cache_ttl_s": 2.0, "online_cache_ttl_jitter": 0.0, "online_cache_refresh_ahead": ahead})})
    feats = OnlineFeatures(s)
    feats.start()

    async def scenario() -> None:
        first = await feats.user_history("u3", timeout_s=5)  # a miss: read from the store
        await asyncio.sleep(0.7)  # 1.3 s left: inside the 1.5 s refresh window (when on)
        left = feats.client.cache_expires_in("u3")
        assert left is not None and left < 1.5
        assert await feats.user_history("u3", timeout_s=5) == first  # answered from the cache
        assert await feats.user_history("u3", timeout_s=5) == first
        if ahead == 0:
            assert feats.refreshes == 0
            return
        assert feats.refreshes == 1  # one refresh in flight for the user, not one per request
        for _ in range(100):  # the background read lands within a few ms; bounded wait
            renewed = feats.client.cache_expires_in("u3")
            if renewed is not None and renewed > left + 0.3:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the refresh-ahead read never renewed the entry")
        assert feats.status()["refresh_ahead_reads"] == 1

    try:
        asyncio.run(scenario())
    finally:
        feats.close()


def test_the_online_update_reads_the_ingest_handlers_records_as_the_core_schema_does() -> None:
    """The serving worker hands ``POST /v1/events``'s records (plain dicts: ISO timestamps with an
    offset, a value, a context, ids) straight to ``apply_events``, without building a core-schema
    frame: ``event_records`` must read them exactly as ``coerce_events`` (through ``events_frame``,
    what batch ingest of the same log does) would."""
    from serving.eventlog import events_frame

    records = [
        {"user_id": "u1", "item_id": "i9", "event_type": "purchase", "value": 1.0, "timestamp": "2024-01-05T15:00:00.123456+00:00",
         "context": '{"device":"tv"}', "event_id": "e1", "request_id": "r1"},
        {"user_id": "u 2", "item_id": "i10", "event_type": "rate", "value": 4.5, "timestamp": "2024-01-05T16:00:00+02:00",
         "context": None, "event_id": "e2"},
    ]
    frame = events_frame(records, source="POST /v1/events")
    got = T.event_records(records, source="POST /v1/events")
    want = [{"event_id": r.event_id, "user_id": r.user_id, "item_id": r.item_id, "event_type": r.event_type,
             "value": r.value, "ts": r.timestamp.timestamp()} for r in frame.itertuples()]
    assert got == want
    assert got[1]["ts"] == datetime(2024, 1, 5, 14, tzinfo=timezone.utc).timestamp()
