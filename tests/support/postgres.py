"""A private PostgreSQL server for the tests: Debian's binaries, a directory of its own, a
free loopback port. ``TABADOL_TEST_POSTGRES=postgresql://...`` names a server to use instead
(it needs CREATEDB); a test that must stop its server always starts a private one."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

ENV = "TABADOL_TEST_POSTGRES"
_SUPERUSER = "postgres"  # the Debian package's system user: initdb refuses to run as root


def server_binaries() -> Path:
    """The newest PostgreSQL server's bin directory from Debian's postgresql package."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/postgres): "
            f"`make test` installs Debian's postgresql package; or set {ENV}=postgresql://... "
            "to a server of your own"
        )
    return found[-1].parent


def _free_port(host: str) -> int:
    """A free port below the kernel's ephemeral range. A cluster keeps its port across a stop
    and a start: one the kernel hands out (bind to port 0) could go to a test's broker or
    provider while the cluster is stopped, and then the cluster could not start again."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(20_000, min(low, 32_768)), 200):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port for PostgreSQL on {host} between 20000 and {low}")


class PostgresCluster:
    """One PostgreSQL server in a temporary directory: initialised at its first start, on one port
    for its whole life, so that it can be stopped and started again under the same URL."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        # Not under pytest's tmp_path: the server runs as postgres, which must reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="tabadol-postgres-"))
        self.data = self.directory / "data"
        self.host = host
        self.port = _free_port(host)
        self._bin = server_binaries()
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", _SUPERUSER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr or done.stdout}"
            )

    def _initialise(self) -> None:
        if self._as_postgres:
            shutil.chown(self.directory, _SUPERUSER, _SUPERUSER)
        self._run(
            "initdb", "-D", str(self.data), "-U", _SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "max_connections": "300",
            # Durability is what PostgreSQL guarantees, not what these tests check.
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        if not self.data.exists():
            self._initialise()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends sessions cleanly; ``immediate`` is a crash, as for a lost host."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop the server if it runs (as a crash: nothing here is kept) and delete it."""
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def create_database(self, prefix: str = "t") -> str:
        return create_database(self.url(), prefix)


def create_database(server_url: str, prefix: str = "t") -> str:
    """A new empty database on the server; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.partition("?")
    return base.rsplit("/", 1)[0] + f"/{name}"
