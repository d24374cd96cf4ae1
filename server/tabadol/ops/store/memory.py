"""Spans in this process's memory: the span store for tests and short-lived demos. It keeps
what the SQLite store keeps and counts a span's bytes as it does (encoding.py), so that the
size cap and eviction mean the same; only ``used_bytes`` is the counted bytes, not pages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from tabadol.ops.ingest import is_broker_sender, sender_of
from tabadol.ops.model import Edge, SpanRecord, TraceQuery, TraceSummary
from tabadol.ops.query import GRPC_CODES
from tabadol.ops.store.base import StoreLimits
from tabadol.ops.store.encoding import EncodedSpan, encode_span
from tabadol.ops.store.eviction import eviction_need, eviction_target, store_full

_SERVER = 2  # OTLP span kind

SpanKey = tuple[str, str]  # (trace_id, span_id)


@dataclass(frozen=True)
class _Stored:
    encoded: EncodedSpan
    received_ns: int

    @property
    def span(self) -> SpanRecord:
        return self.encoded.span

    @property
    def key(self) -> SpanKey:
        return self.encoded.span.trace_id, self.encoded.span.span_id


@dataclass
class _Trace:
    """A trace's summary, kept as the SQLite store keeps its ``traces`` row."""

    start_ns: int
    end_ns: int
    error_count: int
    root_service: str
    root_name: str
    has_root: bool
    received_ns: int  # first received; age retention counts from it
    spans: dict[str, _Stored] = field(default_factory=dict)  # by span id

    def parties(self) -> set[str]:
        return {agency for s in self.spans.values() for agency in s.encoded.parties}

    def add(self, stored: _Stored) -> None:
        span = stored.span
        is_root = not span.parent_span_id
        if is_root or (not self.has_root and span.start_ns < self.start_ns):
            self.root_service, self.root_name = span.service, span.name
        self.start_ns = min(self.start_ns, span.start_ns)
        self.end_ns = max(self.end_ns, span.end_ns)
        self.error_count += int(span.is_error)
        self.has_root = self.has_root or is_root
        self.spans[span.span_id] = stored

    def recount(self) -> None:
        """The summary of the spans left, after some went."""
        spans = [s.span for s in self.spans.values()]
        root = min(spans, key=lambda s: (s.parent_span_id != "", s.start_ns, s.span_id))
        self.start_ns = min(s.start_ns for s in spans)
        self.end_ns = max(s.end_ns for s in spans)
        self.error_count = sum(s.is_error for s in spans)
        self.has_root = any(not s.parent_span_id for s in spans)
        self.root_service, self.root_name = root.service, root.name


