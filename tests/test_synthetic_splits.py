"""The synthetic generator (deterministic, realistic shape) and the two split protocols."""
from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from core.splits import _recbole_counts, k_core, recbole_split, temporal_split
from core.synthetic import generate


def test_generator_is_deterministic_and_shaped() -> None:
    a = generate(n_users=300, n_items=200, n_events=10_000, n_days=10, seed=1)
    b = generate(n_users=300, n_items=200, n_events=10_000, n_days=10, seed=1)
    pd.testing.assert_frame_equal(a.events, b.events)
    c = generate(n_users=300, n_items=200, n_events=10_000, n_days=10, seed=2)
    assert not a.events["item_id"].equals(c.events["item_id"])
    ev = a.events
    assert 9_900 <= len(ev) <= 10_000 and ev["event_id"].is_unique
    assert set(ev["event_type"]) <= {"view", "click", "like", "rate", "purchase"}
    assert ev["timestamp"].min() >= pd.Timestamp("2024-01-01", tz="UTC")
    assert ev["timestamp"].max() < pd.Timestamp("2024-01-11", tz="UTC")
    # power-law popularity: the top 10% of items take far more than 10% of events
    counts = ev["item_id"].value_counts()
    assert counts.iloc[: len(counts) // 10].sum() / counts.sum() > 0.3
    # heavy-tailed activity and a funnel: views dominate, purchases are rarest
    types = ev["event_type"].value_counts()
    assert types["view"] > types["click"] > types["purchase"]
    assert ev.loc[ev["event_type"] == "rate", "value"].between(1, 5).all()
    assert a.items["categories"].map(len).min() >= 1


def test_taste_shift_changes_item_distribution() -> None:
    ds = generate(n_users=400, n_items=200, n_events=20_000, n_days=20, shift_date=date(2024, 1, 11), seed=3)
    ev = ds.events
    before = ev[ev["timestamp"] < pd.Timestamp("2024-01-11", tz="UTC")]["item_id"].value_counts(normalize=True)
    after = ev[ev["timestamp"] >= pd.Timestamp("2024-01-11", tz="UTC")]["item_id"].value_counts(normalize=True)
    no_shift = generate(n_users=400, n_items=200, n_events=20_000, n_days=20, seed=3).events
    nb = no_shift[no_shift["timestamp"] < pd.Timestamp("2024-01-11", tz="UTC")]["item_id"].value_counts(normalize=True)
    na = no_shift[no_shift["timestamp"] >= pd.Timestamp("2024-01-11", tz="UTC")]["item_id"].value_counts(normalize=True)
    tv_shift = 0.5 * before.sub(after, fill_value=0).abs().sum()
    tv_plain = 0.5 * nb.sub(na, fill_value=0).abs().sum()
    assert tv_shift > 2 * tv_plain


def test_temporal_split(tiny_dataset) -> None:
    sp = temporal_split(tiny_dataset.events, "2024-01-11", valid_cutoff="2024-01-09")
    assert sp.train["timestamp"].max() < pd.Timestamp("2024-01-09", tz="UTC")
    assert sp.valid["timestamp"].between(pd.Timestamp("2024-01-09", tz="UTC"), pd.Timestamp("2024-01-11", tz="UTC"), inclusive="left").all()
    assert sp.test["timestamp"].min() >= pd.Timestamp("2024-01-11", tz="UTC")
    assert set(sp.test["user_id"]) <= set(sp.train["user_id"])


def test_recbole_counts_match_recbole() -> None:
    assert _recbole_counts(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
    assert _recbole_counts(15, (0.8, 0.1, 0.1)) == [13, 1, 1]
    assert _recbole_counts(25, (0.8, 0.1, 0.1)) == [21, 2, 2]
    assert _recbole_counts(5, (0.8, 0.1, 0.1)) == [3, 1, 1]  # shares in (0,1) take one each


def test_recbole_split_filters_and_is_seeded(tiny_dataset) -> None:
    ev = tiny_dataset.events
    rated = ev.assign(value=np.where(ev.index % 5 == 0, 2.0, 4.0))
    a = recbole_split(rated, seed=1, k=5)
    b = recbole_split(rated, seed=1, k=5)
    pd.testing.assert_frame_equal(a.test, b.test)
    allp = pd.concat([a.train, a.valid, a.test])
    assert (allp["value"] >= 3).all()
    assert allp.duplicated(["user_id", "item_id"]).sum() == 0
    assert allp.groupby("user_id").size().min() >= 5 and allp.groupby("item_id").size().min() >= 5
    sizes = allp.groupby("user_id").size()
    train_sizes = a.train.groupby("user_id").size()
    assert (train_sizes / sizes.loc[train_sizes.index]).between(0.5, 0.9).all()
    c = recbole_split(rated, seed=2, k=5)
    assert not a.test.sort_values(["user_id", "item_id"]).reset_index(drop=True).equals(
        c.test.sort_values(["user_id", "item_id"]).reset_index(drop=True))


def test_k_core_is_iterative() -> None:
    df = pd.DataFrame({"user_id": ["a", "a", "b", "b", "c"], "item_id": ["x", "y", "x", "y", "x"]})
    out = k_core(df, 2)
    assert set(out["user_id"]) == {"a", "b"} and len(out) == 4


def test_recbole_split_real_ml1m(shared_data) -> None:
    from core.datasets import load_ml1m

    ds = load_ml1m(shared_data / "ml-1m", ratings="no_timestamps")
    sp = recbole_split(ds.events, seed=2020)
    total = sum(sp.sizes().values())
    # ratings >= 3: 836,478; the 10-core filter removes a little more.
    assert 800_000 < total <= 836_478
    assert abs(sp.sizes()["test"] / total - 0.1) < 0.01
