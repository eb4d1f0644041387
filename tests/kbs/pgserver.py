"""A throwaway PostgreSQL server for tests and benchmarks: initdb, start on loopback, stop.

The server runs as the ``postgres`` user (initdb refuses root) from a private
folder, listens on 127.0.0.1 at a free port and on a private unix socket, and
is stopped (immediate mode) and removed by :meth:`PgServer.stop`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SETUP_HINT = "run `sudo scripts/setup` (it installs the postgresql package)"


class PgMissing(RuntimeError):
    pass


def pg_bin() -> Path:
    """The newest installed PostgreSQL server's bin folder."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise PgMissing(f"PostgreSQL server binaries (initdb, pg_ctl) are not installed: {SETUP_HINT}")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, max_connections: int = 300):
        self.bin = pg_bin()
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (self.bin / tool).exists():
                raise PgMissing(f"{tool} is missing from {self.bin}: {SETUP_HINT}")
        try:
            self.user = pwd.getpwnam("postgres")
        except KeyError:
            raise PgMissing(f"there is no postgres user: {SETUP_HINT}") from None
        self.root = Path(tempfile.mkdtemp(prefix="cove-pg-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        for folder in (self.data, self.sockets):
            folder.mkdir()
            os.chown(folder, self.user.pw_uid, self.user.pw_gid)
        self.port = _free_port()
        self.max_connections = max_connections
        self.log = self.root / "server.log"
        self.log.touch()
        os.chown(self.log, self.user.pw_uid, self.user.pw_gid)
        self.started = False

    def _as_postgres(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def start(self) -> PgServer:
        done = self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()}")
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={self.max_connections} -c fsync=off -c synchronous_commit=off "
            f"-c full_page_writes=off -c shared_buffers=64MB"
        )
        done = self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {self.log.read_text()[-2000:]}")
        self.started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
