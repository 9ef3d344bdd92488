"""OS thread names (core/threads.py): what the serving benchmark's CPU accounting and top -H read."""
from __future__ import annotations

import os
import sys
import threading

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl / procfs are Linux")
def test_named_thread_is_visible_in_procfs():
    from core.threads import name_os_thread, os_thread_names

    seen: dict[str, object] = {}
    ready, done = threading.Event(), threading.Event()

    def body() -> None:
        name_os_thread("a-very-long-thread-name")  # kept to 15 bytes by the kernel
        seen["tid"] = threading.get_native_id()
        ready.set()
        done.wait(5)

    t = threading.Thread(target=body)
    t.start()
    try:
        assert ready.wait(5)
        assert os_thread_names(os.getpid())[seen["tid"]] == "a-very-long-thr"
    finally:
        done.set()
        t.join()
    assert os_thread_names(-1) == {}  # no such process: empty, no error
