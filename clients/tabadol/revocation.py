"""What the exchange has revoked, and whether a new CRL may replace the one in force. Pure.

A CRL only ever moves forward: its number goes up with every one the CA publishes, so an
older CRL put back (which would un-revoke) is refused, and so is a stale one (past its
next-update time, the CA may have revoked more since). Both sides of the wire use it: the
broker for every certificate it meets, providers for the broker's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# How long a broker may go on sealing with a certificate its renewal superseded: the time
# an operator has to reload it (docs/pki.md).
SUPERSEDED_GRACE = dt.timedelta(hours=24)
# From when the signatures of a certificate revoked for cause count no more, when the signer
# wrote their time itself: from the beginning of time (a thief of its key back-dates).
REVOKED_FOR_CAUSE = dt.datetime.min.replace(tzinfo=dt.UTC)


class CrlRefused(ValueError):
    """A CRL that must not replace the one in force; the message says why."""


@dataclass(frozen=True)
class RevocationList:
    """One CRL, checked against the CA: its number, its validity and what it revokes."""

    number: int
    issued_at: dt.datetime
    next_update: dt.datetime
    revoked_at: Mapping[int, dt.datetime]  # serial -> when it was revoked
    der: bytes
    superseded: frozenset[int] = frozenset()  # revoked because a renewal replaced them

    def signatures_count_until(
        self, grace: dt.timedelta = SUPERSEDED_GRACE
    ) -> dict[int, dt.datetime]:
        """From when each revoked certificate's signatures no longer count: its revocation,
        or, for one superseded by a renewal, ``grace`` later (the broker seals with its old
        certificate until it is reloaded onto the new one)."""
        return {
            serial: when + grace if serial in self.superseded else when
            for serial, when in self.revoked_at.items()
        }

    def signer_dated_signatures_count_until(
        self, grace: dt.timedelta = SUPERSEDED_GRACE
    ) -> dict[int, dt.datetime]:
        """As ``signatures_count_until``, for signatures dated by their signer (the ledger's
        journal): a certificate revoked for any reason but superseded counts at no time
        (``REVOKED_FOR_CAUSE``), since a thief of its key writes whatever date it likes."""
        return {
            serial: when + grace if serial in self.superseded else REVOKED_FOR_CAUSE
            for serial, when in self.revoked_at.items()
        }

    @property
    def serials(self) -> frozenset[int]:
        return frozenset(self.revoked_at)

    @classmethod
    def from_bytes(cls, data: bytes, ca_cert: x509.Certificate) -> RevocationList:
        """Parse a PEM or DER CRL and check the CA signed it; CrlRefused otherwise."""
        try:
            crl = (
                x509.load_pem_x509_crl(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data)
            )
        except ValueError as e:
            raise CrlRefused(f"not a CRL: {e}") from e
        return cls.from_crl(crl, ca_cert)

    @classmethod
    def from_crl(
        cls, crl: x509.CertificateRevocationList, ca_cert: x509.Certificate
    ) -> RevocationList:
        key = ca_cert.public_key()
        try:
            signed = isinstance(key, ec.EllipticCurvePublicKey) and crl.is_signature_valid(key)
        except (InvalidSignature, ValueError, TypeError):
            signed = False
        if not signed:
            raise CrlRefused("the CRL is not signed by the platform CA")
        if crl.next_update_utc is None:
            raise CrlRefused("the CRL has no next-update time, so its freshness is unknown")
        return cls(
            number=crl_number(crl),
            issued_at=crl.last_update_utc,
            next_update=crl.next_update_utc,
            revoked_at={r.serial_number: r.revocation_date_utc for r in crl},
            der=crl.public_bytes(serialization.Encoding.DER),
            superseded=frozenset(
                r.serial_number for r in crl if _reason(r) is x509.ReasonFlags.superseded
            ),
        )

    def stale(self, now: dt.datetime) -> bool:
        return now >= self.next_update

    def seconds_left(self, now: dt.datetime) -> float:
        """Until the CRL goes stale (negative once it has)."""
        return (self.next_update - now).total_seconds()


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's sequence number (RFC 5280 5.2.3); 0 for one published before CRLs were
    numbered, which any numbered CRL replaces."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def _reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def check_replacement(new: RevocationList, held: RevocationList | None, now: dt.datetime) -> None:
    """Refuse a CRL that is stale, or older than (or a rewrite of) the one in force."""
    if new.stale(now):
        raise CrlRefused(
            f"the CRL (number {new.number}) went stale at {new.next_update:%Y-%m-%d %H:%M} UTC; "
            "publish a fresh one with `tabadol pki crl`"
        )
    if held is None:
        return
    if new.number < held.number:
        raise CrlRefused(
            f"the CRL is number {new.number}, older than number {held.number} in force: "
            "an older CRL would un-revoke certificates (a rollback)"
        )
    if new.number == held.number and new.der != held.der:
        raise CrlRefused(
            f"the CRL reuses number {new.number} with different contents; the CA numbers every "
            "CRL it publishes, so this one was not published by it"
        )
    if not held.serials <= new.serials:
        # A real CA never un-revokes; a CRL that does is not one to trust.
        missing = ", ".join(f"{s:x}" for s in sorted(held.serials - new.serials))
        raise CrlRefused(f"the CRL no longer lists revoked serial(s) {missing}")
