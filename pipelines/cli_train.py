"""``recsys train two-tower``: a thin wrapper over :func:`pipelines.train.train_two_tower`.

Heavy imports (torch, torchrec, mlflow) happen inside the command so ``recsys --help`` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Train models (every run is an MLflow run; models are registered).", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Train models (every run is an MLflow run; models are registered)."""


@app.command("two-tower")
def two_tower_command(
    source: str = typer.Option("ml-100k", help="ml-100k, ml-1m, ml-latest-small, synthetic, lake, or a file (csv:PATH ...)."),
    protocol: str = typer.Option("recbole", help="recbole (random 8:1:1, comparable with published tables) or temporal."),
    preset: Optional[str] = typer.Option(None, help="laptop (quick) or full; default from the config."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Maximum epochs (early stopping on validation may end sooner)."),
    dim: Optional[int] = typer.Option(None, min=2, help="Embedding dimension of the id tables."),
    batch_size: Optional[int] = typer.Option(None, min=2),
    lr: Optional[float] = typer.Option(None, help="Embedding learning rate (row-wise Adagrad)."),
    seed: Optional[int] = typer.Option(None, help="Model seed (default from the config)."),
    split_seed: int = typer.Option(2020, help="Seed of the RecBole random split."),
    param: list[str] = typer.Option([], "--param", "-p", help="Any TwoTowerConfig field as key=value (JSON values), repeatable."),
    path: Optional[Path] = typer.Option(None, help="Dataset folder (default: var/data or ../shared/data)."),
    register: bool = typer.Option(True, help="Register the model under registry.retrieval_model."),
    alias: list[str] = typer.Option([], help="Point these registry aliases at the new version (e.g. candidate)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train the two-tower retrieval model, evaluate it (full ranking) and log everything to MLflow."""
    from core.cli_common import check_protocol, clean_errors, console, print_run, settings

    @clean_errors
    def _run() -> None:
        from pipelines.train import train_two_tower

        s = settings()
        if preset is not None:
            if preset not in ("laptop", "full"):
                raise ValueError(f"--preset must be laptop or full, not {preset!r}")
            s = s.model_copy(update={"training": s.training.model_copy(update={"preset": preset})})
        check_protocol(protocol)
        result = train_two_tower(settings=s, source=source, protocol=protocol, path=path, split_seed=split_seed,  # type: ignore[arg-type]
                                 seed=seed, epochs=epochs, dim=dim, batch_size=batch_size, learning_rate=lr,
                                 params=_parse_params(param), register=register, aliases=alias)
        if as_json:  # plain JSON on stdout, for scripts (progress and logs go to stderr)
            typer.echo(json.dumps(result.as_dict(), default=str))
            return
        m = result.test_metrics
        console.print(f"two-tower on {result.source} ({result.protocol}): recall@10 {m['recall@10']:.4f}  "
                      f"ndcg@10 {m['ndcg@10']:.4f}  recall@20 {m.get('recall@20', float('nan')):.4f}  "
                      f"best epoch {result.best_epoch}/{result.epochs_run}  train {result.train_s:.1f}s "
                      f"({result.samples_per_s:,.0f} samples/s)", highlight=False)
        print_run(result)

    _run()


def _parse_params(pairs: list[str]) -> dict[str, object]:
    """``["temperature=0.1", "tower_hidden=[128]"]`` -> dict (values parsed as JSON when they can be)."""
    out: dict[str, object] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--param expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
