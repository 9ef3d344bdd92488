"""The promotion gate, aliases and the registry's audit trail.

Serving never names a version number: it loads ``models:/<name>@champion`` (and
``@challenger`` for A/B tests). Which version that alias points to is decided here, and only
here, by a gate that a human can read afterwards:

1. **Frozen evaluation set.** :func:`freeze_eval_set` writes the held-out tail of the lake
   (the last ``registry.eval_test_days`` days before a cutoff), the history before it and the
   catalog to ``var/eval_sets/<version>/`` with a SHA-256 of every file; the version id embeds
   the content hash, so the same lake and cutoff always give the same set (idempotent, and a
   DAG re-run reuses it) and a modified file is detected before it can bias a decision.
2. **Same set, same process.** The candidate *and* the current champion are loaded from the
   registry and scored on that set, in the same process, right after one another: accuracy
   (full-ranking top-K through :mod:`models.metrics`), catalog coverage, miscalibration of the
   recommended category mix (Steck 2018), and a scoring micro-benchmark. Stored numbers from
   older runs are never trusted: they may come from another set.
3. **Checks.** Absolute sanity (every candidate; the only gate when there is no champion yet):
   primary metric above a floor, beats a most-popular baseline on the same set, coverage and
   latency within limits, and no leakage (the candidate's training window must end before the
   evaluation window starts). Against the champion: the primary metric must beat it by
   ``registry.min_improvement`` (relative), and no guardrail (coverage, calibration, latency)
   may regress beyond its tolerance.
4. **Audit trail.** The decision, every check, both metric sets, the evaluation set's version
   and hash, and the reason are written to the candidate version's tags and description,
   whatever the outcome. A refusal raises :class:`PromotionRefused` naming the failed checks.
   ``force=True`` skips the checks (still measured and recorded) and requires a reason.

Aliases: promoting moves ``champion`` to the candidate and keeps the old champion as
``previous_champion``; the registered model's ``recsys.champion_history`` tag lists champions
in order, so :func:`rollback` can step back more than once. ``challenger`` (for A/B tests) needs
the sanity checks and the guardrails, but not a win on the primary metric: that is what the
A/B test is for.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from core.config import Settings
from core.schemas import DataError
from models.artifacts import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

log = logging.getLogger(__name__)

HISTORY_TAG = "recsys.champion_history"
EVAL_FILES = ("history.parquet", "test.parquet", "catalog.parquet")
#: Version tags other steps write at registration time (read by ``models list`` and the leakage check).
TAG_WINDOW_START = "data_window_start"
TAG_WINDOW_END = "data_window_end"
TAG_EVAL_SET = "eval_set"
TAG_GIT = "git_commit"


class PromotionError(ValueError):
    """Promotion was asked for something impossible (unknown model/version, bad arguments)."""


class PromotionRefused(PromotionError):
    """The gate refused the candidate; ``decision`` holds every check and both metric sets."""

    def __init__(self, message: str, decision: "Decision"):
        super().__init__(message)
        self.decision = decision


# ---- frozen evaluation sets --------------------------------------------------------------------
@dataclass
class EvalSet:
    """A frozen evaluation set: history (for exclusion, popularity and taste profiles), the
    held-out test interactions, and the catalog (with categories, for calibration)."""

    version: str
    folder: Path
    cutoff: str
    end: str
    sha256: str
    history: "pd.DataFrame"
    test: "pd.DataFrame"
    catalog: "pd.DataFrame"

    @property
    def n_users(self) -> int:
        return int(self.test["user_id"].nunique())


def eval_set_root(settings: Settings) -> Path:
    p = settings.registry.eval_set_dir
    return p if p.is_absolute() else settings.paths.root / p


def _frames_for(settings: Settings, cutoff: date, end: date | None) -> tuple["pd.DataFrame", "pd.DataFrame", "pd.DataFrame"]:
    import pandas as pd

    from core.lake import Lake

    lake = Lake(settings.paths.lake_dir)
    events = lake.read_events(end=end)
    if events.empty:
        raise DataError(f"cannot freeze an evaluation set: the lake at {settings.paths.lake_dir} has no events")
    cut = pd.Timestamp(cutoff, tz="UTC")
    pairs = events[["user_id", "item_id", "timestamp"]]
    history = pairs[pairs["timestamp"] < cut].drop_duplicates(["user_id", "item_id"])[["user_id", "item_id"]]
    test = pairs[pairs["timestamp"] >= cut].drop_duplicates(["user_id", "item_id"])[["user_id", "item_id"]]
    test = test[test["user_id"].isin(set(history["user_id"]))]  # cold-start users are measured elsewhere
    if history.empty or test.empty:
        raise DataError(f"cannot freeze an evaluation set at cutoff {cutoff}: "
                        f"{len(history)} history and {len(test)} test interactions of known users "
                        "(the lake needs the days before the cutoff: backfill them first, e.g. with retrain=false)")
    users = np.sort(test["user_id"].unique())
    n = settings.registry.eval_max_users
    if len(users) > n:
        rng = np.random.default_rng(settings.data.seed)
        users = np.sort(rng.choice(users, size=n, replace=False))
        test = test[test["user_id"].isin(set(users))]
    items = lake.read_table("items")
    catalog_ids = sorted(set(items["item_id"]) | set(events["item_id"]))
    cats = dict(zip(items["item_id"], items["categories"])) if len(items) else {}
    catalog = pd.DataFrame({
        "item_id": catalog_ids,
        "categories": [list(cats.get(i, []) if cats.get(i) is not None else []) for i in catalog_ids],
    })
    history = history.sort_values(["user_id", "item_id"]).reset_index(drop=True)
    test = test.sort_values(["user_id", "item_id"]).reset_index(drop=True)
    return history, test, catalog


def freeze_eval_set(settings: Settings, *, cutoff: date | None = None, end: date | None = None) -> EvalSet:
    """Freeze (or reuse) the evaluation set with test window ``[cutoff, end]``.

    Defaults: ``end`` = the lake's last day, ``cutoff`` = ``end - eval_test_days + 1``. The
    folder name is ``<cutoff>_<hash12>``: the same data gives the same version, so freezing is
    idempotent; new data under the same cutoff gives a new version (old ones are kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.lake import Lake

    if end is None or cutoff is None:
        days = Lake(settings.paths.lake_dir).partitions()
        if not days:
            raise DataError(f"cannot freeze an evaluation set: no partitions in {settings.paths.lake_dir}")
        end = end or days[-1]
        cutoff = cutoff or end - timedelta(days=settings.registry.eval_test_days - 1)
    if cutoff > end:
        raise ValueError(f"eval set cutoff {cutoff} is after its end {end}")
    history, test, catalog = _frames_for(settings, cutoff, end)
    root = eval_set_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".evalset-", dir=root))
    try:
        for name, frame in zip(EVAL_FILES, (history, test, catalog)):
            # no pandas metadata, fixed writer options: identical data -> identical bytes -> same hash
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None),
                           tmp / name, compression="zstd", write_statistics=False)
        files = {name: sha256_file(tmp / name) for name in EVAL_FILES}
        digest = hashlib.sha256(json.dumps([cutoff.isoformat(), end.isoformat(), files], sort_keys=True).encode()).hexdigest()
        version = f"{cutoff.isoformat()}_{digest[:12]}"
        manifest = {"version": version, "cutoff": cutoff.isoformat(), "end": end.isoformat(), "sha256": digest,
                    "files": files, "n_users": int(test["user_id"].nunique()), "n_test": len(test),
                    "n_history": len(history), "n_items": len(catalog),
                    "created_at": datetime.now(timezone.utc).isoformat()}
        folder = root / version
        if not (folder / "manifest.json").is_file():
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (root / "LATEST").write_text(version + "\n")
    return load_eval_set(settings, version)


