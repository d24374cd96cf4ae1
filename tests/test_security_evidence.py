"""An outsider's attacks on RFC 3161 seal timestamps and on fast verify with signed
checkpoints. Each test states what must hold."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path

import pytest

from tabadol.errors import TabadolError
from tabadol.ledger import checkpoints
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.ledger.timestamps import timestamp_findings
from tabadol.pki import PEOPLE, CertificateAuthority
from tests import test_ledger_timestamps, test_ledger_verify_fast
from tests.conftest import TRUST_DOMAIN
from tests.support.tsa import LoopbackTsa
from tests.test_ledger import check, tamper, write_ledger
from tests.test_ledger_timestamps import chain_pem, timestamp_all
from tests.test_ledger_verify_fast import parallel, run

# Their fixtures, under the same names: a real TSA on loopback, a ledger with an auditor.
tsa_dir = test_ledger_timestamps.tsa_dir
tsa = test_ledger_timestamps.tsa
setup = test_ledger_verify_fast.setup

DAY_NS = 86_400 * 10**9


def _stamped_seals_dated(
    tmp_path: Path, pki: CertificateAuthority, tsa: LoopbackTsa, tsa_dir: Path, shift_ns: int
) -> list[str]:
    """Findings for a ledger whose seals claim dates ``shift_ns`` from when they were made,
    timestamped now by the configured TSA (what a key holder gets by re-signing seals with
    their old dates, deleting the tokens and letting the broker, or himself, ask again)."""
    ledger = tmp_path / "l.db"
    write_ledger(ledger, pki, [2, 2])
    tamper(ledger, f"UPDATE seals SET sealed_ns = sealed_ns + {shift_ns}")
    assert timestamp_all(ledger, tsa, tsa_dir) == 2
    store = SqliteLedgerStore(ledger, readonly=True)
    try:
        return timestamp_findings(store, "", store.seals(), chain_pem(tsa_dir))
    finally:
        store.close()


# --- RFC 3161 timestamps ---------------------------------------------------------------------


def test_a_token_dated_a_month_after_its_seal_is_not_a_plain_ok(
    tmp_path: Path, pki: CertificateAuthority, tsa: LoopbackTsa, tsa_dir: Path
) -> None:
    findings = _stamped_seals_dated(tmp_path, pki, tsa, tsa_dir, -30 * DAY_NS)
    assert any(f.startswith(("BROKEN", "NOTE", "WARNING")) for f in findings), findings


def test_a_token_dated_before_its_seal_is_broken(
    tmp_path: Path, pki: CertificateAuthority, tsa: LoopbackTsa, tsa_dir: Path
) -> None:
    findings = _stamped_seals_dated(tmp_path, pki, tsa, tsa_dir, 365 * DAY_NS)
    assert any(f.startswith("BROKEN") for f in findings), findings


def test_tokens_for_untruncated_seals_still_hold_and_the_ok_line_names_the_tsa(
    tmp_path: Path, pki: CertificateAuthority, tsa: LoopbackTsa, tsa_dir: Path
) -> None:
    """Held: honest, prompt tokens give one OK line naming the TSA."""
    findings = _stamped_seals_dated(tmp_path, pki, tsa, tsa_dir, 0)
    assert len(findings) == 1 and findings[0].startswith("OK: 2 seals timestamped by CN=Test TSA")


# --- Fast verify: SQLite's JSON against Python's ---------------------------------------------

ODD_VALUES = {
    "int as real": "UPDATE records SET start_ns = CAST(start_ns AS REAL) WHERE seq = 7",
    "int as text": "UPDATE records SET status_code = '0' WHERE seq = 7",
    "text as int": "UPDATE records SET request_bytes = 10, method = 5 WHERE seq = 7",
    "blob": "UPDATE records SET method = X'4D' WHERE seq = 7",
    "DEL": "UPDATE records SET method = 'M' || char(127) WHERE seq = 7",
    "NUL inside": "UPDATE records SET method = 'M' || char(0) WHERE seq = 7",
    "slash": "UPDATE records SET method = 'M/' WHERE seq = 7",
    "quote": "UPDATE records SET method = 'M\"' WHERE seq = 7",
    "verified as text": "UPDATE records SET consumer_verified = '1' WHERE seq = 7",
    "verified 2": "UPDATE records SET consumer_verified = 2 WHERE seq = 7",
    "digest upper": "UPDATE records SET digest = upper(digest) WHERE seq = 7",
    "huge real": "UPDATE records SET end_ns = 1e300 WHERE seq = 7",
}


@pytest.mark.parametrize("kind", sorted(ODD_VALUES))
def test_odd_sqlite_values_get_the_same_verdict_on_every_core(
    tmp_path: Path, pki: CertificateAuthority, kind: str
) -> None:
    """Held: whatever SQLite's json_array makes of a value, the fast path never passes a
    record the one-by-one walk breaks (it falls back on the first doubt)."""
    ledger = tmp_path / "ledger.db"
    write_ledger(ledger, pki, [3] * 12)
    tamper(ledger, ODD_VALUES[kind])
    sequential = check(ledger, pki)
    assert sequential.startswith("BROKEN")
    assert parallel(ledger, pki) == sequential


@pytest.mark.parametrize("value", ["0", "0.0", "X''"])
def test_a_serial_of_another_type_is_an_edit(
    tmp_path: Path, pki: CertificateAuthority, value: str
) -> None:
    ledger = tmp_path / "ledger.db"
    write_ledger(ledger, pki, [3] * 12)
    tamper(ledger, f"UPDATE records SET consumer_serial = {value} WHERE seq = 7")
    assert check(ledger, pki).startswith("BROKEN")


# --- Signed checkpoints ----------------------------------------------------------------------


def _expired_auditor(pki: CertificateAuthority, name: str) -> Path:
    """An auditor whose certificate was valid from 10 days ago to 8 days ago."""
    bundle = pki.dir / "auditors" / name
    bundle.mkdir(parents=True, exist_ok=True)
    pki._issue(
        spiffe_id=PEOPLE["auditor"](TRUST_DOMAIN, name),
        dns_names=[],
        ips=[],
        common_name=f"auditor {name}",
        cert_path=bundle / "auditor.crt",
        key_path=bundle / "auditor.key",
        days=2,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
        server=False,
    )
    return bundle


def test_an_expired_auditor_cannot_vouch_for_a_seal_made_after_the_expiry(
    setup: tuple[Path, Path],
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, _ = setup
    ledger = config.parent / "l.db"
    store = SqliteLedgerStore(ledger, readonly=True)
    last = list(store.seals())[-1]
    store.close()
    expired = _expired_auditor(pki, "gone")
    nine_days_ago = time.time_ns() - 9 * DAY_NS
    checkpoints.append(
        checkpoints.checkpoints_path(ledger),
        checkpoints.sign(expired, TRUST_DOMAIN, last, nine_days_ago),
    )
    # What the forged checkpoint buys: a record before it edited, unseen.
    tamper(ledger, "UPDATE records SET status_code = 5 WHERE seq = 3")
    capsys.readouterr()
    status, read = run("--config", config)
    out = capsys.readouterr().out
    assert status == 1 and read >= 3, out  # walked from the start, up to the edit
    assert "has expired" in out and "not used" in out
    assert "BROKEN at position 3" in out


def test_a_checkpoint_for_a_truncated_seal_breaks_the_verify(
    setup: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Held: the checkpoint's seal removed (with its records) reads as BROKEN, not as a
    fresh start."""
    config, auditor = setup
    assert run("--config", config, "--as", auditor)[0] == 0
    tamper(
        config.parent / "l.db",
        "DELETE FROM seals WHERE seq = 2",
        "DELETE FROM records WHERE seq > 4",
    )
    capsys.readouterr()
    assert run("--config", config)[0] == 1
    assert "seal 2 no longer matches the checkpoint" in capsys.readouterr().out


