"""Training pipeline for the two-tower retrieval model: one call = one MLflow run.

``train_two_tower`` loads and splits a source with the evaluator's own code
(:func:`pipelines.evaluate.prepare`, so training and evaluation see the same split), trains
with early stopping on validation recall, evaluates on test with :mod:`models.metrics` (full
ranking, training and validation items excluded), and logs to MLflow: parameters, per-epoch
metrics, the evaluation table, plots (recall@K curve, validation curve, score histograms), the
git commit and data window as tags, and the model as a pyfunc with a signature, registered
under ``settings.registry.retrieval_model``. A registered version is also written to the local
serving cache (``var/models/<name>/<version>/``) so serving can start without the registry.

Nothing is logged as a model if training fails (non-finite loss, bad data): the run is marked
failed and the error names the cause.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np

from core.config import Settings

if TYPE_CHECKING:  # pragma: no cover
    from core.schemas import Dataset
    from models.base import InteractionData

log = logging.getLogger(__name__)

Protocol = Literal["recbole", "temporal"]
#: K values of the logged recall@K curve.
CURVE_KS = (1, 2, 5, 10, 20, 50, 100)


@dataclass
class TrainResult:
    """What a training run produced (also returned by the CLI as JSON)."""

    model: str
    source: str
    protocol: str
    run_id: str | None
    model_uri: str | None
    registered_name: str | None
    registered_version: str | None
    test_metrics: dict[str, float]
    valid_metrics: dict[str, float]
    best_epoch: int | None
    epochs_run: int
    train_s: float
    samples_per_s: float
    params: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    cache_dir: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def two_tower_params(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """``TwoTowerConfig`` keyword arguments from the (preset-resolved) training settings.

    The evaluator (``pipelines.evaluate``) calls this too, so a benchmark trains the same model
    the pipeline does."""
    t = settings.training.effective()
    tt = t.two_tower.model_dump()
    params: dict[str, Any] = {
        "seed": t.seed, "embedding_dim": t.embedding_dim, "batch_size": t.batch_size, "epochs": t.epochs,
        "eval_k": 10 if 10 in t.eval_ks else min(t.eval_ks), **tt,
        "embedding_lr": tt["embedding_lr"] if tt["embedding_lr"] is not None else t.learning_rate,
    }
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


def data_window(train: "InteractionData") -> str:
    """``first..last`` training timestamp (UTC), or a note that the source has no time."""
    if train.timestamps is None or len(train.timestamps) == 0:
        return "no timestamps (random split)"
    import pandas as pd

    lo, hi = (pd.Timestamp(int(x), unit="s", tz="UTC").isoformat() for x in (train.timestamps.min(), train.timestamps.max()))
    return f"{lo}..{hi}"


def train_two_tower(
    *,
    settings: Settings,
    source: str = "ml-100k",
    protocol: Protocol = "recbole",
    path: Path | None = None,
    dataset: "Dataset | None" = None,
    split_seed: int = 2020,
    seed: int | None = None,
    epochs: int | None = None,
    dim: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    params: Mapping[str, Any] | None = None,
    ks: Sequence[int] | None = None,
    register: bool = True,
    aliases: Sequence[str] = (),
    feature_service_version: str | None = None,
    progress: bool = True,
    run_name: str | None = None,
) -> TrainResult:
    """Train, evaluate, log and (optionally) register a two-tower model; see module docstring.

    ``params`` overrides any ``TwoTowerConfig`` field (``{"temperature": 0.1}``); the named
    arguments override the preset for the common ones. Same settings + seed -> same metrics."""
    import mlflow

    from core.tracking import configure_mlflow, git_commit, metric_key
    from models.artifacts import log_artifact_model, model_cache_root, save_artifact
    from models.metrics import evaluate_recommender
    from models.two_tower import TwoTowerRecommender, _signature
    from pipelines.evaluate import prepare

    prepared = prepare(settings=settings, source=source, protocol=protocol, seed=split_seed, path=path, dataset=dataset)
    train, valid, test = prepared.train, prepared.valid, prepared.test
    cfg = two_tower_params(settings, seed=seed, epochs=epochs, embedding_dim=dim, batch_size=batch_size,
                           embedding_lr=learning_rate)
    cfg.update(params or {})
    ks = sorted({int(k) for k in (ks or settings.training.eval_ks)})
    window = data_window(train)
    name = settings.registry.retrieval_model

    configure_mlflow(settings)
    with mlflow.start_run(run_name=run_name or f"two_tower-{prepared.source}-{protocol}") as run:
        mlflow.set_tags({"task": "train", "model_kind": "two_tower", "source": prepared.source, "protocol": protocol,
                         "git_commit": git_commit(settings.paths.root) or "unknown", "data_window": window,
                         "preset": settings.training.preset})
        mlflow.log_params({**{k: _param(v) for k, v in cfg.items()}, "source": prepared.source, "protocol": protocol,
                           "split_seed": split_seed, **{f"size_{k}": v for k, v in prepared.sizes.items()}})

        def on_epoch(report: Any) -> None:
            mlflow.log_metrics({"train_loss": report.loss, "epoch_seconds": report.seconds,
                                "samples_per_s": report.samples_per_s,
                                **{f"valid_{metric_key(k)}": v for k, v in report.valid.items()}}, step=report.epoch)

        model = TwoTowerRecommender(cfg, items_frame=prepared.dataset.items, users_frame=prepared.dataset.users,
                                    progress=progress, on_epoch=on_epoch)
        t0 = time.perf_counter()
        model.fit(train, valid=valid if len(valid) else None)
        train_s = time.perf_counter() - t0
        test_metrics = evaluate_recommender(model, train=train, test=test, valid=valid if len(valid) else None, ks=ks)
        valid_metrics = evaluate_recommender(model, train=train, test=valid, ks=ks) if len(valid) else {}
        mlflow.log_metrics({**{metric_key(k): v for k, v in test_metrics.items()},
                            **{f"valid_final_{metric_key(k)}": v for k, v in valid_metrics.items()},
                            "train_s": train_s, "best_epoch": float(model.best_epoch or 0)})
        _log_evaluation(model, train=train, valid=valid, test=test, test_metrics=test_metrics,
                        valid_metrics=valid_metrics)

        samples = float(np.mean([h.samples_per_s for h in model.history])) if model.history else 0.0
        metadata = {"source": prepared.source, "protocol": protocol, "data_window": window, "run_id": run.info.run_id,
                    "git_commit": git_commit(settings.paths.root), "best_epoch": model.best_epoch,
                    "test_metrics": test_metrics, "valid_metrics": valid_metrics, "sizes": prepared.sizes}
        artifact = model.to_artifact(feature_service_version=feature_service_version, metadata=metadata)
        info = log_artifact_model(artifact, name="model", registered_model_name=name if register else None,
                                  signature=_signature(), aliases=tuple(aliases) if register else ())
        version = str(info.registered_model_version) if register and info.registered_model_version else None
        cache_dir = None
        if version is not None:  # serving can start from this copy even if the registry is down
            cache_dir = str(save_artifact(model_cache_root(settings) / name / version, artifact=artifact))
    return TrainResult(
        model="two_tower", source=prepared.source, protocol=protocol, run_id=run.info.run_id, model_uri=info.model_uri,
        registered_name=name if register else None, registered_version=version, test_metrics=test_metrics,
        valid_metrics=valid_metrics, best_epoch=model.best_epoch, epochs_run=len(model.history), train_s=train_s,
        samples_per_s=samples, params=cfg, sizes=prepared.sizes, cache_dir=cache_dir)


def _param(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _log_evaluation(model: Any, *, train: "InteractionData", valid: "InteractionData", test: "InteractionData",
                    test_metrics: dict[str, float], valid_metrics: dict[str, float]) -> None:
    """The evaluation table (JSON + markdown) and the plots, as run artifacts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import pandas as pd

    from models.metrics import ranking_metrics

    rows = [{"split": split, "metric": k, "value": v} for split, m in (("test", test_metrics), ("valid", valid_metrics))
            for k, v in m.items()]
    table = pd.DataFrame(rows)
    mlflow.log_table(table, artifact_file="evaluation/metrics.json")
    wide = table.pivot(index="metric", columns="split", values="value")
    mlflow.log_text(wide.to_markdown(floatfmt=".4f") if _has_tabulate() else wide.to_string(), "evaluation/metrics.md")

    exclude = train.csr()
    if len(valid):
        exclude = exclude + valid.csr()
        exclude.data[:] = 1.0
    ks = [k for k in CURVE_KS if k <= train.n_items]
    curve = ranking_metrics(model.score, test=test.csr(), exclude=exclude, ks=ks)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ks, [curve[f"recall@{k}"] for k in ks], marker="o", label="recall@K")
    axes[0].plot(ks, [curve[f"ndcg@{k}"] for k in ks], marker="s", label="ndcg@K")
    axes[0].set_xscale("log")
    axes[0].set(xlabel="K", title="test recall / ndcg @K")
    axes[0].legend()
    hist = [h for h in model.history if h.valid]
    if hist:
        key = next(k for k in hist[0].valid if k.startswith("recall@"))
        axes[1].plot([h.epoch for h in hist], [h.valid[key] for h in hist], marker="o", label=f"valid {key}")
        ax2 = axes[1].twinx()
        ax2.plot([h.epoch for h in model.history], [h.loss for h in model.history], color="grey", ls="--", label="train loss")
        axes[1].set(xlabel="epoch", title="validation curve (dashed: train loss)")
        axes[1].legend(loc="lower right")
    # score distribution of held-out positives vs random catalog items, for a sample of users
    rng = np.random.default_rng(0)
    users = np.unique(test.user_idx)
    users = rng.choice(users, size=min(500, len(users)), replace=False)
    scores = model.score(users)
    truth = test.csr()[users].toarray().astype(bool)
    axes[2].hist(scores[~truth].ravel()[rng.integers(0, (~truth).sum(), size=min(50_000, int((~truth).sum())))],
                 bins=60, alpha=0.6, density=True, label="random items")
    axes[2].hist(scores[truth], bins=60, alpha=0.6, density=True, label="held-out positives")
    axes[2].set(xlabel="score (cosine)", title="score histogram")
    axes[2].legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/evaluation.png")
    plt.close(fig)
    mlflow.log_dict({"recall_curve": {str(k): curve[f"recall@{k}"] for k in ks},
                     "ndcg_curve": {str(k): curve[f"ndcg@{k}"] for k in ks}}, "evaluation/curves.json")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def step_train_two_tower(settings: Settings, state: Any) -> str:
    """Demo step: train the two-tower model on the demo's events in the lake (temporal split,
    laptop preset), log the run to MLflow and register ``two_tower``."""
    t = settings.training
    if "preset" not in t.model_fields_set:
        settings = settings.model_copy(update={"training": t.model_copy(update={"preset": "laptop"})})
    result = train_two_tower(settings=settings, source="lake", protocol="temporal", register=True, progress=False)
    if hasattr(state, "values"):
        state.values["two_tower_run_id"] = result.run_id
        state.values["two_tower_version"] = result.registered_version
    m = result.test_metrics
    return (f"two-tower on the lake (temporal split, {result.sizes.get('train', 0):,} train events): "
            f"recall@10 {m['recall@10']:.4f}, ndcg@10 {m['ndcg@10']:.4f} after {result.epochs_run} epochs "
            f"(best {result.best_epoch}, {result.train_s:.0f}s, {result.samples_per_s:,.0f} samples/s); "
            f"registered {result.registered_name} v{result.registered_version}, MLflow run {result.run_id}")
