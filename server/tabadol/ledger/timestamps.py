"""RFC 3161 trusted timestamps on seals: what to ask a TSA, and whether its answer binds a
seal's payload to a time the TSA signed. Pure: no network, no threads, no files.

The message imprint of a seal is SHA-256 of ``Seal.payload()``: the token dates exactly
what the broker signed, chain name, count and head digest included (docs/ledger.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from rfc3161_client import (
    HashAlgorithm,
    TimeStampRequest,
    TimestampRequestBuilder,
    TimeStampResponse,
    VerificationError,
    VerifierBuilder,
    decode_timestamp_response,
)

from tabadol.ledger.record import Seal
from tabadol.ledger.store.base import SealTimestamp, TimestampLog

_GRANTED = 0  # PKIStatus granted; grantedWithMods is refused as rfc3161-client does
_MAX_BROKEN_SHOWN = 10


class TimestampRefused(Exception):
    """An answer or token that is no valid timestamp of the seal; the text says why."""


@dataclass(frozen=True)
class TsaTrust:
    """Who may timestamp: the roots (and intermediates) of the TSA's chain, and the TSA's
    own certificate when the file names it (then only that certificate's tokens count)."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    tsa: x509.Certificate | None

    @classmethod
    def from_pem(cls, pem: bytes) -> TsaTrust:
        """ValueError says why the PEM cannot serve: no certificate, or no root to end on."""
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError as e:
            raise ValueError(f"no PEM certificate in it ({e})") from None
        roots = tuple(c for c in certs if c.issuer == c.subject)
        if not roots:
            raise ValueError(
                "it holds no self-signed (root) certificate: give the TSA's certificate "
                "together with its CA chain up to the root"
            )
        tsas = [c for c in certs if _time_stamping(c)]
        return cls(
            roots=roots,
            intermediates=tuple(c for c in certs if c not in roots),
            tsa=tsas[0] if len(tsas) == 1 else None,
        )

    def describe(self) -> str:
        return (self.tsa or self.roots[0]).subject.rfc4514_string()


def _time_stamping(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.TIME_STAMPING in eku


def imprint(seal: Seal) -> bytes:
    """What the TSA signs for a seal: SHA-256 of its payload."""
    return hashlib.sha256(seal.payload()).digest()


def timestamp_request(seal: Seal) -> TimeStampRequest:
    """A TimeStampReq for a seal: SHA-256 imprint, a fresh nonce, the TSA's certificate asked
    for in the token (so an outsider can check it with the TSA's CA alone)."""
    return (
        TimestampRequestBuilder()
        .data(seal.payload())
        .hash_algorithm(HashAlgorithm.SHA256)
        .nonce(nonce=True)
        .cert_request(cert_request=True)
        .build()
    )


def accept_response(
    answer: bytes, seal: Seal, trust: TsaTrust, request: TimeStampRequest
) -> tuple[bytes, int]:
    """(DER token, genTime in ns) of a TSA's TimeStampResp to ``request``; TimestampRefused
    unless it was granted, answers this request (nonce) and is a valid timestamp of ``seal``."""
    try:
        response = decode_timestamp_response(answer)
    except ValueError as e:
        raise TimestampRefused(f"the answer is no RFC 3161 TimeStampResp ({e})") from None
    if response.status != _GRANTED:
        why = "; ".join(response.status_string) or "no reason given"
        raise TimestampRefused(f"the TSA did not grant it (status {response.status}: {why})")
    if response.tst_info.nonce != request.nonce:
        raise TimestampRefused("the answer is to another request (its nonce differs)")
    gen_time_ns = _check(response, seal, trust)
    return response.time_stamp_token(), gen_time_ns


def check_token(token: bytes, seal: Seal, trust: TsaTrust) -> int:
    """genTime (ns) of a stored token; TimestampRefused unless the TSA signed it over this
    seal's payload."""
    try:
        response = decode_timestamp_response(_granted_response(token))
    except ValueError as e:
        raise TimestampRefused(f"the token cannot be read ({e})") from None
    return _check(response, seal, trust)


def _check(response: TimeStampResponse, seal: Seal, trust: TsaTrust) -> int:
    builder = VerifierBuilder(
        roots=list(trust.roots), intermediates=list(trust.intermediates), tsa_certificate=trust.tsa
    )
    try:
        if response.tst_info.message_imprint.message != imprint(seal):
            raise TimestampRefused(
                "it dates another payload than this seal's (its imprint differs)"
            )
        builder.build().verify(response, imprint(seal))
    except VerificationError as e:
        raise TimestampRefused(f"it is not signed by the configured TSA ({e})") from None
    except ValueError as e:  # a malformed token inside a well-formed answer
        raise TimestampRefused(f"it cannot be checked ({e})") from None
    return _ns(response.tst_info.gen_time)


def _ns(when: datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _granted_response(token: bytes) -> bytes:
    """A stored token as the TimeStampResp that carried it (status granted), which is what
    rfc3161-client reads."""
    body = bytes.fromhex("3003020100") + token  # PKIStatusInfo { status granted }
    return b"\x30" + _der_length(len(body)) + body


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")


# A seal's own date is written by its signer: a token may date it a little before (clocks
# differ), and as late as a TSA outage lasts, but no more. A token much later than its seal
# fixes the records only from its own date: history rewritten with the broker's key, the
# tokens deleted and asked for again, would otherwise pass.
CLOCK_SKEW_NS = 300 * 10**9
DEFAULT_MAX_DELAY_S = 86_400.0


def timestamp_findings(
    store: TimestampLog,
    chain: str,
    seals: Iterable[Seal],
    tsa_cert_pem: bytes,
    max_delay_s: float = DEFAULT_MAX_DELAY_S,
) -> list[str]:
    """What the chain's timestamps show: "BROKEN: ..." for a token that does not date its
    seal, dates it too late or before it was made (or dates a seal the ledger no longer
    holds), "NOTE: ..." for seals not timestamped yet, else one "OK: ..." line. ValueError
    if ``tsa_cert_pem`` cannot serve."""
    trust = TsaTrust.from_pem(tsa_cert_pem)
    broken: list[str] = []
    waiting: list[Seal] = []
    holes: list[Seal] = []  # seals without a token though a later seal has one
    checked = 0
    newest = 0
    stamps: Iterator[SealTimestamp] = iter(store.timestamps(chain))
    stamp = next(stamps, None)
    for seal in seals:
        while stamp is not None and stamp.seal_seq < seal.seq:
            broken.append(_vanished(stamp))
            stamp = next(stamps, None)
        if stamp is None or stamp.seal_seq > seal.seq:
            waiting.append(seal)
            continue
        if waiting:
            holes += waiting
            waiting = []
        try:
            gen_time_ns = check_token(stamp.token, seal, trust)
        except TimestampRefused as e:
            broken.append(
                f"BROKEN: seal {seal.seq}: its timestamp token (dated {_iso(stamp.gen_time_ns)}) "
                f"does not hold: {e}; the seal was rewritten after the TSA dated it"
            )
        else:
            if gen_time_ns < seal.sealed_ns - CLOCK_SKEW_NS:
                broken.append(
                    f"BROKEN: seal {seal.seq}: the TSA dated it {_iso(gen_time_ns)}, before the "
                    f"date it claims ({_iso(seal.sealed_ns)}): its date was forged"
                )
            elif gen_time_ns > seal.sealed_ns + max_delay_s * 1e9:
                broken.append(
                    f"BROKEN: seal {seal.seq} (sealed {_iso(seal.sealed_ns)}) was timestamped "
                    f"only {_iso(gen_time_ns)}, more than tsa_max_delay_seconds "
                    f"({max_delay_s:g}) later: its records are fixed only from then (tokens "
                    "removed and asked for again after a rewrite look so; a TSA outage that "
                    "long, too)"
                )
            checked += 1
            newest = max(newest, gen_time_ns)
        stamp = next(stamps, None)
    while stamp is not None:
        broken.append(_vanished(stamp))
        stamp = next(stamps, None)
    findings = broken[:_MAX_BROKEN_SHOWN]
    if len(broken) > _MAX_BROKEN_SHOWN:
        findings.append(f"BROKEN: and {len(broken) - _MAX_BROKEN_SHOWN} more timestamp tokens")
    if holes:
        findings.append(
            f"NOTE: {len(holes)} seals have no timestamp though later seals have one (seal "
            f"{holes[0].seq}, sealed {_iso(holes[0].sealed_ns)}, first): their tokens were "
            "lost or removed; the records they seal are still dated by the later tokens"
        )
    if waiting:
        findings.append(
            f"NOTE: {len(waiting)} seals are not timestamped yet (seals {waiting[0].seq} to "
            f"{waiting[-1].seq}, the oldest sealed {_iso(waiting[0].sealed_ns)}): the broker "
            "asks the TSA for them while it answers"
        )
    if not broken and checked:
        findings.insert(
            0,
            f"OK: {checked} seals timestamped by {trust.describe()}, the newest dated "
            f"{_iso(newest)}",
        )
    return findings


def _vanished(stamp: SealTimestamp) -> str:
    return (
        f"BROKEN: seal {stamp.seal_seq} was timestamped (dated {_iso(stamp.gen_time_ns)}), but "
        "the ledger no longer holds it: sealed batches were removed"
    )
