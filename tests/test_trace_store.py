"""The trace viewer without a network: the SQLite store on disk, query parsing, Jaeger JSON,
OTLP, HTTP API. What every span store does: tests/test_span_store_contract.py."""

from __future__ import annotations

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
from tabadol.ops.store import SqliteSpanStore, StoreLimits
from tabadol.ops.store.sqlite import _SCHEMA
from tabadol.pki import CertificateAuthority
from tests.support.ops import session_access
from tests.support.spans import (
    BROKER,
    BROKER_SENDER,
    CLIENT,
    HOUR_MS,
    INTERNAL,
    MS,
    SERVER,
    T0,
    exchange,
    found,
    make_span,
    sid,
    tid,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteSpanStore]:
    s = SqliteSpanStore(tmp_path / "traces.db")
    yield s
    s.close()


# -- SqliteSpanStore on disk (what every store does: tests/test_span_store_contract.py) -----


def test_the_sqlite_file_stays_near_the_size_cap_at_every_add(tmp_path: Path) -> None:
    # Finding 5: a 1 MB cap reached 57 MB, as it was applied only every 60 s.
    cap = 1024 * 1024
    store = SqliteSpanStore(tmp_path / "traces.db", StoreLimits(max_bytes=cap))
    for n in range(60):
        store.add(
            [make_span(n + 1, s, start_ms=n, attributes={"p": "y" * 4000}) for s in range(1, 26)]
        )
        assert store.used_bytes() <= cap
    assert (tmp_path / "traces.db").stat().st_size <= 2 * cap
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
