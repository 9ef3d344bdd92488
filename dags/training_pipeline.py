"""``training_pipeline``: ingest -> validate -> features -> (eval set) -> train two-tower -> train
ranker -> evaluate -> register -> promote-if-the-gate-passes, daily.

This file only wires tasks: each task body is one call into ``pipelines.flow`` (imported inside
the task, so parsing this file imports nothing heavy). The first task pins the run's *plan*
(logical day from ``data_interval_start``, windows, source); every later task works from it, so
retries, re-runs and backfills of a date compute the same partitions and reuse the same models.

Triggers: the daily schedule (one data interval per day), the ``recsys://training/requested``
asset (the monitoring DAG's drift check emits it), a ``TriggerDagRunOperator`` or the UI/CLI
with conf ``{"day": "YYYY-MM-DD", "retrain": false, "source": "..."}``. ``retrain: false``
stops after the features (a data backfill must not register one model per historical day).
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetOrTimeSchedule, CronDataIntervalTimetable, Param, dag, task

#: Emitted by whoever wants a retrain now (drift detection): ``outlets=[TRAINING_REQUESTED]``.
TRAINING_REQUESTED = Asset(name="training_requested", uri="recsys://training/requested")
#: Emitted when a run promoted a new champion (serving's alias poll picks it up anyway).
MODELS_PROMOTED = Asset(name="models_promoted", uri="recsys://models/promoted")

DEFAULT_ARGS = {
    "owner": "recsys-ml",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=20),
}


def _settings():
    from core.config import load_settings

    return load_settings()


@dag(
    dag_id="training_pipeline",
    description="Daily: ingest, validate, features, train two-tower + ranker, evaluate, register, gated promotion.",
    schedule=AssetOrTimeSchedule(timetable=CronDataIntervalTimetable("@daily", timezone="UTC"),
                                 assets=TRAINING_REQUESTED),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=True,  # historical datasets (MovieLens, synthetic) have no "yesterday": trigger with a day
    default_args=DEFAULT_ARGS,
    tags=["recsys", "training", "registry"],
    params={
        "day": Param(None, type=["null", "string"], description="Logical day YYYY-MM-DD (default: data interval start, or the newest data)"),
        "retrain": Param(True, type="boolean", description="False: stop after features (data backfills)"),
        "source": Param(None, type=["null", "string"], description="Override orchestration.training_source"),
        "epochs": Param(None, type=["null", "integer"], description="Override training epochs (quick runs)"),
    },
    doc_md=__doc__,
)
def training_pipeline():
    @task
    def plan(params=None, data_interval_start=None, dag_run=None) -> dict:
        from pipelines.flow import plan_run

        return plan_run(settings=_settings(), data_interval_start=data_interval_start,
                        run_type=getattr(dag_run, "run_type", None), conf=params)

    @task
    def ingest(p: dict) -> dict:
        from pipelines.flow import ingest_step

        return ingest_step(settings=_settings(), plan=p)

    @task(retries=0)  # a failed expectation is a data problem: retrying the same data cannot fix it
    def validate(p: dict) -> dict:
        from pipelines.flow import validate_step

        return validate_step(settings=_settings(), plan=p)

    @task
    def build_features(p: dict) -> dict:
        from pipelines.flow import features_step

        return features_step(settings=_settings(), plan=p)

    @task.short_circuit
    def retrain_requested(p: dict) -> bool:
        return bool(p["retrain"])

    @task
    def freeze_eval_set(p: dict) -> dict:
        from pipelines.flow import eval_set_step

        return eval_set_step(settings=_settings(), plan=p)

    @task
    def train_two_tower(p: dict, es: dict) -> dict:
        from pipelines.flow import train_retrieval_step

        return train_retrieval_step(settings=_settings(), plan=p, eval_set=es)

    @task
    def train_ranker(p: dict, es: dict, retrieval: dict) -> dict:
        from pipelines.flow import train_ranking_step

        return train_ranking_step(settings=_settings(), plan=p, eval_set=es, retrieval=retrieval)

    @task
    def evaluate(p: dict, es: dict, retrieval: dict, ranking: dict) -> dict:
        from pipelines.flow import evaluate_step

        return evaluate_step(settings=_settings(), plan=p, eval_set=es, trained=[retrieval, ranking])

    @task
    def register(p: dict, es: dict, evaluated: dict) -> dict:
        from pipelines.flow import register_step

        return register_step(settings=_settings(), plan=p, eval_set=es, evaluated=evaluated)

    @task(outlets=[MODELS_PROMOTED])
    def promote(registered: dict) -> dict:
        from pipelines.flow import promote_step

        return promote_step(settings=_settings(), registered=registered)

    p = ingest(plan())
    checked = validate(p)
    feats = build_features(p)
    checked >> feats
    go = retrain_requested(p)
    feats >> go
    es = freeze_eval_set(p)
    go >> es
    retrieval = train_two_tower(p, es)
    ranking = train_ranker(p, es, retrieval)
    evaluated = evaluate(p, es, retrieval, ranking)
    promote(register(p, es, evaluated))


training_pipeline()
