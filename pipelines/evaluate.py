"""Offline evaluation: any set of recommenders, one split, one evaluator, one table, one MLflow run.

Why one place: a model's number only means something next to the baselines measured on the
same split by the same code in the same run (``models/metrics.py``: full ranking over the whole
catalog, training items excluded). Two protocols:

- ``recbole``: RecBole's published protocol (ratings >= 3, 10-core, random 8:1:1 per user,
  test excludes train + validation items), so numbers compare with published tables.
- ``temporal``: the product's own situation: train on the past, validate on the next slice,
  test on the most recent ``test_fraction`` of events (by time), known users only; items first
  seen after the training cut are dropped from valid/test (no collaborative model can rank
  them; their count is reported).

Models are named: ``pop``, ``itemknn``, ``als``, ``ease`` (baselines), ``two_tower``,
``two_stage`` (the neural models, imported lazily through the Recommender protocol), or a
registered model ``models:/NAME@alias`` / an artifact folder (scored through its own id maps,
aligned to this split's). Hyper-parameters are chosen on validation only: baselines grid-search
it, neural models early-stop on it; test is touched once per model.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from core.config import Settings
from core.schemas import DataError, Dataset
from core.splits import Split, recbole_split, temporal_split
from models.base import IdMap, InteractionData

log = logging.getLogger(__name__)

Protocol = Literal["recbole", "temporal"]
BASELINE_NAMES = ("pop", "itemknn", "als", "ease")
NEURAL_NAMES = ("two_tower", "two_stage")
DEFAULT_MODELS = BASELINE_NAMES
#: columns of the printed table (the full metric set goes to MLflow and the JSON)
TABLE_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "hit@10", "mrr@10", "recall@50", "coverage@10",
                 "novelty@10", "arp@10")


class EvaluationError(DataError):
    """The evaluation request cannot be run as asked (unknown model, protocol, empty split)."""


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A split encoded in one index space, plus what the neural models need (side features)."""

    source: str
    protocol: str
    seed: int
    train: InteractionData
    valid: InteractionData
    test: InteractionData
    dataset: Dataset
    sizes: dict[str, int] = field(default_factory=dict)


def load_dataset(source: str, settings: Settings, *, path: Path | None = None) -> Dataset:
    """``lake`` (the platform's own events), a dataset name, or a file (see pipelines.ingest).
    ML-1M uses the complete timestamp-less ratings file, as RecBole's tables do."""
    if source == "lake":
        from core.lake import Lake

        lake = Lake(settings.paths.lake_dir)
        events = lake.read_events()
        if events.empty:
            raise EvaluationError(f"the lake at {lake.root} has no events: run `recsys data ingest` first")
        return Dataset("lake", events, lake.read_table("items"), lake.read_table("users"))
    if source == "ml-1m":
        from core.datasets import load_ml1m
        from pipelines.ingest import dataset_folder

        folder = dataset_folder("ml-1m", settings, path)
        nots = folder / "ratings_no_timestamps.csv.gz"
        return load_ml1m(folder, ratings="no_timestamps" if nots.is_file() else "auto")
    from pipelines.ingest import load_source

    return load_source(source, settings, path=path)


def split_events(
    events: pd.DataFrame,
    protocol: Protocol,
    *,
    seed: int = 2020,
    test_fraction: float = 0.1,
    valid_fraction: float = 0.1,
) -> Split:
    """Apply ``protocol``. The temporal cuts are time quantiles of the events, so the last
    ``test_fraction`` of activity is the test window and the ``valid_fraction`` before it validation."""
    if protocol == "recbole":
        return recbole_split(events, seed=seed)
    if protocol == "temporal":
        if "timestamp" not in events.columns or events["timestamp"].isna().any():
            raise EvaluationError("the temporal protocol needs a timestamp on every event; this source has none "
                                  "(ML-1M's timestamp-less file): use --protocol recbole")
        if not (0 < test_fraction < 1 and 0 < valid_fraction < 1 and test_fraction + valid_fraction < 1):
            raise EvaluationError("test_fraction and valid_fraction must be in (0, 1) and sum to less than 1")
        ts = events["timestamp"]
        cut = ts.quantile(1 - test_fraction)
        vcut = ts.quantile(1 - test_fraction - valid_fraction)
        ordered = events.sort_values("timestamp", kind="stable")
        return temporal_split(ordered, cut, valid_cutoff=vcut, known_users_only=True)
    raise EvaluationError(f"unknown protocol {protocol!r}: use recbole or temporal")


