"""The storage interface of the trace viewer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tabadol.errors import TabadolError
from tabadol.ops.model import Edge, SpanRecord, TraceQuery, TraceSummary

DEFAULT_MAX_AGE_SECONDS = 7 * 24 * 3600
DEFAULT_MAX_BYTES = 1024**3


class StoreFull(Exception):
    """A batch of spans cannot fit under the store's size cap even with every span received
    before it evicted."""


class StoreUnavailable(TabadolError):
    """The store's database cannot be reached or answered with an error; the message names
    it (host and database, never a password). Callers answer "try again later"."""


@dataclass(frozen=True)
class StoreLimits:
    """Retention: traces older than ``max_age_seconds`` go; then, while over ``max_bytes``,
    spans go a sender at a time (``SpanStore.add``). The size cap also holds at every
    ``add``, not only when retention runs."""

    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS
    max_bytes: int = DEFAULT_MAX_BYTES


class SpanStore(Protocol):
    limits: StoreLimits

    def add(self, spans: Sequence[SpanRecord]) -> None:
        """Store spans, and the agencies the broker's spans name as parties; then, while the
        store is over ``limits.max_bytes``, evict spans received earlier, earliest first,
        from one sender at a time (by the ``tabadol.sender`` stamp): the non-broker sender
        holding the most. The broker's spans go only to make room for the broker's own, and
        then only while no other sender holds more than a fair share (the store split evenly
        among its senders). StoreFull if the batch cannot fit: for an agency's batch, also
        when only the broker's spans are left to evict."""
        ...

    def services(self, party: str | None = None) -> list[str]:
        """Service names; with ``party``, only those in traces that agency is a party to."""
        ...

    def operations(self, service: str, party: str | None = None) -> list[tuple[str, int]]:
        """(span name, span kind) pairs seen for a service; with ``party``, only in traces
        that agency is a party to."""
        ...

    def search(self, query: TraceQuery) -> tuple[list[TraceSummary], int]:
        """One page of matching traces, newest first, and the total number that match; with
        ``query.party``, only traces the broker's spans name that agency in."""
        ...

    def trace(self, trace_id: str) -> list[SpanRecord]: ...

    def dependencies(self, start_ns: int, end_ns: int) -> list[Edge]:
        """Service-to-service calls: a span whose parent belongs to another service."""
        ...

    def agency_calls(self, start_ns: int, end_ns: int) -> list[Edge]:
        """Consumer agency to provider agency, from the broker's server spans: those the
        collector stamped with the broker's own identity (``tabadol.sender``)."""
        ...

    def used_bytes(self) -> int:
        """About what the store takes against ``limits.max_bytes``."""
        ...

    def usage(self) -> dict[str, int]:
        """About how many bytes each sender's spans take, by ``tabadol.sender``."""
        ...

    def enforce_retention(self, now_ns: int) -> int:
        """Apply the limits; returns how many traces went whole. Age counts from a trace's
        end or from when it was received, whichever is earlier; size evicts as ``add``."""
        ...

    def close(self) -> None: ...
