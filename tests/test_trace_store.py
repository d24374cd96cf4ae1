"""The trace viewer without a network: span store, query parsing, Jaeger JSON, OTLP, HTTP API."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from starlette.testclient import TestClient

from tabadol.ops import jaeger
from tabadol.ops.app import create_app
from tabadol.ops.model import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_UNSET,
    Edge,
    SpanEvent,
    SpanRecord,
    TraceQuery,
)
from tabadol.ops.otlp import spans_from_request
from tabadol.ops.query import (
    MAX_LIMIT,
    MAX_TAGS,
    parse_duration_ns,
    parse_status,
    parse_tags,
    trace_query,
    window_ns,
)
from tabadol.ops.sessions import COOKIE
from tabadol.ops.store import SqliteSpanStore, StoreFull, StoreLimits
from tabadol.ops.store.sqlite import _SCHEMA
from tabadol.pki import CertificateAuthority
from tests.support.ops import session_access

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


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteSpanStore]:
    s = SqliteSpanStore(tmp_path / "traces.db")
    yield s
    s.close()


def found(store: SqliteSpanStore, **query: Any) -> list[str]:
    """Trace ids a search returns, in the order returned."""
    summaries, _ = store.search(TraceQuery(**query))
    return [s.trace_id for s in summaries]


# -- SqliteSpanStore: services and operations ------------------------------------------------


def test_services_lists_every_service_once_in_name_order(store: SqliteSpanStore) -> None:
    store.add(exchange(1) + exchange(2, consumer="nocr"))
    assert store.services() == ["echo", "nocr", "post", BROKER]


def test_operations_are_the_distinct_name_and_kind_pairs_of_one_service(
    store: SqliteSpanStore,
) -> None:
    store.add(
        [
            make_span(1, 1, name="b.Op/Two", kind=SERVER),
            make_span(1, 2, name="a.Op/One", kind=CLIENT),
            make_span(2, 1, name="b.Op/Two", kind=SERVER),
            make_span(2, 2, service="echo", name="echo.Only/Here"),
        ]
    )
    assert store.operations(BROKER) == [("a.Op/One", CLIENT), ("b.Op/Two", SERVER)]
    assert store.operations("nobody") == []


# -- SqliteSpanStore: search -----------------------------------------------------------------


def test_search_by_service_finds_traces_with_any_span_of_that_service(
    store: SqliteSpanStore,
) -> None:
    store.add([*exchange(1), make_span(2, 1, service="other")])
    assert found(store, service="echo") == [tid(1)]
    assert found(store, service="other") == [tid(2)]
    assert found(store, service="absent") == []


def test_search_by_operation_needs_one_span_with_that_service_and_name(
    store: SqliteSpanStore,
) -> None:
    store.add(
        [
            make_span(1, 1, name="a.A/Call"),
            make_span(1, 2, parent=1, service="echo", name="b.B/Call"),
            make_span(2, 1, name="b.B/Call"),
        ]
    )
    assert sorted(found(store, operation="b.B/Call")) == [tid(1), tid(2)]
    assert found(store, service="echo", operation="b.B/Call") == [tid(1)]
    assert found(store, service="echo", operation="a.A/Call") == []


def test_search_by_tag_matches_the_exact_key_and_value(store: SqliteSpanStore) -> None:
    store.add(exchange(1, consumer="post") + exchange(2, consumer="nocr"))
    assert found(store, tags=(("tabadol.consumer", "post"),)) == [tid(1)]
    assert found(store, tags=(("tabadol.consumer", "cra"),)) == []


def test_search_by_bare_key_matches_the_platforms_tabadol_attribute(
    store: SqliteSpanStore,
) -> None:
    store.add(exchange(1, consumer="post") + exchange(2, consumer="nocr"))
    assert found(store, tags=(("consumer", "nocr"),)) == [tid(2)]


def test_search_by_tag_matches_non_string_attributes_by_their_text(
    store: SqliteSpanStore,
) -> None:
    store.add(
        [make_span(1, 1, attributes={"retries": 3, "ratio": 0.5, "cached": True, "ids": [1, 2]})]
    )
    assert found(store, tags=(("retries", "3"),)) == [tid(1)]
    assert found(store, tags=(("ratio", "0.5"),)) == [tid(1)]
    assert found(store, tags=(("cached", "true"),)) == [tid(1)]
    assert found(store, tags=(("ids", "[1, 2]"),)) == []  # lists are stored, not searchable


def test_search_by_several_tags_requires_all_of_them(store: SqliteSpanStore) -> None:
    store.add(
        [
            make_span(1, 1, attributes={"region": "north", "tier": "gold"}),
            make_span(2, 1, attributes={"region": "north", "tier": "silver"}),
            make_span(3, 1, attributes={"region": "south", "tier": "gold"}),
        ]
    )
    assert found(store, tags=(("region", "north"), ("tier", "gold"))) == [tid(1)]


def test_search_by_status_error_and_ok(store: SqliteSpanStore) -> None:
    store.add(exchange(1, start_ms=0) + exchange(2, start_ms=100, grpc_code=5))
    assert found(store, status="error") == [tid(2)]
    assert found(store, status="ok") == [tid(1)]


def test_search_by_grpc_code_name_uses_the_rpc_status_code_attribute(
    store: SqliteSpanStore,
) -> None:
    store.add(
        exchange(1, start_ms=0)
        + exchange(2, start_ms=100, grpc_code=5)
        + exchange(3, start_ms=200, grpc_code=7)
    )
    assert found(store, status="NOT_FOUND") == [tid(2)]
    assert found(store, status="PERMISSION_DENIED") == [tid(3)]
    assert found(store, status="UNAVAILABLE") == []


def test_error_status_is_searchable_as_the_error_tag(store: SqliteSpanStore) -> None:
    store.add(exchange(1) + exchange(2, start_ms=100, grpc_code=13))
    assert found(store, tags=(("error", "true"),)) == [tid(2)]


def test_min_duration_applies_to_the_whole_trace_not_single_spans(
    store: SqliteSpanStore,
) -> None:
    # Two 1 ms spans 500 ms apart: the trace lasts 501 ms though no span does.
    store.add(
        [
            make_span(1, 1, start_ms=0, duration_ms=1),
            make_span(1, 2, start_ms=500, duration_ms=1),
            make_span(2, 1, start_ms=0, duration_ms=100),
        ]
    )
    assert found(store, min_duration_ns=400 * MS) == [tid(1)]
    assert found(store, min_duration_ns=501 * MS) == [tid(1)]
    assert found(store, min_duration_ns=502 * MS) == []


def test_max_duration_applies_to_the_whole_trace_not_single_spans(
    store: SqliteSpanStore,
) -> None:
    store.add(
        [
            make_span(1, 1, start_ms=0, duration_ms=1),
            make_span(1, 2, start_ms=500, duration_ms=1),
            make_span(2, 1, start_ms=0, duration_ms=100),
        ]
    )
    assert found(store, max_duration_ns=200 * MS) == [tid(2)]
    assert sorted(found(store, min_duration_ns=50 * MS, max_duration_ns=501 * MS)) == [
        tid(1),
        tid(2),
    ]


def test_time_range_selects_traces_by_their_start(store: SqliteSpanStore) -> None:
    store.add([make_span(n, 1, start_ms=n * 1000, duration_ms=5000) for n in range(1, 6)])
    window = {"start_ns": T0 + 2000 * MS, "end_ns": T0 + 4000 * MS}
    assert found(store, **window) == [tid(4), tid(3), tid(2)]
    assert found(store, start_ns=T0 + 4500 * MS) == [tid(5)]
    assert found(store, end_ns=T0 + 1000 * MS) == [tid(1)]


def test_search_returns_newest_traces_first(store: SqliteSpanStore) -> None:
    store.add([make_span(2, 1, start_ms=200), make_span(3, 1, start_ms=300)])
    store.add([make_span(1, 1, start_ms=100), make_span(4, 1, start_ms=400)])
    assert found(store) == [tid(4), tid(3), tid(2), tid(1)]


def test_limit_and_offset_page_through_results_with_the_full_total(
    store: SqliteSpanStore,
) -> None:
    store.add([make_span(n, 1, start_ms=n) for n in range(1, 8)])
    pages = [store.search(TraceQuery(limit=3, offset=offset)) for offset in (0, 3, 6, 9)]
    assert [[s.trace_id for s in page] for page, _ in pages] == [
        [tid(7), tid(6), tid(5)],
        [tid(4), tid(3), tid(2)],
        [tid(1)],
        [],
    ]
    assert {total for _, total in pages} == {7}


def test_total_counts_only_matching_traces(store: SqliteSpanStore) -> None:
    store.add([make_span(n, 1, service="a" if n % 2 else "b", start_ms=n) for n in range(1, 8)])
    page, total = store.search(TraceQuery(service="a", limit=2))
    assert [s.trace_id for s in page] == [tid(7), tid(5)]
    assert total == 4


def test_the_same_span_added_twice_is_stored_once(store: SqliteSpanStore) -> None:
    spans = exchange(1, grpc_code=5)
    store.add(spans)
    store.add(spans)
    store.add([spans[0], spans[0]])
    [summary], total = store.search(TraceQuery())
    assert total == 1
    assert summary.span_count == 4
    assert summary.error_count == 2
    assert len(store.trace(tid(1))) == 4


def test_root_service_and_name_come_from_the_parentless_span_even_when_it_arrives_last(
    store: SqliteSpanStore,
) -> None:
    child, grandchild = (
        make_span(1, 2, parent=1, service="echo", name="child", start_ms=10),
        make_span(1, 3, parent=2, service="echo", name="grandchild", start_ms=20),
    )
    store.add([grandchild])
    store.add([child])
    store.add([make_span(1, 1, service="post", name="root", start_ms=30)])  # clock skew
    [summary], _ = store.search(TraceQuery())
    assert (summary.root_service, summary.root_name) == ("post", "root")


def test_the_earliest_span_stands_in_for_a_root_not_yet_received(
    store: SqliteSpanStore,
) -> None:
    store.add([make_span(1, 3, parent=2, service="echo", name="late", start_ms=20)])
    store.add([make_span(1, 2, parent=1, service=BROKER, name="early", start_ms=10)])
    [summary], _ = store.search(TraceQuery())
    assert (summary.root_service, summary.root_name) == (BROKER, "early")


def test_a_root_is_not_displaced_by_an_earlier_child(store: SqliteSpanStore) -> None:
    store.add([make_span(1, 1, service="post", name="root", start_ms=10)])
    store.add([make_span(1, 2, parent=1, service="echo", name="skewed", start_ms=0)])
    [summary], _ = store.search(TraceQuery())
    assert (summary.root_service, summary.root_name) == ("post", "root")


def test_spans_of_one_trace_in_several_batches_merge_into_one_trace(
    store: SqliteSpanStore,
) -> None:
    store.add([make_span(1, 2, parent=1, service="echo", start_ms=50, duration_ms=20)])
    store.add(
        [
            make_span(1, 3, parent=1, start_ms=60, duration_ms=100, status=STATUS_ERROR),
            make_span(2, 1, start_ms=1000),
        ]
    )
    store.add([make_span(1, 1, service="post", start_ms=40, duration_ms=30, status=STATUS_ERROR)])
    summaries, total = store.search(TraceQuery(service="post"))
    assert total == 1
    [summary] = summaries
    assert summary.trace_id == tid(1)
    assert summary.start_ns == T0 + 40 * MS
    assert summary.end_ns == T0 + 160 * MS
    assert summary.duration_ns == 120 * MS
    assert summary.span_count == 3
    assert summary.error_count == 2
    assert summary.services == ("echo", "post", BROKER)


def test_trace_returns_its_spans_in_start_order_with_everything_round_tripped(
    store: SqliteSpanStore,
) -> None:
    attributes = {
        "text": "نص",
        "count": 42,
        "ratio": 0.25,
        "flag": False,
        "list": ["a", 1, True],
        "big": 2**62,
    }
    events = (
        SpanEvent(T0 + 5 * MS, "message", {"message.type": "SENT", "message.id": 1}),
        SpanEvent(T0 + 6 * MS, "exception", {}),
    )
    resource = {"service.name": "echo", "service.instance.id": "i-1", "host.cpus": 8}
    root = make_span(7, 1, start_ms=0, duration_ms=10, status=STATUS_OK)
    child = make_span(
        7,
        2,
        parent=1,
        service="echo",
        start_ms=4,
        duration_ms=3,
        status=STATUS_ERROR,
        message="boom",
        attributes=attributes,
        events=events,
        resource=resource,
    )
    late = make_span(7, 3, parent=1, start_ms=8)
    store.add([late, child])
    store.add([root])
    assert store.trace(tid(7)) == [root, child, late]
    [got] = [s for s in store.trace(tid(7)) if s.span_id == sid(2)]
    assert type(got.attributes["count"]) is int
    assert type(got.attributes["ratio"]) is float
    assert type(got.attributes["flag"]) is bool


def test_trace_is_found_by_upper_case_id_and_unknown_ids_give_no_spans(
    store: SqliteSpanStore,
) -> None:
    store.add([make_span(0xABC, 1)])
    assert len(store.trace(tid(0xABC).upper())) == 1
    assert store.trace(tid(0xDEF)) == []


# -- SqliteSpanStore: dependencies and agency calls ------------------------------------------


def test_dependencies_are_cross_service_parent_child_edges_with_calls_and_errors(
    store: SqliteSpanStore,
) -> None:
    store.add(exchange(1, start_ms=0) + exchange(2, start_ms=100, grpc_code=14))
    store.add(exchange(3, consumer="nocr", start_ms=200))
    edges = store.dependencies(T0, T0 + HOUR_MS * MS)
    assert edges == [
        Edge("nocr", BROKER, 1, 0),
        Edge("post", BROKER, 2, 1),
        Edge(BROKER, "echo", 3, 1),
    ]
    assert not [e for e in edges if e.parent == e.child]  # broker server -> broker client


def test_dependencies_count_only_calls_starting_in_the_window(store: SqliteSpanStore) -> None:
    store.add(exchange(1, start_ms=0) + exchange(2, start_ms=10_000))
    assert store.dependencies(T0 + 5_000 * MS, T0 + 20_000 * MS) == [
        Edge("post", BROKER, 1, 0),
        Edge(BROKER, "echo", 1, 0),
    ]
    assert store.dependencies(T0 + 30_000 * MS, T0 + 40_000 * MS) == []


def test_agency_calls_count_broker_server_spans_by_consumer_and_provider(
    store: SqliteSpanStore,
) -> None:
    store.add(
        exchange(1, start_ms=0)
        + exchange(2, start_ms=10, grpc_code=7)
        + exchange(3, start_ms=20)
        + exchange(4, consumer="nocr", start_ms=30)
    )
    # A client span carrying the same attributes is not a call received by the broker.
    store.add(
        [
            make_span(
                5,
                1,
                kind=CLIENT,
                start_ms=40,
                attributes={"tabadol.consumer": "post", "tabadol.provider": "echo"},
            )
        ]
    )
    assert store.agency_calls(T0, T0 + HOUR_MS * MS) == [
        Edge("nocr", "echo", 1, 0),
        Edge("post", "echo", 3, 1),
    ]
    assert store.agency_calls(T0 + 15 * MS, T0 + HOUR_MS * MS) == [
        Edge("nocr", "echo", 1, 0),
        Edge("post", "echo", 1, 0),
    ]


# -- SqliteSpanStore: retention --------------------------------------------------------------


def test_retention_by_age_removes_traces_that_ended_before_the_cutoff(tmp_path: Path) -> None:
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_age_seconds=3600))
    now_ns = T0 + 10 * HOUR_MS * MS
    old = [
        make_span(1, 1, start_ms=0, duration_ms=1000, attributes={"batch": "old"}),
        make_span(1, 2, parent=1, service="echo", start_ms=10, attributes={"batch": "old"}),
    ]
    # Started long ago but ended within the hour: its end decides.
    long_running = make_span(2, 1, start_ms=0, duration_ms=9 * HOUR_MS + 30 * 60_000)
    recent = make_span(3, 1, start_ms=9 * HOUR_MS + 50 * 60_000, attributes={"batch": "new"})
    store.add([*old, long_running, recent])
    assert store.dependencies(T0, now_ns) == [Edge(BROKER, "echo", 1, 0)]

    assert store.enforce_retention(now_ns) == 1

    assert found(store) == [tid(3), tid(2)]
    assert store.trace(tid(1)) == []
    assert found(store, tags=(("batch", "old"),)) == []
    assert found(store, tags=(("batch", "new"),)) == [tid(3)]
    assert store.dependencies(T0, now_ns) == []
    assert store.enforce_retention(now_ns) == 0
    store.close()


def test_retention_by_size_removes_the_oldest_traces_until_under_the_limit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "traces.db"
    filling = SqliteSpanStore(path)
    count = 300
    for n in range(count):  # one sender (the broker): its earliest received go first
        filling.add(
            [
                make_span(
                    n + 1, 1, start_ms=n * 1000, attributes={"payload": f"{n:04d}" + "x" * 200}
                ),
                make_span(n + 1, 2, parent=1, kind=CLIENT, start_ms=n * 1000 + 1),
            ]
        )
    full = filling.used_bytes()
    filling.close()

    limit = full // 2
    store = SqliteSpanStore(path, StoreLimits(max_age_seconds=10**9, max_bytes=limit))
    removed = store.enforce_retention(T0 + count * 1000 * MS)

    assert store.used_bytes() <= limit
    assert 0 < removed < count
    _, total = store.search(TraceQuery())
    assert total == count - removed
    kept, _ = store.search(TraceQuery(limit=MAX_LIMIT))
    assert [s.trace_id for s in kept] == [tid(n) for n in range(count, removed, -1)]
    assert found(store, tags=(("payload", "0000" + "x" * 200),)) == []
    assert found(store, tags=(("payload", f"{count - 1:04d}" + "x" * 200),)) == [tid(count)]
    store.close()


def test_retention_removes_nothing_within_the_limits(store: SqliteSpanStore) -> None:
    store.add(exchange(1))
    assert store.enforce_retention(T0 + HOUR_MS * MS) == 0
    assert found(store) == [tid(1)]


def test_agency_calls_count_only_spans_stamped_as_the_brokers(store: SqliteSpanStore) -> None:
    # Finding 5: an agency's forged broker-like spans drew edges between other agencies.
    forged = {"tabadol.consumer": "tax", "tabadol.provider": "cra", "rpc.grpc.status_code": 13}
    for n, sender in enumerate(
        [
            "spiffe://tabadol.example/agency/post",
            "spiffe://tabadol.example/agency/broker",  # an agency whose id is "broker"
            "",
        ]
    ):
        store.add(
            [
                make_span(
                    10 + n,
                    1,
                    status=STATUS_ERROR,
                    attributes=forged,
                    resource={"service.name": BROKER, "tabadol.sender": sender},
                )
            ]
        )
    store.add(exchange(1))
    assert store.agency_calls(T0, T0 + HOUR_MS * MS) == [Edge("post", "echo", 1, 0)]


def _filler(trace: int, start_ms: int, size: int = 2000) -> list[SpanRecord]:
    return [make_span(trace, 1, start_ms=start_ms, attributes={"payload": "x" * size})]


def test_size_retention_evicts_the_earliest_received_even_if_dated_in_the_future(
    tmp_path: Path,
) -> None:
    # Finding 5: future-dated forgeries outlived real traces, which were deleted first.
    path = tmp_path / "traces.db"
    filling = SqliteSpanStore(path)
    for n in range(100):
        filling.add(_filler(1000 + n, start_ms=100 * 365 * 24 * HOUR_MS))  # a century ahead
    for n in range(100):
        filling.add(_filler(n + 1, start_ms=n))
    full = filling.used_bytes()
    filling.close()

    store = SqliteSpanStore(path, StoreLimits(max_age_seconds=10**12, max_bytes=full // 2))
    assert store.enforce_retention(T0) > 0

    kept = {s.trace_id for s in store.search(TraceQuery(limit=MAX_LIMIT))[0]}
    assert tid(100) in kept
    assert not kept & {tid(1000 + n) for n in range(100)}
    store.close()


def test_retention_by_age_removes_future_dated_traces_once_received_long_enough_ago(
    tmp_path: Path,
) -> None:
    clock = [T0]
    store = SqliteSpanStore(
        tmp_path / "traces.db", StoreLimits(max_age_seconds=3600), clock=lambda: clock[0]
    )
    store.add(_filler(1, start_ms=100 * 365 * 24 * HOUR_MS))
    store.add(_filler(2, start_ms=0))
    assert store.enforce_retention(T0 + 30 * 60_000 * MS) == 0

    assert store.enforce_retention(T0 + 2 * HOUR_MS * MS) == 2
    assert found(store) == []
    store.close()


def test_the_size_cap_holds_at_every_add_without_retention_running(tmp_path: Path) -> None:
    # Finding 5: a 1 MB cap reached 57 MB, as it was applied only every 60 s.
    cap = 1024 * 1024
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_bytes=cap))
    for n in range(60):
        store.add(
            [make_span(n + 1, s, start_ms=n, attributes={"p": "y" * 4000}) for s in range(1, 26)]
        )
        assert store.used_bytes() <= cap
    assert (tmp_path / "traces.db").stat().st_size <= 2 * cap
    kept = [s.trace_id for s in store.search(TraceQuery(limit=MAX_LIMIT))[0]]
    assert kept[0] == tid(60)  # the newest stays; the earliest received went
    assert tid(1) not in kept
    assert len(store.trace(tid(60))) == 25
    store.close()


def test_a_batch_too_large_for_the_cap_is_refused_and_nothing_already_stored_is_lost(
    tmp_path: Path,
) -> None:
    cap = 256 * 1024
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_bytes=cap))
    store.add(exchange(1))
    huge = [make_span(2, s, start_ms=s, attributes={"p": "z" * 4000}) for s in range(1, 200)]
    with pytest.raises(StoreFull, match="size cap of 262144 bytes"):
        store.add(huge)
    assert found(store) == [tid(1)]
    assert len(store.trace(tid(1))) == 4
    store.close()


def test_a_store_written_before_receipt_order_was_kept_is_upgraded_in_place(
    tmp_path: Path,
) -> None:
    path = tmp_path / "traces.db"
    old = sqlite3.connect(path)
    old.executescript(
        _SCHEMA.replace(
            ",\n    received_ns INTEGER NOT NULL DEFAULT 0  -- first received; retention evicts by this",
            "",
        )
    )
    old.execute("INSERT INTO traces VALUES (?,?,?,1,0,?,?,1)", (tid(1), T0, T0 + MS, BROKER, "old"))
    old.commit()
    old.close()

    store = SqliteSpanStore(path, clock=lambda: T0 + HOUR_MS * MS)
    store.add(exchange(2, start_ms=5))
    assert found(store) == [tid(2), tid(1)]
    assert store.enforce_retention(T0 + 7 * 24 * HOUR_MS * MS + 2 * MS) == 1
    assert found(store) == [tid(2)]
    store.close()


AGENCY = "spiffe://tabadol.example/agency/{}"


def _sent_by(agency: str, trace: int, span: int, size: int, **fields: Any) -> SpanRecord:
    """A span an agency's certificate exported, as the collector stamps it."""
    return make_span(
        trace, span, service=agency, attributes={"p": "x" * size},
        resource={"service.name": agency, "tabadol.sender": AGENCY.format(agency)}, **fields,
    )  # fmt: skip


