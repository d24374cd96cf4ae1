"""The registry in one SQLite file: the embedded default. Its store contract runs with the
others' in test_registry.py; here what only a file has: its mode, what else the file may be,
versions kept by triggers, processes sharing it, its URL, and a broker following it."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.errors import ConfigError
from tabadol.pki import CertificateAuthority
from tabadol.registry import open_registry
from tabadol.registry.entries import digest
from tabadol.registry.store import RegistryBusy, RegistryUnavailable
from tabadol.registry.store.sqlite import SqliteRegistryStore
from tests.conftest import DEFAULT_GRANTS, RunningProvider
from tests.support.exchange import eventually
from tests.support.registry import import_registry, registry_config, registry_toml, tabadol
from tests.test_registry_follower import ONLY_POST, call

ONE = {"agency": [{"id": "post", "name": "Post"}], "service": [], "grant": [], "limit": []}


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"  # path is absolute: sqlite:////...


def commit_one(path: Path) -> None:
    store = open_registry(url_of(path))
    try:
        store.commit(ONE, "alice", "first", digest(ONE))
    finally:
        store.close()


def test_the_registry_file_and_its_journal_are_made_private(tmp_path: Path) -> None:
    path = tmp_path / "var" / "registry.db"  # its directory is made too
    store = open_registry(url_of(path))
    try:
        store.commit(ONE, "alice", "first", digest(ONE))
        assert path.stat().st_mode & 0o777 == 0o600
        wal = path.with_name("registry.db-wal")  # WAL mode: the log is there while open
        assert wal.exists() and wal.stat().st_mode & 0o777 == 0o600
    finally:
        store.close()


def test_versions_and_crls_are_never_updated_or_deleted(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    commit_one(path)
    store = open_registry(url_of(path))
    store.publish_crl(b"crl", 1, "alice", lambda row: True)
    store.close()
    with sqlite3.connect(path) as db:
        for statement in (
            "UPDATE registry_versions SET created_by = 'mallory'",
            "DELETE FROM registry_versions",
            "UPDATE registry_crls SET number = '9'",
            "DELETE FROM registry_crls",
        ):
            with pytest.raises(
                sqlite3.IntegrityError,
                match=r"tabadol registry: .* refused: .*never changed, only added",
            ):
                db.execute(statement)
        assert db.execute("SELECT created_by FROM registry_versions").fetchall() == [("alice",)]
        assert db.execute("SELECT count(*) FROM registry_crls").fetchone() == (1,)


_WRITER = """
import sys
from tabadol.registry import open_registry
from tabadol.registry.entries import digest
entries = {"agency": [{"id": "post", "name": "Post"}]}
store = open_registry(sys.argv[1])
store.head()  # opened, the tables there
print("ready", flush=True)
sys.stdin.readline()  # every writer starts at once
numbers = [store.commit(entries, sys.argv[2], "r", digest(entries)).number for _ in range(25)]
print(" ".join(map(str, numbers)), flush=True)
store.close()
"""


def test_processes_committing_at_once_get_consecutive_versions(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    url = url_of(tmp_path / "registry.db")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, url, f"writer-{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    for writer in writers:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    numbers: list[int] = []
    for writer in writers:
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0
        numbers += map(int, out.split())
    assert sorted(numbers) == list(range(1, 76))
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, url)
    code, out, _ = tabadol("registry", "verify", "--config", str(cfg))
    assert code == 0 and "75 versions, chain intact to version 75" in out


def test_a_change_waits_for_another_at_most_lock_timeout(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    commit_one(path)
    store = SqliteRegistryStore(path, lock_timeout_s=0.2)
    try:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # a change in progress, stuck
        with pytest.raises(
            RegistryBusy, match=f"{path}: cannot commit a registry version: another"
        ):
            store.commit(ONE, "bob", "second", digest(ONE))
        with pytest.raises(RegistryBusy, match="cannot publish a CRL"):
            store.publish_crl(b"crl", 1, "bob", lambda row: True)
        other.execute("ROLLBACK")
        other.close()
        assert store.commit(ONE, "bob", "second", digest(ONE)).number == 2
        assert store.crls() == []
    finally:
        store.close()


def test_a_file_that_is_not_a_database_is_named(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text('[[agency]]\nid = "post"\nname = "Post"\n' * 100)
    store = open_registry(url_of(path))
    with pytest.raises(
        RegistryUnavailable, match=f"registry database {path} is not a SQLite database"
    ):
        store.head()
    assert path.read_text().startswith("[[agency]]")  # left as it was


def test_a_database_of_something_else_is_named_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "spans.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE spans (id TEXT)")
    store = open_registry(url_of(path))
    with pytest.raises(
        RegistryUnavailable,
        match=f"registry database {path} is a SQLite database of something else "
        r"\(its tables: spans\), not a Tabadol registry",
    ):
        store.current()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("PRAGMA application_id = 42")
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(RegistryUnavailable, match=r"another application \(application_id 0x2a\)"):
        open_registry(url_of(other)).head()
    with sqlite3.connect(path) as db:
        names = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert names == [("spans",)]


def test_a_registry_from_a_newer_tabadol_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    commit_one(path)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RegistryUnavailable, match=f"{path} was written by a newer Tabadol"):
        open_registry(url_of(path)).head()


def test_a_file_where_its_directory_should_be_is_named(tmp_path: Path) -> None:
    (tmp_path / "var").write_text("not a directory")
    path = tmp_path / "var" / "registry.db"
    with pytest.raises(
        RegistryUnavailable, match=f"registry database {path}: cannot open or create it"
    ):
        open_registry(url_of(path)).head()


def test_a_relative_path_is_beside_the_configuration_and_four_slashes_are_absolute(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")  # not where the configuration is
    (tmp_path / "etc").mkdir()
    cfg = registry_config(tmp_path / "etc", pki.dir, echo_contracts, "sqlite:///var/registry.db")
    assert config.load(cfg).registry.url == f"sqlite:///{tmp_path / 'etc' / 'var' / 'registry.db'}"
    absolute = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    cfg = registry_config(tmp_path / "etc", pki.dir, echo_contracts, absolute)
    assert config.load(cfg).registry.url == absolute


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("sqlite:///", "names no file"),
        ("sqlite:///var/", "names no file"),
        ("sqlite://host/registry.db", "expected sqlite:///PATH"),
        ("mysql://x@h/db", "expected a postgresql://USER@HOST:PORT/DB URL, or sqlite:///PATH"),
    ],
)
def test_a_registry_url_that_names_no_file_is_refused(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, url: str, said: str
) -> None:
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, url)
    with pytest.raises(ConfigError, match=r"\[registry\] url: .*" + said):
        config.load(cfg)


def test_the_registry_commands_work_on_a_sqlite_registry(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, url_of(tmp_path / "registry.db"))
    file = tmp_path / "registry.toml"
    file.write_text(registry_toml(["127.0.0.1:1"]))
    assert "committed registry version 1" in import_registry(cfg, file, reason="first")
    code, out, _ = tabadol("registry", "export", "--config", str(cfg))
    assert code == 0 and f"# Tabadol registry version 1 from {tmp_path / 'registry.db'}" in out
    code, out, _ = tabadol("registry", "history", "--config", str(cfg))
    assert code == 0 and "first" in out
    code, out, _ = tabadol("config", "check", "--config", str(cfg))
    assert code == 0 and "OK (registry version 1)" in out
    assert (tmp_path / "registry.db").stat().st_mode & 0o777 == 0o600


@pytest.fixture
async def sqlite_node(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> AsyncIterator[tuple[Path, Broker]]:
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, url_of(tmp_path / "registry.db"))
    file = tmp_path / "registry.toml"
    file.write_text(registry_toml([echo_provider.address], DEFAULT_GRANTS))
    import_registry(cfg, file, reason="first")
    broker = Broker(config.load(cfg))
    await broker.start()
    try:
        yield cfg, broker
    finally:
        await broker.stop(0)


async def test_a_broker_serves_calls_from_the_version_imported_into_its_sqlite_registry(
    sqlite_node: tuple[Path, Broker], pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    cfg, broker = sqlite_node
    assert broker.config.registry_version == 1
    assert await call(broker, pki, "nocr") == grpc.StatusCode.OK
    assert await call(broker, pki, "tax") == grpc.StatusCode.PERMISSION_DENIED
    # A change committed to the file is applied without SIGHUP.
    file = cfg.parent / "revoked.toml"
    file.write_text(registry_toml([echo_provider.address], ONLY_POST))
    await asyncio.to_thread(import_registry, cfg, file, "nocr's grant ends")
    assert await eventually(lambda: broker.config.registry_version == 2)
    assert await call(broker, pki, "nocr") == grpc.StatusCode.PERMISSION_DENIED
    assert await call(broker, pki, "post") == grpc.StatusCode.OK
