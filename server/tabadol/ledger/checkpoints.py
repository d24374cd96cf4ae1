"""Signed checkpoints of verify: "chain C was intact up to seal N", signed by the person who
verified it, so the next verify checks only what came after."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tabadol.errors import TabadolError
from tabadol.identity import IdentityRejected, role_of, spiffe_ids
from tabadol.ledger.journal import open_regular
from tabadol.ledger.record import Seal
from tabadol.ledger.seal import Sealer, signed_by
from tabadol.state_files import read_regular

PEOPLE = ("auditor", "operator")


@dataclass(frozen=True)
class Checkpoint:
    chain: str
    seal: int
    count: int
    head_digest: str
    verified_ns: int
    by: str  # "auditor 'sara'": who verified, from the certificate
    certificate: str  # the signer's certificate, PEM
    signature: str  # hex ECDSA over payload()

    def payload(self) -> bytes:
        return (
            f"tabadol-ledger-checkpoint:v1:{self.chain}:{self.seal}:{self.count}:"
            f"{self.head_digest}:{self.verified_ns}:{self.by}"
        ).encode()

    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.verified_ns / 1e9, dt.UTC)
        return f"seal {self.seal} ({self.count} records), verified by {self.by} on {when:%Y-%m-%d %H:%M:%S} UTC"


def checkpoints_path(ledger_path: Path) -> Path:
    """The default place: beside the ledger and its seals witness."""
    return ledger_path.with_name(ledger_path.name + ".checkpoints")


def person_of(cert_pem: bytes, trust_domain: str) -> str:
    """``auditor 'name'`` or ``operator 'name'`` of a certificate; ValueError for anyone else."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    for spiffe_id in spiffe_ids(cert):
        try:
            role, name = role_of(spiffe_id, trust_domain)
        except IdentityRejected:
            continue
        if role in PEOPLE:
            return f"{role} {name!r}"
    raise ValueError("it is not an operator's or auditor's certificate of this exchange")


def sign(credentials: Path, trust_domain: str, seal: Seal, now_ns: int) -> Checkpoint:
    """A checkpoint at ``seal``, signed with the person credentials in ``credentials`` (what
    ``tabadol pki issue --auditor NAME`` or ``--operator NAME`` wrote)."""
    for role in PEOPLE:
        cert_path, key_path = credentials / f"{role}.crt", credentials / f"{role}.key"
        if cert_path.exists():
            break
    else:
        raise TabadolError(f"{credentials}: no auditor.crt or operator.crt (tabadol pki issue)")
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        by = person_of(cert_pem, trust_domain)
        signer = Sealer(key_pem, cert_pem)
    except (OSError, ValueError) as e:
        raise TabadolError(f"{credentials}: cannot sign a checkpoint: {e}") from e
    unsigned = Checkpoint(
        seal.chain, seal.seq, seal.count, seal.head_digest, now_ns, by, cert_pem.decode(), ""
    )
    return Checkpoint(**{**asdict(unsigned), "signature": signer.sign(unsigned.payload())})


def append(path: Path, checkpoint: Checkpoint) -> None:
    """One JSON line at the end of the file, created 0600, never through a link."""
    line = json.dumps(asdict(checkpoint), separators=(",", ":")).encode() + b"\n"
    try:
        fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        raise TabadolError(f"{path}: cannot append the checkpoint: {e}") from e


def read(path: Path) -> tuple[list[Checkpoint], list[str]]:
    """The checkpoints in the file, and what is wrong with the lines that are none."""
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return [], []
    except OSError as e:
        raise TabadolError(f"{path}: cannot read the checkpoints: {e}") from e
    found, problems = [], []
    types = Checkpoint.__annotations__
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            fields = json.loads(raw.decode("utf-8"))
            if not isinstance(fields, dict) or fields.keys() != types.keys():
                raise ValueError("not the fields of a checkpoint")
            wanted = {"str": str, "int": int}
            if not all(type(fields[k]) is wanted[t] for k, t in types.items()):
                raise ValueError("a field of the wrong type")
            found.append(Checkpoint(**fields))
        except (ValueError, RecursionError) as e:
            problems.append(f"{path} line {number}: not a checkpoint ({e}); not used")
    return found, problems


def problem(
    checkpoint: Checkpoint,
    *,
    ca_cert: x509.Certificate,
    trust_domain: str,
    revoked: Collection[int],
    now: dt.datetime,
) -> str | None:
    """Why a checkpoint cannot be trusted, or None: it must be signed by an operator's or
    auditor's certificate of this exchange's CA, valid when signed and still valid ``now``
    (its date is the signer's word), and never revoked."""
    pem = checkpoint.certificate.encode()
    try:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "its certificate was not issued by this exchange's CA"
    try:
        by = person_of(pem, trust_domain)
    except ValueError as e:
        return str(e)
    if by != checkpoint.by:
        return f"it names {checkpoint.by} but its certificate is {by}'s"
    if not signed_by(checkpoint.payload(), checkpoint.signature, pem):
        return "its signature does not match (it was forged or altered)"
    signed_at = dt.datetime.fromtimestamp(checkpoint.verified_ns / 1e9, dt.UTC)
    if not cert.not_valid_before_utc <= signed_at <= cert.not_valid_after_utc:
        return f"certificate {cert.serial_number:x} was not valid when it says it signed"
    if now > cert.not_valid_after_utc:
        return f"certificate {cert.serial_number:x} has expired: it vouches for nothing now"
    if cert.serial_number in revoked:
        return f"certificate {cert.serial_number:x} is revoked (by the CRL)"
    return None