def test_a_checkpoint_of_another_ledger_breaks_rather_than_skips(
    setup: tuple[Path, Path],
    tmp_path: Path,
    pki: CertificateAuthority,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Held (fails safe): a genuine checkpoint signed over another ledger's seal 2 is never
    used to skip this one's records. Its wording blames a rewrite (see the report: LOW)."""
    config, auditor = setup
    other = tmp_path / "other" / "l.db"
    other.parent.mkdir()
    write_ledger(other, pki, [4, 4])
    tamper(other, "UPDATE records SET status_code = 1")  # the chain differs; so do its seals
    from dataclasses import replace

    store = SqliteLedgerStore(other, readonly=True)
    foreign = replace(list(store.seals())[-1], head_digest="ab" * 32)
    store.close()
    checkpoints.append(
        checkpoints.checkpoints_path(config.parent / "l.db"),
        checkpoints.sign(auditor, TRUST_DOMAIN, foreign, time.time_ns()),
    )
    capsys.readouterr()
    assert run("--config", config)[0] == 1
    assert "no longer matches the checkpoint" in capsys.readouterr().out


def test_the_newest_trusted_checkpoint_is_the_one_resumed_from(
    setup: tuple[Path, Path],
    pki: CertificateAuthority,
) -> None:
    """Held: several checkpoints, in any order in the file: verify resumes from the most
    advanced one whose seal still holds."""
    config, auditor = setup
    ledger = config.parent / "l.db"
    store = SqliteLedgerStore(ledger, readonly=True)
    first, second = list(store.seals())
    store.close()
    path = checkpoints.checkpoints_path(ledger)
    checkpoints.append(path, checkpoints.sign(auditor, TRUST_DOMAIN, second, time.time_ns()))
    checkpoints.append(path, checkpoints.sign(auditor, TRUST_DOMAIN, first, time.time_ns()))
    assert run("--config", config) == (0, 0)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_checkpoint_file_that_is_a_link_or_a_fifo_is_refused_without_hanging(
    tmp_path: Path, kind: str
) -> None:
    """Held: read_regular opens O_NOFOLLOW | O_NONBLOCK and wants a regular file."""
    path = tmp_path / "l.db.checkpoints"
    if kind == "symlink":
        (tmp_path / "elsewhere").write_text("")
        path.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            checkpoints.read(path)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "reading the checkpoints hung"
    assert isinstance(outcome[0], TabadolError), outcome


def test_verify_as_an_expired_auditor_refuses_to_sign(
    setup: tuple[Path, Path],
    pki: CertificateAuthority,
) -> None:
    config, _ = setup
    expired = _expired_auditor(pki, "lapsed")
    try:
        status, _ = run("--config", config, "--as", expired)
    except TabadolError:
        status = 2
    assert status != 0 or not checkpoints.checkpoints_path(config.parent / "l.db").exists()
    assert run("--config", config)[0] == 0


def test_a_huge_or_slow_tsa_answer_is_cut_short(tmp_path: Path) -> None:
    """Held: ask_tsa reads at most 1 MiB (+1) and gives up at its timeout; neither is on the
    call path (the timestamper thread asks)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tabadol.ledger.timestamper import TsaUnavailable, ask_tsa

    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path == "/slow":
                release.wait(30)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(4 << 20))
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * (64 << 10))
            except OSError:
                pass

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(TsaUnavailable, match="larger than"):
            ask_tsa(base + "/huge", b"q", 10.0)
        with pytest.raises(TsaUnavailable):
            ask_tsa(base + "/slow", b"q", 0.5)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
