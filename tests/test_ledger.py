"""The ledger: every call accounted for, any tampering detected, and it fails closed."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.cli import _seal_signers, main
from tabadol.client import connect
from tabadol.ledger import LedgerRecord, LedgerWriter, verify
from tabadol.ledger.record import FIELD_NAMES
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import LedgerWriteError, SqliteLedgerStore
from tabadol.ledger.verify import anchor_path, read_anchor
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, RunningProvider, broker_toml, start_broker
from tests.support.echo import BIDI, CLIENT_STREAM, SERVER_STREAM, SERVICE, UNARY


def record(i: int, **changes: object) -> LedgerRecord:
    values: dict[str, object] = dict(
        start_ns=1_000_000 + i, end_ns=2_000_000 + i, trace_id="", request_id=f"r{i}",
        consumer="post", provider="nocr", service="s.S", method="M", kind="unary",
        status_code=0, request_bytes=10, request_messages=1, response_bytes=20,
        response_messages=1, endpoint="127.0.0.1:1", broker_instance="b1",
    )  # fmt: skip
    values.update(changes)
    return LedgerRecord(**values)  # type: ignore[arg-type]


def write_ledger(path: Path, pki: CertificateAuthority, batches: list[int]) -> None:
    """A ledger written by the real writer, one sealed batch per entry of ``batches``."""
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    n = 0
    for size in batches:
        writer = LedgerWriter(SqliteLedgerStore(path), sealer, anchor=anchor_path(path))
        for _ in range(size):
            n += 1
            writer.submit(record(n))
        writer.close()


def check(path: Path, pki: CertificateAuthority) -> str:
    store = SqliteLedgerStore(path, readonly=True)
    try:
        verdict = verify(
            store.records(),
            store.seals(),
            store.signers(),
            _seal_signers(pki.dir, TRUST_DOMAIN),
            read_anchor(anchor_path(path)),
        )
    finally:
        store.close()
    return str(verdict)


@pytest.fixture
def ledger(tmp_path: Path, pki: CertificateAuthority) -> Iterator[Path]:
    path = tmp_path / "ledger.db"
    write_ledger(path, pki, [4, 3, 5])  # 12 records under 3 seals
    yield path


def tamper(path: Path, *statements: str | tuple[str, tuple[Any, ...]]) -> list[int]:
    """Run SQL statements (each alone, or with its parameters) on a SQLite ledger as an
    attacker with the file would, in one transaction; the rows each changed."""
    conn = sqlite3.connect(path)
    with conn:
        changed = [conn.execute(*((s,) if isinstance(s, str) else s)).rowcount for s in statements]
    conn.close()
    return changed


def test_an_untouched_ledger_verifies(ledger: Path, pki: CertificateAuthority) -> None:
    assert check(ledger, pki) == "OK: 12 records, 3 seals, chain and seals intact"


def test_an_edited_record_is_detected(ledger: Path, pki: CertificateAuthority) -> None:
    tamper(ledger, "UPDATE records SET consumer = 'tax' WHERE seq = 6")
    assert check(ledger, pki) == (
        "BROKEN at position 6: its contents do not match its digest (the record was edited)"
    )


def test_an_edited_record_with_recomputed_digests_is_caught_by_the_seals(
    ledger: Path, pki: CertificateAuthority
) -> None:
    # An attacker who rewrites the chain from the edit onwards still cannot re-sign seals.
    from tabadol.ledger.record import chain_digest

    store = SqliteLedgerStore(ledger, readonly=True)
    rows = list(store.records())
    store.close()
    forged = dataclasses.replace(rows[5].record, consumer="tax")
    statements, head = [], rows[4].digest
    for stored in rows[5:]:
        current = forged if stored.seq == 6 else stored.record
        digest = chain_digest(head, current)
        statements.append(
            f"UPDATE records SET consumer = '{current.consumer}', prev_digest = '{head}', "
            f"digest = '{digest}' WHERE seq = {stored.seq}"
        )
        head = digest
    tamper(ledger, *statements)
    assert check(ledger, pki) == (
        "BROKEN at position 7: seal 2 does not match the chain at record 7"
    )


def test_a_deleted_record_is_detected(ledger: Path, pki: CertificateAuthority) -> None:
    tamper(ledger, "DELETE FROM records WHERE seq = 3")
    assert check(ledger, pki) == "BROKEN at position 3: record 3 is missing (found position 4 next)"


def test_an_inserted_record_is_detected(ledger: Path, pki: CertificateAuthority) -> None:
    # Make room at position 5 and copy record 4 into it, renumbering the rest.
    tamper(
        ledger,
        "UPDATE records SET seq = seq + 100 WHERE seq >= 5",
        "UPDATE records SET seq = seq - 99 WHERE seq >= 105",
        f"INSERT INTO records SELECT 5, {', '.join(FIELD_NAMES)}, prev_digest, digest "
        "FROM records WHERE seq = 4",
    )
    assert check(ledger, pki).startswith("BROKEN at position 5: its link to the previous record")


def test_reordered_records_are_detected(ledger: Path, pki: CertificateAuthority) -> None:
    tamper(
        ledger,
        "UPDATE records SET seq = -1 WHERE seq = 8",
        "UPDATE records SET seq = 8 WHERE seq = 9",
        "UPDATE records SET seq = 9 WHERE seq = -1",
    )
    assert check(ledger, pki).startswith("BROKEN at position 8: its link to the previous record")


def test_a_truncated_tail_is_detected_by_its_seal(ledger: Path, pki: CertificateAuthority) -> None:
    tamper(ledger, "DELETE FROM records WHERE seq > 10")
    assert check(ledger, pki) == (
        "BROKEN at position 11: seal 3 covers 12 records but the ledger holds 10: "
        "records were removed from the end"
    )


def test_a_tail_truncated_with_its_seals_is_detected_by_the_anchor(
    ledger: Path, pki: CertificateAuthority
) -> None:
    tamper(ledger, "DELETE FROM records WHERE seq > 7", "DELETE FROM seals WHERE seq = 3")
    assert check(ledger, pki) == (
        "BROKEN at position 8: the anchor file witnessed seal 3 over 12 records, which the "
        "ledger no longer has: it was truncated"
    )


def test_a_writer_refuses_to_start_on_a_ledger_that_lost_sealed_batches(
    ledger: Path, pki: CertificateAuthority
) -> None:
    """A restore that lost the last batch: new seals would take its number and the chain
    would never verify again, so the writer does not start; the seals witness says why."""
    tamper(ledger, "DELETE FROM records WHERE seq > 7", "DELETE FROM seals WHERE seq = 3")
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    with pytest.raises(LedgerWriteError) as err:
        LedgerWriter(SqliteLedgerStore(ledger), sealer, anchor=anchor_path(ledger))
    assert "lost sealed batches" in str(err.value)
    assert "holds seal 3 over 12 records, the ledger only seal 2 over 7 records" in str(err.value)
    assert str(anchor_path(ledger)) in str(err.value)
    # Once someone decides the batch is lost for good and keeps the witness aside: it starts.
    anchor_path(ledger).rename(ledger.with_name("lost-batches.seals"))
    LedgerWriter(SqliteLedgerStore(ledger), sealer, anchor=anchor_path(ledger)).close()


def test_records_appended_after_the_fact_are_detected(
    ledger: Path, pki: CertificateAuthority
) -> None:
    from tabadol.ledger.record import chain_digest

    store = SqliteLedgerStore(ledger, readonly=True)
    last = list(store.records())[-1]
    store.close()
    fake = record(99)
    digest = chain_digest(last.digest, fake)
    values = ", ".join(repr(getattr(fake, name)) for name in FIELD_NAMES)
    tamper(ledger, f"INSERT INTO records VALUES (13, {values}, '{last.digest}', '{digest}')")
    assert check(ledger, pki) == (
        "BROKEN at position 13: records 13 to 13 are not covered by any seal (added after the fact)"
    )


def test_a_seal_signed_by_another_key_is_detected(
    ledger: Path, pki: CertificateAuthority, tmp_path: Path
) -> None:
    rogue = CertificateAuthority.init(tmp_path / "rogue", TRUST_DOMAIN)
    rogue.issue_broker()
    forger = Sealer(
        (rogue.dir / "broker.key").read_bytes(), (rogue.dir / "broker.crt").read_bytes()
    )
    conn = sqlite3.connect(ledger)
    count, head = conn.execute("SELECT count, head_digest FROM seals WHERE seq = 3").fetchone()
    forged = forger.seal(3, count, head, 1)
    with conn:
        conn.execute(
            "UPDATE seals SET signer = ?, signature = ?, sealed_ns = 1 WHERE seq = 3",
            (forged.signer, forged.signature),
        )
        conn.execute("INSERT INTO signers VALUES (?, ?)", (forger.signer, forger.cert_pem))
    conn.close()
    anchor_path(ledger).unlink()  # the forger also removes the witness
    assert check(ledger, pki) == (
        "BROKEN at position 12: seal 3 is not signed by a broker of this exchange: "
        "its certificate was not issued by this exchange's CA"
    )


def test_verify_command_prints_ok_with_the_count_or_the_break(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"], grants="")
        + '\n[ledger]\npath = "l.db"\n'
    )
    write_ledger(tmp_path / "l.db", pki, [2, 2])
    assert main(["ledger", "verify", "--config", str(path)]) == 0
    assert "OK: 4 records, 2 seals" in capsys.readouterr().out
    tamper(tmp_path / "l.db", "UPDATE records SET status_code = 5 WHERE seq = 2")
    assert main(["ledger", "verify", "--config", str(path)]) == 1
    assert "BROKEN at position 2" in capsys.readouterr().out


async def calls_of_every_kind(channel: grpc.aio.Channel) -> dict[str, str]:
    """Make calls of every kind and outcome; returns request id -> what was called."""
    made: dict[str, str] = {}

    def note(call: grpc.aio.Call, what: str, trailers: object) -> None:
        made[dict(trailers or ())["x-tabadol-request-id"]] = what  # type: ignore[call-overload]

    for i in range(3):
        call = channel.unary_unary(UNARY)(b"x" * (10 + i), timeout=10)
        await call
        note(call, f"unary {10 + i}", await call.trailing_metadata())
    stream = channel.unary_stream(SERVER_STREAM)(
        b"abc", metadata=(("x-test-count", "4"),), timeout=10
    )
    assert len([m async for m in stream]) == 4
    note(stream, "server_streaming", await stream.trailing_metadata())
    upload = channel.stream_unary(CLIENT_STREAM)(iter([b"a", b"bb", b"ccc"]), timeout=10)
    await upload
    note(upload, "client_streaming", await upload.trailing_metadata())
    chat = channel.stream_stream(BIDI)(iter([b"1", b"22"]), timeout=10)
    assert len([m async for m in chat]) == 2
    note(chat, "bidi_streaming", await chat.trailing_metadata())
    failing = channel.unary_unary(UNARY)(
        b"", metadata=(("x-test-status", "NOT_FOUND"),), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await failing
    note(failing, "not found", err.value.trailing_metadata())
    return made


async def test_every_call_of_every_kind_is_one_record_with_the_right_fields(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address],
        ledger='path = "ledger.db"\npayload_digests = true',
    )  # fmt: skip
    async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
        made = await calls_of_every_kind(channel)
    async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "cra") as denied:
        with pytest.raises(grpc.aio.AioRpcError):
            await denied.unary_unary(UNARY)(b"", timeout=10)
    await broker.stop()  # a graceful stop writes everything

    store = SqliteLedgerStore(tmp_path / "ledger.db", readonly=True)
    records = {r.record.request_id: r.record for r in store.records()}
    assert len(records) == len(made) + 1
    for request_id in made:
        rec = records[request_id]
        assert (rec.consumer, rec.provider, rec.service) == ("post", "echo", SERVICE)
        assert rec.endpoint == echo_provider.address
        assert rec.end_ns >= rec.start_ns
        assert rec.broker_instance == broker.instance
        assert len(rec.request_sha256) == 64
    by_what = {what: records[rid] for rid, what in made.items()}
    assert by_what["unary 11"].request_bytes == 11 and by_what["unary 11"].response_bytes == 11
    assert by_what["unary 11"].kind == "unary" and by_what["unary 11"].status_code == 0
    streamed = by_what["server_streaming"]
    assert (streamed.kind, streamed.response_messages, streamed.response_bytes) == (
        "server_streaming",
        4,
        28,
    )
    upload = by_what["client_streaming"]
    assert (upload.kind, upload.request_messages, upload.request_bytes) == (
        "client_streaming",
        3,
        6,
    )
    chat = by_what["bidi_streaming"]
    assert (chat.request_messages, chat.response_messages) == (2, 2)
    assert by_what["not found"].status_code == 5
    refused = [r for r in records.values() if r.consumer == "cra"]
    assert len(refused) == 1 and refused[0].status_code == 7 and refused[0].endpoint == ""
    assert check(tmp_path / "ledger.db", pki).startswith(f"OK: {len(made) + 1} records")


async def test_an_unwritable_ledger_fails_closed_then_recovers_by_itself(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address],
        ledger='path = "ledger.db"\nbatch_interval_ms = 10\nbuffer_records = 3',
    )  # fmt: skip
    # Another process holds the write lock: a real "database is locked".
    holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    accepted = 0
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            for _ in range(3):
                assert await channel.unary_unary(UNARY)(b"ok", timeout=10) == b"ok"
                accepted += 1
            for _ in range(200):  # the writer gives up on the lock after its busy timeout
                if broker.ledger.problem is not None:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"no", timeout=10)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "ledger cannot be written" in (err.value.details() or "")
            assert "locked" in (err.value.details() or "")

            holder.execute("ROLLBACK")
            for _ in range(200):  # the writer retries on its own: wait for it, boundedly
                if broker.ledger.accepting and broker.ledger.problem is None:
                    break
                await asyncio.sleep(0.05)
            assert await channel.unary_unary(UNARY)(b"again", timeout=10) == b"again"
            accepted += 1
    finally:
        holder.close()
        await broker.stop()
    assert check(tmp_path / "ledger.db", pki).startswith(f"OK: {accepted} records")


def fill_disk(filler: Path) -> None:
    """Write zeros until the file system says it is full."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return done.returncode == 0


