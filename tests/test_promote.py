"""The promotion gate against a real MLflow registry (SQLite in a temp folder) with real models.

Candidates are real baselines fitted on a tiny synthetic lake (EASE = good, most-popular =
weak, EASE with a crippled catalog = coverage regression), saved as self-describing artifacts
and registered through ``models.artifacts.log_artifact_model``: the same path trained models take.
"""
from __future__ import annotations

from datetime import date

import numpy as np
import pytest

from pipelines import promote as P
from test_infra_mlflow import use_template

KIND = "test_item_item"


class _ItemItemScorer:
    """score(u) = history(u) @ B + bias: EASE (B), most-popular (bias only), in one servable."""

    def __init__(self, art):
        import scipy.sparse as sp

        a = art.arrays
        self.x = sp.csr_matrix((a["x_data"], a["x_indices"], a["x_indptr"]), shape=tuple(a["x_shape"]))
        self.b = a.get("b")
        self.bias = a["bias"]

    def score(self, user_idx):
        out = np.tile(self.bias.astype(np.float64), (len(user_idx), 1))
        if self.b is not None and self.b.size:
            out += np.asarray(self.x[np.asarray(user_idx)] @ self.b, dtype=np.float64)
        return out


def _register_kind():
    from pydantic import BaseModel

    from models.artifacts import register_kind

    class Cfg(BaseModel):
        name: str

    register_kind(KIND, config_cls=Cfg, builder=_ItemItemScorer)


def _artifact(kind_name, data, *, b=None, bias=None, window_end="2024-01-10"):
    from models.artifacts import Artifact

    x = data.csr()
    arrays = {"x_data": x.data, "x_indices": x.indices, "x_indptr": x.indptr, "x_shape": np.array(x.shape),
              "bias": np.zeros(data.n_items) if bias is None else bias}
    if b is not None:
        arrays["b"] = b
    return Artifact(kind=KIND, config={"name": kind_name}, users=data.users, items=data.items, arrays=arrays,
                    metadata={"data_window": {"start": "2024-01-01", "end": window_end}})


