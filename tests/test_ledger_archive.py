"""Archives: the oldest sealed batches move into signed files, the chain goes on in the live
store, and verify (with the configuration, or the auditor's offline verifier with only the
CA certificate) checks archives and live store as one chain."""

from __future__ import annotations

import datetime as dt
import io
import json
import resource
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tabadol.cli import _seal_signers, main
from tabadol.ledger import archive
from tabadol.ledger.archive import archive_chain, check_archives
from tabadol.ledger.record import LedgerRecord, Seal, StoredRecord
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import MemoryLedgerStore, SqliteLedgerStore
from tabadol.ledger.store.postgres import PostgresLedgerStore
from tabadol.ledger.verify import Start, verify_chain
from tabadol.pki import CertificateAuthority
from tabadol.reports import build_quarterly
from tests.conftest import TRUST_DOMAIN, broker_toml
from tests.test_ledger import record, tamper, write_ledger
from tests.test_ledger_timestamps import stamped_ledger, tsa, tsa_dir  # noqa: F401 (fixtures)
from tests.test_reports import Q3, write_fixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from ledger_write import broker_like_record  # type: ignore[import-not-found]  # noqa: E402

# -- helpers: any store ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A fresh store of each kind. On PostgreSQL the test's connection owns the tables, as
    the role that archives must."""
    opened: list[Any] = []
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""

    def make() -> Any:
        store = (
            SqliteLedgerStore(tmp_path / "ledger.db")
            if request.param == "sqlite"
            else PostgresLedgerStore(url)
            if request.param == "postgres"
            else MemoryLedgerStore()
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def sealer_of(pki: CertificateAuthority) -> Sealer:
    return Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())


def signers(pki: CertificateAuthority) -> Callable[[bytes, int], str | None]:
    return _seal_signers(pki.dir, TRUST_DOMAIN)


class Clock:
    """Seal times that step forward one millisecond a seal, from now."""

    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        self.now += 1_000_000
        return self.now


def fill(
    store: Any,
    pki: CertificateAuthority,
    sizes: list[int],
    clock: Clock,
    records: Callable[[int], LedgerRecord] = record,
) -> list[Seal]:
    """One sealed batch per size, each sealed at the clock's next tick; the seals."""
    sealer = sealer_of(pki)
    first = store.head()[0]
    made = []
    for size in sizes:
        batch = [records(first + i) for i in range(1, size + 1)]
        first += size
        made.append(
            store.append_sealed(
                batch,
                lambda seq, count, head: sealer.seal(seq, count, head, clock()),
                sealer.cert_pem,
            )
        )
    return made


def archive_through(
    store: Any,
    pki: CertificateAuthority,
    out: Path,
    seal: Seal,
    records_per_file: int = archive.RECORDS_PER_FILE,
) -> archive.Archived:
    """Archive every batch up to and including ``seal``."""
    out.mkdir(exist_ok=True)
    return archive_chain(
        store, "", seal.sealed_ns + 1, out, sealer_of(pki), signers(pki), time.time_ns,
        records_per_file=records_per_file,
    )  # fmt: skip


def live_verdict(store: Any, pki: CertificateAuthority) -> str:
    prefix = store.archived()
    start = Start.after(prefix.seal) if prefix is not None else Start()
    return str(verify_chain(store, signers(pki), start=start))


def archives_verdict(out: Path, pki: CertificateAuthority) -> tuple[str, str]:
    """(the problem, "" if none; where the archives end) of the one chain in ``out``."""
    chains, unreadable = check_archives(out, signers(pki))
    assert not unreadable, unreadable
    found = chains[""]
    return found.problem, f"{found.end.count} records, {found.end.seal_count} seals"


def test_a_record_line_is_its_canonical_bytes_without_the_schema_number() -> None:
    records = [
        record(1),  # schema 1's form: no serial, verified
        record(2, consumer_serial="0a"),
        record(3, consumer_verified=False),
        record(4, consumer="سازمان", method='M"\\\x7f', consumer_serial="ff"),
        record(5, grant="g-1"),  # schema 3: a grant admitted it
        record(6, consumer_serial="0b", consumer_verified=False, grant='g"\\2'),
        record(7, protocol="rest"),  # schema 4: it came in by another protocol than gRPC
        record(8, grant='g",', protocol="connect"),
        record(9, consumer_verified=False, grant='g\\",', protocol="rest"),
    ]
    for r in records:
        line = archive.record_line(StoredRecord(1, r, "", ""))
        assert line.isascii() and line.endswith(b"\n")
        # A gRPC call's record keeps its line from before protocols, and one no grant
        # admitted its line from before grants: every other field.
        kept = len(r.values()) - (r.protocol == "grpc") - (r.protocol == "grpc" and not r.grant)
        assert json.loads(line) == list(r.values()[:kept])
        assert archive.canonical_of(line[:-1]) == r.canonical()


