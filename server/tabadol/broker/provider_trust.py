"""Revocation on the provider leg: the certificate each provider endpoint presents.

gRPC's Python TLS verifies the provider's chain and name but has no hook for a CRL. So the
broker makes a TLS handshake of its own to every endpoint (the same CA, client certificate,
server name and ALPN as its gRPC channel), reads the certificate presented, and judges it
against the CRL in force: before it serves, on every reload, and then every health-check
interval. An endpoint is used only while its last judgement was good; one that presents a
revoked certificate gets no calls.

What this does not cover (docs/security.md): an attacker holding a revoked provider key
who can steer the broker's gRPC connections, and only those, to itself between two checks.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Collection, Iterable

from cryptography import x509

from tabadol.broker.credentials import BrokerCredentials
from tabadol.broker.upstream import Upstream
from tabadol.identity import spiffe_ids
from tabadol.spiffe import agency_dns_name, agency_spiffe_id

log = logging.getLogger("tabadol.broker")

_HANDSHAKE_TIMEOUT_S = 5.0


def judge_presented(
    cert_der: bytes, *, provider: str, trust_domain: str, revoked: Collection[int]
) -> str | None:
    """Why a provider endpoint's certificate must not be used, or None when it may. Pure."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        ids = spiffe_ids(cert)
    except ValueError as e:
        return f"its certificate cannot be read ({e})"
    if ids != [agency_spiffe_id(trust_domain, provider)]:
        return (
            f"its certificate is not agency {provider!r}'s (it names {', '.join(ids) or 'nobody'})"
        )
    if cert.serial_number in revoked:
        return f"its certificate {cert.serial_number:x} of agency {provider!r} has been revoked"
    return None


def client_context(creds: BrokerCredentials) -> ssl.SSLContext:
    """TLS as the broker's gRPC channels speak it to providers, for the check's handshake."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=creds.ca_pem.decode())
    if creds.cert_path is not None and creds.key_path is not None:
        context.load_cert_chain(creds.cert_path, creds.key_path)
    context.set_alpn_protocols(["h2"])
    return context


async def presented_certificate(endpoint: str, server_name: str, context: ssl.SSLContext) -> bytes:
    """The DER certificate an endpoint presents in a verified handshake (OSError if none)."""
    host, _, port = endpoint.rpartition(":")
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host.strip("[]"), int(port), ssl=context, server_hostname=server_name
        ),
        _HANDSHAKE_TIMEOUT_S,
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise OSError("the endpoint presented no certificate")
        return bytes(der)
    finally:
        # No TLS close handshake: a gRPC server never answers one, and waiting for it would
        # hold the check for asyncio's 30 s SSL shutdown timeout.
        writer.transport.abort()


class ProviderTrust:
    """Judges every provider endpoint's certificate against the broker's CRL."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain

    async def check(self, upstreams: Iterable[Upstream], creds: BrokerCredentials) -> None:
        context = client_context(creds)
        await asyncio.gather(*(self._check(u, creds, context) for u in set(upstreams)))

    def rejudge(self, upstreams: Iterable[Upstream], creds: BrokerCredentials) -> None:
        """At once, with no network: a new CRL applied to what each endpoint last presented."""
        for upstream in set(upstreams):
            if upstream.presented is not None:
                self._judge(upstream, upstream.presented, creds)

    async def _check(
        self, upstream: Upstream, creds: BrokerCredentials, context: ssl.SSLContext
    ) -> None:
        name = agency_dns_name(self.trust_domain, upstream.provider)
        try:
            der = await presented_certificate(upstream.endpoint, name, context)
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as e:
            # Unreachable says nothing about revocation: the last judgement stands (an
            # endpoint never judged stays unused), and health checks handle reachability.
            log.debug(
                "provider %s endpoint %s: no certificate check (%s)",
                upstream.provider,
                upstream.endpoint,
                e,
            )
            return
        upstream.presented = der
        self._judge(upstream, der, creds)

    def _judge(self, upstream: Upstream, der: bytes, creds: BrokerCredentials) -> None:
        why = judge_presented(
            der, provider=upstream.provider, trust_domain=self.trust_domain, revoked=creds.revoked
        )
        was = upstream.health.trusted
        upstream.health.trusted = why is None
        if why is not None and was is not False:
            log.error(
                "provider %s endpoint %s gets no calls: %s",
                upstream.provider,
                upstream.endpoint,
                why,
            )
        elif why is None and was is False:
            log.warning(
                "provider %s endpoint %s presents a valid certificate again",
                upstream.provider,
                upstream.endpoint,
            )
