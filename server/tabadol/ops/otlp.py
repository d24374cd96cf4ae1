"""The span collector: standard OTLP/gRPC TraceService/Export, over mTLS, into the store.

Only the platform's own identities send spans (the broker and the agencies the exchange's
configuration declares); what each may claim, under which service name, and how large and
how dated a span may be, is decided in ingest.py. Here: the TLS
port, the identity of each call, and turning a refusal into a gRPC status, in one place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from tabadol.errors import TabadolError
from tabadol.identity import IdentityRejected, PlatformIdentity
from tabadol.ops.defaults import DEFAULT_MAX_REQUEST_MB
from tabadol.ops.ingest import (
    SenderRefused,
    SpanLimits,
    admit_sender,
    admit_spans,
    sender_spiffe_id,
)
from tabadol.ops.model import SpanEvent, SpanRecord
from tabadol.ops.store import SpanStore, StoreFull
from tabadol.ops.trust import OpsTrust
from tabadol.refusals import RefusalLog

log = logging.getLogger("tabadol.ops")

# gRPC's own default, and what OpenTelemetry exporters send at most by default.
DEFAULT_MAX_REQUEST_BYTES = DEFAULT_MAX_REQUEST_MB * 1024 * 1024


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
    """Accepts spans from the platform's own identities over mTLS, stamps each with its
    sender, bounds it (ingest.py), and stores it off the event loop."""

    def __init__(
        self,
        store: SpanStore,
        trust: OpsTrust,
        *,
        limits: SpanLimits | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.store = store
        self.trust = trust
        self.limits = limits or SpanLimits(max_age_s=store.limits.max_age_seconds)
        self._clock = clock
        self._refusals = RefusalLog(log)  # an exporter retries a refused batch for ever
        self.received = 0
        self.rejected = 0

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        peer = context.peer()
        try:
            who = self._sender(context)
        except IdentityRejected as e:
            host = peer.rpartition(":")[0] or peer  # one log line per host, not per port
            self._refusals.warn(("otlp", host), "OTLP export from %s refused: %s", peer, e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"span collector: {e}")
        try:
            # Decoding, bounding and storing (evicting to stay under the store's size cap)
            # all happen off the event loop.
            outcome = await asyncio.to_thread(self._ingest, request, who)
        except StoreFull as e:
            self._refusals.warn(("otlp-full", str(who)), "spans from %s refused: %s", who, e)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "span collector: this batch does not fit under the trace store's size cap "
                "even with every span received before it evicted; export smaller batches",
            )
        except Exception as e:
            # The SDK retries UNAVAILABLE; the message says what went wrong with the store.
            log.error("could not store spans: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"trace store: {e}")
        if isinstance(outcome, SenderRefused):
            self._refusals.warn(("otlp", str(who)), "OTLP export refused: %s", outcome.message)
            await context.abort(grpc.StatusCode[outcome.code], f"span collector: {outcome.message}")
        stored, dropped = outcome
        self.received += stored
        self.rejected += dropped
        response = trace_service_pb2.ExportTraceServiceResponse()
        if dropped:
            response.partial_success.rejected_spans = dropped
            response.partial_success.error_message = (
                f"{dropped} spans dropped: start time more than {self.limits.max_future_s:g}s "
                f"ahead of the collector's clock or older than {self.limits.max_age_s:g}s"
            )
        return response

    def _ingest(
        self, request: trace_service_pb2.ExportTraceServiceRequest, who: PlatformIdentity
    ) -> SenderRefused | tuple[int, int]:
        """Store what ``who`` sent; (stored, dropped), or why nothing of it may be stored."""
        records = spans_from_request(request)
        declared = self.trust.agencies
        refused = admit_sender(who, {r.service for r in records}, declared)
        if refused is not None:
            return refused
        sender = sender_spiffe_id(who, self.trust.trust_domain)
        kept, dropped = admit_spans(
            records,
            sender,
            self.limits,
            self._clock(),
            agency=who.name if who.role == "agency" else None,
            declared=declared or (),
        )
        self.store.add(kept)
        return len(kept), dropped

    def _sender(self, context: grpc.aio.ServicerContext[Any, Any]) -> PlatformIdentity:
        """The verified identity behind this call's client certificate."""
        certs = list(context.auth_context().get("x509_pem_cert") or ())
        if not certs:
            raise IdentityRejected("no client certificate; export over mTLS with a platform one")
        return self.trust.identify(certs[0])


def server_options(max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> list[tuple[str, int]]:
    """gRPC server options for the collector: requests over the cap get RESOURCE_EXHAUSTED
    from gRPC itself, before any of it is decoded."""
    return [("grpc.max_receive_message_length", max_request_bytes)]


def add_otlp_port(server: grpc.aio.Server, address: str, trust: OpsTrust) -> int:
    """Listen for OTLP/gRPC on ``address`` over TLS with the ops certificate, requiring a
    client certificate from the platform CA; returns the bound port."""
    credentials = grpc.ssl_server_credentials(
        [(trust.key_pem, trust.cert_pem)],
        root_certificates=trust.ca_pem,
        require_client_auth=True,
    )
    try:
        return server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise TabadolError(f"--otlp: cannot listen on {address}: {e}") from e