# -- the store side: archive, prune, continue ------------------------------------------------


def test_archiving_moves_whole_batches_to_a_signed_file_and_prunes_them(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [3, 4, 5, 2], clock)
    done = archive_through(store, pki, tmp_path / "out", seals[2])

    assert done.path == tmp_path / "out" / "ledger-main-000000000001-000000000003.tabadol-archive"
    assert (done.records, done.seals) == ((1, 12), (1, 3))
    assert done.path.stat().st_mode & 0o777 == 0o600
    prefix = store.archived()
    assert prefix is not None and prefix.seal == seals[2]
    assert prefix.archive.startswith(done.path.name + " sha256:")
    assert [r.seq for r in store.records()] == [13, 14]
    assert [s.seq for s in store.seals()] == [4]
    assert store.head() == (14, seals[3].head_digest)
    assert store.chains() == [""]
    assert live_verdict(store, pki) == "OK: 14 records, 4 seals, chain and seals intact"
    assert archives_verdict(tmp_path / "out", pki) == ("", "12 records, 3 seals")


def test_the_chain_continues_after_everything_live_was_archived(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [2, 3], clock)
    archive_through(store, pki, tmp_path / "out", seals[-1])
    assert list(store.records()) == [] and list(store.seals()) == []
    assert store.head() == (5, seals[-1].head_digest)
    assert store.last_seal() == seals[-1]  # the writer dates its next seal after this one
    assert store.chains() == [""]

    more = fill(store, pki, [4], clock)
    assert (more[0].seq, more[0].count) == (3, 9)
    assert [r.seq for r in store.records(from_seq=7)] == [7, 8, 9]
    assert live_verdict(store, pki) == "OK: 9 records, 3 seals, chain and seals intact"
    archive_through(store, pki, tmp_path / "out", more[-1])
    assert archives_verdict(tmp_path / "out", pki) == ("", "9 records, 3 seals")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ledger-main-000000000001-000000000002.tabadol-archive",
        "ledger-main-000000000003-000000000003.tabadol-archive",
    ]


