"""OS-level thread names, so ``top -H``, ``py-spy`` and the serving benchmark's CPU accounting can
tell a worker's threads apart (CPython < 3.14 leaves every thread named after the executable)."""
from __future__ import annotations

import ctypes
import sys
import threading

_PR_SET_NAME = 15


def name_os_thread(name: str | None = None) -> None:
    """Name the calling thread at OS level (Linux ``prctl``; at most 15 bytes kept). ``None``: the
    thread's Python name. A no-op where unsupported: names are a diagnostic, never a requirement."""
    if not sys.platform.startswith("linux"):
        return
    label = (name or threading.current_thread().name).encode("ascii", "replace")[:15]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(label), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def yield_cpu_to_other_threads(nice: int) -> str | None:
    """Schedule the calling thread as CPU-bound background work (Linux): ``SCHED_BATCH`` (it never
    preempts a running thread when it wakes) at niceness ``nice`` (a smaller CPU share while others
    are runnable, so a waking normal thread gets the CPU sooner). Only ever lowers: a thread already
    nicer keeps its niceness, and lowering needs no privilege. ``nice <= 0`` leaves the thread as it
    is. Returns why it could not be done (``None``: done, or nothing to do), so the caller reports
    it: a priority is a tuning, never a reason not to serve."""
    import os

    if nice <= 0:
        return None
    if not sys.platform.startswith("linux"):
        return f"thread priorities are set on Linux only (this is {sys.platform})"
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: the calling thread (Linux)
        # Linux: PRIO_PROCESS with 0 is the calling thread's nice; never raised (that needs a privilege)
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
    except (OSError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def os_thread_names(pid: int) -> dict[int, str]:
    """``{tid: OS thread name}`` of a process (Linux ``/proc``; empty elsewhere)."""
    import os

    out: dict[int, str] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except OSError:
            continue
    return out


def thread_proc_files(pids: "list[int]", name: str) -> "list[tuple[str, str]]":
    """``(label, text of /proc/<pid>/task/<tid>/<name>)`` for every thread of the processes: the
    label is the OS thread name, ``event-loop`` for a process's main thread (a serving worker's
    main thread runs its event loop and keeps the process's name). Threads that exit meanwhile
    are skipped; empty where there is no ``/proc``."""
    out = []
    for pid in pids:
        for tid, thread in os_thread_names(pid).items():
            try:
                with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                    out.append(("event-loop" if tid == pid else thread, f.read()))
            except OSError:
                continue
    return out