def test_size_eviction_takes_from_the_agency_holding_the_most_not_the_broker(
    tmp_path: Path,
) -> None:
    # Review of issue 10: an agency's junk pushed out the broker's spans (and with them the
    # evidence of its own calls), as eviction took the earliest received from anyone.
    cap = 512 * 1024
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_bytes=cap))
    store.add(exchange(1, consumer="post"))  # post's own call, first received
    store.add([_sent_by("tax", 2, 1, 2000), _sent_by("tax", 3, 1, 2000)])
    for n in range(200):  # ~1.6 MB from post, three times the cap
        store.add([_sent_by("post", 100 + n, 1, 8000)])
        assert store.used_bytes() <= cap
    assert [s.service for s in store.trace(tid(1)) if s.service == BROKER] == [BROKER] * 2
    assert found(store, party="post") == [tid(1)]
    assert len(store.trace(tid(2))) == len(store.trace(tid(3))) == 1  # tax: under its share
    assert store.trace(tid(100)) == []  # post's own earliest went
    assert store.trace(tid(299))
    usage = store.usage()
    assert usage[AGENCY.format("post")] <= cap
    store.close()


def test_the_broker_is_evicted_only_when_no_agency_holds_more_than_a_fair_share(
    tmp_path: Path,
) -> None:
    cap = 256 * 1024
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_bytes=cap))
    store.add([_sent_by("tax", 1, 1, 500)])
    for n in range(300):  # the broker alone fills the store, beyond its cap
        store.add([make_span(100 + n, 1, attributes={"p": "b" * 2000})])
        assert store.used_bytes() <= cap
    # Nobody else held more than a fair share: the broker's own earliest went, tax's stayed.
    assert store.trace(tid(100)) == []
    assert store.trace(tid(399))
    assert len(store.trace(tid(1))) == 1
    store.close()


