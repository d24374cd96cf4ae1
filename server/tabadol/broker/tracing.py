"""The broker's spans: a server span per call and a client span for the provider hop.

Attributes follow the OpenTelemetry RPC conventions (rpc.system, rpc.service, rpc.method,
rpc.grpc.status_code) on both; the server span adds the exchange's own (consumer, provider,
request id, bytes and message counts each way), the client span the provider endpoint.
"""

from __future__ import annotations

import functools

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tabadol.broker.exchange import Exchange
from tabadol.metadata import Metadata


class _MetadataGetter(Getter[Metadata]):
    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()
_PROPAGATOR = TraceContextTextMapPropagator()


@functools.lru_cache(maxsize=1024)
def _server_address(endpoint: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) as the span's server.address and server.port; parsed
    once per endpoint, not per call."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


class BrokerTracing:
    """Starts and ends the broker's spans for an Exchange."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("tabadol.broker")

    def start(self, exchange: Exchange, incoming: Metadata) -> None:
        parent = _PROPAGATOR.extract(incoming, getter=_GETTER)
        method = exchange.method
        exchange.span = self._tracer.start_span(
            method.path[1:],
            context=parent,
            kind=SpanKind.SERVER,
            start_time=exchange.started_ns,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": method.service,
                "rpc.method": method.name,
                "tabadol.provider": exchange.provider,
                "tabadol.rpc_kind": method.kind.value,
            },
        )
        context = exchange.span.get_span_context()
        if context.is_valid:
            exchange.trace_id = format(context.trace_id, "032x")

    def start_provider_hop(self, exchange: Exchange) -> Metadata:
        """Start the client span; returns the trace headers the provider must receive."""
        method = exchange.method
        host, port = _server_address(exchange.endpoint)
        span = self._tracer.start_span(
            method.path[1:],
            context=trace.set_span_in_context(exchange.span, Context()),
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": method.service,
                "rpc.method": method.name,
                "server.address": host,
                "server.port": port,
                "tabadol.endpoint": exchange.endpoint,
            },
        )
        exchange.client_span = span
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span, Context()))
        return tuple(carrier.items())

    def finish(self, exchange: Exchange) -> None:
        """End both spans. The exchange's own attributes go on the server span only: the
        provider hop is its child, and every attribute costs CPU to record and export."""
        code = exchange.code or grpc.StatusCode.UNKNOWN
        # The code's name only, never the details: a provider's message can carry personal
        # data (a NOT_FOUND naming a national id), and a refusal's can echo the caller's.
        status = None if code is grpc.StatusCode.OK else Status(StatusCode.ERROR, code.name)
        end = exchange.ended_ns or None
        hop = exchange.client_span
        if hop is not None:
            if hop.is_recording():
                hop.set_attribute("rpc.grpc.status_code", code.value[0])
                if status is not None:
                    hop.set_status(status)
            hop.end(end_time=end)
        span = exchange.span
        if span is None:
            return
        if span.is_recording():
            span.set_attributes(
                {
                    "rpc.grpc.status_code": code.value[0],
                    "tabadol.consumer": exchange.consumer,
                    "tabadol.request_id": exchange.request_id,
                    "tabadol.request.bytes": exchange.request_bytes,
                    "tabadol.request.messages": exchange.request_messages,
                    "tabadol.response.bytes": exchange.response_bytes,
                    "tabadol.response.messages": exchange.response_messages,
                }
            )
            if status is not None:
                span.set_status(status)
        span.end(end_time=end)