def load_eval_set(settings: Settings, version: str | None = None) -> EvalSet:
    """Load a frozen set (default: the latest frozen), verifying every file's hash."""
    import pyarrow.parquet as pq

    root = eval_set_root(settings)
    if version is None:
        latest = root / "LATEST"
        if not latest.is_file():
            raise DataError(f"no frozen evaluation set under {root}; freeze one with `recsys models freeze-eval`")
        version = latest.read_text().strip()
    folder = root / version
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"evaluation set {version!r} not found under {root}")
    manifest = json.loads(mpath.read_text())
    for name, digest in manifest["files"].items():
        if sha256_file(folder / name) != digest:
            raise DataError(f"evaluation set {version}: {name} does not match its recorded SHA-256 (modified or corrupt); "
                            "freeze a new one instead of editing it")
    frames = [pq.read_table(folder / name).to_pandas() for name in EVAL_FILES]
    return EvalSet(version, folder, manifest["cutoff"], manifest["end"], manifest["sha256"], *frames)


def eval_set_for(settings: Settings, *, explicit: str | None, training_end: str | None) -> EvalSet:
    """The evaluation set a promotion uses: the one named (by the caller or the version's
    ``eval_set`` tag); else one starting the day after the candidate's training data ends (so a
    model trained outside the DAG, e.g. by ``recsys train``, is judged on data it never saw);
    else the latest frozen one (the leakage check then says if it overlaps)."""
    if explicit:
        return load_eval_set(settings, explicit)
    from core.lake import Lake

    days = Lake(settings.paths.lake_dir).partitions()
    if training_end and days:
        cutoff = date.fromisoformat(training_end) + timedelta(days=1)
        if cutoff <= days[-1]:
            return freeze_eval_set(settings, cutoff=max(cutoff, days[-1] - timedelta(days=settings.registry.eval_test_days * 4)),
                                   end=days[-1])
    if (eval_set_root(settings) / "LATEST").is_file():
        return load_eval_set(settings)
    return freeze_eval_set(settings)


