"""``feature_materialization``: hourly incremental load of the feature snapshots into the online
store (Feast), up to the end of the data interval (never "now": a re-run or backfill of an hour
writes exactly what that hour would have written).

One task, one call into ``pipelines.flow``; nothing heavy is imported when the file is parsed.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, task

DEFAULT_ARGS = {
    "owner": "recsys-features",
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}


@dag(
    dag_id="feature_materialization",
    description="Hourly: incremental materialisation of feature snapshots to the online store.",
    schedule=CronDataIntervalTimetable("@hourly", timezone="UTC"),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["recsys", "features", "online-store"],
    doc_md=__doc__,
)
def feature_materialization():
    @task(execution_timeout=timedelta(minutes=30))
    def materialize(data_interval_end=None) -> dict:
        from core.config import load_settings
        from pipelines.flow import materialize_step

        return materialize_step(settings=load_settings(), end=data_interval_end)

    materialize()


feature_materialization()
