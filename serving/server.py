"""Running the API: in this process (``run``, what ``recsys serve`` does) or as a child process
on a free loopback port (``ServerProcess``: tests, the benchmark and the demo use the real
server exactly as production starts it).

Workers are separate processes started by uvicorn; they rebuild the settings from
``RECSYS_CONFIG``, so ``run`` writes the resolved settings to ``<run_dir>/serving-<port>.yaml``
first: every worker then serves with exactly the configuration the command was given.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from core.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(settings: "Settings", path: Path) -> Path:
    """The resolved settings as a YAML file ``load_settings(config_file=...)`` reads back."""
    data = settings.model_dump(mode="json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def metrics_dir(settings: "Settings") -> Path:
    from serving.eventlog.base import resolve

    return resolve(settings.paths.root, settings.serving.metrics_dir)


def run(settings: "Settings", *, host: str | None = None, port: int | None = None, workers: int | None = None,
        log_level: str = "warning") -> None:
    """Serve in the foreground until interrupted (uvicorn, ``workers`` processes)."""
    import uvicorn

    srv = settings.serving.model_copy(update={k: v for k, v in {"host": host, "port": port, "workers": workers}.items()
                                              if v is not None})
    settings = settings.model_copy(update={"serving": srv})
    cfg_path = write_config(settings, settings.paths.run_dir / f"serving-{srv.port}.yaml")
    mdir = metrics_dir(settings) / str(srv.port)
    shutil.rmtree(mdir, ignore_errors=True)  # stale samples of a previous run must not be aggregated
    mdir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)
    # an unreachable registry must cost seconds, not MLflow's default minutes of retries:
    # serving then starts from the local copy and the poller keeps trying
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    os.environ["RECSYS_CONFIG"] = str(cfg_path)
    for name in [n for n in os.environ if n.startswith("RECSYS_") and n not in ("RECSYS_CONFIG",)]:
        del os.environ[name]  # the YAML already holds them, resolved
    options = dict(factory=True, host=srv.host, port=srv.port, workers=srv.workers, log_level=log_level,
                   access_log=False, loop="uvloop", http="httptools", timeout_graceful_shutdown=5)
    if srv.workers > 1 and srv.reuse_port and reuse_port_supported():
        from uvicorn import Config

        ReusePortSupervisor(Config("serving.app:create_app", **options)).run()
        return
    uvicorn.run("serving.app:create_app", **options)


def reuse_port_supported() -> bool:
    """Linux's SO_REUSEPORT spreads connections over the sockets of a group (elsewhere the option
    exists with other meanings, e.g. the last socket bound takes every connection)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` in the port's SO_REUSEPORT group, inheritable, not yet
    listening (its worker listens once it serves, so until then the others take its share)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _supervisor_base() -> type:
    from uvicorn.supervisors.multiprocess import Multiprocess

    return Multiprocess


class ReusePortSupervisor:
    """uvicorn's worker supervisor (``uvicorn.supervisors.Multiprocess``: start, health checks,
    restarts, signals), with one listening socket per worker instead of one shared by all.

    Why: with a shared socket every worker's event loop wakes on a new connection and the first
    one to call ``accept`` drains the whole backlog, so a client that opens its connections in a
    burst often lands on one worker (measured here: 64 of 64 connections on one worker in three
    of four starts, 35/29 in the fourth); that worker's model thread then queues at half of the
    server's capacity while the other worker idles. Sockets in one SO_REUSEPORT group get new
    connections by address hash instead (the kernel's choice, ~even over many connections).

    Each worker (including a restarted one) gets a fresh socket of the group; the supervisor
    closes its own copy once the worker has started, so a worker that dies takes its socket out
    of the group (its queued connections are reset, new ones go to the other workers) instead of
    leaving a listening socket nobody accepts from."""

    def __init__(self, config: "uvicorn.Config") -> None:  # noqa: F821 - imported lazily
        host, port = str(config.host), int(config.port)
        handed_out: list[socket.socket] = []

        class Supervisor(_supervisor_base()):  # type: ignore[misc, valid-type]
            # Multiprocess passes ``self.sockets`` to every worker it starts (start, restart, replace):
            # here each read is a new socket of the group
            @property
            def sockets(self) -> list[socket.socket]:
                sock = reuse_port_socket(host, port)
                handed_out.append(sock)
                return [sock]

            @sockets.setter
            def sockets(self, _value: list[socket.socket]) -> None:
                pass

            def init_processes(self) -> None:
                try:
                    super().init_processes()
                finally:
                    _close_all(handed_out)

            def keep_subprocess_alive(self) -> None:
                try:
                    super().keep_subprocess_alive()
                finally:
                    _close_all(handed_out)

            def restart_all(self) -> None:
                try:
                    super().restart_all()
                finally:
                    _close_all(handed_out)

        _check_port_free(host, port)
        self._supervisor = Supervisor(config, sockets=[])

    def run(self) -> None:
        self._supervisor.run()


def _check_port_free(host: str, port: int) -> None:
    """Bind without SO_REUSEPORT once: this fails if anything holds the port, including another
    server's SO_REUSEPORT group, which the workers' sockets would otherwise silently join."""
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise SystemExit(f"cannot serve on {host}:{port}: {exc}") from None
    finally:
        probe.close()


def _close_all(sockets: list[socket.socket]) -> None:
    """The supervisor's copies of the sockets it handed to workers that have started (each worker
    received its own duplicate when it was spawned)."""
    while sockets:
        sockets.pop().close()


def _proc_stat(pid: int | str) -> list[str] | None:
    """``/proc/<pid>/stat``'s fields after the command name (state, ppid, ...), None if unreadable
    (no such process, or no /proc). The name is cut at the last ``)``: it may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    """Is process ``pid`` still running (not exited, not a zombie)? Signal 0 checks existence; on
    Linux a zombie (exited, not yet reaped by its parent) still exists, so /proc says which."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    fields = _proc_stat(pid)
    return fields is None or fields[0] != "Z"  # no /proc here: signal 0 said it exists


def wait_for_workers(url: str, workers: int, *, proc: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    """Until ``workers`` distinct live worker processes have answered ``GET /healthz`` (its
    ``detail.worker``: the pid) at ``url``: a worker listens only once it has started (loaded its
    models), and until then the others take all its connections, which a test of cross-worker
    behaviour or a benchmark's first seconds must not see. Each poll is a fresh connection (the
    kernel spreads those over the listening workers). Raises ``RuntimeError`` if ``proc`` exits or
    the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    answered: set[int] = set()
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url + "/healthz", timeout=1.0)
            if r.status_code == 200:
                answered.add(r.json()["detail"]["worker"])
                answered = {pid for pid in answered if process_alive(pid)}  # a worker replaced meanwhile counts once
                if len(answered) >= workers:
                    return
                time.sleep(0.02)  # soon: the next connection may go to another worker
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout_s}s ({len(answered)} of {workers} workers answered)")


class ServerProcess:
    """The real server in a child process on a loopback port (``with ServerProcess(...) as srv``)."""

    def __init__(self, settings: "Settings", *, port: int | None = None, workers: int = 1,
                 env: Mapping[str, str] | None = None, ready_timeout_s: float = 120.0, log_path: Path | None = None):
        self.settings = settings
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})
        self.ready_timeout_s = ready_timeout_s
        self.log_path = log_path or settings.paths.run_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        cfg = write_config(self.settings, self.settings.paths.run_dir / f"serving-parent-{self.port}.yaml")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
        env.update({"RECSYS_CONFIG": str(cfg), "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.workers)],
            cwd=str(REPO_ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        """Until every worker answers ``/healthz`` (:func:`wait_for_workers`)."""
        try:
            wait_for_workers(self.url, self.workers, proc=self.proc, timeout_s=self.ready_timeout_s)
        except RuntimeError as exc:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
            raise RuntimeError(f"{exc}; log: {self.log_path}\n{self.log_tail()}") from None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server's process group (graceful), SIGKILL if it does not exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            self.kill()
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group (crash test)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def child_pids(self) -> list[int]:
        """The server's direct children: uvicorn's worker processes (and multiprocessing's resource
        tracker) under the supervisor (Linux /proc; empty elsewhere)."""
        if self.proc is None:
            return []
        kids: list[int] = []
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
            fields = _proc_stat(entry) if entry.isdigit() else None
            if fields is not None and len(fields) > 1 and fields[1] == str(self.proc.pid):
                kids.append(int(entry))
        return kids

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
