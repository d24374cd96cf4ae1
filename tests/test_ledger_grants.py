"""The ledger records which grant admitted each call: schema 3, with every older ledger still
verifying, in every store, archive and journal, and in the rollups the reports read."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tabadol.cli import main
from tabadol.ledger import LedgerWriter, archive, rollup
from tabadol.ledger.journal import JournalEntry, parse_line
from tabadol.ledger.record import FIELD_NAMES, GENESIS, LedgerRecord, chain_digest
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.ledger.store.postgres import PostgresLedgerStore
from tabadol.pki import CertificateAuthority
from tests.conftest import broker_toml
from tests.test_ledger import check, record, tamper
from tests.test_ledger_archive import (  # noqa: F401  (make_store: a fixture)
    Clock,
    archive_through,
    archives_verdict,
    fill,
    live_verdict,
    make_store,
)
from tests.test_ledger_store_contract import seal_with, verdicts

DAY_NS = 86_400 * 10**9


def granted(i: int) -> LedgerRecord:
    """Calls admitted by two grants in turn, every fourth refused (no grant), one a day."""
    grant = "" if i % 4 == 0 else ("g-civil" if i % 2 else "g-tax")
    start = 1_760_000_000 * 10**9 + (i % 3) * DAY_NS + i
    return record(i, start_ns=start, end_ns=start + 1000 * i, grant=grant)


def canonical_by_rule(r: LedgerRecord, schema: int) -> bytes:
    """The canonical bytes as the schema's rule defines them, independently of the code."""
    last = {1: "consumer_serial", 2: "grant", 3: "protocol", 4: None}[schema]
    names = FIELD_NAMES if last is None else FIELD_NAMES[: FIELD_NAMES.index(last)]
    return json.dumps([schema, *(getattr(r, n) for n in names)], separators=(",", ":")).encode()


def sealer_of(pki: CertificateAuthority) -> Sealer:
    return Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())


# -- the digest -----------------------------------------------------------------------------


def test_a_record_no_grant_admitted_hashes_exactly_as_before_grants() -> None:
    schema_1, schema_2 = record(1), record(2, consumer_serial="0a", consumer_verified=False)
    assert schema_1.grant == schema_2.grant == ""
    assert schema_1.canonical() == canonical_by_rule(schema_1, 1)
    assert schema_2.canonical() == canonical_by_rule(schema_2, 2)
    expected = hashlib.sha256(bytes.fromhex(GENESIS) + canonical_by_rule(schema_2, 2))
    assert chain_digest(GENESIS, schema_2) == expected.hexdigest()


def test_a_granted_record_is_schema_3_and_its_digest_covers_the_grant() -> None:
    r = record(1, grant="g-civil")
    assert r.canonical() == canonical_by_rule(r, 3)
    assert r.canonical().startswith(b"[3,") and r.canonical().endswith(b',"g-civil"]')
    digests = {
        chain_digest(GENESIS, record(1, grant=g)) for g in ("g-civil", "g-civil2", "G-civil", "")
    }
    assert len(digests) == 4


def test_a_ledger_with_grants_verifies_and_any_change_to_a_grant_breaks_it(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedgerStore(path), sealer_of(pki))
    for i in range(1, 9):
        writer.submit(granted(i))
    writer.close()
    assert check(path, pki).startswith("OK: 8 records")
    store = SqliteLedgerStore(path, readonly=True)
    assert [s.record for s in store.records()] == [granted(i) for i in range(1, 9)]
    store.close()
    for statement, position in (
        ("UPDATE records SET grant = 'g-tax' WHERE seq = 3", 3),  # another grant
        ("UPDATE records SET grant = '' WHERE seq = 5", 5),  # as if none admitted it
        ("UPDATE records SET grant = 'g-civil' WHERE seq = 4", 4),  # a refused call granted
    ):
        copy = tmp_path / f"copy-{position}.db"
        copy.write_bytes(path.read_bytes())
        assert tamper(copy, statement) == [1]
        assert check(copy, pki) == (
            f"BROKEN at position {position}: its contents do not match its digest "
            "(the record was edited)"
        )


# -- every store, and the rollups --------------------------------------------------------------


