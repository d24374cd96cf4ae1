"""The registry on PostgreSQL: import, export, diff and history; the store's contract over
every implementation; and the pure parts (diff, freshness)."""

from __future__ import annotations

import asyncio
import datetime as dt
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tabadol import config
from tabadol.errors import ConfigError
from tabadol.pki import CertificateAuthority
from tabadol.registry import open_registry
from tabadol.registry.entries import Change, diff, digest, entries_data, summary
from tabadol.registry.freshness import RegistryFreshness
from tabadol.registry.store import (
    Registry,
    RegistryBusy,
    RegistryRefused,
    RegistryUnavailable,
    StoredCrl,
)
from tabadol.registry.store.memory import MemoryRegistryStore
from tests.conftest import DEFAULT_GRANTS
from tests.support.echo import SERVICE
from tests.support.exchange import crl_signed_by
from tests.support.registry import import_registry, registry_config, registry_toml, tabadol

ENDPOINTS = ["127.0.0.1:1"]


@pytest.fixture
def setup(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, postgres_url: str
) -> tuple[Path, Path]:
    """A registry configuration on a fresh database, and a registry file for it."""
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, postgres_url)
    file = tmp_path / "registry.toml"
    file.write_text(registry_toml(ENDPOINTS))
    return cfg, file


def current_version(cfg: Path) -> int | None:
    url = config.load(cfg).registry.url
    assert url is not None
    store = open_registry(url)
    try:
        head = store.head()
        return head.number if head is not None else None
    finally:
        store.close()


