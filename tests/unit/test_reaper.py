"""A pytest killed by SIGTERM (a CI timeout) leaves no fixture process behind (tests/harness/reaper.py):
fixture processes live in sessions of their own, so nothing else would stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.harness.procs import REPO_ROOT
from tests.harness.waiting import poll

INNER = """
import sys, threading
from pathlib import Path
from tests.harness.procs import ServerProcess, free_port

def test_holds_a_server() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)]
    with ServerProcess(argv, port, ready_path="/healthz") as proc:
        assert proc.proc is not None
        Path(r"{pid_file}").write_text(str(proc.proc.pid))
        threading.Event().wait(120)  # the run is killed here
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent, the killed pytest, is gone; init reaps it).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_run_killed_by_sigterm_stops_the_processes_its_fixtures_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER.format(pid_file=pid_file))
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(inner)]
    run = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = 0
    try:
        assert poll(lambda: pid_file.exists() and pid_file.read_text(), timeout=60), "the inner test never started"
        server = int(pid_file.read_text())
        assert _alive(server)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
        assert poll(lambda: not _alive(server), timeout=30), out.decode(errors="replace")[-2000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        if server and _alive(server):
            os.killpg(server, signal.SIGKILL)
