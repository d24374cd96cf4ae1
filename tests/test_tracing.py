"""One exchange is one trace: consumer, broker and provider spans, exported over mTLS to the
span collector and read back in the viewer's (Jaeger) shape."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace import TracerProvider

from tabadol.broker import Broker
from tabadol.client import ProviderServer, connect
from tabadol.client.tracing import tracer_provider
from tabadol.ops import jaeger
from tabadol.ops.model import TraceQuery
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN, start_broker
from tests.support.collector import RunningCollector, running_collector
from tests.support.echo import BIDI, SERVER_STREAM, SERVICE, UNARY, EchoProvider
from tests.support.exchange import eventually
from tests.support.metrics import scrape_async


@dataclass
class TracedExchange:
    ops: RunningCollector
    broker: Broker
    consumer: grpc.aio.Channel
    tracers: list[TracerProvider]

    async def flush(self) -> None:
        for provider in [*self.tracers, self.broker.tracing]:  # type: ignore[union-attr]
            await asyncio.to_thread(provider.force_flush)

    async def find_trace(self, tags: dict[str, str], services: int = 3) -> dict[str, Any]:
        """The one trace with these tags, once the viewer has ingested all its services."""
        store = self.ops.store
        found: list[dict[str, Any]] = []
        for _ in range(100):  # spans end and ingest asynchronously: wait, boundedly
            await self.flush()
            summaries, total = store.search(TraceQuery(tags=tuple(tags.items())))
            found = [jaeger.trace_json(store.trace(t.trace_id)) for t in summaries]
            if found and len(found[0]["processes"]) == services:
                assert total == 1
                return found[0]
            await asyncio.sleep(0.05)
        services = [sorted(p["serviceName"] for p in t["processes"].values()) for t in found]
        raise AssertionError(f"no complete trace with {tags} reached the viewer: {services}")


@pytest.fixture
async def traced(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> AsyncIterator[TracedExchange]:
    async with running_collector(tmp_path, pki) as ops:
        # Everyone exports over mTLS with their own certificate, as the collector requires.
        tracers = []
        for name in ("echo", "post"):
            built = tracer_provider(
                name,
                service_name=name,
                otlp_endpoint=ops.endpoint,
                credentials=pki.dir / "agencies" / name,
            )
            assert built is not None
            tracers.append(built[0])
        provider = ProviderServer(pki.dir / "agencies" / "echo", tracer_provider=tracers[0])
        provider.server.add_generic_rpc_handlers((EchoProvider(),))
        await provider.start()
        broker = await start_broker(
            tmp_path,
            pki.dir,
            echo_contracts,
            [provider.address],
            tracing=f'otlp_endpoint = "{ops.endpoint}"',
        )
        consumer = connect(
            f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post", tracer_provider=tracers[1]
        )
        yield TracedExchange(ops, broker, consumer, tracers)
        await consumer.close()
        await broker.stop(0)
        await provider.stop(0)
        for tracer in tracers:
            await asyncio.to_thread(tracer.shutdown)


def _by_kind(trace: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Spans keyed by (service, span.kind)."""
    spans = {}
    for span in trace["spans"]:
        service = trace["processes"][span["processID"]]["serviceName"]
        kind = next(t["value"] for t in span["tags"] if t["key"] == "span.kind")
        spans[(service, kind)] = span
    return spans


def _tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span["tags"]}


def _parent(span: dict[str, Any]) -> str:
    return str(span["references"][0]["spanID"]) if span["references"] else ""


async def test_one_exchange_is_one_trace_across_consumer_broker_and_provider(
    traced: TracedExchange,
) -> None:
    md = (("x-test-id", "trace-one"),)
    assert await traced.consumer.unary_unary(UNARY)(b"hello", metadata=md, timeout=10) == b"hello"

    trace = await traced.find_trace({"tabadol.consumer": "post", "rpc.method": "Unary"})
    spans = _by_kind(trace)
    assert set(spans) == {
        ("post", "client"),
        ("tabadol-broker", "server"),
        ("tabadol-broker", "client"),
        ("echo", "server"),
    }
    assert len({s["traceID"] for s in trace["spans"]}) == 1
    consumer, broker_in = spans[("post", "client")], spans[("tabadol-broker", "server")]
    broker_out, provider = spans[("tabadol-broker", "client")], spans[("echo", "server")]
    assert _parent(consumer) == ""
    assert _parent(broker_in) == consumer["spanID"]
    assert _parent(broker_out) == broker_in["spanID"]
    assert _parent(provider) == broker_out["spanID"]

    attributes = _tags(broker_in)
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == SERVICE
    assert attributes["rpc.method"] == "Unary"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["tabadol.consumer"] == "post"
    assert attributes["tabadol.provider"] == "echo"
    assert attributes["tabadol.request.bytes"] == 5
    assert attributes["tabadol.response.bytes"] == 5
    assert attributes["tabadol.request.messages"] == 1
    assert (
        _tags(broker_out)["tabadol.endpoint"] == traced.broker.config.services[SERVICE].endpoints[0]
    )


