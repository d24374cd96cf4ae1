"""A whole exchange on a PKI of a test's own (so revoking or renewing there leaves the
session's PKI alone): a CA, an echo provider that follows the broker's CRL, and a broker."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tabadol.broker import Broker
from tabadol.client import ProviderServer, connect
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, start_broker
from tests.support.echo import EchoProvider, own_pki, start_echo


async def eventually(check: Callable[[], bool | Awaitable[bool]], seconds: float = 10.0) -> bool:
    """Poll until ``check`` holds, at most ``seconds`` (a bound, not a timing assertion)."""
    ends = time.monotonic() + seconds
    while True:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return True
        if time.monotonic() >= ends:
            return False
        await asyncio.sleep(0.02)


def crl_signed_by(
    ca: CertificateAuthority,
    *,
    number: int,
    revoked: Collection[int] = (),
    next_update: dt.datetime,
    last_update: dt.datetime | None = None,
) -> bytes:
    """A CRL the CA really signed, with whatever number and dates an attacker replays."""
    last = last_update or next_update - dt.timedelta(days=7)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(last)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass
class OwnExchange:
    ca: CertificateAuthority
    broker: Broker
    provider: ProviderServer
    echo: EchoProvider
    directory: Path

    def consumer(self, agency: str = "post") -> grpc.aio.Channel:
        return connect(f"127.0.0.1:{self.broker.port}", self.ca.dir / "agencies" / agency)

    def revoke_and_reload(self, agency: str = "post") -> None:
        """What operators do: `tabadol pki revoke`, then SIGHUP the broker."""
        self.ca.revoke_agency(agency)
        self.broker.reload(self.broker.config)

    def ledger(self) -> list[tuple[str, str, int, bool]]:
        """(consumer, method, status code, verified) of every record, once the broker stopped."""
        store = SqliteLedgerStore(self.broker.config.ledger.path, readonly=True)
        try:
            return [
                (
                    s.record.consumer,
                    s.record.method,
                    s.record.status_code,
                    s.record.consumer_verified,
                )
                for s in store.records()
            ]
        finally:
            store.close()


@contextlib.asynccontextmanager
async def own_exchange(
    directory: Path,
    contracts: Path,
    agencies: tuple[str, ...] = ("post", "tax"),
    grants: str = DEFAULT_GRANTS,
) -> AsyncIterator[OwnExchange]:
    """The exchange, its provider following the broker's CRL every 0.1 s."""
    ca = own_pki(directory, TRUST_DOMAIN, "echo", *agencies)
    provider, echo = await start_echo(ca.dir / "agencies" / "echo", crl_refresh_seconds=0.1)
    broker = await start_broker(directory, ca.dir, contracts, [provider.address], grants)
    provider.follow_broker(f"127.0.0.1:{broker.port}")
    try:
        yield OwnExchange(ca, broker, provider, echo, directory)
    finally:
        await broker.stop(0)
        await provider.stop(0)