def test_archiving_keeps_the_rollups_so_the_quarter_report_is_unchanged(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    cfg, fixture = write_fixture(tmp_path / "fixture")
    calls = [stored.record for stored in fixture.records()]
    fixture.close()
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [len(calls) // 3, len(calls) // 3, len(calls) - 2 * (len(calls) // 3)],
                 clock, lambda i: calls[i - 1])  # fmt: skip
    before = build_quarterly(cfg, store, Q3)
    archive_through(store, pki, tmp_path / "out", seals[1])
    assert build_quarterly(cfg, store, Q3) == before
    archive_through(store, pki, tmp_path / "out", seals[2])
    assert list(store.records()) == []
    assert build_quarterly(cfg, store, Q3) == before
    assert store.rollup_rows(archived=True).groups  # the archived records' rows
    assert store.rebuild_rollup().groups == {}  # nothing live: the archived rows stay
    assert build_quarterly(cfg, store, Q3) == before


def test_remove_archived_refuses_a_seal_the_live_store_does_not_hold(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    from tabadol.ledger.store import LedgerWriteError

    store, clock = make_store(), Clock()
    seals = fill(store, pki, [2, 2], clock)
    forged = Seal(
        2, 3, seals[1].head_digest, seals[1].sealed_ns, seals[1].signer, seals[1].signature
    )
    sealer = sealer_of(pki)
    with pytest.raises(LedgerWriteError, match=r"seal 2 .*nothing removed"):
        store.remove_archived("", forged, time.time_ns(), "x", sealer.sign, sealer.cert_pem)
    assert store.archived() is None and store.head()[0] == 4


class StoppedAtRemoval:
    """A store whose archiver is killed at its ``n``-th removal: files before it removed, that
    file written, and nothing after it."""

    def __init__(self, inner: Any, n: int) -> None:
        self._inner, self._left = inner, n

    def remove_archived(self, *args: Any) -> None:
        self._left -= 1
        if self._left == 0:
            raise KeyboardInterrupt
        self._inner.remove_archived(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_run_stopped_between_the_file_and_the_removal_is_finished_by_the_next(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [3, 3, 3], clock)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        archive_through(StoppedAtRemoval(store, 1), pki, out, seals[1])
    assert store.archived() is None and store.head()[0] == 9  # both archived and live
    assert [p.name for p in out.iterdir()] == [
        "ledger-main-000000000001-000000000002.tabadol-archive"
    ]  # no partial file left beside it

    done = archive_through(store, pki, out, seals[2])
    assert done.finished == ("ledger-main-000000000001-000000000002.tabadol-archive",)
    assert done.seals == (3, 3)
    assert archives_verdict(out, pki) == ("", "9 records, 3 seals")
    assert store.archived().seal == seals[2]
    again = archive_through(store, pki, out, seals[2])
    assert again.path is None and again.finished == ()


def test_a_run_writes_files_of_whole_batches_up_to_records_per_file(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [3, 4, 5, 2, 6, 1], clock)
    out = tmp_path / "out"
    done = archive_through(store, pki, out, seals[4], records_per_file=6)

    # A file ends with the batch that brings it to 6 records or more: 7, 7, then 6.
    assert [p.name for p in done.paths] == [
        "ledger-main-000000000001-000000000002.tabadol-archive",
        "ledger-main-000000000003-000000000004.tabadol-archive",
        "ledger-main-000000000005-000000000005.tabadol-archive",
    ]
    assert (done.records, done.seals) == ((1, 20), (1, 5))
    assert "records 1 to 20 (seals 1 to 5) archived in 3 files in" in str(done)
    headers = [archive.header_of(path) for path in done.paths]
    assert [(h.first_record, h.last_record) for h in headers] == [(1, 7), (8, 14), (15, 20)]
    assert [h.prev_digest for h in headers] == [
        "0" * 64, seals[1].head_digest, seals[3].head_digest,
    ]  # fmt: skip
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in done.paths)
    prefix = store.archived()
    assert prefix is not None and prefix.seal == seals[4]
    assert prefix.archive.startswith(done.paths[-1].name + " sha256:")
    assert [r.seq for r in store.records()] == [21]
    assert live_verdict(store, pki) == "OK: 21 records, 6 seals, chain and seals intact"
    for workers in (1, 2):  # one by one, and in parallel: the same verdict
        chains, unreadable = check_archives(out, signers(pki), workers=workers)
        assert not unreadable and chains[""].problem == ""
        assert (chains[""].end.count, chains[""].end.seal_count) == (20, 5)
        assert [f.verdict.records for f in chains[""].files] == [7, 14, 20]


def test_a_run_stopped_between_two_files_is_finished_by_the_next(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [3, 3, 3, 3], clock)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        archive_through(StoppedAtRemoval(store, 2), pki, out, seals[3], records_per_file=3)
    # The first file was written and removed; the second written, its records still live.
    assert store.archived().seal == seals[0]
    assert [r.seq for r in store.records()][:1] == [4]
    assert [p.name for p in files(out)] == [
        "ledger-main-000000000001-000000000001.tabadol-archive",
        "ledger-main-000000000002-000000000002.tabadol-archive",
    ]  # no partial file beside them
    assert archives_verdict(out, pki) == ("", "6 records, 2 seals")
    assert live_verdict(store, pki) == "OK: 12 records, 4 seals, chain and seals intact"

    done = archive_through(store, pki, out, seals[3], records_per_file=3)
    assert done.finished == ("ledger-main-000000000002-000000000002.tabadol-archive",)
    assert done.seals == (3, 4) and len(done.paths) == 2
    assert archives_verdict(out, pki) == ("", "12 records, 4 seals")
    assert store.archived().seal == seals[3] and list(store.records()) == []


def several_files(tmp_path: Path, pki: CertificateAuthority) -> Path:
    """Four archive files of one chain, of two batches each, written in one run."""
    out = tmp_path / "several"
    with closing(SqliteLedgerStore(tmp_path / "several.db")) as store:
        seals = fill(store, pki, [2, 3, 2, 2, 3, 1, 2, 2], Clock())
        done = archive_through(store, pki, out, seals[-1], records_per_file=4)
    assert len(done.paths) == 4
    return out


def test_a_file_missing_from_the_middle_of_a_run_is_found_in_parallel(
    pki: CertificateAuthority, tmp_path: Path
) -> None:
    out = several_files(tmp_path, pki)
    files(out)[1].unlink()
    for workers in (1, 2):
        chains, _ = check_archives(out, signers(pki), workers=workers)
        assert chains[""].problem == (
            "ledger-main-000000000005-000000000006.tabadol-archive: BROKEN at position 10: it "
            "begins after seal 4 (record 9), but the chain before it ends at seal 2 (record "
            "5): an archive before it is missing"
        )
        assert (chains[""].end.count, chains[""].end.seal_count) == (5, 2)


def test_the_parallel_check_reports_the_first_problem_in_chain_order(
    pki: CertificateAuthority, tmp_path: Path
) -> None:
    out = several_files(tmp_path, pki)
    second, fourth = files(out)[1], files(out)[3]

    def edit(lines: list[bytes]) -> list[bytes]:  # a record's status, unsigned anew
        return [
            line.replace(b",0,", b",5,", 1) if line.startswith(b"[") else line for line in lines
        ]

    rewrite(fourth, edit)
    rewrite(second, lambda lines: [line.replace(b'"r7"', b'"r70"') for line in lines])
    # The second file's batch of records 6 and 7 (seal 3) was edited; the fourth's too.
    expected = f"{second.name}: BROKEN at position 7: seal 3 does not match the chain at record 7"
    for workers in (1, 2):  # the sequential check, and the parallel one: the same words
        chains, _ = check_archives(out, signers(pki), workers=workers)
        assert chains[""].problem == expected
        assert [f.path.name for f in chains[""].files] == [files(out)[0].name, second.name]
        assert (chains[""].end.count, chains[""].end.seal_count) == (5, 2)


def test_records_beyond_ascii_are_archived_and_checked(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    store, clock = make_store(), Clock()
    persian = lambda i: record(i, consumer="سازمان-ثبت", method="استعلام", consumer_serial="0a")  # noqa: E731
    seals = fill(store, pki, [2, 2], clock, persian)
    out = tmp_path / "out"
    done = archive_through(store, pki, out, seals[-1])
    assert done.path is not None
    assert archives_verdict(out, pki) == ("", "4 records, 2 seals")
    # An archive whose lines hold the characters themselves (as archives were first
    # written), signed by the broker, reads the same.
    key = serialization.load_pem_private_key((pki.dir / "broker.key").read_bytes(), None)

    def unescaped(lines: list[bytes]) -> list[bytes]:
        return [
            json.dumps(json.loads(line), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            if line.startswith(b"[")
            else line
            for line in lines
        ]

    rewrite(done.path, unescaped, key, (pki.dir / "broker.crt").read_bytes())
    assert "سازمان".encode() in zipfile.ZipFile(done.path).read(archive.CONTENT)
    assert archives_verdict(out, pki) == ("", "4 records, 2 seals")


def test_nothing_sealed_before_the_date_archives_nothing(
    make_store: Callable[[], Any], pki: CertificateAuthority, tmp_path: Path
) -> None:
    store, clock = make_store(), Clock()
    seals = fill(store, pki, [2, 2], clock)
    (tmp_path / "out").mkdir()
    done = archive_chain(
        store, "", seals[0].sealed_ns, tmp_path / "out", sealer_of(pki), signers(pki), time.time_ns
    )
    assert done.path is None
    assert "nothing sealed before that date" in str(done)
    assert list((tmp_path / "out").iterdir()) == []
    assert store.archived() is None and store.head()[0] == 4


# -- the CLI, on a SQLite ledger --------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"], grants="")
        + '\n[ledger]\npath = "l.db"\n'
    )
    return path


def run(*args: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["ledger", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


TOMORROW = (dt.date.today() + dt.timedelta(days=2)).isoformat()


def archive_all(config: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`tabadol ledger archive` of everything sealed so far; what it said."""
    code, said = run(
        "archive", "--config", config, "--before", TOMORROW, "--out", out, capsys=capsys
    )
    assert code == 0, said
    return said


def test_archive_then_verify_with_and_without_the_archives(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [4, 3, 5])  # the real writer, with its seals witness
    out = tmp_path / "archives"
    said = archive_all(config, out, capsys)
    assert "records 1 to 12 (seals 1 to 3) archived in" in said
    write_ledger(tmp_path / "l.db", pki, [2, 2])  # a broker writes on after the archive

    code, said = run("verify", "--config", config, capsys=capsys)
    assert code == 0, said
    assert "records 1 to 12 (seals 1 to 3) archived (ledger-main-000000000001-000000000003" in said
    assert "not checked here" in said
    assert "OK: 16 records, 5 seals" in said

    code, said = run("verify", "--config", config, "--archives", out, capsys=capsys)
    assert code == 0, said
    assert "archives: OK: records 1 to 12 (seals 1 to 3) in 1 files" in said
    assert "OK: 16 records, 5 seals" in said

    assert "records 13 to 16 (seals 4 to 5)" in archive_all(config, out, capsys)
    code, said = run("verify", "--config", config, "--archives", out, capsys=capsys)
    assert code == 0, said
    assert "archives: OK: records 1 to 16 (seals 1 to 5) in 2 files" in said


def test_archive_writes_several_files_and_both_verifiers_check_them_as_one_chain(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [3, 3, 3, 3, 2])
    out = tmp_path / "archives"
    code, said = run(
        "archive", "--config", config, "--before", TOMORROW, "--out", out,
        "--records-per-file", "5", capsys=capsys,
    )  # fmt: skip
    assert code == 0, said
    assert "records 1 to 14 (seals 1 to 5) archived in 3 files in" in said
    assert [p.name for p in files(out)] == [
        "ledger-main-000000000001-000000000002.tabadol-archive",
        "ledger-main-000000000003-000000000004.tabadol-archive",
        "ledger-main-000000000005-000000000005.tabadol-archive",
    ]
    write_ledger(tmp_path / "l.db", pki, [2])
    code, said = run("verify", "--config", config, "--archives", out, capsys=capsys)
    assert code == 0, said
    assert "archives: OK: records 1 to 14 (seals 1 to 5) in 3 files" in said
    assert "OK: 16 records, 6 seals" in said
    code, said = offline(out, pki, capsys)
    assert code == 0, said
    assert "chain main: OK: records 1 to 14, seals 1 to 5, in 3 files" in said
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as exited:
            main(["ledger", "archive", "--config", str(config), "--before", TOMORROW, "--out",
                  str(out), "--records-per-file", bad])  # fmt: skip
        assert exited.value.code == 2
        assert f"--records-per-file: {bad!r} is not a whole number" in capsys.readouterr().err


def test_verify_finds_tampering_in_the_live_store_after_archiving(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [4, 4])
    out = tmp_path / "archives"
    archive_all(config, out, capsys)
    write_ledger(tmp_path / "l.db", pki, [3, 3])
    tamper(tmp_path / "l.db", "UPDATE records SET consumer = 'tax' WHERE seq = 10")
    for extra in ([], ["--archives", out]):
        code, said = run("verify", "--config", config, *extra, capsys=capsys)
        assert code == 1
        assert "BROKEN at position 10: its contents do not match its digest" in said


def test_a_moved_archived_prefix_breaks_the_live_chain(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [4, 4, 4])
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:
        first = next(store.seals())
        archive_through(store, pki, tmp_path / "out", first)
    # Hide the archive's end: say less was archived.
    tamper(tmp_path / "l.db", "UPDATE archived_prefix SET head_digest = '00', count = 3")
    code, said = run("verify", "--config", config, capsys=capsys)
    assert code == 1 and "BROKEN" in said


def test_verify_accepts_archives_that_overlap_the_live_store_where_they_agree(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [3, 3, 3])
    out = tmp_path / "archives"
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store, pytest.raises(KeyboardInterrupt):
        archive_through(StoppedAtRemoval(store, 1), pki, out, list(store.seals())[1])
    code, said = run("verify", "--config", config, "--archives", out, capsys=capsys)
    assert code == 0, said
    assert (
        "archives: OK: records 1 to 6 (seals 1 to 2)" in said and "OK: 9 records, 3 seals" in said
    )

    said = archive_all(config, out, capsys)
    assert "finished removing what ledger-main-000000000001-000000000002" in said
    assert "records 7 to 9 (seals 3 to 3)" in said
    code, said = run("verify", "--config", config, "--archives", out, capsys=capsys)
    assert code == 0, said


def test_verify_with_archives_misses_none_of_them(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [3, 3])
    out = tmp_path / "archives"
    archive_all(config, out, capsys)
    (tmp_path / "elsewhere").mkdir()
    code, said = run(
        "verify", "--config", config, "--archives", tmp_path / "elsewhere", capsys=capsys
    )
    assert code == 1
    assert (
        "records 1 to 6 (seals 1 to 2) were archived" in said
        and "an archive file is missing" in said
    )


def test_archive_refuses_a_broken_prefix_and_removes_nothing(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [3, 3])
    tamper(tmp_path / "l.db", "UPDATE records SET status_code = 5 WHERE seq = 2")
    out = tmp_path / "archives"
    code, said = run(
        "archive", "--config", config, "--before", TOMORROW, "--out", out, capsys=capsys
    )
    assert code == 2
    assert "does not verify: BROKEN at position 2" in said and "nothing removed" in said
    assert list(out.iterdir()) == []
    with closing(SqliteLedgerStore(tmp_path / "l.db", readonly=True)) as store:
        assert store.archived() is None and store.head()[0] == 6


def test_a_date_before_everything_archives_nothing(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [3])
    out = tmp_path / "archives"
    code, said = run(
        "archive", "--config", config, "--before", "2020-01-01", "--out", out, capsys=capsys
    )
    assert code == 0 and "nothing sealed before that date is left to archive" in said
    assert list(out.iterdir()) == []
    code, said = run(
        "archive", "--config", config, "--before", "yesterday", "--out", out, capsys=capsys
    )
    assert code == 2 and "--before: 'yesterday' is not an ISO 8601 date" in said


def test_an_unusable_out_directory_is_named_and_nothing_is_removed(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [3])
    (tmp_path / "a-file").write_text("")
    code, said = run(
        "archive", "--config", config, "--before", TOMORROW, "--out", tmp_path / "a-file" / "x",
        capsys=capsys,
    )  # fmt: skip
    assert code == 2 and f"{tmp_path / 'a-file' / 'x'}: cannot make the archive directory" in said
    with closing(SqliteLedgerStore(tmp_path / "l.db", readonly=True)) as store:
        assert store.archived() is None and store.head()[0] == 3


def test_a_disk_that_fills_while_the_archive_is_written_removes_nothing(
    config: Path, pki: CertificateAuthority, tmp_path: Path
) -> None:
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:  # an archive of ~200 KB
        fill(store, pki, [5000, 5000], Clock(), broker_like_record)
    out = tmp_path / "archives"
    out.mkdir()

    def small_files() -> None:  # in the child: files stop growing at 64 KiB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    done = subprocess.run(
        [sys.executable, "-m", "tabadol.cli", "ledger", "archive", "--config", str(config),
         "--before", TOMORROW, "--out", str(out)],
        capture_output=True, text=True, preexec_fn=small_files, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot write the archive ledger-main-000000000001-000000000002" in done.stderr
    assert "nothing removed" in done.stderr
    assert list(out.iterdir()) == []
    with closing(SqliteLedgerStore(tmp_path / "l.db", readonly=True)) as store:
        assert store.archived() is None and store.head()[0] == 10_000


# -- tampering with archive files, and the auditor's offline verifier -------------------------


@pytest.fixture
def archives(tmp_path: Path, pki: CertificateAuthority) -> Path:
    """Three archive files of one chain (seals 1-2, 3, 4-5), and nothing else: no ledger,
    no configuration is left where the auditor works."""
    out = tmp_path / "auditor"
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:
        seals = fill(store, pki, [3, 2, 4, 1, 2], Clock())
        for last in (seals[1], seals[2], seals[4]):
            archive_through(store, pki, out, last)
    for leftover in tmp_path.glob("l.db*"):
        leftover.unlink()
    return out


def offline(
    out: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    return run("verify-archive", out, "--ca", pki.dir / "ca.crt", capsys=capsys)


def files(out: Path) -> list[Path]:
    return sorted(out.iterdir())


def rewrite(
    path: Path, change: Callable[[list[bytes]], list[bytes]], key: Any = None, cert_pem: bytes = b""
) -> None:
    """Rewrite an archive's ledger.jsonl lines; with ``key``, sign it anew with that key."""
    with zipfile.ZipFile(path) as zf:
        lines = zf.read(archive.CONTENT).splitlines(keepends=True)
        signature = json.loads(zf.read(archive.SIGNATURE))
    content = b"".join(change(lines))
    if key is not None:
        import hashlib

        digest = hashlib.sha256(content).hexdigest()
        signature["content_sha256"] = digest
        signature["certificate"] = cert_pem.decode()
        payload = archive.signature_payload(digest, signature["signed_ns"])
        signature["signature"] = key.sign(payload, ec.ECDSA(hashes.SHA256())).hex()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("mimetype", archive.MIMETYPE)
        zf.writestr(archive.CONTENT, content, compress_type=zipfile.ZIP_LZMA)
        zf.writestr(archive.SIGNATURE, json.dumps(signature))
    path.write_bytes(buffer.getvalue())


def outsider() -> tuple[Any, bytes]:
    """A key and a self-signed certificate that claims to be the broker: no CA issued it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/broker")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert.public_bytes(serialization.Encoding.PEM)


def test_the_offline_verifier_needs_only_the_archives_and_the_ca(
    archives: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not list(tmp_path.glob("*.toml")) and not list(tmp_path.glob("l.db*"))
    code, said = offline(archives, pki, capsys)
    assert code == 0, said
    assert said == (
        f"{archives}: chain main: OK: records 1 to 12, seals 1 to 5, in 3 files; chain, seals "
        "and signatures intact\n"
    )


def test_a_byte_changed_in_an_archive_file_is_found(
    archives: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    second = files(archives)[1]
    data = bytearray(second.read_bytes())
    data[len(data) // 3] ^= 0x01
    second.write_bytes(bytes(data))
    code, said = offline(archives, pki, capsys)
    assert code == 1
    assert f"BROKEN: {second.name}: BROKEN: it cannot be read as an archive" in said


def test_a_record_edited_inside_an_archive_is_found_at_its_batch(
    archives: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    def edit(lines: list[bytes]) -> list[bytes]:
        return [line.replace(b'"post"', b'"tax"', 1) if b'"r4"' in line else line for line in lines]

    rewrite(files(archives)[0], edit)
    code, said = offline(archives, pki, capsys)
    assert code == 1
    assert (
        "ledger-main-000000000001-000000000002.tabadol-archive: BROKEN at position 5: seal 2 does "
        "not match the chain at record 5" in said
    )


def test_an_archive_re_signed_by_a_key_the_ca_never_certified_is_refused(
    archives: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert = outsider()
    rewrite(files(archives)[2], lambda lines: lines, key, cert)
    code, said = offline(archives, pki, capsys)
    assert code == 1
    assert (
        "ledger-main-000000000004-000000000005.tabadol-archive: BROKEN: its signature does not hold: it is not signed by a broker of this exchange: its certificate was not issued by this exchange's CA"
        in said
    )


def test_a_record_removed_and_the_file_re_signed_by_an_outsider_is_found(
    archives: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert = outsider()
    rewrite(
        files(archives)[0], lambda lines: [line for line in lines if b'"r2"' not in line], key, cert
    )
    code, said = offline(archives, pki, capsys)
    assert code == 1
    assert (
        "ledger-main-000000000001-000000000002.tabadol-archive: BROKEN at position 3: seal 1 does "
        "not match the chain at record 3"
    ) in said


def test_an_archive_missing_from_the_middle_is_found(
    archives: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    files(archives)[1].unlink()
    code, said = offline(archives, pki, capsys)
    assert code == 1
    assert (
        "ledger-main-000000000004-000000000005.tabadol-archive: BROKEN at position 10: it begins "
        "after seal 3 (record 9), but the chain before it ends at seal 2 (record 5): an archive "
        "before it is missing"
    ) in said


def test_swapped_archive_files_are_found(
    archives: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, _ = files(archives)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    code, said = offline(archives, pki, capsys)
    assert code == 1
    assert f"{first.name}: BROKEN: its name does not match what it holds" in said


def test_the_offline_verifier_refuses_a_directory_without_archives(
    tmp_path: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    code, said = offline(tmp_path, pki, capsys)
    assert code == 1 and "no archive files" in said
    code, said = run("verify-archive", tmp_path, "--ca", tmp_path / "none.pem", capsys=capsys)
    assert code == 2 and "cannot load the CA certificate" in said


def test_an_archive_of_another_exchange_is_refused(
    archives: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = CertificateAuthority.init(tmp_path / "other-pki", TRUST_DOMAIN)
    code, said = run("verify-archive", archives, "--ca", other.dir / "ca.crt", capsys=capsys)
    assert code == 1
    assert "not signed by a broker of this exchange" in said


def test_bytes_per_record_in_an_archive(pki: CertificateAuthority, tmp_path: Path) -> None:
    """Broker-like records compress to well under what the live store takes per record."""
    store = MemoryLedgerStore()
    seals = fill(store, pki, [100] * 20, Clock(), broker_like_record)
    done = archive_through(store, pki, tmp_path / "out", seals[-1])
    assert done.path is not None
    assert done.path.stat().st_size / 2000 < 100


def test_checkpoints_and_the_seals_witness_from_before_the_archive_still_serve(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    auditor = pki.dir / "auditors" / "sara"
    if not auditor.exists():
        pki.issue_person("auditor", "sara")
    write_ledger(tmp_path / "l.db", pki, [3, 3])  # the writer witnesses every seal in l.db.seals
    assert run("verify", "--config", config, "--as", auditor, capsys=capsys)[0] == 0
    write_ledger(tmp_path / "l.db", pki, [2])
    out = tmp_path / "archives"
    archive_all(config, out, capsys)
    write_ledger(tmp_path / "l.db", pki, [2, 2])
    assert run("verify", "--config", config, "--as", auditor, capsys=capsys)[0] == 0
    for extra in ([], ["--archives", out]):
        code, said = run("verify", "--config", config, *extra, capsys=capsys)
        assert code == 0, said
        assert "OK: 12 records, 5 seals" in said
    tamper(
        tmp_path / "l.db", "UPDATE seals SET sealed_ns = sealed_ns + 1 WHERE seq = 5"
    )  # the witness catches a re-signed seal
    code, said = run("verify", "--config", config, "--full", capsys=capsys)
    assert code == 1 and "BROKEN" in said


def test_the_offline_verifier_checks_the_archived_timestamp_tokens(
    stamped_ledger: Path,  # noqa: F811 (the fixture imported above)
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "archives"
    said = archive_all(stamped_ledger, out, capsys)
    with closing(SqliteLedgerStore(tmp_path / "l.db", readonly=True)) as store:
        assert list(store.timestamps()) == []  # they went with their seals
    chain = tmp_path / "tsa-chain.pem"
    checks = ("verify-archive", out, "--ca", pki.dir / "ca.crt", "--tsa-certificate", chain)
    code, said = run(*checks, capsys=capsys)
    assert code == 0, said
    assert "timestamps: OK: 3 seals timestamped by CN=Test TSA" in said

    # Someone with the broker's own key moves seal 1's token onto seal 2 and re-signs the
    # file: the signature holds, the TSA's does not.
    def move(lines: list[bytes]) -> list[bytes]:
        stamps = [json.loads(line) for line in lines if line.startswith(b'{"timestamp"')]
        first = stamps[0]["timestamp"]
        return [
            line.replace(
                json.dumps(stamps[1]["timestamp"][1]).encode(), json.dumps(first[1]).encode()
            )
            for line in lines
        ]

    key = serialization.load_pem_private_key((pki.dir / "broker.key").read_bytes(), None)
    rewrite(files(out)[0], move, key, (pki.dir / "broker.crt").read_bytes())
    code, said = run(*checks, capsys=capsys)
    assert code == 1
    assert "timestamps: BROKEN: seal 2: its timestamp token" in said


def test_verify_with_archives_finds_a_tampered_archive_and_still_checks_the_live_part(
    config: Path, pki: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path / "l.db", pki, [3, 3])
    out = tmp_path / "archives"
    archive_all(config, out, capsys)
    write_ledger(tmp_path / "l.db", pki, [2])
    rewrite(files(out)[0], lambda lines: [line.replace(b'"r5"', b'"r6"') for line in lines])
    code, said = run("verify", "--config", config, "--archives", out, capsys=capsys)
    assert code == 1
    assert (
        "archives: BROKEN: ledger-main-000000000001-000000000002.tabadol-archive: BROKEN at position 6: seal 2 does not match the chain at record 6"
        in said
    )
    assert "records 1 to 6 (seals 1 to 2) were archived" in said and "are broken (above)" in said
    assert "OK: 8 records, 3 seals" in said  # the live part, checked from the prefix
