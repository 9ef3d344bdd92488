"""``recsys demo``: the whole platform end to end on embedded defaults (SQLite, local files).

The demo is a list of steps; each is a plain function of (settings, state) that returns a
one-line summary. Later capabilities add their steps to :data:`STEPS`, so the demo always
shows everything the platform can do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import typer

from core.config import Settings


@dataclass
class DemoState:
    """What earlier steps produced for later ones."""

    source: str = "ml-100k"
    values: dict[str, Any] = field(default_factory=dict)


def step_fetch(settings: Settings, state: DemoState) -> str:
    from pipelines.fetch import FetchError, fetch_dataset

    try:
        dest = fetch_dataset("ml-100k", dest_root=settings.paths.data_dir)
        state.source = "ml-100k"
        return f"ML-100K ready in {dest}"
    except FetchError as exc:
        state.source = "synthetic"
        return f"could not fetch ML-100K ({str(exc)[:120]}); using the synthetic generator instead"


def step_ingest(settings: Settings, state: DemoState) -> str:
    from pipelines.ingest import ingest

    report = ingest(state.source, settings=settings)
    again = ingest(state.source, settings=settings)
    state.values["partitions"] = [p["date"] for p in report.partitions]
    return (f"ingested {report.events_read:,} {state.source} events into {len(report.partitions)} daily partitions "
            f"({report.events_added:,} new); re-ingest added {again.events_added} (idempotent)")


def step_lake_stats(settings: Settings, state: DemoState) -> str:
    from core.lake import Lake

    lake = Lake(settings.paths.lake_dir)
    row = lake.query("SELECT count(*) n, count(DISTINCT user_id) u, count(DISTINCT item_id) i, "
                     "min(timestamp) t0, max(timestamp) t1 FROM events").iloc[0]
    return f"DuckDB over the lake: {row['n']:,} events, {row['u']:,} users, {row['i']:,} items, {row['t0']} .. {row['t1']}"


def step_splits(settings: Settings, state: DemoState) -> str:
    import pandas as pd

    from core.lake import Lake
    from core.splits import recbole_split, temporal_split

    events = Lake(settings.paths.lake_dir).read_events()
    rb = recbole_split(events, seed=settings.data.seed)
    cutoff = events["timestamp"].max().normalize() - pd.Timedelta(days=13)
    tp = temporal_split(events, cutoff)
    return f"RecBole split {rb.sizes()}; temporal split at {cutoff.date()} {tp.sizes()}"


def step_synthetic(settings: Settings, state: DemoState) -> str:
    from datetime import date

    from core.synthetic import generate

    t = time.perf_counter()
    ds = generate(n_users=1_000, n_items=500, n_events=50_000, n_days=14, shift_date=date(2024, 1, 8), seed=settings.data.seed)
    s = ds.summary()
    return (f"synthetic generator: {s['events']:,} events, {s['users']} users, {s['catalog_items']} items over 14 days "
            f"with a taste shift on 2024-01-08, in {time.perf_counter() - t:.1f}s")


Step = Callable[[Settings, DemoState], str]


def _lazy(module: str, func: str) -> Step:
    """A step living in another package, imported only when the demo reaches it."""

    def run(settings: Settings, state: DemoState) -> str:
        import importlib

        return getattr(importlib.import_module(module), func)(settings, state)

    run.__name__ = func
    return run


STEPS: list[tuple[str, Step]] = [
    ("fetch", step_fetch),
    ("ingest", step_ingest),
    ("lake", step_lake_stats),
    ("validate", _lazy("pipelines.validate", "step_validate")),
    ("splits", step_splits),
    ("synthetic", step_synthetic),
    ("features", _lazy("pipelines.features", "step_features")),
    ("baselines", _lazy("pipelines.evaluate", "step_evaluate")),
    ("two-tower", _lazy("pipelines.train", "step_train_two_tower")),
    ("ranker", _lazy("pipelines.train_ranker", "step_train_ranker")),
    ("two-stage", _lazy("pipelines.train_ranker", "step_two_stage")),
    ("promote", _lazy("pipelines.promote", "step_promote")),
    ("serve", _lazy("serving.demo", "step_serve")),
]


def run_demo(settings: Settings, *, echo: Callable[[str], None] = print) -> DemoState:
    """Run every step in order; a failing step stops the demo with its error."""
    state = DemoState()
    for name, step in STEPS:
        t = time.perf_counter()
        summary = step(settings, state)
        echo(f"[{name:>10}] {summary}  ({time.perf_counter() - t:.1f}s)")
    return state


def demo_command() -> None:
    """Run the whole platform end to end on embedded defaults and print what it did."""
    from core.cli_common import clean_errors, console, settings

    @clean_errors
    def _run() -> None:
        run_demo(settings(), echo=lambda line: console.print(line, highlight=False))

    _run()
