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
