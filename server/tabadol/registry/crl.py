"""The exchange's CRL through the registry database: which stored rows count, and publishing
a new one, checked as a broker checks it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tabadol.config import BrokerConfig
from tabadol.errors import ConfigError
from tabadol.registry.store import CrlStore, StoredCrl
from tabadol.revocation import CrlRefused, RevocationList, check_replacement


def counts(stored: StoredCrl, ca: x509.Certificate) -> bool:
    """Whether a stored row is a CRL of the exchange: signed by its CA, and numbered in the
    table as in the CRL itself. Anyone who can write the table can add a row; only the CA
    can make one count."""
    try:
        crl = RevocationList.from_bytes(stored.der, ca)
    except (CrlRefused, ValueError, TypeError):  # whatever a malformed row makes the parser say
        return False
    return crl.number == stored.number


def newest_counting(stored: Sequence[StoredCrl], ca: x509.Certificate) -> StoredCrl | None:
    """The first row of ``stored`` (newest first) that counts."""
    return next((c for c in stored if counts(c, ca)), None)


def exchange_ca(cfg: BrokerConfig) -> x509.Certificate:
    """The exchange's CA certificate, ``pki_dir/ca.crt``; ConfigError naming it if unreadable."""
    ca_path = cfg.broker.pki_dir / "ca.crt"
    try:
        return x509.load_pem_x509_certificate(ca_path.read_bytes())
    except OSError as e:
        raise ConfigError(
            f"{cfg.path}: [broker] pki_dir: {ca_path}: cannot read: {e.strerror}"
        ) from e
    except ValueError as e:
        raise ConfigError(
            f"{cfg.path}: [broker] pki_dir: {ca_path}: not a PEM certificate ({e})"
        ) from e


def checked_crl(data: bytes, ca: x509.Certificate, source: str) -> RevocationList:
    """The CRL in ``data`` if ``ca`` signed it and it is fresh; ConfigError if not."""
    try:
        crl = RevocationList.from_bytes(data, ca)
        check_replacement(crl, None, dt.datetime.now(dt.UTC))
    except CrlRefused as e:
        raise ConfigError(f"{source}: refused: {e}") from e
    return crl


def publish_crl(store: CrlStore, cfg: BrokerConfig, path: Path, by: str) -> int:
    """Store the CRL at ``path`` in the registry database if newer than the newest stored
    one that counts; its number. ConfigError (or RegistryRefused) says why not."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the CRL: {e.strerror}") from e
    ca = exchange_ca(cfg)
    crl = checked_crl(data, ca, str(path))
    stored = newest_counting(store.crls(above=crl.number - 1), ca)
    if stored is not None:
        raise ConfigError(
            f"{path}: refused: the registry database holds CRL number {stored.number}; this one "
            f"is number {crl.number} (a CRL only moves forward: run `tabadol pki crl`)"
        )
    der = x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.DER)
    return store.publish_crl(der, crl.number, by, lambda row: counts(row, ca)).number
