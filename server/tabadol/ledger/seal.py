"""Seals: the broker signs the head of the chain, so a rewritten ledger cannot be re-sealed."""

from __future__ import annotations

import functools
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tabadol.ledger.record import Seal, seal_payload


def fingerprint(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class Sealer:
    """Signs seals with the broker's key; its certificate goes into the ledger beside them."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the broker key is not an EC key")
        self._key = key
        self.cert_pem = cert_pem
        self.signer = fingerprint(cert_pem)

    def seal(self, seq: int, count: int, head_digest: str, sealed_ns: int, chain: str = "") -> Seal:
        signature = self.sign(seal_payload(seq, count, head_digest, sealed_ns, chain))
        return Seal(seq, count, head_digest, sealed_ns, self.signer, signature, chain)

    def sign(self, payload: bytes) -> str:
        """ECDSA-SHA256 over ``payload``, hex: a seal's, or a journal append's."""
        return self._key.sign(payload, ec.ECDSA(hashes.SHA256())).hex()


@functools.lru_cache(maxsize=64)
def _public_key(cert_pem: bytes) -> ec.EllipticCurvePublicKey | None:
    """The certificate's EC key (parsed once: a ledger has many seals, few signers)."""
    try:
        public_key = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError:
        return None
    return public_key if isinstance(public_key, ec.EllipticCurvePublicKey) else None


def signed_by(payload: bytes, signature: str, cert_pem: bytes) -> bool:
    """Whether ``signature`` (hex) over ``payload`` was made with the certificate's key."""
    public_key = _public_key(cert_pem)
    if public_key is None:
        return False
    try:
        public_key.verify(bytes.fromhex(signature), payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def signature_valid(seal: Seal, cert_pem: bytes) -> bool:
    return signed_by(seal.payload(), seal.signature, cert_pem)
