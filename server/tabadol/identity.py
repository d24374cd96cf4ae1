"""Who is calling: agency identity from a verified certificate. Pure: no gRPC, no files."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection
from dataclasses import dataclass

from cryptography import x509

from tabadol.spiffe import AGENCY_ID_PATTERN


@dataclass(frozen=True, slots=True)
class ConsumerIdentity:
    """A calling agency, as proven by its certificate."""

    agency_id: str
    serial: int
    expires_at: float  # POSIX seconds: a cached identity must not outlive its certificate


class IdentityRejected(Exception):
    """The peer's certificate does not identify an agency that may call now."""


def agency_id_from_spiffe(spiffe_id: str, trust_domain: str) -> str:
    """The agency id in ``spiffe://<trust_domain>/agency/<id>``, or IdentityRejected."""
    prefix = f"spiffe://{trust_domain}/agency/"
    if not spiffe_id.startswith(prefix):
        raise IdentityRejected(
            f"certificate identity {spiffe_id!r} is not an agency of {trust_domain}"
        )
    agency_id = spiffe_id[len(prefix) :]
    if not AGENCY_ID_PATTERN.fullmatch(agency_id):
        raise IdentityRejected(f"certificate identity {spiffe_id!r} has a malformed agency id")
    return agency_id


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]


def identify_consumer(
    cert_pem: bytes,
    *,
    trust_domain: str,
    revoked: Collection[int],
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> ConsumerIdentity:
    """Identify the agency behind a certificate that TLS has already verified against the CA.

    TLS proved the chain; this adds what TLS cannot: exactly one SPIFFE ID naming an agency
    of our trust domain (so a broker certificate cannot call as a consumer) and no revocation.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ids = spiffe_ids(cert)
        serial, not_before, not_after = (
            cert.serial_number,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
    except Exception as e:  # cryptography has several error types for odd certificates
        raise IdentityRejected(
            f"the client certificate cannot be read ({type(e).__name__}: {e})"
        ) from e
    if len(ids) != 1:
        raise IdentityRejected(f"certificate must carry exactly one SPIFFE ID, found {len(ids)}")
    agency_id = agency_id_from_spiffe(ids[0], trust_domain)
    if serial in revoked:
        raise IdentityRejected(f"certificate {serial:x} of agency {agency_id!r} has been revoked")
    if not not_before <= now() <= not_after:
        raise IdentityRejected(
            f"certificate of agency {agency_id!r} is outside its validity period"
        )
    return ConsumerIdentity(
        agency_id=agency_id,
        serial=serial,
        expires_at=not_after.timestamp(),
    )
