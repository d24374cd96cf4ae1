"""An agency's credentials bundle: ca.crt, agency.crt and agency.key, as `tabadol pki` issues."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tabadol.spiffe import trust_domain_of_agency


class CredentialsError(Exception):
    """The credentials directory is missing a file or holds something unusable."""


def read_bundle(directory: Path, role: str) -> tuple[bytes, bytes, bytes]:
    """ca.crt, <role>.crt and <role>.key of a directory `tabadol pki issue` wrote;
    CredentialsError naming the file that cannot be read."""

    def read(name: str) -> bytes:
        try:
            return (directory / name).read_bytes()
        except OSError as e:
            raise CredentialsError(f"{directory / name}: cannot read: {e.strerror}") from e

    return read("ca.crt"), read(f"{role}.crt"), read(f"{role}.key")


@dataclass(frozen=True)
class AgencyCredentials:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = b""
    agency_id: str = ""
    trust_domain: str = ""

    def __repr__(self) -> str:  # never show key material
        return (
            f"AgencyCredentials(agency_id={self.agency_id!r}, trust_domain={self.trust_domain!r})"
        )

    @classmethod
    def load(cls, directory: str | Path) -> AgencyCredentials:
        directory = Path(directory)
        ca_pem, cert_pem, key_pem = read_bundle(directory, "agency")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound) as e:
            raise CredentialsError(
                f"{directory / 'agency.crt'}: not a Tabadol agency certificate"
            ) from e
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            try:
                trust_domain, agency_id = trust_domain_of_agency(uri)
            except ValueError:
                continue
            return cls(ca_pem, cert_pem, key_pem, agency_id, trust_domain)
        raise CredentialsError(
            f"{directory / 'agency.crt'}: carries no spiffe://.../agency/<id> identity"
        )
