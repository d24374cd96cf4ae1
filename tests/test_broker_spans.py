"""The broker's spans off the call path: trace context in and out, sampling, the OTLP
encoding of finished calls, the bounded queue, and a real export over mTLS to the collector."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from tabadol.broker.span_export import (
    BatchSettings,
    ConsoleSink,
    SpanEncoder,
    SpanExport,
    broker_resource,
)
from tabadol.broker.tracing import (
    NO_TRACING,
    BrokerTracing,
    Finished,
    Sampling,
    broker_tracing,
    parse_trace_context,
)
from tabadol.client.tracing import ExporterCredentials
from tabadol.config import TracingSection
from tabadol.ledger.record import LedgerRecord
from tabadol.ops.model import TraceQuery
from tabadol.pki import CertificateAuthority
from tabadol.samplers import SAMPLERS, TracingConfigError
from tabadol.spiffe import ops_dns_name
from tests.conftest import TRUST_DOMAIN
from tests.support.collector import running_collector

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


def record(**changes: Any) -> LedgerRecord:
    fields: dict[str, Any] = dict(
        start_ns=1_700_000_000_000_000_000,
        end_ns=1_700_000_000_005_000_000,
        trace_id=TRACE,
        request_id="ab" * 16,
        consumer="post",
        provider="nocr",
        service="tabadol.agencies.nocr.v1.PersonRegistry",
        method="InquirePerson",
        kind="unary",
        status_code=0,
        request_bytes=100,
        request_messages=1,
        response_bytes=2000,
        response_messages=1,
        endpoint="[::1]:7001",
        broker_instance="b1",
    )
    fields.update(changes)
    return LedgerRecord(**fields)


# Trace context in


def test_a_valid_traceparent_continues_the_consumers_trace() -> None:
    parsed = parse_trace_context((("x-other", "1"), ("traceparent", VALID)))
    assert parsed is not None
    assert (parsed.trace_hex, parsed.parent_hex, parsed.sampled) == (TRACE, PARENT, True)
    assert parse_trace_context((("traceparent", f"00-{TRACE}-{PARENT}-00"),)).sampled is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "header",
    [
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper case
        f"00-{TRACE[:-1]}-{PARENT}-01",  # short trace id
        f"00-{TRACE}0-{PARENT}-01",  # long trace id
        f"00-{TRACE}-{PARENT[:-1]}-01",  # short parent id
        f"00-{TRACE}-{PARENT}-1",  # short flags
        f"0-{TRACE}-{PARENT}-01",
        "",
        "garbage",
        f"00_{TRACE}_{PARENT}_01",
        f"00-{TRACE}-{PARENT}-01" + " " * 600,  # over the SDK's 512 characters
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(header: str) -> None:
    assert parse_trace_context((("traceparent", header),)) is None
    trace = BrokerTracing().begin((("traceparent", header),))
    assert trace.parent_id == b"" and trace.trace_hex != TRACE
    assert len(trace.trace_id) == 16 and trace.trace_hex == trace.trace_id.hex()


def test_a_later_version_may_add_fields_and_only_the_first_traceparent_counts() -> None:
    assert parse_trace_context((("traceparent", f"01-{TRACE}-{PARENT}-01-more"),)) is not None
    first = parse_trace_context(
        (("traceparent", VALID), ("traceparent", f"00-{'1' * 32}-{PARENT}-01"))
    )
    assert first is not None and first.trace_hex == TRACE
    assert parse_trace_context((("traceparent", VALID.encode()),)) is None  # bytes: not W3C
    assert parse_trace_context(()) is None


def test_tracestate_is_kept_when_valid_and_dropped_whole_when_not() -> None:
    def state(*values: str) -> str:
        parsed = parse_trace_context((("traceparent", VALID), *(("tracestate", v) for v in values)))
        assert parsed is not None
        return parsed.tracestate

    assert state() == ""
    assert state("congo=t61rcWkgMzE") == "congo=t61rcWkgMzE"
    assert state("a=1, b=2", "c@vendor=3") == "a=1,b=2,c@vendor=3"
    assert state("a=1,Bad=2") == ""  # upper-case key
    assert state("a=1,a=2") == ""  # a repeated key
    assert state(",".join(f"k{i}=v" for i in range(33))) == ""  # more than 32
    assert state("a=" + "x" * 9000) == ""
    # No valid traceparent: no tracestate either.
    assert BrokerTracing().begin((("tracestate", "a=1"),)).tracestate == ""


# Sampling


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_decides_as_the_spec_says(name: str) -> None:
    tracing = BrokerTracing(Sampling.of(name, 0.5))
    root = name.removeprefix("parentbased_")
    low = int(TRACE[16:], 16)
    ratio_says = low < round(0.5 * 2**64)
    for flags in ("01", "00"):
        trace = tracing.begin((("traceparent", f"00-{TRACE}-{PARENT}-{flags}"),))
        if name.startswith("parentbased_"):
            expected = flags == "01"
        else:
            expected = {"always_on": True, "always_off": False}.get(root, ratio_says)
        assert trace.sampled is expected, (name, flags)
    new = [tracing.begin(()) for _ in range(200)]
    if root == "always_on":
        assert all(t.sampled for t in new)
    elif root == "always_off":
        assert not any(t.sampled for t in new)
    else:
        for t in new:
            assert t.sampled is (int.from_bytes(t.trace_id[8:]) < round(0.5 * 2**64))


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1 / 3, 0.999, 1.0])
def test_the_trace_id_ratio_matches_the_sdks(ratio: float) -> None:
    sampling = Sampling.of("traceidratio", ratio)
    assert sampling.bound == TraceIdRatioBased(ratio).bound or ratio == 1.0
    for trace in [BrokerTracing(sampling).begin(()) for _ in range(200)]:
        low = int.from_bytes(trace.trace_id[8:])
        sdk = TraceIdRatioBased(ratio).should_sample(None, int.from_bytes(trace.trace_id), "x")
        assert trace.sampled is sdk.decision.is_sampled() or (ratio == 1.0 and trace.sampled)  # type: ignore[no-untyped-call]
        assert trace.sampled is (low < sampling.bound)


# Trace context out


def test_the_provider_sees_the_hop_as_its_parent_with_the_tracestate_passed_on() -> None:
    tracing = BrokerTracing()
    trace = tracing.begin((("traceparent", VALID), ("tracestate", "a=1")))
    assert trace.trace_hex == TRACE and trace.parent_id == bytes.fromhex(PARENT)
    assert len(trace.span_id) == len(trace.hop_id) == 8 and trace.span_id != trace.hop_id
    assert tracing.provider_headers(trace) == (
        ("traceparent", f"00-{TRACE}-{trace.hop_id.hex()}-01"),
        ("tracestate", "a=1"),
    )
    unsampled = tracing.begin((("traceparent", f"00-{TRACE}-{PARENT}-00"),))
    assert tracing.provider_headers(unsampled) == (
        ("traceparent", f"00-{TRACE}-{unsampled.hop_id.hex()}-00"),
    )


def test_without_tracing_the_ledger_gets_the_consumers_trace_id_and_the_provider_its_context() -> (
    None
):
    trace = NO_TRACING.begin((("traceparent", VALID),))
    assert trace.trace_hex == TRACE and not trace.sampled
    assert NO_TRACING.provider_headers(trace) == ()
    assert NO_TRACING.begin((("traceparent", "garbage"),)).trace_hex == ""
    NO_TRACING.end(trace, record(), 1)  # nothing to do, nothing raised


# Encoding


def encoder(service_name: str = "tabadol-broker") -> SpanEncoder:
    return SpanEncoder(broker_resource(service_name))


def decode(batch: Sequence[Finished], enc: SpanEncoder | None = None) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString((enc or encoder()).encode(batch))


def attributes(span: Span) -> dict[str, Any]:
    return {a.key: getattr(a.value, str(a.value.WhichOneof("value"))) for a in span.attributes}


def test_a_finished_call_is_a_server_span_and_its_hop_with_every_attribute() -> None:
    trace = BrokerTracing().begin((("traceparent", VALID), ("tracestate", "a=1")))
    done = record()
    hop_started = done.start_ns + 1_000_000
    request = decode([(trace, done, hop_started)])

    [resource_spans] = request.resource_spans
    resource = attributes(resource_spans.resource)  # type: ignore[arg-type]
    sdk = Resource.create({"service.name": "tabadol-broker"}).attributes
    assert resource["service.name"] == "tabadol-broker"
    assert set(resource) == set(sdk) | {"service.instance.id"}
    same = set(sdk) - {"service.instance.id"}  # unique to each process
    assert {k: resource[k] for k in same} == {k: sdk[k] for k in same}
    [scope_spans] = resource_spans.scope_spans
    assert scope_spans.scope.name == "tabadol.broker"
    server, hop = scope_spans.spans
    name = "tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson"

    assert server.name == hop.name == name
    assert (server.kind, hop.kind) == (Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT)
    assert server.trace_id == hop.trace_id == bytes.fromhex(TRACE)
    assert server.span_id == trace.span_id and server.parent_span_id == bytes.fromhex(PARENT)
    assert hop.span_id == trace.hop_id and hop.parent_span_id == trace.span_id
    assert server.trace_state == hop.trace_state == "a=1"
    assert (server.start_time_unix_nano, server.end_time_unix_nano) == (
        done.start_ns,
        done.end_ns,
    )
    assert (hop.start_time_unix_nano, hop.end_time_unix_nano) == (hop_started, done.end_ns)
    assert (server.flags, hop.flags) == (0x300, 0x100)  # remote parent, local parent
    assert server.HasField("status") and server.status.code == Status.STATUS_CODE_UNSET
    assert attributes(server) == {
        "rpc.system": "grpc",
        "rpc.service": "tabadol.agencies.nocr.v1.PersonRegistry",
        "rpc.method": "InquirePerson",
        "tabadol.provider": "nocr",
        "tabadol.rpc_kind": "unary",
        "rpc.grpc.status_code": 0,
        "tabadol.consumer": "post",
        "tabadol.request_id": "ab" * 16,
        "tabadol.request.bytes": 100,
        "tabadol.request.messages": 1,
        "tabadol.response.bytes": 2000,
        "tabadol.response.messages": 1,
    }
    assert list(attributes(server))[:5] == [
        "rpc.system",
        "rpc.service",
        "rpc.method",
        "tabadol.provider",
        "tabadol.rpc_kind",
    ]
    assert attributes(hop) == {
        "rpc.system": "grpc",
        "rpc.service": "tabadol.agencies.nocr.v1.PersonRegistry",
        "rpc.method": "InquirePerson",
        "server.address": "::1",
        "server.port": 7001,
        "tabadol.endpoint": "[::1]:7001",
        "rpc.grpc.status_code": 0,
    }


def test_a_failed_call_is_an_error_named_by_its_code_alone() -> None:
    trace = BrokerTracing().begin(())
    request = decode([(trace, record(status_code=5), 1), (trace, record(status_code=99), 1)])
    spans = request.resource_spans[0].scope_spans[0].spans
    for span in spans[:2]:
        assert span.status.code == Status.STATUS_CODE_ERROR
        assert span.status.message == "NOT_FOUND"
        assert attributes(span)["rpc.grpc.status_code"] == 5
    assert spans[2].status.message == "99"


def test_a_call_refused_before_any_hop_is_one_root_span() -> None:
    trace = BrokerTracing().begin(())
    request = decode([(trace, record(endpoint="", status_code=7, consumer=""), 0)])
    [span] = request.resource_spans[0].scope_spans[0].spans
    assert span.kind == Span.SPAN_KIND_SERVER and span.parent_span_id == b""
    assert span.flags == 0x100 and span.trace_state == ""
    assert span.status.message == "PERMISSION_DENIED"
    assert attributes(span)["tabadol.consumer"] == ""


def test_large_and_negative_numbers_survive_the_encoding() -> None:
    trace = BrokerTracing().begin(())
    big = record(request_bytes=2**40 + 3, response_messages=300, response_bytes=-1)
    [span] = decode([(trace, big, 0)]).resource_spans[0].scope_spans[0].spans
    found = attributes(span)
    assert found["tabadol.request.bytes"] == 2**40 + 3
    assert found["tabadol.response.messages"] == 300
    assert found["tabadol.response.bytes"] == -1
    assert found["tabadol.consumer"] == "post"


def test_a_batch_of_many_calls_and_methods_decodes_in_order() -> None:
    enc = encoder("broker-a")
    tracing = BrokerTracing()
    batch = [
        (tracing.begin(()), record(method=f"M{i % 3}", consumer=f"a{i % 2}", start_ns=i), i % 2)
        for i in range(50)
    ]
    spans = decode(batch, enc).resource_spans[0].scope_spans[0].spans
    assert len(spans) == 25 * 1 + 25 * 2
    servers = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert [s.start_time_unix_nano for s in servers] == list(range(50))
    assert [attributes(s)["rpc.method"] for s in servers] == [f"M{i % 3}" for i in range(50)]
    assert [attributes(s)["tabadol.consumer"] for s in servers] == [f"a{i % 2}" for i in range(50)]


def test_the_console_exporter_gets_the_same_spans_as_sdk_spans() -> None:
    trace = BrokerTracing().begin((("traceparent", VALID),))
    server, hop = ConsoleSink(broker_resource("tabadol-broker")).readable(trace, record(), 5)
    assert server.parent is not None and server.parent.span_id == int(PARENT, 16)
    assert hop.parent == server.context
    assert server.attributes is not None and server.attributes["tabadol.consumer"] == "post"
    assert hop.attributes is not None and hop.attributes["server.port"] == 7001


def test_the_hand_encoder_writes_what_the_sdks_own_encoder_writes() -> None:
    # The SDK's encoder, given the SDK's spans for the same calls, is the oracle.
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    tracing = BrokerTracing()
    batch: list[Finished] = [
        (tracing.begin((("traceparent", VALID),)), record(), 1_700_000_000_001_000_000),
        (tracing.begin(()), record(status_code=7, endpoint="", consumer=""), 0),
        (
            tracing.begin((("traceparent", VALID), ("tracestate", "vendor=1,other=x"))),
            record(status_code=14, kind="server_streaming", response_messages=100),
            1_700_000_000_002_000_000,
        ),
    ]
    resource = broker_resource("tabadol-broker")
    ours = ExportTraceServiceRequest.FromString(SpanEncoder(resource).encode(batch))
    sdk = encode_spans([s for f in batch for s in ConsoleSink(resource).readable(*f)])

    def normal(request: ExportTraceServiceRequest) -> list[tuple[Any, ...]]:
        (resource_spans,) = request.resource_spans
        (scope_spans,) = resource_spans.scope_spans
        return [
            (
                resource_spans.resource,
                scope_spans.scope.name,
                span.trace_id, span.span_id, span.parent_span_id, span.trace_state, span.name,
                span.kind, span.start_time_unix_nano, span.end_time_unix_nano, span.status,
                sorted(attributes(span).items()),
            )
            for span in scope_spans.spans
        ]  # fmt: skip

    assert normal(ours) == normal(sdk)
    assert len(normal(ours)) == 5


# The queue


class BlockedSink:
    """A collector that does not answer until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[Finished]] = []

    def export(self, batch: Sequence[Finished]) -> bool:
        self.entered.set()
        self.release.wait(30)
        self.batches.append(list(batch))
        return True

    def renew_credentials(self, credentials: ExporterCredentials) -> None:
        return None

    def shutdown(self) -> None:
        self.release.set()


