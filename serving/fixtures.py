"""Small real serving setups for tests, the demo and the benchmark: synthetic data in the lake,
a two-tower model trained by ``models.two_tower`` and registered in MLflow under the serving
alias, and the online feature store built and materialised by ``pipelines.features``.

Nothing here is a fake model: every artifact comes out of the real training functions, just
on tiny data with few epochs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from core.config import Settings
    from core.schemas import Dataset


def synthetic_lake(settings: "Settings", *, n_users: int = 150, n_items: int = 80, n_events: int = 4_000,
                   n_days: int = 10, seed: int = 3) -> "Dataset":
    """Generate a seeded dataset and ingest it into the lake (events, items, users)."""
    from core.synthetic import generate
    from pipelines.ingest import ingest

    ds = generate(n_users=n_users, n_items=n_items, n_events=n_events, n_days=n_days, seed=seed)
    ingest("synthetic", settings=settings, dataset=ds)
    return ds


def train_two_tower(dataset: "Dataset", *, epochs: int = 2, seed: int = 0, dim: int = 16) -> Any:
    """A two-tower model fitted on ``dataset`` (``models.two_tower.TwoTowerRecommender``)."""
    from models.base import InteractionData
    from models.two_tower import TwoTowerRecommender

    data = InteractionData.from_frame(dataset.events)
    model = TwoTowerRecommender({"epochs": epochs, "embedding_dim": dim, "feature_dim": 8, "tower_hidden": [32],
                                 "output_dim": dim, "batch_size": 256, "random_negatives": 64, "seed": seed,
                                 "patience": 0, "backend": "ebc"},
                                items_frame=dataset.items, users_frame=dataset.users, progress=False)
    return model.fit(data)


def register_two_tower(settings: "Settings", model: Any, *, aliases: tuple[str, ...] = ("champion",)) -> str:
    """Log the model's artifact to MLflow, register it under ``registry.retrieval_model`` and point
    ``aliases`` at the new version. Returns the version."""
    import mlflow

    from core.tracking import configure_mlflow
    from models.artifacts import log_artifact_model

    configure_mlflow(settings)
    with mlflow.start_run(run_name="serving-fixture"):
        info = log_artifact_model(model.to_artifact(), name="model", registered_model_name=settings.registry.retrieval_model,
                                  aliases=list(aliases))
    return str(info.registered_model_version)


def online_features(settings: "Settings") -> None:
    """Build the feature tables from the lake and materialise them to the online store."""
    from pipelines.features import build_features, materialize

    build_features(settings=settings)
    materialize(settings=settings)


def train_register_ranker(settings: "Settings", dataset: "Dataset", *, epochs: int = 1, dim: int = 8,
                          n_candidates: int = 50, aliases: tuple[str, ...] = ("champion",)) -> str:
    """Train the DLRM ranker of the two-stage pipeline on ``dataset`` with the registered
    ``two_tower@champion`` as its retrieval source (``pipelines.train_ranker``, temporal split),
    register it as ``registry.ranking_model`` under ``aliases``. Returns the version."""
    from pipelines.train_ranker import train_ranker

    retrieval_uri = f"models:/{settings.registry.retrieval_model}@{settings.serving.retrieval_alias}"
    result = train_ranker(settings=settings, source="synthetic", dataset=dataset, protocol="temporal",
                          two_tower=retrieval_uri, epochs=epochs, dim=dim, n_candidates=n_candidates,
                          negatives_per_user=10, aliases=aliases, progress=False, run_name="serving-fixture-ranker")
    if result.registered_version is None:
        raise RuntimeError("the ranker was trained but not registered")
    return str(result.registered_version)


def benchmark_world(settings: "Settings") -> dict[str, Any]:
    """The serving benchmarks' setup (``benchmarks/serving.py``, ``benchmarks/serving_breakdown.py``):
    2,000 users x 3,700 items (ML-1M's catalog size), 30K synthetic events over 14 days, a 64-d
    two-tower and a DLRM ranker (16-d embeddings, 500 candidates) registered @champion, online
    features materialised. Returns the dataset and both versions."""
    ds = synthetic_lake(settings, n_users=2_000, n_items=3_700, n_events=30_000, n_days=14, seed=11)
    version = register_two_tower(settings, train_two_tower(ds, epochs=1, dim=64))
    ranker = train_register_ranker(settings, ds, epochs=1, dim=16, n_candidates=settings.serving.candidates)
    online_features(settings)
    return {"dataset": ds, "two_tower": version, "ranker": ranker}
