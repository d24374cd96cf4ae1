"""The CRLs that brokers and providers keep for themselves, attacked by a local writer of the
directory they live in: symlinks planted for the write, the kept file deleted or damaged to
roll revocations back."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from tabadol.broker import Broker
from tabadol.client import ProviderServer
from tabadol.client.broker_revocations import BrokerRevocations
from tabadol.client.credentials import AgencyCredentials
from tabadol.config import load as load_config
from tabadol.errors import ConfigError
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN, start_broker
from tests.support.echo import own_pki, start_echo
from tests.support.exchange import crl_signed_by

NOW = dt.datetime.now(dt.UTC)


def kept_crl(broker: Broker) -> Path:
    ledger = broker.config.ledger.path
    return ledger.with_name(ledger.name + ".crl")


def victim(directory: Path) -> Path:
    path = directory / "victim.txt"
    path.write_bytes(b"someone else's file\n")
    path.chmod(0o600)
    return path


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[tuple[CertificateAuthority, ProviderServer]]:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    server, _ = await start_echo(ca.dir / "agencies" / "echo")
    try:
        yield ca, server
    finally:
        await server.stop(0)


async def restart(broker: Broker) -> None:
    """Stop ``broker``, then start and stop a new one on the same configuration."""
    again = Broker(load_config(broker.config.path))
    await again.start()
    await again.stop(0)


# --- The broker's kept CRL: beside its ledger ----------------------------------------------


async def test_a_first_start_keeps_the_crl_beside_the_ledger_private(
    tmp_path: Path, echo_contracts: Path, provider: tuple[CertificateAuthority, ProviderServer]
) -> None:
    ca, server = provider
    broker = await start_broker(tmp_path, ca.dir, echo_contracts, [server.address])
    await broker.stop(0)

    mode = os.lstat(kept_crl(broker)).st_mode
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600


async def test_a_symlink_planted_as_the_brokers_temporary_crl_leaves_its_target_alone(
    tmp_path: Path, echo_contracts: Path, provider: tuple[CertificateAuthority, ProviderServer]
) -> None:
    ca, server = provider
    broker = await start_broker(tmp_path, ca.dir, echo_contracts, [server.address])
    target = victim(tmp_path)
    try:
        kept = kept_crl(broker)
        os.symlink(target, kept.with_name(kept.name + ".tmp"))  # the old temporary's name
        ca.revoke_agency("post")
        broker.reload(broker.config)  # keeps the newer CRL
    finally:
        await broker.stop(0)

    assert target.read_bytes() == b"someone else's file\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not kept.is_symlink()
    assert x509.load_der_x509_crl(kept.read_bytes()) is not None


async def test_a_kept_crl_replaced_by_a_symlink_stops_the_start(
    tmp_path: Path, echo_contracts: Path, provider: tuple[CertificateAuthority, ProviderServer]
) -> None:
    ca, server = provider
    broker = await start_broker(tmp_path, ca.dir, echo_contracts, [server.address])
    await broker.stop(0)
    kept = kept_crl(broker)
    kept.unlink()
    os.symlink(victim(tmp_path), kept)

    with pytest.raises(ConfigError, match=rf"{kept}.*symbolic link"):
        Broker(load_config(broker.config.path))


async def test_a_damaged_kept_crl_stops_the_start_instead_of_being_ignored(
    tmp_path: Path, echo_contracts: Path, provider: tuple[CertificateAuthority, ProviderServer]
) -> None:
    ca, server = provider
    broker = await start_broker(tmp_path, ca.dir, echo_contracts, [server.address])
    await broker.stop(0)
    kept_crl(broker).write_bytes(b"not a CRL")

    with pytest.raises(ConfigError, match=r"ledger\.db\.crl is not a CRL .*: restore it"):
        Broker(load_config(broker.config.path))


async def test_a_deleted_kept_crl_stops_a_restart_rather_than_take_an_older_crl(
    tmp_path: Path, echo_contracts: Path, provider: tuple[CertificateAuthority, ProviderServer]
) -> None:
    ca, server = provider
    older = (ca.dir / "crl.pem").read_bytes()
    broker = await start_broker(tmp_path, ca.dir, echo_contracts, [server.address])
    ca.revoke_agency("post")
    broker.reload(broker.config)
    await broker.stop(0)
    newest = (ca.dir / "crl.pem").read_bytes()
    # The attacker can write the PKI directory and the ledger's, not the CA's crlnumber.
    (ca.dir / "crl.pem").write_bytes(older)
    (ca.dir / "crlnumber").unlink()
    kept_crl(broker).unlink()

    with pytest.raises(
        ConfigError, match=r"ledger\.db\.crl is missing but this ledger has run before: restore"
    ):
        Broker(load_config(broker.config.path))

    # The documented recovery: the newest CRL the CA published, copied there.
    (ca.dir / "crl.pem").write_bytes(newest)
    shutil.copyfile(ca.dir / "crl.pem", kept_crl(broker))
    await restart(broker)


# --- The provider's kept CRL: in its credentials directory --------------------------------


def test_a_symlink_planted_as_the_providers_temporary_crl_keeps_its_targets_mode(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TRUST_DOMAIN)
    bundle = ca.issue_agency("echo")
    target = victim(tmp_path)
    os.symlink(target, bundle / "crl.pem.tmp")  # the old temporary's name
    revocations = BrokerRevocations(AgencyCredentials.load(bundle), keep=bundle / "crl.pem")

    assert revocations.offer(
        crl_signed_by(ca, number=3, next_update=NOW + dt.timedelta(days=3)), "the broker"
    )

    assert target.read_bytes() == b"someone else's file\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_ISREG(os.lstat(bundle / "crl.pem").st_mode)


async def test_a_provider_that_held_a_crl_refuses_the_broker_once_crl_pem_is_deleted(
    tmp_path: Path,
) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "echo")
    bundle = ca.dir / "agencies" / "echo"
    broker_pem = (ca.dir / "broker.crt").read_bytes()
    shutil.copyfile(ca.dir / "crl.pem", bundle / "crl.pem")
    first = ProviderServer(bundle)  # no broker=: crl.pem is all it learns revocations from
    assert first.revocations.refusal(broker_pem) is None

    (bundle / "crl.pem").unlink()
    restarted = ProviderServer(bundle)

    why = restarted.revocations.refusal(broker_pem)
    assert why is not None and "no CRL" in why


async def test_a_provider_refuses_an_older_crl_pem_put_back_while_it_was_stopped(
    tmp_path: Path,
) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "echo")
    bundle = ca.dir / "agencies" / "echo"
    broker_pem = (ca.dir / "broker.crt").read_bytes()
    older = (ca.dir / "crl.pem").read_bytes()
    ca.issue_broker(force=True)  # revokes the certificate in broker_pem
    shutil.copyfile(ca.dir / "crl.pem", bundle / "crl.pem")
    assert "is revoked" in (ProviderServer(bundle).revocations.refusal(broker_pem) or "")

    (bundle / "crl.pem").write_bytes(older)  # un-revokes the old broker certificate
    restarted = ProviderServer(bundle)

    why = restarted.revocations.refusal(broker_pem)
    assert why is not None and "no CRL" in why
