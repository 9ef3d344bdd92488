"""Training pipeline: one MLflow run with params, per-epoch metrics, evaluation table, plots,
tags and a registered model that serving can load (also offline); reproducible; bad input
fails the run without registering anything; the CLI wrapper."""
from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("torchrec")

TINY = {"embedding_dim": 16, "feature_dim": 4, "output_dim": 16, "batch_size": 128, "random_negatives": 32,
        "history_len": 10, "max_history": 20, "patience": 1}


def _train(settings, dataset, **kw):
    from pipelines.train import train_two_tower

    args = {"settings": settings, "source": "synthetic", "protocol": "temporal", "dataset": dataset, "epochs": 2,
            "params": TINY, "progress": False, "ks": [5, 10]}
    args.update(kw)
    return train_two_tower(**args)


@pytest.mark.slow
def test_train_logs_registers_and_reproduces(settings, tiny_dataset):
    import mlflow

    from models.artifacts import load_from_registry
    from models.two_tower import TwoTowerRecommender

    res = _train(settings, tiny_dataset, aliases=["candidate"])
    assert res.registered_name == "two_tower" and res.registered_version == "1"
    assert 0 < res.epochs_run <= 2 and res.best_epoch is not None
    assert set(res.test_metrics) >= {"recall@10", "ndcg@10", "coverage@10"}

    client = mlflow.MlflowClient()
    run = client.get_run(res.run_id)
    assert run.data.tags["git_commit"] and run.data.tags["data_window"].startswith("2024-01-")
    assert run.data.params["temperature"] and run.data.params["protocol"] == "temporal"
    assert "recall_at_10" in run.data.metrics and "valid_recall_at_10" in run.data.metrics
    assert len(client.get_metric_history(res.run_id, "train_loss")) == res.epochs_run
    files = {f.path for f in client.list_artifacts(res.run_id, "evaluation")} | \
            {f.path for f in client.list_artifacts(res.run_id, "plots")}
    assert {"evaluation/metrics.json", "evaluation/metrics.md", "evaluation/curves.json", "plots/evaluation.png"} <= files
    mv = client.get_model_version_by_alias("two_tower", "candidate")
    assert str(mv.version) == "1"
    model_info = mlflow.models.get_model_info("models:/two_tower/1")
    assert [c["name"] for c in model_info.signature.inputs.to_dict()] == ["user_id", "history"]

    # the pyfunc flavour serves top-k, optionally from a real-time history
    pyf = mlflow.pyfunc.load_model("models:/two_tower/1")
    items = list(tiny_dataset.events["item_id"].unique()[:2])
    user = tiny_dataset.events["user_id"].iloc[0]
    recs = pyf.predict(pd.DataFrame({"user_id": [user, "brand-new"], "history": [[], items]}), params={"k": 3})
    assert recs.groupby("user_id")["rank"].apply(list).to_dict() == {user: [1, 2, 3], "brand-new": [1, 2, 3]}
    assert not set(recs[recs["user_id"] == "brand-new"]["item_id"]) & set(items)

    # serving's path: registry -> artifact -> same scores as the metrics were computed with
    art = load_from_registry("models:/two_tower@candidate", settings)
    assert art.metadata["test_metrics"]["recall@10"] == pytest.approx(res.test_metrics["recall@10"])
    from pipelines.evaluate import prepare

    prepared = prepare(settings=settings, source="synthetic", protocol="temporal", dataset=tiny_dataset, seed=2020)
    from models.metrics import evaluate_recommender

    again = evaluate_recommender(TwoTowerRecommender.from_artifact(art), train=prepared.train, test=prepared.test,
                                 valid=prepared.valid, ks=[5, 10])
    assert again["recall@10"] == pytest.approx(res.test_metrics["recall@10"], abs=1e-9)
    # the local copy written at training time serves with the registry gone
    assert (settings.paths.var_dir / "models" / "two_tower" / "1" / "manifest.json").is_file()
    offline = load_from_registry("models:/two_tower/1", settings, offline=True)
    assert offline.origin["cached"]
    # same seed, same data -> same metrics
    res2 = _train(settings, tiny_dataset, register=False)
    assert res2.registered_version is None
    assert res2.test_metrics == res.test_metrics


