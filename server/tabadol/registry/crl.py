"""Publishing the exchange's CRL into the registry database, checked as a broker checks it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tabadol.config import BrokerConfig
from tabadol.errors import ConfigError
from tabadol.registry.store import CrlStore
from tabadol.revocation import CrlRefused, RevocationList, check_replacement


def checked_crl(cfg: BrokerConfig, data: bytes, source: str) -> RevocationList:
    """The CRL in ``data`` if the exchange's CA signed it and it is fresh; ConfigError if not."""
    ca_path = cfg.broker.pki_dir / "ca.crt"
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except OSError as e:
        raise ConfigError(
            f"{cfg.path}: [broker] pki_dir: {ca_path}: cannot read: {e.strerror}"
        ) from e
    except ValueError as e:
        raise ConfigError(
            f"{cfg.path}: [broker] pki_dir: {ca_path}: not a PEM certificate ({e})"
        ) from e
    try:
        crl = RevocationList.from_bytes(data, ca)
        check_replacement(crl, None, dt.datetime.now(dt.UTC))
    except CrlRefused as e:
        raise ConfigError(f"{source}: refused: {e}") from e
    return crl


def publish_crl(store: CrlStore, cfg: BrokerConfig, path: Path, by: str) -> int:
    """Store the CRL at ``path`` in the registry database if newer than the stored one;
    its number. ConfigError (or RegistryRefused) says why not."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the CRL: {e.strerror}") from e
    crl = checked_crl(cfg, data, str(path))
    stored = store.crl()
    if stored is not None and stored.number >= crl.number:
        raise ConfigError(
            f"{path}: refused: the registry database holds CRL number {stored.number}; this one "
            f"is number {crl.number} (a CRL only moves forward: run `tabadol pki crl`)"
        )
    der = x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.DER)
    return store.publish_crl(der, crl.number, by).number