def _brokers_spans_of(trace: int, consumer: str) -> list[SpanRecord]:
    """The broker's two spans of a call, about as large as an agency's span of it."""
    return [
        dataclasses.replace(s, attributes={**s.attributes, "p": "b" * 2000})
        for s in exchange(trace, consumer=consumer)
        if s.service == BROKER
    ]


def test_an_agency_flooding_below_a_fair_share_evicts_agencies_spans_never_the_brokers(
    tmp_path: Path,
) -> None:
    # Second review of issue 10: with the broker and four agencies, a flooder under a fifth
    # of the store held no more than a "fair share", so every eviction took the broker's
    # earliest spans: the index (trace_parties) of the other agencies' traces.
    cap = 512 * 1024
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_bytes=cap))
    honest = ("tax", "cra", "nocr")
    calls = 0
    while store.used_bytes() < cap * 65 // 100:  # the broker's evidence: most of the store
        calls += 1
        store.add(_brokers_spans_of(calls, honest[calls % 3]))
    evidence = store.usage()[BROKER_SENDER]
    for n, agency in enumerate(honest):  # each well under a fifth
        store.add([_sent_by(agency, 10_000 + 10 * n + k, 1, 4000) for k in range(8)])
    for n in range(120):  # post floods in small batches, ~1 MB in all
        store.add([_sent_by("post", 20_000 + n, 1, 8000)])
        assert store.used_bytes() <= cap
    held = store.usage()
    # Every call the broker saw is still there, and still names its parties.
    assert held[BROKER_SENDER] == evidence
    assert held[AGENCY.format("post")] < sum(held.values()) / len(held)  # below a fair share
    assert store.search(TraceQuery(party="echo"))[1] == calls
    for k, agency in enumerate(honest):
        assert store.search(TraceQuery(party=agency))[1] == sum(
            n % 3 == k for n in range(1, calls + 1)
        )
        assert all(store.trace(tid(10_000 + 10 * k + n)) for n in range(8))
    # The flooder lost its own earliest spans, and only those.
    assert store.trace(tid(20_000)) == []
    assert store.trace(tid(20_119))
    store.close()


