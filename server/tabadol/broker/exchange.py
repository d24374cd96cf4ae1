"""One call through the broker, as the broker saw it: filled in along the request path."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from tabadol.broker.upstream import Upstream
from tabadol.contracts import MethodContract
from tabadol.ledger.record import LedgerRecord
from tabadol.limits import Admission


@dataclass(slots=True)
class Exchange:
    method: MethodContract
    provider: str
    started_ns: int = field(default_factory=time.time_ns)
    ended_ns: int = 0
    consumer: str = ""
    consumer_serial: str = ""  # hex serial of the certificate the caller presented
    consumer_verified: bool = False  # True once the certificate identified the consumer
    endpoint: str = ""
    request_id: str = ""
    code: grpc.StatusCode | None = None  # None until the call ends one way or another
    details: str = ""
    request_bytes: int = 0
    request_messages: int = 0
    response_bytes: int = 0
    response_messages: int = 0
    upstream: Upstream | None = None  # the provider endpoint, once routed
    trace_id: str = ""  # 32 hex digits when the call carries a trace context
    span: Any = None  # the broker's server span, when tracing
    client_span: Any = None  # the provider hop's span, when tracing
    request_hash: Any = None  # keyed HMAC-SHA256 objects, with [ledger] payload_digests
    response_hash: Any = None
    # Strict ledger mode: awaited before the consumer hears the outcome.
    durable: Callable[[Exchange, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]] | None = None
    recorded: bool = False  # its ledger record has been handed over
    admission: Admission | None = None  # held against the consumer's concurrency limits
    unreachable: bool = False  # the provider endpoint could not be reached at all
    attempts: int = 1
    last_activity: float = 0.0  # monotonic time of the last message either way (streams)

    def ended(self, code: grpc.StatusCode, details: str = "") -> None:
        """Record the final status (the first one recorded wins)."""
        if self.code is None:
            self.code, self.details = code, details

    def request(self, message: bytes) -> bytes:
        self.last_activity = time.monotonic()
        self.request_messages += 1
        self.request_bytes += len(message)
        if self.request_hash is not None:
            self.request_hash.update(message)
        return message

    def response(self, message: bytes) -> bytes:
        self.last_activity = time.monotonic()
        self.response_messages += 1
        self.response_bytes += len(message)
        if self.response_hash is not None:
            self.response_hash.update(message)
        return message

    async def settle(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """In strict ledger mode, wait until this call's record is on disk (or abort)."""
        if self.durable is not None:
            await self.durable(self, context)

    def ledger_record(self, instance: str) -> LedgerRecord:
        code = self.code or grpc.StatusCode.UNKNOWN
        return LedgerRecord(
            start_ns=self.started_ns,
            end_ns=self.ended_ns or time.time_ns(),
            trace_id=self.trace_id,
            request_id=self.request_id,
            consumer=self.consumer,
            provider=self.provider,
            service=self.method.service,
            method=self.method.name,
            kind=self.method.kind.value,
            status_code=code.value[0],
            request_bytes=self.request_bytes,
            request_messages=self.request_messages,
            response_bytes=self.response_bytes,
            response_messages=self.response_messages,
            endpoint=self.endpoint,
            broker_instance=instance,
            request_sha256=self.request_hash.hexdigest() if self.request_hash else "",
            response_sha256=self.response_hash.hexdigest() if self.response_hash else "",
            consumer_serial=self.consumer_serial,
            consumer_verified=self.consumer_verified,
        )
