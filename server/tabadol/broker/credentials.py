"""The broker's own PKI material, loaded and checked once per (re)load."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tabadol.errors import ConfigError, PkiError
from tabadol.identity import spiffe_ids
from tabadol.pki import load_crl, trust_domain_of
from tabadol.revocation import CrlRefused, RevocationList, check_replacement
from tabadol.spiffe import broker_spiffe_id


@dataclass(frozen=True)
class BrokerCredentials:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never in a log line or a traceback
    revoked: frozenset[int]
    crl_next_update: dt.datetime | None
    crl: RevocationList | None = None
    cert_path: Path | None = None
    key_path: Path | None = None

    @classmethod
    def load(
        cls,
        pki_dir: Path,
        trust_domain: str,
        config_path: Path,
        *,
        held: RevocationList | None = None,
        now: dt.datetime | None = None,
    ) -> BrokerCredentials:
        """Load ca.crt, broker.crt, broker.key and crl.pem; ConfigError names the bad file.

        The CRL must be fresh and no older than ``held``, the one in force (no rollback);
        the broker's own certificate must not be revoked in it.
        """

        def fail(file: Path, problem: str) -> ConfigError:
            return ConfigError(f"{config_path}: [broker] pki_dir: {file}: {problem}")

        def read(name: str) -> bytes:
            file = pki_dir / name
            try:
                return file.read_bytes()
            except OSError as e:
                raise fail(file, f"cannot read: {e.strerror}") from e

        ca_pem, cert_pem, key_pem = read("ca.crt"), read("broker.crt"), read("broker.key")
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError as e:
            raise fail(pki_dir / "ca.crt", f"not a PEM certificate ({e})") from e
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise fail(pki_dir / "broker.crt", f"not a PEM certificate ({e})") from e
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            # Never echo key material: the exception text is cryptography's, not the key's.
            raise fail(pki_dir / "broker.key", "not an unencrypted PEM private key") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise fail(pki_dir / "broker.key", "does not match broker.crt")
        try:
            ca_domain = trust_domain_of(ca)
            crl = load_crl(pki_dir / "crl.pem", ca)
        except PkiError as e:
            raise ConfigError(f"{config_path}: [broker] pki_dir: {e}") from e
        if ca_domain != trust_domain:
            raise fail(
                pki_dir / "ca.crt",
                f"CA is for trust domain {ca_domain!r}, configuration says {trust_domain!r}",
            )
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise fail(pki_dir / "broker.crt", "not signed by the CA in ca.crt") from e
        if broker_spiffe_id(trust_domain) not in spiffe_ids(cert):
            raise fail(
                pki_dir / "broker.crt",
                f"not a broker certificate: expected {broker_spiffe_id(trust_domain)}",
            )
        try:
            revocations = RevocationList.from_crl(crl, ca)
            check_replacement(revocations, held, now or dt.datetime.now(dt.UTC))
        except CrlRefused as e:
            raise fail(pki_dir / "crl.pem", f"refused: {e}") from e
        published = _published_crl_number(pki_dir)
        if published is not None and revocations.number < published:
            raise fail(
                pki_dir / "crl.pem",
                f"refused: the CRL is number {revocations.number}, but the CA in this directory "
                f"has published number {published} (crlnumber): an older CRL was put back; "
                "run `tabadol pki crl`",
            )
        if cert.serial_number in revocations.serials:
            raise fail(
                pki_dir / "broker.crt",
                f"certificate {cert.serial_number:x} is revoked in crl.pem; issue a new one "
                "with `tabadol pki issue --broker --force`",
            )
        return cls(
            ca_pem,
            cert_pem,
            key_pem,
            revocations.serials,
            crl.next_update_utc,
            revocations,
            pki_dir / "broker.crt",
            pki_dir / "broker.key",
        )


def _published_crl_number(pki_dir: Path) -> int | None:
    """The CA's own count of CRLs published, where the broker runs beside the CA."""
    try:
        return int((pki_dir / "crlnumber").read_text().strip())
    except (OSError, ValueError):
        return None
