"""``recsys validate``: run the data-validation gate on lake partitions and the catalog.

The command is this group's callback, so ``recsys validate --date 1997-09-22`` works once the
group is registered as ``validate``. Exit codes: 0 all batches passed (warn-only checks may have
warned), 1 a batch failed and was quarantined (or would be, with ``--dry-run``), 2 bad input.
Great Expectations is imported only when a validation actually runs.
"""
from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Optional

import typer

from core.cli_common import clean_errors, console, err_console, print_json, settings

app = typer.Typer(
    help="Validate lake batches with Great Expectations; failing batches are quarantined.",
    invoke_without_command=True,
)


def _day(text: str) -> date:
    try:
        return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        raise ValueError(f"--date must be YYYY-MM-DD, got {text!r}") from None


def _clock(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--now must be an ISO date/time such as 2024-01-15T12:00, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@app.callback(invoke_without_command=True)
@clean_errors
def validate(
    ctx: typer.Context,
    dates: list[str] = typer.Option([], "--date", help="Partition to validate (YYYY-MM-DD); repeatable."),
    last: Optional[int] = typer.Option(None, "--last", min=1, help="Validate the N newest partitions."),
    all_partitions: bool = typer.Option(False, "--all", help="Validate every partition (a few per second)."),
    catalog: bool = typer.Option(True, "--catalog/--no-catalog", help="Also validate items and users."),
    warn_only: list[str] = typer.Option([], "--warn-only", help="Check name or pattern that only warns (e.g. events.volume); repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report failures but leave failing batches in the lake."),
    now: Optional[str] = typer.Option(None, "--now", help="Clock for the future/freshness checks (ISO; default: now)."),
    list_checks: bool = typer.Option(False, "--list-checks", help="List every check's name and purpose, then exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON."),
) -> None:
    """Validate partitions (default: the newest) and the catalog; quarantine what fails."""
    if ctx.invoked_subcommand is not None:
        return
    if list_checks:
        _print_checks()
        return
    from core.lake import Lake
    from pipelines.validate import ValidationFailed, effective_warn_only, validate_catalog, validate_partitions

    s = settings()
    effective_warn_only(s, warn_only)  # a typo'd name fails before anything runs
    lake = Lake(s.paths.lake_dir)
    available = lake.partitions()
    if all_partitions:
        days = available
    elif dates:
        days = sorted({_day(d) for d in dates})
    elif last:
        days = available[-last:]
    else:
        days = available[-1:]
    clock = _clock(now)
    reports, failed = [], []

    def collect(run) -> None:
        try:
            reports.extend(run())
        except ValidationFailed as exc:  # keep going: report every failing batch at the end
            failed.extend(exc.reports)
            reports.extend(exc.passed + exc.reports)

    if days:
        collect(lambda: validate_partitions(days, settings=s, warn_only=warn_only, now=clock, quarantine=not dry_run))
    if catalog:
        collect(lambda: validate_catalog(settings=s, warn_only=warn_only, now=clock, quarantine=not dry_run))
    if not reports:
        raise ValueError(f"nothing to validate: the lake at {lake.root} has no events partitions, items or users")
    if as_json:
        print_json([r.as_dict() for r in reports])
    else:
        for r in reports:
            if r.success:
                warned = f", {len(r.warnings)} warn-only warning(s)" if r.warnings else ""
                console.print(f"PASSED {r.label}: {r.rows:,} rows, {len(r.checks)} expectations{warned}", highlight=False)
                for c in r.warnings:
                    console.print(c.line(), highlight=False)
    if failed:
        err_console.print(ValidationFailed(failed).args[0] + ("\n(dry run: nothing was moved)" if dry_run else ""),
                          highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


def _print_checks() -> None:
    from rich.table import Table

    from expectations.suites import SUITE_TABLES, check_specs

    table = Table(title="validation checks (use the names with --warn-only or validation.warn_only)")
    table.add_column("name")
    table.add_column("why")
    for t in SUITE_TABLES:
        for spec in check_specs(t):
            table.add_row(spec.name, spec.why)
    console.print(table)