def _register(settings, name, art):
    import mlflow

    from core.tracking import configure_mlflow
    from models.artifacts import log_artifact_model

    configure_mlflow(settings)
    with mlflow.start_run():
        info = log_artifact_model(art, name="model", registered_model_name=name)
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A lake of 14 synthetic days (no taste shift: on shifted data most-popular wins, which is
    its own, separately tested story), a frozen eval set (last 4 days), and fitted baselines."""
    from core.config import load_settings
    from core.synthetic import generate
    from models.base import InteractionData
    from models.baselines import EASE, MostPopular
    from pipelines.ingest import ingest

    _register_kind()
    root = tmp_path_factory.mktemp("promote")
    settings = load_settings(root=root, environ={}, overrides={
        "environment": "test", "registry": {"eval_test_days": 4, "latency_repeats": 3}})
    use_template(settings, tmp_path_factory)
    ingest("synthetic", settings=settings, dataset=generate(n_users=300, n_items=150, n_events=12_000, n_days=14, seed=7))
    es = P.freeze_eval_set(settings)
    train = InteractionData.from_frame(es.history)
    ease = EASE(lam=50.0).fit(train)
    pop = MostPopular().fit(train)
    # EASE restricted to a sixth of the catalog: accurate on popular items, but coverage collapses
    keep = np.argsort(-pop._pop)[: max(2, train.n_items // 6)]
    b_narrow = np.zeros_like(ease._b)
    b_narrow[:, keep] = ease._b[:, keep]
    bias_narrow = np.full(train.n_items, -1e6)
    bias_narrow[keep] = 0.0
    return {
        "settings": settings, "es": es,
        "good": _artifact("ease", train, b=ease._b),
        "weak": _artifact("pop", train, bias=pop._pop),
        "narrow": _artifact("ease_narrow", train, b=b_narrow, bias=bias_narrow),
        "leaky": _artifact("ease_leaky", train, b=ease._b, window_end="2024-01-14"),
    }


def test_force_without_reason_is_an_error(settings):
    with pytest.raises(P.PromotionError, match="--force needs --reason"):
        P.promote("two_tower", 1, settings=settings, force=True)
    with pytest.raises(P.PromotionError, match="--force needs --reason"):
        P.promote("two_tower", 1, settings=settings, force=True, reason="   ")


def test_unknown_alias_and_model_are_named(world):
    s = world["settings"]
    with pytest.raises(P.PromotionError, match="alias 'production'"):
        P.promote("two_tower", 1, settings=s, alias="production")
    with pytest.raises(P.PromotionError, match="no registered model 'nope'"):
        P.promote("nope", 1, settings=s)


def test_eval_set_is_frozen_versioned_and_verified(world):
    s, es = world["settings"], world["es"]
    assert es.cutoff == "2024-01-11" and es.end == "2024-01-14"
    again = P.freeze_eval_set(s)
    assert again.version == es.version and again.sha256 == es.sha256  # idempotent
    assert set(es.test["user_id"]) <= set(es.history["user_id"])
    assert P.load_eval_set(s).version == es.version


def test_tampered_eval_set_is_refused(world, tmp_path):
    import shutil

    from core.schemas import DataError

    s, es = world["settings"], world["es"]
    copy = P.eval_set_root(s) / "tampered"
    shutil.copytree(es.folder, copy)
    (copy / "test.parquet").write_bytes((copy / "test.parquet").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="test.parquet does not match its recorded SHA-256"):
        P.load_eval_set(s, "tampered")


@pytest.mark.slow
def test_gate_promotes_refuses_forces_and_rolls_back(world):
    import mlflow

    s = world["settings"]
    name = s.registry.retrieval_model
    client = P._client(s)

    # 1. no champion: a candidate that fails an absolute sanity check (no better than popularity) is refused
    v_weak = _register(s, name, world["weak"])
    with pytest.raises(P.PromotionRefused, match="sanity.beats_popularity failed") as exc:
        P.promote(name, v_weak, settings=s)
    assert not exc.value.decision.promoted
    assert P._alias_version(client, name, "champion") is None
    tags = client.get_model_version(name, v_weak).tags
    assert tags["gate.outcome"] == "refused" and "sanity.beats_popularity" in tags["gate.failed_checks"]

    # 2. first good candidate becomes champion on absolute checks
    v_good = _register(s, name, world["good"])
    d = P.promote(name, v_good, settings=s)
    assert d.outcome == "promoted" and d.champion is None
    assert P._alias_version(client, name, "champion") == v_good
    mv = client.get_model_version(name, v_good)
    assert mv.tags["gate.eval_set"] == world["es"].version
    assert mv.tags["gate.eval_set_sha256"] == world["es"].sha256
    assert float(mv.tags["gate.candidate.ndcg_at_10"]) == pytest.approx(d.candidate["ndcg@10"], rel=1e-5)
    assert "PROMOTED" in mv.description and "[PASS] sanity.beats_popularity" in mv.description

    # 3. a worse candidate is refused, naming the failed check; champion unchanged; both metric sets recorded
    v_worse = _register(s, name, world["weak"])
    with pytest.raises(P.PromotionRefused) as exc:
        P.promote(name, v_worse, settings=s)
    msg = str(exc.value)
    assert "primary.beats_champion failed" in msg and f"champion {exc.value.decision.champion['ndcg@10']:.4g}" in msg
    assert P._alias_version(client, name, "champion") == v_good
    tags = client.get_model_version(name, v_worse).tags
    assert tags["gate.champion_version"] == v_good and "gate.champion.ndcg_at_10" in tags

    # 4. an identical model does not beat the champion by the margin either
    v_same = _register(s, name, world["good"])
    with pytest.raises(P.PromotionRefused, match="primary.beats_champion"):
        P.promote(name, v_same, settings=s)

    # 5. the guardrail: accurate but collapsed coverage is refused by guardrail.coverage
    v_narrow = _register(s, name, world["narrow"])
    with pytest.raises(P.PromotionRefused, match="guardrail.coverage failed"):
        P.promote(name, v_narrow, settings=s)

    # 6. leakage: trained on the evaluation window
    v_leaky = _register(s, name, world["leaky"])
    with pytest.raises(P.PromotionRefused, match="sanity.no_leakage failed"):
        P.promote(name, v_leaky, settings=s)

    # 7. force with a reason overrides, keeps the old champion as previous_champion, and says so
    d = P.promote(name, v_same, settings=s, force=True, reason="hotfix: same weights, new build")
    assert d.outcome == "forced" and "hotfix" in d.reason and "primary.beats_champion" in d.reason
    assert P._alias_version(client, name, "champion") == v_same
    assert P._alias_version(client, name, "previous_champion") == v_good
    assert client.get_model_version(name, v_same).tags["gate.outcome"] == "forced"

    # 8. challenger for A/B: guardrails only (not required to win on the primary metric)
    d = P.promote(name, v_good, settings=s, alias="challenger")
    assert d.outcome == "promoted" and P._alias_version(client, name, "challenger") == v_good

    # 9. rollback restores the previous champion
    r = P.rollback(name, settings=s, reason="bad A/B")
    assert r == {"model": name, "champion": v_good, "previous_champion": None, "demoted": v_same}
    assert P._alias_version(client, name, "champion") == v_good
    assert "rolled back" in client.get_model_version(name, v_same).description
    with pytest.raises(P.PromotionError, match="no previous_champion"):
        P.rollback(name, settings=s)

    # the listing shows versions, aliases and the gate's metrics
    rows = P.list_versions(s, [name])
    by_v = {r["version"]: r for r in rows}
    assert "champion" in by_v[v_good]["aliases"]
    assert by_v[v_good]["metrics"]["ndcg@10"] > by_v[v_weak]["metrics"]["ndcg@10"]
    assert by_v[v_good]["data_window"] == ""
    assert mlflow.get_tracking_uri().startswith("sqlite:")


def test_checks_are_pure_and_name_the_tolerance(settings):
    base = {"ndcg@10": 0.1, "coverage@10": 0.5, "miscalibration@10": 0.3, "latency_ms": 1.0}
    champ = {"ndcg@10": 0.2, "coverage@10": 0.5, "miscalibration@10": 0.3, "latency_ms": 1.0}
    cand = {"ndcg@10": 0.25, "coverage@10": 0.5, "miscalibration@10": 0.4, "latency_ms": 1.0}
    checks = {c.name: c for c in P.evaluate_checks(cand, champ, base, settings, alias="champion",
                                                   training_end="2024-01-10", eval_cutoff="2024-01-11")}
    assert checks["primary.beats_champion"].passed
    assert not checks["guardrail.calibration"].passed and "+ 0.05" in checks["guardrail.calibration"].detail
    slow = dict(cand, **{"miscalibration@10": 0.3, "latency_ms": 10.0})
    checks = {c.name: c for c in P.evaluate_checks(slow, champ, base, settings, alias="champion",
                                                   training_end=None, eval_cutoff="2024-01-11")}
    assert not checks["guardrail.latency"].passed and "sanity.no_leakage" not in checks


@pytest.mark.slow
def test_cli_list_promote_refusal_and_force_rules(world, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from pipelines import cli_models

    s = world["settings"]
    name = s.registry.retrieval_model
    v = _register(s, name, world["weak"])
    app = typer.Typer()
    app.add_typer(cli_models.app, name="models")
    app.command("promote")(cli_models.promote_command)
    app.command("rollback")(cli_models.rollback_command)
    monkeypatch.setenv("RECSYS_PATHS__ROOT", str(s.paths.root))
    monkeypatch.setenv("RECSYS_REGISTRY__EVAL_TEST_DAYS", "4")
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    res = runner.invoke(app, ["promote", name, "--version", v])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "REFUSED" in res.output and "sanity.beats_popularity" in res.output
    res = runner.invoke(app, ["promote", name, "--version", v, "--force"])
    assert res.exit_code == 2 and "--force needs --reason" in res.output
    res = runner.invoke(app, ["models", "list", name, "--json"])
    assert res.exit_code == 0, res.output
    assert any(r["version"] == v and r["gate"] == "refused" for r in __import__("json").loads(res.output))
    res = runner.invoke(app, ["models", "list"])
    assert res.exit_code == 0 and "refused" in res.output


def test_eval_set_follows_the_candidates_training_window(world):
    """A model trained outside the DAG is judged on the days after its training data."""
    s, es = world["settings"], world["es"]
    later = P.eval_set_for(s, explicit=None, training_end="2024-01-08")
    assert (later.cutoff, later.end) == ("2024-01-09", "2024-01-14")
    assert P.eval_set_for(s, explicit=None, training_end="2024-01-10").version == es.version
    assert P.eval_set_for(s, explicit=es.version, training_end="2024-01-12").version == es.version
    # trained through the lake's end: nothing unseen is left; the latest set (and the leakage check) decide
    assert P.eval_set_for(s, explicit=None, training_end="2024-01-14").version == es.version
    assert P.training_window_end({}, {"data_window": "2024-01-01T00:00:00+00:00..2024-01-10T23:59:00+00:00"}) == "2024-01-10"
    assert P.training_window_end({"data_window_end": "2024-01-05"}, {"data_window": {"end": "2024-01-09"}}) == "2024-01-05"


@pytest.mark.slow
def test_demo_step_gates_the_newest_versions(world):
    from pipelines.demo import DemoState

    s = world["settings"]
    v = _register(s, s.registry.retrieval_model, world["weak"])
    state = DemoState()
    line = P.step_promote(s, state)
    assert f"two_tower v{v}: refused (" in line and "sanity.beats_popularity" in line
    assert "ranker: no registered version" in line
    assert state.values["promotions"]["two_tower"]["outcome"] == "refused"
