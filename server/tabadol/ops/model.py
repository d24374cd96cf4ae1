"""What the trace viewer stores and answers with. Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# OTLP span kinds and status codes, as numbers on the wire.
KIND_NAMES = {
    0: "unspecified",
    1: "internal",
    2: "server",
    3: "client",
    4: "producer",
    5: "consumer",
}
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


@dataclass(frozen=True)
class SpanEvent:
    time_ns: int
    name: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpanRecord:
    """One finished span, as received over OTLP."""

    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16 lower-case hex digits
    parent_span_id: str  # "" for a root span
    service: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int = STATUS_UNSET
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: tuple[SpanEvent, ...] = ()
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def is_error(self) -> bool:
        return self.status_code == STATUS_ERROR


@dataclass(frozen=True)
class TraceSummary:
    trace_id: str
    start_ns: int
    end_ns: int
    span_count: int
    error_count: int
    root_service: str
    root_name: str
    services: tuple[str, ...]

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


@dataclass(frozen=True)
class TraceQuery:
    """A search, in the terms of Jaeger's query API plus Tabadol's status filter and paging."""

    service: str | None = None
    operation: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    min_duration_ns: int | None = None
    max_duration_ns: int | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    status: str | None = None  # "ok", "error", or a gRPC code name such as "NOT_FOUND"
    party: str | None = None  # only traces the broker's spans name this agency in
    limit: int = 20
    offset: int = 0


@dataclass(frozen=True)
class Edge:
    """Calls from one service (or agency) to another in a time window."""

    parent: str
    child: str
    calls: int
    errors: int = 0
