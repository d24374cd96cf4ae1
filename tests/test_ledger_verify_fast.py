"""Verify on every core and from signed checkpoints: the same verdicts, fewer records read."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tabadol.cli import _seal_signers, main
from tabadol.errors import TabadolError
from tabadol.ledger import checkpoints
from tabadol.ledger.record import Seal
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.ledger.verify import anchor_path, read_anchor, verify_chain
from tabadol.pki import CertificateAuthority, load_crl
from tests.conftest import TRUST_DOMAIN, broker_toml
from tests.test_ledger import check, tamper, write_ledger

BATCHES = [3] * 12  # 36 records under 12 seals: ranges of 5+ records split it in several


def parallel(path: Path, pki: CertificateAuthority) -> str:
    store = SqliteLedgerStore(path, readonly=True)
    try:
        return str(
            verify_chain(
                store,
                _seal_signers(pki.dir, TRUST_DOMAIN),
                read_anchor(anchor_path(path)),
                reader=functools.partial(SqliteLedgerStore, path, readonly=True),
                workers=2,
                chunk_records=5,
            )
        )
    finally:
        store.close()


TAMPERING = {
    "edited": ["UPDATE records SET status_code = 5 WHERE seq = 20"],
    "edited beyond ASCII": ["UPDATE records SET method = 'Méthode' WHERE seq = 7"],
    "deleted": ["DELETE FROM records WHERE seq = 16"],
    "swapped": [
        "UPDATE records SET seq = -1 WHERE seq = 12",
        "UPDATE records SET seq = 12 WHERE seq = 13",
        "UPDATE records SET seq = 13 WHERE seq = -1",
    ],
    "tail truncated": ["DELETE FROM records WHERE seq > 30"],
    "appended after the fact": [
        "INSERT INTO records SELECT seq + 36, start_ns, end_ns, trace_id, request_id, consumer, "
        "provider, service, method, kind, status_code, request_bytes, request_messages, "
        "response_bytes, response_messages, endpoint, broker_instance, request_sha256, "
        "response_sha256, consumer_serial, consumer_verified, grant, protocol, prev_digest, digest "
        "FROM records WHERE seq = 1"
    ],
    "seal signature": ["UPDATE seals SET signature = '00' WHERE seq = 8"],
    "seal moved": ["UPDATE seals SET head_digest = '00' WHERE seq = 4"],
    "a value of another type": ["UPDATE records SET consumer_verified = 0.0 WHERE seq = 25"],
}


@pytest.fixture
def ledger(tmp_path: Path, pki: CertificateAuthority) -> Path:
    path = tmp_path / "ledger.db"
    write_ledger(path, pki, BATCHES)
    return path


def test_an_intact_ledger_verifies_the_same_on_every_core(
    ledger: Path, pki: CertificateAuthority
) -> None:
    assert (
        parallel(ledger, pki)
        == check(ledger, pki)
        == ("OK: 36 records, 12 seals, chain and seals intact")
    )


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_tampering_gives_the_same_first_break_on_every_core(
    ledger: Path, pki: CertificateAuthority, kind: str
) -> None:
    tamper(ledger, *TAMPERING[kind])
    sequential = check(ledger, pki)
    assert sequential.startswith("BROKEN")
    assert parallel(ledger, pki) == sequential


# --- Checkpoints -----------------------------------------------------------------------------


class CountingStore:
    """A ledger that counts the records verify reads from it."""

    read = 0

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def records(self, chain: str = "", from_seq: int = 1) -> Iterator[Any]:
        for stored in self._inner.records(chain, from_seq):
            CountingStore.read += 1
            yield stored

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def setup(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path]:
    """A configuration whose ledger is read through CountingStore, and an auditor's credentials."""
    import tabadol.ledger.store as stores

    opened = stores.open_ledger
    monkeypatch.setattr(stores, "open_ledger", lambda *a, **k: CountingStore(opened(*a, **k)))
    config = tmp_path / "broker.toml"
    config.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"], grants="")
        + '\n[ledger]\npath = "l.db"\n'
    )
    write_ledger(tmp_path / "l.db", pki, [4, 4])
    auditor = pki.dir / "auditors" / "sara"
    if not auditor.exists():
        pki.issue_person("auditor", "sara")
    return config, auditor


def run(*args: str | Path) -> tuple[int, int]:
    """Exit status of `tabadol ledger verify ARGS` and how many records it read."""
    CountingStore.read = 0
    return main(["ledger", "verify", *map(str, args)]), CountingStore.read


