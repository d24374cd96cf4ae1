"""The ledger under attack (issue 10): no answered call goes missing unnoticed, refusals are
neither free nor anonymous, and nothing a consumer sends or a reader guesses gets in."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import json
import logging
import os
import signal
import sqlite3
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tabadol import config
from tabadol.broker import Broker
from tabadol.cli import main
from tabadol.client import connect
from tabadol.errors import ConfigError, TabadolError
from tabadol.ledger import LedgerRecord, LedgerWriter
from tabadol.ledger import journal as journal_module
from tabadol.ledger.journal import (
    Journal,
    JournalEntry,
    JournalSignature,
    blocks,
    parse_line,
    review,
    sign,
)
from tabadol.ledger.seal import Sealer, fingerprint
from tabadol.ledger.sessions import Session
from tabadol.ledger.signers import signer_check
from tabadol.ledger.store import LedgerWriteError, SqliteLedgerStore
from tabadol.ledger.verify import read_anchor
from tabadol.pki import CertificateAuthority
from tests.conftest import (
    DEFAULT_GRANTS,
    TRUST_DOMAIN,
    RunningProvider,
    broker_toml,
    start_broker,
)
from tests.support.echo import UNARY, own_pki, start_echo
from tests.support.processes import TABADOL, Process

ANSWERED = 30
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "tabadol-hypothesis")


@contextmanager
def locked(ledger: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holds the ledger's write lock: a real "database is locked"."""
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield holder
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


async def answered_calls(address: str, agency_dir: Path, count: int) -> set[str]:
    """``count`` calls answered OK; their request ids."""
    acked: set[str] = set()
    async with connect(address, agency_dir) as channel:
        for _ in range(count):
            call = channel.unary_unary(UNARY)(b"answered", timeout=10)
            assert await call == b"answered"
            acked.add(str(dict(await call.trailing_metadata() or ())["x-tabadol-request-id"]))
    return acked


def ledger_ids(path: Path) -> list[str]:
    store = SqliteLedgerStore(path, readonly=True)
    try:
        return [stored.record.request_id for stored in store.records()]
    finally:
        store.close()


def ledger_consumers(path: Path) -> list[str]:
    store = SqliteLedgerStore(path, readonly=True)
    try:
        return [stored.record.consumer for stored in store.records()]
    finally:
        store.close()


def verify(config_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["ledger", "verify", "--config", str(config_path)])
    return code, capsys.readouterr().out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_config(
    tmp_path: Path, pki_dir: Path, contracts: Path, provider: str, ledger: str
) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(
            pki_dir=pki_dir, contracts=contracts, endpoints=[provider], grants=DEFAULT_GRANTS
        )
        + f'\n[ledger]\npath = "ledger.db"\n{ledger}\n'
    )
    return path


# --- Finding 4: batched mode loses calls that were already answered -------------------------


async def test_calls_answered_while_the_ledger_is_locked_survive_the_stop_in_the_journal(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger = tmp_path / "ledger.db"
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address],
        ledger='path = "ledger.db"\nbatch_interval_ms = 10\nmax_unwritten_seconds = 600',
    )  # fmt: skip
    journal = tmp_path / "ledger.db.journal"
    with locked(ledger):
        acked = await answered_calls(
            f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post", ANSWERED
        )
        await broker.stop()  # neither raises nor loses: the journal takes them
        journaled = [json.loads(line) for line in journal.read_text().splitlines()]
    assert {e["record"]["request_id"] for e in journaled if "record" in e} == acked
    assert journaled[-2]["accepted"] == ANSWERED  # the closing line, then its signature
    assert all("signature" in e for e in journaled if "record" not in e and "accepted" not in e)
    assert mode(journal) == 0o600
    assert ledger_ids(ledger) == []
    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 0, out
    assert f"stopped with {ANSWERED} records in the journal" in out

    # The next start writes them, as sealed batches, before it takes any call.
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address], ledger='path = "ledger.db"'
    )
    assert not journal.exists()
    assert set(ledger_ids(ledger)) == acked
    await broker.stop()
    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 0, out
    assert f"OK: {ANSWERED} records" in out and "GAP" not in out and "NOTE" not in out
    for name in ("ledger.db", "ledger.db.seals", "ledger.db-wal", "ledger.db-shm"):
        if name.endswith(("db", "seals")) or (tmp_path / name).exists():  # SQLite may drop WAL
            assert mode(tmp_path / name) == 0o600, name


