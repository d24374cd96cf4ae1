"""The ledger records which protocol each call came in by (gRPC, Connect or REST/JSON): schema
4 for the gateway's calls, while a gRPC call's record hashes and reads exactly as before, in
every store, archive and journal, in the rollups and in the quarterly report."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import sqlite3
import zipfile
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tabadol.cli import main
from tabadol.ledger import LedgerWriter, archive, rollup
from tabadol.ledger.journal import JournalEntry, parse_line
from tabadol.ledger.record import (
    GENESIS,
    PROTOCOLS,
    LedgerRecord,
    Seal,
    StoredRecord,
    chain_digest,
)
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.ledger.store.postgres import PostgresLedgerStore
from tabadol.ops.app import own_assessment
from tabadol.pki import CertificateAuthority
from tabadol.reports import (
    ProtocolCalls,
    Quarter,
    QuarterlyReport,
    build_quarterly,
    calls_by_protocol,
    render_html,
    render_protocols_csv,
    report_json,
    write_quarterly,
)
from tabadol.reports.figures import National
from tests.support.echo import SERVICE as ECHO
from tests.test_ledger import check, record, tamper
from tests.test_ledger_archive import (  # noqa: F401  (make_store: a fixture)
    Clock,
    archive_through,
    archives_verdict,
    fill,
    live_verdict,
    make_store,
)
from tests.test_ledger_grants import canonical_by_rule, config, sealer_of  # noqa: F401
from tests.test_ledger_store_contract import seal_with, verdicts
from tests.test_reports import MS, Q2, Q3
from tests.test_reports_purpose import MID, write_config

DAY_NS = 86_400 * 10**9


def by(i: int, protocol: str | None = None) -> LedgerRecord:
    """Calls by the three protocols in turn, some admitted by a grant, one a day."""
    protocol = PROTOCOLS[i % 3] if protocol is None else protocol
    grant = "" if i % 4 == 0 else "g-civil"
    start = 1_760_000_000 * 10**9 + (i % 3) * DAY_NS + i
    return record(i, start_ns=start, end_ns=start + 1000 * i, grant=grant, protocol=protocol)


def fixed(i: int, **changes: Any) -> LedgerRecord:
    """A record with every field fixed, for the digests pinned below."""
    values: dict[str, Any] = dict(
        start_ns=1_760_000_000_000_000_000 + i, end_ns=1_760_000_000_250_000_000 + i,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736", request_id=f"req-{i}", consumer="post",
        provider="nocr", service="tabadol.agencies.nocr.v1.PersonRegistry",
        method="InquirePerson", kind="unary", status_code=0, request_bytes=31,
        request_messages=1, response_bytes=87, response_messages=1, endpoint="10.0.0.7:50051",
        broker_instance="broker-1",
    )  # fmt: skip
    values.update(changes)
    return LedgerRecord(**values)


def old_forms() -> list[LedgerRecord]:
    """gRPC calls in schema 1's, 2's and 3's forms."""
    return [
        fixed(1),
        fixed(2, consumer_serial="3f9a"),
        fixed(3, consumer_serial="3f9a", grant="g-post-nocr"),
    ]


# -- the digest -----------------------------------------------------------------------------

# What the code before protocols computed for old_forms(): their digests from the genesis,
# their rollup's statement digest, and the SHA-256 of their archive lines.
_DIGESTS_BEFORE = [
    "d1add1acb845dfafa36bd4e024e92e8a73d529c987981537839eacf6edae4778",
    "1be1fa3d357c63588a6283b9e280e27c8e13d6a864ceebcc986616fd113c81b7",
    "dcbbbce17912b3509d89eaa4ab13ec4d206f984f81513910beb797cd2f0ddcb8",
]
_ROLLUP_BEFORE = "aa664d28c431bb225b1f72c3139b62ec6db85ed303916df9b40de2e274db8e94"
_LINES_BEFORE = "9a2ab876f5f0330f21a684c1ab762b6cb224f7b1dfc802cd210dfa38f8f2d193"


