"""Who may talk to ``tabadol ops``: its TLS material and the identities it accepts.

Both the console (HTTPS) and the span collector (OTLP/gRPC) serve with the ops console's
own certificate (``ops.crt``, ``tabadol pki issue --ops``) and ask every client for one from
the platform CA. The CRL is re-read when ``crl.pem`` changes, so ``tabadol pki revoke`` takes
effect without a restart; a stale CRL shuts everyone out (fail closed), as on the broker.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from tabadol.errors import TabadolError
from tabadol.identity import IdentityRejected, PlatformIdentity, identify_peer, spiffe_ids
from tabadol.pki import trust_domain_of
from tabadol.revocation import CrlRefused, RevocationList, check_replacement
from tabadol.spiffe import ops_spiffe_id

log = logging.getLogger("tabadol.ops")

_CRL_RECHECK_S = 1.0


@dataclass
class OpsTrust:
    """The ops console's certificate and key, the CA, and the current revocations."""

    pki_dir: Path
    trust_domain: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never in a log line or a traceback
    # The agencies the exchange's configuration declares: no other agency certificate may
    # send spans or open the console. None only where ops runs without a configuration
    # (embedded in tests and benchmarks; `tabadol ops` needs --config).
    agencies: frozenset[str] | None = None
    _crl: RevocationList | None = None
    _crl_mtime: float = 0.0
    _checked_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ca_path(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def cert_path(self) -> Path:
        return self.pki_dir / "ops.crt"

    @property
    def key_path(self) -> Path:
        return self.pki_dir / "ops.key"

    @classmethod
    def load(
        cls, pki_dir: Path, trust_domain: str, agencies: frozenset[str] | None = None
    ) -> OpsTrust:
        """Read ca.crt, ops.crt, ops.key and crl.pem; TabadolError names the file at fault."""

        def read(name: str) -> bytes:
            try:
                return (pki_dir / name).read_bytes()
            except FileNotFoundError:
                hint = (
                    "; issue it with `tabadol pki issue --dir DIR --ops`"
                    if name.startswith("ops.")
                    else ""
                )
                raise TabadolError(f"{pki_dir / name}: missing{hint}") from None
            except OSError as e:
                raise TabadolError(f"{pki_dir / name}: cannot read: {e.strerror}") from e

        ca_pem, cert_pem, key_pem = read("ca.crt"), read("ops.crt"), read("ops.key")
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise TabadolError(f"{pki_dir}: ca.crt, ops.crt or ops.key cannot be loaded") from e
        if trust_domain_of(ca) != trust_domain:
            raise TabadolError(
                f"{pki_dir / 'ca.crt'}: CA is for trust domain {trust_domain_of(ca)!r}, "
                f"configuration says {trust_domain!r}"
            )
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise TabadolError(f"{pki_dir / 'ops.crt'}: not signed by the CA in ca.crt") from e
        if ops_spiffe_id(trust_domain) not in spiffe_ids(cert):
            raise TabadolError(
                f"{pki_dir / 'ops.crt'}: not an ops certificate: expected "
                f"{ops_spiffe_id(trust_domain)}"
            )
        if key.public_key() != cert.public_key():
            raise TabadolError(f"{pki_dir / 'ops.key'}: does not match ops.crt")
        trust = cls(pki_dir, trust_domain, ca_pem, cert_pem, key_pem, agencies)
        trust.refresh_crl(force=True)
        return trust

    def refresh_crl(self, *, force: bool = False) -> None:
        """Re-read crl.pem if it changed; a CRL that is older or not the CA's is refused."""
        now = time.monotonic()
        if not force and now - self._checked_at < _CRL_RECHECK_S:
            return
        with self._lock:
            self._checked_at = now
            path = self.pki_dir / "crl.pem"
            try:
                mtime = path.stat().st_mtime
            except OSError as e:
                if force:
                    raise TabadolError(f"{path}: cannot read the CRL: {e.strerror}") from e
                log.error("%s: cannot read the CRL (%s); keeping the one loaded", path, e.strerror)
                return
            if mtime == self._crl_mtime and not force:
                return
            try:
                crl = RevocationList.from_bytes(
                    path.read_bytes(), x509.load_pem_x509_certificate(self.ca_pem)
                )
                # The broker's rule: never an older CRL (a rollback), nor a stale one.
                check_replacement(crl, self._crl, dt.datetime.now(dt.UTC))
            except (OSError, CrlRefused) as e:
                if force:
                    raise TabadolError(f"{path}: {e}") from e
                log.error("%s: %s; keeping the CRL loaded before", path, e)
                return
            self._crl, self._crl_mtime = crl, mtime

    @property
    def revoked(self) -> frozenset[int]:
        self.refresh_crl()
        return self._crl.serials if self._crl is not None else frozenset()

    def identify(self, cert_pem: bytes) -> PlatformIdentity:
        """Whoever holds a certificate TLS verified against the CA; IdentityRejected when it
        is revoked, expired, of another trust domain, or the CRL itself is stale."""
        revoked = self.revoked
        next_update = self._crl.next_update if self._crl is not None else None
        if next_update is not None and next_update < dt.datetime.now(dt.UTC):
            raise IdentityRejected(
                f"the exchange's CRL expired at {next_update:%Y-%m-%d %H:%M} UTC; nobody is "
                "admitted until operators publish a new one (`tabadol pki crl`)"
            )
        return identify_peer(cert_pem, trust_domain=self.trust_domain, revoked=revoked)