async def test_failed_call_marks_the_broker_span_as_error_with_the_grpc_status(
    traced: TracedExchange,
) -> None:
    md = (("x-test-status", "UNAVAILABLE"), ("x-test-details", "try later"))
    with pytest.raises(grpc.aio.AioRpcError):
        await traced.consumer.unary_unary(UNARY)(b"", metadata=md, timeout=10)

    trace = await traced.find_trace({"tabadol.consumer": "post", "error": "true"})
    broker_in = _tags(_by_kind(trace)[("tabadol-broker", "server")])
    assert broker_in["rpc.grpc.status_code"] == 14
    assert broker_in["otel.status_code"] == "ERROR"
    assert broker_in["otel.status_description"] == "UNAVAILABLE"


async def test_a_providers_error_message_never_reaches_the_trace_store(
    traced: TracedExchange,
) -> None:
    # Finding 1: the civil registry's NOT_FOUND named the person it did not find, and the
    # broker copied that into its span, where /api/traces?status=NOT_FOUND showed it.
    secret = "no person with national id 2870512345678 born 1987-05-12"
    md = (("x-test-status", "NOT_FOUND"), ("x-test-details", secret))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await traced.consumer.unary_unary(UNARY)(b"", metadata=md, timeout=10)
    assert failed.value.details() == secret  # the consumer itself still gets the message

    trace = await traced.find_trace({"tabadol.consumer": "post", "error": "true"})
    spans = _by_kind(trace)
    assert _tags(spans[("tabadol-broker", "server")])["otel.status_description"] == "NOT_FOUND"
    assert _tags(spans[("tabadol-broker", "client")])["otel.status_description"] == "NOT_FOUND"
    assert _tags(spans[("post", "client")])["otel.status_description"] == "NOT_FOUND"
    assert "2870512345678" not in json.dumps(trace)
    summaries, _ = traced.ops.store.search(TraceQuery(status="NOT_FOUND"))
    assert [s.trace_id for s in summaries] == [trace["traceID"]]


async def test_the_brokers_own_refusal_text_stays_out_of_its_span(
    traced: TracedExchange, pki: CertificateAuthority
) -> None:
    # A refusal's message is for the caller (and may echo what it sent); the span gets the
    # code's name only.
    async with connect(f"127.0.0.1:{traced.broker.port}", pki.dir / "agencies" / "nocr") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_stream(SERVER_STREAM)(b"", timeout=10).read()
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED

    trace = await traced.find_trace({"tabadol.consumer": "nocr"}, services=1)
    broker_in = _tags(_by_kind(trace)[("tabadol-broker", "server")])
    assert broker_in["otel.status_description"] == "PERMISSION_DENIED"
    assert (refused.value.details() or "") not in json.dumps(trace)


async def test_every_process_in_the_trace_names_its_verified_sender(
    traced: TracedExchange,
) -> None:
    assert await traced.consumer.unary_unary(UNARY)(b"hi", timeout=10) == b"hi"
    trace = await traced.find_trace({"tabadol.consumer": "post", "rpc.method": "Unary"})
    senders = {
        p["serviceName"]: {t["key"]: t["value"] for t in p["tags"]}["tabadol.sender"]
        for p in trace["processes"].values()
    }
    assert senders == {
        "post": f"spiffe://{TRUST_DOMAIN}/agency/post",
        "echo": f"spiffe://{TRUST_DOMAIN}/agency/echo",
        "tabadol-broker": f"spiffe://{TRUST_DOMAIN}/broker",
    }


async def test_stream_spans_count_messages_each_way(traced: TracedExchange) -> None:
    messages = [b"a" * 10, b"b" * 20, b"c" * 30]
    call = traced.consumer.stream_stream(BIDI)(iter(messages), timeout=10)
    assert [m async for m in call] == messages

    trace = await traced.find_trace({"rpc.method": "Bidi"})
    broker_in = _tags(_by_kind(trace)[("tabadol-broker", "server")])
    assert broker_in["tabadol.request.messages"] == 3
    assert broker_in["tabadol.response.messages"] == 3
    assert broker_in["tabadol.request.bytes"] == 60


async def test_calls_keep_flowing_with_the_collector_down_and_dropped_spans_are_counted(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A tiny queue and batch, so that spans must be dropped while the exporter is stuck
    # retrying a collector that is not there.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    monkeypatch.delenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", raising=False)
    broker = await start_broker(
        tmp_path,
        pki.dir,
        echo_contracts,
        [echo_provider.address],
        tracing='otlp_endpoint = "http://127.0.0.1:1"',
    )
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            for i in range(100):
                payload = str(i).encode()
                assert await channel.unary_unary(UNARY)(payload, timeout=10) == payload
        assert broker.tracing is not None
        assert broker.tracing.dropped() > 0
        # Counted without switching the SDK's internal metrics on for the whole process.
        assert "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED" not in os.environ
        # The batches the exporter gave up on are counted too, and both reach /metrics.
        assert await eventually(
            lambda: broker.tracing is not None and broker.tracing.export_failed() > 0, 30
        )
        broker.refresh_metrics()
        text = await scrape_async(
            f"https://127.0.0.1:{broker.metrics.port}/metrics", broker.config.broker.pki_dir
        )
        assert _counter(text, "tabadol_spans_dropped_total") == broker.tracing.dropped()
        assert _counter(text, "tabadol_spans_export_failed_total") >= 1
    finally:
        await broker.stop(0)


def _counter(metrics: str, name: str) -> float:
    """A label-less counter's value in Prometheus' text format."""
    return next(
        float(line.split()[1]) for line in metrics.splitlines() if line.startswith(f"{name} ")
    )
