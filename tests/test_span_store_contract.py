"""What every span store promises (base.py's SpanStore), run against each: in memory, SQLite
and PostgreSQL. Then what only PostgreSQL adds: several ops consoles on one database,
retention in batches beside ingest, and a database that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tabadol.errors import TabadolError
from tabadol.ops.model import STATUS_ERROR, STATUS_OK, Edge, SpanEvent, TraceQuery
from tabadol.ops.query import MAX_LIMIT
from tabadol.ops.server import OpsServer
from tabadol.ops.store import (
    MemorySpanStore,
    SpanStore,
    SqliteSpanStore,
    StoreFull,
    StoreLimits,
    StoreUnavailable,
    open_span_store,
)
from tabadol.ops.store.postgres import PostgresSpanStore
from tabadol.pki import CertificateAuthority
from tests.support.collector import export_stub, ops_trust
from tests.support.ops import operator_client
from tests.support.postgres import PostgresCluster
from tests.support.spans import (
    AGENCY,
    BROKER,
    BROKER_SENDER,
    CLIENT,
    HOUR_MS,
    MS,
    SERVER,
    T0,
    brokers_spans_of,
    exchange,
    filler,
    found,
    make_span,
    sent_by,
    sid,
    tid,
)

KINDS = ["memory", "sqlite", "postgres"]
PASSWORD = "s3cret-pw"


class OpenStore(Protocol):
    def __call__(
        self, limits: StoreLimits | None = None, *, clock: Callable[[], int] | None = None
    ) -> SpanStore: ...


@pytest.fixture(params=KINDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens a store of one kind: SQLite in one file, PostgreSQL in one fresh database."""
    kind: str = request.param
    url: str = request.getfixturevalue("postgres_url") if kind == "postgres" else ""
    opened: list[SpanStore] = []

    def open_(
        limits: StoreLimits | None = None, *, clock: Callable[[], int] | None = None
    ) -> SpanStore:
        options: dict[str, Any] = {} if clock is None else {"clock": clock}
        store: SpanStore
        if kind == "memory":
            store = MemorySpanStore(limits, **options)
        elif kind == "sqlite":
            store = SqliteSpanStore(tmp_path / "traces.db", limits, **options)
        else:
            store = PostgresSpanStore(url, limits, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: OpenStore) -> SpanStore:
    return open_store()


# -- services and operations ------------------------------------------------


def test_services_lists_every_service_once_in_name_order(store: SpanStore) -> None:
    store.add(exchange(1) + exchange(2, consumer="nocr"))
    assert store.services() == ["echo", "nocr", "post", BROKER]


