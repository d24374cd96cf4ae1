"""Who may seal the ledger: a broker certificate of this exchange, valid and not revoked at
the time of each seal. Pure."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tabadol.identity import spiffe_ids
from tabadol.revocation import REVOKED_FOR_CAUSE
from tabadol.spiffe import broker_spiffe_id


def _issued_broker_certificate(
    cert_pem: bytes, ca_cert: x509.Certificate, trust_domain: str
) -> x509.Certificate | str:
    """The certificate, if this exchange's CA issued it to a broker; else why not."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "its certificate was not issued by this exchange's CA"
    if broker_spiffe_id(trust_domain) not in spiffe_ids(cert):
        return "its certificate is not a broker's"
    return cert


def seal_signer_problem(
    cert_pem: bytes,
    sealed_at: dt.datetime,
    *,
    ca_cert: x509.Certificate,
    trust_domain: str,
    revoked_at: Mapping[int, dt.datetime],
    issued: Callable[[bytes], x509.Certificate | str] | None = None,
) -> str | None:
    """Why a seal's signer could not vouch for it at the time it was made, or None.

    ``revoked_at``: from when each revoked certificate's signatures stop counting
    (RevocationList.signatures_count_until: its revocation, a day later if superseded; for
    signer-dated signatures, ``signer_dated_signatures_count_until``). ``issued``: the
    certificate-only part, cached by the caller (a ledger has many seals, few signers).
    """
    cert = (
        issued(cert_pem)
        if issued is not None
        else _issued_broker_certificate(cert_pem, ca_cert, trust_domain)
    )
    if isinstance(cert, str):
        return cert
    if not cert.not_valid_before_utc <= sealed_at <= cert.not_valid_after_utc:
        return (
            f"broker certificate {cert.serial_number:x} was not valid at the seal's time "
            f"({sealed_at:%Y-%m-%d %H:%M:%S} UTC)"
        )
    revoked = revoked_at.get(cert.serial_number)
    if revoked == REVOKED_FOR_CAUSE:
        return (
            f"broker certificate {cert.serial_number:x} is revoked for cause (not superseded "
            "by a renewal): what it dated itself counts at no time"
        )
    if revoked is not None and revoked <= sealed_at:
        return (
            f"broker certificate {cert.serial_number:x} is revoked, and its signatures stopped "
            f"counting at {revoked:%Y-%m-%d %H:%M:%S} UTC, before the seal was made"
        )
    return None


def signer_check(
    *, ca_cert: x509.Certificate, trust_domain: str, revoked_at: Mapping[int, dt.datetime]
) -> Callable[[bytes, int], str | None]:
    """``seal_signer_problem`` for these facts, taking a certificate and a time in epoch ns:
    how ``verify`` judges seals and the writer judges the journal's signatures."""

    @functools.lru_cache(maxsize=64)
    def issued(cert_pem: bytes) -> x509.Certificate | str:
        return _issued_broker_certificate(cert_pem, ca_cert, trust_domain)

    def problem(cert_pem: bytes, signed_ns: int) -> str | None:
        signed_at = dt.datetime.fromtimestamp(signed_ns / 1e9, dt.UTC)
        return seal_signer_problem(
            cert_pem, signed_at, ca_cert=ca_cert, trust_domain=trust_domain,
            revoked_at=revoked_at, issued=issued,
        )  # fmt: skip

    return problem