async def test_a_full_disk_fails_closed_with_a_message_naming_it_and_recovers(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "400k"):
        pytest.skip(
            "cannot mount a small tmpfs here (needs root); the locked-ledger test covers failing closed"
        )
    try:
        path = tmp_path / "broker.toml"
        path.write_text(
            broker_toml(
                pki_dir=pki.dir, contracts=echo_contracts, endpoints=[echo_provider.address],
                grants=DEFAULT_GRANTS,
            )
            + f'\n[ledger]\npath = "{disk / "ledger.db"}"\nbatch_interval_ms = 5\nbuffer_records = 50\n'
        )  # fmt: skip
        broker = Broker(config.load(path))
        await broker.start()
        filler = disk / "filler"
        try:
            async with connect(
                f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post"
            ) as channel:
                assert await channel.unary_unary(UNARY)(b"first", timeout=10) == b"first"
                fill_disk(filler)
                refused = None
                for _ in range(500):
                    try:
                        await channel.unary_unary(UNARY)(b"x" * 200, timeout=10)
                    except grpc.aio.AioRpcError as e:
                        refused = e
                        break
                assert refused is not None and refused.code() is grpc.StatusCode.UNAVAILABLE
                assert "full" in (refused.details() or "")
                filler.unlink()
                for _ in range(200):
                    if broker.ledger.accepting and broker.ledger.problem is None:
                        break
                    await asyncio.sleep(0.05)
                assert await channel.unary_unary(UNARY)(b"after", timeout=10) == b"after"
        finally:
            await broker.stop()
        assert check(disk / "ledger.db", pki).startswith("OK:")
    finally:
        done = await asyncio.to_thread(subprocess.run, ["umount", str(disk)], capture_output=True)
        assert done.returncode == 0, done.stderr


