"""``recsys up``/``down`` bookkeeping without starting Airflow: the environment every component
gets, and stopping a real process tree (including a child that left the session) by pid file."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipelines import cli_up as U


def test_airflow_env_binds_loopback_and_shares_secrets(settings):
    env = U.airflow_env(settings)
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__API__BASE_URL"].startswith("http://127.0.0.1:")
    assert env["AIRFLOW__CORE__PARALLELISM"] == "4"
    assert env["AIRFLOW_HOME"] == str(settings.paths.root / "var" / "airflow")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(U.DAGS_FOLDER) and (U.DAGS_FOLDER / "training_pipeline.py").is_file()
    assert env["RECSYS_PATHS__ROOT"] == str(settings.paths.root)
    # secrets are made once and reused by every component (JWTs must verify across processes)
    assert U.airflow_env(settings)["AIRFLOW__API_AUTH__JWT_SECRET"] == env["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert oct((U.airflow_home(settings) / "secrets.json").stat().st_mode & 0o777) == "0o600"
    user, pw = U.airflow_login(settings)
    assert user == "admin" and len(pw) >= 12 and U.airflow_login(settings) == (user, pw)
    cmds = {c.name: c.argv for c in U.components(settings)}
    assert "--skip-serve-logs" in cmds["airflow-scheduler"]
    assert cmds["airflow-log-server"][cmds["airflow-log-server"].index("--host") + 1] == "127.0.0.1"
    assert cmds["mlflow"][cmds["mlflow"].index("--workers") + 1] == "1"
    assert "standalone" not in " ".join(" ".join(a) for a in cmds.values())


SCRIPT = r"""
import os, subprocess, sys, time
# a child in the same session, and a grandchild that escapes it with setsid and ignores SIGTERM
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
subprocess.Popen([sys.executable, "-c",
    "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
signal_ignored = __import__("signal").signal(__import__("signal").SIGINT, __import__("signal").SIG_IGN)
time.sleep(300)
"""


def test_down_stops_the_whole_tree_even_escaped_children(settings, monkeypatch):
    run = U.run_dir(settings)
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], start_new_session=True)
    try:
        (run / "fake.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 20
        while len(U.process_tree(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = U.process_tree(proc.pid)
        assert len(tree) == 3, tree
        survivors = U._stop_one(settings, "fake", grace_s=2.0)
        proc.wait(timeout=5)
        assert survivors == []
        assert not any(U._alive(p) for p in tree)
        assert not (run / "fake.pid").exists()
    finally:
        for p in U.process_tree(proc.pid):
            try:
                __import__("os").kill(p, 9)
            except OSError:
                pass


def test_down_with_nothing_running_is_a_no_op(settings):
    assert U.down(settings, echo=lambda m: None) == {}
    assert U.status(settings).pids == {}


def test_up_refuses_a_port_in_use(settings):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        busy = settings.model_copy(deep=True)
        object.__setattr__(busy, "orchestration", U.OrchestrationSettings(mlflow_port=port))
        with pytest.raises(U.StackError, match=f"mlflow: port 127.0.0.1:{port} is already in use"):
            U.up(busy, wait=False, echo=lambda m: None)
        assert U.status(busy).pids == {}
    finally:
        s.close()


@pytest.mark.integration
@pytest.mark.slow
def test_airflow_metadata_db_on_fresh_postgres(settings):
    """Production config: the Airflow metadata DB on PostgreSQL (migrate, parse the DAGs, list them)."""
    import json
    import os

    psycopg = pytest.importorskip("psycopg")
    import uuid

    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
    name = f"recsys_test_af_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        pg = settings.model_copy(deep=True)
        object.__setattr__(pg, "orchestration", U.OrchestrationSettings(
            airflow_db_uri=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"))
        env = {**os.environ, **U.airflow_env(pg)}
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        af = U._bin("airflow")
        for args in (["db", "migrate"], ["dags", "reserialize"]):
            r = subprocess.run([af, *args], env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
        r = subprocess.run([af, "dags", "list", "-o", "json"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        listed = {d["dag_id"] for d in json.loads(r.stdout[r.stdout.index("[{"):])}
        assert {"training_pipeline", "feature_materialization"} <= listed
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
