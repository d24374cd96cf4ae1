"""RFC 3161 timestamps on seals, from a real TSA on loopback (`openssl ts -reply`): tokens
are stored off the call path, verify checks them, and a rewrite before a timestamped seal
shows even when made with the broker's own key."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.cli import main
from tabadol.client import connect
from tabadol.errors import ConfigError
from tabadol.ledger.record import GENESIS, LedgerRecord, chain_digest
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.ledger.timestamper import Timestamper, TsaUnavailable, ask_tsa
from tabadol.ledger.timestamps import (
    TimestampRefused,
    TsaTrust,
    accept_response,
    check_token,
    timestamp_findings,
    timestamp_request,
)
from tabadol.ledger.verify import anchor_path
from tabadol.pki import CertificateAuthority
from tests.conftest import RunningProvider, broker_toml, start_broker
from tests.support.echo import UNARY
from tests.support.tsa import LoopbackTsa, make_tsa_identity
from tests.test_ledger import record, write_ledger


@pytest.fixture(scope="module")
def tsa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tsa")
    make_tsa_identity(directory)
    (directory / "chain.pem").write_bytes(
        (directory / "tsa.crt").read_bytes() + (directory / "ca.crt").read_bytes()
    )
    return directory


@pytest.fixture
def tsa(tsa_dir: Path) -> Iterator[LoopbackTsa]:
    server = LoopbackTsa(tsa_dir)
    yield server
    server.close()


@pytest.fixture(scope="module")
def other_tsa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-tsa")
    make_tsa_identity(directory, name="Another TSA")
    return directory


def chain_pem(tsa_dir: Path) -> bytes:
    return (tsa_dir / "chain.pem").read_bytes()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    ends = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > ends:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sealer_of(pki: CertificateAuthority) -> Sealer:
    return Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())


def verify_config(
    directory: Path, pki: CertificateAuthority, contracts: Path, tsa_dir: Path
) -> Path:
    path = directory / "broker.toml"
    (directory / "tsa-chain.pem").write_bytes(chain_pem(tsa_dir))
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=contracts, endpoints=["127.0.0.1:1"], grants="")
        + '\n[ledger]\npath = "l.db"\ntsa_certificate = "tsa-chain.pem"\n'
    )
    return path


def timestamp_all(ledger: Path, tsa: LoopbackTsa, tsa_dir: Path) -> int:
    stamper = Timestamper(SqliteLedgerStore(ledger), "", tsa.url, chain_pem(tsa_dir))
    try:
        return stamper.timestamp_waiting()
    finally:
        stamper.close()


# The pure checks, against the real TSA.


def test_a_granted_answer_dates_exactly_the_seals_payload(
    tsa: LoopbackTsa, tsa_dir: Path, pki: CertificateAuthority
) -> None:
    sealer = sealer_of(pki)
    seal, other = (
        sealer.seal(1, 5, "ab" * 32, 1, "node-1"),
        sealer.seal(2, 6, "cd" * 32, 2, "node-1"),
    )
    trust = TsaTrust.from_pem(chain_pem(tsa_dir))
    request = timestamp_request(seal)
    before = time.time_ns()
    token, gen_time_ns = accept_response(
        ask_tsa(tsa.url, request.as_bytes(), 10), seal, trust, request
    )

    assert before - 2_000_000_000 <= gen_time_ns <= time.time_ns() + 2_000_000_000
    assert check_token(token, seal, trust) == gen_time_ns
    with pytest.raises(TimestampRefused, match="imprint differs"):
        check_token(token, other, trust)
    with pytest.raises(TimestampRefused, match="nonce"):
        accept_response(
            ask_tsa(tsa.url, timestamp_request(seal).as_bytes(), 10), seal, trust, request
        )


def test_a_token_is_checked_by_the_tsa_ca_alone_and_not_by_another(
    tsa: LoopbackTsa, tsa_dir: Path, other_tsa_dir: Path, pki: CertificateAuthority
) -> None:
    seal = sealer_of(pki).seal(1, 5, "ab" * 32, 1)
    request = timestamp_request(seal)
    answer = ask_tsa(tsa.url, request.as_bytes(), 10)
    ca_only = TsaTrust.from_pem((tsa_dir / "ca.crt").read_bytes())
    token, _ = accept_response(answer, seal, ca_only, request)  # the token carries the TSA's cert
    other = TsaTrust.from_pem(
        (other_tsa_dir / "tsa.crt").read_bytes() + (other_tsa_dir / "ca.crt").read_bytes()
    )
    with pytest.raises(TimestampRefused, match="not signed by the configured TSA"):
        accept_response(answer, seal, other, request)
    with pytest.raises(TimestampRefused, match="not signed by the configured TSA"):
        check_token(token, seal, other)


def test_a_tsa_certificate_file_must_reach_a_root(tsa_dir: Path) -> None:
    with pytest.raises(ValueError, match="no self-signed"):
        TsaTrust.from_pem((tsa_dir / "tsa.crt").read_bytes())
    with pytest.raises(ValueError, match="no PEM certificate"):
        TsaTrust.from_pem(b"not a certificate")


def test_an_answer_that_is_garbage_or_not_granted_is_refused(
    tsa: LoopbackTsa, tsa_dir: Path, pki: CertificateAuthority
) -> None:
    seal = sealer_of(pki).seal(1, 5, "ab" * 32, 1)
    trust = TsaTrust.from_pem(chain_pem(tsa_dir))
    request = timestamp_request(seal)
    with pytest.raises(TimestampRefused, match="no RFC 3161 TimeStampResp"):
        accept_response(b"this is no TimeStampResp", seal, trust, request)
    rejection = bytes.fromhex("3003020102")  # status: rejection, no token
    with pytest.raises(TimestampRefused, match="did not grant it"):
        accept_response(b"\x30\x05" + rejection, seal, trust, request)
    tsa.mode = "down"
    with pytest.raises(TsaUnavailable, match="503"):
        ask_tsa(tsa.url, request.as_bytes(), 10)


# Verify, on a ledger the real writer made.


@pytest.fixture
def stamped_ledger(
    tmp_path: Path, pki: CertificateAuthority, tsa: LoopbackTsa, tsa_dir: Path, echo_contracts: Path
) -> Path:
    """A ledger of 3 sealed batches, each timestamped by the TSA; returns its config."""
    config_path = verify_config(tmp_path, pki, echo_contracts, tsa_dir)
    write_ledger(tmp_path / "l.db", pki, [2, 2, 2])
    assert timestamp_all(tmp_path / "l.db", tsa, tsa_dir) == 3
    return config_path


def test_verify_checks_every_token_against_the_tsa_certificate(
    stamped_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ledger", "verify", "--config", str(stamped_ledger)]) == 0
    out = capsys.readouterr().out
    assert "OK: 6 records, 3 seals" in out
    assert "timestamps: OK: 3 seals timestamped by CN=Test TSA" in out


def test_a_token_swapped_onto_another_seal_is_detected(
    stamped_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(stamped_ledger.parent / "l.db") as conn:
        conn.execute("UPDATE seal_timestamps SET seal_seq = -seal_seq WHERE seal_seq IN (1, 2)")
        conn.execute("UPDATE seal_timestamps SET seal_seq = 3 + seal_seq WHERE seal_seq < 0")
    assert main(["ledger", "verify", "--config", str(stamped_ledger)]) == 1
    out = capsys.readouterr().out
    assert "timestamps: BROKEN: seal 1: its timestamp token" in out
    assert "timestamps: BROKEN: seal 2: its timestamp token" in out
    assert "imprint differs" in out


def test_history_rewritten_and_resealed_with_the_brokers_key_is_caught_by_the_timestamps(
    stamped_ledger: Path, pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    """A holder of the broker's key edits record 1, recomputes the chain, re-signs every
    seal and removes the witness: the chain and seals verify, the TSA's tokens do not."""
    ledger = stamped_ledger.parent / "l.db"
    sealer = sealer_of(pki)
    store = SqliteLedgerStore(ledger)
    stored = list(store.records())
    seals = list(store.seals())
    store.close()
    head = GENESIS
    digests = {}
    with sqlite3.connect(ledger) as conn:
        for r in stored:
            rec: LedgerRecord = r.record
            if r.seq == 1:
                rec = record(1, consumer="someone-else")
                conn.execute("UPDATE records SET consumer = 'someone-else' WHERE seq = 1")
            digest = chain_digest(head, rec)
            conn.execute(
                "UPDATE records SET prev_digest = ?, digest = ? WHERE seq = ?",
                (head, digest, r.seq),
            )
            digests[r.seq] = head = digest
        for seal in seals:
            forged = sealer.seal(seal.seq, seal.count, digests[seal.count], seal.sealed_ns)
            conn.execute(
                "UPDATE seals SET head_digest = ?, signature = ? WHERE seq = ?",
                (forged.head_digest, forged.signature, seal.seq),
            )
    anchor_path(ledger).unlink()

    assert main(["ledger", "verify", "--config", str(stamped_ledger)]) == 1
    out = capsys.readouterr().out
    assert "OK: 6 records, 3 seals, chain and seals intact" in out  # the key holder's forgery
    for seq in (1, 2, 3):
        assert f"timestamps: BROKEN: seal {seq}: its timestamp token" in out


