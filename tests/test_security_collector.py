"""The span collector, attacked: who may send spans, what they may claim, and how much.

Finding 5 of the security review: the OTLP port took spans from anyone, let forged
``tabadol-broker`` spans draw agency edges, took 64 MiB requests, kept future-dated spans
for ever and let a 1 MB store grow to 57 MB.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tabadol.client.tracing import tracer_provider
from tabadol.identity import PlatformIdentity
from tabadol.ops.ingest import SpanLimits, admit_sender, admit_spans, own_service_name
from tabadol.ops.model import SpanRecord, TraceQuery
from tabadol.ops.store import StoreLimits
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN
from tests.support.collector import RunningCollector, export_stub, running_collector

MINUTE_NS = 60 * 10**9
BROKER = "tabadol-broker"
# What the span store may take on disk beyond its cap, between exports (docs/tracing.md):
# the shared-memory index of its write-ahead log, and a little slack.
DISK_SLACK = 128 * 1024
_next_trace = iter(range(1, 10**9))


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def span(
    *,
    start_ns: int | None = None,
    end_ns: int | None = None,
    attributes: dict[str, str] | None = None,
    events: int = 0,
    kind: int = Span.SpanKind.SPAN_KIND_SERVER,
) -> Span:
    """A span of a new trace, by default starting now."""
    start = time.time_ns() if start_ns is None else start_ns
    return Span(
        trace_id=next(_next_trace).to_bytes(16, "big"),
        span_id=b"\x01" * 8,
        name="echo.Echo/Unary",
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=start,
        end_time_unix_nano=start + 10**6 if end_ns is None else end_ns,
        attributes=[_kv(k, v) for k, v in (attributes or {}).items()],
        events=[Span.Event(time_unix_nano=start, name=f"e{n}") for n in range(events)],
    )


def request(
    service: str, *spans: Span, resource: dict[str, str] | None = None
) -> ExportTraceServiceRequest:
    attributes = [_kv("service.name", service), *(_kv(k, v) for k, v in (resource or {}).items())]
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=attributes), scope_spans=[ScopeSpans(spans=spans)]
            )
        ]
    )


def bundle(pki: CertificateAuthority, role: str, name: str) -> tuple[bytes, bytes]:
    """(key, certificate) of a platform identity, issuing it the first time."""
    if role == "broker":
        return (pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes()
    directory = pki.dir / ("agencies" if role == "agency" else f"{role}s") / name
    if not (directory / f"{role}.key").exists():
        if role == "agency":
            pki.issue_agency(name)
        else:
            pki.issue_person(role, name)
    return (directory / f"{role}.key").read_bytes(), (directory / f"{role}.crt").read_bytes()


async def export(
    running: RunningCollector,
    pki: CertificateAuthority,
    who: tuple[str, str] | None,
    message: ExportTraceServiceRequest,
) -> ExportTraceServiceResponse:
    """Export as ``who`` (role, name) over mTLS; None presents no client certificate."""
    key_cert = bundle(pki, *who) if who is not None else None
    channel, stub = export_stub(running, key_cert, pki.cert_pem())
    async with channel:
        return await stub.Export(message, timeout=10)  # type: ignore[no-any-return]


@pytest.fixture
async def collector(tmp_path: Path, pki: CertificateAuthority) -> AsyncIterator[RunningCollector]:
    async with running_collector(tmp_path, pki) as running:
        yield running


def stored(running: RunningCollector) -> int:
    return running.store.search(TraceQuery())[1]


# -- who may send -------------------------------------------------------------------------


async def test_an_exporter_without_a_client_certificate_is_refused_at_the_handshake(
    collector: RunningCollector, pki: CertificateAuthority
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await export(collector, pki, None, request("post", span()))
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert stored(collector) == 0


async def test_an_exporter_with_a_certificate_from_another_ca_is_refused(
    collector: RunningCollector, pki: CertificateAuthority, tmp_path: Path
) -> None:
    other = CertificateAuthority.init(tmp_path / "other-pki", TRUST_DOMAIN)
    other.issue_agency("post")
    bundle_dir = other.dir / "agencies" / "post"
    key_cert = (bundle_dir / "agency.key").read_bytes(), (bundle_dir / "agency.crt").read_bytes()
    channel, stub = export_stub(collector, key_cert, pki.cert_pem())
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Export(request("post", span()), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert stored(collector) == 0


@pytest.mark.parametrize(("role", "name"), [("operator", "olga"), ("auditor", "adel")])
async def test_operators_and_auditors_may_not_send_spans(
    collector: RunningCollector, pki: CertificateAuthority, role: str, name: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await export(collector, pki, (role, name), request("post", span()))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert f"{role} {name!r} may not send spans" in (refused.value.details() or "")
    assert stored(collector) == 0


async def test_a_revoked_agency_may_not_send_spans(tmp_path: Path) -> None:
    pki = CertificateAuthority.init(tmp_path / "pki", TRUST_DOMAIN)
    pki.issue_agency("post")
    async with running_collector(tmp_path, pki) as running:
        await export(running, pki, ("agency", "post"), request("post", span()))
        pki.revoke_agency("post")
        running.trust.refresh_crl(force=True)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await export(running, pki, ("agency", "post"), request("post", span()))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (refused.value.details() or "")
        assert stored(running) == 1


async def test_refused_exports_are_logged_once_per_interval_not_once_each(
    collector: RunningCollector, pki: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tabadol.ops")
    for _ in range(20):
        with pytest.raises(grpc.aio.AioRpcError):
            await export(collector, pki, ("operator", "olga"), request("post", span()))
    lines = [r.getMessage() for r in caplog.records if "OTLP export refused" in r.getMessage()]
    assert len(lines) == 1
    assert "operator 'olga'" in lines[0]


# -- what a sender may claim -------------------------------------------------------------


async def test_an_agency_claiming_to_be_the_broker_is_refused_by_name(
    collector: RunningCollector, pki: CertificateAuthority
) -> None:
    forged = span(attributes={"tabadol.consumer": "tax", "tabadol.provider": "cra"})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await export(collector, pki, ("agency", "post"), request("tabadol-broker", forged))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    details = refused.value.details() or ""
    assert "agency 'post'" in details and "'tabadol-broker'" in details
    assert stored(collector) == 0
    assert collector.store.agency_calls(0, 2**62) == []


async def test_every_span_carries_its_senders_verified_identity_over_any_it_claimed(
    collector: RunningCollector, pki: CertificateAuthority
) -> None:
    claimed = {"tabadol.sender": f"spiffe://{TRUST_DOMAIN}/broker"}
    await export(collector, pki, ("agency", "post"), request("post", span(), resource=claimed))
    await export(collector, pki, ("broker", ""), request("tabadol-broker", span()))

    senders = {
        s.service: s.resource["tabadol.sender"]
        for t in collector.store.search(TraceQuery())[0]
        for s in collector.store.trace(t.trace_id)
    }
    assert senders == {
        "post": f"spiffe://{TRUST_DOMAIN}/agency/post",
        "tabadol-broker": f"spiffe://{TRUST_DOMAIN}/broker",
    }


async def test_agency_graph_edges_come_only_from_the_brokers_spans(
    collector: RunningCollector, pki: CertificateAuthority
) -> None:
    edge = {"tabadol.consumer": "tax", "tabadol.provider": "cra"}
    # Under any other service name, an agency's span is stored but draws no edge.
    await export(
        collector, pki, ("agency", "post"), request("tabadol-broker-2", span(attributes=edge))
    )
    assert collector.store.agency_calls(0, 2**62) == []

    await export(collector, pki, ("broker", ""), request("tabadol-broker", span(attributes=edge)))
    assert [(e.parent, e.child) for e in collector.store.agency_calls(0, 2**62)] == [("tax", "cra")]


LOOKALIKES = [
    "tabadol-broker ",
    "Tabadol-Broker",
    "tabadol\u2011broker",  # NON-BREAKING HYPHEN
    "tabadol-broker\u200b",  # ZERO WIDTH SPACE
    "\uff54abadol-broker",  # FULLWIDTH t
    " tabadol_broker",
]


@pytest.mark.parametrize("service", LOOKALIKES)
async def test_an_agency_may_not_send_under_a_name_that_reads_as_the_brokers(
    collector: RunningCollector, pki: CertificateAuthority, service: str
) -> None:
    # Review of issue 10: each of these was accepted from post.
    forged = span(attributes={"tabadol.consumer": "tax", "tabadol.provider": "nocr"})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await export(collector, pki, ("agency", "post"), request(service, forged))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert f"{service!r}: it reads as 'tabadol-broker'" in (refused.value.details() or "")
    assert stored(collector) == 0


async def test_an_agency_sending_under_another_agencys_name_is_stored_under_its_own(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    # Review of issue 10: post exported spans as service "nocr".
    declared = frozenset({"post", "nocr", "tax", "tax-office"})
    async with running_collector(tmp_path, pki, agencies=declared) as running:
        names = ["nocr", "post", "post-gateway", "post.api", "post/worker", "postal", "tax-office"]
        for name in names:
            await export(running, pki, ("agency", "post"), request(name, span()))
        # Declared ids nest: tax-office's namespace is not tax's.
        await export(running, pki, ("agency", "tax"), request("tax-office.api", span()))
        await export(running, pki, ("agency", "tax"), request("tax-gateway", span()))
        assert running.store.services() == sorted(
            ["post/nocr", "post", "post-gateway", "post.api", "post/worker", "post/postal",
             "post/tax-office", "tax/tax-office.api", "tax-gateway"]
        )  # fmt: skip
        [summary] = running.store.search(TraceQuery(service="post/nocr"))[0]
        [kept] = running.store.trace(summary.trace_id)
        assert kept.resource["service.name"] == "post/nocr"


async def test_an_agency_the_configuration_does_not_declare_may_not_send_spans(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    # Review of issue 10: a valid agency certificate whose id is in no [[agency]] exported.
    async with running_collector(tmp_path, pki, agencies=frozenset({"post"})) as running:
        await export(running, pki, ("agency", "post"), request("post", span()))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await export(running, pki, ("agency", "ghost"), request("ghost", span()))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "agency 'ghost'" in (refused.value.details() or "")
        assert "not declared" in (refused.value.details() or "")
        assert stored(running) == 1


# -- how much, and when ------------------------------------------------------------------


async def test_a_request_over_the_size_cap_is_refused_before_it_is_read(
    collector: RunningCollector, pki: CertificateAuthority
) -> None:
    # 64 MiB requests were accepted; the default cap is gRPC's own 4 MiB.
    big = span(attributes={f"a{n}": "x" * 100_000 for n in range(50)})  # about 5 MB
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await export(collector, pki, ("agency", "post"), request("post", big))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stored(collector) == 0


async def test_an_oversized_span_is_cut_to_the_span_limits(
    collector: RunningCollector, pki: CertificateAuthority
) -> None:
    fat = span(attributes={f"a{n:04d}": "y" * 10_000 for n in range(300)}, events=500)
    await export(collector, pki, ("agency", "post"), request("post", fat))

    [summary] = collector.store.search(TraceQuery())[0]
    [kept] = collector.store.trace(summary.trace_id)
    limits = collector.collector.limits
    assert list(kept.attributes) == [f"a{n:04d}" for n in range(limits.max_attributes)]
    assert {len(v) for v in kept.attributes.values()} == {limits.max_value_chars}
    assert len(kept.events) == limits.max_events


async def test_spans_dated_in_the_future_or_before_retention_are_dropped_and_counted(
    collector: RunningCollector, pki: CertificateAuthority
) -> None:
    now = time.time_ns()
    year_2100 = 4_102_444_800 * 10**9
    response = await export(
        collector,
        pki,
        ("agency", "post"),
        request(
            "post",
            span(start_ns=year_2100),
            span(start_ns=now + 60 * MINUTE_NS),
            span(start_ns=now - 8 * 24 * 60 * MINUTE_NS),  # older than the 7-day retention
            span(start_ns=now, end_ns=year_2100),  # a plausible start, a forged end
        ),
    )
    assert response.partial_success.rejected_spans == 3
    assert "3 spans dropped" in response.partial_success.error_message

    [summary] = collector.store.search(TraceQuery())[0]
    assert summary.start_ns == now
    assert summary.end_ns <= time.time_ns() + 5 * MINUTE_NS  # clamped into the window


async def test_an_agency_flooding_the_store_evicts_its_own_spans_not_the_brokers(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    # Review of issue 10: with a 5 MB cap, an agency's junk evicted every earlier trace, the
    # broker's included, and /api/services named only the flooder. Eviction took the earliest
    # received, whoever sent it; now it takes from the sender holding the most.
    cap = 1024 * 1024
    async with running_collector(tmp_path, pki, store_limits=StoreLimits(max_bytes=cap)) as running:
        party = {"tabadol.consumer": "post", "tabadol.provider": "nocr"}
        own_call, others_call = span(attributes=party), span(attributes=party | {
            "tabadol.consumer": "tax"})  # fmt: skip
        await export(running, pki, ("broker", ""), request(BROKER, own_call, others_call))
        # tax keeps a moderate share of its own, under a fair share of the store.
        tax_spans = [span(attributes={"p": "t" * 2000}) for _ in range(40)]
        await export(running, pki, ("agency", "tax"), request("tax", *tax_spans))
        # post also sends the client side of its own call: the trace it would like gone.
        own_client = Span(
            trace_id=own_call.trace_id, span_id=b"\x02" * 8, name="c", kind=3,  # type: ignore[arg-type]
            start_time_unix_nano=own_call.start_time_unix_nano,
            end_time_unix_nano=own_call.end_time_unix_nano,
        )  # fmt: skip
        await export(running, pki, ("agency", "post"), request("post", own_client))
        flood = []
        for _ in range(40):  # ~13 MB in all, with no retention pass in between
            batch = [span(attributes={f"p{n}": "z" * 4000 for n in range(80)})]
            flood += batch
            await export(running, pki, ("agency", "post"), request("post", *batch))
            assert running.store.used_bytes() <= cap
            assert _on_disk(tmp_path / "traces.db") <= cap + DISK_SLACK
        store = running.store
        for kept in (own_call, others_call):
            [broker_span] = [s for s in store.trace(kept.trace_id.hex()) if s.service == BROKER]
            assert broker_span.attributes["tabadol.consumer"] in ("post", "tax")
        assert len([s for s in store.trace(tax_spans[0].trace_id.hex())]) == 1
        assert store.services() == ["post", BROKER, "tax"]
        # post's own earliest spans went first, its newest stayed.
        assert store.trace(flood[0].trace_id.hex()) == []
        assert store.trace(flood[-1].trace_id.hex())
        usage = store.usage()
        assert (
            usage[f"spiffe://{TRUST_DOMAIN}/agency/post"] > usage[f"spiffe://{TRUST_DOMAIN}/broker"]
        )


async def test_an_agency_flooding_below_a_fair_share_never_evicts_the_brokers_spans(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    # Second review of issue 10: with the broker and four agencies, a flooder below a fifth
    # of the store held no more than a "fair share", so each eviction took the broker's
    # earliest spans: the index of the other agencies' traces.
    cap = 1024 * 1024
    async with running_collector(tmp_path, pki, store_limits=StoreLimits(max_bytes=cap)) as running:
        store = running.store
        honest = ("tax", "cra", "nocr")
        calls: list[Span] = []
        while store.used_bytes() < cap * 3 // 4:  # the broker's evidence: most of the store
            batch = [
                span(attributes={"tabadol.consumer": honest[n % 3], "tabadol.provider": "echo",
                                 "p": "b" * 4000})
                for n in range(len(calls), len(calls) + 30)
            ]  # fmt: skip
            calls += batch
            await export(running, pki, ("broker", ""), request(BROKER, *batch))
        broker = f"spiffe://{TRUST_DOMAIN}/broker"
        evidence = store.usage()[broker]
        own = {a: [span(attributes={"p": a * 4000}) for _ in range(5)] for a in honest}
        for agency, spans in own.items():  # each well under a fifth
            await export(running, pki, ("agency", agency), request(agency, *spans))
        flood = []
        for _ in range(40):  # ~1.3 MB from post
            batch = [span(attributes={f"p{n}": "z" * 4000 for n in range(8)})]
            flood += batch
            await export(running, pki, ("agency", "post"), request("post", *batch))
            assert store.used_bytes() <= cap
        held = store.usage()
        assert held[broker] == evidence
        assert held[f"spiffe://{TRUST_DOMAIN}/agency/post"] < sum(held.values()) / len(held)
        for n, call in enumerate(calls):
            [kept] = store.trace(call.trace_id.hex())
            assert kept.attributes["tabadol.consumer"] == honest[n % 3]
        for k, agency in enumerate(honest):
            assert store.search(TraceQuery(party=agency))[1] == sum(
                n % 3 == k for n in range(len(calls))
            )
            assert all(store.trace(s.trace_id.hex()) for s in own[agency])
        assert store.trace(flood[0].trace_id.hex()) == []
        assert store.trace(flood[-1].trace_id.hex())

        # Once only the broker's spans could make room, an agency's batch is refused.
        too_big = [span(attributes={f"p{n}": "z" * 4000 for n in range(20)}) for _ in range(6)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await export(running, pki, ("agency", "tax"), request("tax", *too_big))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert store.usage()[broker] == evidence


def _on_disk(db: Path) -> int:
    """Bytes in the database file, its write-ahead log and its index."""
    return sum(f.stat().st_size for f in db.parent.glob(db.name + "*"))


async def test_a_batch_that_cannot_fit_the_store_is_refused_with_resource_exhausted(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    async with running_collector(
        tmp_path, pki, store_limits=StoreLimits(max_bytes=256 * 1024)
    ) as running:
        await export(running, pki, ("agency", "post"), request("post", span()))
        too_big = [span(attributes={f"p{n}": "z" * 4000 for n in range(20)}) for _ in range(30)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await export(running, pki, ("agency", "post"), request("post", *too_big))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "size cap" in (refused.value.details() or "")
        assert str(running.store.path) not in (refused.value.details() or "")
        assert stored(running) == 1


async def test_the_request_cap_is_configurable(tmp_path: Path, pki: CertificateAuthority) -> None:
    async with running_collector(tmp_path, pki, max_request_bytes=64 * 1024) as running:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            big = span(attributes={"a": "x" * 100_000})
            await export(running, pki, ("agency", "post"), request("post", big))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_span_limits_are_configurable(tmp_path: Path, pki: CertificateAuthority) -> None:
    limits = SpanLimits(max_attributes=2, max_value_chars=3, max_events=1)
    async with running_collector(tmp_path, pki, span_limits=limits) as running:
        await export(
            running,
            pki,
            ("agency", "post"),
            request("post", span(attributes={"a": "long", "b": "long", "c": "c"}, events=3)),
        )
        [kept] = running.store.trace(running.store.search(TraceQuery())[0][0].trace_id)
        assert kept.attributes == {"a": "lon", "b": "lon"}
        assert len(kept.events) == 1


# -- the standard exporters ----------------------------------------------------------------


async def test_an_agency_exports_with_its_credentials_directory(
    collector: RunningCollector, pki: CertificateAuthority
) -> None:
    built = tracer_provider(
        "post", otlp_endpoint=collector.endpoint, credentials=pki.dir / "agencies" / "post", env={}
    )
    assert built is not None
    provider, _ = built
    provider.get_tracer("t").start_span("hello").end()
    # The SDK exports from its own thread, synchronously: keep this loop free to answer.
    assert await asyncio.to_thread(provider.force_flush, 10_000)
    await asyncio.to_thread(provider.shutdown)
    [summary] = collector.store.search(TraceQuery())[0]
    [kept] = collector.store.trace(summary.trace_id)
    assert kept.resource["tabadol.sender"] == f"spiffe://{TRUST_DOMAIN}/agency/post"


async def test_the_standard_otel_certificate_variables_still_work(
    collector: RunningCollector, pki: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    agency = pki.dir / "agencies" / "post"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(agency / "ca.crt"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", str(agency / "agency.key"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", str(agency / "agency.crt"))
    built = tracer_provider("post", otlp_endpoint=collector.endpoint)
    assert built is not None
    provider, _ = built
    provider.get_tracer("t").start_span("hello").end()
    # The SDK exports from its own thread, synchronously: keep this loop free to answer.
    assert await asyncio.to_thread(provider.force_flush, 10_000)
    await asyncio.to_thread(provider.shutdown)
    assert stored(collector) == 1


# -- the decisions alone (ingest.py: no gRPC, no store) ----------------------------------


def _who(role: str, name: str = "") -> PlatformIdentity:
    return PlatformIdentity(role, name, serial=1, expires_at=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("role", "name", "services", "refused"),
    [
        ("broker", "", {"tabadol-broker"}, None),
        ("agency", "post", {"post", "anything"}, None),
        ("agency", "post", {"post", "tabadol-broker"}, "PERMISSION_DENIED"),
        ("agency", "post", {"TABADOL\u2010BROKER\u2060"}, "PERMISSION_DENIED"),
        ("agency", "tabadol", {"tabadol-broker"}, "PERMISSION_DENIED"),
        ("broker", "", {"tabadol-broker", "anything"}, None),
        ("operator", "olga", {"post"}, "PERMISSION_DENIED"),
        ("auditor", "adel", set(), "PERMISSION_DENIED"),
        ("ops", "", {"post"}, "PERMISSION_DENIED"),
    ],
)
def test_admit_sender_lets_only_the_broker_and_agencies_send_and_only_the_broker_as_itself(
    role: str, name: str, services: set[str], refused: str | None
) -> None:
    decision = admit_sender(_who(role, name), services)
    assert (decision.code if decision else None) == refused


def test_admit_sender_refuses_an_undeclared_agency_only_when_the_declared_set_is_known() -> None:
    assert admit_sender(_who("agency", "ghost"), {"ghost"}, frozenset()) is not None
    assert admit_sender(_who("agency", "ghost"), {"ghost"}, None) is None
    assert admit_sender(_who("broker"), {"tabadol-broker"}, frozenset()) is None


@pytest.mark.parametrize(
    ("service", "agency", "declared", "stored_as"),
    [
        ("post", "post", (), "post"),
        ("post-api", "post", (), "post-api"),
        ("post.api", "post", (), "post.api"),
        ("post/api", "post", (), "post/api"),
        ("postal", "post", (), "post/postal"),
        ("Post", "post", (), "post/Post"),
        ("nocr", "post", (), "post/nocr"),
        ("", "post", (), "post/"),
        ("tax-office", "tax", ("tax", "tax-office"), "tax/tax-office"),
        ("tax-office-api", "tax", ("tax", "tax-office"), "tax/tax-office-api"),
        ("tax-offices", "tax", ("tax", "tax-office"), "tax-offices"),
        ("tax-office.api", "tax-office", ("tax", "tax-office"), "tax-office.api"),
    ],
)
def test_own_service_name_keeps_an_agency_in_its_namespace(
    service: str, agency: str, declared: tuple[str, ...], stored_as: str
) -> None:
    assert own_service_name(service, agency, declared) == stored_as


def test_admit_spans_stamps_the_sender_even_on_a_resource_full_of_attributes() -> None:
    limits = SpanLimits(max_attributes=3)
    record = SpanRecord(
        "0" * 31 + "1", "0" * 15 + "1", "", "post", "n", 2, 10, 20,
        resource={"a": "1", "b": "2", "c": "3", "tabadol.sender": "spiffe://x/broker"},
    )  # fmt: skip
    [kept], dropped = admit_spans([record], "spiffe://td/agency/post", limits, now_ns=15)
    assert dropped == 0
    assert len(kept.resource) == 3
    assert kept.resource["tabadol.sender"] == "spiffe://td/agency/post"


def test_admit_spans_bounds_nested_values_and_clamps_an_end_before_the_start() -> None:
    limits = SpanLimits(max_attributes=2, max_value_chars=2)
    record = SpanRecord(
        "0" * 31 + "1", "0" * 15 + "1", "", "post", "n", 2, 100, 50,
        attributes={"list": ["abc", ["xyz", "q", "r"], "s"], "map": {"k": "long", "l": 1, "m": 2}},
    )  # fmt: skip
    [kept], _ = admit_spans([record], "s", limits, now_ns=100)
    assert kept.attributes == {"list": ["ab", ["xy", "q"]], "map": {"k": "lo", "l": 1}}
    assert kept.end_ns == kept.start_ns == 100