def test_two_writers_on_one_ledger_interleave_into_one_chain_that_verifies(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    # Broker worker processes share the ledger: each batch links to the head it finds
    # inside SQLite's write transaction.
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    path = tmp_path / "ledger.db"
    writers = [
        LedgerWriter(
            SqliteLedgerStore(path), sealer, batch_interval_s=0.001, anchor=anchor_path(path)
        )
        for _ in range(2)
    ]
    for i in range(200):
        writers[i % 2].submit(record(i))
    for writer in writers:
        writer.close()
    assert check(path, pki).startswith("OK: 200 records")


class HeldStore:
    """A ledger store whose next batch waits at the door of the write transaction until
    released: another writer's batch can be made to go first."""

    def __init__(self, inner: SqliteLedgerStore) -> None:
        self._inner = inner
        self.waiting = threading.Event()
        self.release = threading.Event()

    def append_sealed(self, *args: Any, **kwargs: Any) -> Any:
        self.waiting.set()
        self.release.wait(10)
        return self._inner.append_sealed(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_writers_sharing_a_ledger_date_their_seals_in_the_order_the_chain_holds_them(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    """One writer reaches the transaction late: its seal comes after the other's in the
    chain, so it must not carry an earlier time (verify would call it back-dated)."""
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    path = tmp_path / "ledger.db"
    late_store = HeldStore(SqliteLedgerStore(path))
    late = LedgerWriter(late_store, sealer, batch_interval_s=0.001)  # type: ignore[arg-type]
    prompt = LedgerWriter(SqliteLedgerStore(path), sealer, batch_interval_s=0.001)
    late.submit(record(1))
    assert late_store.waiting.wait(10)  # its batch is on its way in, held at the door
    prompt.submit(record(2))
    prompt.close()  # written and sealed first
    late_store.release.set()
    late.close()
    assert check(path, pki).startswith("OK: 2 records, 2 seals")


def test_a_record_without_serial_keeps_the_digest_it_had_before_serials_were_recorded() -> None:
    old = record(1)
    schema_1 = (
        1,
        *(getattr(old, name) for name in FIELD_NAMES[: FIELD_NAMES.index("consumer_serial")]),
    )
    assert old.canonical() == json.dumps(schema_1, separators=(",", ":")).encode()
    # A refused certificate's claim is covered by the digest like every other field.
    claimed = record(1, consumer_serial="1f", consumer_verified=False)
    assert claimed.canonical() != dataclasses.replace(claimed, consumer_verified=True).canonical()


def test_a_ledger_written_before_serials_opens_migrates_and_verifies(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    path = tmp_path / "ledger.db"
    write_ledger(path, pki, [3])
    tamper(  # back to the first schema: no serial columns, no sessions
        path,
        "ALTER TABLE records DROP COLUMN consumer_serial",
        "ALTER TABLE records DROP COLUMN consumer_verified",
        "DROP TABLE sessions",
    )
    assert check(path, pki).startswith("OK: 3 records")  # read-only, unmigrated
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    writer = LedgerWriter(SqliteLedgerStore(path), sealer, anchor=anchor_path(path))
    writer.submit(record(4, consumer_serial="2a", consumer_verified=False))
    writer.close()
    assert check(path, pki).startswith("OK: 4 records")
    store = SqliteLedgerStore(path, readonly=True)
    records = [stored.record for stored in store.records()]
    store.close()
    assert [(r.consumer_serial, r.consumer_verified) for r in records] == [
        ("", True), ("", True), ("", True), ("2a", False),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE records SET consumer_verified = 'x' WHERE seq = 5",
        "UPDATE records SET consumer_verified = 2 WHERE seq = 5",
        "UPDATE records SET method = x'00ff' WHERE seq = 5",
        "UPDATE records SET start_ns = 1000005.0 WHERE seq = 5",
    ],
)
def test_a_value_of_another_type_is_an_edit_not_a_crash(
    ledger: Path, pki: CertificateAuthority, statement: str
) -> None:
    """A value no writer writes (what the reports would read otherwise than verify does)."""
    tamper(ledger, statement)
    assert check(ledger, pki) == (
        "BROKEN at position 5: its contents do not match its digest (the record was edited)"
    )
