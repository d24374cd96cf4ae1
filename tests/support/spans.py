"""Spans for the trace store's tests: a broker call's spans, agencies' spans as the
collector stamps them, and the searches the tests make."""

from __future__ import annotations

import dataclasses
from typing import Any

from tabadol.ops.model import STATUS_ERROR, STATUS_UNSET, SpanEvent, SpanRecord, TraceQuery
from tabadol.ops.store import SpanStore

T0 = 1_700_000_000 * 10**9  # every span time below is an offset from here, in milliseconds
MS = 10**6
HOUR_MS = 3600 * 1000
INTERNAL, SERVER, CLIENT = 1, 2, 3
BROKER = "tabadol-broker"
# What the collector stamps on the broker's spans (and only on those): ingest.py.
BROKER_SENDER = "spiffe://tabadol.example/broker"


def tid(n: int) -> str:
    return f"{n:032x}"


def sid(n: int) -> str:
    return f"{n:016x}"


def make_span(
    trace: int,
    span: int,
    *,
    parent: int = 0,
    service: str = BROKER,
    name: str = "echo.Echo/Unary",
    kind: int = SERVER,
    start_ms: int = 0,
    duration_ms: int = 1,
    status: int = STATUS_UNSET,
    message: str = "",
    attributes: dict[str, Any] | None = None,
    events: tuple[SpanEvent, ...] = (),
    resource: dict[str, Any] | None = None,
) -> SpanRecord:
    """A span of trace ``trace``; times are milliseconds after T0."""
    start = T0 + start_ms * MS
    return SpanRecord(
        trace_id=tid(trace),
        span_id=sid(span),
        parent_span_id=sid(parent) if parent else "",
        service=service,
        name=name,
        kind=kind,
        start_ns=start,
        end_ns=start + duration_ms * MS,
        status_code=status,
        status_message=message,
        attributes=attributes or {},
        events=events,
        resource=resource if resource is not None else _resource(service),
    )


def _resource(service: str) -> dict[str, Any]:
    sender = {"tabadol.sender": BROKER_SENDER} if service == BROKER else {}
    return {"service.name": service, **sender}


def exchange(
    trace: int, *, consumer: str = "post", start_ms: int = 0, grpc_code: int = 0
) -> list[SpanRecord]:
    """One call through the broker: consumer client -> broker server -> broker client -> echo."""
    status = STATUS_ERROR if grpc_code else STATUS_UNSET
    return [
        make_span(trace, 1, service=consumer, kind=CLIENT, start_ms=start_ms, duration_ms=10),
        make_span(
            trace,
            2,
            parent=1,
            kind=SERVER,
            start_ms=start_ms + 1,
            duration_ms=8,
            status=status,
            attributes={
                "tabadol.consumer": consumer,
                "tabadol.provider": "echo",
                "rpc.grpc.status_code": grpc_code,
            },
        ),
        make_span(trace, 3, parent=2, kind=CLIENT, start_ms=start_ms + 2, duration_ms=6),
        make_span(
            trace, 4, parent=3, service="echo", start_ms=start_ms + 3, duration_ms=4, status=status
        ),
    ]


def found(store: SpanStore, **query: Any) -> list[str]:
    """Trace ids a search returns, in the order returned."""
    summaries, _ = store.search(TraceQuery(**query))
    return [s.trace_id for s in summaries]


def filler(trace: int, start_ms: int, size: int = 2000) -> list[SpanRecord]:
    return [make_span(trace, 1, start_ms=start_ms, attributes={"payload": "x" * size})]


AGENCY = "spiffe://tabadol.example/agency/{}"


def sent_by(agency: str, trace: int, span: int, size: int, **fields: Any) -> SpanRecord:
    """A span an agency's certificate exported, as the collector stamps it."""
    return make_span(
        trace, span, service=agency, attributes={"p": "x" * size},
        resource={"service.name": agency, "tabadol.sender": AGENCY.format(agency)}, **fields,
    )  # fmt: skip


def brokers_spans_of(trace: int, consumer: str) -> list[SpanRecord]:
    """The broker's two spans of a call, about as large as an agency's span of it."""
    return [
        dataclasses.replace(s, attributes={**s.attributes, "p": "b" * 2000})
        for s in exchange(trace, consumer=consumer)
        if s.service == BROKER
    ]