def test_a_full_queue_drops_and_counts_without_blocking_the_call() -> None:
    sink = BlockedSink()
    settings = BatchSettings(max_queue_size=8, max_export_batch_size=2, schedule_delay_ms=60000)
    tracing = BrokerTracing(export=SpanExport(sink, settings))
    trace = tracing.begin(())
    tracing.end(trace, record(), 1)  # a full batch (one call, two spans) wakes the thread
    assert sink.entered.wait(10)  # the exporter is now stuck on that batch
    for _ in range(4):
        tracing.end(trace, record(), 1)  # the queue holds 4 calls (8 spans)
    tracing.end(trace, record(), 1)  # full: dropped, 2 spans
    tracing.end(trace, record(), 0)  # full: dropped, 1 span
    assert tracing.dropped() == 3
    sink.release.set()
    assert tracing.force_flush(10)
    assert sum(len(b) for b in sink.batches) == 5
    assert tracing.exported() == 10 and tracing.export_failed() == 0
    tracing.shutdown()
    assert tracing.force_flush(1) is False  # stopped


def test_unsampled_calls_are_not_queued() -> None:
    sink = BlockedSink()
    sink.release.set()
    tracing = BrokerTracing(Sampling.of("always_off"), SpanExport(sink, BatchSettings()))
    tracing.end(tracing.begin(()), record(), 1)
    assert tracing.force_flush(10)
    assert sink.batches == [] and tracing.exported() == 0
    tracing.shutdown()


