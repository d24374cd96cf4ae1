"""The storage interface of the trace viewer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tabadol.ops.model import Edge, SpanRecord, TraceQuery, TraceSummary

DEFAULT_MAX_AGE_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_BYTES = 1024**3


@dataclass(frozen=True)
class StoreLimits:
    """Retention: traces older than ``max_age_seconds`` go, then the oldest until under size."""

    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS
    max_bytes: int = DEFAULT_MAX_BYTES


class SpanStore(Protocol):
    def add(self, spans: Sequence[SpanRecord]) -> None: ...

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
        """Consumer agency to provider agency, from the broker's server spans."""
        ...

    def enforce_retention(self, now_ns: int) -> int:
        """Apply the limits; returns how many traces were removed."""
        ...

    def close(self) -> None: ...