def test_an_agency_batch_that_only_the_brokers_spans_could_make_room_for_is_refused(
    tmp_path: Path,
) -> None:
    cap = 256 * 1024
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_bytes=cap))
    calls = 0
    while store.used_bytes() < cap * 9 // 10:
        calls += 1
        store.add(_brokers_spans_of(calls, "tax"))
    evidence = store.usage()
    with pytest.raises(StoreFull, match="without evicting the broker's spans"):
        store.add([_sent_by("post", 900 + k, 1, 8000) for k in range(8)])
    assert store.usage() == evidence
    assert store.search(TraceQuery(party="tax"))[1] == calls
    # The broker's own spans still make room for themselves, earliest first.
    for n in range(calls + 1, calls + 40):
        store.add(_brokers_spans_of(n, "tax"))
        assert store.used_bytes() <= cap
    assert store.trace(tid(1)) == []
    store.close()


def test_a_flooder_that_joins_a_trace_loses_only_its_own_spans_of_it(tmp_path: Path) -> None:
    # An agency knows the ids of traces it took part in and can add spans to them; eviction
    # of its spans leaves the broker's, the trace's summary and who may see it.
    cap = 256 * 1024
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_bytes=cap))
    store.add(exchange(1, consumer="tax", start_ms=5))
    store.add([_sent_by("post", 1, 9, 4000, start_ms=0, status=STATUS_ERROR)])
    assert store.search(TraceQuery())[0][0].span_count == 5
    for n in range(100):
        store.add([_sent_by("post", 100 + n, 1, 8000)])
    kept = store.trace(tid(1))
    assert {s.service for s in kept} == {BROKER, "tax", "echo"}
    [summary] = [t for t in store.search(TraceQuery(limit=MAX_LIMIT))[0] if t.trace_id == tid(1)]
    assert (summary.span_count, summary.error_count, summary.root_service) == (4, 0, "tax")
    assert summary.start_ns == T0 + 5 * MS
    assert found(store, party="tax") == [tid(1)]
    store.close()