def prepare(
    *,
    settings: Settings,
    source: str = "ml-100k",
    protocol: Protocol = "recbole",
    seed: int = 2020,
    path: Path | None = None,
    dataset: Dataset | None = None,
    test_fraction: float = 0.1,
    valid_fraction: float = 0.1,
) -> Prepared:
    """Load, split and encode. RecBole: one id space over all three parts (every user and item
    of the filtered data is in the catalog). Temporal: the id space is the training data's;
    later-only items are dropped from valid/test and counted in ``sizes``."""
    ds = dataset if dataset is not None else load_dataset(source, settings, path=path)
    split = split_events(ds.events, protocol, seed=seed, test_fraction=test_fraction, valid_fraction=valid_fraction)
    if split.train.empty:
        raise EvaluationError(f"{source}/{protocol}: the training split is empty")
    if split.test.empty:
        raise EvaluationError(f"{source}/{protocol}: the test split is empty (nothing to evaluate)")
    cols = ["user_id", "item_id", "value", "timestamp"]
    parts = {name: frame[[c for c in cols if c in frame.columns]] for name, frame in
             (("train", split.train), ("valid", split.valid), ("test", split.test))}
    if protocol == "recbole":
        everything = pd.concat(parts.values(), ignore_index=True)
        users = IdMap.from_values(everything["user_id"].unique())
        items = IdMap.from_values(everything["item_id"].unique())
    else:
        # one interaction per (user, item) in each part, as RecBole does
        parts = {k: v.drop_duplicates(["user_id", "item_id"], keep="last") for k, v in parts.items()}
        users = IdMap.from_values(parts["train"]["user_id"].unique())
        items = IdMap.from_values(parts["train"]["item_id"].unique())
    sizes = {"users": len(users), "items": len(items)}
    encoded: dict[str, InteractionData] = {}
    for name, frame in parts.items():
        if frame.empty:
            encoded[name] = InteractionData(users, items, *(np.empty(0, dtype=np.int64),) * 2, np.empty(0))
            sizes[name] = 0
            continue
        data = InteractionData.from_frame(frame, users=users, items=items, drop_unknown=True)
        encoded[name] = data
        sizes[name] = len(data)
        if len(data) < len(frame):
            sizes[f"{name}_dropped_unknown"] = len(frame) - len(data)
    if len(encoded["test"]) == 0:
        raise EvaluationError(f"{source}/{protocol}: no test interaction involves a known user and item")
    return Prepared(source, protocol, seed, encoded["train"], encoded["valid"], encoded["test"], ds, sizes)


# ---- models ------------------------------------------------------------------------------------
class AlignedRecommender:
    """A model trained in another id space (a registered artifact) scored in this split's.

    Users are looked up by external id (an evaluation user the model never saw is an error,
    naming the id); items it does not know score ``-inf`` (never recommended)."""

    def __init__(self, model: Any, *, model_users: IdMap, model_items: IdMap, users: IdMap, items: IdMap,
                 name: str = "registered") -> None:
        self.model, self.name = model, name
        self._user_map = model_users.encode(users.ids, unknown="minus_one")
        self._item_map = model_items.encode(items.ids, unknown="minus_one")
        self._users = users
        if (self._item_map < 0).all():
            raise EvaluationError(f"{name}: the model knows none of this split's {len(items)} items "
                                  "(was it trained on another dataset?)")

    def fit(self, train: InteractionData, *, valid: InteractionData | None = None) -> "AlignedRecommender":
        return self  # already trained; evaluation only

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        user_idx = np.asarray(user_idx, dtype=np.int64)
        mapped = self._user_map[user_idx]
        if (mapped < 0).any():
            bad = self._users.ids[int(user_idx[mapped < 0][0])]
            raise EvaluationError(f"{self.name}: unknown user_id {bad!r} at evaluation "
                                  f"({int((mapped < 0).sum())} of {len(user_idx)} users in this batch are unknown to the model)")
        raw = np.asarray(self.model.score(mapped), dtype=np.float64)
        out = np.full((len(user_idx), len(self._item_map)), -np.inf)
        known = self._item_map >= 0
        out[:, known] = raw[:, self._item_map[known]]
        return out


