"""The national PKI: one platform CA that certifies the broker and every agency.

Identities are SPIFFE IDs in the URI SAN: ``spiffe://<trust-domain>/agency/<id>`` for an
agency, ``spiffe://<trust-domain>/broker`` for the broker, ``.../ops`` for the ops console,
and ``.../operator/<name>`` or ``.../auditor/<name>`` for the people who use that console.
Each server certificate also carries the DNS name ``<id>.agency.<trust-domain>`` (or
``broker.<trust-domain>``, ``ops.<trust-domain>``), which is the name TLS checks when one
side dials the other, so a dialer verifies *who* answers, not where.

Layout of a PKI directory::

    ca.crt ca.key crl.pem                  the CA (keys mode 0600) and its current CRL
    issued.jsonl revoked.jsonl crlnumber   the CA's records: what it signed, what it
                                           revoked, the last CRL number (crl.pem is
                                           rebuilt from these, never from itself)
    broker.crt broker.key                  the broker's identity
    ops.crt ops.key                        the ops console's identity
    agencies/<id>/ca.crt agency.crt agency.key          the bundle handed to one agency
    operators/<name>/ca.crt operator.crt operator.key   one operator's bundle (auditors alike)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tabadol.errors import PkiError
from tabadol.revocation import crl_number
from tabadol.spiffe import (
    AGENCY_ID_PATTERN,
    TRUST_DOMAIN_PATTERN,
    agency_dns_name,
    agency_spiffe_id,
    auditor_spiffe_id,
    broker_dns_name,
    broker_spiffe_id,
    operator_spiffe_id,
    ops_dns_name,
    ops_spiffe_id,
)

CA_DAYS = 3650
LEAF_DAYS = 365
CRL_DAYS = 7
PEOPLE = {"operator": operator_spiffe_id, "auditor": auditor_spiffe_id}
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
}


@dataclass(frozen=True)
class IssuedCertificate:
    """One line of ``issued.jsonl``: what the CA signed, so it can be revoked later."""

    serial: int
    spiffe_id: str
    not_after: str
    path: str


@dataclass(frozen=True)
class Revocation:
    """One line of ``revoked.jsonl``: the CA's own record, from which every CRL is built."""

    serial: int
    spiffe_id: str
    reason: str
    revoked_at: str  # ISO 8601, UTC


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write a private key readable by its owner only, from the moment it exists.

    Written to a temporary file and renamed, so a crash never leaves a truncated key;
    ``exclusive`` refuses to replace an existing file (FileExistsError).
    """
    if exclusive:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover temporary file keeps its old mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    """The platform CA in one PKI directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            self.cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
            key = serialization.load_pem_private_key(
                (directory / "ca.key").read_bytes(), password=None
            )
        except FileNotFoundError as e:
            raise PkiError(
                f"{directory}: no CA here ({e.filename} missing); run `tabadol pki init`"
            ) from e
        except ValueError as e:
            raise PkiError(f"{directory}: cannot load the CA: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory / 'ca.key'}: not an EC private key")
        self.key = key
        self.trust_domain = trust_domain_of(self.cert)

    @classmethod
    def init(cls, directory: Path, trust_domain: str, days: int = CA_DAYS) -> CertificateAuthority:
        """Create a new CA; refuse if one already exists in ``directory``."""
        if not TRUST_DOMAIN_PATTERN.fullmatch(trust_domain):
            raise PkiError(f"trust domain {trust_domain!r} is not a lower-case DNS-style name")
        if days <= 0:
            raise PkiError(f"a CA lifetime of {days} days would be expired at birth")
        if (directory / "ca.key").exists() or (directory / "ca.crt").exists():
            raise PkiError(f"{directory}: a CA already exists here; refusing to overwrite it")
        if not directory.exists():
            directory.mkdir(parents=True)
            os.chmod(directory, 0o700)  # only a directory we made: never tighten someone's /srv
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tabadol"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Tabadol Root CA ({trust_domain})"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            # The trust domain's own SPIFFE ID, as the X.509-SVID spec allows on a signing cert.
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        try:
            _write_private(directory / "ca.key", _key_pem(key), exclusive=True)
        except FileExistsError as e:
            raise PkiError(
                f"{directory}: a CA already exists here; refusing to overwrite it"
            ) from e
        _write_public(directory / "ca.crt", _cert_pem(cert))
        ca = cls(directory)
        ca.write_crl()
        return ca

    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    def issue_agency(
        self,
        agency_id: str,
        *,
        days: int = LEAF_DAYS,
        force: bool = False,
        not_before: dt.datetime | None = None,
    ) -> Path:
        """Issue an agency's bundle (ca.crt, agency.crt, agency.key) under agencies/<id>/."""
        _check_days(days)
        _check_name("agency id", agency_id)
        bundle = self.dir / "agencies" / agency_id
        if (bundle / "agency.key").exists() and not force:
            raise PkiError(
                f"{bundle}: agency {agency_id!r} already has a certificate; "
                "pass --force to issue a new one (the old one stays valid until revoked)"
            )
        bundle.mkdir(parents=True, exist_ok=True)
        os.chmod(bundle, 0o700)
        self._issue(
            spiffe_id=agency_spiffe_id(self.trust_domain, agency_id),
            dns_names=[agency_dns_name(self.trust_domain, agency_id)],
            ips=[],
            common_name=agency_id,
            cert_path=bundle / "agency.crt",
            key_path=bundle / "agency.key",
            days=days,
            not_before=not_before,
        )
        _write_public(bundle / "ca.crt", _cert_pem(self.cert))
        return bundle

    def issue_person(
        self, role: str, name: str, *, days: int = LEAF_DAYS, force: bool = False
    ) -> Path:
        """Issue an operator's or auditor's client certificate under operators/<name>/ (or
        auditors/): ca.crt, <role>.crt, <role>.key, for a browser or a tool."""
        _check_days(days)
        if role not in PEOPLE:
            raise PkiError(f"unknown role {role!r}; expected one of {', '.join(PEOPLE)}")
        _check_name(f"{role} name", name)
        bundle = self.dir / f"{role}s" / name
        if (bundle / f"{role}.key").exists() and not force:
            raise PkiError(f"{bundle}: {role} {name!r} already has a certificate; pass --force")
        bundle.mkdir(parents=True, exist_ok=True)
        os.chmod(bundle.parent, 0o700)
        os.chmod(bundle, 0o700)
        self._issue(
            spiffe_id=PEOPLE[role](self.trust_domain, name),
            dns_names=[],
            ips=[],
            common_name=f"{role} {name}",
            cert_path=bundle / f"{role}.crt",
            key_path=bundle / f"{role}.key",
            days=days,
            not_before=None,
            server=False,
        )
        _write_public(bundle / "ca.crt", _cert_pem(self.cert))
        return bundle

    def issue_ops(
        self,
        *,
        dns_names: Iterable[str] = ("localhost",),
        ips: Iterable[str] = ("127.0.0.1", "::1"),
        days: int = LEAF_DAYS,
        force: bool = False,
    ) -> Path:
        """Issue the ops console's certificate (HTTPS and the OTLP collector); a superseded
        one is revoked."""
        _check_days(days)
        return self._issue_platform_server(
            "ops",
            ops_spiffe_id(self.trust_domain),
            [ops_dns_name(self.trust_domain), *dns_names],
            list(ips),
            days,
            force,
        )

    def issue_broker(
        self,
        *,
        dns_names: Iterable[str] = ("localhost",),
        ips: Iterable[str] = ("127.0.0.1", "::1"),
        days: int = LEAF_DAYS,
        force: bool = False,
    ) -> Path:
        """Issue the broker's certificate; extra DNS names and IPs let generic tools dial it.

        With ``force``, the certificate it replaces is revoked as superseded: once the broker
        is reloaded, no provider or verifier accepts the old one.
        """
        _check_days(days)
        return self._issue_platform_server(
            "broker",
            broker_spiffe_id(self.trust_domain),
            [broker_dns_name(self.trust_domain), *dns_names],
            list(ips),
            days,
            force,
        )

    def _issue_platform_server(
        self,
        name: str,
        spiffe_id: str,
        dns_names: list[str],
        ips: list[str],
        days: int,
        force: bool,
    ) -> Path:
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        if key_path.exists() and not force:
            raise PkiError(f"{cert_path}: the {name} already has a certificate; pass --force")
        superseded = _serial_of(cert_path) if cert_path.exists() else None
        self._issue(
            spiffe_id=spiffe_id,
            dns_names=list(dict.fromkeys(dns_names)),  # each name once, in order
            ips=list(dict.fromkeys(ips)),
            common_name=name,
            cert_path=cert_path,
            key_path=key_path,
            days=days,
            not_before=None,
        )
        if superseded is not None:
            self.revoke([superseded], reason="superseded")
        return cert_path

    def _issue(
        self,
        *,
        spiffe_id: str,
        dns_names: list[str],
        ips: list[str],
        common_name: str,
        cert_path: Path,
        key_path: Path,
        days: int,
        not_before: dt.datetime | None,
        server: bool = True,
    ) -> None:
        try:
            ip_sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        except ValueError as e:
            raise PkiError(f"bad IP address for the certificate: {e}") from e
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now() - dt.timedelta(minutes=5)
        serial = x509.random_serial_number()
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe_id),
            *(x509.DNSName(n) for n in dns_names),
            *ip_sans,
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tabadol"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    if server
                    else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, _cert_pem(cert))
        with (self.dir / "issued.jsonl").open("a") as f:
            record = {
                "serial": serial,
                "spiffe_id": spiffe_id,
                "not_after": cert.not_valid_after_utc.isoformat(),
                "path": str(cert_path.relative_to(self.dir)),
            }
            f.write(json.dumps(record) + "\n")

    def issued(self) -> Iterator[IssuedCertificate]:
        """Every certificate this CA has signed, oldest first."""
        path = self.dir / "issued.jsonl"
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            if line.strip():
                yield IssuedCertificate(**json.loads(line))

    def revocations(self) -> list[Revocation]:
        """Everything this CA has revoked, one entry a certificate, oldest first (its own
        record, not the CRL). A later line for the same serial (a reason made stronger,
        ``superseded`` to ``key-compromise``) replaces the earlier one."""
        path = self.dir / "revoked.jsonl"
        if not path.exists():
            return self._legacy_revocations()
        try:
            lines = [
                Revocation(**json.loads(line))
                for line in path.read_text().splitlines()
                if line.strip()
            ]
        except (ValueError, TypeError) as e:
            raise PkiError(f"{path}: damaged revocation record: {e}") from e
        return list({r.serial: r for r in lines}.values())

    def _legacy_revocations(self) -> list[Revocation]:
        """A CA made before revoked.jsonl existed kept its revocations only in crl.pem."""
        if not (self.dir / "crl.pem").exists():
            return []
        issued = {c.serial: c.spiffe_id for c in self.issued()}
        return [
            Revocation(
                r.serial_number,
                issued.get(r.serial_number, ""),
                "unspecified",
                r.revocation_date_utc.isoformat(),
            )
            for r in load_crl(self.dir / "crl.pem", self.cert)
        ]

    def revoke(self, serials: Iterable[int], *, reason: str = "unspecified") -> list[int]:
        """Revoke certificates by serial, record it, and publish a new CRL.

        Only serials this CA issued can be revoked. Revoking one again changes nothing,
        unless it was only superseded and is now revoked for a key compromise: then it
        counts as compromised from now on (seals it makes from now on no longer count).
        """
        if reason not in REASONS:
            raise PkiError(f"unknown revocation reason {reason!r}; expected {', '.join(REASONS)}")
        issued = {c.serial: c.spiffe_id for c in self.issued()}
        wanted = list(dict.fromkeys(serials))
        unknown = [s for s in wanted if s not in issued]
        if unknown:
            raise PkiError(
                f"{self.dir}: this CA never issued serial(s) {', '.join(f'{s:x}' for s in unknown)}"
            )
        done = {r.serial: r.reason for r in self.revocations()}
        if not (self.dir / "revoked.jsonl").exists():
            self._append_revocations(self._legacy_revocations())
        now = _now().isoformat()
        self._append_revocations(
            Revocation(s, issued[s], reason, now)
            for s in wanted
            if s not in done or (done[s] == "superseded" and reason == "key-compromise")
        )
        self.write_crl()
        return wanted

    def _append_revocations(self, revocations: Iterable[Revocation]) -> None:
        path = self.dir / "revoked.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with os.fdopen(fd, "a") as f:
            for r in revocations:
                f.write(json.dumps(asdict(r)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def revoke_agency(self, agency_id: str, *, reason: str = "unspecified") -> list[int]:
        """Revoke every certificate ever issued to an agency and publish a new CRL."""
        return self._revoke_identity(
            agency_spiffe_id(self.trust_domain, agency_id), f"agency {agency_id!r}", reason
        )

    def revoke_person(self, role: str, name: str, *, reason: str = "unspecified") -> list[int]:
        """Revoke every certificate ever issued to an operator or auditor."""
        if role not in PEOPLE:
            raise PkiError(f"unknown role {role!r}; expected one of {', '.join(PEOPLE)}")
        return self._revoke_identity(
            PEOPLE[role](self.trust_domain, name), f"{role} {name!r}", reason
        )

    def revoke_current(self, name: str, *, reason: str = "key-compromise") -> list[int]:
        """Revoke the certificate in broker.crt (or ops.crt): for a key that leaked. Issue a
        new one with --force and reload before the old one's holder can be shut out."""
        path = self.dir / f"{name}.crt"
        if not path.exists():
            raise PkiError(f"{path}: no {name} certificate to revoke")
        return self.revoke([_serial_of(path)], reason=reason)

    def _revoke_identity(self, spiffe_id: str, who: str, reason: str) -> list[int]:
        serials = [c.serial for c in self.issued() if c.spiffe_id == spiffe_id]
        if not serials:
            raise PkiError(f"{self.dir}: no certificate was ever issued to {who}")
        return self.revoke(serials, reason=reason)

    def revoked_serials(self) -> set[int]:
        return {r.serial for r in self.revocations()}

    def write_crl(self) -> x509.CertificateRevocationList:
        """Publish a CRL of every recorded revocation, numbered one above any before it,
        valid for CRL_DAYS. Run it again before then (``tabadol pki crl``)."""
        revocations = self.revocations()
        number = self._next_crl_number()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        for r in sorted(revocations, key=lambda r: r.serial):
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(r.serial)
                .revocation_date(dt.datetime.fromisoformat(r.revoked_at))
            )
            if r.reason != "unspecified":
                entry = entry.add_extension(x509.CRLReason(REASONS[r.reason]), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(self.key, hashes.SHA256())
        # The number first: a crash between the two never reuses a number.
        _write_public(self.dir / "crlnumber", f"{number}\n".encode())
        _write_public(self.dir / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
        return crl

    def _next_crl_number(self) -> int:
        last = 0
        path = self.dir / "crlnumber"
        if path.exists():
            try:
                last = int(path.read_text().strip())
            except ValueError as e:
                raise PkiError(f"{path}: not a CRL number: {e}") from e
        if (self.dir / "crl.pem").exists():
            # A damaged crl.pem is replaced: the records and crlnumber still hold.
            with contextlib.suppress(PkiError):
                last = max(last, crl_number(load_crl(self.dir / "crl.pem", self.cert)))
        return last + 1


def _serial_of(cert_path: Path) -> int:
    try:
        return x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    except (OSError, ValueError) as e:
        raise PkiError(f"{cert_path}: cannot read the certificate: {e}") from e


def _check_name(what: str, name: str) -> None:
    if not AGENCY_ID_PATTERN.fullmatch(name):
        raise PkiError(
            f"{what} {name!r} must be lower-case letters, digits and '-' "
            "(1-63 characters, starting with a letter)"
        )


def _check_days(days: int) -> None:
    if days <= 0:
        raise PkiError(f"a certificate lifetime of {days} days would be expired at birth")


def trust_domain_of(ca_cert: x509.Certificate) -> str:
    """The trust domain a Tabadol CA speaks for: the ``spiffe://<domain>`` URI in its SAN."""
    try:
        san = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise PkiError("the CA certificate names no trust domain (no SAN)") from e
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
            return uri[len("spiffe://") :]
    raise PkiError("the CA certificate names no trust domain (no spiffe:// URI)")


def load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """Load a CRL and check that the platform CA signed it."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError as e:
        raise PkiError(f"{path}: CRL missing") from e
    except OSError as e:
        raise PkiError(f"{path}: cannot read the CRL: {e.strerror}") from e
    except ValueError as e:
        raise PkiError(f"{path}: not a PEM CRL: {e}") from e
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(
        public_key
    ):
        raise PkiError(f"{path}: CRL is not signed by the platform CA")
    return crl