def test_an_agency_search_is_a_store_query_over_the_brokers_parties(tmp_path: Path) -> None:
    # Review of issue 10: 4200 decoys naming tax, from another sender, hid tax's own traces:
    # candidates came from any span's tags, the newest 2000 of them at most.
    store = SqliteSpanStore(tmp_path / "traces.db")
    store.add(exchange(1, consumer="tax", start_ms=0))
    decoys = [
        _sent_by("post", 1000 + n, 1, 10, start_ms=60_000 + n)
        for n in range(4200)
    ]  # fmt: skip
    decoys = [
        dataclasses.replace(d, attributes={"tabadol.consumer": "tax", "tabadol.provider": "tax"})
        for d in decoys
    ]
    # Even one named tabadol-broker, if the broker did not send it, names no party.
    decoys.append(dataclasses.replace(decoys[0], trace_id=tid(9), service=BROKER))
    store.add(decoys)
    assert found(store, party="tax") == [tid(1)]
    assert store.search(TraceQuery(party="tax"))[1] == 1
    assert found(store, party="echo") == [tid(1)]  # the provider is a party too
    assert found(store, party="post") == []
    # Exact paging and totals, however far back.
    for n in range(2, 30):
        store.add(exchange(n, consumer="tax", start_ms=n))
    page, total = store.search(TraceQuery(party="tax", limit=5, offset=25))
    assert total == 29
    assert [s.trace_id for s in page] == [tid(4), tid(3), tid(2), tid(1)]
    assert store.services(party="tax") == ["echo", BROKER, "tax"]
    assert store.operations("post", party="tax") == []
    store.close()


_SCHEMA_V1 = """
CREATE TABLE spans (trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_span_id TEXT NOT NULL,
    service TEXT NOT NULL, name TEXT NOT NULL, kind INTEGER NOT NULL, start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL, status_code INTEGER NOT NULL, status_message TEXT NOT NULL,
    attributes TEXT NOT NULL, events TEXT NOT NULL, resource TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)) WITHOUT ROWID;
CREATE TABLE traces (trace_id TEXT PRIMARY KEY, start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL, span_count INTEGER NOT NULL, error_count INTEGER NOT NULL,
    root_service TEXT NOT NULL, root_name TEXT NOT NULL, has_root INTEGER NOT NULL,
    received_ns INTEGER NOT NULL DEFAULT 0);
CREATE TABLE span_tags (trace_id TEXT NOT NULL, span_id TEXT NOT NULL, key TEXT NOT NULL,
    value TEXT NOT NULL, service TEXT NOT NULL);
"""


def test_a_store_written_before_senders_and_parties_were_kept_is_indexed_in_place(
    tmp_path: Path,
) -> None:
    path = tmp_path / "traces.db"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA_V1)
    for span in exchange(1, consumer="tax"):
        old.execute(
            "INSERT INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (span.trace_id, span.span_id, span.parent_span_id, span.service, span.name,
             span.kind, span.start_ns, span.end_ns, span.status_code, span.status_message,
             json.dumps(span.attributes), "[]", json.dumps(span.resource)),
        )  # fmt: skip
    old.execute("INSERT INTO traces VALUES (?,?,?,4,0,?,?,1,?)", (tid(1), T0, T0, "tax", "x", T0))
    old.commit()
    old.close()

    store = SqliteSpanStore(path)
    assert found(store, party="tax") == [tid(1)]
    assert set(store.usage()) == {BROKER_SENDER, ""}
    store.close()


# -- query.py --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("250ns", 250),
        ("300us", 300_000),
        ("300µs", 300_000),
        ("250ms", 250_000_000),
        ("2s", 2_000_000_000),
        ("1.5s", 1_500_000_000),
        ("0.5ms", 500_000),
        ("1.005s", 1_005_000_000),
        ("3m", 180_000_000_000),
        ("2h", 7_200_000_000_000),
        ("1d", 86_400_000_000_000),
        (" 10 ms ", 10_000_000),
        ("0s", 0),
    ],
)
def test_parse_duration_reads_go_style_durations(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["abc", "10", "-1s", "1x", "", "1h30m", "ms", "1.s"])
def test_parse_duration_refuses_what_is_not_one_number_and_unit(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration_ns(text)


def test_parse_tags_reads_a_json_object_with_non_string_values_as_text() -> None:
    assert parse_tags(['{"consumer": "post", "code": 5, "error": true, "r": 0.5}']) == (
        ("consumer", "post"),
        ("code", "5"),
        ("error", "true"),
        ("r", "0.5"),
    )


def test_parse_tags_reads_key_colon_value_and_key_equals_value() -> None:
    assert parse_tags(["consumer:post", " provider = echo ", "url:http://x", "a=b:c", ""]) == (
        ("consumer", "post"),
        ("provider", "echo"),
        ("url", "http://x"),
        ("a=b", "c"),
    )


def test_parse_tags_refuses_bad_json() -> None:
    with pytest.raises(ValueError, match="tags is not a JSON object"):
        parse_tags(['{"consumer": '])


def test_parse_tags_refuses_json_with_trailing_text() -> None:
    with pytest.raises(ValueError, match="tags is not a JSON object"):
        parse_tags(['{"a": "1"} extra'])


@pytest.mark.parametrize("value", ['[{"consumer": "post"}]', '["consumer", "post"]'])
def test_parse_tags_refuses_json_that_is_not_an_object(value: str) -> None:
    with pytest.raises(ValueError, match="tags must be a JSON object"):
        parse_tags([value])


@pytest.mark.parametrize("value", ["consumer", ":post", "=post"])
def test_parse_tags_refuses_a_tag_without_key_and_value(value: str) -> None:
    with pytest.raises(ValueError, match="is not key:value"):
        parse_tags([value])


def test_parse_tags_refuses_more_filters_than_a_search_may_hold() -> None:
    # Review of issue 10: 1000 tag filters overflowed SQLite's expression tree (a 500).
    assert len(parse_tags([f"k{n}:v" for n in range(MAX_TAGS)])) == MAX_TAGS
    with pytest.raises(ValueError, match=f"tags: at most {MAX_TAGS}"):
        parse_tags([f"k{n}:v" for n in range(MAX_TAGS + 1)])
    with pytest.raises(ValueError, match=f"tags: at most {MAX_TAGS}"):
        parse_tags([json.dumps({f"k{n}": "v" for n in range(1000)})])


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("ok", "ok"),
        ("OK", "ok"),
        ("error", "error"),
        (" Error ", "error"),
        ("not_found", "NOT_FOUND"),
        ("Permission_Denied", "PERMISSION_DENIED"),
        ("UNAVAILABLE", "UNAVAILABLE"),
        ("", None),
        (None, None),
    ],
)
def test_parse_status_reads_ok_error_and_grpc_code_names(
    text: str | None, status: str | None
) -> None:
    assert parse_status(text) == status


