"""Attacks on the ledger's archives, rollups and archived prefix (issue 12), as outsiders
would make them: a hostile archive handed to the auditor's offline verifier, a database
writer hiding deleted or altered records, an archiver tricked into removing records no
durable file holds, and verdicts on which the two verifiers disagree. A test that fails
names a weakness; one that passes documents a defence that held."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import resource
import sqlite3
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tabadol.ledger import archive, rollup
from tabadol.ledger.record import LedgerRecord
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import LedgerWriteError, SqliteLedgerStore
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN
from tests.test_ledger import record, tamper, write_ledger
from tests.test_ledger_archive import (  # noqa: F401 (config, archives: fixtures)
    ROOT,
    Clock,
    StoppedAtRemoval,
    archive_all,
    archive_through,
    archives,
    config,
    files,
    fill,
    offline,
    rewrite,
    run,
)

# -- helpers ---------------------------------------------------------------------------------


def broker_key(pki: CertificateAuthority) -> Any:
    return serialization.load_pem_private_key((pki.dir / "broker.key").read_bytes(), None)


def key_of(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), None)


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _local(name: bytes, method: int, crc: int, csize: int, usize: int) -> bytes:
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, csize, usize,
                       len(name), 0) + name  # fmt: skip


def _central(name: bytes, method: int, crc: int, csize: int, usize: int, offset: int) -> bytes:
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, csize,
                       usize, len(name), 0, 0, 0, 0, 0o600 << 16, offset) + name  # fmt: skip


def bomb(path: Path, head: bytes, filler: bytes, repeats: int, signature: bytes) -> None:
    """An archive whose ledger.jsonl is ``head`` then ``filler`` ``repeats`` times: a few MB
    on disk however large it inflates (each piece deflated once, byte-aligned, and repeated)."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflater.compress(head) + deflater.flush(zlib.Z_FULL_FLUSH)
    piece = deflater.compress(filler) + deflater.flush(zlib.Z_FULL_FLUSH)
    deflated = first + piece * repeats + b"\x03\x00"  # a final, empty, fixed-Huffman block
    crc = zlib.crc32(head)
    for _ in range(repeats):
        crc = zlib.crc32(filler, crc)
    size = len(head) + len(filler) * repeats
    entries = [
        (b"mimetype", 0, zlib.crc32(archive.MIMETYPE), archive.MIMETYPE, len(archive.MIMETYPE)),
        (archive.CONTENT.encode(), 8, crc, deflated, size),
        (archive.SIGNATURE.encode(), 0, zlib.crc32(signature), signature, len(signature)),
    ]
    body, directory = b"", b""
    for name, method, crc32, data, usize in entries:
        directory += _central(name, method, crc32, len(data), usize, len(body))
        body += _local(name, method, crc32, len(data), usize) + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 3, 3, len(directory), len(body), 0)
    path.write_bytes(body + directory + end)


ARCHIVE_MEMORY = 384 << 20  # address space for the verifier: ten times what a real check needs