async def test_a_stop_that_can_save_its_backlog_nowhere_exits_non_zero_and_verify_shows_the_gap(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(
        tmp_path, pki.dir, echo_contracts, echo_provider.address, "max_unwritten_seconds = 600"
    )
    ledger, journal = tmp_path / "ledger.db", tmp_path / "ledger.db.journal"
    broker = await Process.start(str(TABADOL), "broker", "--config", str(path))
    try:
        port = (await broker.wait_for(r"broker listening on 127\.0\.0\.1:(\d+)"))[1]
        with locked(ledger):
            journal.mkdir()  # and the journal cannot be written either
            acked = await answered_calls(
                f"127.0.0.1:{port}", pki.dir / "agencies" / "post", ANSWERED
            )
            broker.proc.send_signal(signal.SIGTERM)
            status = await broker.exit_status()
    finally:
        if broker.proc.returncode is None:
            broker.proc.kill()
            await broker.proc.wait()
    assert status != 0
    assert any(
        f"{ANSWERED} records of calls already answered are lost" in line for line in broker.lines
    ), "".join(broker.lines[-10:])
    assert not set(ledger_ids(ledger)) & acked
    journal.rmdir()  # the operator repairs what was wrong: the gap stays visible
    code, out = verify(path, capsys)
    assert code == 1, out
    assert "chain and seals intact" in out
    assert "GAP: broker session" in out and "missing from the ledger" in out

    # A later start records the lost session as abandoned; verify keeps saying so.
    restarted = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address], ledger='path = "ledger.db"'
    )
    await restarted.stop()
    code, out = verify(path, capsys)
    assert code == 1 and "GAP: broker session" in out, out

    # Someone looks into it and says so: verify then shows the gap as acknowledged, and passes.
    session = out.split("GAP: broker session ", 1)[1].split()[0]
    assert main(["ledger", "acknowledge", "--config", str(path), "--session", session,
                 "--by", "sara", "--reason", "incident 1405-117: ledger disk full"]) == 0  # fmt: skip
    code, out = verify(path, capsys)
    assert code == 0, out
    assert "GAP" not in out and "gap acknowledged by sara at " in out
    assert "incident 1405-117" in out
    # Once is enough: a second acknowledgement of the same gap is refused.
    assert main(["ledger", "acknowledge", "--config", str(path), "--session", session,
                 "--by", "reza", "--reason", "again"]) == 2  # fmt: skip


async def test_a_locked_ledger_fails_closed_within_max_unwritten_seconds_then_recovers(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address],
        ledger='path = "ledger.db"\nbatch_interval_ms = 10\nmax_unwritten_seconds = 0.5',
    )  # fmt: skip
    address = f"127.0.0.1:{broker.port}"
    try:
        with locked(tmp_path / "ledger.db"):
            await answered_calls(address, pki.dir / "agencies" / "post", 1)
            for _ in range(400):  # the bound passes; the buffer (100000) is far from full
                if not broker.ledger.accepting:
                    break
                await asyncio.sleep(0.01)
            async with connect(address, pki.dir / "agencies" / "post") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await channel.unary_unary(UNARY)(b"refused", timeout=10)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "ledger cannot be written" in (err.value.details() or "")
        for _ in range(400):  # the writer retries on its own
            if broker.ledger.accepting:
                break
            await asyncio.sleep(0.01)
        await answered_calls(address, pki.dir / "agencies" / "post", 1)
    finally:
        await broker.stop()
    assert len(ledger_ids(tmp_path / "ledger.db")) == 2  # the refusal is counted, not recorded