@pytest.mark.slow
def test_bad_training_data_fails_the_run_and_registers_nothing(settings, tiny_dataset):
    import mlflow

    from core.schemas import DataError
    from core.tracking import configure_mlflow

    ev = tiny_dataset.events
    one_user = ev[ev["user_id"] == ev["user_id"].iloc[0]]
    ds = type(tiny_dataset)("one-user", one_user, tiny_dataset.items, tiny_dataset.users)
    with pytest.raises(DataError, match="1 user"):
        _train(settings, ds)
    exp = configure_mlflow(settings)
    runs = mlflow.search_runs([exp], output_format="list")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    assert mlflow.MlflowClient().search_registered_models() == []
    with pytest.raises(ValueError, match="temperatur"):  # a misspelt hyper-parameter is an error
        _train(settings, tiny_dataset, params={**TINY, "temperatur": 0.1})


def test_presets_feed_the_model_config(settings):
    from pipelines.train import two_tower_params

    laptop = two_tower_params(settings)
    full = two_tower_params(settings.model_copy(update={"training": settings.training.model_copy(update={"preset": "full"})}))
    assert laptop["epochs"] < full["epochs"] and laptop["embedding_dim"] < full["embedding_dim"]
    assert two_tower_params(settings, epochs=2, embedding_dim=None)["epochs"] == 2
    from models.two_tower import TwoTowerConfig

    TwoTowerConfig(n_users=2, n_items=2, **laptop)  # every preset key is a config field


def test_cli_two_tower(tmp_path, tiny_dataset):
    from typer.testing import CliRunner

    from pipelines.cli_train import app

    runner = CliRunner()
    env = {"RECSYS_PATHS__ROOT": str(tmp_path)}
    bad = runner.invoke(app, ["two-tower", "--source", "synthetic", "--param", "oops"], env=env)
    assert bad.exit_code == 2 and "key=value" in bad.output
    bad = runner.invoke(app, ["two-tower", "--protocol", "weird"], env=env)
    assert bad.exit_code == 2 and "recbole or temporal" in bad.output


@pytest.mark.slow
def test_cli_two_tower_trains(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli_train import app

    env = {"RECSYS_PATHS__ROOT": str(tmp_path), "RECSYS_DATA__SYNTHETIC_USERS": "150", "RECSYS_DATA__SYNTHETIC_ITEMS": "80",
           "RECSYS_DATA__SYNTHETIC_EVENTS": "4000", "RECSYS_DATA__SYNTHETIC_DAYS": "10"}
    args = ["two-tower", "--source", "synthetic", "--protocol", "temporal", "--epochs", "1", "--no-register", "--json"]
    for k, v in TINY.items():
        args += ["--param", f"{k}={json.dumps(v)}"]
    out = CliRunner().invoke(app, args, env=env)
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["registered_version"] is None and result["epochs_run"] == 1
    assert pd.notna(result["test_metrics"]["recall@10"])


@pytest.mark.slow
def test_demo_step_trains_on_the_lake_and_registers(tmp_path, tiny_dataset):
    from core.config import load_settings
    from pipelines.demo import DemoState
    from pipelines.ingest import ingest
    from pipelines.train import step_train_two_tower

    settings = load_settings(root=tmp_path, environ={}, overrides={
        "environment": "test", "training": {"epochs": 1, "embedding_dim": 16, "two_tower": {"output_dim": 16}}})
    ingest("synthetic", settings=settings, dataset=tiny_dataset)
    state = DemoState(source="synthetic")
    line = step_train_two_tower(settings, state)
    assert "registered two_tower v1" in line and "recall@10" in line
    assert state.values["two_tower_version"] == "1"