def verify_archive_bounded(
    directory: Path, pki: CertificateAuthority
) -> subprocess.CompletedProcess[str]:
    """The auditor's verifier in its own process, with bounded memory and time."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ARCHIVE_MEMORY, ARCHIVE_MEMORY))

    return subprocess.run(
        [sys.executable, "-m", "tabadol.cli", "ledger", "verify-archive", str(directory),
         "--ca", str(pki.dir / "ca.crt")],
        capture_output=True, text=True, preexec_fn=limited, cwd=ROOT, timeout=45,
    )  # fmt: skip


# -- 1. a hostile archive handed to the offline verifier --------------------------------------


def test_the_genuine_archives_verify_within_the_memory_bound(
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
) -> None:
    done = verify_archive_bounded(archives, pki)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_decompression_bomb_in_the_header_line_is_broken_in_bounded_memory(
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
) -> None:
    """1 MB on disk, a 1 GiB first line without a newline: the reader must give up on a line
    far longer than any archive writes, not hold it whole (MemoryError, a traceback)."""
    target = files(archives)[0]
    signature = members(target)[archive.SIGNATURE]
    bomb(target, b"", b" " * (1 << 24), 64, signature)
    done = verify_archive_bounded(archives, pki)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 1 and f"{target.name}: BROKEN" in done.stdout, done.stdout


def test_a_decompression_bomb_after_a_genuine_header_is_broken_in_bounded_memory_and_time(
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
) -> None:
    """A genuine header, then a record line of 2 GiB: the fast reader joins it a MiB at a
    time (quadratic) and the one-by-one reader reads it whole; both must stop at a bound."""
    target = files(archives)[0]
    content = members(target)
    head = content[archive.CONTENT].split(b"\n", 1)[0] + b"\n["
    bomb(target, head, b" " * (1 << 24), 128, content[archive.SIGNATURE])
    done = verify_archive_bounded(archives, pki)  # TimeoutExpired: it hangs
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 1 and f"{target.name}: BROKEN" in done.stdout, done.stdout


@pytest.mark.parametrize("where", ["header", "record", "signature"])
def test_deeply_nested_json_is_broken_not_a_crash(
    where: str,
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = files(archives)[0]
    deep = b"[" * 200_000 + b"]" * 200_000
    content = members(target)
    lines = content[archive.CONTENT].splitlines(keepends=True)
    if where == "header":
        lines[0] = deep + b"\n"
    elif where == "record":
        at = next(i for i, line in enumerate(lines) if line.startswith(b"["))
        lines[at] = deep + b"\n"
    with zipfile.ZipFile(target, "w") as zf:
        zf.writestr("mimetype", archive.MIMETYPE)
        zf.writestr(archive.CONTENT, b"".join(lines), compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(archive.SIGNATURE, deep if where == "signature" else content[archive.SIGNATURE])
    code, said = offline(archives, pki, capsys)
    assert code == 1 and f"{target.name}: BROKEN" in said


@pytest.mark.parametrize("extra", ["a second ledger.jsonl", "a member named ../../escape"])
def test_an_archive_with_a_member_it_does_not_sign_is_refused(
    extra: str,
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two ledger.jsonl entries: Python reads (and hashes) the last, unzip and most tools show
    the first. A verifier that says OK for such a file vouches for content an auditor who
    opens it does not see. Members the signature does not cover have no place in it either."""
    target = files(archives)[0]
    genuine = members(target)
    forged = genuine[archive.CONTENT].replace(b'"post"', b'"tax"')
    name, data = (
        (archive.CONTENT, forged) if extra.startswith("a second") else ("../../escape", b"x")
    )
    with warnings.catch_warnings(), zipfile.ZipFile(target, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name: the point
        zf.writestr("mimetype", archive.MIMETYPE)
        zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(archive.CONTENT, genuine[archive.CONTENT], compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(archive.SIGNATURE, genuine[archive.SIGNATURE])
    code, said = offline(archives, pki, capsys)
    assert code == 1 and f"{target.name}: BROKEN" in said, said


@pytest.mark.parametrize("who", ["agency", "auditor"])
def test_an_archive_signed_by_another_certificate_of_the_ca_is_refused(
    who: str,
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if who == "agency":
        bundle, stem = pki.dir / "agencies" / "post", "agency"
    else:
        bundle, stem = pki.dir / "auditors" / "attacker", "auditor"
        if not bundle.exists():
            pki.issue_person("auditor", "attacker")
    key, cert = key_of(bundle / f"{stem}.key"), (bundle / f"{stem}.crt").read_bytes()
    target = files(archives)[1]
    rewrite(target, lambda lines: lines, key, cert)
    code, said = offline(archives, pki, capsys)
    assert code == 1
    assert (
        f"{target.name}: BROKEN: its signature does not hold: it is not signed by a broker" in said
    )


def test_seals_re_signed_by_an_agency_key_are_refused_even_in_a_broker_signed_file(
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An agency re-seals an edited batch with its own key and names its own certificate;
    the file itself is signed by the broker, so only the seals' signer check stands."""
    bundle = pki.dir / "agencies" / "post"
    agency = Sealer((bundle / "agency.key").read_bytes(), (bundle / "agency.crt").read_bytes())

    def reseal(lines: list[bytes]) -> list[bytes]:
        out = []
        for line in lines:
            item = json.loads(line)
            if isinstance(item, dict) and "signer" in item:
                line = archive.signer_line(agency.signer, agency.cert_pem)
            elif isinstance(item, dict) and "seal" in item:
                seq, count, head, sealed_ns, _, _ = item["seal"]
                line = archive.seal_line(agency.seal(seq, count, head, sealed_ns))
            out.append(line)
        return out

    target = files(archives)[0]
    rewrite(target, reseal, broker_key(pki), (pki.dir / "broker.crt").read_bytes())
    code, said = offline(archives, pki, capsys)
    assert code == 1
    assert "seal 1 is not signed by a broker of this exchange" in said


@pytest.mark.parametrize("lie", ["last_record", "last_seal", "prev_digest", "chain"])
def test_a_header_that_lies_is_found_even_re_signed_with_the_broker_key(
    lie: str,
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = files(archives)[1]  # seal 3, records 6 to 9

    def edit(lines: list[bytes]) -> list[bytes]:
        header = json.loads(lines[0])
        fields = header["header"]
        if lie == "prev_digest":
            fields[lie] = "1" * 64
        elif lie == "chain":
            fields[lie] = "other"
        else:
            fields[lie] += 1
        return [json.dumps(header, separators=(",", ":")).encode() + b"\n", *lines[1:]]

    rewrite(target, edit, broker_key(pki), (pki.dir / "broker.crt").read_bytes())
    code, said = offline(archives, pki, capsys)
    assert code == 1 and "BROKEN" in said, said


def test_records_whose_seals_were_dropped_are_found_even_re_signed_with_the_broker_key(
    archives: Path,  # noqa: F811
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = files(archives)[0]
    rewrite(
        target,
        lambda lines: [line for line in lines if not line.startswith(b'{"seal"')],
        broker_key(pki),
        (pki.dir / "broker.crt").read_bytes(),
    )
    code, said = offline(archives, pki, capsys)
    assert code == 1 and f"{target.name}: BROKEN" in said, said


def test_archives_of_a_broker_key_revoked_for_cause_are_refused_with_the_crl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority.init(tmp_path / "pki", TRUST_DOMAIN)
    ca.issue_broker()
    out = tmp_path / "out"
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:
        seals = fill(store, ca, [2, 2], Clock())
        archive_through(store, ca, out, seals[-1])
    ca.revoke_current("broker", reason="key-compromise")
    checks = ("verify-archive", out, "--ca", ca.dir / "ca.crt")
    assert run(*checks, capsys=capsys)[0] == 0  # without --crl, revocation is not checked
    code, said = run(*checks, "--crl", ca.dir / "crl.pem", capsys=capsys)
    assert code == 1 and "revoked" in said, said


# -- 2. a database writer hiding deleted or altered records -----------------------------------


def test_a_forged_archived_prefix_does_not_hide_deleted_records_from_verify(
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Someone with write access to the SQLite file deletes records 1 to 6 and their seals,
    writes an archived_prefix row naming the genuine seal 2 (copied from the seals table)
    and an archive that never existed, and lets rollup --rebuild make the rows agree.
    No archive was written, no broker key was used: verify must not say OK."""
    write_ledger(tmp_path / "l.db", pki, [3, 3, 3])
    with closing(SqliteLedgerStore(tmp_path / "l.db")):
        pass  # a writable open makes the archive tables
    with sqlite3.connect(tmp_path / "l.db") as conn:
        seal = conn.execute("SELECT * FROM seals WHERE seq = 2").fetchone()
        conn.execute("DELETE FROM records WHERE seq <= ?", (seal[1],))
        conn.execute("DELETE FROM seals WHERE seq <= 2")
        columns = [row[1] for row in conn.execute("PRAGMA table_info(archived_prefix)")]
        known = dict(zip(
            ["chain", "seal_seq", "count", "head_digest", "sealed_ns", "signer", "signature",
             "archived_ns", "archive"],
            ["", *seal, seal[3] + 1, "ledger-main-000000000001-000000000002.tabadol-archive "
             "sha256:" + "0" * 64], strict=True,
        ))  # fmt: skip
        values = [known.get(name, "") for name in columns]  # a new column: the attacker guesses
        conn.execute(f"INSERT INTO archived_prefix VALUES ({', '.join('?' * len(values))})", values)
    conn.close()
    assert run("rollup", "--rebuild", "--config", config, capsys=capsys)[0] == 0
    code, said = run("verify", "--config", config, capsys=capsys)
    assert code == 1 and "BROKEN" in said, said


DAY = rollup.to_ns(dt.datetime(2025, 7, 10, 1, tzinfo=rollup.DAY_ZONE))  # 01:00 in Tehran


def unavailable_day(path: Path, pki: CertificateAuthority) -> tuple[int, int]:
    """A provider answered its calls in one five-minute window and none in the next: 50 %
    available that day. The day's bounds."""

    def calls(i: int) -> LedgerRecord:
        start = DAY + i + (i > 3) * 10 * 60 * 10**9
        return record(i, start_ns=start, end_ns=start + 1_000_000, status_code=14 if i > 3 else 0)

    with closing(SqliteLedgerStore(path)) as store:
        fill(store, pki, [3, 3], Clock(), calls)
        day = rollup.day_of(DAY)
        assert store.provider_windows(*day, rollup.WINDOW_NS) == {"nocr": (2, 1)}
    return day


def test_an_archived_rollup_row_a_database_writer_adds_is_found_by_verify(
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Nothing was ever archived. A copy of the provider's day row marked archived, every
    window answered, ORs into the availability the report reads, and no verify reads it."""
    day = unavailable_day(tmp_path / "l.db", pki)
    tamper(
        tmp_path / "l.db",
        "INSERT INTO rollup_provider_days SELECT day_ns, provider, chain, 1, windows, "
        "calls_mask, calls_mask, histogram FROM rollup_provider_days WHERE archived = 0",
    )
    with closing(SqliteLedgerStore(tmp_path / "l.db", readonly=True)) as store:
        assert store.provider_windows(*day, rollup.WINDOW_NS) == {"nocr": (2, 2)}  # 100 %
    (tmp_path / "none").mkdir()
    for extra in ([], ["--full"], ["--archives", tmp_path / "none"]):
        code, said = run("verify", "--config", config, *extra, capsys=capsys)
        assert code == 1 and "BROKEN" in said, (extra, said)


ROW_EDITS = {
    "calls": "UPDATE rollup_groups SET calls = calls + 5 WHERE status_code = 14",
    "calls moved to the next day": "UPDATE rollup_groups SET day_ns = day_ns + 86400000000000 "
    "WHERE status_code = 14",
    "masks": "UPDATE rollup_provider_days SET answered_mask = calls_mask",
    "masks and windows": "UPDATE rollup_provider_days SET answered_mask = calls_mask, "
    "windows = replace(windows, ',3,0]', ',3,3]')",
    "histogram": "UPDATE rollup_provider_days SET histogram = '[]'",
    "a provider day deleted": "DELETE FROM rollup_provider_days",
    "a day without records": "INSERT INTO rollup_groups SELECT day_ns + 86400000000000, chain, "
    "archived, consumer, provider, service, method, status_code, forwarded, verified, grant, "
    "protocol, calls, duration_ns, request_bytes, response_bytes, histogram FROM rollup_groups",
}


@pytest.mark.parametrize("edit", list(ROW_EDITS))
def test_an_edited_live_rollup_row_is_found_by_a_full_verify(
    edit: str,
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    unavailable_day(tmp_path / "l.db", pki)
    (changed,) = tamper(tmp_path / "l.db", ROW_EDITS[edit])
    assert changed > 0
    for extra in ([], ["--full"]):
        code, said = run("verify", "--config", config, *extra, capsys=capsys)
        assert code == 1 and "BROKEN: the rollup row of" in said, (extra, said)


def test_a_rollup_row_of_a_day_before_the_checkpoint_is_found_by_full_only(
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As docs/ledger.md says: a resumed verify rechecks only the days of its new records."""
    auditor = pki.dir / "auditors" / "sara"
    if not auditor.exists():
        pki.issue_person("auditor", "sara")
    unavailable_day(tmp_path / "l.db", pki)
    assert run("verify", "--config", config, "--as", auditor, capsys=capsys)[0] == 0
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:  # new records, a later day
        fill(store, pki, [2], Clock(), lambda i: record(i, start_ns=DAY + 2 * 86_400 * 10**9 + i))
    tamper(tmp_path / "l.db", "UPDATE rollup_provider_days SET answered_mask = calls_mask, "
           "windows = replace(windows, ',3,0]', ',3,3]')")  # fmt: skip
    code, said = run("verify", "--config", config, capsys=capsys)
    assert code == 0, said  # resumed: the edited day is before the checkpoint
    code, said = run("verify", "--config", config, "--full", capsys=capsys)
    assert code == 1 and "BROKEN: the rollup row of provider day" in said, said


# -- 3. the archiver -------------------------------------------------------------------------


def regular_archives_reach(out: Path, seal: int) -> bool:
    """Whether regular files (no links) in ``out`` hold the chain from seal 1 to ``seal``."""
    at = 0
    for path in sorted(out.iterdir()):
        if path.is_symlink() or not path.is_file() or not path.name.endswith(archive.SUFFIX):
            continue
        header = archive.header_of(path)
        if header is not None and header.first_seal == at + 1:
            at = header.last_seal
    return at >= seal


def test_a_link_planted_where_an_interrupted_run_left_its_file_does_not_let_records_go(
    pki: CertificateAuthority, tmp_path: Path
) -> None:
    """A run was stopped after its file, before its removal. Someone moves the file to a
    place they control and leaves a symbolic link: the next run must not remove the records
    on the word of a file that is not in the archive directory."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:
        seals = fill(store, pki, [3, 3, 3], Clock())
        with pytest.raises(KeyboardInterrupt):
            archive_through(StoppedAtRemoval(store, 1), pki, out, seals[1])
        (written,) = files(out)
        written.rename(elsewhere / written.name)
        written.symlink_to(elsewhere / written.name)
        with contextlib.suppress(archive.ArchiveRefused):  # refusing is one good answer
            archive_through(store, pki, out, seals[1])
        prefix = store.archived()
    removed = prefix.seal.seq if prefix is not None else 0
    assert regular_archives_reach(out, removed), f"seals 1 to {removed} removed"


# -- 4. the two verifiers disagree -------------------------------------------------------------


def test_verify_with_archives_checks_the_live_records_an_interrupted_archive_overlaps(
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run stopped between its file and its removal leaves records 1 to 6 both archived
    and live. A database writer edits live record 2 and rebuilds the rollups: verify alone
    says BROKEN, verify --archives must too (the next archive run moves the edited rows)."""
    write_ledger(tmp_path / "l.db", pki, [3, 3, 3])
    out = tmp_path / "archives"
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:
        seals = list(store.seals())
        with pytest.raises(KeyboardInterrupt):
            archive_through(StoppedAtRemoval(store, 1), pki, out, seals[1])
    tamper(tmp_path / "l.db", "UPDATE records SET status_code = 14 WHERE seq = 2")
    assert run("rollup", "--rebuild", "--config", config, capsys=capsys)[0] == 0
    code, said = run("verify", "--config", config, capsys=capsys)
    assert code == 1 and "BROKEN at position 2" in said, said
    code, said = run("verify", "--config", config, "--archives", out, capsys=capsys)
    assert code == 1 and "BROKEN" in said, said


def test_the_offline_verifier_and_verify_with_archives_agree_on_intact_archives(
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_ledger(tmp_path / "l.db", pki, [3, 3])
    out = tmp_path / "archives"
    archive_all(config, out, capsys)
    assert offline(out, pki, capsys)[0] == 0
    assert run("verify", "--config", config, "--archives", out, capsys=capsys)[0] == 0


# -- 5. the defences of the archived prefix and rows (W3, W4, W6) -------------------------------


def archived_ledger(path: Path, pki: CertificateAuthority, out: Path) -> None:
    """Nine records in three batches, the first two archived by the archiver into ``out``."""
    write_ledger(path, pki, [3, 3, 3])
    with closing(SqliteLedgerStore(path)) as store:
        archive_through(store, pki, out, list(store.seals())[1])


def test_archived_rollup_rows_edited_after_archiving_are_found_and_stop_the_archiver(
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The archiver signed the archived rows' digest: rows edited since show in verify, and
    no later archiving signs them (the store refuses too, inside its transaction)."""
    archived_ledger(tmp_path / "l.db", pki, tmp_path / "out")
    assert run("verify", "--config", config, capsys=capsys)[0] == 0
    (changed,) = tamper(
        tmp_path / "l.db", "UPDATE rollup_groups SET calls = calls + 5 WHERE archived = 1"
    )
    assert changed > 0
    code, said = run("verify", "--config", config, capsys=capsys)
    assert code == 1 and "BROKEN: the archived rollup rows differ from those" in said, said
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:
        last = list(store.seals())[-1]
        with pytest.raises(archive.ArchiveRefused, match="archived rollup rows differ"):
            archive_through(store, pki, tmp_path / "out", last)
        sealer = Sealer(
            (pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes()
        )
        with pytest.raises(LedgerWriteError, match="not those its last archiving signed"):
            store.remove_archived("", last, 1, "x", sealer.sign, sealer.cert_pem)
        assert store.archived().seal.seq == 2 and store.head()[0] == 9  # type: ignore[union-attr]


AGENCY_SIGNED = "the statement re-signed with an agency key"
PREFIX_EDITS = {
    "the archive it names": ("UPDATE archived_prefix SET archive = 'elsewhere'", "not signed by its certificate"),
    "when it was archived": ("UPDATE archived_prefix SET archived_ns = archived_ns - 1", "not signed by its certificate"),
    "its seal's signature": ("UPDATE archived_prefix SET signature = '00'", "ends at a seal 2 no broker"),
    AGENCY_SIGNED: ("", "is not signed by a broker of this exchange"),
}  # fmt: skip


@pytest.mark.parametrize("edit", list(PREFIX_EDITS))
def test_an_altered_archived_prefix_is_found_by_verify(
    edit: str,
    config: Path,  # noqa: F811
    pki: CertificateAuthority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archived_ledger(tmp_path / "l.db", pki, tmp_path / "out")
    sql, problem = PREFIX_EDITS[edit]
    if edit == AGENCY_SIGNED:
        bundle = pki.dir / "agencies" / "post"
        agency = Sealer((bundle / "agency.key").read_bytes(), (bundle / "agency.crt").read_bytes())
        with closing(SqliteLedgerStore(tmp_path / "l.db", readonly=True)) as store:
            genuine = store.archived()
        assert genuine is not None
        statement = dataclasses.replace(genuine, certificate=agency.cert_pem).statement()
        sql = "UPDATE archived_prefix SET statement_signature = ?, certificate_pem = ?"
        params: tuple[Any, ...] = (agency.sign(statement), agency.cert_pem)
    else:
        params = ()
    assert tamper(tmp_path / "l.db", (sql, params)) == [1]
    code, said = run("verify", "--config", config, capsys=capsys)
    assert code == 1 and "BROKEN: the archived prefix (records 1 to 6, seals 1 to 2" in said
    assert problem in said, said


def test_finishing_an_interrupted_run_refuses_to_remove_live_records_that_were_edited(
    pki: CertificateAuthority, tmp_path: Path
) -> None:
    """The file of a stopped run is intact; the live copies of its records are not. Removing
    them on the file's word would erase the evidence of the edit: nothing is removed."""
    write_ledger(tmp_path / "l.db", pki, [3, 3, 3])
    out = tmp_path / "out"
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:
        seals = list(store.seals())
        with pytest.raises(KeyboardInterrupt):
            archive_through(StoppedAtRemoval(store, 1), pki, out, seals[1])
    tamper(tmp_path / "l.db", "UPDATE records SET status_code = 14 WHERE seq = 2")
    with closing(SqliteLedgerStore(tmp_path / "l.db")) as store:
        edited = r"do not verify in the live ledger: BROKEN at position 2.*nothing removed"
        with pytest.raises(archive.ArchiveRefused, match=edited):
            archive_through(store, pki, out, seals[2])
        assert store.archived() is None and store.head()[0] == 9


@pytest.mark.parametrize("table", ["rollup_groups", "rollup_provider_days"])
def test_a_sqlite_rollup_row_is_either_live_or_archived(
    table: str, pki: CertificateAuthority, tmp_path: Path
) -> None:
    """A row marked 2 would be read by no query, and covered by no check."""
    unavailable_day(tmp_path / "l.db", pki)
    with sqlite3.connect(tmp_path / "l.db") as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(f"UPDATE {table} SET archived = 2")
    conn.close()