def test_every_store_round_trips_the_grant_and_rolls_up_by_it(
    make_store: Callable[[], Any],  # noqa: F811
    pki: CertificateAuthority,
) -> None:
    store, records = make_store(), [granted(i) for i in range(1, 13)]
    sealer = sealer_of(pki)
    chain = store.chain_for("node-1")
    store.append_sealed(records[:7], seal_with(sealer, chain), sealer.cert_pem, chain)
    store.append_sealed(records[7:], seal_with(sealer, chain), sealer.cert_pem, chain)
    assert [s.record for s in store.records(chain)] == records
    assert set(verdicts(store, pki).values()) == {"OK: 12 records, 2 seals, chain and seals intact"}
    rows = store.rollup_rows(chain)
    assert rows == rollup.rollup(records)
    by_grant: dict[str, int] = {}
    for key, totals in rows.groups.items():
        by_grant[key.grant] = by_grant.get(key.grant, 0) + totals.calls
    assert by_grant == {"": 3, "g-civil": 6, "g-tax": 3}
    assert store.rebuild_rollup(chain) == rows  # what was kept is what the records say
    assert store.rollup_rows(chain) == rows
    groups = store.call_groups(0, 2**63 - 1)
    assert sorted((g.grant, g.calls) for g in groups) == [("", 3), ("g-civil", 6), ("g-tax", 3)]
    # Edges read from records and whole days from rollups agree on the grant too.
    first_day = rollup.day_of(records[0].start_ns)[0]
    edged = store.call_groups(first_day + 1, first_day + 3 * DAY_NS)
    expected = [r for r in records if first_day + 1 <= r.start_ns < first_day + 3 * DAY_NS]
    for grant in ("", "g-civil", "g-tax"):
        assert sum(g.calls for g in edged if g.grant == grant) == sum(
            1 for r in expected if r.grant == grant
        )


def test_archives_round_trip_the_grant_and_still_read_lines_from_before_it(
    make_store: Callable[[], Any],  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
) -> None:
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [3, 4, 2], clock, granted)
    out = tmp_path / "out"
    done = archive_through(store, pki, out, seals[1])
    assert done.path is not None
    assert archives_verdict(out, pki) == ("", "7 records, 2 seals")
    contents = archive.open_archive(done.path)
    read = [item.record for item in contents.items if not hasattr(item, "head_digest")]
    assert read == [granted(i) for i in range(1, 8)]
    lines = zipfile_lines(done.path)
    assert sum(line.endswith(b'"]') for line in lines) == 6  # granted: schema 3, grant last
    assert sum(line.endswith((b"true]", b"false]")) for line in lines) == 1  # as before grants
    assert live_verdict(store, pki).startswith("OK")
    assert store.archived() is not None


def zipfile_lines(path: Path) -> list[bytes]:
    import zipfile

    content = zipfile.ZipFile(path).read(archive.CONTENT)
    return [line for line in content.split(b"\n") if line.startswith(b"[")]


def test_a_journal_line_written_before_grants_reads_as_no_grant() -> None:
    line = JournalEntry("s1", record=record(7)).line()
    fields = json.loads(line)
    del fields["record"]["grant"]  # as a broker from before grants wrote it
    entry = parse_line(json.dumps(fields).encode())
    assert entry is not None and entry.record == record(7)
    assert parse_line(JournalEntry("s1", record=granted(3)).line()) == JournalEntry(
        "s1", record=granted(3)
    )


# -- ledgers from before grants: migrated, and still verifying ---------------------------------

# The SQLite call group table as ledgers before grants made it.
_OLD_SQLITE_GROUPS = """CREATE TABLE rollup_groups (
        day_ns INTEGER NOT NULL,
        chain TEXT NOT NULL,
        archived INTEGER NOT NULL CHECK (archived IN (0, 1)),
        consumer TEXT NOT NULL,
        provider TEXT NOT NULL,
        service TEXT NOT NULL,
        method TEXT NOT NULL,
        status_code INTEGER NOT NULL,
        forwarded INTEGER NOT NULL,
        verified INTEGER NOT NULL,
        calls INTEGER NOT NULL,
        duration_ns INTEGER NOT NULL,
        request_bytes INTEGER NOT NULL,
        response_bytes INTEGER NOT NULL,
        histogram TEXT NOT NULL,
        PRIMARY KEY (day_ns, chain, archived, consumer, provider, service, method, status_code,
                     forwarded, verified)
    ) WITHOUT ROWID"""