def _neural_params(name: str, settings: Settings, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Neural hyper-parameters: the training preset when the trainer exposes one, plus overrides."""
    params: dict[str, Any] = {}
    try:
        import pipelines.train as train_mod  # owned by the two-tower engineer

        preset = getattr(train_mod, f"{name}_params", None)
        if callable(preset):
            params.update(preset(settings))
    except ImportError:
        pass
    params.update(overrides or {})
    return params


def build_model(name: str, *, settings: Settings, prepared: Prepared, seed: int = 42,
                params: Mapping[str, Any] | None = None, threads: int | None = None) -> Any:
    """A fresh (untrained) recommender by name, or a loaded one for a registry URI / folder."""
    from models.baselines import BASELINES, make_baseline

    params = dict(params or {})
    if name in BASELINES:
        if name == "als":
            params.setdefault("seed", seed)
            if threads:
                params.setdefault("threads", threads)
        model = make_baseline(name, **params)
        # a hyper-parameter fixed by the caller is not searched
        model.search = {k: v for k, v in model.search.items() if k not in params}
        return model
    if name == "two_tower":
        from models.two_tower import TwoTowerRecommender

        cfg = {"seed": seed, **_neural_params(name, settings, params)}
        return TwoTowerRecommender(cfg, items_frame=prepared.dataset.items, users_frame=prepared.dataset.users,
                                   progress=False)
    if name == "two_stage":
        return TwoTowerPlusRanker(settings=settings, prepared=prepared, seed=seed, params=params)
    if name.startswith(("models:/", "runs:/")) or Path(name).is_dir():
        from models.artifacts import load_artifact

        art = load_artifact(name, settings=settings)
        if art.users is None or art.items is None:
            raise EvaluationError(f"{name}: artifact has no id maps, cannot align it to the evaluation data")
        model = _recommender_from_artifact(art)
        return AlignedRecommender(model, model_users=art.users, model_items=art.items, users=prepared.train.users,
                                  items=prepared.train.items, name=name)
    known = ", ".join((*BASELINES, *NEURAL_NAMES))
    raise EvaluationError(f"unknown model {name!r}: use one of {known}, models:/NAME@alias, or an artifact folder")


class TwoTowerPlusRanker:
    """The product's two-stage pipeline as one Recommender: a two-tower model (early-stopped on
    validation) becomes a candidate source beside co-visitation and popularity, and the DLRM
    ranker (trained on validation labels, see ``models.two_stage``) orders the merged candidates.
    ``train_s`` therefore covers both stages. ``params``: ``two_tower`` (dict) for the retriever,
    the rest for :class:`models.two_stage.TwoStageRecommender`."""

    name = "two_stage"

    def __init__(self, *, settings: Settings, prepared: Prepared, seed: int = 42,
                 params: Mapping[str, Any] | None = None) -> None:
        params = dict(params or {})
        self._tt_params = {"seed": seed, **_neural_params("two_tower", settings, params.pop("two_tower", None))}
        self._ts_params = {"seed": seed, **_neural_params("two_stage", settings, params)}
        # the ranker's layer sizes come from the configuration, as in training (overrides win)
        sizes = settings.training.ranker
        self._ts_params["dlrm_params"] = {"dense_arch": tuple(sizes.dense_arch), "over_arch": tuple(sizes.over_arch),
                                          **dict(self._ts_params.get("dlrm_params") or {})}
        self._prepared = prepared
        self.model: Any = None
        self.params: dict[str, Any] = {}

    def fit(self, train: InteractionData, *, valid: InteractionData | None = None) -> "TwoTowerPlusRanker":
        from models.two_stage import RecommenderSource, TwoStageRecommender
        from models.two_tower import TwoTowerRecommender

        ds = self._prepared.dataset
        tower = TwoTowerRecommender(self._tt_params, items_frame=ds.items, users_frame=ds.users, progress=False)
        tower.fit(train, valid=valid)
        ts_kwargs = {k: v for k, v in self._ts_params.items() if k in TwoStageRecommender.__dataclass_fields__}
        self.model = TwoStageRecommender(extra_sources=[RecommenderSource(tower, name="two_tower")],
                                         items_frame=ds.items if len(ds.items) else None, **ts_kwargs)
        self.model.fit(train, valid=valid)
        report = getattr(self.model, "report", {}) or {}
        self.params = {"two_tower_best_epoch": tower.best_epoch,
                       **{k: v for k, v in ts_kwargs.items() if isinstance(v, (int, float, str, bool))},
                       **{f"ranker_{k}": v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        return self

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise EvaluationError("two_stage: score() before fit()")
        return self.model.score(user_idx)

    def source_recommenders(self) -> list[Any]:
        return self.model.source_recommenders() if self.model is not None else []


def _recommender_from_artifact(art: Any) -> Any:
    """The Recommender view of an artifact: the kind's own ``from_artifact`` when it has one."""
    if art.kind == "two_tower":
        from models.two_tower import TwoTowerRecommender

        return TwoTowerRecommender.from_artifact(art)
    built = art.build()
    if not hasattr(built, "score"):
        raise EvaluationError(f"artifact kind {art.kind!r} has no full-catalog score(); it cannot be evaluated alone")
    return built


