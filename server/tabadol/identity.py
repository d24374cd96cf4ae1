"""Who is calling: agency identity from a verified certificate. Pure: no gRPC, no files."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from cryptography import x509

from tabadol.spiffe import AGENCY_ID_PATTERN

Role = Literal["agency", "operator", "auditor", "broker", "ops"]
# Roles whose SPIFFE path carries a name: spiffe://<domain>/<role>/<name>.
_NAMED_ROLES: tuple[Role, ...] = ("agency", "operator", "auditor")


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


@dataclass(frozen=True, slots=True)
class PlatformIdentity:
    """Anyone the platform CA certified: an agency, an operator, an auditor, the broker or
    the ops console, as proven by a verified certificate."""

    role: Role
    name: str  # the agency id, operator or auditor name; "" for the broker and ops
    serial: int
    expires_at: float  # POSIX seconds

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}" if self.name else f"the {self.role}"


def role_of(spiffe_id: str, trust_domain: str) -> tuple[Role, str]:
    """(role, name) of a SPIFFE ID of this trust domain; IdentityRejected for anything else."""
    prefix = f"spiffe://{trust_domain}/"
    if not spiffe_id.startswith(prefix):
        raise IdentityRejected(f"certificate identity {spiffe_id!r} is not of {trust_domain}")
    path = spiffe_id[len(prefix) :]
    if path in ("broker", "ops"):
        return path, ""  # type: ignore[return-value]  # narrowed by the test above
    role, _, name = path.partition("/")
    for known in _NAMED_ROLES:
        if role == known:
            if not AGENCY_ID_PATTERN.fullmatch(name):
                raise IdentityRejected(
                    f"certificate identity {spiffe_id!r} has a malformed {role} name"
                )
            return known, name
    raise IdentityRejected(f"certificate identity {spiffe_id!r} names no Tabadol role")


def _read(cert_pem: bytes) -> tuple[list[str], int, dt.datetime, dt.datetime]:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        return (
            spiffe_ids(cert),
            cert.serial_number,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
    except Exception as e:  # cryptography has several error types for odd certificates
        raise IdentityRejected(
            f"the client certificate cannot be read ({type(e).__name__}: {e})"
        ) from e


def identify_peer(
    cert_pem: bytes,
    *,
    trust_domain: str,
    revoked: Collection[int],
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> PlatformIdentity:
    """Identify whoever holds a certificate that TLS has already verified against the CA.

    TLS proved the chain; this adds what TLS cannot: exactly one SPIFFE ID naming a role of
    our trust domain, no revocation, and the validity period.
    """
    ids, serial, not_before, not_after = _read(cert_pem)
    if len(ids) != 1:
        raise IdentityRejected(f"certificate must carry exactly one SPIFFE ID, found {len(ids)}")
    role, name = role_of(ids[0], trust_domain)
    who = PlatformIdentity(role, name, serial, not_after.timestamp())
    if serial in revoked:
        raise IdentityRejected(f"certificate {serial:x} of {who} has been revoked")
    if not not_before <= now() <= not_after:
        raise IdentityRejected(f"certificate of {who} is outside its validity period")
    return who


def identify_consumer(
    cert_pem: bytes,
    *,
    trust_domain: str,
    revoked: Collection[int],
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> ConsumerIdentity:
    """The agency behind a verified certificate: only agencies call through the broker
    (a broker, operator or auditor certificate cannot)."""
    ids, _, _, _ = _read(cert_pem)
    if len(ids) != 1:
        raise IdentityRejected(f"certificate must carry exactly one SPIFFE ID, found {len(ids)}")
    agency_id_from_spiffe(ids[0], trust_domain)  # the agency check's own message first
    who = identify_peer(cert_pem, trust_domain=trust_domain, revoked=revoked, now=now)
    return ConsumerIdentity(agency_id=who.name, serial=who.serial, expires_at=who.expires_at)


def claimed_role(cert_pem: bytes, trust_domain: str) -> tuple[Role | None, str]:
    """The role and name a certificate claims, checked against nothing; (None, "") when it
    claims none of our trust domain's."""
    try:
        ids, _, _, _ = _read(cert_pem)
        return role_of(ids[0], trust_domain) if len(ids) == 1 else (None, "")
    except IdentityRejected:
        return None, ""


@functools.lru_cache(maxsize=1024)
def claimed_agency(cert_pem: bytes) -> tuple[str, int] | None:
    """(agency id, serial) a certificate claims, checked against nothing: for the ledger
    record of a call whose certificate was refused. None if it names no agency."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ids, serial = spiffe_ids(cert), cert.serial_number
    except Exception:  # cryptography has several error types for odd certificates
        return None
    for spiffe_id in ids:
        domain, sep, agency_id = spiffe_id.removeprefix("spiffe://").partition("/agency/")
        if sep and "/" not in domain and AGENCY_ID_PATTERN.fullmatch(agency_id):
            return agency_id, serial
    return None
