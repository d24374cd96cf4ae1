"""The viewer as an OTLP/gRPC collector: standard TraceService/Export, spans into the store."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import grpc.aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from tabadol.ops.model import SpanEvent, SpanRecord
from tabadol.ops.store import SpanStore

log = logging.getLogger("tabadol.ops")


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


def spans_from_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[SpanRecord]:
    """Flatten OTLP resource and scope spans into records; skips spans without valid ids."""
    records = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name") or "unknown_service")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    continue
                records.append(_record(span, service, resource))
    return records


def _record(span: trace_pb2.Span, service: str, resource: dict[str, Any]) -> SpanRecord:
    return SpanRecord(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() if len(span.parent_span_id) == 8 else "",
        service=service,
        name=span.name,
        kind=int(span.kind),
        start_ns=int(span.start_time_unix_nano),
        end_ns=int(span.end_time_unix_nano),
        status_code=int(span.status.code),
        status_message=span.status.message,
        attributes=attributes(span.attributes),
        events=tuple(
            SpanEvent(int(e.time_unix_nano), e.name, attributes(e.attributes)) for e in span.events
        ),
        resource=resource,
    )


class TraceCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Accepts spans from any OpenTelemetry SDK and stores them off the event loop."""

    def __init__(self, store: SpanStore) -> None:
        self.store = store
        self.received = 0

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        try:
            # Decoding and storing both happen off the event loop.
            count = await asyncio.to_thread(self._ingest, request)
        except Exception as e:
            # The SDK retries UNAVAILABLE; the message says what went wrong with the store.
            log.error("could not store spans: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"trace store: {e}")
        self.received += count
        return trace_service_pb2.ExportTraceServiceResponse()

    def _ingest(self, request: trace_service_pb2.ExportTraceServiceRequest) -> int:
        records = spans_from_request(request)
        self.store.add(records)
        return len(records)