def test_operations_are_the_distinct_name_and_kind_pairs_of_one_service(
    store: SpanStore,
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


# -- search -----------------------------------------------------------------


def test_search_by_service_finds_traces_with_any_span_of_that_service(
    store: SpanStore,
) -> None:
    store.add([*exchange(1), make_span(2, 1, service="other")])
    assert found(store, service="echo") == [tid(1)]
    assert found(store, service="other") == [tid(2)]
    assert found(store, service="absent") == []


def test_search_by_operation_needs_one_span_with_that_service_and_name(
    store: SpanStore,
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


def test_search_by_tag_matches_the_exact_key_and_value(store: SpanStore) -> None:
    store.add(exchange(1, consumer="post") + exchange(2, consumer="nocr"))
    assert found(store, tags=(("tabadol.consumer", "post"),)) == [tid(1)]
    assert found(store, tags=(("tabadol.consumer", "cra"),)) == []


def test_search_by_bare_key_matches_the_platforms_tabadol_attribute(
    store: SpanStore,
) -> None:
    store.add(exchange(1, consumer="post") + exchange(2, consumer="nocr"))
    assert found(store, tags=(("consumer", "nocr"),)) == [tid(2)]


def test_search_by_tag_matches_non_string_attributes_by_their_text(
    store: SpanStore,
) -> None:
    store.add(
        [make_span(1, 1, attributes={"retries": 3, "ratio": 0.5, "cached": True, "ids": [1, 2]})]
    )
    assert found(store, tags=(("retries", "3"),)) == [tid(1)]
    assert found(store, tags=(("ratio", "0.5"),)) == [tid(1)]
    assert found(store, tags=(("cached", "true"),)) == [tid(1)]
    assert found(store, tags=(("ids", "[1, 2]"),)) == []  # lists are stored, not searchable


def test_search_by_several_tags_requires_all_of_them(store: SpanStore) -> None:
    store.add(
        [
            make_span(1, 1, attributes={"region": "north", "tier": "gold"}),
            make_span(2, 1, attributes={"region": "north", "tier": "silver"}),
            make_span(3, 1, attributes={"region": "south", "tier": "gold"}),
        ]
    )
    assert found(store, tags=(("region", "north"), ("tier", "gold"))) == [tid(1)]


def test_search_by_status_error_and_ok(store: SpanStore) -> None:
    store.add(exchange(1, start_ms=0) + exchange(2, start_ms=100, grpc_code=5))
    assert found(store, status="error") == [tid(2)]
    assert found(store, status="ok") == [tid(1)]


def test_search_by_grpc_code_name_uses_the_rpc_status_code_attribute(
    store: SpanStore,
) -> None:
    store.add(
        exchange(1, start_ms=0)
        + exchange(2, start_ms=100, grpc_code=5)
        + exchange(3, start_ms=200, grpc_code=7)
    )
    assert found(store, status="NOT_FOUND") == [tid(2)]
    assert found(store, status="PERMISSION_DENIED") == [tid(3)]
    assert found(store, status="UNAVAILABLE") == []


def test_error_status_is_searchable_as_the_error_tag(store: SpanStore) -> None:
    store.add(exchange(1) + exchange(2, start_ms=100, grpc_code=13))
    assert found(store, tags=(("error", "true"),)) == [tid(2)]


def test_min_duration_applies_to_the_whole_trace_not_single_spans(
    store: SpanStore,
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
    store: SpanStore,
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


def test_time_range_selects_traces_by_their_start(store: SpanStore) -> None:
    store.add([make_span(n, 1, start_ms=n * 1000, duration_ms=5000) for n in range(1, 6)])
    window = {"start_ns": T0 + 2000 * MS, "end_ns": T0 + 4000 * MS}
    assert found(store, **window) == [tid(4), tid(3), tid(2)]
    assert found(store, start_ns=T0 + 4500 * MS) == [tid(5)]
    assert found(store, end_ns=T0 + 1000 * MS) == [tid(1)]


def test_search_returns_newest_traces_first(store: SpanStore) -> None:
    store.add([make_span(2, 1, start_ms=200), make_span(3, 1, start_ms=300)])
    store.add([make_span(1, 1, start_ms=100), make_span(4, 1, start_ms=400)])
    assert found(store) == [tid(4), tid(3), tid(2), tid(1)]


def test_limit_and_offset_page_through_results_with_the_full_total(
    store: SpanStore,
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


def test_total_counts_only_matching_traces(store: SpanStore) -> None:
    store.add([make_span(n, 1, service="a" if n % 2 else "b", start_ms=n) for n in range(1, 8)])
    page, total = store.search(TraceQuery(service="a", limit=2))
    assert [s.trace_id for s in page] == [tid(7), tid(5)]
    assert total == 4


def test_the_same_span_added_twice_is_stored_once(store: SpanStore) -> None:
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
    store: SpanStore,
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
    store: SpanStore,
) -> None:
    store.add([make_span(1, 3, parent=2, service="echo", name="late", start_ms=20)])
    store.add([make_span(1, 2, parent=1, service=BROKER, name="early", start_ms=10)])
    [summary], _ = store.search(TraceQuery())
    assert (summary.root_service, summary.root_name) == (BROKER, "early")


def test_a_root_is_not_displaced_by_an_earlier_child(store: SpanStore) -> None:
    store.add([make_span(1, 1, service="post", name="root", start_ms=10)])
    store.add([make_span(1, 2, parent=1, service="echo", name="skewed", start_ms=0)])
    [summary], _ = store.search(TraceQuery())
    assert (summary.root_service, summary.root_name) == ("post", "root")


def test_spans_of_one_trace_in_several_batches_merge_into_one_trace(
    store: SpanStore,
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
    store: SpanStore,
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
    store: SpanStore,
) -> None:
    store.add([make_span(0xABC, 1)])
    assert len(store.trace(tid(0xABC).upper())) == 1
    assert store.trace(tid(0xDEF)) == []


# -- dependencies and agency calls ------------------------------------------


def test_dependencies_are_cross_service_parent_child_edges_with_calls_and_errors(
    store: SpanStore,
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


def test_dependencies_count_only_calls_starting_in_the_window(store: SpanStore) -> None:
    store.add(exchange(1, start_ms=0) + exchange(2, start_ms=10_000))
    assert store.dependencies(T0 + 5_000 * MS, T0 + 20_000 * MS) == [
        Edge("post", BROKER, 1, 0),
        Edge(BROKER, "echo", 1, 0),
    ]
    assert store.dependencies(T0 + 30_000 * MS, T0 + 40_000 * MS) == []


def test_agency_calls_count_broker_server_spans_by_consumer_and_provider(
    store: SpanStore,
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


# -- retention --------------------------------------------------------------


def test_retention_by_age_removes_traces_that_ended_before_the_cutoff(
    open_store: OpenStore,
) -> None:
    store = open_store(StoreLimits(max_age_seconds=3600))
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


def test_retention_by_size_removes_the_oldest_traces_until_under_the_limit(
    open_store: OpenStore,
) -> None:
    store = open_store()
    count = 300
    for n in range(count):  # one sender (the broker): its earliest received go first
        store.add(
            [
                make_span(
                    n + 1, 1, start_ms=n * 1000, attributes={"payload": f"{n:04d}" + "x" * 200}
                ),
                make_span(n + 1, 2, parent=1, kind=CLIENT, start_ms=n * 1000 + 1),
            ]
        )
    full = store.used_bytes()

    limit = full // 2
    store.limits = StoreLimits(max_age_seconds=10**9, max_bytes=limit)
    removed = store.enforce_retention(T0 + count * 1000 * MS)

    assert store.used_bytes() <= limit
    assert 0 < removed < count
    _, total = store.search(TraceQuery())
    assert total == count - removed
    kept, _ = store.search(TraceQuery(limit=MAX_LIMIT))
    assert [s.trace_id for s in kept] == [tid(n) for n in range(count, removed, -1)]
    assert found(store, tags=(("payload", "0000" + "x" * 200),)) == []
    assert found(store, tags=(("payload", f"{count - 1:04d}" + "x" * 200),)) == [tid(count)]


def test_retention_removes_nothing_within_the_limits(store: SpanStore) -> None:
    store.add(exchange(1))
    assert store.enforce_retention(T0 + HOUR_MS * MS) == 0
    assert found(store) == [tid(1)]


def test_agency_calls_count_only_spans_stamped_as_the_brokers(store: SpanStore) -> None:
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


def test_size_retention_evicts_the_earliest_received_even_if_dated_in_the_future(
    open_store: OpenStore,
) -> None:
    # Finding 5: future-dated forgeries outlived real traces, which were deleted first.
    store = open_store()
    for n in range(100):
        store.add(filler(1000 + n, start_ms=100 * 365 * 24 * HOUR_MS))  # a century ahead
    for n in range(100):
        store.add(filler(n + 1, start_ms=n))
    full = store.used_bytes()

    store.limits = StoreLimits(max_age_seconds=10**12, max_bytes=full // 2)
    assert store.enforce_retention(T0) > 0

    kept = {s.trace_id for s in store.search(TraceQuery(limit=MAX_LIMIT))[0]}
    assert tid(100) in kept
    assert not kept & {tid(1000 + n) for n in range(100)}


def test_retention_by_age_removes_future_dated_traces_once_received_long_enough_ago(
    open_store: OpenStore,
) -> None:
    clock = [T0]
    store = open_store(StoreLimits(max_age_seconds=3600), clock=lambda: clock[0])
    store.add(filler(1, start_ms=100 * 365 * 24 * HOUR_MS))
    store.add(filler(2, start_ms=0))
    assert store.enforce_retention(T0 + 30 * 60_000 * MS) == 0

    assert store.enforce_retention(T0 + 2 * HOUR_MS * MS) == 2
    assert found(store) == []


def test_the_size_cap_holds_at_every_add_without_retention_running(open_store: OpenStore) -> None:
    # Finding 5: a 1 MB cap reached 57 MB, as it was applied only every 60 s.
    cap = 1024 * 1024
    store = open_store(StoreLimits(max_bytes=cap))
    for n in range(60):
        store.add(
            [make_span(n + 1, s, start_ms=n, attributes={"p": "y" * 4000}) for s in range(1, 26)]
        )
        assert store.used_bytes() <= cap
    kept = [s.trace_id for s in store.search(TraceQuery(limit=MAX_LIMIT))[0]]
    assert kept[0] == tid(60)  # the newest stays; the earliest received went
    assert tid(1) not in kept
    assert len(store.trace(tid(60))) == 25


def test_a_batch_too_large_for_the_cap_is_refused_and_nothing_already_stored_is_lost(
    open_store: OpenStore,
) -> None:
    cap = 256 * 1024
    store = open_store(StoreLimits(max_bytes=cap))
    store.add(exchange(1))
    huge = [make_span(2, s, start_ms=s, attributes={"p": "z" * 4000}) for s in range(1, 200)]
    with pytest.raises(StoreFull, match="size cap of 262144 bytes"):
        store.add(huge)
    assert found(store) == [tid(1)]
    assert len(store.trace(tid(1))) == 4


def test_size_eviction_takes_from_the_agency_holding_the_most_not_the_broker(
    open_store: OpenStore,
) -> None:
    # Review of issue 10: an agency's junk pushed out the broker's spans (and with them the
    # evidence of its own calls), as eviction took the earliest received from anyone.
    cap = 512 * 1024
    store = open_store(StoreLimits(max_bytes=cap))
    store.add(exchange(1, consumer="post"))  # post's own call, first received
    store.add([sent_by("tax", 2, 1, 2000), sent_by("tax", 3, 1, 2000)])
    for n in range(200):  # ~1.6 MB from post, three times the cap
        store.add([sent_by("post", 100 + n, 1, 8000)])
        assert store.used_bytes() <= cap
    assert [s.service for s in store.trace(tid(1)) if s.service == BROKER] == [BROKER] * 2
    assert found(store, party="post") == [tid(1)]
    assert len(store.trace(tid(2))) == len(store.trace(tid(3))) == 1  # tax: under its share
    assert store.trace(tid(100)) == []  # post's own earliest went
    assert store.trace(tid(299))
    usage = store.usage()
    assert usage[AGENCY.format("post")] <= cap


def test_the_broker_is_evicted_only_when_no_agency_holds_more_than_a_fair_share(
    open_store: OpenStore,
) -> None:
    cap = 256 * 1024
    store = open_store(StoreLimits(max_bytes=cap))
    store.add([sent_by("tax", 1, 1, 500)])
    for n in range(300):  # the broker alone fills the store, beyond its cap
        store.add([make_span(100 + n, 1, attributes={"p": "b" * 2000})])
        assert store.used_bytes() <= cap
    # Nobody else held more than a fair share: the broker's own earliest went, tax's stayed.
    assert store.trace(tid(100)) == []
    assert store.trace(tid(399))
    assert len(store.trace(tid(1))) == 1


def test_an_agency_flooding_below_a_fair_share_evicts_agencies_spans_never_the_brokers(
    open_store: OpenStore,
) -> None:
    # Second review of issue 10: with the broker and four agencies, a flooder under a fifth
    # of the store held no more than a "fair share", so every eviction took the broker's
    # earliest spans: the index (trace_parties) of the other agencies' traces.
    cap = 512 * 1024
    store = open_store(StoreLimits(max_bytes=cap))
    honest = ("tax", "cra", "nocr")
    calls = 0
    while store.used_bytes() < cap * 65 // 100:  # the broker's evidence: most of the store
        calls += 1
        store.add(brokers_spans_of(calls, honest[calls % 3]))
    evidence = store.usage()[BROKER_SENDER]
    for n, agency in enumerate(honest):  # each well under a fifth
        store.add([sent_by(agency, 10_000 + 10 * n + k, 1, 4000) for k in range(8)])
    for n in range(120):  # post floods in small batches, ~1 MB in all
        store.add([sent_by("post", 20_000 + n, 1, 8000)])
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


def test_an_agency_batch_that_only_the_brokers_spans_could_make_room_for_is_refused(
    open_store: OpenStore,
) -> None:
    cap = 256 * 1024
    store = open_store(StoreLimits(max_bytes=cap))
    calls = 0
    while store.used_bytes() < cap * 9 // 10:
        calls += 1
        store.add(brokers_spans_of(calls, "tax"))
    evidence = store.usage()
    with pytest.raises(StoreFull, match="without evicting the broker's spans"):
        store.add([sent_by("post", 900 + k, 1, 8000) for k in range(8)])
    assert store.usage() == evidence
    assert store.search(TraceQuery(party="tax"))[1] == calls
    # The broker's own spans still make room for themselves, earliest first.
    for n in range(calls + 1, calls + 40):
        store.add(brokers_spans_of(n, "tax"))
        assert store.used_bytes() <= cap
    assert store.trace(tid(1)) == []


def test_a_flooder_that_joins_a_trace_loses_only_its_own_spans_of_it(open_store: OpenStore) -> None:
    # An agency knows the ids of traces it took part in and can add spans to them; eviction
    # of its spans leaves the broker's, the trace's summary and who may see it.
    cap = 256 * 1024
    store = open_store(StoreLimits(max_bytes=cap))
    store.add(exchange(1, consumer="tax", start_ms=5))
    store.add([sent_by("post", 1, 9, 4000, start_ms=0, status=STATUS_ERROR)])
    assert store.search(TraceQuery())[0][0].span_count == 5
    for n in range(100):
        store.add([sent_by("post", 100 + n, 1, 8000)])
    kept = store.trace(tid(1))
    assert {s.service for s in kept} == {BROKER, "tax", "echo"}
    [summary] = [t for t in store.search(TraceQuery(limit=MAX_LIMIT))[0] if t.trace_id == tid(1)]
    assert (summary.span_count, summary.error_count, summary.root_service) == (4, 0, "tax")
    assert summary.start_ns == T0 + 5 * MS
    assert found(store, party="tax") == [tid(1)]


def test_an_agency_search_is_a_store_query_over_the_brokers_parties(open_store: OpenStore) -> None:
    # Review of issue 10: 4200 decoys naming tax, from another sender, hid tax's own traces:
    # candidates came from any span's tags, the newest 2000 of them at most.
    store = open_store()
    store.add(exchange(1, consumer="tax", start_ms=0))
    decoys = [
        sent_by("post", 1000 + n, 1, 10, start_ms=60_000 + n)
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


# -- the factory ---------------------------------------------------------------------------


def test_the_factory_opens_the_store_its_argument_names(tmp_path: Path, postgres_url: str) -> None:
    stores = [
        open_span_store("memory:"),
        open_span_store(tmp_path / "a.db"),
        open_span_store(str(tmp_path / "b.db")),
        open_span_store(postgres_url),
        open_span_store(postgres_url.replace("postgresql://", "postgres://", 1)),
    ]
    kinds = [type(s) for s in stores]
    assert kinds == [MemorySpanStore, SqliteSpanStore, SqliteSpanStore] + [PostgresSpanStore] * 2
    assert (tmp_path / "a.db").exists() and (tmp_path / "b.db").exists()
    for s in stores:
        s.close()


def test_a_url_that_is_not_postgresqls_is_refused_without_its_password() -> None:
    with pytest.raises(TabadolError, match="not a PostgreSQL URL") as refused:
        PostgresSpanStore(f"postgresql://ops:{PASSWORD}%zz@db.example/spans")
    assert PASSWORD not in str(refused.value)
    assert "ops@db.example/spans" in str(refused.value)


# -- PostgreSQL: several consoles on one database --------------------------------------------


def test_two_consoles_on_one_database_serve_the_same_traces(postgres_url: str) -> None:
    one, two = PostgresSpanStore(postgres_url), PostgresSpanStore(postgres_url)
    try:
        one.add(exchange(1, consumer="post"))
        two.add(exchange(2, consumer="tax", start_ms=10))
        for store in (one, two):
            assert found(store) == [tid(2), tid(1)]
            assert found(store, party="tax") == [tid(2)]
            assert len(store.trace(tid(1))) == len(store.trace(tid(2))) == 4
            assert store.agency_calls(T0, T0 + HOUR_MS * MS) == [
                Edge("post", "echo", 1, 0),
                Edge("tax", "echo", 1, 0),
            ]
        assert one.usage() == two.usage()
        assert one.used_bytes() == two.used_bytes() > 0
        # What one console's retention removes, the other no longer shows.
        two.limits = StoreLimits(max_age_seconds=3600)
        assert two.enforce_retention(T0 + 10**12 + 2 * HOUR_MS * MS) == 2
        assert found(one) == []
        assert one.usage() == {}
    finally:
        one.close()
        two.close()


def test_consoles_starting_together_on_a_new_database_all_open_it(postgres_url: str) -> None:
    starting = threading.Barrier(4)

    def start(_: int) -> PostgresSpanStore:
        starting.wait(timeout=30)
        return PostgresSpanStore(postgres_url)

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(start, range(4)))
    try:
        for n, store in enumerate(stores):
            store.add(exchange(n + 1, start_ms=n))
        assert found(stores[0]) == [tid(4), tid(3), tid(2), tid(1)]
    finally:
        for store in stores:
            store.close()


def test_retention_deletes_in_batches_while_exports_carry_on(postgres_url: str) -> None:
    clock = [T0]
    ingest = PostgresSpanStore(postgres_url, clock=lambda: clock[0])
    retention = PostgresSpanStore(postgres_url, StoreLimits(max_age_seconds=3600), batch_spans=10)
    blocker = psycopg.connect(postgres_url)
    try:
        for n in range(1, 31):  # 30 calls, 120 spans, each call received after the one before
            clock[0] = T0 + n * MS
            ingest.add(exchange(n, start_ms=n))
        # Another session holds the spans of the last call received: the batch that reaches
        # them waits for it, after every batch before it has gone.
        blocker.execute(
            "SELECT 1 FROM tabadol_spans.spans WHERE trace_id = %s FOR UPDATE", (tid(30),)
        )
        removed: list[int] = []
        running = threading.Thread(
            target=lambda: removed.append(retention.enforce_retention(T0 + 2 * HOUR_MS * MS))
        )
        running.start()
        with psycopg.connect(postgres_url, autocommit=True) as watcher:
            for _ in range(3000):
                row = watcher.execute("SELECT count(*) FROM tabadol_spans.spans").fetchone()
                if row is not None and row[0] <= 10:
                    break
                threading.Event().wait(0.01)
            else:
                raise AssertionError("retention deleted no batch before the held one")
        assert row[0] == 10  # one batch of ten is left, waiting
        assert running.is_alive()

        clock[0] = T0 + 2 * HOUR_MS * MS
        ingest.add(exchange(99, start_ms=2 * HOUR_MS))  # not held up by retention
        assert running.is_alive()
        assert found(retention, start_ns=T0 + HOUR_MS * MS) == [tid(99)]

        blocker.rollback()
        running.join(timeout=60)
        assert removed == [30]
        assert found(ingest) == [tid(99)]
        assert set(ingest.usage()) == {BROKER_SENDER, ""}
    finally:
        blocker.close()
        ingest.close()
        retention.close()


# -- PostgreSQL: a database that goes away ---------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[PostgresCluster]:
    """A private server, as these tests stop it."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def _with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def _eventually(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` for up to 30 s: the pool reconnects with a backoff."""
    for _ in range(300):
        if check():
            return
        threading.Event().wait(0.1)
    raise AssertionError(what)


def _answers(store: SpanStore) -> bool:
    try:
        store.search(TraceQuery())
    except StoreUnavailable:
        return False
    return True


def test_a_database_that_goes_away_is_named_without_its_password(
    own_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    url = own_cluster.create_database()
    dbname = url.rsplit("/", 1)[1]
    store = PostgresSpanStore(_with_password(url), timeout_seconds=1)
    store.add(exchange(1))
    own_cluster.stop("immediate")
    try:
        for call in (lambda: store.search(TraceQuery()), lambda: store.add(exchange(2))):
            with pytest.raises(StoreUnavailable) as gone:
                call()
            assert f"postgres@127.0.0.1:{own_cluster.port}/{dbname}" in str(gone.value)
            assert PASSWORD not in str(gone.value)
        with pytest.raises(StoreUnavailable, match=dbname) as unopened:
            PostgresSpanStore(_with_password(url), timeout_seconds=1)
        assert PASSWORD not in str(unopened.value)
    finally:
        own_cluster.start()
    _eventually(lambda: _answers(store), "the store did not come back with its database")
    assert found(store) == [tid(1)]
    assert PASSWORD not in caplog.text
    store.close()


def _export_request() -> ExportTraceServiceRequest:
    """One span of the broker's, as its exporter sends it."""
    start = time.time_ns()  # inside the collector's window
    span = Span(
        trace_id=(7).to_bytes(16, "big"),
        span_id=(1).to_bytes(8, "big"),
        name="echo.Echo/Unary",
        kind=Span.SpanKind.SPAN_KIND_SERVER,
        start_time_unix_nano=start,
        end_time_unix_nano=start + MS,
    )
    service = KeyValue(key="service.name", value=AnyValue(string_value=BROKER))
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[service]), scope_spans=[ScopeSpans(spans=[span])]
            )
        ]
    )


@contextlib.asynccontextmanager
async def _console(url: str, pki: CertificateAuthority) -> AsyncIterator[OpsServer]:
    server = OpsServer(url, trust=ops_trust(pki), http="127.0.0.1:0", otlp="127.0.0.1:0")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_the_ops_console_keeps_answering_while_its_database_is_away(
    own_cluster: PostgresCluster, pki: CertificateAuthority
) -> None:
    url = await asyncio.to_thread(own_cluster.create_database)
    dbname = url.rsplit("/", 1)[1]
    broker = ((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    async with _console(_with_password(url), pki) as server, operator_client(server, pki) as web:
        assert (await web.get("/api/services")).status_code == 200
        channel, collector = export_stub(
            (server.otlp_address, pki.trust_domain), broker, pki.cert_pem()
        )
        async with channel:
            await collector.Export(_export_request(), timeout=30)
            await asyncio.to_thread(own_cluster.stop, "immediate")
            try:
                answer = await web.get("/api/services", timeout=30)
                assert answer.status_code == 503
                [error] = answer.json()["errors"]
                assert f"127.0.0.1:{own_cluster.port}/{dbname}" in error["msg"]
                assert PASSWORD not in answer.text
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await collector.Export(_export_request(), timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert dbname in (refused.value.details() or "")
                assert PASSWORD not in (refused.value.details() or "")
            finally:
                await asyncio.to_thread(own_cluster.start)
            for _ in range(300):
                if (await web.get("/api/services", timeout=30)).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            services = (await web.get("/api/services")).json()["data"]
            assert services == [BROKER]


def test_what_a_database_or_json_cannot_hold_is_stored_alike_everywhere(
    store: SpanStore,
) -> None:
    """PostgreSQL's text cannot hold U+0000: every store keeps U+FFFD in its place, so an
    agency's batch with one is stored (not refused, and retried, for ever); a NaN or
    infinite double is kept as OTLP's JSON writes it, which the console can send."""
    store.add([make_span(1, 1, name="a\x00b", attributes={"national_id": "12\x0034", "k\x00": 1})])
    [span] = store.trace(tid(1))
    assert span.name == "a\ufffdb"
    assert span.attributes["national_id"] == "12\ufffd34" and span.attributes["k\ufffd"] == 1
    store.add([make_span(2, 1, attributes={"ratio": float("nan"), "peak": [float("-inf"), 1.5]})])
    [span] = store.trace(tid(2))
    assert span.attributes == {"ratio": "NaN", "peak": ["-Infinity", 1.5]}