def test_max_unwritten_seconds_must_exceed_two_batches(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    path = write_config(
        tmp_path, pki.dir, echo_contracts, "127.0.0.1:1",
        "batch_interval_ms = 1000\nmax_unwritten_seconds = 1.5",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"\[ledger\] max_unwritten_seconds"):
        config.load(path)


# --- Forged records through the journal (write access to the ledger's directory, no key) ---

FORGED = "FORGED-VIA-JOURNAL"


def forged_record(when_ns: int) -> LedgerRecord:
    """What the attacker wants counted: cra calling nocr, an hour ago, answered OK."""
    return LedgerRecord(
        start_ns=when_ns, end_ns=when_ns + 5_000_000, trace_id="",
        request_id=uuid.uuid4().hex, consumer="cra", provider="nocr",
        service="tabadol.agencies.nocr.v1.PersonRegistry", method="InquirePerson",
        kind="unary", status_code=0, request_bytes=25, request_messages=1,
        response_bytes=120, response_messages=1, endpoint="127.0.0.1:45013",
        broker_instance=FORGED, consumer_serial="deadbeef",
    )  # fmt: skip


def inject(journal: Path, count: int, session: str | None = None) -> None:
    """The review's attack: plain JSON lines appended to the journal, as the broker writes
    them, each under a fresh session id unless ``session`` names one."""
    hour_ago = time.time_ns() - 3600 * 10**9
    with journal.open("a") as f:
        for i in range(count):
            sid = session or "f0f0f0f0" + uuid.uuid4().hex[:24]
            f.write(JournalEntry(sid, record=forged_record(hour_ago + i * 10**6)).line().decode())


def ledger_instances(path: Path) -> set[str]:
    store = SqliteLedgerStore(path, readonly=True)
    try:
        return {stored.record.broker_instance for stored in store.records()}
    finally:
        store.close()


def rejected(ledger: Path) -> list[dict[str, object]]:
    path = ledger.with_name(ledger.name + ".journal.rejected")
    assert mode(path) == 0o600
    return [json.loads(line) for line in path.read_text().splitlines()]


async def stopped_into_the_journal(
    tmp_path: Path, pki: CertificateAuthority, contracts: Path, provider: RunningProvider
) -> tuple[set[str], str]:
    """A broker that answered calls while its ledger was locked, then stopped: its records
    wait, signed, in the journal. The request ids, and the broker's session."""
    broker = await start_broker(
        tmp_path, pki.dir, contracts, [provider.address],
        ledger='path = "ledger.db"\nbatch_interval_ms = 10\nmax_unwritten_seconds = 600',
    )  # fmt: skip
    with locked(tmp_path / "ledger.db"):
        acked = await answered_calls(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post", 5)
        await broker.stop()
    (session,) = {
        entry.session
        for line in (tmp_path / "ledger.db.journal").read_bytes().splitlines()
        if (entry := parse_line(line)) is not None and entry.closed is not None
    }
    return acked, session


async def restart(
    tmp_path: Path, pki: CertificateAuthority, contracts: Path, provider: RunningProvider
) -> None:
    broker = await start_broker(
        tmp_path, pki.dir, contracts, [provider.address], ledger='path = "ledger.db"'
    )
    await broker.stop()


async def test_records_forged_into_a_stopped_brokers_journal_never_reach_the_sealed_ledger(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger, journal = tmp_path / "ledger.db", tmp_path / "ledger.db.journal"
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address], ledger='path = "ledger.db"'
    )
    acked = await answered_calls(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post", 3)
    await broker.stop()
    inject(journal, 50)  # exactly the review's injection, with fresh session ids

    code, out = verify(tmp_path / "broker.toml", capsys)  # seen before any restart
    assert code == 1 and "UNVERIFIED JOURNAL: 50 lines" in out, out

    caplog.set_level(logging.ERROR, logger="tabadol.ledger")
    await restart(tmp_path, pki, echo_contracts, echo_provider)
    assert set(ledger_ids(ledger)) == acked
    assert FORGED not in ledger_instances(ledger)
    assert not journal.exists()
    aside = rejected(ledger)
    assert len(aside) == 50 and {line["reason"] for line in aside} == {
        "no signature line covers them"
    }
    assert FORGED in str(aside[0]["line"])  # kept as found, to be looked into
    (logged,) = [r.getMessage() for r in caplog.records if "REJECTED" in r.getMessage()]
    assert "REJECTED 50 lines" in logged and f"{journal}.rejected" in logged

    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 1, out
    assert "chain and seals intact" in out
    assert f"REJECTED JOURNAL: 50 lines in {journal}.rejected could not be verified" in out


async def test_records_forged_under_a_real_stopped_sessions_id_are_refused_and_its_own_written(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger = tmp_path / "ledger.db"
    acked, session = await stopped_into_the_journal(tmp_path, pki, echo_contracts, echo_provider)
    inject(tmp_path / "ledger.db.journal", 50, session)
    # A forged closing line would also hide a gap: say the session wrote all it answered.
    with (tmp_path / "ledger.db.journal").open("ab") as f:
        f.write(JournalEntry(session, closed=(55, 55)).line())

    await restart(tmp_path, pki, echo_contracts, echo_provider)
    assert set(ledger_ids(ledger)) == acked  # the session's own records, and only those
    assert FORGED not in ledger_instances(ledger)
    assert len(rejected(ledger)) == 51
    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 1 and "REJECTED JOURNAL: 51 lines" in out, out
    assert "GAP" not in out  # its closing line (signed) says it answered 5


async def test_a_signed_journal_line_edited_after_signing_is_refused(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger, journal = tmp_path / "ledger.db", tmp_path / "ledger.db.journal"
    acked, _ = await stopped_into_the_journal(tmp_path, pki, echo_contracts, echo_provider)
    lines = journal.read_bytes().splitlines(keepends=True)
    (first,) = [i for i, line in enumerate(lines) if b'"record"' in line][:1]
    edited = json.loads(lines[first])
    edited["record"]["consumer"], edited["record"]["provider"] = "cra", "nocr"
    lines[first] = json.dumps(edited, separators=(",", ":")).encode() + b"\n"
    journal.write_bytes(b"".join(lines))

    await restart(tmp_path, pki, echo_contracts, echo_provider)
    written = set(ledger_ids(ledger))
    assert edited["record"]["request_id"] not in written and written < acked
    assert "cra" not in ledger_consumers(ledger)
    reasons = {line["reason"] for line in rejected(ledger)}
    assert reasons == {
        "their signature does not match them (changed after signing, or signed by another key)"
    }
    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 1, out
    assert "REJECTED JOURNAL" in out
    assert f"lost {len(acked - written)} records of answered calls" in out  # and the gap shows


async def test_a_journal_signed_by_a_broker_certificate_of_another_ca_is_refused(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger, journal = tmp_path / "ledger.db", tmp_path / "ledger.db.journal"
    acked, session = await stopped_into_the_journal(tmp_path, pki, echo_contracts, echo_provider)
    # The attacker's own CA, for the same trust domain, and a broker certificate from it:
    # signed lines, a well-formed certificate, the right SPIFFE id, a real session.
    elsewhere = own_pki(tmp_path / "elsewhere", TRUST_DOMAIN)
    impostor = Sealer(
        (elsewhere.dir / "broker.key").read_bytes(), (elsewhere.dir / "broker.crt").read_bytes()
    )
    hour_ago = time.time_ns() - 3600 * 10**9
    Journal(journal).append(
        [JournalEntry(session, record=forged_record(hour_ago + i)) for i in range(50)], impostor
    )

    await restart(tmp_path, pki, echo_contracts, echo_provider)
    assert set(ledger_ids(ledger)) == acked
    assert FORGED not in ledger_instances(ledger)
    aside = rejected(ledger)
    assert len(aside) == 51  # 50 records and their signature line
    assert {line["reason"] for line in aside} == {
        "their signer is not a broker of this exchange: its certificate was not issued by "
        "this exchange's CA"
    }
    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 1 and "REJECTED JOURNAL: 51 lines" in out, out


def test_a_line_a_crash_cut_short_does_not_spoil_the_next_appends_signature(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    journal = tmp_path / "ledger.db.journal"
    journal.write_bytes(b'{"session":"dead","rec')  # a broker killed mid-write
    record = forged_record(time.time_ns())
    Journal(journal).append([JournalEntry("a" * 32, record=record)], sealer)
    cut, signed = blocks(journal.read_bytes())
    assert cut.signature is None and cut.lines == (b'{"session":"dead","rec\n',)
    assert signed.signature is not None and [e.record for e in signed.entries] == [record]


# --- Finding 7: refusals are free, and unattributed --------------------------------------


async def test_refused_calls_count_against_the_consumers_rate_limit(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    # cra has no grant: every call it makes is refused, and each used to cost it nothing.
    limit = '[[limit]]\nconsumer = "cra"\nrate = 0.01\nburst = 1\n'
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address],
        grants=DEFAULT_GRANTS + limit, ledger='path = "ledger.db"',
    )  # fmt: skip
    codes = []
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "cra") as channel:
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await channel.unary_unary(UNARY)(b"probe", timeout=10)
                codes.append(err.value.code())
                trailers = dict(err.value.trailing_metadata() or ())
    finally:
        await broker.stop()
    assert codes[0] is grpc.StatusCode.PERMISSION_DENIED
    assert codes[1:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
    assert int(trailers["x-tabadol-retry-after-ms"]) > 0


async def test_a_revoked_certificates_calls_are_recorded_with_its_claimed_agency_unverified(
    tmp_path: Path, echo_contracts: Path
) -> None:
    own = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    provider, _ = await start_echo(own.dir / "agencies" / "echo")
    serial = x509.load_pem_x509_certificate(
        (own.dir / "agencies/post/agency.crt").read_bytes()
    ).serial_number
    broker = await start_broker(
        tmp_path, own.dir, echo_contracts, [provider.address], ledger='path = "ledger.db"'
    )
    try:
        async with connect(f"127.0.0.1:{broker.port}", own.dir / "agencies" / "post") as channel:
            assert await channel.unary_unary(UNARY)(b"before", timeout=10) == b"before"
            own.revoke_agency("post")
            broker.reload(broker.config)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"after", timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await broker.stop()
        await provider.stop(0)
    store = SqliteLedgerStore(tmp_path / "ledger.db", readonly=True)
    before, after = [stored.record for stored in store.records()]
    store.close()
    assert (before.consumer, before.consumer_serial, before.consumer_verified) == (
        "post", f"{serial:x}", True,
    )  # fmt: skip
    assert (after.consumer, after.consumer_serial, after.consumer_verified) == (
        "post", f"{serial:x}", False,
    )  # fmt: skip
    assert after.status_code == grpc.StatusCode.UNAUTHENTICATED.value[0]


# --- Finding 8: what a consumer sends, and what a reader can guess -------------------------


async def test_a_malformed_trace_id_never_reaches_the_ledger(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address],
        tracing="enabled = false", ledger='path = "ledger.db"',
    )  # fmt: skip
    good = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = [
        "0x" + "0" * 26 + "abcd",  # what the review stored
        good.upper(),
        "0" * 32,
        good + "ff",
        "<script>" + good[8:],
        good,
    ]
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            for trace_id in sent:
                header = f"00-{trace_id}-00f067aa0ba902b7-01"
                await channel.unary_unary(UNARY)(
                    b"t", metadata=(("traceparent", header),), timeout=10
                )
    finally:
        await broker.stop()
    store = SqliteLedgerStore(tmp_path / "ledger.db", readonly=True)
    stored = [s.record.trace_id for s in store.records()]
    store.close()
    assert stored == ["", "", "", "", "", good]


async def test_payload_digests_are_keyed_so_a_guessed_payload_cannot_be_confirmed(
    tmp_path: Path, echo_contracts: Path
) -> None:
    own = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    provider, _ = await start_echo(own.dir / "agencies" / "echo")
    secret = b"national-id:1234567890"
    broker = await start_broker(
        tmp_path, own.dir, echo_contracts, [provider.address],
        ledger='path = "ledger.db"\npayload_digests = true',
    )  # fmt: skip
    try:
        async with connect(f"127.0.0.1:{broker.port}", own.dir / "agencies" / "post") as channel:
            assert await channel.unary_unary(UNARY)(secret, timeout=10) == secret
    finally:
        await broker.stop()
        await provider.stop(0)
    key_file = own.dir / "payload-digest.key"
    assert mode(key_file) == 0o600 and len(key_file.read_bytes()) == 32
    store = SqliteLedgerStore(tmp_path / "ledger.db", readonly=True)
    (record,) = [s.record for s in store.records()]
    store.close()
    assert record.request_sha256 != hashlib.sha256(secret).hexdigest()  # a guess confirms nothing
    keyed = hmac.new(key_file.read_bytes(), secret, hashlib.sha256).hexdigest()
    assert record.request_sha256 == keyed == record.response_sha256

    key_file.write_bytes(b"short")
    with pytest.raises(ConfigError, match=r"payload-digest\.key"):
        Broker(config.load(tmp_path / "broker.toml"))


SESSION = "5e55" * 8
hostile_journal_lines = (
    st.builds(
        lambda i: JournalEntry(SESSION, record=forged_record(i)).line(), st.integers(0, 2**62)
    )
    | st.builds(lambda n: JournalEntry(SESSION, closed=(n, n)).line(), st.integers(0, 9))
    | st.builds(
        lambda n, t, sig: JournalSignature(SESSION, n, t, "0" * 64, "", sig).line(),
        st.integers(-2, 4),
        st.integers(0, 2**63),
        st.text("0123456789abcdef", max_size=140),
    )
    | st.binary(max_size=60)
)


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.lists(hostile_journal_lines, max_size=8).map(b"".join), st.booleans())
def test_no_journal_bytes_without_the_brokers_key_are_accepted_and_none_are_dropped(
    pki: CertificateAuthority, data: bytes, with_cert: bool
) -> None:
    cert = (pki.dir / "broker.crt").read_text()
    if with_cert:  # this exchange's broker certificate, with a signature it never made
        data = data.replace(b'"cert":""', json.dumps({"cert": cert})[1:-1].encode())
        data = data.replace(b"0" * 64, fingerprint(cert.encode()).encode())
    ca = x509.load_pem_x509_certificate((pki.dir / "ca.crt").read_bytes())
    judge = signer_check(ca_cert=ca, trust_domain=TRUST_DOMAIN, revoked_at={})
    found = blocks(data)
    assert b"".join(block.raw for block in found) == data  # set aside as found, every byte
    judged = review(found, {SESSION: Session(SESSION, "", "batched", "h", 1, "", 0)}, judge)
    assert judged.accepted == [] and len(judged.refused) == len(found)


# --- Second round: the journal under a thief of a revoked key, an outage, a local writer ---


async def killed_broker_session(tmp_path: Path, own: CertificateAuthority, contracts: Path) -> str:
    """A broker that answered calls, then was killed -9: its session stays open in the ledger."""
    provider, _ = await start_echo(own.dir / "agencies" / "echo")
    path = write_config(tmp_path, own.dir, contracts, provider.address, "")
    broker = await Process.start(str(TABADOL), "broker", "--config", str(path))
    try:
        port = (await broker.wait_for(r"broker listening on 127\.0\.0\.1:(\d+)"))[1]
        await answered_calls(f"127.0.0.1:{port}", own.dir / "agencies" / "post", 2)
    finally:
        broker.kill()
        await broker.proc.wait()
        await provider.stop(0)
    store = SqliteLedgerStore(tmp_path / "ledger.db", readonly=True)
    (session,) = store.sessions()
    store.close()
    assert not session.ended
    return session.id


async def test_a_thief_of_a_broker_key_revoked_for_compromise_cannot_back_date_journal_records(
    tmp_path: Path, echo_contracts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    session = await killed_broker_session(tmp_path, own, echo_contracts)
    stolen = Sealer((own.dir / "broker.key").read_bytes(), (own.dir / "broker.crt").read_bytes())
    old = x509.load_pem_x509_certificate((own.dir / "broker.crt").read_bytes()).serial_number
    own.issue_broker(force=True)  # renewed (the old one superseded), then found stolen:
    own.revoke([old], reason="key-compromise")
    opened = {s.id: s for s in SqliteLedgerStore(tmp_path / "ledger.db").sessions()}[session]
    back_dated = opened.opened_ns + 1  # "signed" long before the revocation
    forged = [JournalEntry(session, record=forged_record(back_dated + i)) for i in range(20)]
    with (tmp_path / "ledger.db.journal").open("ab") as f:
        f.write(sign(forged, stolen, back_dated))

    provider, _ = await start_echo(own.dir / "agencies" / "echo")
    try:
        await restart(tmp_path, own, echo_contracts, provider)
    finally:
        await provider.stop(0)
    assert FORGED not in ledger_instances(tmp_path / "ledger.db")
    reasons = {str(line["reason"]) for line in rejected(tmp_path / "ledger.db")}
    assert len(reasons) == 1 and f"broker certificate {old:x} is revoked for cause" in reasons.pop()
    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 1 and "REJECTED JOURNAL: 21 lines" in out, out


def test_journal_lines_count_only_from_the_certificate_that_opened_their_session(
    tmp_path: Path,
) -> None:
    own = own_pki(tmp_path, TRUST_DOMAIN)
    opener = fingerprint((own.dir / "broker.crt").read_bytes())
    own.issue_broker(force=True)  # another broker certificate of this exchange, valid
    other = Sealer((own.dir / "broker.key").read_bytes(), (own.dir / "broker.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((own.dir / "ca.crt").read_bytes())
    judge = signer_check(ca_cert=ca, trust_domain=TRUST_DOMAIN, revoked_at={})
    data = sign(
        [JournalEntry(SESSION, record=forged_record(time.time_ns()))], other, time.time_ns()
    )
    session = Session(SESSION, "", "batched", "h", 1, "", 0, signer=opener)
    judged = review(blocks(data), {SESSION: session}, judge)
    assert judged.accepted == []
    assert "was opened by broker certificate" in judged.refused[0][1]
    # The writer binds its session to its certificate, in the ledger (migrated in place).
    store = SqliteLedgerStore(tmp_path / "ledger.db")
    store.open_session(Session("b" * 32, "", "batched", "h", 1, "", 0, signer=other.signer))
    assert store.sessions()[0].signer == other.signer
    store.close()


def test_a_back_dated_seal_appended_after_later_ones_breaks_the_chain(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    from tabadol.ledger.verify import verify as verify_chain

    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    store = SqliteLedgerStore(tmp_path / "ledger.db")
    now = time.time_ns()
    for sealed_ns in (now + 120 * 10**9, now + 60 * 10**9):  # the second "made" before the first
        store.append_sealed(
            [forged_record(now)],
            lambda seq, count, head, at=sealed_ns: sealer.seal(seq, count, head, at),
            sealer.cert_pem,
        )
    ca = x509.load_pem_x509_certificate((pki.dir / "ca.crt").read_bytes())
    judge = signer_check(ca_cert=ca, trust_domain=TRUST_DOMAIN, revoked_at={})
    verdict = verify_chain(store.records(), store.seals(), store.signers(), judge)
    store.close()
    assert not verdict.ok and "seal 2 is dated" in str(verdict) and "back-dated" in str(verdict)


def journaled_records(journal: Path) -> int:
    if not journal.exists():
        return 0
    return sum(1 for line in journal.read_bytes().splitlines() if b'"record"' in line)


async def poll(condition: Callable[[], bool], what: str, bound_s: float = 60.0) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {bound_s} s for {what}"
        await asyncio.sleep(0.05)


async def test_a_short_ledger_outage_leaves_no_false_rejected_journal(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger, journal = tmp_path / "ledger.db", tmp_path / "ledger.db.journal"
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address],
        ledger='path = "ledger.db"\nbatch_interval_ms = 10\nmax_unwritten_seconds = 600',
    )  # fmt: skip
    try:
        with locked(ledger):
            acked = await answered_calls(
                f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post", 5
            )
            await poll(lambda: journaled_records(journal) == 5, "the journal to hold the calls")
            saved = journal.read_bytes()
        await poll(lambda: set(ledger_ids(ledger)) == acked, "the lock to lift")
        # Written through: the running broker takes them out of the journal.
        await poll(lambda: journaled_records(journal) == 0, "the journal to be settled")
        code, out = verify(tmp_path / "broker.toml", capsys)
        assert code == 0 and "JOURNAL" not in out, out
    finally:
        await broker.stop()
    # Had that failed (the journal left as the outage wrote it), nothing is rejected either.
    journal.write_bytes(saved)
    journal.chmod(0o600)
    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 0 and "JOURNAL" not in out, out
    await restart(tmp_path, pki, echo_contracts, echo_provider)
    assert not journal.exists() and not journal.with_name(journal.name + ".rejected").exists()
    assert sorted(ledger_ids(ledger)) == sorted(acked)
    code, out = verify(tmp_path / "broker.toml", capsys)
    assert code == 0 and "JOURNAL" not in out and "GAP" not in out, out


def test_a_symlink_planted_at_the_rejected_file_is_not_followed(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    path = write_config(tmp_path, pki.dir, echo_contracts, "127.0.0.1:1", "")
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    victim.chmod(0o644)
    inject(tmp_path / "ledger.db.journal", 3)
    (tmp_path / "ledger.db.journal.rejected").symlink_to(victim)
    with pytest.raises(ConfigError, match=r"ledger\.db\.journal\.rejected: it is a symbolic link"):
        Broker(config.load(path))
    assert victim.read_text() == "untouched\n" and mode(victim) == 0o644


def test_a_symlink_planted_at_the_anchor_file_is_not_followed_and_verify_names_it(
    tmp_path: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    ledger = tmp_path / "ledger.db"
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    (tmp_path / "ledger.db.seals").symlink_to(victim)
    # The writer reads its seals witness at start (lost batches): a link stops it there.
    with pytest.raises(LedgerWriteError, match=r"ledger\.db\.seals: cannot read the anchor file"):
        LedgerWriter(SqliteLedgerStore(ledger), sealer, anchor=tmp_path / "ledger.db.seals")
    # Planted while it runs: its appends do not follow it either.
    (tmp_path / "ledger.db.seals").unlink()
    writer = LedgerWriter(
        SqliteLedgerStore(ledger),
        sealer,
        batch_interval_s=0.001,
        anchor=tmp_path / "ledger.db.seals",
    )
    (tmp_path / "ledger.db.seals").symlink_to(victim)
    writer.submit(forged_record(1))
    writer.close()
    assert victim.read_text() == "untouched\n"
    with pytest.raises(TabadolError, match=r"ledger\.db\.seals: cannot read the anchor file"):
        read_anchor(tmp_path / "ledger.db.seals")


def test_a_symlink_planted_at_the_journals_temporary_name_is_not_followed(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    journal = tmp_path / "ledger.db.journal"
    Journal(journal).append([JournalEntry(SESSION, record=forged_record(1))], sealer)
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    (tmp_path / "ledger.db.journal.new").symlink_to(victim)
    with Journal(journal).exclusive() as held:
        held.replace(held.blocks)
    assert victim.read_text() == "untouched\n"
    assert mode(journal) == 0o600 and len(blocks(journal.read_bytes())) == 1


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        (lambda j: os.mkfifo(j), "FIFO"),
        (lambda j: j.symlink_to("/dev/zero"), "symbolic link"),
        (lambda j: j.mkdir(), "directory"),
    ],
    ids=["fifo", "dev-zero", "directory"],
)
def test_a_journal_that_is_not_a_regular_file_stops_the_start_with_an_error_naming_it(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    plant: Callable[[Path], None],
    says: str,
) -> None:
    path = write_config(tmp_path, pki.dir, echo_contracts, "127.0.0.1:1", "")
    plant(tmp_path / "ledger.db.journal")
    with pytest.raises(ConfigError, match=r"ledger\.db\.journal") as err:
        Broker(config.load(path))
    assert says in str(err.value)


def test_a_journal_beyond_the_size_cap_stops_the_start_with_an_error_naming_it(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(journal_module, "MAX_JOURNAL_BYTES", 4096)
    path = write_config(tmp_path, pki.dir, echo_contracts, "127.0.0.1:1", "")
    (tmp_path / "ledger.db.journal").write_bytes(b'{"session":"x"}\n' * 1000)
    with pytest.raises(ConfigError, match=r"ledger\.db\.journal.*more than 4096 bytes"):
        Broker(config.load(path))


def test_a_journal_lock_held_by_another_process_is_waited_for_with_a_log_line_then_refused(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(journal_module, "LOCK_WAIT_S", 0.3)
    path = write_config(tmp_path, pki.dir, echo_contracts, "127.0.0.1:1", "")
    journal = tmp_path / "ledger.db.journal"
    holder = os.open(journal, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a separate open file: flock conflicts with it
        caplog.set_level(logging.WARNING, logger="tabadol.ledger")
        with pytest.raises(ConfigError, match=r"ledger\.db\.journal.*held its lock"):
            Broker(config.load(path))
    finally:
        os.close(holder)
    assert f"waiting for the journal lock on {journal} (held by another process)" in caplog.text
