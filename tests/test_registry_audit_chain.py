"""The registry's audit trail can't be edited unseen: every store links each version to the one
before (``version_chain``), and `tabadol registry verify` names the exact version changed."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tabadol.pki import CertificateAuthority
from tabadol.registry import open_registry
from tabadol.registry.audit import TrailCheck
from tabadol.registry.entries import digest
from tabadol.registry.store import GENESIS_CHAIN, Registry, RegistryVersion, version_chain
from tabadol.registry.store.memory import MemoryRegistryStore
from tests.support.registry import registry_config, tabadol

ONE = {"agency": [{"id": "post", "name": "Post"}], "service": [], "grant": [], "limit": []}
TWO = {"agency": [{"id": "tax", "name": "Tax"}], "service": [], "grant": [], "limit": []}
WHEN = dt.datetime(2025, 3, 21, 8, 30, 0, 6, tzinfo=dt.UTC)


# -- the chain itself ------------------------------------------------------------------


def test_a_link_is_the_hash_of_the_previous_link_and_the_versions_canonical_json() -> None:
    d = digest(ONE)
    canonical = f'[1,"2025-03-21T08:30:00.000006+00:00","alice","first: ☀","{d}"]'
    expected = hashlib.sha256(bytes(32) + canonical.encode()).hexdigest()
    assert version_chain(GENESIS_CHAIN, 1, WHEN, "alice", "first: ☀", d) == expected
    assert GENESIS_CHAIN == "0" * 64
    # The same instant in another zone is the same link; anything else changes it.
    tehran = WHEN.astimezone(dt.timezone(dt.timedelta(hours=3, minutes=30)))
    assert version_chain(GENESIS_CHAIN, 1, tehran, "alice", "first: ☀", d) == expected
    for changed in (
        version_chain(GENESIS_CHAIN, 2, WHEN, "alice", "first: ☀", d),
        version_chain(
            GENESIS_CHAIN, 1, WHEN + dt.timedelta(microseconds=1), "alice", "first: ☀", d
        ),
        version_chain(GENESIS_CHAIN, 1, WHEN, "mallory", "first: ☀", d),
        version_chain(GENESIS_CHAIN, 1, WHEN, "alice", "first", d),
        version_chain(GENESIS_CHAIN, 1, WHEN, "alice", "first: ☀", digest(TWO)),
        version_chain(expected, 1, WHEN, "alice", "first: ☀", d),
    ):
        assert changed != expected


def test_a_link_needs_a_previous_link_and_a_time_with_its_zone() -> None:
    with pytest.raises(ValueError, match="is not 64 hex digits"):
        version_chain("abc", 1, WHEN, "a", "r", digest(ONE))
    with pytest.raises(ValueError, match="has no time zone"):
        version_chain(GENESIS_CHAIN, 1, WHEN.replace(tzinfo=None), "a", "r", digest(ONE))


def history(*changes: tuple[str, str]) -> list[RegistryVersion]:
    """Versions 1, 2, ... linked as a store links them."""
    versions: list[RegistryVersion] = []
    previous = GENESIS_CHAIN
    for n, (by, reason) in enumerate(changes, 1):
        when = WHEN + dt.timedelta(minutes=n)
        chain = version_chain(previous, n, when, by, reason, digest(ONE))
        versions.append(RegistryVersion(n, when, by, reason, ONE, digest(ONE), chain))
        previous = chain
    return versions


def checked(versions: list[RegistryVersion]) -> TrailCheck:
    check = TrailCheck()
    for version in versions:
        check.add(version)
    return check


def test_a_clean_history_checks_out() -> None:
    versions = history(("alice", "first"), ("bob", "second"), ("carol", "third"))
    check = checked(versions)
    assert check.problems == []
    assert check.summary("db") == (
        f"registry db: 3 versions, chain intact to version 3 (head chain {versions[2].chain[:16]})"
    )
    assert TrailCheck().summary("db") == "registry db: no version yet"


def test_each_change_is_named_at_its_version() -> None:
    from dataclasses import replace

    v1, v2, v3, v4 = history(("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"))
    assert checked([v1, replace(v2, reason="rewritten"), v3, v4]).problems == [
        "version 2: its chain does not follow version 1's: version 2 was changed after it was "
        "committed (its number, time, author, reason or digest), or a version between 1 and 2 "
        "was removed"
    ]
    assert checked([v1, v2, replace(v3, entries=TWO), v4]).problems == [
        "version 3: its entries do not match its digest: they were changed after it was committed"
    ]
    removed = checked([v1, v3, v4]).problems
    assert len(removed) == 1 and "version 3: its chain does not follow version 1's" in removed[0]
    first = checked([replace(v1, created_by="mallory"), v2]).problems
    assert len(first) == 1 and first[0].startswith("version 1: its chain does not start")
    assert checked([v1, replace(v2, chain=""), v3]).problems == [
        "version 2: has no chain, but version 1 before it has: its chain was removed"
    ]
    assert checked([v1, replace(v2, entries="{")]).problems == [  # type: ignore[arg-type]
        "version 2: its entries are a string, not a table of agency, service, grant, limit, request"
    ]
    assert (
        checked([v1, replace(v2, number=3)])
        .problems[0]
        .startswith("version 3: its chain does not follow version 1's")
    )
    assert "version 1: comes after version 2: numbers must go up" in checked([v2, v1]).problems


def test_versions_committed_before_the_chain_are_said_and_the_chain_starts_after() -> None:
    from dataclasses import replace

    old = [replace(v, chain="") for v in history(("a", "1"), ("b", "2"))]
    assert checked(old).summary("db") == (
        "registry db: 2 versions, all committed before the audit chain (their entries match "
        "their digests); the next version committed starts the chain"
    )
    when = WHEN + dt.timedelta(hours=1)
    chain = version_chain(GENESIS_CHAIN, 3, when, "c", "3", digest(ONE))
    v3 = RegistryVersion(3, when, "c", "3", ONE, digest(ONE), chain)
    check = checked([*old, v3])
    assert check.problems == []
    assert check.summary("db").endswith(
        "chain intact to version 3 (head chain "
        f"{chain[:16]}); the chain starts at version 3: the 2 versions before it were "
        "committed before the audit chain"
    )


# -- every store links its versions ----------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "memory":
        yield MemoryRegistryStore()
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_registry(url)
    try:
        yield opened
    finally:
        opened.close()


def test_every_store_links_each_version_to_the_one_before_as_it_stores_it(store: Registry) -> None:
    first = store.commit(ONE, "alice", "first", digest(ONE))
    second = store.commit(TWO, "bob", "second", digest(TWO))
    skipped = store.commit(ONE, "carol", "after a restore", digest(ONE), number=10)
    assert first.chain == version_chain(
        GENESIS_CHAIN, 1, first.created_at, "alice", "first", digest(ONE)
    )
    assert second.chain == version_chain(
        first.chain, 2, second.created_at, "bob", "second", digest(TWO)
    )
    assert skipped.chain == version_chain(
        second.chain, 10, skipped.created_at, "carol", "after a restore", digest(ONE)
    )
    stored = store.history()
    assert stored == [first, second, skipped]  # the time read back is the time linked
    check = checked(stored)
    assert check.problems == [] and "3 versions, chain intact to version 10" in check.summary("")


# -- `tabadol registry verify` ---------------------------------------------------------


def verify(cfg: Path) -> tuple[int, list[str]]:
    code, out, err = tabadol("registry", "verify", "--config", str(cfg))
    assert not err
    return code, out.splitlines()


@pytest.fixture(params=["sqlite", "postgres"])
def registry(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
) -> tuple[Path, str]:
    """A configuration whose registry holds versions 1 to 4, and its database URL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    store = open_registry(url)
    try:
        for n in range(1, 5):
            entries = ONE if n % 2 else TWO
            store.commit(
                entries, f"spiffe://exchange.test/operator/op{n}", f"change {n}", digest(entries)
            )
    finally:
        store.close()
    return registry_config(tmp_path, pki.dir, echo_contracts, url), url