# ---- measuring a model on the set --------------------------------------------------------------
ScoreFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Space:
    """The evaluation set in its own index space (catalog items x test users)."""

    users: list[str]
    items: list[str]
    test: Any  # csr
    exclude: Any  # csr
    popularity: np.ndarray
    taste: np.ndarray  # users x categories (history category mix)
    item_cats: Any  # csr items x categories (row-normalised)


def _space(es: EvalSet) -> _Space:
    import scipy.sparse as sp

    users = sorted(es.test["user_id"].unique())
    items = list(es.catalog["item_id"])
    uidx = {u: i for i, u in enumerate(users)}
    iidx = {it: i for i, it in enumerate(items)}

    def mat(frame: "pd.DataFrame") -> sp.csr_matrix:
        f = frame[frame["user_id"].isin(uidx) & frame["item_id"].isin(iidx)]
        r = f["user_id"].map(uidx).to_numpy()
        c = f["item_id"].map(iidx).to_numpy()
        m = sp.csr_matrix((np.ones(len(f)), (r, c)), shape=(len(users), len(items)))
        m.data[:] = 1.0
        return m

    hist_all = es.history[es.history["item_id"].isin(iidx)]
    pop = np.bincount(hist_all["item_id"].map(iidx).to_numpy(), minlength=len(items)).astype(np.float64)
    cat_names = sorted({c for cs in es.catalog["categories"] for c in (cs if cs is not None else [])})
    cidx = {c: i for i, c in enumerate(cat_names)}
    rows, cols, vals = [], [], []
    for i, cs in enumerate(es.catalog["categories"]):
        cs = list(cs) if cs is not None else []
        for c in cs:
            rows.append(i)
            cols.append(cidx[c])
            vals.append(1.0 / len(cs))
    item_cats = sp.csr_matrix((vals, (rows, cols)), shape=(len(items), max(1, len(cat_names))))
    exclude = mat(es.history)
    taste = np.asarray((exclude @ item_cats).todense())
    return _Space(users, items, mat(es.test), exclude, pop, taste, item_cats if cat_names else None)


def catalog_scorer(model: Any, user_ids: tuple[str, ...] | list[str], item_ids: tuple[str, ...] | list[str],
                   space: _Space) -> ScoreFn:
    """Wrap a model's ``score(user_idx)`` (in its own id maps) into the evaluation set's space.

    Users the model does not know get an all ``-inf`` row (no hits: a model that cannot serve a
    user is not excused); catalog items it does not know are never recommended by it."""
    if not hasattr(model, "score"):
        raise PromotionError(f"{type(model).__name__} has no score(user_idx): the gate cannot evaluate it")
    m_u = {u: i for i, u in enumerate(user_ids)}
    m_i = {it: i for i, it in enumerate(item_ids)}
    user_map = np.array([m_u.get(u, -1) for u in space.users], dtype=np.int64)
    cols = np.array([i for i, it in enumerate(space.items) if it in m_i], dtype=np.int64)
    src = np.array([m_i[space.items[i]] for i in cols], dtype=np.int64)
    n_items = len(space.items)

    def score(rows: np.ndarray) -> np.ndarray:
        out = np.full((len(rows), n_items), -np.inf)
        mu = user_map[rows]
        known = mu >= 0
        if known.any() and len(cols):
            s = np.asarray(model.score(mu[known]), dtype=np.float64)
            block = out[known]
            block[:, cols] = s[:, src]
            out[known] = block
        return out

    return score


