"""The processes test fixtures start, stopped by their ids when the test process ends, however it ends.

Fixtures stop what they start in their finalizers, but a pytest killed by SIGTERM (a CI timeout, `timeout
make test`) runs no finalizer, and fixture processes live in sessions of their own (so that a test can
signal their whole group): they would outlive the run. Every harness Popen is `track`ed here; importing
this module (the harness does) makes SIGTERM stop the run as Ctrl-C does (pytest then tears its fixtures
down), and at exit any tracked process group still running is sent SIGTERM, then SIGKILL."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Any

_tracked: list[subprocess.Popen[Any]] = []
GRACE_S = 3.0


def track(proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
    """Remember a process started with `start_new_session=True` (its pid is its group's id)."""
    _tracked.append(proc)
    return proc


def reap() -> list[int]:
    """Stop every tracked group whose leader still runs; returns their pids. (A group whose leader is gone
    is not signalled: its id may already name another process's group.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the reaping short
    left = [p for p in _tracked if p.poll() is None]
    for proc in left:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for proc in left:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(GRACE_S)
    _tracked.clear()
    return [p.pid for p in left]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


atexit.register(reap)
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _interrupt)