# ---- running -----------------------------------------------------------------------------------
@dataclass
class ModelResult:
    """One model's row: metrics on test, cost, and what validation chose."""

    name: str
    metrics: dict[str, float]
    train_s: float
    eval_s: float
    params: dict[str, Any] = field(default_factory=dict)
    tuning: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float | None = None
    #: each candidate source of a two-stage model evaluated alone (same split, same evaluator)
    parts: list["ModelResult"] = field(default_factory=list)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_model(name: str, prepared: Prepared, *, settings: Settings, ks: Sequence[int] = (10, 20, 50), seed: int = 42,
              params: Mapping[str, Any] | None = None, tune: bool = True, threads: int | None = None) -> ModelResult:
    """Fit ``name`` on train (validation for tuning/early stopping), evaluate once on test."""
    from models.metrics import evaluate_recommender

    model = build_model(name, settings=settings, prepared=prepared, seed=seed, params=params, threads=threads)
    valid = prepared.valid if len(prepared.valid) else None
    t0 = time.perf_counter()
    model.fit(prepared.train, valid=valid if tune else None)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate_recommender(model, train=prepared.train, test=prepared.test, valid=valid, ks=ks)
    eval_s = time.perf_counter() - t0
    chosen = getattr(model, "params", {}) or {}
    tuning = getattr(model, "tuning", None)
    trials = [{"params": p, tuning.metric: v} for p, v in tuning.trials] if tuning is not None else []
    best_epoch = getattr(model, "best_epoch", None)
    info = {k: v for k, v in dict(chosen).items() if isinstance(v, (int, float, str, bool))}
    if best_epoch is not None:
        info["best_epoch"] = best_epoch
    result = ModelResult(getattr(model, "name", name) if name in (*BASELINE_NAMES, *NEURAL_NAMES) else name,
                         metrics, train_s, eval_s, info, trials)
    for source in (model.source_recommenders() if hasattr(model, "source_recommenders") else []):
        t0 = time.perf_counter()
        m = evaluate_recommender(source, train=prepared.train, test=prepared.test, valid=valid, ks=ks)
        result.parts.append(ModelResult(f"{result.name}/{source.name}", m, 0.0, time.perf_counter() - t0))
    return result


def _isolated(name: str, settings: Settings, kwargs: dict[str, Any], run_kwargs: dict[str, Any]) -> tuple[ModelResult, dict[str, Any]]:
    """Child-process body of :func:`run_isolated` (module level so ``spawn`` can import it)."""
    prepared = prepare(settings=settings, **kwargs)
    data_rss = peak_rss_mb()
    result = run_model(name, prepared, settings=settings, **run_kwargs)
    result.peak_rss_mb = peak_rss_mb()
    return result, {"sizes": prepared.sizes, "data_rss_mb": data_rss}