class MemorySpanStore:
    """A SpanStore in a few dicts behind one lock; safe to use from several threads."""

    def __init__(
        self, limits: StoreLimits | None = None, *, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._traces: dict[str, _Trace] = {}
        # Each sender's spans in the order received: eviction takes them from the front.
        self._by_sender: dict[str, dict[SpanKey, _Stored]] = {}
        self._usage: dict[str, int] = {}  # bytes by sender
        self._last_received = 0

    def close(self) -> None:
        with self._lock:
            self._traces.clear()
            self._by_sender.clear()
            self._usage.clear()

    # -- ingest -------------------------------------------------------------------------

    def add(self, spans: Sequence[SpanRecord]) -> None:
        if not spans:
            return
        with self._lock:
            # Strictly increasing, so that eviction by receipt has no ties between batches.
            received = max(self._clock(), self._last_received + 1)
            new: dict[SpanKey, _Stored] = {}
            for span in spans:
                key = (span.trace_id, span.span_id)
                if key not in new and not self._has(key):  # the same span sent twice
                    new[key] = _Stored(encode_span(span), received)
            for_broker = any(is_broker_sender(sender_of(span)) for span in spans)
            # Decided before anything changes: a refused batch leaves the store as it was.
            doomed = self._to_evict(new.values(), for_broker=for_broker, at_retention=False)
            for stored in new.values():
                self._insert(stored)
            self._delete(doomed)
            self._last_received = received

    def _has(self, key: SpanKey) -> bool:
        trace = self._traces.get(key[0])
        return trace is not None and key[1] in trace.spans

    def _insert(self, stored: _Stored) -> None:
        span, sender = stored.span, stored.encoded.sender
        self._by_sender.setdefault(sender, {})[stored.key] = stored
        self._usage[sender] = self._usage.get(sender, 0) + stored.encoded.size
        trace = self._traces.get(span.trace_id)
        if trace is None:
            trace = self._traces[span.trace_id] = _Trace(
                span.start_ns, span.end_ns, 0, span.service, span.name, False, stored.received_ns
            )
        trace.add(stored)

    def _to_evict(
        self, incoming: Iterable[_Stored], *, for_broker: bool, at_retention: bool
    ) -> list[_Stored]:
        """The spans to evict, earliest received first a sender at a time (eviction.py),
        for the store with ``incoming`` added to be under its size cap. StoreFull if that is
        not enough, or if only the broker's spans could make room for an agency's batch."""
        usage = dict(self._usage)
        for stored in incoming:  # counted against the cap, never evicted for themselves
            usage[stored.encoded.sender] = usage.get(stored.encoded.sender, 0) + stored.encoded.size
        queues: dict[str, Iterator[_Stored]] = {}
        exhausted: set[str] = set()
        doomed: list[_Stored] = []

        def evictable(sender: str) -> bool:
            return sender not in exhausted and bool(self._by_sender.get(sender))

        cap = self.limits.max_bytes
        while (used := sum(usage.values())) > cap:
            target = eviction_target(
                usage.items(), evictable, for_broker=for_broker, at_retention=at_retention
            )
            if target is None:
                if at_retention:
                    break
                raise store_full("memory:", cap, for_broker=for_broker)
            queue = queues.setdefault(target, iter(list(self._by_sender[target].values())))
            need, freed = eviction_need(used, cap, used), 0
            while freed < need:
                taken = next(queue, None)
                if taken is None:
                    exhausted.add(target)
                    break
                doomed.append(taken)
                freed += taken.encoded.size
            usage[target] -= freed
        return doomed

    def _delete(self, doomed: Iterable[_Stored]) -> int:
        """Delete these spans; bring their traces' summaries up to date; how many traces
        went whole."""
        touched: set[str] = set()
        for stored in doomed:
            sender, (trace_id, span_id) = stored.encoded.sender, stored.key
            del self._by_sender[sender][stored.key]
            self._usage[sender] -= stored.encoded.size
            if not self._by_sender[sender]:
                del self._by_sender[sender], self._usage[sender]
            del self._traces[trace_id].spans[span_id]
            touched.add(trace_id)
        gone = 0
        for trace_id in touched:
            trace = self._traces[trace_id]
            if trace.spans:
                trace.recount()
            else:
                del self._traces[trace_id]
                gone += 1
        return gone

    # -- queries ------------------------------------------------------------------------

    def _visible(self, party: str | None) -> list[_Trace]:
        traces = list(self._traces.values())
        return traces if party is None else [t for t in traces if party in t.parties()]

    def services(self, party: str | None = None) -> list[str]:
        with self._lock:
            return sorted({s.span.service for t in self._visible(party) for s in t.spans.values()})

    def operations(self, service: str, party: str | None = None) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(
                {
                    (s.span.name, s.span.kind)
                    for t in self._visible(party)
                    for s in t.spans.values()
                    if s.span.service == service
                }
            )

    def search(self, query: TraceQuery) -> tuple[list[TraceSummary], int]:
        with self._lock:
            matching = [(trace_id, t) for trace_id, t in self._traces.items() if _matches(t, query)]
            matching.sort(key=lambda item: (item[1].start_ns, item[0]), reverse=True)
            page = matching[query.offset : query.offset + query.limit]
            return [_summary(trace_id, t) for trace_id, t in page], len(matching)

    def trace(self, trace_id: str) -> list[SpanRecord]:
        with self._lock:
            trace = self._traces.get(trace_id.lower())
            stored = list(trace.spans.values()) if trace is not None else []
        return [s.span for s in sorted(stored, key=lambda s: (s.span.start_ns, s.span.span_id))]

    def dependencies(self, start_ns: int, end_ns: int) -> list[Edge]:
        edges: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            for trace in self._traces.values():
                for child in (s.span for s in trace.spans.values()):
                    parent = trace.spans.get(child.parent_span_id) if child.parent_span_id else None
                    if not start_ns <= child.start_ns <= end_ns or parent is None:
                        continue
                    if parent.span.service != child.service:
                        _count(edges, (parent.span.service, child.service), child.is_error)
        return [Edge(*pair, calls, errors) for pair, (calls, errors) in sorted(edges.items())]

    def agency_calls(self, start_ns: int, end_ns: int) -> list[Edge]:
        # Only spans the collector stamped as the broker's: an agency can write any
        # attribute it likes, and must not draw edges or error rates between others.
        edges: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            for trace in self._traces.values():
                for stored in trace.spans.values():
                    span, tags = stored.span, dict(stored.encoded.tags)
                    consumer, provider = tags.get("tabadol.consumer"), tags.get("tabadol.provider")
                    if (
                        span.kind == _SERVER
                        and start_ns <= span.start_ns <= end_ns
                        and is_broker_sender(stored.encoded.sender)
                        and consumer is not None
                        and provider is not None
                    ):
                        _count(edges, (consumer, provider), span.is_error)
        return [Edge(*pair, calls, errors) for pair, (calls, errors) in sorted(edges.items())]

    # -- retention ----------------------------------------------------------------------

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._usage.values())

    def usage(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._usage.items()))

    def enforce_retention(self, now_ns: int) -> int:
        cutoff = now_ns - int(self.limits.max_age_seconds * 1e9)
        with self._lock:
            expired = [
                stored
                for t in self._traces.values()
                if t.end_ns < cutoff or t.received_ns < cutoff
                for stored in t.spans.values()
            ]
            removed = self._delete(expired)
            removed += self._delete(self._to_evict((), for_broker=False, at_retention=True))
        return removed


