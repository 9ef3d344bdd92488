"""The popularity fallback: trending items per context, from the lake (and the event log).

Why per context: a cold-start user on the TV app should get what TV users watch now, not the
all-device list. "Trending" = event counts in the last ``popularity_days`` *of the data*
(relative to the newest event, so historical datasets work too), decayed with a half-life
and weighted by event type (a purchase says more than a view). This is also what answers when
the models are missing, a stage fails or the budget runs out, so it needs nothing but the lake.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from core.config import Settings

log = logging.getLogger(__name__)

EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "rate": 3.0, "like": 3.0, "purchase": 5.0}
GLOBAL = ""


def canonical_context(raw: object) -> str | None:
    """A context (JSON text, dict, ``key:value,key2:value2`` or ``key=value``) -> sorted JSON text.

    The lake stores contexts as JSON text (``{"device": "web"}``); canonical text makes the
    same context one key whatever way a client spelled it. Raises ValueError when malformed."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        obj = raw
    else:
        text = str(raw).strip()
        if not text:
            return None
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"context is not valid JSON: {exc.msg} at character {exc.pos}") from None
            if not isinstance(obj, dict):
                raise ValueError("context JSON must be an object such as {\"device\": \"web\"}")
        else:
            obj = {}
            for part in text.split(","):
                sep = ":" if ":" in part else "=" if "=" in part else None
                if sep is None:
                    raise ValueError(f"context part {part!r} is not key:value (e.g. device:web)")
                k, v = part.split(sep, 1)
                if not k.strip():
                    raise ValueError(f"context part {part!r} has an empty key")
                obj[k.strip()] = v.strip()
    for k, v in obj.items():
        if not isinstance(v, (str, int, float, bool)) and v is not None:
            raise ValueError(f"context value for {k!r} must be a string, number or boolean")
    return json.dumps(dict(sorted(obj.items()))) if obj else None


@dataclass
class Popularity:
    """Ranked popular items per canonical context (``""`` = all contexts)."""

    ranked: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    window: tuple[str, str] | None = None

    @property
    def empty(self) -> bool:
        return not self.ranked.get(GLOBAL, ([], None))[0]

    def contexts(self) -> list[str]:
        return [c for c in self.ranked if c]

    def top(self, k: int, *, context: str | None = None, exclude: Iterable[str] = ()) -> tuple[list[str], list[float], bool]:
        """Top-k items for ``context`` (global list when the context is unknown or too thin).

        Returns (items, scores, used_context)."""
        excl = set(exclude)
        used_context = bool(context) and context in self.ranked
        items: list[str] = []
        scores: list[float] = []
        sources = ([self.ranked[context]] if used_context else []) + [self.ranked.get(GLOBAL, ([], np.zeros(0)))]
        for ids, sc in sources:
            for item, s in zip(ids, sc):
                if item in excl:
                    continue
                excl.add(item)
                items.append(item)
                scores.append(float(s))
                if len(items) >= k:
                    return items, scores, used_context
        return items, scores, used_context


def popularity_from_events(events: pd.DataFrame, *, days: int = 7, half_life_days: float = 2.0, top: int = 500,
                           blocked: Iterable[str] = ()) -> Popularity:
    """Trending scores from an events frame (core schema); scores are normalised to [0, 1]."""
    if events.empty:
        return Popularity()
    ts = pd.to_datetime(events["timestamp"], utc=True)
    end = ts.max()
    recent = ts >= end - pd.Timedelta(days=days)
    ev = events.loc[recent, ["item_id", "event_type", "context"]].copy()
    age_days = ((end - ts[recent]).dt.total_seconds() / 86_400.0).to_numpy()
    ev["w"] = np.power(0.5, age_days / half_life_days) * ev["event_type"].map(EVENT_WEIGHTS).fillna(1.0).to_numpy()
    ev = ev[~ev["item_id"].isin(set(blocked))]
    ctx_cache: dict[object, str] = {}

    def canon(c: object) -> str:
        if c not in ctx_cache:
            try:
                ctx_cache[c] = canonical_context(c) or GLOBAL
            except ValueError:
                ctx_cache[c] = GLOBAL
        return ctx_cache[c]

    ev["ctx"] = ev["context"].map(canon)
    ranked: dict[str, tuple[list[str], np.ndarray]] = {}
    scores = ev.groupby("item_id")["w"].sum().sort_values(ascending=False, kind="stable").head(top)
    ranked[GLOBAL] = (scores.index.astype(str).tolist(), (scores / scores.iloc[0]).to_numpy() if len(scores) else np.zeros(0))
    for ctx, grp in ev[ev["ctx"] != GLOBAL].groupby("ctx"):
        s = grp.groupby("item_id")["w"].sum().sort_values(ascending=False, kind="stable").head(top)
        ranked[str(ctx)] = (s.index.astype(str).tolist(), (s / s.iloc[0]).to_numpy())
    return Popularity(ranked, (str((end - pd.Timedelta(days=days)).date()), str(end.date())))


def build_popularity(settings: "Settings", *, extra_events: pd.DataFrame | None = None) -> Popularity:
    """Popularity from the lake's recent events plus ``extra_events`` (e.g. the event log's tail)."""
    from core.lake import Lake

    cfg = settings.serving
    lake = Lake(settings.paths.lake_dir)
    frames = []
    days = lake.partitions()
    if days:
        start = days[-1] - pd.Timedelta(days=cfg.popularity_days).to_pytimedelta()
        frames.append(lake.read_events(start=start))
    if extra_events is not None and len(extra_events):
        frames.append(extra_events)
    if not frames:
        log.warning("no events in the lake: the popularity fallback is empty")
        return Popularity()
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return popularity_from_events(events, days=cfg.popularity_days, half_life_days=cfg.popularity_half_life_days,
                                  top=cfg.popular_items, blocked=cfg.blocked_items)