def miscalibration(score_fn: ScoreFn, space: _Space, *, k: int) -> float | None:
    """Steck (2018) miscalibration: mean KL(p_u || q~_u) of the user's history category mix p
    and the top-k recommendation mix q (q~ = 0.99 q + 0.01 p). None without categories."""
    from models.metrics import top_k

    if space.item_cats is None:
        return None
    total, n = 0.0, 0
    for start in range(0, len(space.users), 512):
        rows = np.arange(start, min(start + 512, len(space.users)))
        s = score_fn(rows)
        ex = space.exclude[rows]
        r = np.repeat(np.arange(len(rows)), np.diff(ex.indptr))
        s[r, ex.indices] = -np.inf
        top = top_k(s, k)
        valid = np.take_along_axis(s, top, axis=1) > -np.inf
        for j, u in enumerate(rows):
            p = space.taste[u]
            if p.sum() <= 0:
                continue
            p = p / p.sum()
            items = top[j][valid[j]]
            q = np.asarray(space.item_cats[items].sum(axis=0)).ravel() if len(items) else np.zeros_like(p)
            q = q / q.sum() if q.sum() > 0 else q
            qt = 0.99 * q + 0.01 * p
            nz = p > 0
            total += float((p[nz] * np.log(p[nz] / qt[nz])).sum())
            n += 1
    return total / n if n else None


def latency_ms(model: Any, n_users: int, *, batch: int, repeats: int, seed: int = 0) -> float:
    """Median wall time (ms) of ``model.score`` on one batch of ``batch`` users (after a warm-up)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, max(1, n_users), size=min(batch, max(1, n_users)))
    model.score(users)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.score(users)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def measure(model: Any, user_ids, item_ids, es: EvalSet, settings: Settings, *, space: _Space | None = None) -> dict[str, float]:
    """All gate metrics of one model on the frozen set (``name@k`` keys plus ``miscalibration@k``
    and ``latency_ms``)."""
    from models.metrics import ranking_metrics

    reg = settings.registry
    space = space or _space(es)
    score = catalog_scorer(model, list(user_ids), list(item_ids), space)
    ks = sorted({reg.k, *settings.training.eval_ks, _metric_k(reg.primary_metric)})
    out = ranking_metrics(score, test=space.test, exclude=space.exclude, popularity=space.popularity, ks=ks,
                          n_train_users=len(space.users))
    cal = miscalibration(score, space, k=reg.k)
    if cal is not None:
        out[f"miscalibration@{reg.k}"] = cal
    out["latency_ms"] = latency_ms(model, len(user_ids), batch=reg.latency_users, repeats=reg.latency_repeats,
                                   seed=settings.data.seed)
    out["known_users"] = float(np.mean([u in set(user_ids) for u in space.users]))
    return {k: float(v) for k, v in out.items()}


def _metric_k(name: str) -> int:
    try:
        return int(name.split("@", 1)[1])
    except (IndexError, ValueError):
        raise PromotionError(f"primary metric {name!r} must look like ndcg@10") from None


def popularity_baseline(es: EvalSet, settings: Settings, *, space: _Space | None = None) -> dict[str, float]:
    """The most-popular baseline fitted on the set's history, measured like any candidate."""
    from models.base import InteractionData
    from models.baselines import MostPopular

    space = space or _space(es)
    data = InteractionData.from_frame(es.history)
    pop = MostPopular().fit(data)
    return measure(pop, data.users.ids, data.items.ids, es, settings, space=space)


# ---- registry access ---------------------------------------------------------------------------
def _client(settings: Settings):
    import mlflow

    from core.tracking import configure_mlflow

    configure_mlflow(settings)
    return mlflow.MlflowClient()


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _check_model(settings: Settings, client, name: str, version: str | int | None = None):
    from mlflow.exceptions import MlflowException

    known = {settings.registry.retrieval_model, settings.registry.ranking_model}
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise PromotionError(f"no registered model {name!r} (configured: {', '.join(sorted(known))})") from None
    if version is None:
        return None
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise PromotionError(f"{name} has no version {version} (versions: {versions or 'none'})") from None


def recommender_view(art: Any, settings: Settings) -> Any:
    """A full-catalog ``score(user_idx)`` view of an artifact, built the way serving builds it.

    Retrieval kinds: the evaluator's Recommender view of the artifact. A pointwise ranker cannot
    rank a catalog alone, so it is measured as what serving runs: the current retrieval
    champion's candidates re-ranked by this ranker (candidate and champion rankers therefore
    share the same retrieval stage and differ only in ranking)."""
    try:
        from pipelines import evaluate as ev

        view = getattr(ev, "recommender_from_artifact", None) or getattr(ev, "_recommender_from_artifact", None)
    except ImportError:
        view = None
    model = None
    if view is not None:
        try:
            model = view(art)
        except Exception as exc:  # noqa: BLE001 - not viewable alone: the two-stage view below
            log.debug("evaluator cannot view %s alone (%s)", art.kind, exc)
    if model is None:
        model = art.build()
    if hasattr(model, "score") and _full_catalog(model):
        return model
    return two_stage_view(art, settings)