def _count(edges: dict[tuple[str, str], list[int]], pair: tuple[str, str], error: bool) -> None:
    counts = edges.setdefault(pair, [0, 0])
    counts[0] += 1
    counts[1] += int(error)


def _summary(trace_id: str, t: _Trace) -> TraceSummary:
    services = tuple(sorted({s.span.service for s in t.spans.values()}))
    return TraceSummary(
        trace_id, t.start_ns, t.end_ns, len(t.spans), t.error_count, t.root_service,
        t.root_name, services,
    )  # fmt: skip


def _has_tag(t: _Trace, keys: tuple[str, ...], value: str) -> bool:
    return any(k in keys and v == value for s in t.spans.values() for k, v in s.encoded.tags)


def _matches(t: _Trace, query: TraceQuery) -> bool:
    """Whether a trace matches a search, as the SQLite store's WHERE clause decides."""
    duration = t.end_ns - t.start_ns
    if query.start_ns is not None and t.start_ns < query.start_ns:
        return False
    if query.end_ns is not None and t.start_ns > query.end_ns:
        return False
    if query.min_duration_ns is not None and duration < query.min_duration_ns:
        return False
    if query.max_duration_ns is not None and duration > query.max_duration_ns:
        return False
    if (query.service or query.operation) and not any(
        (not query.service or s.span.service == query.service)
        and (not query.operation or s.span.name == query.operation)
        for s in t.spans.values()
    ):
        return False
    # A bare key also matches the platform's own attribute: consumer=post finds
    # tabadol.consumer=post.
    if not all(_has_tag(t, (key, f"tabadol.{key}"), value) for key, value in query.tags):
        return False
    if query.party is not None and query.party not in t.parties():
        return False
    if query.status == "error":
        return t.error_count > 0
    if query.status == "ok":
        return t.error_count == 0
    if query.status:
        return _has_tag(t, ("rpc.grpc.status_code",), str(GRPC_CODES[query.status]))
    return True
