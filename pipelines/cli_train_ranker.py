"""``recsys train dlrm``: a thin wrapper over :func:`pipelines.train_ranker.train_ranker`.

Heavy imports (torch, torchrec, mlflow) happen inside the command so ``recsys --help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Train the DLRM ranker of the two-stage pipeline.", no_args_is_help=True)


@app.command("dlrm")
def dlrm_command(
    source: str = typer.Option("ml-100k", help="ml-100k, ml-1m, ml-latest-small, synthetic, or a file (csv:PATH ...)."),
    protocol: str = typer.Option("recbole", help="recbole (random 8:1:1) or temporal."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Maximum epochs (early stopping on validation AUC)."),
    dim: Optional[int] = typer.Option(None, min=2, help="Embedding dimension."),
    batch_size: Optional[int] = typer.Option(None, min=2),
    lr: Optional[float] = typer.Option(None, help="Dense (Adam) learning rate."),
    seed: Optional[int] = typer.Option(None, help="Model seed (default from the config)."),
    split_seed: int = typer.Option(2020, help="Seed of the RecBole random split."),
    candidates: int = typer.Option(500, min=1, help="Candidates retrieved per user before ranking."),
    negatives: int = typer.Option(400, min=1, help="Ranker negatives per user, drawn from its retrieved candidates."),
    positive_min_rating: Optional[float] = typer.Option(None, help="Engagement threshold (default: every held-out interaction)."),
    two_tower: Optional[str] = typer.Option(None, help="Add a registered two-tower (models:/two_tower@champion) as a source."),
    path: Optional[Path] = typer.Option(None, help="Dataset folder (default: var/data or ../shared/data)."),
    register: bool = typer.Option(True, help="Register the model under registry.ranking_model."),
    alias: list[str] = typer.Option([], help="Point these registry aliases at the new version."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train the DLRM ranker (labels from the validation split), evaluate the whole two-stage
    pipeline on test, and log everything to MLflow."""
    from core.cli_common import check_protocol, clean_errors, console, print_json, print_run, settings

    @clean_errors
    def _run() -> None:
        from pipelines.train_ranker import train_ranker

        check_protocol(protocol)
        result = train_ranker(settings=settings(), source=source, protocol=protocol, path=path, split_seed=split_seed,
                              seed=seed, epochs=epochs, dim=dim, batch_size=batch_size, learning_rate=lr,
                              n_candidates=candidates, negatives_per_user=negatives, positive_min_rating=positive_min_rating, two_tower=two_tower,
                              register=register, aliases=alias)
        if as_json:
            print_json(result.as_dict())
            return
        m = result.test_metrics
        console.print(f"DLRM ranker on {result.source} ({result.protocol}): test AUC {m['test_auc']:.4f}  "
                      f"log-loss {m['test_log_loss']:.4f}  ECE {m['test_ece']:.4f}  two-stage recall@10 "
                      f"{m['two_stage_recall@10']:.4f}  ndcg@10 {m['two_stage_ndcg@10']:.4f}  best epoch "
                      f"{result.best_epoch}/{result.epochs_run}  train {result.train_s:.1f}s", highlight=False)
        print_run(result)

    _run()
