"""A realistic synthetic event generator for tests and the offline demo.

Why synthetic data at all: tests must be fast, deterministic and need no licence, and the demo
must run where MovieLens cannot be fetched. Why *realistic*: a generator of uniform noise makes
every model look alike; here users have latent tastes over category-clustered item factors,
item popularity follows a power law, activity is heavy-tailed, events come in sessions with a
view -> click -> like/rate -> purchase funnel driven by affinity, and ``shift_date`` rotates
tastes from a given day on (so drift detection and retraining have something to find).
Deterministic by seed.
"""
from __future__ import annotations

import json
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd

from core.schemas import Dataset, coerce_items, coerce_users, make_event_ids

DEVICES = ("mobile", "web", "tv")
OCCUPATIONS = ("student", "engineer", "artist", "doctor", "writer", "retired", "other")
CATEGORY_NAMES = (
    "action", "comedy", "drama", "documentary", "horror", "romance", "scifi", "thriller",
    "animation", "family", "music", "sports", "news", "travel", "food", "tech",
)


def _softmax_cdf(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    cdf = np.cumsum(p, axis=1)
    return cdf / cdf[:, -1:]


def generate(
    *,
    n_users: int = 2_000,
    n_items: int = 1_000,
    n_events: int = 200_000,
    n_days: int = 30,
    start: date = date(2024, 1, 1),
    n_categories: int = 12,
    dim: int = 16,
    popularity_exponent: float = 1.0,
    taste_sharpness: float = 2.5,
    mean_session_length: float = 8.0,
    shift_date: date | None = None,
    shift_strength: float = 0.8,
    seed: int = 42,
) -> Dataset:
    """Generate events, items and users.

    ``shift_date``: from this day on, each user's taste vector moves ``shift_strength`` of the way
    towards a new random taste (and popularity is reshuffled for a third of the catalog).
    """
    if min(n_users, n_items, n_events, n_days) < 1:
        raise ValueError("n_users, n_items, n_events and n_days must all be >= 1")
    n_categories = max(1, min(n_categories, len(CATEGORY_NAMES), n_items))
    rng = np.random.default_rng(seed)
    t0 = datetime(start.year, start.month, start.day, tzinfo=timezone.utc).timestamp()
    horizon = n_days * 86_400.0

    # Items: factors clustered around category centroids; power-law popularity.
    centroids = rng.normal(size=(n_categories, dim))
    item_cat = rng.integers(0, n_categories, size=n_items)
    second_cat = np.where(rng.random(n_items) < 0.3, rng.integers(0, n_categories, size=n_items), -1)
    item_vec = centroids[item_cat] + 0.6 * rng.normal(size=(n_items, dim))
    ranks = rng.permutation(n_items) + 1
    log_pop = -popularity_exponent * np.log(ranks)
    log_pop_after = log_pop.copy()
    if shift_date is not None:
        moved = rng.choice(n_items, size=n_items // 3, replace=False)
        log_pop_after[moved] = log_pop[rng.permutation(moved)]

    # Users: tastes mix 1-3 favourite categories; heavy-tailed activity.
    n_fav = rng.integers(1, 4, size=n_users)
    user_vec = np.zeros((n_users, dim))
    for k in range(3):
        fav = rng.integers(0, n_categories, size=n_users)
        user_vec += (k < n_fav)[:, None] * centroids[fav]
    user_vec = user_vec / n_fav[:, None] + 0.3 * rng.normal(size=(n_users, dim))
    shifted_vec = (1 - shift_strength) * user_vec + shift_strength * rng.normal(size=(n_users, dim))
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    per_user = np.maximum(1, np.round(activity / activity.sum() * n_events)).astype(np.int64)
    # Adjust so the total is exactly n_events (most active users absorb the difference).
    diff = n_events - int(per_user.sum())
    order = np.argsort(-per_user)
    i = 0
    while diff != 0:
        u = order[i % n_users]
        if diff > 0:
            per_user[u] += 1
            diff -= 1
        elif per_user[u] > 1:
            per_user[u] -= 1
            diff += 1
        i += 1
    user_of_event = np.repeat(np.arange(n_users), per_user)
    user_device = rng.integers(0, len(DEVICES), size=n_users)

    # Sessions: each user's events form sessions starting uniformly over the window,
    # with exponential gaps (mean 90 s) between events within a session.
    ts = np.empty(n_events)
    session_id = np.empty(n_events, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(per_user)])
    n_sessions_total = 0
    for u in range(n_users):
        lo, hi = offsets[u], offsets[u + 1]
        n = hi - lo
        n_sess = max(1, int(np.ceil(n / mean_session_length)))
        starts = np.sort(rng.random(n_sess)) * horizon * 0.999
        which = np.sort(rng.integers(0, n_sess, size=n))
        gaps = rng.exponential(90.0, size=n)
        # cumulative gap within each session (``which`` is sorted, so sessions are contiguous)
        cs = np.cumsum(gaps)
        first = np.searchsorted(which, which, side="left")
        within = cs - cs[first] + gaps[first]
        ts[lo:hi] = np.minimum(starts[which] + within, horizon - 1)
        session_id[lo:hi] = n_sessions_total + which
        n_sessions_total += n_sess
    ts = t0 + ts
    after_shift = np.zeros(n_events, dtype=bool)
    if shift_date is not None:
        t_shift = datetime(shift_date.year, shift_date.month, shift_date.day, tzinfo=timezone.utc).timestamp()
        after_shift = ts >= t_shift

    # Items: sample each event's item from softmax(taste . item / sqrt(dim) * sharpness + log pop).
    scale = taste_sharpness / np.sqrt(dim)
    item_of_event = np.empty(n_events, dtype=np.int64)
    affinity = np.empty(n_events)
    chunk = 256
    for c0 in range(0, n_users, chunk):
        users = np.arange(c0, min(c0 + chunk, n_users))
        for shifted in (False, True):
            vec = shifted_vec[users] if shifted else user_vec[users]
            if shifted and not after_shift.any():
                continue
            scores = vec @ item_vec.T * scale
            cdf = _softmax_cdf(scores + (log_pop_after if shifted else log_pop))
            for j, u in enumerate(users):
                lo, hi = offsets[u], offsets[u + 1]
                m = after_shift[lo:hi] == shifted
                if not m.any():
                    continue
                draws = np.searchsorted(cdf[j], rng.random(int(m.sum())), side="right")
                draws = np.minimum(draws, n_items - 1)
                idx = np.arange(lo, hi)[m]
                item_of_event[idx] = draws
                affinity[idx] = scores[j, draws]

    # Funnel: higher affinity -> deeper engagement. Ratings reflect affinity with noise.
    z = (affinity - affinity.mean()) / (affinity.std() + 1e-9)
    engage = 1 / (1 + np.exp(-(z + rng.normal(scale=0.7, size=n_events))))
    r = rng.random(n_events)
    event_type = np.full(n_events, "view", dtype=object)
    event_type[r < 0.45 * engage] = "click"
    event_type[r < 0.18 * engage] = "rate"
    event_type[r < 0.10 * engage] = "like"
    event_type[r < 0.04 * engage] = "purchase"
    value = np.ones(n_events)
    is_rate = event_type == "rate"
    value[is_rate] = np.clip(np.round(1 + 4 * engage[is_rate] + rng.normal(scale=0.5, size=int(is_rate.sum()))), 1, 5)

    contexts = np.array([json.dumps({"device": d}) for d in DEVICES], dtype=object)
    device = np.where(rng.random(n_events) < 0.85, user_device[user_of_event], rng.integers(0, len(DEVICES), size=n_events))
    events = pd.DataFrame(
        {
            "user_id": np.char.add("u", user_of_event.astype(str)).astype(object),
            "item_id": np.char.add("i", item_of_event.astype(str)).astype(object),
            "event_type": event_type,
            "value": value,
            "timestamp": pd.to_datetime(np.floor(ts).astype(np.int64), unit="s", utc=True).astype("datetime64[us, UTC]"),
            "context": contexts[device],
        }
    )
    events = events.drop_duplicates(["user_id", "item_id", "event_type", "timestamp"]).reset_index(drop=True)
    events["event_id"] = make_event_ids(events)
    events = events.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)
    events = events[["event_id", "user_id", "item_id", "event_type", "value", "timestamp", "context"]]

    created = t0 - rng.random(n_items) * 365 * 86_400
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n_items)],
            "title": [f"{CATEGORY_NAMES[c].title()} item {i}" for i, c in enumerate(item_cat)],
            "categories": [
                [CATEGORY_NAMES[c]] + ([CATEGORY_NAMES[s]] if s >= 0 and s != c else [])
                for c, s in zip(item_cat, second_cat)
            ],
            "created_at": pd.to_datetime(created.astype(np.int64), unit="s", utc=True),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(n_users)],
            "age": rng.integers(16, 75, size=n_users),
            "gender": rng.choice(["F", "M", "X"], size=n_users, p=[0.48, 0.48, 0.04]),
            "occupation": rng.choice(OCCUPATIONS, size=n_users),
            "zip_code": [f"{z:05d}" for z in rng.integers(0, 99_999, size=n_users)],
            "created_at": pd.to_datetime((t0 - rng.random(n_users) * 730 * 86_400).astype(np.int64), unit="s", utc=True),
        }
    )
    return Dataset(
        "synthetic",
        events,
        coerce_items(items, source="synthetic"),
        coerce_users(users, source="synthetic"),
    )