def _full_catalog(model: Any) -> bool:
    import inspect

    try:
        params = [p for p in inspect.signature(model.score).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return True
    return len(params) == 1


def two_stage_view(ranker_art: Any, settings: Settings, *, retrieval_art: Any = None) -> Any:
    """The ranker behind a retrieval model (default: the retrieval champion), as a full-catalog
    scorer: serving's own two-stage pipeline, through ``models.two_stage``."""
    from models.artifacts import load_from_registry

    reg = settings.registry
    try:
        from models.two_stage import pipeline_from_artifacts, pipeline_recommender
    except ImportError as exc:
        raise PromotionError(f"cannot evaluate a {ranker_art.kind} ranker: models.two_stage has no "
                             f"pipeline_from_artifacts/pipeline_recommender yet ({exc})") from None
    if retrieval_art is None:
        retrieval_art = load_from_registry(f"models:/{reg.retrieval_model}@{reg.champion_alias}", settings)
    pipeline = pipeline_from_artifacts(retrieval_art.build(), ranker_art, n_candidates=settings.serving.candidates)
    view = pipeline_recommender(pipeline)
    feats = pipeline.ranker.features
    view.users, view.items = getattr(view, "users", feats.users), getattr(view, "items", feats.items)
    return view


def load_version(settings: Settings, name: str, version: str) -> tuple[Any, Any]:
    """(full-catalog scorer, artifact) of a registered version, via the loader serving uses."""
    from models.artifacts import load_from_registry

    art = load_from_registry(f"models:/{name}/{version}", settings)
    return recommender_view(art, settings), art


def _id_maps(model: Any, art: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The id maps the scorer's indices refer to (its own, else the artifact's)."""
    from models.base import IdMap

    users = getattr(model, "users", None)
    items = getattr(model, "items", None)
    users = users if isinstance(users, IdMap) else art.users
    items = items if isinstance(items, IdMap) else art.items
    if users is None or items is None:
        raise PromotionError(f"{art.kind} artifact has no user/item id maps: it cannot be evaluated")
    return users.ids, items.ids


def training_window_end(tags: dict[str, str], metadata: dict[str, Any]) -> str | None:
    """Last day of the candidate's training data (version tag, else the artifact's metadata)."""
    end = tags.get(TAG_WINDOW_END)
    window = metadata.get("data_window")
    if not end and isinstance(window, dict):
        end = window.get("end")
    if not end and isinstance(window, str) and ".." in window:  # "first..last" timestamps (pipelines.train)
        end = window.split("..", 1)[1]
    if not end:
        end = metadata.get(TAG_WINDOW_END)
    return str(end)[:10] if end else None


# ---- the gate ----------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Decision:
    """Everything the gate decided, as written to the audit trail."""

    model: str
    version: str
    alias: str
    outcome: str  # promoted | refused | forced
    reason: str
    champion_version: str | None
    eval_set: str
    eval_set_sha256: str
    candidate: dict[str, float]
    champion: dict[str, float] | None
    baseline: dict[str, float]
    checks: list[Check] = field(default_factory=list)
    decided_at: str = ""

    @property
    def promoted(self) -> bool:
        return self.outcome in ("promoted", "forced")

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["promoted"] = self.promoted
        return d


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def evaluate_checks(candidate: dict[str, float], champion: dict[str, float] | None, baseline: dict[str, float],
                    settings: Settings, *, alias: str, training_end: str | None, eval_cutoff: str) -> list[Check]:
    """The gate's checks (pure: metric dicts in, named verdicts out)."""
    reg = settings.registry
    san, g = reg.sanity, reg.guardrails
    pm, k = reg.primary_metric, reg.k
    cov, cal = f"coverage@{k}", f"miscalibration@{k}"
    checks = []
    c_pm = candidate[pm]
    checks.append(Check("sanity.primary_floor", c_pm > san.min_primary, f"{pm} {_fmt(c_pm)} must be > {san.min_primary}"))
    if san.must_beat_popularity:
        checks.append(Check("sanity.beats_popularity", c_pm > baseline[pm],
                            f"{pm} {_fmt(c_pm)} must be > most-popular baseline {_fmt(baseline[pm])}"))
    checks.append(Check("sanity.min_coverage", candidate[cov] >= san.min_coverage,
                        f"{cov} {_fmt(candidate[cov])} must be >= {san.min_coverage}"))
    checks.append(Check("sanity.max_latency", candidate["latency_ms"] <= san.max_latency_ms,
                        f"latency {_fmt(candidate['latency_ms'])} ms must be <= {san.max_latency_ms} ms"))
    if training_end:
        checks.append(Check("sanity.no_leakage", training_end < eval_cutoff,
                            f"training data ends {training_end}, must be before the evaluation window starts {eval_cutoff}"))
    if champion is None:
        return checks
    h_pm = champion[pm]
    need = h_pm * (1 + reg.min_improvement)
    if alias == reg.champion_alias:
        checks.append(Check("primary.beats_champion", c_pm > need,
                            f"{pm} {_fmt(c_pm)} must be > champion {_fmt(h_pm)} x (1 + {reg.min_improvement}) = {_fmt(need)}"))
    floor = champion[cov] * (1 - g.coverage_max_drop)
    checks.append(Check("guardrail.coverage", candidate[cov] >= floor,
                        f"{cov} {_fmt(candidate[cov])} must be >= champion {_fmt(champion[cov])} x (1 - {g.coverage_max_drop}) = {_fmt(floor)}"))
    if cal in candidate and cal in champion:
        ceil = champion[cal] + g.calibration_max_increase
        checks.append(Check("guardrail.calibration", candidate[cal] <= ceil,
                            f"{cal} {_fmt(candidate[cal])} must be <= champion {_fmt(champion[cal])} + {g.calibration_max_increase} = {_fmt(ceil)}"))
    lat = champion["latency_ms"] * g.latency_max_ratio + g.latency_slack_ms
    checks.append(Check("guardrail.latency", candidate["latency_ms"] <= lat,
                        f"latency {_fmt(candidate['latency_ms'])} ms must be <= champion {_fmt(champion['latency_ms'])} ms "
                        f"x {g.latency_max_ratio} + {g.latency_slack_ms} = {_fmt(lat)} ms"))
    return checks


