"""Train/validation/test splits shared by every later step.

- :func:`temporal_split`: the product's own protocol: train strictly before ``cutoff``, test at
  or after it (optionally only users seen in training, since a brand-new user is a cold-start
  problem measured separately).
- :func:`recbole_split`: RecBole's published protocol, so numbers compare with its tables:
  keep ratings >= 3, iterate a 10-core filter on users and items, then per user shuffle (seeded)
  and split 8:1:1 with RecBole's own rounding (``_calcu_split_ids``).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from core.schemas import DataError


@dataclass
class Split:
    """Interactions frames with at least ``user_id`` and ``item_id``; ``valid`` may be empty."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    protocol: str

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def temporal_split(
    events: pd.DataFrame,
    cutoff: datetime | pd.Timestamp | str,
    *,
    valid_cutoff: datetime | pd.Timestamp | str | None = None,
    known_users_only: bool = True,
) -> Split:
    """Train: ``timestamp < valid_cutoff or cutoff``; valid: ``valid_cutoff <= t < cutoff``; test: ``t >= cutoff``."""
    if events["timestamp"].isna().any():
        raise DataError("temporal split needs timestamps on every event", column="timestamp")
    cut = pd.Timestamp(cutoff)
    cut = cut.tz_localize("UTC") if cut.tzinfo is None else cut.tz_convert("UTC")
    vcut = cut
    if valid_cutoff is not None:
        vcut = pd.Timestamp(valid_cutoff)
        vcut = vcut.tz_localize("UTC") if vcut.tzinfo is None else vcut.tz_convert("UTC")
        if vcut > cut:
            raise ValueError("valid_cutoff must not be after cutoff")
    ts = events["timestamp"]
    train = events[ts < vcut]
    valid = events[(ts >= vcut) & (ts < cut)]
    test = events[ts >= cut]
    if known_users_only:
        seen = set(train["user_id"])
        valid = valid[valid["user_id"].isin(seen)]
        test = test[test["user_id"].isin(seen)]
    return Split(train.reset_index(drop=True), valid.reset_index(drop=True), test.reset_index(drop=True), "temporal")


def k_core(interactions: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than ``k`` interactions until none remain."""
    df = interactions
    while True:
        u = df["user_id"].map(df["user_id"].value_counts())
        i = df["item_id"].map(df["item_id"].value_counts())
        keep = (u >= k) & (i >= k)
        if keep.all():
            return df
        df = df[keep]


def _recbole_counts(total: int, ratios: tuple[float, ...]) -> list[int]:
    """RecBole 1.2's ``Dataset._calcu_split_ids``: floor each share, train takes the rest, and
    any split whose exact share is in (0, 1) takes one interaction from train."""
    cnt = [int(r * total) for r in ratios]
    cnt[0] = total - sum(cnt[1:])
    for i in range(1, len(ratios)):
        if cnt[0] <= 1:
            break
        if 0 < ratios[-i] * total < 1:
            cnt[-i] += 1
            cnt[0] -= 1
    return cnt


def recbole_split(
    interactions: pd.DataFrame,
    *,
    seed: int = 2020,
    min_rating: float | None = 3.0,
    k: int = 10,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Split:
    """RecBole's protocol: value >= ``min_rating``, ``k``-core, random per-user 8:1:1 (seeded)."""
    df = interactions
    if min_rating is not None:
        if "value" not in df.columns:
            raise DataError("the RecBole protocol filters on ratings: no 'value' column", column="value")
        df = df[df["value"] >= min_rating]
    df = df.drop_duplicates(["user_id", "item_id"], keep="first")
    if k > 1:
        df = k_core(df, k)
    if df.empty:
        raise DataError(f"no interactions left after the rating >= {min_rating} and {k}-core filters")
    total = sum(ratios)
    ratios = tuple(r / total for r in ratios)  # type: ignore[assignment]
    rng = np.random.default_rng(seed)
    df = df.reset_index(drop=True)
    order = rng.permutation(len(df))
    shuffled = df.iloc[order]
    # stable sort by user keeps the random order inside each user
    shuffled = shuffled.sort_values("user_id", kind="stable")
    users = shuffled["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    part = np.empty(len(users), dtype=np.int8)
    for s, e in zip(starts, ends):
        c = _recbole_counts(int(e - s), ratios)
        part[s : s + c[0]] = 0
        part[s + c[0] : s + c[0] + c[1]] = 1
        part[s + c[0] + c[1] : e] = 2
    parts = [shuffled[part == p].reset_index(drop=True) for p in range(3)]
    return Split(parts[0], parts[1], parts[2], "recbole")
