"""The storage interface of the trace viewer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tabadol.ops.model import Edge, SpanRecord, TraceQuery, TraceSummary

DEFAULT_MAX_AGE_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_BYTES = 1024**3


class StoreFull(Exception):
    """A batch of spans cannot fit under the store's size cap even with every older trace
    evicted."""


@dataclass(frozen=True)
class StoreLimits:
    """Retention: traces older than ``max_age_seconds`` go, then the earliest received until
    under ``max_bytes``. The size cap also holds at every ``add``, not only when retention
    runs."""

    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS
    max_bytes: int = DEFAULT_MAX_BYTES


class SpanStore(Protocol):
    limits: StoreLimits

    def add(self, spans: Sequence[SpanRecord]) -> None:
        """Store spans, first evicting the earliest-received traces if they would not fit
        under ``limits.max_bytes``; StoreFull if they cannot fit at all."""
        ...

    def services(self) -> list[str]: ...

    def operations(self, service: str) -> list[tuple[str, int]]:
        """(span name, span kind) pairs seen for a service."""
        ...

    def search(self, query: TraceQuery) -> tuple[list[TraceSummary], int]:
        """One page of matching traces, newest first, and the total number that match."""
        ...

    def trace(self, trace_id: str) -> list[SpanRecord]: ...

    def dependencies(self, start_ns: int, end_ns: int) -> list[Edge]:
        """Service-to-service calls: a span whose parent belongs to another service."""
        ...

    def agency_calls(self, start_ns: int, end_ns: int) -> list[Edge]:
        """Consumer agency to provider agency, from the broker's server spans: those the
        collector stamped with the broker's own identity (``tabadol.sender``)."""
        ...

    def enforce_retention(self, now_ns: int) -> int:
        """Apply the limits; returns how many traces were removed. Age counts from a trace's
        end or from when it was received, whichever is earlier; size evicts by receipt."""
        ...

    def close(self) -> None: ...
