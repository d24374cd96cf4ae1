"""The ops console on free loopback ports, for tests, and clients that log in to it."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Literal

import httpx

from tabadol.ops.dashboard import Accounts
from tabadol.ops.gate import ConsoleAccess
from tabadol.ops.server import OpsServer
from tabadol.ops.sessions import Sessions
from tabadol.pki import CertificateAuthority
from tests.support.collector import ops_trust

OPERATOR = "olivia"  # the tests' operator: log in as her unless a test is about roles
AUDITOR = "arash"

Person = Literal["operator", "auditor"]


def person_bundle(ca: CertificateAuthority, role: Person, name: str) -> Path:
    """The bundle of an operator or auditor of this CA, issued the first time it is asked."""
    bundle = ca.dir / f"{role}s" / name
    if not (bundle / f"{role}.key").exists():
        ca.issue_person(role, name)
    return bundle


def operator_bundle(ca: CertificateAuthority) -> Path:
    return person_bundle(ca, "operator", OPERATOR)


def bundle_files(bundle: Path) -> tuple[Path, Path]:
    """(certificate, key) of a credentials directory: an agency's, operator's or auditor's."""
    for role in ("agency", "operator", "auditor"):
        if (bundle / f"{role}.crt").exists():
            return bundle / f"{role}.crt", bundle / f"{role}.key"
    raise FileNotFoundError(f"{bundle}: no agency, operator or auditor certificate")


def tls_context(ca_crt: Path, bundle: Path | None = None) -> ssl.SSLContext:
    """Trusts the platform CA (and so the console's certificate); presents ``bundle``'s
    certificate when given."""
    context = ssl.create_default_context(cafile=str(ca_crt))
    if bundle is not None:
        cert, key = bundle_files(bundle)
        context.load_cert_chain(cert, key)
    return context


def console_client(server: OpsServer, bundle: Path | None, **options: object) -> httpx.AsyncClient:
    """An HTTPS client to the console, logged in with ``bundle``'s certificate (or none)."""
    return httpx.AsyncClient(
        base_url=server.http_url,
        verify=tls_context(server.trust.ca_path, bundle),
        **options,  # type: ignore[arg-type]
    )


def operator_client(server: OpsServer, ca: CertificateAuthority) -> httpx.AsyncClient:
    """The one authenticated client most tests need: the tests' operator, by certificate."""
    return console_client(server, operator_bundle(ca))


@contextlib.asynccontextmanager
async def running_ops(
    directory: Path,
    ca: CertificateAuthority,
    accounts: Accounts | None = None,
    *,
    http: str = "127.0.0.1:0",
    allowed_hosts: Iterable[str] = (),
) -> AsyncIterator[OpsServer]:
    """An OpsServer with its span store in ``directory`` and its certificate from ``ca``
    (issued the first time), showing ``accounts`` if given."""
    server = OpsServer(
        directory / "spans.db",
        trust=ops_trust(ca),
        http=http,
        otlp="127.0.0.1:0",
        allowed_hosts=allowed_hosts,
    )
    if accounts is not None:
        server.show_ledger(accounts)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def session_access(ca: CertificateAuthority, *hosts: str) -> tuple[ConsoleAccess, str]:
    """For a Starlette TestClient: the console's access rules answering to ``hosts``, and
    the cookie of an operator's session (TestClient has no client certificates)."""
    sessions = Sessions()
    redeemed = sessions.redeem(sessions.issue_token("operator", OPERATOR))
    assert redeemed is not None
    return ConsoleAccess(ops_trust(ca), sessions, frozenset(hosts)), redeemed[0]