def test_a_grpc_call_hashes_reads_and_rolls_up_exactly_as_before_protocols() -> None:
    records = old_forms()
    assert all(r.protocol == "grpc" for r in records)
    assert [chain_digest(GENESIS, r) for r in records] == _DIGESTS_BEFORE
    for schema, r in enumerate(records, start=1):
        assert r.canonical() == canonical_by_rule(r, schema)
    assert rollup.rollup(records).digest() == _ROLLUP_BEFORE
    lines = b"".join(archive.record_line(StoredRecord(1, r, "", "")) for r in records)
    assert hashlib.sha256(lines).hexdigest() == _LINES_BEFORE


def test_a_call_by_another_protocol_is_schema_4_and_its_digest_covers_the_protocol() -> None:
    for r in (fixed(1, protocol="rest"), fixed(3, grant="g-post-nocr", protocol="connect")):
        assert r.canonical() == canonical_by_rule(r, 4)
        assert r.canonical().startswith(b"[4,")
        assert r.canonical().endswith(f',"{r.grant}","{r.protocol}"]'.encode())
    digests = {
        chain_digest(GENESIS, fixed(1, protocol=p)) for p in ("grpc", "connect", "rest", "REST", "")
    }
    assert len(digests) == 5


def test_a_ledger_with_protocols_verifies_and_any_change_to_one_breaks_it(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(SqliteLedgerStore(path), sealer_of(pki))
    for i in range(1, 10):
        writer.submit(by(i))
    writer.close()
    assert check(path, pki).startswith("OK: 9 records")
    store = SqliteLedgerStore(path, readonly=True)
    assert [s.record for s in store.records()] == [by(i) for i in range(1, 10)]
    store.close()
    for statement, position in (
        ("UPDATE records SET protocol = 'rest' WHERE seq = 3", 3),  # a gRPC call as REST
        ("UPDATE records SET protocol = 'grpc' WHERE seq = 4", 4),  # a Connect call as gRPC
        ("UPDATE records SET protocol = 'connect' WHERE seq = 5", 5),  # REST as Connect
    ):
        copy = tmp_path / f"copy-{position}.db"
        copy.write_bytes(path.read_bytes())
        assert tamper(copy, statement) == [1]
        assert check(copy, pki) == (
            f"BROKEN at position {position}: its contents do not match its digest "
            "(the record was edited)"
        )


def test_sqlite_renders_each_schema_s_canonical_bytes_as_the_record_does(tmp_path: Path) -> None:
    records = [
        *old_forms(),
        fixed(4, protocol="rest"),
        fixed(5, consumer_verified=False, grant="g-1", protocol="connect"),
        fixed(6, grant='g"\\', protocol="r\u00e9st\x7f"),  # Python renders what SQLite would not
    ]
    store = SqliteLedgerStore(tmp_path / "ledger.db")
    store.append_sealed(records, unsigned, b"")
    try:
        assert [c for *_, c in store.canonical_rows(1, 6)] == [r.canonical() for r in records]
        fields = [f for *_, f in store.canonical_and_rollup_rows(1, 6)]
        assert [f[-1] for f in fields] == [r.protocol for r in records]
    finally:
        store.close()


def unsigned(seq: int, count: int, head: str) -> Seal:
    """A seal no one signed: for what a test reads back, not for verify."""
    return Seal(seq, count, head, 0, "test", "00")


# -- every store, and the rollups --------------------------------------------------------------


def test_every_store_round_trips_the_protocol_and_rolls_up_by_it(
    make_store: Callable[[], Any],  # noqa: F811
    pki: CertificateAuthority,
) -> None:
    store, records = make_store(), [by(i) for i in range(1, 13)]
    sealer = sealer_of(pki)
    chain = store.chain_for("node-1")
    store.append_sealed(records[:7], seal_with(sealer, chain), sealer.cert_pem, chain)
    store.append_sealed(records[7:], seal_with(sealer, chain), sealer.cert_pem, chain)
    assert [s.record for s in store.records(chain)] == records
    assert set(verdicts(store, pki).values()) == {"OK: 12 records, 2 seals, chain and seals intact"}
    rows = store.rollup_rows(chain)
    assert rows == rollup.rollup(records)
    by_protocol: dict[str, int] = {}
    for key, totals in rows.groups.items():
        by_protocol[key.protocol] = by_protocol.get(key.protocol, 0) + totals.calls
    assert by_protocol == {"grpc": 4, "connect": 4, "rest": 4}
    assert store.rebuild_rollup(chain) == rows  # what was kept is what the records say
    groups = store.call_groups(0, 2**63 - 1)
    assert {(g.protocol, g.grant): g.calls for g in groups} == {
        ("grpc", ""): 1, ("grpc", "g-civil"): 3, ("connect", ""): 1, ("connect", "g-civil"): 3,
        ("rest", ""): 1, ("rest", "g-civil"): 3,
    }  # fmt: skip
    # Edges read from records and whole days from rollups agree on the protocol too.
    first_day = rollup.day_of(records[0].start_ns)[0]
    edged = store.call_groups(first_day + 1, first_day + 3 * DAY_NS)
    expected = [r for r in records if first_day + 1 <= r.start_ns < first_day + 3 * DAY_NS]
    for protocol in PROTOCOLS:
        assert sum(g.calls for g in edged if g.protocol == protocol) == sum(
            1 for r in expected if r.protocol == protocol
        )


def test_a_rollup_row_of_another_protocol_is_its_own_row_in_the_statement() -> None:
    grpc = rollup.rollup(old_forms())
    for protocol in ("connect", "rest"):
        other = rollup.rollup([dataclasses.replace(r, protocol=protocol) for r in old_forms()])
        assert other.digest() != grpc.digest()
        assert [k.protocol for k in other.groups] == [protocol] * len(other.groups)
        both = rollup.Rollup()
        both.add(grpc)
        both.add(other)
        assert len(both.groups) == 2 * len(grpc.groups)
        assert any(f"by {protocol}" in line for line in both.differences(grpc))


# -- archives and the journal -------------------------------------------------------------------


def test_archives_round_trip_the_protocol_and_still_read_lines_from_before_it(
    make_store: Callable[[], Any],  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
) -> None:
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [3, 4, 2], clock, by)
    out = tmp_path / "out"
    done = archive_through(store, pki, out, seals[1])
    assert done.path is not None
    assert archives_verdict(out, pki) == ("", "7 records, 2 seals")
    contents = archive.open_archive(done.path)
    read = [item.record for item in contents.items if not hasattr(item, "head_digest")]
    assert read == [by(i) for i in range(1, 8)]
    lines = [json.loads(line) for line in _content_lines(done.path)]
    assert [len(fields) for fields in lines] == [
        22 if r.protocol != "grpc" else 21 if r.grant else 20 for r in read
    ]  # a gRPC call's line as before protocols (and before grants, when no grant admitted it)
    fast = archive.digest_file(done.path)  # each line hashed as it is, its schema by its end
    assert fast is not None and all(b.head == b.seal.head_digest for b in fast.batches)
    assert live_verdict(store, pki).startswith("OK")


