"""Ledger records and the hash chain that links them. Pure: no files, no threads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, get_type_hints

GENESIS = "0" * 64  # the "previous digest" of the first record
SCHEMA_VERSION = 4  # 2 added consumer_serial and consumer_verified, 3 grant, 4 protocol
PROTOCOLS = ("grpc", "connect", "rest")  # what a call can come in by, in the reports' order


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One call through the broker, accounted for. Metadata only, never payloads."""

    start_ns: int
    end_ns: int
    trace_id: str  # 32 hex digits, or "" when the call was not traced
    request_id: str
    consumer: str  # the calling agency; "" when no agency could be read from its certificate
    provider: str
    service: str
    method: str
    kind: str  # unary, server_streaming, client_streaming, bidi_streaming
    status_code: int  # gRPC status code number
    request_bytes: int
    request_messages: int
    response_bytes: int
    response_messages: int
    endpoint: str  # "" when the call never reached a provider
    broker_instance: str
    request_sha256: str = ""  # only with [ledger] payload_digests: HMAC-SHA256, hex
    response_sha256: str = ""
    consumer_serial: str = ""  # the serial (hex) of the certificate the caller presented
    consumer_verified: bool = True  # False: ``consumer`` is only what a refused certificate claims
    grant: str = ""  # the id of the grant that admitted the call; "" when none did
    protocol: str = "grpc"  # what the call came in by: grpc, connect (Connect) or rest (JSON)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def values(self) -> tuple[Any, ...]:
        """Every field's value, in order."""
        return _values(self)

    def canonical(self) -> bytes:
        """The bytes the chain digest covers: the schema version and every field, in order.

        A gRPC call's record is in the form of the schema it was written under, so old
        ledgers still verify: with no grant, no serial and counted as verified, schema 1's
        (its fields only); with no grant, schema 2's (every field before grant); else schema
        3's (every field before protocol). A call by another protocol is schema 4 and covers
        every field.
        """
        if self.protocol != "grpc":  # "grpc" itself, no other spelling
            return _CANONICAL.encode((SCHEMA_VERSION, *_values(self))).encode()
        if self.grant != "":  # "" itself, no other empty
            return _CANONICAL.encode((3, *_values(self)[:_SCHEMA_3_FIELDS])).encode()
        if self.consumer_serial == "" and self.consumer_verified:
            return _CANONICAL.encode((1, *_values(self)[:_SCHEMA_1_FIELDS])).encode()
        return _CANONICAL.encode((2, *_values(self)[:_SCHEMA_2_FIELDS])).encode()


FIELD_NAMES = tuple(f.name for f in fields(LedgerRecord))
FIELD_TYPES: dict[str, type] = get_type_hints(LedgerRecord)
_SCHEMA_1_FIELDS = FIELD_NAMES.index("consumer_serial")
_SCHEMA_2_FIELDS = FIELD_NAMES.index("grant")
_SCHEMA_3_FIELDS = FIELD_NAMES.index("protocol")
_values = attrgetter(*FIELD_NAMES)
_CANONICAL = json.JSONEncoder(separators=(",", ":"))


def chain_digest(previous: str, record: LedgerRecord) -> str:
    """The digest of a record, linked to the one before it."""
    return hashlib.sha256(bytes.fromhex(previous) + record.canonical()).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as the ledger holds it: its position and the chain digests around it."""

    seq: int  # 1, 2, 3, ... with no gaps
    record: LedgerRecord
    prev_digest: str
    digest: str


@dataclass(frozen=True, slots=True)
class Seal:
    """A signed statement: the first ``count`` records of a chain end in ``head_digest``."""

    seq: int
    count: int
    head_digest: str
    sealed_ns: int
    signer: str  # SHA-256 fingerprint of the signing broker certificate (hex)
    signature: str  # hex DER ECDSA signature over payload()
    chain: str = ""  # the chain it seals: "" for a ledger of one chain, else a node's name

    def payload(self) -> bytes:
        return seal_payload(self.seq, self.count, self.head_digest, self.sealed_ns, self.chain)


def seal_payload(seq: int, count: int, head_digest: str, sealed_ns: int, chain: str = "") -> bytes:
    """What a seal signs. A named chain's seals sign its name too (v2), so no seal can be
    moved from one node's chain to another's."""
    if chain:
        return f"tabadol-ledger-seal:v2:{chain}:{seq}:{count}:{head_digest}:{sealed_ns}".encode()
    return f"tabadol-ledger-seal:v1:{seq}:{count}:{head_digest}:{sealed_ns}".encode()