def test_import_then_export_round_trips(setup: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, file = setup
    out = import_registry(cfg, file)
    assert "committed registry version 1" in out
    code, exported, _ = tabadol("registry", "export", "--config", str(cfg))
    assert code == 0
    assert "# Tabadol registry version 1" in exported
    back = tmp_path / "exported.toml"
    back.write_text(exported)
    expected = entries_data(config.read_registry_file(file))
    assert entries_data(config.read_registry_file(back)) == expected
    # Importing what was exported changes nothing: no new version.
    assert "unchanged: version 1" in import_registry(cfg, back)
    assert current_version(cfg) == 1


def test_a_whole_broker_configuration_can_be_imported(
    setup: tuple[Path, Path], tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    from tests.conftest import broker_toml

    cfg, file = setup
    whole = tmp_path / "old-broker.toml"
    whole.write_text(
        broker_toml(
            pki_dir=pki.dir, contracts=echo_contracts, endpoints=ENDPOINTS, grants=DEFAULT_GRANTS
        )
    )
    import_registry(cfg, whole)
    assert "unchanged" in import_registry(cfg, file)  # the same entries, from either form


def test_diff_shows_added_removed_and_changed_entries(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, file = setup
    import_registry(cfg, file)
    edited = tmp_path / "edited.toml"
    edited.write_text(
        registry_toml(
            ["127.0.0.1:1", "127.0.0.1:2"],
            grants=f'[[grant]]\nconsumer = "post"\nservice = "{SERVICE}"\nmethods = ["Unary"]\n\n'
            f'[[grant]]\nconsumer = "tax"\nservice = "{SERVICE}"\nmethods = ["Unary"]\n',
        )
    )
    code, out, _ = tabadol("registry", "diff", "--config", str(cfg), str(edited))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("from version 1 ")
    assert f"~ [[service]] '{SERVICE}': endpoints +127.0.0.1:2" in lines
    assert f"~ [[grant]] 'post' '{SERVICE}': methods -* +Unary" in lines
    assert f"- [[grant]] 'nocr' '{SERVICE}'" in lines
    assert f"+ [[grant]] 'tax' '{SERVICE}'" in lines
    assert current_version(cfg) == 1  # diff changes nothing
    code, out, _ = tabadol("registry", "diff", "--config", str(cfg), str(file))
    assert out.strip() == "no change from version 1"


def test_history_says_who_changed_what_when_and_why(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, file = setup
    import_registry(cfg, file, reason="first registry", by="alice")
    revoked = tmp_path / "revoked.toml"
    revoked.write_text(
        registry_toml(ENDPOINTS, grants=DEFAULT_GRANTS.split('[[grant]]\nconsumer = "nocr"')[0])
    )
    import_registry(cfg, revoked, reason="TICKET-7: nocr's grant ends", by="bob")
    code, out, _ = tabadol("registry", "history", "--config", str(cfg))
    assert code == 0
    newest, oldest = out.splitlines()
    assert newest.split()[0] == "2" and "bob" in newest and "TICKET-7: nocr's grant ends" in newest
    assert "[grant: 1 removed]" in newest
    assert oldest.split()[0] == "1" and "alice" in oldest and "first registry" in oldest
    assert "agency: 5 added" in oldest
    assert str(dt.date.today().year) in oldest


def test_by_defaults_to_user_at_host(setup: tuple[Path, Path]) -> None:
    import getpass
    import socket

    cfg, file = setup
    code, _, _ = tabadol("registry", "import", "--config", str(cfg), str(file))
    assert code == 0
    _, out, _ = tabadol("registry", "history", "--config", str(cfg))
    assert f"{getpass.getuser()}@{socket.gethostname()}" in out
    assert "(no reason given)" in out


def test_a_bad_import_is_refused_whole_naming_the_entry(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, file = setup
    import_registry(cfg, file)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        registry_toml(
            ["127.0.0.1:9"],  # a good change, refused with the bad one
            grants=f'[[grant]]\nconsumer = "post"\nservice = "{SERVICE}"\nmethods = ["Nope"]\n\n'
            '[[grant]]\nconsumer = "ghost"\nservice = "x"\nmethods = ["*"]\n',
        )
    )
    code, out, err = tabadol("registry", "import", "--config", str(cfg), str(bad))
    assert code == 2 and out == ""
    assert f"{bad}: [[grant]] #1 (consumer 'post'): method 'Nope' is not in service" in err
    assert (
        f"{bad}: [[grant]] #2 (consumer 'ghost'): consumer 'ghost' is not a declared [[agency]]"
        in err
    )
    assert current_version(cfg) == 1
    # The same messages as for entries in a broker configuration file.
    shaped = tmp_path / "shape.toml"
    shaped.write_text('[[agency]]\nid = "Bad Id"\nname = "x"\n[[grant]]\nconsumer = "x"\n')
    code, _, err = tabadol("registry", "import", "--config", str(cfg), str(shaped))
    assert code == 2
    assert "[[agency]] #1 (id 'Bad Id') id: Value error" not in err
    assert f"{shaped}: [[agency]] #1 (id 'Bad Id') id: 'Bad Id' is not an agency id" in err
    assert f"{shaped}: [[grant]] #1 (consumer 'x') service: Field required" in err
    assert current_version(cfg) == 1


def test_entries_in_a_configuration_with_a_registry_url_are_an_error(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, "postgresql://u@127.0.0.1:1/db")
    cfg.write_text(cfg.read_text() + "\n" + registry_toml(ENDPOINTS))
    with pytest.raises(
        ConfigError,
        match=r"\[\[agency\]\], \[\[service\]\], \[\[grant\]\] entries are in the file.*live in the registry database; import them with `tabadol registry import",
    ):
        config.load(cfg)


def test_a_registry_url_must_be_postgresql(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, "mysql://x@h/db")
    with pytest.raises(ConfigError, match=r"\[registry\] url: expected a postgresql://"):
        config.load(cfg)


def test_an_unreachable_database_is_named_without_its_password(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    cfg = registry_config(
        tmp_path, pki.dir, echo_contracts, "postgresql://reg:s3cr3t-pw@127.0.0.1:1/exchange"
    )
    code, _, err = tabadol("registry", "history", "--config", str(cfg))
    assert code == 2
    assert "postgresql://reg@127.0.0.1:1/exchange is unreachable" in err
    assert "s3cr3t-pw" not in err


def test_registry_commands_need_a_registry_url(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    from tests.conftest import broker_toml

    cfg = tmp_path / "broker.toml"
    cfg.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=ENDPOINTS, grants="")
    )
    code, _, err = tabadol("registry", "export", "--config", str(cfg))
    assert code == 2 and "[registry] url is not set" in err


def test_skip_to_commits_the_file_as_a_version_above_the_newest(
    setup: tuple[Path, Path],
) -> None:
    cfg, file = setup
    import_registry(cfg, file)
    code, out, err = tabadol(
        "registry", "import", "--config", str(cfg), str(file), "--skip-to", "1"
    )
    assert code == 2 and out == ""
    assert (
        "cannot commit version 1: the registry's newest version is 1" in err
        and "--skip-to 2" in err
    )
    with pytest.raises(SystemExit):  # argparse: "0 is not a version number (1 or more)"
        tabadol("registry", "import", "--config", str(cfg), str(file), "--skip-to", "0")
    code, out, _ = tabadol("registry", "import", "--config", str(cfg), str(file), "--skip-to", "7")
    assert code == 0 and "committed registry version 7 (no change)" in out  # even unchanged
    assert current_version(cfg) == 7
    _, out, _ = tabadol("registry", "history", "--config", str(cfg))
    assert [line.split()[0] for line in out.splitlines()] == ["7", "1"]


def test_skip_to_far_above_the_newest_is_refused_as_a_typo(setup: tuple[Path, Path]) -> None:
    cfg, file = setup
    import_registry(cfg, file)
    for typo in (1_000_002, 2**63 - 1):
        code, out, err = tabadol(
            "registry", "import", "--config", str(cfg), str(file), "--skip-to", str(typo)
        )
        assert code == 2 and out == ""
        assert f"cannot commit version {typo}: that is more than 1,000,000 above" in err
        assert "newest version, 1 (a typo?)" in err and "at most 1000001" in err
    code, out, err = tabadol(
        "registry", "import", "--config", str(cfg), str(file), "--skip-to", "1000001"
    )
    assert code == 0, err
    assert current_version(cfg) == 1_000_001


def test_import_refuses_a_file_too_large_or_not_a_file_before_reading_it(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    from tabadol.registry.cli import MAX_REGISTRY_FILE_BYTES

    cfg, _ = setup
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as f:
        f.truncate(MAX_REGISTRY_FILE_BYTES + 1)  # sparse: nothing is written
    code, _, err = tabadol("registry", "import", "--config", str(cfg), str(huge))
    assert code == 2
    assert f"{huge}: {MAX_REGISTRY_FILE_BYTES + 1} bytes, more than a registry file may " in err
    assert "(16 MiB)" in err
    code, _, err = tabadol("registry", "diff", "--config", str(cfg), "/dev/zero")
    assert code == 2 and "/dev/zero: not a regular file" in err
    assert current_version(cfg) is None


def test_history_reads_the_versions_a_page_at_a_time(
    setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tabadol.registry import cli as registry_cli

    cfg, file = setup
    import_registry(cfg, file, reason="first")
    url = config.load(cfg).registry.url
    assert url is not None
    store = open_registry(url)
    try:
        for n in range(4):  # alternately with and without a grant
            entries = store.current()
            assert entries is not None
            data = dict(entries.entries)
            data["grant"] = data["grant"][:1] if n % 2 == 0 else entries.entries["grant"]
            if n % 2:
                data["grant"] = [*data["grant"], {"consumer": "tax", "service": SERVICE}]
            store.commit(data, "w", f"change {n}", digest(data))
    finally:
        store.close()
    monkeypatch.setattr(registry_cli, "_HISTORY_PAGE", 2)
    code, out, _ = tabadol("registry", "history", "--config", str(cfg))
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["5", "4", "3", "2", "1"]
    assert "change 2" in lines[1] and "[grant: 1 removed]" in lines[1]
    assert "change 1" in lines[2] and "[grant: 1 added]" in lines[2]  # from the page before
    assert "change 0" in lines[3] and "[grant: 1 removed]" in lines[3]


# -- publishing the CRL ---------------------------------------------------------------


def test_publish_crl_stores_a_newer_crl_of_the_ca_only(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg, _ = setup
    ca = CertificateAuthority.init(tmp_path / "own-pki", "tabadol.example")
    cfg.write_text(cfg.read_text().replace(str(config.load(cfg).broker.pki_dir), str(ca.dir)))
    ca.issue_broker()
    ca.write_crl()
    code, out, err = tabadol("registry", "publish-crl", "--config", str(cfg))
    assert code == 0, err
    assert "published CRL number" in out
    # The same CRL again, or an older one, is refused: a CRL only moves forward.
    code, _, err = tabadol("registry", "publish-crl", "--config", str(cfg))
    assert code == 2 and "a CRL only moves forward" in err
    # A CRL some other CA signed is refused.
    other = CertificateAuthority.init(tmp_path / "other-pki", "tabadol.example")
    forged = tmp_path / "forged.pem"
    forged.write_bytes(
        crl_signed_by(other, number=99, next_update=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    )
    code, _, err = tabadol("registry", "publish-crl", "--config", str(cfg), str(forged))
    assert code == 2 and "not signed by the platform CA" in err
    newer = tmp_path / "newer.pem"
    newer.write_bytes(
        crl_signed_by(ca, number=50, next_update=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    )
    code, out, err = tabadol("registry", "publish-crl", "--config", str(cfg), str(newer))
    assert code == 0 and "number 50" in out, err


def test_a_stored_crl_counts_only_if_the_ca_signed_it_under_that_number(
    tmp_path: Path,
) -> None:
    from tabadol.registry.crl import counts, newest_counting

    ca = CertificateAuthority.init(tmp_path / "pki", "tabadol.example")
    other = CertificateAuthority.init(tmp_path / "other", "tabadol.example")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    now = dt.datetime.now(dt.UTC)

    def row(der: bytes, number: int) -> StoredCrl:
        return StoredCrl(number, der, now, "x")

    def der(signer: CertificateAuthority, number: int) -> bytes:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        pem = crl_signed_by(signer, number=number, next_update=later)
        return x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)

    genuine = der(ca, 4)
    assert counts(row(genuine, 4), ca.cert)
    assert not counts(row(genuine, 10**12), ca.cert)  # the CA's CRL, renumbered in the table
    assert not counts(row(der(other, 9), 9), ca.cert)  # another CA's
    assert not counts(row(b"junk", 9), ca.cert)
    rows = [row(genuine, 10**12), row(der(other, 9), 9), row(genuine, 4), row(der(ca, 3), 3)]
    chosen = newest_counting(rows, ca.cert)
    assert chosen is not None and chosen.number == 4


# -- the store's contract, over every implementation ---------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "memory":
        yield MemoryRegistryStore()
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"  # an absolute path: sqlite:////...
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_registry(url)
    try:
        yield opened
    finally:
        opened.close()


ONE = {"agency": [{"id": "post", "name": "Post"}], "service": [], "grant": [], "limit": []}
TWO = {
    "agency": [{"id": "post", "name": "Post"}, {"id": "tax", "name": "Tax"}],
    "service": [],
    "grant": [],
    "limit": [],
}


def test_store_starts_empty_and_numbers_versions_one_after_another(store: Registry) -> None:
    assert store.head() is None and store.current() is None and store.history() == []
    first = store.commit(ONE, "alice", "first", digest(ONE))
    second = store.commit(TWO, "bob", "second", digest(TWO))
    assert (first.number, second.number) == (1, 2)
    head = store.head()
    assert head is not None and (head.number, head.digest) == (2, digest(TWO))
    current = store.current()
    assert current is not None and current.entries == TWO and current.created_by == "bob"
    v1 = store.version(1)
    assert v1 is not None and v1.entries == ONE and v1.reason == "first"
    assert store.version(3) is None
    assert [v.number for v in store.history()] == [1, 2]
    assert first.created_at <= second.created_at


async def test_store_announces_each_commit(store: Registry) -> None:
    heard: list[tuple[str, int]] = []
    ready = asyncio.Event()

    async def listen() -> None:
        stream = store.announcements()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the listener registers before the commit
        ready.set()
        a = await first
        heard.append((a.kind, a.number))

    task = asyncio.create_task(listen())
    await ready.wait()
    # LISTEN takes a moment on a server: commit until the listener hears one (bounded).
    for _ in range(100):
        await asyncio.to_thread(store.commit, ONE, "a", "r", digest(ONE))
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            break
    assert heard and heard[0][0] == "registry" and heard[0][1] >= 1


def good(row: StoredCrl) -> bool:
    """The contract's stand-in for "signed by the CA, numbered as in the CRL itself"."""
    return row.der.startswith(b"good")


def test_store_crl_only_moves_forward_over_the_rows_that_count(store: Registry) -> None:
    assert store.crls() == []
    store.publish_crl(b"good-1", 5, "alice", good)
    with pytest.raises(RegistryRefused, match="not newer"):
        store.publish_crl(b"good-0", 5, "mallory", good)
    with pytest.raises(RegistryRefused, match="not newer"):
        store.publish_crl(b"good-0", 4, "mallory", good)
    store.publish_crl(b"good-2", 6, "bob", good)
    # A row that does not count, however high its number, blocks nothing and is still
    # handed to readers, who judge it.
    store.publish_crl(b"junk", 10**12, "mallory", lambda row: True)
    store.publish_crl(b"good-3", 7, "carol", good)
    rows = store.crls()
    assert [(c.number, c.der) for c in rows] == [
        (10**12, b"junk"),
        (7, b"good-3"),
        (6, b"good-2"),
        (5, b"good-1"),
    ]
    assert rows[1].published_by == "carol"
    assert [c.number for c in store.crls(above=6)] == [10**12, 7]


def test_store_crls_leave_out_the_rows_a_reader_has_judged(store: Registry) -> None:
    first = store.publish_crl(b"good-1", 5, "alice", good)
    junk = store.publish_crl(b"junk", 10**12, "mallory", lambda row: True)
    rows = store.crls(above=5)
    assert [(c.id, c.der) for c in rows] == [(junk.id, b"junk")]
    assert store.crls(above=5, skip={junk.id}) == []
    later = store.publish_crl(b"good-2", 6, "bob", good)
    assert [c.id for c in store.crls(above=5, skip={junk.id})] == [later.id]
    assert [c.id for c in store.crls(skip={junk.id, later.id})] == [first.id]
    assert len({first.id, junk.id, later.id}) == 3


def test_store_versions_page_and_skip_to_a_number(store: Registry) -> None:
    for _ in range(3):
        store.commit(ONE, "a", "r", digest(ONE))
    with pytest.raises(RegistryRefused, match=r"newest version is 3.*--skip-to 4"):
        store.commit(TWO, "a", "r", digest(TWO), number=3)
    skipped = store.commit(TWO, "a", "after a restore", digest(TWO), number=10)
    assert skipped.number == 10
    assert store.commit(ONE, "a", "r", digest(ONE)).number == 11
    v10 = store.version(10)
    assert v10 is not None and v10.entries == TWO and store.version(5) is None
    assert [v.number for v in store.history(limit=2)] == [1, 2]
    assert [v.number for v in store.history(after=2, limit=2)] == [3, 10]
    assert [v.number for v in store.history(after=10)] == [11]


def test_store_refuses_a_number_far_above_the_newest(store: Registry) -> None:
    from tabadol.registry.store.base import MAX_SKIP

    store.commit(ONE, "a", "r", digest(ONE))
    with pytest.raises(RegistryRefused, match=r"more than 1,000,000 above .* newest version, 1"):
        store.commit(TWO, "a", "typo", digest(TWO), number=2 + MAX_SKIP)
    assert store.commit(TWO, "a", "r", digest(TWO), number=1 + MAX_SKIP).number == 1 + MAX_SKIP
    assert store.commit(ONE, "a", "r", digest(ONE)).number == 2 + MAX_SKIP


def test_version_numbers_stop_far_below_the_end_of_bigint() -> None:
    from tabadol.registry.store.base import MAX_VERSION, number_refused

    assert MAX_VERSION * 1000 < 2**63
    assert number_refused("db", None, MAX_VERSION - 1) is None
    why = number_refused("db", None, MAX_VERSION)  # a number written past `registry import`
    assert why is not None and f"version numbers stop at {MAX_VERSION}" in why
    assert number_refused("db", MAX_VERSION + 1, MAX_VERSION - 5) is not None


def test_postgres_a_version_numbered_near_the_end_is_said_not_a_traceback(
    postgres_url: str,
) -> None:
    commit_one(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as registrar:
        registrar.execute(
            "INSERT INTO registry_versions (version, created_by, reason, entries, digest) "
            "VALUES (%s, 'x', 'x', '{}'::jsonb, 'x')",
            (2**63 - 1,),
        )
    store = open_registry(postgres_url)
    try:
        with pytest.raises(RegistryRefused, match="version numbers stop at 9007199254740992"):
            store.commit(ONE, "a", "r", digest(ONE))
    finally:
        store.close()


def commit_one(url: str) -> None:
    """Version 1 (ONE, by alice), which also creates the tables."""
    store = open_registry(url)
    try:
        store.commit(ONE, "alice", "first", digest(ONE))
    finally:
        store.close()


def test_postgres_versions_are_never_updated_or_deleted(postgres_url: str) -> None:
    commit_one(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for statement in (
            "UPDATE registry_versions SET created_by = 'mallory'",
            "DELETE FROM registry_versions",
            "TRUNCATE registry_versions",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="never changed"):
                conn.execute(statement)
        row = conn.execute("SELECT created_by FROM registry_versions").fetchone()
        assert row == ("alice",)


def test_postgres_commits_from_many_writers_get_serial_versions(postgres_url: str) -> None:
    import concurrent.futures

    stores = [open_registry(postgres_url) for _ in range(4)]
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            numbers = list(
                pool.map(
                    lambda s: [s.commit(ONE, "w", "r", digest(ONE)).number for _ in range(5)],
                    stores,
                )
            )
        assert sorted(n for ns in numbers for n in ns) == list(range(1, 21))
    finally:
        for s in stores:
            s.close()


def test_postgres_change_waits_for_another_at_most_lock_timeout(postgres_url: str) -> None:
    from tabadol.registry.store.postgres import PostgresRegistryStore

    store = PostgresRegistryStore(postgres_url, lock_timeout_s=0.5)
    try:
        store.commit(ONE, "alice", "first", digest(ONE))
        with psycopg.connect(postgres_url) as other:  # a change in progress, stuck
            other.execute("SELECT id FROM registry_lock FOR UPDATE")
            with pytest.raises(RegistryBusy, match="another change held the registry lock"):
                store.commit(TWO, "bob", "second", digest(TWO))
            with pytest.raises(RegistryBusy, match="cannot publish a CRL"):
                store.publish_crl(b"good", 1, "bob", good)
            other.rollback()
        assert store.commit(TWO, "bob", "second", digest(TWO)).number == 2
        assert store.crls() == []
    finally:
        store.close()


def test_postgres_only_a_role_that_may_update_the_lock_row_can_hold_changes_up(
    postgres_url: str,
) -> None:
    commit_one(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as su:
        su.execute("DROP ROLE IF EXISTS reader")
        su.execute("CREATE ROLE reader LOGIN")
        su.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader")
        with pytest.raises(psycopg.errors.RaiseException, match="never changed"):
            su.execute("DELETE FROM registry_lock")
    with psycopg.connect(postgres_url.replace("postgres@", "reader@", 1)) as reader:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("SELECT id FROM registry_lock FOR UPDATE")
        reader.rollback()
        for mode in ("SHARE", "SHARE ROW EXCLUSIVE", "EXCLUSIVE"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute(f"LOCK TABLE registry_lock IN {mode} MODE")
            reader.rollback()


def test_postgres_crl_rows_no_crl_can_have_are_passed_over(postgres_url: str) -> None:
    store = open_registry(postgres_url)
    try:
        store.publish_crl(b"good-1", 1, "alice", good)
        with psycopg.connect(postgres_url, autocommit=True) as db:
            for number in ("NaN", "Infinity", "2.5"):
                db.execute(
                    "INSERT INTO registry_crls (number, der, published_by) VALUES (%s, 'x', 'm')",
                    (number,),
                )
        assert [c.number for c in store.crls()] == [1]
        store.publish_crl(b"good-2", 2, "alice", good)
        assert [c.der for c in store.crls(above=1)] == [b"good-2"]
    finally:
        store.close()


def test_an_unreachable_postgres_store_raises_registry_unavailable() -> None:
    store = open_registry("postgresql://reg:pw@127.0.0.1:1/db")
    with pytest.raises(
        RegistryUnavailable, match=r"postgresql://reg@127.0.0.1:1/db is unreachable"
    ):
        store.head()


# -- pure parts -------------------------------------------------------------------------


def test_diff_keys_entries_by_their_identity() -> None:
    before = {
        "grant": [{"consumer": "post", "service": "s", "methods": ["*"]}],
        "limit": [{"consumer": "post", "rate": 1.0}],
    }
    after = {
        "grant": [{"consumer": "post", "service": "s", "methods": ["A"]}],
        "limit": [{"consumer": "post", "rate": 2.0}],
    }
    changes = diff(before, after)
    assert changes == [
        Change("changed", "grant", "'post' 's'", ("methods -* +A",)),
        Change("changed", "limit", "'post' (all services)", ("rate 1.0 -> 2.0",)),
    ]
    assert summary(changes) == "grant: 1 changed; limit: 1 changed"
    assert summary([]) == "no change"
    assert digest(before) != digest(after) and digest(before) == digest(
        dict(reversed(before.items()))
    )


def test_freshness_refuses_only_past_max_age_under_refuse() -> None:
    fresh = RegistryFreshness(10.0, "refuse", confirmed_at=1000.0)
    assert fresh.refusal(1010.0) is None and fresh.age(1005.0) == 5.0
    why = fresh.refusal(1011.0)
    assert why is not None and "registry is stale" in why and "1970-01-01 00:16:40 UTC" in why
    fresh.confirm(1011.0)
    assert fresh.refusal(1011.5) is None
    serving = RegistryFreshness(10.0, "serve", confirmed_at=1000.0)
    assert serving.stale(2000.0) and serving.refusal(2000.0) is None


def test_freshness_of_a_node_behind_a_database_that_answers_says_why() -> None:
    behind = RegistryFreshness(10.0, "refuse", confirmed_at=1000.0)
    behind.behind = "this node cannot apply the registry database's current version, 7"
    why = behind.refusal(1011.0)
    assert why is not None and "registry is stale: this node cannot apply" in why
    assert "last confirmed current at 1970-01-01 00:16:40 UTC" in why
    assert "has not been reachable" not in why


@pytest.mark.parametrize(
    ("entries", "said"),
    [
        ([], "its entries are a list, not a table of agency, service, grant, limit"),
        ("x", "its entries are a string, not a table"),
        ({"agency": 5}, "its 'agency' is a number, not a list of [[agency]] entries"),
        ({"grant": {"a": 1}}, "its 'grant' is a table, not a list"),
        ({"service": [{"name": "s"}, None]}, "its [[service]] #2 is null, not a table"),
        ({"limit": [[1]]}, "its [[limit]] #1 is a list, not a table"),
    ],
)
def test_entries_of_the_wrong_shape_are_named_before_any_digest(entries: object, said: str) -> None:
    from tabadol.registry.entries import shape_problem

    problem = shape_problem(entries)
    assert problem is not None and said in problem
    assert shape_problem(ONE) is None and shape_problem({}) is None


def test_exported_toml_is_valid_toml_for_awkward_values() -> None:
    from tabadol.registry.entries import to_toml

    data = {
        "agency": [
            {
                "id": "a",
                "name": 'Quote " and \\ and é\nnewline, DEL \x7f and \x1f',
                "visits_per_exchange": 0.5,
            }
        ]
    }
    assert tomllib.loads(to_toml(data, "header\nline")) == {"agency": data["agency"]}


def test_the_tools_that_read_the_registry_read_the_version_in_force(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """`config check`, the quarterly report and the ops console take the agencies from the
    registry database, not from the file (which holds none)."""
    from tabadol.ledger.store import SqliteLedgerStore
    from tabadol.ops.server import open_accounts

    cfg, file = setup
    code, _, err = tabadol("config", "check", "--config", str(cfg))
    assert code != 0 and "holds no registry version yet" in err
    import_registry(cfg, file)
    code, out, _ = tabadol("config", "check", "--config", str(cfg))
    assert code == 0 and "OK (registry version 1): 5 agencies, 1 services, 2 grants" in out
    out_dir = tmp_path / "reports"
    SqliteLedgerStore(tmp_path / "var" / "ledger.db").close()  # a broker has run: empty ledger
    code, _, err = tabadol(
        "report", "quarterly", "--config", str(cfg), "--quarter", "1405-Q3", "--out", str(out_dir)
    )
    assert code == 0, err
    report = next(out_dir.glob("*.json")).read_text()
    assert '"echo"' in report and '"tax"' in report
    accounts = open_accounts(cfg)
    try:
        assert set(accounts.config.agencies) == {"echo", "post", "nocr", "cra", "tax"}
    finally:
        accounts.close()