def test_parse_status_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="'broken' is not ok, error or a gRPC code name"):
        parse_status("broken")


NOW = T0 + 5 * HOUR_MS * MS


def test_trace_query_converts_jaeger_microseconds_to_nanoseconds() -> None:
    query = trace_query(
        {"start": [str((T0 + 1) // 1000)], "end": [str(NOW // 1000)], "lookback": ["1h"]}, NOW
    )
    assert query.start_ns == T0
    assert query.end_ns == NOW


def test_trace_query_lookback_counts_back_from_end_or_from_now() -> None:
    end_us = (T0 + HOUR_MS * MS) // 1000
    from_end = trace_query({"end": [str(end_us)], "lookback": ["30m"]}, NOW)
    assert from_end.start_ns == T0 + 30 * 60_000 * MS
    from_now = trace_query({"lookback": ["2h"]}, NOW)
    assert (from_now.start_ns, from_now.end_ns) == (NOW - 2 * HOUR_MS * MS, None)
    custom = trace_query({"lookback": ["custom"]}, NOW)
    assert custom.start_ns is None


def test_trace_query_reads_every_filter() -> None:
    query = trace_query(
        {
            "service": ["ignored", BROKER],  # the last value wins
            "operation": ["echo.Echo/Unary"],
            "tags": ['{"consumer": "post"}'],
            "tag": ["provider:echo"],
            "minDuration": ["10ms"],
            "maxDuration": ["1.5s"],
            "status": ["not_found"],
            "limit": ["50"],
            "offset": ["100"],
        },
        NOW,
    )
    assert query == TraceQuery(
        service=BROKER,
        operation="echo.Echo/Unary",
        tags=(("consumer", "post"), ("provider", "echo")),
        min_duration_ns=10 * MS,
        max_duration_ns=1_500 * MS,
        status="NOT_FOUND",
        limit=50,
        offset=100,
    )


def test_trace_query_defaults_to_the_first_twenty_of_everything() -> None:
    empty = {"service": [""], "operation": [""], "minDuration": [""], "limit": [""]}
    assert trace_query(empty, NOW) == TraceQuery()
    assert trace_query({}, NOW) == TraceQuery(limit=20, offset=0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": ["0"]}, f"limit must be 1-{MAX_LIMIT} and offset at least 0"),
        ({"limit": [str(MAX_LIMIT + 1)]}, f"limit must be 1-{MAX_LIMIT}"),
        ({"offset": ["-1"]}, "offset at least 0"),
        ({"limit": ["ten"]}, "limit and offset must be whole numbers"),
        ({"offset": ["1.5"]}, "limit and offset must be whole numbers"),
        ({"start": ["yesterday"]}, "start must be microseconds since the epoch, got 'yesterday'"),
        ({"end": ["1.5"]}, "end must be microseconds"),
        ({"minDuration": ["abc"]}, "'abc' is not a duration"),
        ({"lookback": ["1week"]}, "'1week' is not a duration"),
        ({"status": ["meh"]}, "'meh' is not ok, error"),
        ({"tag": ["consumer"]}, "'consumer' is not key:value"),
    ],
)
def test_trace_query_refuses_bad_parameters_naming_them(
    params: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(ValueError) as refused:
        trace_query(params, NOW)
    assert message in str(refused.value)


def test_trace_query_accepts_the_limit_bounds() -> None:
    assert trace_query({"limit": ["1"]}, NOW).limit == 1
    assert trace_query({"limit": [str(MAX_LIMIT)], "offset": ["0"]}, NOW).limit == MAX_LIMIT


def test_window_is_end_ts_minus_lookback_in_milliseconds() -> None:
    end_ms = T0 // MS + 1000
    assert window_ns({"endTs": [str(end_ms)], "lookback": ["60000"]}, NOW, 5) == (
        (end_ms - 60_000) * MS,
        end_ms * MS,
    )


def test_window_defaults_to_now_and_the_default_lookback() -> None:
    assert window_ns({}, NOW, 3_000) == (NOW - 3_000 * MS, NOW)
    assert window_ns({"endTs": [""], "lookback": [""]}, NOW, 3_000) == (NOW - 3_000 * MS, NOW)


@pytest.mark.parametrize("name", ["endTs", "lookback"])
def test_window_refuses_non_numeric_milliseconds(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be milliseconds, got '1h'"):
        window_ns({name: ["1h"]}, NOW, 3_000)


# -- jaeger.py -------------------------------------------------------------------------------


def jaeger_trace() -> list[SpanRecord]:
    broker_a = {"service.name": BROKER, "service.instance.id": "a", "host.name": "h1"}
    broker_b = {"service.name": BROKER, "service.instance.id": "b"}
    return [
        make_span(
            9,
            1,
            start_ms=0,
            duration_ms=10,
            status=STATUS_ERROR,
            message="deadline exceeded",
            attributes={"s": "x", "i": 3, "f": 1.5, "b": True, "l": [1, 2]},
            events=(SpanEvent(T0 + 2 * MS + 500, "retry", {"attempt": 2}),),
            resource=broker_a,
        ),
        make_span(9, 2, parent=1, kind=CLIENT, start_ms=1, status=STATUS_OK, resource=broker_a),
        make_span(9, 3, parent=2, service="echo", kind=INTERNAL, start_ms=2),
        make_span(9, 4, parent=99, kind=SERVER, start_ms=3, resource=broker_b),
    ]


def test_trace_json_links_children_to_parents_with_child_of_references() -> None:
    out = jaeger.trace_json(jaeger_trace())
    assert out["traceID"] == tid(9)
    assert out["warnings"] is None
    spans = {s["spanID"]: s for s in out["spans"]}
    assert spans[sid(1)]["references"] == []
    assert spans[sid(2)]["references"] == [
        {"refType": "CHILD_OF", "traceID": tid(9), "spanID": sid(1)}
    ]
    assert spans[sid(3)]["references"][0]["spanID"] == sid(2)
    assert spans[sid(1)]["operationName"] == "echo.Echo/Unary"


def test_trace_json_gives_times_in_microseconds() -> None:
    root = jaeger.trace_json(jaeger_trace())["spans"][0]
    assert root["startTime"] == T0 // 1000
    assert root["duration"] == 10_000


def test_trace_json_tags_carry_attributes_kind_and_error_status() -> None:
    spans = jaeger.trace_json(jaeger_trace())["spans"]
    assert spans[0]["tags"] == [
        {"key": "s", "type": "string", "value": "x"},
        {"key": "i", "type": "int64", "value": 3},
        {"key": "f", "type": "float64", "value": 1.5},
        {"key": "b", "type": "bool", "value": True},
        {"key": "l", "type": "string", "value": "[1, 2]"},
        {"key": "span.kind", "type": "string", "value": "server"},
        {"key": "otel.status_code", "type": "string", "value": "ERROR"},
        {"key": "error", "type": "bool", "value": True},
        {"key": "otel.status_description", "type": "string", "value": "deadline exceeded"},
    ]
    ok_tags = {t["key"]: t["value"] for t in spans[1]["tags"]}
    assert ok_tags == {"span.kind": "client", "otel.status_code": "OK"}
    assert spans[2]["tags"] == []  # internal, status unset


def test_trace_json_turns_events_into_logs() -> None:
    root = jaeger.trace_json(jaeger_trace())["spans"][0]
    assert root["logs"] == [
        {
            "timestamp": (T0 + 2 * MS + 500) // 1000,
            "fields": [
                {"key": "event", "type": "string", "value": "retry"},
                {"key": "attempt", "type": "int64", "value": 2},
            ],
        }
    ]


def test_trace_json_has_one_process_per_service_instance() -> None:
    out = jaeger.trace_json(jaeger_trace())
    assert [s["processID"] for s in out["spans"]] == ["p1", "p1", "p2", "p3"]
    assert out["processes"] == {
        "p1": {
            "serviceName": BROKER,
            "tags": [
                {"key": "service.instance.id", "type": "string", "value": "a"},
                {"key": "host.name", "type": "string", "value": "h1"},
            ],
        },
        "p2": {"serviceName": "echo", "tags": []},
        "p3": {
            "serviceName": BROKER,
            "tags": [{"key": "service.instance.id", "type": "string", "value": "b"}],
        },
    }


def test_trace_json_warns_about_a_span_whose_parent_was_not_received() -> None:
    spans = jaeger.trace_json(jaeger_trace())["spans"]
    assert [s["warnings"] for s in spans[:3]] == [None, None, None]
    assert spans[3]["warnings"] == [f"parent span {sid(99)} was not received"]
    assert spans[3]["references"][0]["spanID"] == sid(99)


def test_trace_json_of_no_spans_is_an_empty_trace() -> None:
    assert jaeger.trace_json([]) == {
        "traceID": "",
        "spans": [],
        "processes": {},
        "warnings": None,
    }


def test_envelope_and_error_envelope_have_jaegers_shape() -> None:
    assert jaeger.envelope(["a"], total=5, limit=1, offset=2) == {
        "data": ["a"],
        "total": 5,
        "limit": 1,
        "offset": 2,
        "errors": None,
    }
    assert jaeger.error_envelope(404, "trace x not found") == {
        "data": None,
        "total": 0,
        "limit": 0,
        "offset": 0,
        "errors": [{"code": 404, "msg": "trace x not found"}],
    }


def test_dependencies_json_lists_parent_child_and_call_count() -> None:
    edges = [Edge("post", BROKER, 3, 1), Edge(BROKER, "echo", 2)]
    assert jaeger.dependencies_json(edges) == [
        {"parent": "post", "child": BROKER, "callCount": 3},
        {"parent": BROKER, "child": "echo", "callCount": 2},
    ]


# -- otlp.py ---------------------------------------------------------------------------------


def kv(key: str, value: AnyValue) -> KeyValue:
    return KeyValue(key=key, value=value)


def text(value: str) -> AnyValue:
    return AnyValue(string_value=value)


TRACE_BYTES = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")


def otlp_request() -> ExportTraceServiceRequest:
    every_kind = [
        kv("s", text("post")),
        kv("b", AnyValue(bool_value=True)),
        kv("i", AnyValue(int_value=-7)),
        kv("d", AnyValue(double_value=2.5)),
        kv("raw", AnyValue(bytes_value=b"\x01\xff")),
        kv(
            "arr",
            AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), text("two")])),
        ),
        kv(
            "map",
            AnyValue(
                kvlist_value=KeyValueList(
                    values=[kv("k", text("v")), kv("n", AnyValue(double_value=0.5))]
                )
            ),
        ),
        kv("none", AnyValue()),
    ]
    server = Span(
        trace_id=TRACE_BYTES,
        span_id=bytes.fromhex("b7ad6b7169203331"),
        parent_span_id=bytes.fromhex("00f067aa0ba902b7"),
        name="echo.Echo/Unary",
        kind=Span.SpanKind.SPAN_KIND_SERVER,
        start_time_unix_nano=T0,
        end_time_unix_nano=T0 + 5 * MS,
        attributes=every_kind,
        events=[Span.Event(time_unix_nano=T0 + MS, name="sent", attributes=[kv("n", text("1"))])],
        status=Status(code=Status.StatusCode.STATUS_CODE_ERROR, message="not found"),
    )
    malformed = Span(trace_id=b"\x01" * 8, span_id=b"\x02" * 8, name="bad trace id")
    no_span_id = Span(trace_id=TRACE_BYTES, span_id=b"", name="no span id")
    internal = Span(
        trace_id=TRACE_BYTES,
        span_id=bytes.fromhex("1111111111111111"),
        parent_span_id=b"\x01\x02",  # not a span id: treated as a root
        name="route",
        kind=Span.SpanKind.SPAN_KIND_INTERNAL,
        start_time_unix_nano=T0 + MS,
        end_time_unix_nano=T0 + 2 * MS,
    )
    named = ResourceSpans(
        resource=Resource(
            attributes=[kv("service.name", text(BROKER)), kv("service.instance.id", text("i-1"))]
        ),
        scope_spans=[
            ScopeSpans(scope=InstrumentationScope(name="grpc"), spans=[server, malformed]),
            ScopeSpans(scope=InstrumentationScope(name="tabadol"), spans=[no_span_id, internal]),
        ],
    )
    anonymous = ResourceSpans(
        resource=Resource(attributes=[kv("host.name", text("h"))]),
        scope_spans=[
            ScopeSpans(
                spans=[
                    Span(
                        trace_id=TRACE_BYTES,
                        span_id=bytes.fromhex("2222222222222222"),
                        name="orphan",
                        start_time_unix_nano=T0,
                        end_time_unix_nano=T0,
                    )
                ]
            )
        ],
    )
    return ExportTraceServiceRequest(resource_spans=[named, anonymous])


