"""End-to-end evaluation on tiny synthetic data with a temporary MLflow store, plus bad input."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from models.base import IdMap
from pipelines.evaluate import AlignedRecommender, EvaluationError, evaluate, prepare

FAST = {"itemknn": {"k": 20, "shrink": 0.0}, "als": {"factors": 8, "iterations": 4, "threads": 1, "regularization": 0.5, "alpha": 2.0}}


@pytest.fixture(scope="module")
def ratings(tiny_dataset):
    """The synthetic events as explicit 4-star ratings, so RecBole's rating >= 3 filter keeps them."""
    return replace(tiny_dataset, events=tiny_dataset.events.assign(value=4.0))


@pytest.mark.slow
def test_recbole_protocol_end_to_end_logs_one_mlflow_run(settings, ratings) -> None:
    import mlflow

    report = evaluate(settings=settings, source="synthetic", dataset=ratings, protocol="recbole",
                      models=["pop", "itemknn", "als", "ease"], seed=1, ks=(5, 10), model_params=FAST)
    assert [r.name for r in report.results] == ["pop", "itemknn", "als", "ease"]
    assert report.sizes["train"] > report.sizes["test"] > 0
    for r in report.results:
        assert 0.0 <= r.metrics["recall@10"] <= 1.0 and r.metrics["recall@5"] <= r.metrics["recall@10"]
        assert 0 < r.metrics["coverage@10"] <= 1.0
    pop = report.results[0].metrics["ndcg@10"]
    assert max(r.metrics["ndcg@10"] for r in report.results[1:]) > pop  # personalisation helps on this data
    ease = report.results[3]
    assert ease.tuning and "lam" in ease.params  # lambda chosen on validation
    run = mlflow.get_run(report.run_id)
    assert run.data.metrics["ease/ndcg_at_10"] == pytest.approx(ease.metrics["ndcg@10"])
    assert run.data.params["protocol"] == "recbole" and run.data.tags["task"] == "evaluate"
    client = mlflow.MlflowClient()
    table = client.download_artifacts(report.run_id, "evaluation/table.md")
    text = open(table).read()
    assert "| ease |" in text and "ndcg@10" in text


def test_temporal_protocol_uses_only_the_past(settings, tiny_dataset) -> None:
    prepared = prepare(settings=settings, source="synthetic", dataset=tiny_dataset, protocol="temporal")
    # every test interaction is later than every training one; items are the training catalog
    ts_train = prepared.train.timestamps.max()
    assert prepared.test.timestamps.min() >= ts_train
    assert prepared.sizes["items"] == len(np.unique(prepared.train.item_idx))
    report = evaluate(settings=settings, source="synthetic", dataset=tiny_dataset, protocol="temporal",
                      models=["pop", "ease"], ks=(10,), log_mlflow=False)
    assert report.run_id is None and {r.name for r in report.results} == {"pop", "ease"}


def test_table_and_markdown_render(settings, ratings) -> None:
    from rich.console import Console

    report = evaluate(settings=settings, source="synthetic", dataset=ratings, models=["pop"], ks=(10, 20),
                      log_mlflow=False)
    console = Console(record=True, width=200)
    console.print(report.table())
    assert "pop" in console.export_text()
    md = report.markdown()
    assert md.count("\n| pop |") == 1 and "recall@20" in md
    assert json.loads(json.dumps(report.as_dict(), default=str))["models"]["pop"]["metrics"]["recall@10"] >= 0


def test_bad_requests_raise_clear_errors(settings, ratings, tiny_dataset) -> None:
    with pytest.raises(EvaluationError, match="unknown model 'bpr'"):
        evaluate(settings=settings, source="synthetic", dataset=ratings, models=["bpr"], log_mlflow=False)
    with pytest.raises(EvaluationError, match="unknown protocol"):
        evaluate(settings=settings, source="synthetic", dataset=ratings, protocol="loo", log_mlflow=False)  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match="no models"):
        evaluate(settings=settings, source="synthetic", dataset=ratings, models=[], log_mlflow=False)
    no_time = replace(tiny_dataset, events=tiny_dataset.events.assign(timestamp=pd.NaT))
    with pytest.raises(EvaluationError, match="needs a timestamp"):
        prepare(settings=settings, source="x", dataset=no_time, protocol="temporal")
    # all events in one instant: the temporal test window is empty
    one_day = replace(tiny_dataset, events=tiny_dataset.events.assign(timestamp=tiny_dataset.events["timestamp"].min()))
    with pytest.raises(EvaluationError, match="split is empty|no test interaction"):
        prepare(settings=settings, source="x", dataset=one_day, protocol="temporal")


def test_aligned_model_unknown_user_and_item() -> None:
    class Fixed:
        def score(self, users):
            return np.tile(np.array([1.0, 2.0, 3.0]), (len(users), 1))

    model_users, model_items = IdMap(("a", "b")), IdMap(("x", "y", "z"))
    aligned = AlignedRecommender(Fixed(), model_users=model_users, model_items=model_items,
                                 users=IdMap(("a", "c")), items=IdMap(("new", "y", "z")))
    s = aligned.score(np.array([0]))
    assert s[0, 0] == -np.inf and s[0, 1] == 2.0 and s[0, 2] == 3.0  # unknown item never recommended
    with pytest.raises(EvaluationError, match="unknown user_id 'c'"):
        aligned.score(np.array([0, 1]))
    with pytest.raises(EvaluationError, match="knows none"):
        AlignedRecommender(Fixed(), model_users=model_users, model_items=model_items, users=model_users,
                           items=IdMap(("p", "q")))


def test_cli_runs_on_a_csv(tmp_path, monkeypatch, ratings) -> None:
    import typer
    from typer.testing import CliRunner

    from pipelines.cli_evaluate import app

    path = tmp_path / "ratings.csv"
    ratings.events[["user_id", "item_id", "value", "timestamp"]].to_csv(path, index=False)
    monkeypatch.setenv("RECSYS_PATHS__ROOT", str(tmp_path))
    root = typer.Typer()
    root.callback()(lambda: None)
    root.add_typer(app, name="evaluate")
    out = tmp_path / "report.json"
    res = CliRunner().invoke(root, ["evaluate", "--source", f"csv:{path}", "--models", "pop,ease", "--ks", "10",
                                    "--no-mlflow", "--param", "ease.lam=50", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["models"]["ease"]["params"]["lam"] == 50 and not report["models"]["ease"]["tuning"]
    bad = CliRunner().invoke(root, ["evaluate", "--source", f"csv:{path}", "--models", "nope", "--no-mlflow"])
    assert bad.exit_code == 2 and "unknown model 'nope'" in bad.output
