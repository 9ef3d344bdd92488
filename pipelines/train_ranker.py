"""Train the DLRM ranker of the two-stage pipeline, evaluate it, log it to MLflow, register it.

Data: the evaluator's :func:`pipelines.evaluate.prepare` (load, split, encode). The candidate
sources (co-visitation, popular, and optionally a registered two-tower model) are fitted on
``train``; the ranker learns from the *validation* interactions (labels) with features from
``train`` only, so nothing it learns from is among its inputs (see
:class:`models.two_stage.TwoStageRecommender`). It early-stops on a user-disjoint slice of those
examples and is Platt-calibrated there. The test split is only ever used to report: ranker AUC /
log-loss / calibration error on test candidates, and the whole pipeline's top-K metrics.

Every run is an MLflow run: params, per-epoch metrics, test metrics, a calibration plot, the
model (a ``dlrm`` artifact, logged with a signature) registered as
``settings.registry.ranking_model``. The artifact carries the whole pipeline but the retrieval
model (co-visitation neighbours, popularity counts, quotas, training-time history; see
:func:`models.two_stage.pipeline_artifact`), so serving and the promotion gate rebuild it with
:func:`models.two_stage.pipeline_from_artifacts` from the two artifacts alone.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from core.config import Settings
from pipelines.train import TrainResult

if TYPE_CHECKING:  # pragma: no cover
    from core.schemas import Dataset


def ranker_params(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """DLRM hyper-parameters: the training preset (dim, batch size, epochs), the layer sizes
    (``training.ranker``), plus overrides."""
    t = settings.training
    params: dict[str, Any] = {"embedding_dim": t.embedding_dim, "batch_size": t.batch_size,
                              "epochs": t.epochs if t.preset == "laptop" else max(t.epochs, 8),
                              "learning_rate": 1e-3, "embedding_lr": t.learning_rate, "patience": 2,
                              "dense_arch": tuple(t.ranker.dense_arch), "over_arch": tuple(t.ranker.over_arch)}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


def _calibration_png(curve, path: Path, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot(curve["mean_pred"], curve["observed"], "o-", label="ranker")
    ax.set_xlabel("predicted engagement probability")
    ax.set_ylabel("observed rate")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train_ranker(
    *,
    settings: Settings,
    source: str = "ml-100k",
    protocol: str = "recbole",
    path: Path | None = None,
    dataset: "Dataset | None" = None,
    split_seed: int = 2020,
    seed: int | None = None,
    epochs: int | None = None,
    dim: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    n_candidates: int = 500,
    negatives_per_user: int = 400,
    positive_min_rating: float | None = None,
    two_tower: str | None = None,
    ks: Sequence[int] | None = None,
    register: bool = True,
    aliases: Sequence[str] = (),
    feature_service_version: str | None = None,
    progress: bool = True,
    run_name: str | None = None,
) -> TrainResult:
    """Train + evaluate + log + register the ranker; returns the run's :class:`TrainResult`.

    ``two_tower``: a registered retrieval model (``models:/two_tower@champion``) or artifact
    folder to add as a candidate source. ``positive_min_rating``: engagement threshold on the
    held-out ratings (``None``: every held-out interaction is a positive, as in the RecBole
    protocol, where ratings < 3 are already filtered out)."""
    import mlflow
    from mlflow.models import infer_signature

    from core.tracking import configure_mlflow, git_commit, metric_key
    from models.artifacts import load_artifact, log_artifact_model, model_cache_root, save_artifact
    from models.dlrm import calibration_table, expected_calibration_error, log_loss, roc_auc
    from models.metrics import evaluate_recommender
    from models.two_stage import EmbeddingSource, TwoStageRecommender, candidate_examples, pipeline_artifact
    from pipelines.evaluate import prepare
    from pipelines.train import data_window

    seed = settings.training.seed if seed is None else seed
    prepared = prepare(settings=settings, source=source, protocol=protocol, seed=split_seed, path=path,  # type: ignore[arg-type]
                       dataset=dataset)
    train, valid, test = prepared.train, prepared.valid, prepared.test
    if len(valid) == 0:
        raise ValueError(f"{source}/{protocol}: the validation split is empty; the ranker learns from it")
    dlrm = ranker_params(settings, epochs=epochs, embedding_dim=dim, batch_size=batch_size, learning_rate=learning_rate)
    ks = sorted({int(k) for k in (ks or settings.training.eval_ks)})
    name = settings.registry.ranking_model

    configure_mlflow(settings)
    with mlflow.start_run(run_name=run_name or f"ranker-{prepared.source}-{protocol}") as run:
        mlflow.set_tags({"task": "train", "model_kind": "dlrm", "source": prepared.source, "protocol": protocol,
                         "git_commit": git_commit(settings.paths.root) or "unknown", "data_window": data_window(train),
                         "preset": settings.training.preset})
        mlflow.log_params({**dlrm, "n_candidates": n_candidates, "negatives_per_user": negatives_per_user,
                           "positive_min_rating": positive_min_rating, "two_tower": two_tower or "none", "seed": seed,
                           "source": prepared.source, "protocol": protocol, "split_seed": split_seed,
                           **{f"size_{k}": v for k, v in prepared.sizes.items()}})

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

        extra = []
        if two_tower:
            # the retrieval model exactly as serving builds it (FAISS index, user tower over history)
            retrieval = load_artifact(two_tower, settings=settings).build()
            extra.append(EmbeddingSource.from_retrieval(retrieval, users=train.users, items=train.items, name="two_tower"))
        model = TwoStageRecommender(n_candidates=n_candidates, extra_sources=extra,
                                    items_frame=prepared.dataset.items if len(prepared.dataset.items) else None,
                                    positive_min_rating=positive_min_rating, negatives_per_user=negatives_per_user,
                                    seed=seed, progress=progress, dlrm_params={**dlrm, "on_epoch": on_epoch})
        t0 = time.perf_counter()
        model.fit(train, valid=valid)
        train_s = time.perf_counter() - t0
        res = model.train_result
        pipe = model.pipeline
        assert pipe is not None

        # ranker metrics on test candidates (retrieved from train history, validation items excluded)
        excl = (train.csr() + valid.csr()).tocsr()
        test_ex, test_cand_recall = candidate_examples(
            sources=pipe.sources, quotas=pipe.quotas, n_candidates=n_candidates, history=excl, labels=test,
            n_items=train.n_items, positive_min_rating=positive_min_rating, negatives_per_user=negatives_per_user,
            seed=seed + 1)
        probs = res.scorer.score(test_ex.user_idx, test_ex.item_idx, test_ex.extra)
        ranker_test = {"test_auc": roc_auc(test_ex.labels, probs), "test_log_loss": log_loss(test_ex.labels, probs),
                       "test_ece": expected_calibration_error(test_ex.labels, probs),
                       "test_candidate_recall": test_cand_recall}
        pipeline_test = evaluate_recommender(model, train=train, test=test, valid=valid, ks=ks)
        sources_test = {s.name: evaluate_recommender(s, train=train, test=test, valid=valid, ks=ks)
                        for s in model.source_recommenders()}
        mlflow.log_metrics({**{k: float(v) for k, v in res.metrics.items()}, **ranker_test,
                            **{f"two_stage_{metric_key(k)}": float(v) for k, v in pipeline_test.items()},
                            **{f"{n}_{metric_key(k)}": float(v) for n, m in sources_test.items() for k, v in m.items()
                               if k.startswith(("recall", "ndcg"))},
                            "candidate_recall_valid": model.report["candidate_recall"], "train_s": train_s,
                            "best_epoch": float(res.best_epoch), "samples_per_s": res.samples_per_s})
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            png = _calibration_png(calibration_table(test_ex.labels, probs), Path(tmp) / "calibration_test.png",
                                   title=f"ranker calibration (test, ECE {ranker_test['test_ece']:.3f})")
            mlflow.log_artifact(str(png), artifact_path="plots")
            mlflow.log_dict(calibration_table(test_ex.labels, probs).to_dict(orient="list"), "plots/calibration_test.json")

        metadata = {"source": prepared.source, "protocol": protocol, "run_id": run.info.run_id,
                    "git_commit": git_commit(settings.paths.root), "best_epoch": res.best_epoch,
                    "valid_metrics": res.metrics, "test_metrics": {**ranker_test, **pipeline_test},
                    "candidate_sources": list(pipe.source_names), "quotas": pipe.quotas, "sizes": prepared.sizes}
        # the whole pipeline but the retrieval model: serving rebuilds it with pipeline_from_artifacts
        artifact = pipeline_artifact(pipe, metadata=metadata, feature_service_version=feature_service_version)
        example = res.scorer.input_example()
        signature = infer_signature(example, res.scorer.predict(example, None))
        info = log_artifact_model(artifact, name="model", registered_model_name=name if register else None,
                                  signature=signature, input_example=example,
                                  aliases=tuple(aliases) if register else ())
        version = str(info.registered_model_version) if register and info.registered_model_version else None
        cache_dir = None
        if version is not None:
            cache_dir = str(save_artifact(model_cache_root(settings) / name / version, artifact=artifact))
    result = TrainResult(
        model="dlrm", source=prepared.source, protocol=protocol, run_id=run.info.run_id, model_uri=info.model_uri,
        registered_name=name if register else None, registered_version=version,
        test_metrics={**ranker_test, **{f"two_stage_{k}": float(v) for k, v in pipeline_test.items()}},
        valid_metrics=dict(res.metrics), best_epoch=res.best_epoch, epochs_run=len(res.history), train_s=train_s,
        samples_per_s=res.samples_per_s, params={**{k: v for k, v in dlrm.items()}, "n_candidates": n_candidates},
        sizes=prepared.sizes, cache_dir=cache_dir)
    result.__dict__["two_stage"] = model  # for the demo's next step (not serialised)
    result.__dict__["sources_test"] = sources_test
    return result


def step_train_ranker(settings: Settings, state: Any) -> str:
    """Demo: train the DLRM ranker on the same lake events and temporal split as the demo's two-tower,
    with that two-tower plugged in as a candidate source (as serving assembles them), log to MLflow,
    register ``ranker``. Same data window as the two-tower, so the promotion gate judges both on
    the same unseen days."""
    values = getattr(state, "values", {})
    two_tower = f"models:/{settings.registry.retrieval_model}/{values['two_tower_version']}" if values.get("two_tower_version") else None
    source = "lake"
    r = train_ranker(settings=settings, source=source, protocol="temporal", two_tower=two_tower, epochs=3, progress=False)
    state.values["two_stage"] = r.__dict__["two_stage"]
    state.values["two_stage_source"] = source
    m = r.test_metrics
    srcs = "  ".join(f"{n} {v['recall@10']:.3f}" for n, v in r.__dict__["sources_test"].items())
    return (f"DLRM ranker on {source}: test AUC {m['test_auc']:.3f}, log-loss {m['test_log_loss']:.3f}, ECE "
            f"{m['test_ece']:.3f}; two-stage recall@10 {m['two_stage_recall@10']:.3f} / ndcg@10 "
            f"{m['two_stage_ndcg@10']:.3f} (sources alone, recall@10: {srcs}); registered "
            f"{r.registered_name} v{r.registered_version}")


def step_two_stage(settings: Settings, state: Any) -> str:
    """Demo: top-5 two-stage recommendations (with their candidate sources) for a few users."""
    model = state.values.get("two_stage")
    if model is None:
        raise RuntimeError("step_two_stage needs step_train_ranker to run first")
    pipe = model.pipeline
    users = list(pipe.ranker.features.users.ids[:3]) + ["a-brand-new-user"]
    t = time.perf_counter()
    frames = pipe.recommend_ids(users, k=5, max_category_share=0.6)
    ms = (time.perf_counter() - t) * 1e3
    lines = [f"two-stage top-5 for {len(users)} users in one batched call ({ms:.1f} ms):"]
    for user, frame in zip(users, frames):
        items = ", ".join(f"{i} ({s:.2f}; {'+'.join(src)})" for i, s, src in
                          zip(frame["item_id"], frame["score"], frame["sources"]))
        lines.append(f"    user {user}: {items}")
    return "\n".join(lines)