def test_otlp_request_becomes_one_record_per_valid_span_across_scopes() -> None:
    records = spans_from_request(otlp_request())
    assert [r.name for r in records] == ["echo.Echo/Unary", "route", "orphan"]
    assert {r.trace_id for r in records} == {TRACE_BYTES.hex()}


def test_otlp_span_fields_become_a_span_record() -> None:
    server = spans_from_request(otlp_request())[0]
    assert server.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert server.span_id == "b7ad6b7169203331"
    assert server.parent_span_id == "00f067aa0ba902b7"
    assert server.service == BROKER
    assert server.resource == {"service.name": BROKER, "service.instance.id": "i-1"}
    assert server.kind == SERVER
    assert (server.start_ns, server.end_ns) == (T0, T0 + 5 * MS)
    assert (server.status_code, server.status_message) == (STATUS_ERROR, "not found")
    assert server.events == (SpanEvent(T0 + MS, "sent", {"n": "1"}),)


def test_otlp_attributes_of_every_value_kind_become_plain_python() -> None:
    server = spans_from_request(otlp_request())[0]
    assert server.attributes == {
        "s": "post",
        "b": True,
        "i": -7,
        "d": 2.5,
        "raw": "01ff",
        "arr": [1, "two"],
        "map": {"k": "v", "n": 0.5},
        "none": None,
    }


def test_otlp_span_with_a_malformed_parent_id_is_a_root() -> None:
    route = spans_from_request(otlp_request())[1]
    assert route.parent_span_id == ""
    assert route.kind == INTERNAL


def test_otlp_resource_without_service_name_is_unknown_service() -> None:
    orphan = spans_from_request(otlp_request())[2]
    assert orphan.service == "unknown_service"
    assert orphan.resource == {"host.name": "h"}