def _headline_keys(metrics: dict[str, float]) -> list[str]:
    """The metrics worth a tag of their own: accuracy@10-style, coverage, calibration, latency."""
    return [k for k in metrics if k.split("@")[0] in ("ndcg", "recall", "coverage", "miscalibration")
            and k.endswith("@10")] + [k for k in ("latency_ms",) if k in metrics]


def _record(client, decision: Decision) -> None:
    """Write the decision to the candidate version's tags and description (the audit trail)."""
    from core.tracking import metric_key

    name, v = decision.model, decision.version
    tags = {
        "gate.outcome": decision.outcome,
        "gate.alias": decision.alias,
        "gate.reason": decision.reason[:4000],
        "gate.decided_at": decision.decided_at,
        "gate.eval_set": decision.eval_set,
        "gate.eval_set_sha256": decision.eval_set_sha256,
        "gate.champion_version": decision.champion_version or "none",
        "gate.failed_checks": ",".join(c.name for c in decision.failed()) or "none",
    }
    # headline metrics as searchable tags; the full sets as one JSON tag each (one write per tag)
    reg_keys = _headline_keys(decision.candidate)
    for prefix, metrics in (("gate.candidate", decision.candidate), ("gate.champion", decision.champion or {})):
        for key in reg_keys:
            if key in metrics:
                tags[f"{prefix}.{metric_key(key)}"] = f"{metrics[key]:.6g}"
        if metrics:
            tags[f"{prefix}_metrics"] = json.dumps({k: round(v, 6) for k, v in sorted(metrics.items())})[:4900]
    for key, value in tags.items():
        client.set_model_version_tag(name, v, key, value)
    lines = [f"[{decision.decided_at}] gate -> {decision.outcome.upper()} as '{decision.alias}'",
             f"  reason: {decision.reason}",
             f"  eval set {decision.eval_set} (sha256 {decision.eval_set_sha256[:16]}...), "
             f"champion: {decision.champion_version or 'none'}"]
    for c in decision.checks:
        lines.append(f"  [{'PASS' if c.passed else 'FAIL'}] {c.name}: {c.detail}")
    pm_keys = sorted(decision.candidate)
    lines.append("  metrics (candidate | champion): " + "; ".join(
        f"{m} {_fmt(decision.candidate.get(m))} | {_fmt((decision.champion or {}).get(m))}" for m in pm_keys))
    old = client.get_model_version(name, v).description or ""
    client.update_model_version(name, v, description=(old + "\n\n" if old else "") + "\n".join(lines))