def test_a_resumed_verify_reads_only_the_records_after_the_checkpoint(
    setup: tuple[Path, Path], pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    config, auditor = setup
    assert run("--config", config) == (0, 8)
    assert not (config.parent / "l.db.checkpoints").exists()  # without --as, none written
    assert run("--config", config, "--as", auditor) == (0, 8)
    saved = config.parent / "l.db.checkpoints"
    assert saved.stat().st_mode & 0o777 == 0o600
    assert json.loads(saved.read_text())["by"] == "auditor 'sara'"
    write_ledger(config.parent / "l.db", pki, [3])
    assert run("--config", config, "--as", auditor) == (0, 3)
    assert run("--config", config) == (0, 0)
    assert run("--config", config, "--full") == (0, 11)
    assert "OK: 11 records, 3 seals" in capsys.readouterr().out


def test_a_checkpoint_whose_seal_was_rewritten_breaks_the_verify(
    setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, auditor = setup
    assert run("--config", config, "--as", auditor)[0] == 0
    tamper(config.parent / "l.db", "UPDATE seals SET head_digest = '00' WHERE seq = 2")
    capsys.readouterr()
    assert run("--config", config)[0] == 1
    out = capsys.readouterr().out
    assert "BROKEN at position 8: seal 2 no longer matches the checkpoint at seal 2" in out
    assert "history before the checkpoint was rewritten" in out


def rewrite(path: Path, **changes: Any) -> None:
    fields = json.loads(path.read_text().splitlines()[-1])
    path.write_text(json.dumps({**fields, **changes}) + "\n")


def signed_by_key(path: Path, cert_pem: bytes, key_pem: bytes, by: str, **changes: Any) -> None:
    fields = json.loads(path.read_text().splitlines()[-1])
    cp = checkpoints.Checkpoint(**{**fields, **changes, "by": by, "certificate": cert_pem.decode()})
    cp = dataclasses.replace(cp, signature=Sealer(key_pem, cert_pem).sign(cp.payload()))
    path.write_text(json.dumps(dataclasses.asdict(cp)) + "\n")


def test_forged_unsigned_and_agency_checkpoints_are_refused_and_everything_is_read(
    setup: tuple[Path, Path], pki: CertificateAuthority, capsys: pytest.CaptureFixture[str]
) -> None:
    config, auditor = setup
    saved = config.parent / "l.db.checkpoints"
    run("--config", config, "--as", auditor)
    capsys.readouterr()
    rewrite(saved, seal=1, count=4)  # moved back by someone who cannot sign
    assert run("--config", config) == (1, 8)
    assert "its signature does not match (it was forged or altered)" in capsys.readouterr().out
    rewrite(saved, signature="")
    assert run("--config", config) == (1, 8)
    assert "its signature does not match" in capsys.readouterr().out
    agency = pki.dir / "agencies" / "post"
    signed_by_key(
        saved, (agency / "agency.crt").read_bytes(), (agency / "agency.key").read_bytes(), "x"
    )
    assert run("--config", config) == (1, 8)
    assert "not an operator's or auditor's certificate" in capsys.readouterr().out
    saved.write_text("not json\n")
    assert run("--config", config) == (1, 8)
    assert "line 1: not a checkpoint" in capsys.readouterr().out
    assert run("--config", config, "--full") == (0, 8)  # --full reads no checkpoints


def test_a_checkpoint_by_a_revoked_auditor_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "pki", TRUST_DOMAIN)
    bundle = ca.issue_person("auditor", "omid")
    seal = Seal(1, 4, "ab" * 32, 0, "", "")
    cp = checkpoints.sign(bundle, TRUST_DOMAIN, seal, time.time_ns())
    ca_cert = x509.load_pem_x509_certificate((ca.dir / "ca.crt").read_bytes())
    judge = functools.partial(
        checkpoints.problem,
        ca_cert=ca_cert,
        trust_domain=TRUST_DOMAIN,
        now=dt.datetime.now(dt.UTC),
    )
    assert judge(cp, revoked=set()) is None
    (serial,) = ca.revoke([x509.load_pem_x509_certificate(cp.certificate.encode()).serial_number])
    revoked = {e.serial_number for e in load_crl(ca.dir / "crl.pem", ca_cert)}
    assert judge(cp, revoked=revoked) == f"certificate {serial:x} is revoked (by the CRL)"


def test_an_agency_cannot_sign_a_checkpoint(pki: CertificateAuthority) -> None:
    with pytest.raises(TabadolError, match=r"no auditor\.crt or operator\.crt"):
        checkpoints.sign(pki.dir / "agencies" / "post", TRUST_DOMAIN, Seal(1, 1, "", 0, "", ""), 0)