def tamper(url: str, statement: str) -> None:
    """Run ``statement`` past the triggers, as whoever owns the file or the tables could."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            db.execute("DROP TRIGGER registry_versions_no_update")
            db.execute("DROP TRIGGER registry_versions_no_delete")
            db.execute(statement)
        return
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("ALTER TABLE registry_versions DISABLE TRIGGER USER")
        db.execute(statement)
        db.execute("ALTER TABLE registry_versions ENABLE TRIGGER USER")


def test_verify_passes_on_a_clean_history(registry: tuple[Path, str]) -> None:
    cfg, url = registry
    store = open_registry(url)
    try:
        head = store.current()
    finally:
        store.close()
    assert head is not None
    code, lines = verify(cfg)
    assert code == 0
    assert lines == [
        f"registry {store.where}: 4 versions, chain intact to version 4 "
        f"(head chain {head.chain[:16]})"
    ]


@pytest.mark.parametrize(
    ("statement", "said"),
    [
        (
            "UPDATE registry_versions SET reason = 'nothing to see' WHERE version = 2",
            "version 2: its chain does not follow version 1's: version 2 was changed after it "
            "was committed (its number, time, author, reason or digest), or a version between "
            "1 and 2 was removed",
        ),
        (
            "UPDATE registry_versions SET created_by = 'spiffe://exchange.test/operator/op1' "
            "WHERE version = 3",
            "version 3: its chain does not follow version 2's",
        ),
        (
            "DELETE FROM registry_versions WHERE version = 2",
            "version 3: its chain does not follow version 1's: version 3 was changed after it "
            "was committed (its number, time, author, reason or digest), or a version between "
            "1 and 3 was removed",
        ),
        (
            "DELETE FROM registry_versions WHERE version = 1",
            "version 2: its chain does not start the audit chain",
        ),
    ],
)
def test_verify_names_the_version_changed_past_the_triggers(
    registry: tuple[Path, str], statement: str, said: str
) -> None:
    cfg, url = registry
    tamper(url, statement)
    code, lines = verify(cfg)
    assert code == 1
    assert len(lines) == 2, lines  # the one problem, then the count
    assert lines[0].startswith(said)
    assert lines[1].endswith("versions, 1 problem")


def test_verify_names_entries_changed_without_their_digest(registry: tuple[Path, str]) -> None:
    cfg, url = registry
    grant = '{"consumer": "tax", "service": "x", "methods": ["*"]}'
    if url.startswith("sqlite:///"):
        change = f"json_set(entries, '$.grant[0]', json('{grant}'))"
    else:
        change = f"jsonb_set(entries, '{{grant,0}}', '{grant}')"
    tamper(url, f"UPDATE registry_versions SET entries = {change} WHERE version = 4")
    code, lines = verify(cfg)
    assert code == 1
    assert lines[0] == (
        "version 4: its entries do not match its digest: they were changed after it was committed"
    )
    assert lines[1].endswith("4 versions, 1 problem")


def test_verify_reads_the_history_a_page_at_a_time(
    registry: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tabadol.registry import cli as registry_cli

    cfg, url = registry
    tamper(url, "UPDATE registry_versions SET reason = 'x' WHERE version = 3")
    pages: list[tuple[int, int | None]] = []
    opened = registry_cli.open_registry

    def recording(u: str) -> Registry:
        store = opened(u)
        read: Callable[..., list[RegistryVersion]] = store.history

        def history(after: int = 0, limit: int | None = None) -> list[RegistryVersion]:
            pages.append((after, limit))
            return read(after=after, limit=limit)

        store.history = history  # type: ignore[method-assign]
        return store

    monkeypatch.setattr(registry_cli, "_HISTORY_PAGE", 2)
    monkeypatch.setattr(registry_cli, "open_registry", recording)
    code, lines = verify(cfg)
    assert code == 1 and lines[0].startswith("version 3: its chain does not follow version 2's")
    assert pages == [(0, 2), (2, 2), (4, 2)]  # the break found across pages


# -- PostgreSQL databases made before the chain -----------------------------------------


def test_a_postgres_registry_made_before_the_chain_gets_it_and_starts_it_there(
    postgres_url: str, tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    store = open_registry(postgres_url)
    store.commit(ONE, "alice", "first", digest(ONE))  # the tables, then as they were before
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("ALTER TABLE registry_versions DROP COLUMN chain")
        db.execute(
            "INSERT INTO registry_versions (version, created_by, reason, entries, digest) "
            "VALUES (2, 'bob', 'second', %s, %s)",
            (json.dumps(TWO), digest(TWO)),
        )
    # A reader that cannot add the column reads the old rows, without a chain.
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("DROP ROLE IF EXISTS old_reader")
        db.execute("CREATE ROLE old_reader LOGIN")
        db.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO old_reader")
    reader = open_registry(postgres_url.replace("postgres@", "old_reader@", 1))
    try:
        assert [(v.number, v.chain) for v in reader.history()] == [(1, ""), (2, "")]
    finally:
        reader.close()
    store = open_registry(postgres_url)  # the owner: the column is added on first use
    try:
        third = store.commit(ONE, "carol", "third", digest(ONE))
    finally:
        store.close()
    assert third.chain == version_chain(
        GENESIS_CHAIN, 3, third.created_at, "carol", "third", digest(ONE)
    )
    code, lines = verify(registry_config(tmp_path, pki.dir, echo_contracts, postgres_url))
    assert code == 0
    assert lines[0].endswith(
        f"3 versions, chain intact to version 3 (head chain {third.chain[:16]}); the chain "
        "starts at version 3: the 2 versions before it were committed before the audit chain"
    )
