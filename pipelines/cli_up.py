"""``recsys up`` / ``recsys down``: the local Airflow + MLflow stack, bound to loopback.

Why not ``airflow standalone``: it ignores SIGINT and a SIGTERM to it leaves its children
running, so nothing could stop it reliably. Here every component is started as its own
process *session* (``start_new_session=True``) with a pid file in ``var/run/``; ``down``
terminates each session's whole process tree (SIGTERM, then SIGKILL after a grace period) and
verifies nothing of it is left.

Components: Airflow ``api-server`` (UI + REST + execution API), ``scheduler`` (LocalExecutor,
``AIRFLOW__CORE__PARALLELISM``), ``dag-processor``, the task log server, and ``mlflow server
--workers 1`` on ``settings.mlflow.tracking_uri``. The scheduler's built-in log server binds
every interface (``host=""`` in ``airflow.utils.serve_logs``, not configurable), so the
scheduler runs with ``--skip-serve-logs`` and the same FastAPI app is served by uvicorn on
``127.0.0.1`` instead.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from core.config import Settings
from pipelines.settings import OrchestrationSettings


#: The DAG files shipped with this code (not under ``paths.root``, which may be a data folder).
DAGS_FOLDER = Path(__file__).resolve().parents[1] / "dags"


class StackError(RuntimeError):
    """A component could not be started or stopped; the message names it and its log file."""


def orchestration(settings: Settings) -> OrchestrationSettings:
    """The ``orchestration`` section (defaults until ``core.config.Settings`` declares it)."""
    return getattr(settings, "orchestration", None) or OrchestrationSettings()


def _abs(settings: Settings, p: Path) -> Path:
    return p if p.is_absolute() else settings.paths.root / p


@dataclass
class Component:
    """One long-running process of the stack."""

    name: str
    argv: list[str]
    port: int | None = None
    health_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def _bin(name: str) -> str:
    """The console script beside this interpreter (the venv's), else on PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise StackError(f"'{name}' is not installed in this environment (run `make setup`)")
    return found


def airflow_home(settings: Settings) -> Path:
    return _abs(settings, orchestration(settings).airflow_home)


def _secrets(home: Path) -> dict[str, str]:
    """Secrets every Airflow component must share (JWT, Fernet, session key), made once, mode 0600."""
    path = home / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    import base64

    data = {
        "jwt_secret": secrets.token_urlsafe(32),
        "fernet_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "secret_key": secrets.token_urlsafe(32),
    }
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    return data


def passwords_file(settings: Settings) -> Path:
    return airflow_home(settings) / "simple_auth_manager_passwords.json"


def airflow_login(settings: Settings) -> tuple[str, str]:
    """The simple auth manager's user and password (a random password, made once, mode 0600)."""
    orch = orchestration(settings)
    path = passwords_file(settings)
    users: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    if orch.airflow_user not in users:
        users[orch.airflow_user] = secrets.token_urlsafe(12)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(users, fh)
    return orch.airflow_user, users[orch.airflow_user]


def airflow_env(settings: Settings, *, home: Path | None = None) -> dict[str, str]:
    """Environment for every Airflow process (and for tests running DAGs): home, DAGs folder,
    loopback URLs, metadata DB, shared secrets, and the project root the tasks load settings from."""
    orch = orchestration(settings)
    home = home or airflow_home(settings)
    sec = _secrets(home)
    base = f"http://{orch.host}:{orch.airflow_port}"
    db = orch.airflow_db_uri or f"sqlite:///{home / 'airflow.db'}"
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(orch.parallelism),
        "AIRFLOW__CORE__FERNET_KEY": sec["fernet_key"],
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{orch.airflow_user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(settings)),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
        "AIRFLOW__API__HOST": orch.host,
        "AIRFLOW__API__PORT": str(orch.airflow_port),
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API__SECRET_KEY": sec["secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": sec["jwt_secret"],
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(orch.log_server_port),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "RECSYS_PATHS__ROOT": str(settings.paths.root),
        "RECSYS_MLFLOW__TRACKING_URI": settings.mlflow.tracking_uri,
        "RECSYS_MLFLOW__ARTIFACT_ROOT": str(settings.mlflow.artifact_root),
    }
    if db.startswith("postgresql+psycopg://"):
        # Airflow 3 also opens an async engine; without this it derives an asyncpg URL (not installed)
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = db
    return env