def test_otlp_records_round_trip_through_the_store(store: SqliteSpanStore) -> None:
    records = spans_from_request(otlp_request())
    store.add(records)
    assert sorted(store.trace(TRACE_BYTES.hex()), key=lambda s: s.span_id) == sorted(
        records, key=lambda s: s.span_id
    )


# -- app.py ----------------------------------------------------------------------------------

FIXED = T0 + HOUR_MS * MS  # the app's "now": every exchange below is within its last hour


@pytest.fixture
def client(store: SqliteSpanStore, pki: CertificateAuthority) -> Iterator[TestClient]:
    store.add(exchange(1, start_ms=10_000))
    store.add(exchange(2, start_ms=20_000, consumer="nocr", grpc_code=5))
    store.add(exchange(3, start_ms=30_000))
    store.add(exchange(4, start_ms=40_000, grpc_code=7))
    # As an operator: who may see what is tests/test_security_ops_console.py's subject.
    access, session = session_access(pki, "testserver")
    app = create_app(store, access, now_ns=lambda: FIXED)
    with TestClient(app, base_url="https://testserver", cookies={COOKIE: session}) as http:
        yield http


def get(client: TestClient, path: str, **params: Any) -> Any:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_api_services_lists_the_services(client: TestClient) -> None:
    body = get(client, "/api/services")
    assert body == {
        "data": ["echo", "nocr", "post", BROKER],
        "total": 4,
        "limit": 0,
        "offset": 0,
        "errors": None,
    }


def test_api_service_operations_lists_names_once(client: TestClient) -> None:
    body = get(client, f"/api/services/{BROKER}/operations")
    assert body["data"] == ["echo.Echo/Unary"]
    assert body["total"] == 1
    assert get(client, "/api/services/nobody/operations")["data"] == []


def test_api_operations_filters_by_span_kind(client: TestClient) -> None:
    every = get(client, "/api/operations", service=BROKER)["data"]
    assert sorted(every, key=lambda o: o["spanKind"]) == [
        {"name": "echo.Echo/Unary", "spanKind": "client"},
        {"name": "echo.Echo/Unary", "spanKind": "server"},
    ]
    body = get(client, "/api/operations", service=BROKER, spanKind="server")
    assert body["data"] == [{"name": "echo.Echo/Unary", "spanKind": "server"}]
    assert body["total"] == 1


def test_api_traces_finds_by_service_and_tags_newest_first(client: TestClient) -> None:
    body = get(client, "/api/traces", service=BROKER, tags=json.dumps({"consumer": "post"}))
    assert [t["traceID"] for t in body["data"]] == [tid(4), tid(3), tid(1)]
    assert (body["total"], body["limit"], body["offset"]) == (3, 20, 0)
    first = body["data"][0]
    assert len(first["spans"]) == 4
    assert {p["serviceName"] for p in first["processes"].values()} == {"post", BROKER, "echo"}


def test_api_traces_pages_with_limit_and_offset(client: TestClient) -> None:
    body = get(client, "/api/traces", limit=2, offset=1)
    assert [t["traceID"] for t in body["data"]] == [tid(3), tid(2)]
    assert (body["total"], body["limit"], body["offset"]) == (4, 2, 1)


def test_api_traces_lookback_is_relative_to_now(client: TestClient) -> None:
    # now is T0 + 1h; 59m 35s back reaches T0 + 25s, after traces 1 and 2 began.
    body = get(client, "/api/traces", lookback="3575s")
    assert [t["traceID"] for t in body["data"]] == [tid(4), tid(3)]


def test_api_trace_returns_one_trace_in_jaeger_shape(client: TestClient) -> None:
    body = get(client, f"/api/traces/{tid(2).upper()}")
    assert body["total"] == 1
    [trace] = body["data"]
    assert trace["traceID"] == tid(2)
    assert [s["spanID"] for s in trace["spans"]] == [sid(1), sid(2), sid(3), sid(4)]


def test_api_trace_unknown_is_404_with_an_error_envelope(client: TestClient) -> None:
    response = client.get(f"/api/traces/{tid(404)}")
    assert response.status_code == 404
    assert response.json() == jaeger.error_envelope(404, f"trace {tid(404)} not found")


def test_api_dependencies_uses_end_ts_and_lookback(client: TestClient) -> None:
    end_ms = FIXED // MS
    body = get(client, "/api/dependencies", endTs=end_ms, lookback=HOUR_MS)
    assert body["data"] == [
        {"parent": "nocr", "child": BROKER, "callCount": 1},
        {"parent": "post", "child": BROKER, "callCount": 3},
        {"parent": BROKER, "child": "echo", "callCount": 4},
    ]
    # A window that ends before the first exchange began has no edges.
    early = get(client, "/api/dependencies", endTs=T0 // MS + 5_000, lookback=HOUR_MS)
    assert early["data"] == []


def test_api_tabadol_search_returns_one_summary_per_trace(client: TestClient) -> None:
    body = get(client, "/api/tabadol/search", status="error")
    assert body["total"] == 2
    assert body["data"][0] == {
        "traceID": tid(4),
        "startTime": (T0 + 40_000 * MS) // 1000,
        "duration": 10_000,
        "spanCount": 4,
        "errorCount": 2,
        "rootService": "post",
        "rootOperation": "echo.Echo/Unary",
        "services": ["echo", "post", BROKER],
    }
    assert body["data"][1]["traceID"] == tid(2)
    not_found = get(client, "/api/tabadol/search", status="not_found")
    assert [s["traceID"] for s in not_found["data"]] == [tid(2)]


def test_api_tabadol_agencies_reports_calls_and_error_rates(client: TestClient) -> None:
    body = get(client, "/api/tabadol/agencies")
    assert body["data"] == [
        {
            "consumer": "nocr",
            "provider": "echo",
            "callCount": 1,
            "errorCount": 1,
            "errorRate": 1.0,
        },
        {
            "consumer": "post",
            "provider": "echo",
            "callCount": 3,
            "errorCount": 1,
            "errorRate": pytest.approx(1 / 3),
        },
    ]
    assert body["total"] == 2


@pytest.mark.parametrize(
    ("path", "params", "problem"),
    [
        ("/api/traces", {"minDuration": "abc"}, "'abc' is not a duration"),
        ("/api/traces", {"limit": "0"}, "limit must be 1-1500"),
        ("/api/traces", {"start": "yesterday"}, "start must be microseconds"),
        ("/api/traces", {"tags": "{not json"}, "tags is not a JSON object"),
        ("/api/tabadol/search", {"status": "meh"}, "status 'meh'"),
        ("/api/tabadol/search", {"offset": "-3"}, "offset at least 0"),
        ("/api/dependencies", {"endTs": "now"}, "endTs must be milliseconds"),
        ("/api/tabadol/agencies", {"lookback": "1h"}, "lookback must be milliseconds"),
    ],
)
def test_api_bad_parameter_is_400_naming_the_problem(
    client: TestClient, path: str, params: dict[str, str], problem: str
) -> None:
    response = client.get(path, params=params)
    assert response.status_code == 400
    body = response.json()
    assert body["data"] is None
    assert body["errors"][0]["code"] == 400
    assert problem in body["errors"][0]["msg"]
