"""Loaders: real MovieLens files (skipped when ../shared/data is absent) and bad-input messages."""
from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest

from core.datasets import load_interactions, load_ml100k, load_ml1m, load_ml_latest_small
from core.schemas import EVENT_COLUMNS, DataError


def test_ml100k_real(shared_data: Path) -> None:
    ds = load_ml100k(shared_data / "ml-100k")
    assert len(ds.events) == 100_000
    assert ds.events["user_id"].nunique() == 943 and ds.events["item_id"].nunique() == 1682
    assert list(ds.events.columns) == EVENT_COLUMNS
    assert set(ds.events["event_type"]) == {"rate"} and ds.events["value"].between(1, 5).all()
    assert str(ds.events["timestamp"].dtype) == "datetime64[us, UTC]"
    assert len(ds.items) == 1682 and "Animation" in ds.items.set_index("item_id").at["1", "categories"]
    assert len(ds.users) == 943
    assert ds.events["event_id"].is_unique


def test_ml1m_real_with_and_without_timestamps(shared_data: Path) -> None:
    with_ts = load_ml1m(shared_data / "ml-1m", ratings="dat")
    assert len(with_ts.events) == 487_650 and with_ts.has_timestamps
    assert with_ts.events["timestamp"].notna().all()
    full = load_ml1m(shared_data / "ml-1m", ratings="no_timestamps")
    assert len(full.events) == 1_000_209 and not full.has_timestamps
    assert full.events["user_id"].nunique() == 6040 and full.events["item_id"].nunique() == 3706
    assert len(full.items) == 3706 and len(full.users) == 6040
    counts = full.events["value"].value_counts().sort_index().tolist()
    assert counts == [56_174, 107_557, 261_197, 348_971, 226_310]


def test_ml_latest_small_real(shared_data: Path) -> None:
    ds = load_ml_latest_small(shared_data / "ml-latest-small")
    assert len(ds.events) == 100_836
    assert ds.events["user_id"].nunique() == 610
    assert len(ds.items) == 9742


def test_recbole_atomic_layout(tmp_path: Path) -> None:
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t881250949\n2\t10\t3\t881250950\n")
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tToy Story\t1995\tAnimation Comedy\n")
    ds = load_ml100k(tmp_path)
    assert len(ds.events) == 2 and ds.items.loc[0, "categories"] == ["Animation", "Comedy"]


def test_generic_loader_with_mapping(tmp_path: Path) -> None:
    f = tmp_path / "clicks.csv"
    f.write_text("uid,sku,ts,kind\na,x,2024-01-01T10:00:00Z,click\nb,y,2024-01-02T11:00:00Z,purchase\n")
    ds = load_interactions(f, columns={"user_id": "uid", "item_id": "sku", "timestamp": "ts", "event_type": "kind"})
    assert ds.events["event_type"].tolist() == ["click", "purchase"]
    assert ds.events["timestamp"].iloc[0] == pd.Timestamp("2024-01-01T10:00:00Z")
    pq = tmp_path / "x.parquet"
    pd.DataFrame({"u": ["a"], "i": ["x"], "t": [1_700_000_000_000]}).to_parquet(pq)
    ds = load_interactions(pq, columns={"user_id": "u", "item_id": "i", "timestamp": "t"}, timestamp_unit="ms")
    assert ds.events["timestamp"].iloc[0] == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("", r"bad\.csv: file is empty"),
        ("user_id,item_id\n1,2\n", r"bad\.csv, column 'timestamp': missing required column"),
        ("user_id,timestamp\n1,5\n", r"bad\.csv, column 'item_id': missing required column\(s\) \['item_id'\]"),
        ("user_id,item_id,timestamp\n1,2,2024-01-01\n3,4,yesterday-ish\n", r"bad\.csv, row 3, column 'timestamp': unparsable timestamp 'yesterday-ish'"),
        ("user_id,item_id,timestamp,value\n1,2,5,4\n1,3,6,four\n", r"bad\.csv, row 3, column 'value': value 'four' is not a number"),
        ("user_id,item_id,timestamp,event_type\n1,2,5,view\n1,3,6,teleport\n", r"row 3, column 'event_type': unknown event_type 'teleport'"),
        ("user_id,item_id,timestamp\n1,,5\n", r"row 2, column 'item_id': empty id"),
    ],
)
def test_bad_files_name_file_row_and_column(tmp_path: Path, content: str, pattern: str) -> None:
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_interactions(f)


def test_bad_native_movielens_file(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t2\t5\t881250949\n1\t3\tx\t881250950\n")
    with pytest.raises(DataError, match=r"u\.data, row 2, column 'value'"):
        load_ml100k(tmp_path)
    d = tmp_path / "m"
    d.mkdir()
    with gzip.open(d / "ratings.dat.gz", "wt") as fh:
        fh.write("1::2::5::978300760\n1::3::4\n")
    with pytest.raises(DataError, match=r"ratings\.dat\.gz, row 2: expected 4"):
        load_ml1m(d, ratings="dat")


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither u.data"):
        load_ml100k(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_interactions(tmp_path / "nope.csv")
