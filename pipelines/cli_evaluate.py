"""``recsys evaluate``: every named model on one split, one table, one MLflow run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from core.cli_common import check_protocol, clean_errors, console, settings

app = typer.Typer(help="Offline evaluation: baselines, two-tower, two-stage or registered models, full ranking.",
                  invoke_without_command=True, no_args_is_help=False)


def _parse_params(pairs: list[str]) -> dict[str, dict[str, object]]:
    """``ease.lam=500`` -> ``{"ease": {"lam": 500.0}}`` (numbers parsed, the rest kept as text)."""
    import yaml

    out: dict[str, dict[str, object]] = {}
    for pair in pairs:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise ValueError(f"--param takes MODEL.NAME=VALUE (e.g. ease.lam=500), got {pair!r}")
        key, value = pair.split("=", 1)
        model, name = key.split(".", 1)
        out.setdefault(model.strip(), {})[name.strip()] = yaml.safe_load(value)
    return out


@app.callback()
@clean_errors
def evaluate_command(
    ctx: typer.Context,
    source: str = typer.Option("ml-100k", "--source", help="ml-100k | ml-1m | ml-latest-small | lake | csv:PATH | parquet:PATH"),
    protocol: str = typer.Option("recbole", "--protocol", help="recbole (published tables) | temporal (the product's own)"),
    models: str = typer.Option("pop,itemknn,als,ease", "--models",
                               help="Comma-separated: pop, itemknn, als, ease, two_tower, two_stage, models:/NAME@alias, or an artifact folder."),
    seed: int = typer.Option(2020, "--seed", help="Split seed (RecBole protocol)."),
    ks: str = typer.Option("10,20,50", "--ks", help="Cut-offs K."),
    path: Optional[Path] = typer.Option(None, "--path", help="Dataset folder (default: var/data/NAME, then ../shared/data/NAME)."),
    param: list[str] = typer.Option([], "--param", help="Fix a hyper-parameter instead of tuning it: MODEL.NAME=VALUE (repeatable)."),
    no_tune: bool = typer.Option(False, "--no-tune", help="Use default hyper-parameters; skip the validation search."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for ALS (default: all cores)."),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log an MLflow run."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full report as JSON here."),
) -> None:
    """Fit each model on train (tuning on validation), evaluate on test with full ranking, print one table."""
    if ctx.invoked_subcommand is not None:
        return
    from pipelines.evaluate import evaluate, write_json

    check_protocol(protocol)
    try:
        cutoffs = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--ks takes comma-separated integers, got {ks!r}") from None
    names = [m.strip() for m in models.split(",") if m.strip()]
    report = evaluate(settings=settings(), source=source, protocol=protocol, models=names, seed=seed, ks=cutoffs,  # type: ignore[arg-type]
                      path=path, model_params=_parse_params(param), tune=not no_tune, threads=threads,
                      log_mlflow=not no_mlflow, echo=lambda line: console.print(f"  {line}", highlight=False))
    console.print(report.table())
    if report.run_id:
        console.print(f"MLflow run {report.run_id}")
    if json_out is not None:
        write_json(report, json_out)
        console.print(f"report written to {json_out}")