def test_a_failing_sink_counts_failures_and_the_thread_keeps_going() -> None:
    class Broken(BlockedSink):
        def export(self, batch: Sequence[Finished]) -> bool:
            raise RuntimeError("collector exploded")

    tracing = BrokerTracing(export=SpanExport(Broken(), BatchSettings()))
    trace = tracing.begin(())
    tracing.end(trace, record(), 1)
    assert tracing.force_flush(10)
    tracing.end(trace, record(), 0)
    assert tracing.force_flush(10)
    assert tracing.export_failed() == 3
    tracing.shutdown()


def test_shutdown_exports_what_is_queued() -> None:
    sink = BlockedSink()
    sink.release.set()
    tracing = BrokerTracing(export=SpanExport(sink, BatchSettings(schedule_delay_ms=60000)))
    tracing.end(tracing.begin(()), record(), 1)
    tracing.shutdown()
    assert len(sink.batches) == 1


# Configuration


def test_batch_settings_come_from_the_otel_bsp_variables() -> None:
    env = {
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_SCHEDULE_DELAY": "250",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
        "OTEL_BSP_EXPORT_TIMEOUT": "2000",
    }
    assert BatchSettings.from_env(env) == BatchSettings(100, 250, 10, 2000)
    assert BatchSettings.from_env({}) == BatchSettings()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "lots"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
        ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "OTEL_BSP_SCHEDULE_DELAY"),
        ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096"}, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
        ({"OTEL_BSP_EXPORT_TIMEOUT": "-1"}, "OTEL_BSP_EXPORT_TIMEOUT=-1 must be positive"),
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "10", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "20"},
            "more than OTEL_BSP_MAX_QUEUE_SIZE=10",
        ),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "sometimes"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "outside"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
    ],
)
def test_a_wrong_setting_is_refused_naming_it(env: dict[str, str], named: str) -> None:
    with pytest.raises(TracingConfigError, match=named):
        broker_tracing(TracingSection(exporter=None), None, env)


