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
from pathlib import Path
from typing import Any, Mapping

from core.config import Settings

log = logging.getLogger(__name__)

#: The checkout this code runs from (``paths.root`` may be a data folder elsewhere).
CODE_ROOT = Path(__file__).resolve().parents[1]
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
    run_type = normalise_run_type(run_type)
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
        "epochs": int(conf["epochs"]) if conf.get("epochs") else None,
    }
    return _with_windows(plan) if day else plan


def normalise_run_type(run_type: Any) -> str | None:
    """``DagRunType.BACKFILL_JOB`` / ``"backfill"`` / ``"DagRunType.SCHEDULED"`` -> ``backfill`` / ``scheduled``."""
    value = getattr(run_type, "value", run_type)
    if not value:
        return None
    text = str(value).lower().rsplit(".", 1)[-1]
    return "backfill" if text == "backfill_job" else text


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


# ---- training, evaluation, registration, promotion ----------------------------------------------
def lake_dataset(settings: Settings, *, start: date, end: date, name: str = "lake"):
    """The lake's events in ``[start, end]`` with the catalog and profiles, as a ``Dataset``."""
    from core.lake import Lake
    from core.schemas import DataError, Dataset

    lake = Lake(settings.paths.lake_dir)
    events = lake.read_events(start=start, end=end)
    if events.empty:
        raise DataError(f"no events in the lake between {start} and {end}: nothing to train on")
    return Dataset(name=f"{name}:{start}..{end}", events=events, items=lake.read_table("items"),
                   users=lake.read_table("users"))