def test_tokens_of_removed_seals_and_seals_without_tokens_are_reported(
    stamped_ledger: Path, pki: CertificateAuthority, tsa_dir: Path
) -> None:
    ledger = stamped_ledger.parent / "l.db"
    with sqlite3.connect(ledger) as conn:
        conn.execute("DELETE FROM seal_timestamps WHERE seal_seq = 2")
    write_ledger(ledger, pki, [1])  # seal 4, not timestamped yet
    store = SqliteLedgerStore(ledger, readonly=True)
    findings = timestamp_findings(store, "", store.seals(), chain_pem(tsa_dir))
    assert [f.split(":")[0] for f in findings] == ["OK", "NOTE", "NOTE"]
    assert "1 seals have no timestamp though later seals have one (seal 2" in findings[1]
    assert "1 seals are not timestamped yet (seals 4 to 4" in findings[2]
    seals_but_the_last = [s for s in store.seals() if s.seq < 3]
    findings = timestamp_findings(store, "", seals_but_the_last, chain_pem(tsa_dir))
    store.close()
    assert any(
        f.startswith("BROKEN: seal 3 was timestamped") and "no longer holds it" in f
        for f in findings
    )


def test_an_existing_ledger_gains_the_timestamps_table(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    ledger = tmp_path / "l.db"
    write_ledger(ledger, pki, [2])
    with sqlite3.connect(ledger) as conn:
        conn.execute("DROP TABLE seal_timestamps")  # as a ledger from before timestamps
    old = SqliteLedgerStore(ledger, readonly=True)
    assert list(old.timestamps()) == []
    old.close()
    store = SqliteLedgerStore(ledger)
    assert store.untimestamped_count() == 1
    store.add_timestamp("", 1, b"token", 1)
    assert store.untimestamped_count() == 0
    store.close()


# The timestamper refuses what it cannot check, and stores nothing of it.


@pytest.mark.parametrize("problem", ["garbage", "another certificate"])
def test_an_answer_that_does_not_check_out_is_refused_logged_and_not_stored(
    problem: str,
    tmp_path: Path,
    pki: CertificateAuthority,
    tsa: LoopbackTsa,
    tsa_dir: Path,
    other_tsa_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = tmp_path / "l.db"
    write_ledger(ledger, pki, [2, 2])
    trusted = chain_pem(tsa_dir)
    if problem == "garbage":
        tsa.mode = "garbage"
    else:
        trusted = (other_tsa_dir / "tsa.crt").read_bytes() + (other_tsa_dir / "ca.crt").read_bytes()
    stamper = Timestamper(SqliteLedgerStore(ledger), "", tsa.url, trusted, poll_s=0.05)
    with caplog.at_level(logging.ERROR, logger="tabadol.ledger"):
        stamper.start()
        wait_for(lambda: stamper.problem is not None, "the refusal")
        stamper.close()
    expected = (
        "no RFC 3161 TimeStampResp" if problem == "garbage" else "not signed by the configured TSA"
    )
    assert expected in (stamper.problem or "")
    assert f"timestamping seals at {tsa.url} refused" in caplog.text and expected in caplog.text
    store = SqliteLedgerStore(ledger, readonly=True)
    assert list(store.timestamps()) == [] and store.untimestamped_count() == 2
    store.close()


# A real broker: timestamping is off the call path, and catches up after an outage.


async def call_a_few(broker: Broker, pki: CertificateAuthority, n: int) -> None:
    channel = connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post")
    try:
        for i in range(n):
            await channel.unary_unary(UNARY)(b"x" * (i + 1), timeout=10)
    finally:
        await channel.close()


def untimestamped_gauge(broker: Broker) -> float | None:
    broker.refresh_metrics()
    return broker.metrics.registry.get_sample_value("tabadol_ledger_seals_untimestamped")


async def test_a_broker_timestamps_its_seals_and_catches_up_after_a_tsa_outage(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    tsa: LoopbackTsa,
    tsa_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "tsa-chain.pem").write_bytes(chain_pem(tsa_dir))
    tsa.mode = "down"
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address],
        ledger=f'path = "l.db"\ntsa_url = "{tsa.url}"\ntsa_certificate = "tsa-chain.pem"',
    )  # fmt: skip
    try:
        stamper = broker.timestamper
        assert stamper is not None
        await call_a_few(broker, pki, 3)  # calls go on while the TSA is down
        await asyncio.to_thread(
            wait_for, lambda: (untimestamped_gauge(broker) or 0) >= 1, "seals to queue"
        )
        await asyncio.to_thread(wait_for, lambda: stamper.problem is not None, "the outage")
        assert "HTTP 503" in (stamper.problem or "")
        assert stamper.timestamped == 0
        tsa.mode = "ok"
        await asyncio.to_thread(
            wait_for,
            lambda: stamper.timestamped >= 1 and untimestamped_gauge(broker) == 0,
            "the backlog to be timestamped",
        )
        assert stamper.problem is None
        await call_a_few(broker, pki, 2)
    finally:
        await broker.stop(0)
    # Seals made just before the stop may wait for the next start: verify says so, not fails.
    assert main(["ledger", "verify", "--config", str(tmp_path / "broker.toml")]) == 0
    out = capsys.readouterr().out
    assert "timestamps: OK:" in out and "BROKEN" not in out


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ('tsa_url = "http://127.0.0.1:3180/tsa"', "tsa_url needs tsa_certificate"),
        ('tsa_url = "ftp://tsa.example:21/"\ntsa_certificate = "t.pem"', "is not a TSA URL"),
        ('tsa_url = "http://tsa.example:99999/"\ntsa_certificate = "t.pem"', "is not a TSA URL"),
        ('tsa_url = "https://u:secret@tsa.example/"\ntsa_certificate = "t.pem"', "user name"),
    ],
)
def test_a_tsa_setting_that_cannot_work_is_refused_at_load(
    lines: str, problem: str, tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"], grants="")
        + f"\n[ledger]\n{lines}\n"
    )
    with pytest.raises(ConfigError, match=f"\\[ledger\\].*{problem}") as raised:
        config.load(path)
    assert "secret" not in str(raised.value)


def test_a_relative_tsa_certificate_is_read_beside_the_configuration(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, tsa_dir: Path
) -> None:
    loaded = config.load(verify_config(tmp_path, pki, echo_contracts, tsa_dir))
    assert loaded.ledger.tsa_certificate == tmp_path / "tsa-chain.pem"
