"""``serving.server`` helpers that need no server: the liveness check ``ServerProcess.wait_healthy``
uses so that a worker which answered and then died (and was replaced) is not counted twice."""
from __future__ import annotations

import subprocess
import sys
import time


def test_process_alive_tells_running_from_exited_processes_reaped_or_not() -> None:
    from serving.server import process_alive

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_alive(p.pid)
        p.kill()
        deadline = time.monotonic() + 5
        while process_alive(p.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not process_alive(p.pid)  # exited but not yet reaped (a zombie on Linux): not alive
    finally:
        p.wait()
    assert not process_alive(p.pid)  # reaped: gone