def _content_lines(path: Path) -> list[bytes]:
    content = zipfile.ZipFile(path).read(archive.CONTENT)
    return [line for line in content.split(b"\n") if line.startswith(b"[")]


def test_an_archive_line_s_schema_is_told_by_how_it_ends() -> None:
    for r in [
        *old_forms(),
        fixed(4, protocol="rest"),
        fixed(5, grant="", protocol="connect"),
        fixed(6, grant='x\\",', protocol="rest"),
        fixed(7, consumer_verified=False, grant="rest"),  # a grant named like a protocol
        fixed(8, grant='\\","rest'),  # one whose end looks like a protocol's
    ]:
        line = archive.record_line(StoredRecord(1, r, "", ""))[:-1]
        assert archive.canonical_of(line) == r.canonical()
        assert archive._record(json.loads(line)) == r


def test_an_archive_of_calls_by_a_protocol_this_reader_does_not_know_still_verifies(
    make_store: Callable[[], Any],  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
) -> None:
    """Its lines are read value by value: slower, and as sound."""
    odd = ["", "grpc-web", 'x\\",']
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [3, 2], clock, lambda i: by(i, odd[i % 3]))
    done = archive_through(store, pki, tmp_path / "out", seals[1])
    assert done.path is not None
    assert archives_verdict(tmp_path / "out", pki) == ("", "5 records, 2 seals")
    read = [i.record for i in archive.open_archive(done.path).items if hasattr(i, "record")]
    assert [r.protocol for r in read] == [odd[i % 3] for i in range(1, 6)]
    fast = archive.digest_file(done.path)
    assert fast is not None and any(b.head != b.seal.head_digest for b in fast.batches)