def _history(client, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    raw = tags.get(HISTORY_TAG, "")
    return [x for x in raw.split(",") if x]


def _set_history(client, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[-200:]))


def _apply_alias(client, settings: Settings, name: str, version: str, alias: str) -> None:
    reg = settings.registry
    if alias != reg.champion_alias:
        client.set_registered_model_alias(name, alias, version)
        return
    current = _alias_version(client, name, reg.champion_alias)
    if current == version:
        return
    history = _history(client, name)
    if current is not None:
        client.set_registered_model_alias(name, reg.previous_alias, current)
        if not history or history[-1] != current:
            history.append(current)
    client.set_registered_model_alias(name, reg.champion_alias, version)
    history.append(version)
    _set_history(client, name, history)
    if _alias_version(client, name, reg.challenger_alias) == version:
        client.delete_registered_model_alias(name, reg.challenger_alias)


def promote(
    name: str,
    version: int | str,
    *,
    settings: Settings,
    alias: str | None = None,
    force: bool = False,
    reason: str | None = None,
    eval_set: str | None = None,
) -> Decision:
    """Run the gate for ``name`` version ``version`` and move ``alias`` (default ``champion``).

    Raises :class:`PromotionRefused` (with the decision) when a check fails and ``force`` is
    off; the refusal is recorded in the version's tags/description all the same."""
    reg = settings.registry
    alias = alias or reg.champion_alias
    if alias not in (reg.champion_alias, reg.challenger_alias):
        raise PromotionError(f"alias {alias!r}: promote to {reg.champion_alias!r} or {reg.challenger_alias!r} "
                             f"({reg.previous_alias!r} is kept by promote/rollback)")
    if force and not (reason and reason.strip()):
        raise PromotionError("--force needs --reason: a forced promotion must say why in the audit trail")
    version = str(version)
    client = _client(settings)
    mv = _check_model(settings, client, name, version)
    champion_v = _alias_version(client, name, reg.champion_alias)
    if champion_v == version and alias == reg.champion_alias:
        raise PromotionError(f"{name} version {version} is already the {reg.champion_alias}")
    cand_model, art_c = load_version(settings, name, version)
    training_end = training_window_end(mv.tags, art_c.metadata)
    es = eval_set_for(settings, explicit=eval_set or mv.tags.get(TAG_EVAL_SET), training_end=training_end)
    space = _space(es)
    candidate = measure(cand_model, *_id_maps(cand_model, art_c), es, settings, space=space)
    champion = None
    if champion_v is not None:
        champ_model, art_h = load_version(settings, name, champion_v)
        champion = measure(champ_model, *_id_maps(champ_model, art_h), es, settings, space=space)
    baseline = popularity_baseline(es, settings, space=space)
    checks = evaluate_checks(candidate, champion, baseline, settings, alias=alias,
                             training_end=training_end, eval_cutoff=es.cutoff)
    failed = [c for c in checks if not c.passed]
    if failed and not force:
        outcome = "refused"
        why = "; ".join(f"{c.name} failed: {c.detail}" for c in failed)
    elif force:
        outcome = "forced"
        why = f"forced by operator: {reason}" + (f" (overriding: {', '.join(c.name for c in failed)})" if failed else "")
    else:
        outcome = "promoted"
        pm = reg.primary_metric
        why = (f"first {alias}: passed every sanity check ({pm} {_fmt(candidate[pm])})" if champion is None else
               f"{pm} {_fmt(candidate[pm])} beats champion v{champion_v} {_fmt(champion[pm])} and no guardrail regressed"
               if alias == reg.champion_alias else f"passed sanity checks and guardrails against champion v{champion_v}")
        if reason:
            why += f"; note: {reason}"
    decision = Decision(name, version, alias, outcome, why, champion_v, es.version, es.sha256, candidate, champion,
                        baseline, checks, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _record(client, decision)
    if outcome == "refused":
        raise PromotionRefused(f"{name} v{version} refused as {alias}: {why}", decision)
    _apply_alias(client, settings, name, version, alias)
    return decision


def rollback(name: str, *, settings: Settings, reason: str | None = None) -> dict[str, str | None]:
    """Move ``champion`` back to the previous champion; the one before that becomes ``previous_champion``."""
    reg = settings.registry
    client = _client(settings)
    _check_model(settings, client, name)
    current = _alias_version(client, name, reg.champion_alias)
    previous = _alias_version(client, name, reg.previous_alias)
    if current is None:
        raise PromotionError(f"{name} has no {reg.champion_alias}: nothing to roll back")
    if previous is None:
        raise PromotionError(f"{name} has no {reg.previous_alias}: v{current} is the only champion there has been")
    history = _history(client, name)
    if history and history[-1] == current:
        history.pop()
    if history and history[-1] == previous:
        pass
    else:
        history.append(previous)
    client.set_registered_model_alias(name, reg.champion_alias, previous)
    earlier = [v for v in history[:-1] if v not in (previous, current)]
    if earlier:
        client.set_registered_model_alias(name, reg.previous_alias, earlier[-1])
    else:
        client.delete_registered_model_alias(name, reg.previous_alias)
    _set_history(client, name, history)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    note = f"[{when}] rolled back: {reg.champion_alias} moved from v{current} to v{previous}" + (f" ({reason})" if reason else "")
    client.set_model_version_tag(name, current, "gate.rolled_back_at", when)
    old = client.get_model_version(name, current).description or ""
    client.update_model_version(name, current, description=(old + "\n\n" if old else "") + note)
    return {"model": name, "champion": previous, "previous_champion": earlier[-1] if earlier else None, "demoted": current}


# ---- listing -----------------------------------------------------------------------------------
def list_versions(settings: Settings, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Every registered version of the configured models with aliases, key metrics, data window,
    git commit and creation time (metrics from the training run, else from the gate's tags)."""
    from mlflow.exceptions import MlflowException

    from core.tracking import metric_key

    reg = settings.registry
    client = _client(settings)
    names = names or [reg.retrieval_model, reg.ranking_model]
    keys = [reg.primary_metric, f"recall@{reg.k}", f"coverage@{reg.k}"]
    rows = []
    for name in names:
        try:
            versions = client.search_model_versions(f"name='{name}'")
            by_version: dict[str, list[str]] = {}
            for alias, v in (client.get_registered_model(name).aliases or {}).items():
                by_version.setdefault(str(v), []).append(alias)
        except MlflowException:
            continue
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            run_metrics: dict[str, float] = {}
            run_tags: dict[str, str] = {}
            if mv.run_id:
                try:
                    run = client.get_run(mv.run_id)
                    run_metrics, run_tags = run.data.metrics, run.data.tags
                except MlflowException:
                    pass
            metrics = {}
            for m in keys:
                mk = metric_key(m)
                # the gate's numbers first: measured on a frozen set, so comparable across versions
                val = float(mv.tags[f"gate.candidate.{mk}"]) if f"gate.candidate.{mk}" in mv.tags else None
                for key in (f"gate_{mk}", mk, f"two_stage_{mk}"):
                    if val is None:
                        val = run_metrics.get(key)
                metrics[m] = val
            tags = {**run_tags, **mv.tags}
            rows.append({
                "model": name,
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "metrics": metrics,
                "data_window": f"{tags.get(TAG_WINDOW_START, '?')} .. {tags.get(TAG_WINDOW_END, '?')}"
                if (TAG_WINDOW_START in tags or TAG_WINDOW_END in tags) else "",
                "git_commit": (tags.get(TAG_GIT) or tags.get("mlflow.source.git.commit") or "")[:12],
                "created_at": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "gate": mv.tags.get("gate.outcome", ""),
            })
    return rows


# ---- demo --------------------------------------------------------------------------------------
def step_promote(settings: Settings, state: Any) -> str:
    """Demo: put every registered model's newest version through the gate and show the decision."""
    reg = settings.registry
    client = _client(settings)
    out = []
    for name in (reg.retrieval_model, reg.ranking_model):
        try:
            versions = client.search_model_versions(f"name='{name}'")
        except Exception:  # noqa: BLE001 - a model the demo did not train is reported, not fatal
            versions = []
        if not versions:
            out.append(f"{name}: no registered version")
            continue
        newest = str(max(int(v.version) for v in versions))
        if _alias_version(client, name, reg.champion_alias) == newest:
            out.append(f"{name} v{newest}: already champion")
            continue
        try:
            d = promote(name, newest, settings=settings)
            out.append(f"{name} v{newest}: {d.outcome} ({reg.primary_metric} {_fmt(d.candidate[reg.primary_metric])})")
        except PromotionRefused as exc:
            d = exc.decision
            out.append(f"{name} v{newest}: refused ({', '.join(c.name for c in d.failed())})")
        state.values.setdefault("promotions", {})[name] = d.as_dict()
    return "; ".join(out)