def run_isolated(name: str, *, settings: Settings, prepare_kwargs: Mapping[str, Any],
                 run_kwargs: Mapping[str, Any]) -> tuple[ModelResult, dict[str, Any]]:
    """:func:`run_model` in a fresh process, so ``peak_rss_mb`` is this model's own peak (the
    process's ``ru_maxrss``, which includes the split itself: ``data_rss_mb`` says how much)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_isolated, name, settings, dict(prepare_kwargs), dict(run_kwargs)).result()


@dataclass
class EvalReport:
    """Every model's row on one split; ``run_id`` is the MLflow run that holds it."""

    source: str
    protocol: str
    seed: int
    sizes: dict[str, int]
    ks: list[int]
    results: list[ModelResult]
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "protocol": self.protocol, "seed": self.seed, "sizes": self.sizes,
                "ks": self.ks, "run_id": self.run_id, "models": {r.name: {**asdict(r), "parts": [p.name for p in r.parts]} for r in self.results}}

    def table(self, metrics: Sequence[str] = TABLE_METRICS):
        """A rich table, one row per model, best value per column in bold."""
        from rich.table import Table

        cols = [m for m in metrics if any(m in r.metrics for r in self.results)]
        t = Table(title=f"{self.source} - {self.protocol} protocol (seed {self.seed}; "
                        f"{self.sizes.get('users', 0):,} users, {self.sizes.get('items', 0):,} items, "
                        f"train/valid/test {self.sizes.get('train', 0):,}/{self.sizes.get('valid', 0):,}/"
                        f"{self.sizes.get('test', 0):,})")
        t.add_column("model")
        for c in cols:
            t.add_column(c, justify="right")
        t.add_column("train s", justify="right")
        if any(r.peak_rss_mb is not None for r in self.results):
            t.add_column("peak RSS MB", justify="right")
        best = {c: max(r.metrics.get(c, -np.inf) for r in self.results) for c in cols}
        for r in self.results:
            cells = []
            for c in cols:
                v = r.metrics.get(c)
                text = "-" if v is None else (f"{v:.4f}" if v < 10 else f"{v:.1f}")
                cells.append(f"[bold]{text}[/]" if v is not None and v == best[c] and c.split("@")[0] not in ("arp",) else text)
            row = [r.name, *cells, f"{r.train_s:.1f}"]
            if any(x.peak_rss_mb is not None for x in self.results):
                row.append("-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}")
            t.add_row(*row)
        return t

    def markdown(self, metrics: Sequence[str] = TABLE_METRICS) -> str:
        """The same table as GitHub markdown (MLflow artifact, benchmark .md)."""
        cols = [m for m in metrics if any(m in r.metrics for r in self.results)]
        rss = any(r.peak_rss_mb is not None for r in self.results)
        head = ["model", *cols, "train s", *(["peak RSS MB"] if rss else [])]
        lines = [f"**{self.source}**, {self.protocol} protocol, split seed {self.seed}: "
                 + ", ".join(f"{k} {v:,}" for k, v in self.sizes.items()), "",
                 "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for r in self.results:
            cells = [f"{r.metrics[c]:.4f}" if c in r.metrics and r.metrics[c] < 10 else
                     (f"{r.metrics[c]:.1f}" if c in r.metrics else "-") for c in cols]
            extra = [f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "-"] if rss else []
            lines.append("| " + " | ".join([r.name, *cells, f"{r.train_s:.1f}", *extra]) + " |")
        chosen = [f"- {r.name}: " + ", ".join(f"{k}={v}" for k, v in r.params.items()) for r in self.results if r.params]
        if chosen:
            lines += ["", "Hyper-parameters (chosen on validation):", *chosen]
        return "\n".join(lines) + "\n"


def log_report(report: EvalReport, *, settings: Settings, run_name: str | None = None) -> str:
    """One MLflow run: params, every metric as ``<model>/<metric>``, the table and JSON as artifacts."""
    import mlflow

    from core.tracking import configure_mlflow, git_commit, metric_key

    configure_mlflow(settings)
    with mlflow.start_run(run_name=run_name or f"evaluate-{report.source}-{report.protocol}") as run:
        mlflow.set_tags({"task": "evaluate", "source": report.source, "protocol": report.protocol,
                         "git_commit": git_commit(settings.paths.root) or "unknown"})
        mlflow.log_params({"source": report.source, "protocol": report.protocol, "seed": report.seed,
                           "models": ",".join(r.name for r in report.results), "ks": ",".join(map(str, report.ks)),
                           **{f"size_{k}": v for k, v in report.sizes.items()}})
        for r in report.results:
            mlflow.log_params({f"{r.name}.{k}": v for k, v in r.params.items()})
            metrics = {f"{r.name}/{metric_key(k)}": float(v) for k, v in r.metrics.items()}
            metrics[f"{r.name}/train_s"] = r.train_s
            metrics[f"{r.name}/eval_s"] = r.eval_s
            if r.peak_rss_mb is not None:
                metrics[f"{r.name}/peak_rss_mb"] = r.peak_rss_mb
            mlflow.log_metrics(metrics)
        mlflow.log_text(report.markdown(), "evaluation/table.md")
        mlflow.log_dict(report.as_dict(), "evaluation/report.json")
        report.run_id = run.info.run_id
    return report.run_id


def evaluate(
    *,
    settings: Settings,
    source: str = "ml-100k",
    protocol: Protocol = "recbole",
    models: Sequence[str] = DEFAULT_MODELS,
    seed: int = 2020,
    ks: Sequence[int] = (10, 20, 50),
    path: Path | None = None,
    dataset: Dataset | None = None,
    model_params: Mapping[str, Mapping[str, Any]] | None = None,
    tune: bool = True,
    threads: int | None = None,
    log_mlflow: bool = True,
    echo: Callable[[str], None] | None = None,
) -> EvalReport:
    """Run ``models`` on one split of ``source`` under ``protocol`` and log one MLflow run.

    ``model_params`` fixes hyper-parameters per model (``{"ease": {"lam": 500}}``; a fixed one
    is not searched); with ``tune=True`` the baselines search the rest of their grids on
    validation, and neural models early-stop on it."""
    if not models:
        raise EvaluationError("no models to evaluate")
    prepared = prepare(settings=settings, source=source, protocol=protocol, seed=seed, path=path, dataset=dataset)
    results = []
    for name in models:
        r = run_model(name, prepared, settings=settings, ks=ks, seed=settings.training.seed,
                      params=(model_params or {}).get(name), tune=tune, threads=threads)
        if echo:
            echo(f"{r.name}: recall@10 {r.metrics.get('recall@10', float('nan')):.4f} "
                 f"ndcg@10 {r.metrics.get('ndcg@10', float('nan')):.4f} (train {r.train_s:.1f}s)")
        results.append(r)
        results.extend(r.parts)
    report = EvalReport(prepared.source, protocol, seed, prepared.sizes, sorted(set(int(k) for k in ks)), results)
    if log_mlflow:
        log_report(report, settings=settings)
    return report


def step_evaluate(settings: Settings, state: Any) -> str:
    """Demo step: the four baselines on the demo's data (RecBole protocol), one table, one MLflow run."""
    from core.cli_common import console

    source = getattr(state, "source", "ml-100k")
    dataset = None
    if source != "ml-100k":
        dataset = load_dataset("lake", settings)  # the synthetic fallback lives in the lake
    report = evaluate(settings=settings, source="ml-100k" if dataset is None else "lake", protocol="recbole",
                      models=BASELINE_NAMES, seed=2020, dataset=dataset, threads=min(2, os.cpu_count() or 1))
    console.print(report.table())
    best = max(report.results, key=lambda r: r.metrics["ndcg@10"])
    if hasattr(state, "values"):
        state.values["evaluation_run_id"] = report.run_id
    return (f"evaluated {len(report.results)} baselines on {report.source} (RecBole protocol): best {best.name} "
            f"ndcg@10 {best.metrics['ndcg@10']:.4f}, recall@10 {best.metrics['recall@10']:.4f}; MLflow run {report.run_id}")


def write_json(report: EvalReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2, default=str))