def test_tracing_off_and_exporter_none() -> None:
    assert broker_tracing(TracingSection(enabled=False), None, {}) is None
    assert broker_tracing(TracingSection(), None, {"OTEL_SDK_DISABLED": "true"}) is None
    silent = broker_tracing(TracingSection(exporter="none", sampler="always_off"), None, {})
    assert silent is not None and silent.export is None
    trace = silent.begin(())
    assert not trace.sampled and silent.provider_headers(trace)[0][1][-3:] == "-00"
    silent.end(trace, record(), 1)
    assert silent.force_flush() and silent.dropped() == 0


# A real export


def broker_credentials(pki: CertificateAuthority) -> ExporterCredentials:
    return ExporterCredentials(
        (pki.dir / "ca.crt").read_bytes(),
        (pki.dir / "broker.crt").read_bytes(),
        (pki.dir / "broker.key").read_bytes(),
        ops_dns_name(TRUST_DOMAIN),
    )


async def test_spans_reach_the_collector_over_mtls_and_read_back_as_one_tree(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    async with running_collector(tmp_path, pki) as ops:
        tracing = broker_tracing(
            TracingSection(otlp_endpoint=ops.endpoint), broker_credentials(pki), {}
        )
        assert tracing is not None
        try:
            now = time.time_ns()  # the collector drops spans dated outside its window
            trace = tracing.begin((("traceparent", VALID),))
            tracing.end(trace, record(start_ns=now, end_ns=now + 5000), now + 1000)
            refused = tracing.begin(())
            tracing.end(refused, record(start_ns=now, end_ns=now, status_code=7, endpoint=""), 0)
            assert await asyncio.to_thread(tracing.force_flush, 30)
            assert tracing.exported() == 3 and tracing.export_failed() == 0

            spans = {s.span_id: s for s in ops.store.trace(TRACE)}
            server, hop = spans[trace.span_id.hex()], spans[trace.hop_id.hex()]
            assert server.parent_span_id == PARENT and hop.parent_span_id == server.span_id
            assert server.service == hop.service == "tabadol-broker"
            assert server.attributes["tabadol.consumer"] == "post"
            assert hop.attributes["tabadol.endpoint"] == "[::1]:7001"
            assert server.resource["tabadol.sender"] == f"spiffe://{TRUST_DOMAIN}/broker"
            summaries, total = ops.store.search(TraceQuery(status="PERMISSION_DENIED"))
            assert total == 1 and summaries[0].trace_id == refused.trace_hex
        finally:
            await asyncio.to_thread(tracing.shutdown)


async def test_export_failures_are_counted_when_the_collector_refuses_the_certificate(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    # An agency's certificate claiming the broker's service name: the collector refuses.
    agency = pki.dir / "agencies" / "post"
    async with running_collector(tmp_path, pki) as ops:
        tracing = broker_tracing(
            TracingSection(otlp_endpoint=ops.endpoint),
            ExporterCredentials.of(agency),
            {"OTEL_EXPORTER_OTLP_TIMEOUT": "5"},
        )
        assert tracing is not None
        try:
            tracing.end(tracing.begin(()), record(), 1)
            assert await asyncio.to_thread(tracing.force_flush, 30)
            assert tracing.export_failed() == 2 and tracing.exported() == 0
            # Renewed onto the broker's own certificate, spans are accepted again.
            tracing.renew_credentials(broker_credentials(pki))
            tracing.end(tracing.begin(()), record(), 1)
            assert await asyncio.to_thread(tracing.force_flush, 30)
            assert tracing.exported() == 2
        finally:
            await asyncio.to_thread(tracing.shutdown)
