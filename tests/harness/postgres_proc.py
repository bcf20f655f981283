"""A real PostgreSQL server for tests, from Debian's binaries (/usr/lib/postgresql/*/bin): `initdb` into a
temporary directory, `postgres` on a free loopback port (never the system server on 5432), stopped by
its PID. As root (CI containers), both run as the `postgres` system user, since PostgreSQL refuses root.
Readiness is polled with a deadline (a real connection), never slept for.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from tests.harness.procs import free_port
from tests.harness.reaper import track


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _demote() -> tuple[Callable[[], None] | None, int | None, int | None]:
    """As root: run as the `postgres` user (uid, gid for the data directory's owner); else as we are."""
    if os.geteuid() != 0:
        return None, None, None
    user = pwd.getpwnam("postgres")

    def drop() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return drop, user.pw_uid, user.pw_gid


class PostgresProc:
    def __init__(self) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = bin_dir
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"strait-pg-{self.port}-"))
        self.data = self.workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://strait@127.0.0.1:{self.port}/strait"

    def start(self, timeout: float = 60.0) -> PostgresProc:
        drop, uid, gid = _demote()
        if uid is not None and gid is not None:
            os.chown(self.workdir, uid, gid)
        log = open(self.workdir / "initdb.log", "wb")  # noqa: SIM115
        with log:
            subprocess.run(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "strait",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=drop,  # before exec: only setuid/setgid run in the child
            )
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.workdir),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=open(self.workdir / "postgres.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=drop,
        )
        track(self.proc)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.read_log()}")
            try:
                with psycopg.connect(f"postgresql://strait@127.0.0.1:{self.port}/postgres", connect_timeout=2) as c:
                    c.autocommit = True
                    c.execute("CREATE DATABASE strait")
                return self
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres not ready after {timeout}s ({last}): {self.read_log()}")

    def read_log(self) -> str:
        path = self.workdir / "postgres.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)  # PostgreSQL's "fast shutdown"
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
