"""MLflow stores for the registry tests: a migrated SQLite template (fast tests), and the
production configuration's PostgreSQL backend exercised for real.

Creating an MLflow SQLite store runs every schema migration (~15 s here), so
:func:`mlflow_sqlite_template` migrates one empty store per session and tests copy the file
(a SQLite database holds no absolute paths). Other test modules import it from here.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

_TEMPLATE: dict[str, Path] = {}


def mlflow_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of an empty, fully migrated MLflow SQLite store (made once per session)."""
    if "db" not in _TEMPLATE:
        import mlflow

        folder = tmp_path_factory.mktemp("mlflow-template")
        db = folder / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}").search_experiments()
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}").search_registered_models()
        _TEMPLATE["db"] = db
    return _TEMPLATE["db"]


def use_template(settings, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Copy the migrated template to where ``settings`` keeps its MLflow SQLite store."""
    uri = settings.mlflow.tracking_uri
    assert uri.startswith("sqlite:///"), uri
    dest = Path(uri[len("sqlite:///"):])
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mlflow_sqlite_template(tmp_path_factory), dest)


# ---- PostgreSQL (production metadata store) ----------------------------------------------------
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def fresh_postgres_db():
    """A new, uniquely named PostgreSQL database, dropped afterwards; skips if no server."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    name = f"recsys_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        from sqlalchemy.engine import create_engine  # noqa: F401 - ensure pooled engines can be disposed

        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_registry_on_fresh_postgres(fresh_postgres_db, tmp_path):
    """The production profile's metadata store: runs, registered versions, aliases and tags on
    PostgreSQL (artifacts stay on the local/object store)."""
    import mlflow

    from core.config import load_settings
    from core.tracking import configure_mlflow

    s = load_settings(root=tmp_path, environ={}, overrides={
        "environment": "test", "mlflow": {"tracking_uri": fresh_postgres_db}})
    configure_mlflow(s)
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_metric("ndcg_at_10", 0.25)
        mlflow.log_text("model bytes", "model/weights.txt")
    client.create_registered_model("two_tower")
    mv = client.create_model_version("two_tower", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("two_tower", "champion", mv.version)
    client.set_model_version_tag("two_tower", mv.version, "gate.outcome", "promoted")

    # a second client (another process in production) sees the same registry state
    other = mlflow.MlflowClient(tracking_uri=fresh_postgres_db, registry_uri=fresh_postgres_db)
    got = other.get_model_version_by_alias("two_tower", "champion")
    assert got.version == mv.version and got.tags["gate.outcome"] == "promoted"
    assert other.get_run(run.info.run_id).data.metrics["ndcg_at_10"] == 0.25
    from sqlalchemy import create_engine, text

    eng = create_engine(fresh_postgres_db)
    with eng.connect() as con:
        assert con.execute(text("SELECT count(*) FROM registered_model_aliases")).scalar() == 1
    eng.dispose()
