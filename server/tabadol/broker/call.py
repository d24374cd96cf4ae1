"""One call through the broker: its facts (fixed when it arrives), its traffic counters, and
how it ended. The request path (``tabadol.broker.proxy``) is the only writer of the outcome;
a watcher (a stream limit, a revocation) may only say why the broker cut the call off."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tabadol.admission import NOBODY, Caller, CallFacts
from tabadol.ledger.record import LedgerRecord
from tabadol.limits import NOTHING_HELD, Admission
from tabadol.metadata import Metadata
from tabadol.status import Code

if TYPE_CHECKING:
    from tabadol.broker.tracing import CallTrace
    from tabadol.broker.upstream import Upstream


class Ending(Exception):
    """How the broker ends a call: the status and details the consumer is told."""

    def __init__(self, code: Code, details: str, trailers: Metadata | None = None) -> None:
        super().__init__(details)
        self.code, self.details = code, details
        self.trailers = trailers  # None: the request id only


OK = Ending(Code.OK, "")


class RequestIds:
    """Request ids: 128 bits from the OS's random source, read 4 KiB at a time: a system
    call for each call cost about 24 µs of it (cProfile, on the test machine)."""

    __slots__ = ("_at", "_pool")

    def __init__(self) -> None:
        self._pool, self._at = b"", 0

    def next(self) -> str:
        at = self._at
        if at + 16 > len(self._pool):
            self._pool, at = os.urandom(4096), 0
        self._at = at + 16
        return self._pool[at : at + 16].hex()


class Digest(Protocol):
    def update(self, message: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


class _NoDigest:
    """Stands in for the payload digests when [ledger] payload_digests is off."""

    __slots__ = ()

    def update(self, message: bytes, /) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


NO_DIGEST: Digest = _NoDigest()


class Traffic:
    """Messages and bytes each way, and when the last one passed (for idle streams)."""

    __slots__ = (
        "last_activity",
        "request_bytes",
        "request_digest",
        "request_messages",
        "response_bytes",
        "response_digest",
        "response_messages",
    )

    def __init__(self, request_digest: Digest = NO_DIGEST, response_digest: Digest = NO_DIGEST):
        self.request_bytes = self.request_messages = 0
        self.response_bytes = self.response_messages = 0
        self.last_activity = 0.0  # monotonic seconds
        self.request_digest, self.response_digest = request_digest, response_digest

    def request(self, message: bytes) -> bytes:
        self.last_activity = time.monotonic()
        self.request_messages += 1
        self.request_bytes += len(message)
        self.request_digest.update(message)
        return message

    def response(self, message: bytes) -> bytes:
        self.last_activity = time.monotonic()
        self.response_messages += 1
        self.response_bytes += len(message)
        self.response_digest.update(message)
        return message


@dataclass(slots=True, eq=False)
class Call:
    facts: CallFacts
    trace: CallTrace
    traffic: Traffic
    started_ns: int = field(default_factory=time.time_ns)
    caller: Caller = NOBODY  # once identified, or as a refused certificate claims
    held: Admission = NOTHING_HELD  # against the consumer's concurrency limits
    grant: str = ""  # the id of the grant that admitted it
    upstream: Upstream | None = None  # the provider endpoint, once routed
    provider_call: Any = None  # the call to the provider, once made (to cancel it)
    hop_started_ns: int = 0  # when the call to the provider was made
    attempts: int = 0  # calls made to the provider (an idempotent call may retry elsewhere)
    unreachable: bool = False  # the last attempt never reached a provider
    cut_off: Ending | None = None  # why the broker itself ended the call (the first reason)
    outcome: Ending | None = None  # how it ended: set once, by the request path
    ended_ns: int = 0
    recorded: bool = False  # its ledger record has been handed over

    @property
    def request_id(self) -> str:
        return self.facts.request_id

    @property
    def endpoint(self) -> str:
        return self.upstream.endpoint if self.upstream is not None else ""

    def cut(self, code: Code, details: str) -> bool:
        """The broker ends the call (a limit, a revocation): the first reason is the one the
        consumer is told. False when the call already has a reason or an outcome."""
        if self.cut_off is not None or self.outcome is not None:
            return False
        self.cut_off = Ending(code, details)
        return True

    def end(self, ending: Ending) -> None:
        """Set the outcome (the first one set stands: a strict ledger may already have
        recorded it)."""
        if self.outcome is None:
            self.outcome = ending
            self.ended_ns = time.time_ns()

    def ledger_record(self, instance: str) -> LedgerRecord:
        method, traffic = self.facts.method, self.traffic
        outcome = self.outcome
        return LedgerRecord(
            start_ns=self.started_ns,
            end_ns=self.ended_ns or time.time_ns(),
            trace_id=self.trace.trace_hex,
            request_id=self.facts.request_id,
            consumer=self.caller.agency,
            provider=self.facts.provider,
            service=method.service,
            method=method.name,
            kind=method.kind.value,
            status_code=int(outcome.code if outcome is not None else Code.UNKNOWN),
            request_bytes=traffic.request_bytes,
            request_messages=traffic.request_messages,
            response_bytes=traffic.response_bytes,
            response_messages=traffic.response_messages,
            endpoint=self.endpoint,
            broker_instance=instance,
            request_sha256=traffic.request_digest.hexdigest(),
            response_sha256=traffic.response_digest.hexdigest(),
            consumer_serial=self.caller.serial,
            consumer_verified=self.caller.verified,
            grant=self.grant,
            protocol=self.facts.protocol,
        )
