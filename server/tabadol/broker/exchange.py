"""One call through the broker, as the broker saw it: filled in along the request path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from tabadol.broker.upstream import Upstream
from tabadol.contracts import MethodContract


@dataclass(slots=True)
class Exchange:
    method: MethodContract
    provider: str
    started_ns: int = field(default_factory=time.time_ns)
    ended_ns: int = 0
    consumer: str = ""
    endpoint: str = ""
    request_id: str = ""
    code: grpc.StatusCode | None = None  # None until the call ends one way or another
    details: str = ""
    request_bytes: int = 0
    request_messages: int = 0
    response_bytes: int = 0
    response_messages: int = 0
    upstream: Upstream | None = None  # the provider endpoint, once routed
    span: Any = None  # the broker's server span, when tracing
    client_span: Any = None  # the provider hop's span, when tracing

    def ended(self, code: grpc.StatusCode, details: str = "") -> None:
        """Record the final status (the first one recorded wins)."""
        if self.code is None:
            self.code, self.details = code, details

    def request(self, message: bytes) -> bytes:
        self.request_messages += 1
        self.request_bytes += len(message)
        return message

    def response(self, message: bytes) -> bytes:
        self.response_messages += 1
        self.response_bytes += len(message)
        return message