def test_a_journal_line_written_before_protocols_reads_as_a_grpc_call() -> None:
    for dropped in (("protocol",), ("protocol", "grant")):
        line = JournalEntry("s1", record=fixed(7)).line()
        fields = json.loads(line)
        for name in dropped:
            del fields["record"][name]  # as a broker from before protocols (or grants) wrote it
        entry = parse_line(json.dumps(fields).encode())
        assert entry is not None and entry.record == fixed(7)
    for r in (fixed(3, protocol="rest"), fixed(4, grant="g-1", protocol="connect")):
        assert parse_line(JournalEntry("s1", record=r).line()) == JournalEntry("s1", record=r)
    fields = json.loads(JournalEntry("s1", record=fixed(5)).line())
    fields["record"]["protocol"] = 1  # not text: no record
    assert parse_line(json.dumps(fields).encode()) is None


def test_export_prints_each_record_s_protocol(
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
) -> None:
    writer = LedgerWriter(SqliteLedgerStore(config.parent / "ledger.db"), sealer_of(pki))
    for i in range(1, 4):
        writer.submit(by(i))
    writer.close()
    out = tmp_path / "export.csv"
    assert main(["ledger", "export", "--config", str(config), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["protocol"] for r in rows] == ["connect", "rest", "grpc"]
    assert (
        main(["ledger", "export", "--config", str(config), "--format", "jsonl", "--out", str(out)])
        == 0
    )
    assert [json.loads(line)["protocol"] for line in out.read_text().splitlines()] == [
        "connect",
        "rest",
        "grpc",
    ]


# -- ledgers from before protocols: read, migrated, and still verifying ------------------------

# The SQLite call group table as ledgers with grants but before protocols made it.
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
        grant TEXT NOT NULL DEFAULT '',
        calls INTEGER NOT NULL,
        duration_ns INTEGER NOT NULL,
        request_bytes INTEGER NOT NULL,
        response_bytes INTEGER NOT NULL,
        histogram TEXT NOT NULL,
        PRIMARY KEY (day_ns, chain, archived, consumer, provider, service, method, status_code,
                     forwarded, verified, grant)
    ) WITHOUT ROWID"""
_OLD_GROUP_COLUMNS = (
    "day_ns, chain, archived, consumer, provider, service, method, status_code, forwarded, "
    "verified, grant, calls, duration_ns, request_bytes, response_bytes, histogram"
)


def test_a_sqlite_ledger_from_before_protocols_verifies_then_migrates_and_keeps_verifying(
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = config.parent / "ledger.db"
    before = old_forms()
    writer = LedgerWriter(SqliteLedgerStore(path), sealer_of(pki))
    for r in before:
        writer.submit(r)
    writer.close()
    tamper(  # back to the schema from before protocols, as such a broker made it
        path,
        "ALTER TABLE records DROP COLUMN protocol",
        "ALTER TABLE rollup_groups RENAME TO new_groups",
        _OLD_SQLITE_GROUPS,
        f"INSERT INTO rollup_groups SELECT {_OLD_GROUP_COLUMNS} FROM new_groups",
        "DROP TABLE new_groups",
    )
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(records)")}
    assert "protocol" not in columns and "grant" in columns
    assert check(path, pki).startswith("OK: 3 records")  # read-only, unmigrated
    reader = SqliteLedgerStore(path, readonly=True)  # as the ops console: records answer
    assert {g.protocol for g in reader.call_groups(0, 2**63 - 1)} == {"grpc"}
    assert [s.record for s in reader.records()] == before
    assert [c for *_, c in reader.canonical_rows(1, 3)] == [r.canonical() for r in before]
    reader.close()

    writer = LedgerWriter(SqliteLedgerStore(path), sealer_of(pki))  # a broker opens it: migrated
    after = [by(i) for i in range(4, 10)]
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


def test_a_sqlite_ledger_from_before_grants_and_protocols_is_keyed_anew_once(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    path = tmp_path / "ledger.db"
    before = [fixed(1), fixed(2, consumer_serial="3f9a")]
    writer = LedgerWriter(SqliteLedgerStore(path), sealer_of(pki))
    for r in before:
        writer.submit(r)
    writer.close()
    old = _OLD_SQLITE_GROUPS.replace("        grant TEXT NOT NULL DEFAULT '',\n", "")
    tamper(
        path,
        "ALTER TABLE records DROP COLUMN protocol",
        "ALTER TABLE records DROP COLUMN grant",
        "ALTER TABLE rollup_groups RENAME TO new_groups",
        old.replace("verified, grant)", "verified)"),
        f"INSERT INTO rollup_groups SELECT {_OLD_GROUP_COLUMNS.replace(' grant,', '')} "
        "FROM new_groups",
        "DROP TABLE new_groups",
    )
    store = SqliteLedgerStore(path)
    try:
        assert store.rollup_rows() == rollup.rollup(before)
        assert {k.protocol for k in store.rollup_rows().groups} == {"grpc"}
    finally:
        store.close()
    assert check(path, pki).startswith("OK: 2 records")


@pytest.mark.parametrize("dropped", [("protocol",), ("protocol", "grant")])
def test_a_postgres_ledger_from_before_protocols_is_migrated_and_verifies(
    postgres_url: str, pki: CertificateAuthority, dropped: tuple[str, ...]
) -> None:
    sealer = sealer_of(pki)
    before = old_forms() if "grant" not in dropped else old_forms()[:2]
    store = PostgresLedgerStore(postgres_url)
    store.append_sealed(before, seal_with(sealer, "node-1"), sealer.cert_pem, "node-1")
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # back to the old schema
        for column in dropped:
            conn.execute(f'ALTER TABLE ledger_records DROP COLUMN "{column}"')
            conn.execute(f'ALTER TABLE ledger_rollup_groups DROP COLUMN "{column}"')
        kept = "" if "grant" in dropped else ', "grant"'
        conn.execute(
            "ALTER TABLE ledger_rollup_groups ADD PRIMARY KEY (chain, archived, day_ns, "
            f"consumer, provider, service, method, status_code, forwarded, verified{kept})"
        )
    with pytest.raises(Exception, match="or before grants or protocols were recorded"):
        PostgresLedgerStore(postgres_url, readonly=True)
    store = PostgresLedgerStore(postgres_url)  # the owner opens it: the columns are added
    after = [by(i) for i in range(4, 10)]
    store.append_sealed(after, seal_with(sealer, "node-1"), sealer.cert_pem, "node-1")
    try:
        assert [s.record for s in store.records("node-1")] == before + after
        assert verdicts(store, pki) == {
            "node-1": f"OK: {len(before + after)} records, 2 seals, chain and seals intact"
        }
        assert store.rollup_rows("node-1") == rollup.rollup(before + after)
        assert store.rebuild_rollup("node-1") == rollup.rollup(before + after)
        calls = {p: 0 for p in PROTOCOLS}
        for g in store.call_groups(0, 2**63 - 1):
            calls[g.protocol] += g.calls
        assert calls == {"grpc": len(before) + 2, "connect": 2, "rest": 2}
    finally:
        store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        key = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'ledger_rollup_groups'::regclass AND contype = 'p'"
        ).fetchone()
    assert key is not None and key[0].endswith('verified, "grant", protocol)')


# -- the quarterly report ----------------------------------------------------------------------


def quarter_calls() -> list[LedgerRecord]:
    calls = [
        ("grpc", 0), ("grpc", 0), ("grpc", 0), ("grpc", 5), ("grpc", 0), ("grpc", 0),
        ("connect", 0), ("connect", 14),
        ("rest", 3), ("rest", 0),
    ]  # fmt: skip
    records = [
        LedgerRecord(
            start_ns=MID + n * DAY_NS, end_ns=MID + n * DAY_NS + 5 * MS, trace_id="",
            request_id=f"req-{n}", consumer="post", provider="nocr", service=ECHO,
            method="Unary", kind="unary", status_code=status, request_bytes=10,
            request_messages=1, response_bytes=10, response_messages=1,
            endpoint="10.0.0.1:443", broker_instance="test", grant="g-civil", protocol=protocol,
        )
        for n, (protocol, status) in enumerate(calls)
    ]  # fmt: skip
    earlier = Q2.start_ns + DAY_NS
    outside = [
        dataclasses.replace(records[0], start_ns=earlier, end_ns=earlier + MS, protocol="rest"),
        dataclasses.replace(records[8], consumer="", consumer_verified=False),
    ]  # in 1405-Q2, and a caller never identified: neither is a transaction of the quarter
    return records + outside


def test_the_report_counts_calls_errors_and_share_per_protocol(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    store = SqliteLedgerStore(tmp_path / "ledger.db")
    store.append_sealed(quarter_calls(), unsigned, b"")
    try:
        report = build_quarterly(cfg, store, Q3, purposes={})
    finally:
        store.close()
    assert report.protocols == (
        ProtocolCalls("grpc", 6, 1, Decimal("0.6")),
        ProtocolCalls("connect", 2, 1, Decimal("0.2")),
        ProtocolCalls("rest", 2, 1, Decimal("0.2")),
    )
    assert sum(p.calls for p in report.protocols) == report.national.transactions

    html = render_html(report)
    assert '<section id="protocols"><h2>Calls by protocol</h2>' in html
    assert "<td><code>connect</code></td>" in html and "60.0%" in html
    data = report_json(report)
    assert data["calls_by_protocol"] == [
        {"protocol": "grpc", "calls": 6, "errors": 1, "share": 0.6},
        {"protocol": "connect", "calls": 2, "errors": 1, "share": 0.2},
        {"protocol": "rest", "calls": 2, "errors": 1, "share": 0.2},
    ]
    assert "calls_by_protocol" in data["definitions"]
    rows = list(csv.DictReader(io.StringIO(render_protocols_csv(report))))
    assert [tuple(r.values()) for r in rows] == [
        ("grpc", "6", "1", "0.6"),
        ("connect", "2", "1", "0.2"),
        ("rest", "2", "1", "0.2"),
    ]
    written = write_quarterly(report, tmp_path / "out")
    protocols_csv = tmp_path / "out" / "quarterly-1405-Q3-protocols.csv"
    assert protocols_csv in written
    assert protocols_csv.read_bytes().decode() == render_protocols_csv(report)
    # The figures are national: an agency viewing its own assessment sees them too.
    assert own_assessment(report, "tax").protocols == report.protocols


def test_a_quarter_without_calls_lists_every_protocol_with_no_share() -> None:
    assert calls_by_protocol([]) == tuple(ProtocolCalls(p, 0, 0, None) for p in PROTOCOLS)
    rows = list(csv.reader(io.StringIO(render_protocols_csv(_empty_report()))))
    assert rows == [["protocol", "calls", "errors", "share"]] + [
        [p, "0", "0", ""] for p in PROTOCOLS
    ]


def _empty_report() -> QuarterlyReport:
    national = National(0, 0, 0, 0, 0, 0, None, 0, None)
    return QuarterlyReport(Quarter(1405, 3), national, (), (), calls_by_protocol([]))