def components(settings: Settings) -> list[Component]:
    """The stack's processes, in start order."""
    orch = orchestration(settings)
    env = airflow_env(settings)
    af = _bin("airflow")
    host = orch.host
    mlflow_cmd = [
        _bin("mlflow"), "server", "--host", host, "--port", str(orch.mlflow_port), "--workers", "1",
        "--backend-store-uri", settings.mlflow.tracking_uri,
        "--default-artifact-root", settings.mlflow.artifact_root.as_uri(),
    ]
    if settings.mlflow.registry_uri:
        mlflow_cmd += ["--registry-store-uri", settings.mlflow.registry_uri]
    return [
        # MLflow's async job runner (GenAI evaluation/optimisation jobs) starts 7 huey consumers:
        # nothing here uses it, and on a 2-core laptop it is pure overhead.
        Component("mlflow", mlflow_cmd, orch.mlflow_port, f"http://{host}:{orch.mlflow_port}/health",
                  {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
        Component("airflow-api-server", [af, "api-server", "--host", host, "--port", str(orch.airflow_port), "--workers", "1"],
                  orch.airflow_port, f"http://{host}:{orch.airflow_port}/api/v2/monitor/health", env),
        Component("airflow-scheduler", [af, "scheduler", "--skip-serve-logs"], None, None, env),
        Component("airflow-dag-processor", [af, "dag-processor"], None, None, env),
        Component("airflow-log-server", [_bin("uvicorn"), "airflow.utils.serve_logs.log_server:get_app", "--factory",
                                         "--host", host, "--port", str(orch.log_server_port), "--log-level", "warning"],
                  orch.log_server_port, None, env),
    ]


# ---- process bookkeeping ---------------------------------------------------------------------
def run_dir(settings: Settings) -> Path:
    return settings.paths.run_dir


def _pid_file(settings: Settings, name: str) -> Path:
    return run_dir(settings) / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return run_dir(settings) / f"{name}.log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) for every live process (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        out[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid``, every descendant, and every process of its session (a child that re-parented
    to init is still in the session unless it called setsid; one that did is still a descendant
    while its parent lives, which is why both are collected)."""
    table = _proc_table()
    found = {p for p, (_, sid) in table.items() if sid == pid}
    if pid in table:
        found.add(pid)
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for p, (ppid, _) in table.items():
            if ppid == parent and p not in found:
                found.add(p)
                frontier.append(p)
    return sorted(found)


def _read_pid(settings: Settings, name: str) -> int | None:
    path = _pid_file(settings, name)
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class StackStatus:
    urls: dict[str, str]
    login: tuple[str, str]
    pids: dict[str, int]


def migrate_airflow_db(settings: Settings) -> None:
    """``airflow db migrate`` (idempotent) with the stack's environment."""
    env = {**os.environ, **airflow_env(settings)}
    log = _log_file(settings, "airflow-db-migrate")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.run([_bin("airflow"), "db", "migrate"], env=env, stdout=fh, stderr=subprocess.STDOUT,
                            cwd=settings.paths.root, timeout=600).returncode
    if rc != 0:
        raise StackError(f"airflow db migrate failed (exit {rc}); see {log}")


def up(settings: Settings, *, wait: bool = True, echo=print) -> StackStatus:
    """Start every component not already running; wait until both UIs answer their health checks."""
    orch = orchestration(settings)
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    comps = components(settings)
    airflow_login(settings)
    todo = []
    for comp in comps:
        pid = _read_pid(settings, comp.name)
        if pid and _alive(pid):
            echo(f"{comp.name}: already running (pid {pid})")
            continue
        if comp.port is not None and not _port_free(orch.host, comp.port):
            raise StackError(f"{comp.name}: port {orch.host}:{comp.port} is already in use by another program; "
                             f"free it or set the port in the orchestration settings")
        todo.append(comp)
    if any(c.name.startswith("airflow") for c in todo):
        echo("airflow: migrating the metadata database ...")
        migrate_airflow_db(settings)
    started = []
    try:
        for comp in todo:
            log = _log_file(settings, comp.name)
            with log.open("ab") as fh:
                proc = subprocess.Popen(comp.argv, env={**os.environ, **comp.env}, stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=settings.paths.root, start_new_session=True)
            _pid_file(settings, comp.name).write_text(f"{proc.pid}\n")
            started.append(comp)
            echo(f"{comp.name}: started (pid {proc.pid}, log {log})")
        if wait:
            _wait_healthy(settings, comps, timeout=orch.start_timeout_s)
    except BaseException:
        for comp in started:
            _stop_one(settings, comp.name)
        raise
    return status(settings)


def _wait_healthy(settings: Settings, comps: list[Component], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = {c.name: c for c in comps if c.health_url}
    while pending:
        for name, comp in list(pending.items()):
            pid = _read_pid(settings, name)
            if not pid or not _alive(pid):
                raise StackError(f"{name} exited during start-up; see {_log_file(settings, name)}")
            if _http_ok(comp.health_url):  # type: ignore[arg-type]
                pending.pop(name)
        for comp in comps:  # components without a health URL must at least stay up
            pid = _read_pid(settings, comp.name)
            if not pid or not _alive(pid):
                raise StackError(f"{comp.name} exited during start-up; see {_log_file(settings, comp.name)}")
        if pending and time.monotonic() > deadline:
            raise StackError(f"not healthy after {timeout:.0f}s: {', '.join(pending)} (logs in {run_dir(settings)})")
        if pending:
            time.sleep(1.0)


def status(settings: Settings) -> StackStatus:
    orch = orchestration(settings)
    pids = {}
    for comp in components(settings):
        pid = _read_pid(settings, comp.name)
        if pid and _alive(pid):
            pids[comp.name] = pid
    user, password = airflow_login(settings)
    return StackStatus(
        urls={"airflow": f"http://{orch.host}:{orch.airflow_port}", "mlflow": f"http://{orch.host}:{orch.mlflow_port}"},
        login=(user, password),
        pids=pids,
    )


def _stop_one(settings: Settings, name: str, *, grace_s: float = 20.0) -> list[int]:
    """Stop one component's whole process tree; return pids that survived (should be empty)."""
    pid = _read_pid(settings, name)
    pid_file = _pid_file(settings, name)
    if not pid:
        pid_file.unlink(missing_ok=True)
        return []
    tree = process_tree(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            tree = [p for p in set(tree) | set(process_tree(pid)) if _alive(p)]
            if not tree:
                break
            time.sleep(0.2)
        if not tree:
            break
    pid_file.unlink(missing_ok=True)
    return tree


def down(settings: Settings, *, echo=print) -> dict[str, list[int]]:
    """Stop every component (reverse start order). Returns survivors per component (empty = clean)."""
    left: dict[str, list[int]] = {}
    for comp in reversed(components(settings)):
        if _read_pid(settings, comp.name) is None:
            continue
        t = time.monotonic()
        survivors = _stop_one(settings, comp.name)
        left[comp.name] = survivors
        echo(f"{comp.name}: " + (f"stopped ({time.monotonic() - t:.1f}s)" if not survivors
                                 else f"STILL RUNNING: pids {survivors}"))
    return left


# ---- API helpers (used by `recsys stack-status` and the tests) -------------------------------
def airflow_token(settings: Settings) -> str:
    """A JWT for the Airflow REST API from the simple auth manager's login."""
    import httpx

    orch = orchestration(settings)
    user, password = airflow_login(settings)
    r = httpx.post(f"http://{orch.host}:{orch.airflow_port}/auth/token", json={"username": user, "password": password},
                   timeout=10)
    r.raise_for_status()
    return r.json()["access_token"]


def airflow_dags(settings: Settings) -> list[str]:
    """DAG ids the running api-server knows (through the REST API)."""
    import httpx

    orch = orchestration(settings)
    r = httpx.get(f"http://{orch.host}:{orch.airflow_port}/api/v2/dags",
                  headers={"Authorization": f"Bearer {airflow_token(settings)}"}, timeout=10)
    r.raise_for_status()
    return sorted(d["dag_id"] for d in r.json()["dags"])


# ---- CLI ---------------------------------------------------------------------------------------
def up_command(
    no_wait: bool = typer.Option(False, "--no-wait", help="Return right after starting, without health checks."),
) -> None:
    """Start Airflow (api-server, scheduler, dag-processor, log server) and the MLflow server on loopback."""
    from core.cli_common import console, err_console, settings

    s = settings()
    try:
        st = up(s, wait=not no_wait, echo=lambda m: console.print(m, highlight=False))
    except StackError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=1) from None
    console.print(f"\n[bold]Airflow UI[/]  {st.urls['airflow']}   login: {st.login[0]} / {st.login[1]}"
                  f"   (passwords file: {passwords_file(s)})", highlight=False)
    console.print(f"[bold]MLflow UI[/]   {st.urls['mlflow']}", highlight=False)
    console.print("Stop everything with `make down` (recsys down).", highlight=False)


def down_command() -> None:
    """Stop every component started by `recsys up` (each process tree by its pid file)."""
    from core.cli_common import console, settings

    left = down(settings(), echo=lambda m: console.print(m, highlight=False))
    if not left:
        console.print("nothing was running")
    if any(left.values()):
        raise typer.Exit(code=1)


def stack_status_command() -> None:
    """Show which components run, their health, and the DAGs the Airflow API serves."""
    from core.cli_common import console, settings

    s = settings()
    st = status(s)
    for comp in components(s):
        pid = st.pids.get(comp.name)
        health = "" if not comp.health_url else ("healthy" if pid and _http_ok(comp.health_url) else "unhealthy")
        console.print(f"{comp.name:>22}: {'pid ' + str(pid) if pid else 'stopped'} {health}", highlight=False)
    if "airflow-api-server" in st.pids:
        try:
            console.print(f"DAGs: {', '.join(airflow_dags(s))}", highlight=False)
        except Exception as exc:  # noqa: BLE001 - status is best-effort reporting
            console.print(f"DAGs: unavailable ({exc})", highlight=False)