_OLD_GROUP_COLUMNS = (
    "day_ns, chain, archived, consumer, provider, service, method, status_code, forwarded, "
    "verified, calls, duration_ns, request_bytes, response_bytes, histogram"
)


def old_sqlite_ledger(path: Path, pki: CertificateAuthority, records: list[LedgerRecord]) -> None:
    """A ledger in the schema from before grants: its records table without the grant column
    and its call group table as it was made then (the old DDL)."""
    writer = LedgerWriter(SqliteLedgerStore(path), sealer_of(pki))
    for r in records:
        writer.submit(r)
    writer.close()
    tamper(
        path,
        "ALTER TABLE records DROP COLUMN grant",
        "ALTER TABLE rollup_groups RENAME TO new_groups",
        _OLD_SQLITE_GROUPS,
        f"INSERT INTO rollup_groups SELECT {_OLD_GROUP_COLUMNS} FROM new_groups",
        "DROP TABLE new_groups",
    )


@pytest.fixture
def config(tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"], grants="")
        + '\n[ledger]\npath = "ledger.db"\n'
    )
    return path


def test_a_sqlite_ledger_from_before_grants_verifies_then_migrates_and_keeps_verifying(
    config: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config.parent / "ledger.db"
    before = [record(i) for i in range(1, 6)]
    old_sqlite_ledger(path, pki, before)
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(records)")}
    assert "grant" not in columns
    assert check(path, pki).startswith("OK: 5 records")  # read-only, unmigrated
    reader = SqliteLedgerStore(path, readonly=True)  # as the ops console: records answer
    assert [g.grant for g in reader.call_groups(0, 2**63 - 1)] == [""]
    assert [s.record for s in reader.records()] == before
    reader.close()

    sealer = sealer_of(pki)
    writer = LedgerWriter(SqliteLedgerStore(path), sealer)  # a broker opens it: migrated
    after = [granted(i) for i in range(6, 10)]
    for r in after:
        writer.submit(r)
    writer.close()
    assert check(path, pki).startswith("OK: 9 records")
    store = SqliteLedgerStore(path)
    assert [s.record for s in store.records()] == before + after
    assert store.rollup_rows() == rollup.rollup(before + after)
    store.close()
    capsys.readouterr()
    assert main(["ledger", "verify", "--config", str(config), "--full"]) == 0
    assert main(["ledger", "rollup", "--rebuild", "--config", str(config)]) == 0
    assert capsys.readouterr().out.endswith(f"{path}: rollups match the records\n")
    store = SqliteLedgerStore(path, readonly=True)
    assert store.rollup_rows() == rollup.rollup(before + after)
    store.close()


def test_a_postgres_ledger_from_before_grants_is_migrated_and_verifies(
    postgres_url: str, pki: CertificateAuthority
) -> None:
    sealer = sealer_of(pki)
    before = [record(i) for i in range(1, 6)]
    store = PostgresLedgerStore(postgres_url)
    store.append_sealed(before, seal_with(sealer, "node-1"), sealer.cert_pem, "node-1")
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # back to the old schema
        conn.execute('ALTER TABLE ledger_records DROP COLUMN "grant"')
        conn.execute('ALTER TABLE ledger_rollup_groups DROP COLUMN "grant"')  # and its key
        conn.execute(
            "ALTER TABLE ledger_rollup_groups ADD PRIMARY KEY (chain, archived, day_ns, "
            "consumer, provider, service, method, status_code, forwarded, verified)"
        )
    with pytest.raises(Exception, match="written before rollups \\(or before grants"):
        PostgresLedgerStore(postgres_url, readonly=True)
    store = PostgresLedgerStore(postgres_url)  # the owner opens it: the columns are added
    after = [granted(i) for i in range(6, 10)]
    store.append_sealed(after, seal_with(sealer, "node-1"), sealer.cert_pem, "node-1")
    try:
        assert [s.record for s in store.records("node-1")] == before + after
        assert verdicts(store, pki) == {"node-1": "OK: 9 records, 2 seals, chain and seals intact"}
        assert store.rollup_rows("node-1") == rollup.rollup(before + after)
        assert store.rebuild_rollup("node-1") == rollup.rollup(before + after)
    finally:
        store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        key = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'ledger_rollup_groups'::regclass AND contype = 'p'"
        ).fetchone()
    assert key is not None and key[0].endswith('verified, "grant", protocol)')