def _finished_run(settings: Settings, step: str, plan: dict[str, Any], eval_set: dict[str, Any]) -> str | None:
    """The run id of a finished earlier run of this step for the same day and evaluation set."""
    import mlflow

    from core.tracking import configure_mlflow

    exp_id = configure_mlflow(settings)
    runs = mlflow.MlflowClient().search_runs(
        [exp_id],
        filter_string=(f"tags.`{TAG_STEP}` = '{step}' and tags.`{TAG_DAY}` = '{plan['day']}' "
                       f"and tags.`{TAG_EVAL}` = '{eval_set['version']}' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _mark_run(settings: Settings, run_id: str, step: str, plan: dict[str, Any], eval_set: dict[str, Any]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in {TAG_STEP: step, TAG_DAY: plan["day"], TAG_EVAL: eval_set["version"],
                       "data_window_start": plan["train_start"], "data_window_end": plan["train_end"]}.items():
        client.set_tag(run_id, key, value)


def _training_overrides(plan: dict[str, Any]) -> dict[str, Any]:
    """Per-run hyper-parameter overrides from the trigger's conf (``epochs``; tests use tiny runs)."""
    return {k: plan[k] for k in ("epochs",) if plan.get(k) is not None}


def train_retrieval_step(*, settings: Settings, plan: dict[str, Any], eval_set: dict[str, Any]) -> dict[str, Any]:
    """Train the two-tower model on the plan's training window (or reuse this day's finished run)."""
    step = "train_two_tower"
    run_id = _finished_run(settings, step, plan, eval_set)
    if run_id:
        return {"model": settings.registry.retrieval_model, "run_id": run_id, "model_uri": f"runs:/{run_id}/model",
                "reused": True}
    from pipelines.train import train_two_tower

    ds = lake_dataset(settings, start=date.fromisoformat(plan["train_start"]), end=date.fromisoformat(plan["train_end"]))
    res = train_two_tower(settings=settings, source=ds.name, dataset=ds, protocol="temporal", register=False,
                          progress=False, run_name=f"two_tower-{plan['day']}", **_training_overrides(plan))
    _mark_run(settings, res.run_id, step, plan, eval_set)
    return {"model": settings.registry.retrieval_model, "run_id": res.run_id, "model_uri": res.model_uri,
            "reused": False, "test_metrics": {k: float(v) for k, v in res.test_metrics.items() if k.endswith("@10")}}


def train_ranking_step(*, settings: Settings, plan: dict[str, Any], eval_set: dict[str, Any],
                       retrieval: dict[str, Any]) -> dict[str, Any]:
    """Train the DLRM ranker on the plan's training window (or reuse this day's finished run)."""
    step = "train_ranker"
    run_id = _finished_run(settings, step, plan, eval_set)
    if run_id:
        return {"model": settings.registry.ranking_model, "run_id": run_id, "model_uri": f"runs:/{run_id}/model",
                "reused": True}
    try:
        from pipelines.train_ranker import train_ranker
    except ImportError as exc:
        raise FlowError(f"pipelines.train_ranker.train_ranker is not available yet ({exc})") from None
    ds = lake_dataset(settings, start=date.fromisoformat(plan["train_start"]), end=date.fromisoformat(plan["train_end"]))
    # the retrieval model trained in this run is one of the ranker's candidate sources, as in serving
    res = train_ranker(settings=settings, source=ds.name, dataset=ds, protocol="temporal", register=False,
                       two_tower=f"runs:/{retrieval['run_id']}/model", progress=False,
                       run_name=f"ranker-{plan['day']}", **_training_overrides(plan))
    _mark_run(settings, res.run_id, step, plan, eval_set)
    return {"model": settings.registry.ranking_model, "run_id": res.run_id, "model_uri": res.model_uri,
            "reused": False, "retrieval_run_id": retrieval["run_id"]}


def evaluate_step(*, settings: Settings, plan: dict[str, Any], eval_set: dict[str, Any],
                  trained: list[dict[str, Any]]) -> dict[str, Any]:
    """Measure every trained model on the frozen evaluation set (the gate's own metrics) and log
    them to its training run as ``gate_<metric>`` with the set's version, so ``models list`` and
    the MLflow UI show numbers comparable across days. A ranker is measured behind the
    retrieval model trained with it."""
    import mlflow

    from core.tracking import configure_mlflow, metric_key
    from models.artifacts import load_from_registry
    from pipelines import promote as P

    configure_mlflow(settings)
    es = P.load_eval_set(settings, eval_set["version"])
    space = P._space(es)
    client = mlflow.MlflowClient()
    out: dict[str, Any] = {"eval_set": es.version, "models": []}
    arts: dict[str, Any] = {}
    for t in trained:
        art = load_from_registry(f"runs:/{t['run_id']}/model", settings)
        arts[t["run_id"]] = art
        try:
            if t["model"] == settings.registry.ranking_model:
                model = P.two_stage_view(art, settings, retrieval_art=arts.get(t.get("retrieval_run_id", "")))
            else:
                model = P.recommender_view(art, settings)
        except P.PromotionError as exc:
            # not measurable here (e.g. a missing two-stage hook): registered, but the gate will say so
            log.warning("%s cannot be evaluated: %s", t["model"], exc)
            out["models"].append({**t, "metrics": {}, "error": str(exc)})
            continue
        metrics = P.measure(model, *P._id_maps(model, art), es, settings, space=space)
        for key, value in metrics.items():
            client.log_metric(t["run_id"], f"gate_{metric_key(key)}", value)
        client.set_tag(t["run_id"], "gate_eval_set_sha256", es.sha256)
        out["models"].append({**t, "metrics": {k: metrics[k] for k in P._headline_keys(metrics)}})
    return out


def register_step(*, settings: Settings, plan: dict[str, Any], eval_set: dict[str, Any],
                  evaluated: dict[str, Any]) -> dict[str, Any]:
    """Register each evaluated run as a new version (once: a version of the same run is reused)
    with the data window, evaluation set, logical day and git commit as version tags."""
    import mlflow

    from core.tracking import configure_mlflow, git_commit
    from pipelines import promote as P

    configure_mlflow(settings)
    client = mlflow.MlflowClient()
    out = []
    for m in evaluated["models"]:
        name = m["model"]
        existing = client.search_model_versions(f"name='{name}' and run_id='{m['run_id']}'") \
            if _registered(client, name) else []
        if existing:
            version = str(max(int(v.version) for v in existing))
        else:
            tags = {P.TAG_WINDOW_START: plan["train_start"], P.TAG_WINDOW_END: plan["train_end"],
                    P.TAG_EVAL_SET: eval_set["version"], TAG_DAY: plan["day"],
                    P.TAG_GIT: git_commit(CODE_ROOT) or "unknown"}
            mv = mlflow.register_model(f"runs:/{m['run_id']}/model", name, tags=tags)
            version = str(mv.version)
        out.append({"model": name, "version": version, "run_id": m["run_id"], "reused": bool(existing)})
    return {"day": plan["day"], "eval_set": eval_set["version"], "versions": out}


def _registered(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def promote_step(*, settings: Settings, registered: dict[str, Any]) -> dict[str, Any]:
    """Put each registered version through the gate (retrieval first: the ranker is judged
    behind the retrieval champion). A refusal is an outcome, not a failure: the champion stays."""
    from pipelines.promote import PromotionError, PromotionRefused, promote

    order = {settings.registry.retrieval_model: 0, settings.registry.ranking_model: 1}
    out = []
    for v in sorted(registered["versions"], key=lambda x: order.get(x["model"], 2)):
        try:
            d = promote(v["model"], v["version"], settings=settings, eval_set=registered["eval_set"])
            out.append({"model": v["model"], "version": v["version"], "outcome": d.outcome, "reason": d.reason})
        except PromotionRefused as exc:
            out.append({"model": v["model"], "version": v["version"], "outcome": "refused", "reason": str(exc),
                        "failed": [c.name for c in exc.decision.failed()]})
        except PromotionError as exc:
            if "already the" in str(exc):  # a re-run after a successful promotion
                out.append({"model": v["model"], "version": v["version"], "outcome": "unchanged", "reason": str(exc)})
                continue
            # the gate could not judge it (nothing changes); say so on the version and in the run
            _tag_not_evaluated(settings, v["model"], v["version"], str(exc))
            out.append({"model": v["model"], "version": v["version"], "outcome": "not_evaluated", "reason": str(exc)})
    log.info("promotion outcomes: %s", out)
    return {"outcomes": out}


def _tag_not_evaluated(settings: Settings, name: str, version: str, reason: str) -> None:
    import mlflow

    from core.tracking import configure_mlflow

    configure_mlflow(settings)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, "gate.outcome", "not_evaluated")
    client.set_model_version_tag(name, version, "gate.reason", reason[:4000])
    log.warning("%s v%s was not evaluated by the gate: %s", name, version, reason)
