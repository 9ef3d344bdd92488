"""``recsys models ...`` (registry listing, evaluation sets) and the top-level ``recsys promote`` /
``recsys rollback`` commands: thin wrappers over :mod:`pipelines.promote`.

A refused promotion exits with code 1 and prints every failed check; bad arguments exit 2.
"""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="Model registry: versions, aliases, metrics, frozen evaluation sets.", no_args_is_help=True)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@app.command("list")
def list_command(
    model: Optional[str] = typer.Argument(None, help="Registered model (default: the configured two_tower and ranker)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Versions with aliases, key offline metrics, data window, git commit and creation time."""
    from rich.table import Table

    from core.cli_common import clean_errors, console, print_json, settings

    @clean_errors
    def _run() -> None:
        from pipelines.promote import list_versions

        s = settings()
        rows = list_versions(s, [model] if model else None)
        if as_json:
            print_json(rows)
            return
        if not rows:
            console.print("no registered versions yet (train first: `make demo` or the training_pipeline DAG)")
            return
        metric_names = list(rows[0]["metrics"])
        table = Table(title=f"MLflow registry ({s.mlflow.tracking_uri})")
        for col in ("model", "version", "aliases", *metric_names, "data window", "git commit", "gate", "created at"):
            table.add_column(col, justify="right" if col in metric_names or col == "version" else "left")
        for r in rows:
            aliases = ", ".join(f"[bold green]{a}[/]" if a == s.registry.champion_alias else a for a in r["aliases"])
            table.add_row(r["model"], r["version"], aliases, *(_fmt(r["metrics"][m]) for m in metric_names),
                          r["data_window"], r["git_commit"], r["gate"], r["created_at"])
        console.print(table)

    _run()


@app.command("freeze-eval")
def freeze_eval_command(
    cutoff: Optional[str] = typer.Option(None, help="First day of the test window (YYYY-MM-DD); default: end - eval_test_days + 1."),
    end: Optional[str] = typer.Option(None, help="Last day of the test window (default: the lake's last day)."),
) -> None:
    """Freeze a versioned, hashed evaluation set from the lake (the gate compares models on it)."""
    from datetime import date

    from core.cli_common import clean_errors, console, settings

    @clean_errors
    def _run() -> None:
        from pipelines.promote import freeze_eval_set

        es = freeze_eval_set(settings(), cutoff=date.fromisoformat(cutoff) if cutoff else None,
                             end=date.fromisoformat(end) if end else None)
        console.print(f"evaluation set {es.version}: test {es.cutoff} .. {es.end}, {es.n_users} users, "
                      f"{len(es.test)} test / {len(es.history)} history interactions, sha256 {es.sha256}", highlight=False)

    _run()


def promote_command(
    model: str = typer.Argument(..., help="Registered model name (two_tower or ranker)."),
    version: int = typer.Option(..., "--version", "-v", help="The candidate version."),
    alias: str = typer.Option("champion", "--alias", help="champion (the gate) or challenger (A/B: guardrails only)."),
    force: bool = typer.Option(False, "--force", help="Promote even if checks fail (needs --reason; still recorded)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (required with --force; recorded in the audit trail)."),
    eval_set: Optional[str] = typer.Option(None, "--eval-set", help="Frozen evaluation set version (default: the version's own, else the latest)."),
) -> None:
    """Run the promotion gate: candidate vs champion on the frozen evaluation set; move the alias if it passes."""
    from core.cli_common import clean_errors, console, err_console, settings

    @clean_errors
    def _run() -> None:
        from pipelines.promote import PromotionRefused, promote

        s = settings()
        try:
            d = promote(model, version, settings=s, alias=alias, force=force, reason=reason, eval_set=eval_set)
        except PromotionRefused as exc:
            _print_checks(exc.decision, err_console)
            err_console.print(f"[bold red]REFUSED[/] {model} v{version} as {alias}: "
                              f"{len(exc.decision.failed())} check(s) failed (recorded on the version)", highlight=False)
            raise typer.Exit(code=1) from None
        _print_checks(d, console)
        console.print(f"[bold green]{d.outcome.upper()}[/] {model} v{version} -> {alias}: {d.reason}", highlight=False)

    _run()


def _print_checks(d, out) -> None:
    pm = d.candidate
    out.print(f"eval set {d.eval_set} (sha256 {d.eval_set_sha256[:16]}...), champion: "
              f"{'v' + d.champion_version if d.champion_version else 'none'}", highlight=False)
    for c in d.checks:
        mark = "[green]PASS[/]" if c.passed else "[bold red]FAIL[/]"
        out.print(f"  {mark} {c.name}: {c.detail}", highlight=False)
    keys = [k for k in pm if k.startswith(("ndcg@", "recall@", "coverage@", "miscalibration@")) or k == "latency_ms"]
    out.print("  " + "  ".join(f"{k}={pm[k]:.4g}" + (f" (champion {d.champion[k]:.4g})" if d.champion else "")
                               for k in keys[:8]), highlight=False)


def rollback_command(
    model: str = typer.Argument(..., help="Registered model name."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (recorded on the demoted version)."),
) -> None:
    """Move champion back to previous_champion (the demoted version's description records it)."""
    from core.cli_common import clean_errors, console, settings

    @clean_errors
    def _run() -> None:
        from pipelines.promote import rollback

        r = rollback(model, settings=settings(), reason=reason)
        console.print(f"{model}: champion v{r['demoted']} -> v{r['champion']}"
                      f" (previous_champion: {'v' + r['previous_champion'] if r['previous_champion'] else 'none'})",
                      highlight=False)

    _run()
