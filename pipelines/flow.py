"""The training flow's steps as plain functions: what each Airflow task (and the demo) calls.

Every step takes the settings and a *plan* (a JSON dict made once per run by :func:`plan_run`)
and returns a JSON-able summary (it becomes the task's XCom). A plan pins everything that makes
a run reproducible -- the logical day, the evaluation window, the training window -- so a retried
task, a re-run of the same logical date and a backfill all compute the same thing:

- partitions are keyed by the run's ``data_interval_start`` (never the wall clock);
- the lake merge is idempotent on ``event_id``; features for day D are rebuilt, not appended;
- the frozen evaluation set's version is a hash of its content (same data -> same version);
- training is reused: a finished MLflow run tagged with the same step, logical day and
  evaluation set is returned instead of training again, and a registered version of that run
  is reused instead of registering a duplicate.

Windows for logical day D (``E`` = ``registry.eval_test_days``, ``W`` = training window):
evaluation = ``[D-E+1, D]``; training = ``[D-E-W+1, D-E]``. Nothing the models learn from is in
the window the gate judges them on.
"""
from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Mapping

from core.config import Settings

log = logging.getLogger(__name__)

TAG_STEP = "recsys.step"
TAG_DAY = "recsys.logical_date"
TAG_EVAL = "recsys.eval_set"


class FlowError(RuntimeError):
    """A step cannot run with this plan (missing upstream output); the message says which."""


def _day(value: Any) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).date() if value.tzinfo else value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def plan_run(
    *,
    settings: Settings,
    data_interval_start: Any = None,
    run_type: str | None = None,
    conf: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Decide the run's logical day and windows.

    ``conf["day"]`` wins (manual triggers, TriggerDagRunOperator); scheduled and backfill runs
    use ``data_interval_start``; a manual or asset-triggered run without a day trains on the
    newest data: the whole source is merged (idempotent) and the day is the lake's last one."""
    from pipelines.cli_up import orchestration

    conf = dict(conf or {})
    orch = orchestration(settings)
    day = _day(conf.get("day"))
    if day is None and run_type in (None, "scheduled", "backfill"):
        day = _day(data_interval_start)
    eval_days = int(conf.get("eval_days") or settings.registry.eval_test_days)
    window = int(conf.get("window_days") or orch.training_window_days)
    plan: dict[str, Any] = {
        "day": day.isoformat() if day else None,
        "source": conf.get("source") or orch.training_source,
        "retrain": bool(conf.get("retrain", True)),
        "eval_days": eval_days,
        "window_days": window,
        "run_type": run_type or "manual",
    }
    return _with_windows(plan) if day else plan


def _with_windows(plan: dict[str, Any]) -> dict[str, Any]:
    day = date.fromisoformat(plan["day"])
    cutoff = day - timedelta(days=plan["eval_days"] - 1)
    train_end = cutoff - timedelta(days=1)
    return {**plan, "eval_start": cutoff.isoformat(), "train_end": train_end.isoformat(),
            "train_start": (train_end - timedelta(days=plan["window_days"] - 1)).isoformat()}


def ingest_step(*, settings: Settings, plan: dict[str, Any]) -> dict[str, Any]:
    """Merge the plan's day (or, without one, the whole source) into the lake; fix the day."""
    from core.lake import Lake
    from pipelines.ingest import ingest

    day = _day(plan.get("day"))
    report = ingest(plan["source"], settings=settings, day=day)
    out = {**plan, "ingest": {"events_read": report.events_read, "events_added": report.events_added,
                               "partitions": len(report.partitions)}}
    if day is None:
        days = Lake(settings.paths.lake_dir).partitions()
        if not days:
            raise FlowError(f"source {plan['source']!r} produced no partitions in {settings.paths.lake_dir}")
        out = _with_windows({**out, "day": days[-1].isoformat()})
    elif report.events_read == 0 and not Lake(settings.paths.lake_dir).partition_dir(day).is_dir():
        raise FlowError(f"{plan['source']!r} has no events on {day}: nothing to validate or train on "
                        "(trigger with conf {\"day\": \"YYYY-MM-DD\"} inside the data's range)")
    return out


def validate_step(*, settings: Settings, plan: dict[str, Any]) -> dict[str, Any]:
    """The GX gate on the day's partition; raises ``ValidationFailed`` (the run stops here)."""
    from pipelines.validate import validate_partition

    day = date.fromisoformat(plan["day"])
    # the validator's clock is the end of the logical day, so a backfill judges a day as it was
    now = datetime.combine(day + timedelta(days=1), time(0), tzinfo=timezone.utc)
    report = validate_partition(day, settings=settings, now=now)
    return {"day": plan["day"], "rows": report.rows, "success": report.success,
            "warnings": [c.line() for c in report.warnings]}


def features_step(*, settings: Settings, plan: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the feature tables through the day and apply the Feast definitions."""
    from pipelines.features import build_features

    rep = build_features(settings=settings, end=date.fromisoformat(plan["day"]))
    return {"end_day": rep.end_day, "events": rep.events, "rows": rep.rows}


def materialize_step(*, settings: Settings, end: Any) -> dict[str, Any]:
    """Incremental materialisation to the online store up to ``end`` (the data interval's end)."""
    from pipelines.features import materialize

    ts = end if isinstance(end, datetime) else datetime.fromisoformat(str(end))
    ts = ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    rep = materialize(settings=settings, end=ts)
    return {"end": rep.end, "online_store": rep.online_store,
            "entities_written": {k: v.get("entities_written", 0) for k, v in rep.views.items()}}


def eval_set_step(*, settings: Settings, plan: dict[str, Any]) -> dict[str, Any]:
    """Freeze (or reuse: same content, same version) the evaluation set of the plan's window."""
    from pipelines.promote import freeze_eval_set

    es = freeze_eval_set(settings, cutoff=date.fromisoformat(plan["eval_start"]), end=date.fromisoformat(plan["day"]))
    return {"version": es.version, "sha256": es.sha256, "cutoff": es.cutoff, "end": es.end, "users": es.n_users}
