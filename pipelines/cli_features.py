"""``recsys features``: build the feature tables (and apply the Feast definitions), materialise the online store."""
from __future__ import annotations

from datetime import date, datetime
from typing import Optional

import typer

from core.cli_common import clean_errors, console, print_json, settings

app = typer.Typer(help="Feature store (Feast): build feature tables, materialise the online store.", no_args_is_help=True)


def _day(value: Optional[str], option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{option} takes a day as YYYY-MM-DD, got {value!r}") from None


@app.command("build")
@clean_errors
def build(
    end: Optional[str] = typer.Option(None, "--end", help="Last day of events to use (YYYY-MM-DD); default the lake's last partition."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Compute daily feature snapshots from the lake and `feast apply` the definitions."""
    from pipelines.features import build_features

    report = build_features(settings=settings(), end=_day(end, "--end"))
    if as_json:
        print_json(report.as_dict())
        return
    rows = ", ".join(f"{k} {v:,}" for k, v in report.rows.items())
    console.print(f"features through {report.end_day} from {report.events:,} events: {rows} "
                  f"({len(report.category_vocab)} categories) in {report.seconds:.1f}s; Feast config {report.repo_yaml}",
                  highlight=False)


@app.command("materialize")
@clean_errors
def materialize_command(
    end: Optional[str] = typer.Option(None, "--end", help="Materialise snapshots up to the end of this day (YYYY-MM-DD) "
                                                         "or this ISO time; default now."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Load new snapshots into the online store (incremental: each view from its last materialisation)."""
    from pipelines.features import materialize

    the_end: date | datetime | None = None
    if end is not None:
        the_end = _day(end, "--end") if len(end) == 10 else datetime.fromisoformat(end)
    report = materialize(settings=settings(), end=the_end)
    if as_json:
        print_json(report.as_dict())
        return
    for view, info in report.views.items():
        note = f" ({info['skipped']})" if "skipped" in info else ""
        console.print(f"{view}: {info['entities_written']:,} entities from {info['snapshot_rows']:,} snapshot rows, "
                      f"{info['from']} .. {info['to']}{note}", highlight=False)
    console.print(f"online store: {report.online_store}; {report.seconds:.1f}s", highlight=False)
