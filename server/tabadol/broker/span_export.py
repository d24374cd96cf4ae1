"""The broker's spans, built and exported off the call path.

The call path queues one tuple per finished call (tabadol.broker.tracing); a thread takes
them in batches, encodes each batch as one OTLP ExportTraceServiceRequest and hands it to
the OpenTelemetry SDK's OTLP exporter (its endpoint, TLS, headers, timeout, compression and
retries, configured as for any SDK exporter). The encoding writes each span's protobuf
fields directly: a span's constant part (name, kind, the method's attributes) is
serialized once per method with the generated classes, and per call only ids, times and
the call's own attributes are added. Batching follows ``OTEL_BSP_*``.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from tabadol.broker.tracing import CallTrace, Finished
from tabadol.client.tracing import ExporterCredentials
from tabadol.ledger.record import LedgerRecord
from tabadol.samplers import TracingConfigError, check_exporter
from tabadol.status import Code

log = logging.getLogger(__name__)

SCOPE = "tabadol.broker"


@dataclass(frozen=True)
class BatchSettings:
    """``OTEL_BSP_*``, in the SDK's units: spans (two per call) and milliseconds."""

    max_queue_size: int = 2048
    schedule_delay_ms: int = 5000
    max_export_batch_size: int = 512
    export_timeout_ms: int = 30000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BatchSettings:
        """Read once at start; a value that is not a positive whole number is an error
        naming its variable (the SDK would log it and carry on with the default)."""
        values: dict[str, int] = {}
        for name, variable in (
            ("max_queue_size", "OTEL_BSP_MAX_QUEUE_SIZE"),
            ("schedule_delay_ms", "OTEL_BSP_SCHEDULE_DELAY"),
            ("max_export_batch_size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
            ("export_timeout_ms", "OTEL_BSP_EXPORT_TIMEOUT"),
        ):
            text = env.get(variable, "").strip()
            if not text:
                continue
            try:
                value = int(text)
            except ValueError:
                raise TracingConfigError(f"{variable}={text!r} is not a whole number") from None
            if value <= 0:
                raise TracingConfigError(f"{variable}={value} must be positive")
            values[name] = value
        settings = cls(**values)
        if settings.max_export_batch_size > settings.max_queue_size:
            raise TracingConfigError(
                f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={settings.max_export_batch_size} is more "
                f"than OTEL_BSP_MAX_QUEUE_SIZE={settings.max_queue_size}"
            )
        return settings


# Protobuf wire format: (field number << 3) | wire type.
_TRACE_ID, _SPAN_ID, _TRACE_STATE, _PARENT_ID = b"\x0a\x10", b"\x12\x08", b"\x1a", b"\x22\x08"
_START, _END, _ATTRIBUTE, _SPANS = b"\x39", b"\x41", b"\x4a", b"\x12"
_SMALL = [bytes((i,)) for i in range(128)]
_fixed64 = struct.Struct("<Q").pack


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL[n]
    n &= (1 << 64) - 1  # int64 as the wire carries a negative one
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _value(value: str | int) -> AnyValue:
    return AnyValue(string_value=value) if isinstance(value, str) else AnyValue(int_value=value)


class _IntAttribute:
    """An int attribute of a fixed key, encoded without building messages."""

    def __init__(self, key: str) -> None:
        self._key = _field(b"\x0a", key.encode())

    def __call__(self, value: int) -> bytes:
        number = b"\x18" + _varint(value)
        return _field(_ATTRIBUTE, self._key + _field(b"\x12", number))


class _StrAttribute:
    def __init__(self, key: str) -> None:
        self._key = _field(b"\x0a", key.encode())

    def __call__(self, value: str) -> bytes:
        text = _field(b"\x0a", value.encode())
        return _field(_ATTRIBUTE, self._key + _field(b"\x12", text))


_request_bytes = _IntAttribute("tabadol.request.bytes")
_request_messages = _IntAttribute("tabadol.request.messages")
_response_bytes = _IntAttribute("tabadol.response.bytes")
_response_messages = _IntAttribute("tabadol.response.messages")
_request_id = _StrAttribute("tabadol.request_id")
# Consumers are few: encoded once each (bounded: a refused certificate's claim is anyone's).
_consumer = functools.lru_cache(maxsize=4096)(_StrAttribute("tabadol.consumer"))
_status_code = _IntAttribute("rpc.grpc.status_code")
# Calls through the HTTP entry say how they came in; a gRPC call's span is as it always was.
_PROTOCOL = {p: _StrAttribute("tabadol.protocol")(p) for p in ("connect", "rest")}


def _code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return str(code)


def _status(code: int) -> bytes:
    """rpc.grpc.status_code, and for any code but OK status ERROR named by the code alone:
    never the details, which can carry personal data (docs/tracing.md)."""
    if code == 0:
        return _status_code(0)
    error = Status(code=Status.STATUS_CODE_ERROR, message=_code_name(code))
    return _status_code(code) + Span(status=error).SerializeToString()


# The SDK's span flags: whether the parent is remote is known (0x100), and it is (0x200).
_LOCAL_PARENT = Span(flags=0x100).SerializeToString()
_REMOTE_PARENT = Span(flags=0x300).SerializeToString()
_STATUS = {code: _status(code) for code in range(17)}


def server_address(endpoint: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) as the span's server.address and server.port."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def _constant_part(
    service: str,
    method: str,
    kind: Span.SpanKind.ValueType,
    own: tuple[tuple[str, str | int], ...],
    flags: int = 0,
) -> bytes:
    """What every span of one kind for one method has in common, serialized."""
    attributes = (("rpc.system", "grpc"), ("rpc.service", service), ("rpc.method", method), *own)
    return Span(
        name=f"{service}/{method}",
        kind=kind,
        attributes=[KeyValue(key=k, value=_value(v)) for k, v in attributes],
        status=Status(),
        flags=flags,
    ).SerializeToString()


# Serialized once per method (and endpoint): they are few, and the cache is bounded anyway.
@functools.lru_cache(maxsize=4096)
def _server_part(service: str, method: str, provider: str, kind: str) -> bytes:
    own = (("tabadol.provider", provider), ("tabadol.rpc_kind", kind))
    return _constant_part(service, method, Span.SPAN_KIND_SERVER, own)


@functools.lru_cache(maxsize=4096)
def _hop_part(service: str, method: str, endpoint: str) -> bytes:
    host, port = server_address(endpoint)
    own = (("server.address", host), ("server.port", port), ("tabadol.endpoint", endpoint))
    return _constant_part(service, method, Span.SPAN_KIND_CLIENT, own, flags=0x100)


class SpanEncoder:
    """Finished calls as one OTLP ExportTraceServiceRequest (serialized); pure."""

    def __init__(self, resource: Resource) -> None:
        # The resource and scope as the SDK's own encoder writes them.
        template = encode_spans(
            [
                ReadableSpan(
                    "-",
                    SpanContext(1, 1, False),
                    resource=resource,
                    instrumentation_scope=InstrumentationScope(SCOPE),
                )
            ]
        )
        resource_spans = template.resource_spans[0]
        scope_spans = resource_spans.scope_spans[0]
        scope_spans.ClearField("spans")
        self._scope_spans_head = scope_spans.SerializeToString()
        resource_spans.ClearField("scope_spans")
        self._resource_spans_head = resource_spans.SerializeToString()

    def encode(self, batch: Sequence[Finished]) -> bytes:
        """The serialized request carrying every span of ``batch``."""
        parts: list[bytes] = [self._scope_spans_head]
        for trace, record, hop_started_ns in batch:
            code = record.status_code
            status = _STATUS.get(code) or _status(code)
            ids = _TRACE_ID + trace.trace_id
            state = _field(_TRACE_STATE, trace.tracestate.encode()) if trace.tracestate else b""
            end = _END + _fixed64(record.end_ns)
            server = b"".join(
                (
                    ids,
                    _SPAN_ID,
                    trace.span_id,
                    state,
                    _PARENT_ID + trace.parent_id if trace.parent_id else b"",
                    _START,
                    _fixed64(record.start_ns),
                    end,
                    _server_part(record.service, record.method, record.provider, record.kind),
                    _REMOTE_PARENT if trace.parent_id else _LOCAL_PARENT,
                    status,
                    _consumer(record.consumer),
                    _request_id(record.request_id),
                    _request_bytes(record.request_bytes),
                    _request_messages(record.request_messages),
                    _response_bytes(record.response_bytes),
                    _response_messages(record.response_messages),
                    _PROTOCOL.get(record.protocol, b""),
                )
            )
            parts += (_SPANS, _varint(len(server)), server)
            if hop_started_ns:
                hop = b"".join(
                    (
                        ids,
                        _SPAN_ID,
                        trace.hop_id,
                        state,
                        _PARENT_ID,
                        trace.span_id,
                        _START,
                        _fixed64(hop_started_ns),
                        end,
                        _hop_part(record.service, record.method, record.endpoint),
                        status,
                    )
                )
                parts += (_SPANS, _varint(len(hop)), hop)
        scope_spans = b"".join(parts)
        resource_spans = self._resource_spans_head + _field(b"\x12", scope_spans)
        return _field(b"\x0a", resource_spans)


def span_count(batch: Sequence[Finished]) -> int:
    return sum(2 if hop else 1 for _, _, hop in batch)


class SpanSink(Protocol):
    """Where batches go: ``export`` is True when the batch was delivered."""

    def export(self, batch: Sequence[Finished]) -> bool: ...

    def renew_credentials(self, credentials: ExporterCredentials) -> None: ...

    def shutdown(self) -> None: ...


def _request_exporter_class() -> Callable[..., Any]:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    class RequestExporter(OTLPSpanExporter):
        """The SDK's OTLP exporter, sending a request already built. Its one hook for
        that, ``_translate_data``, is the SDK's own (the mixin's abstract step)."""

        def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
            return cast(ExportTraceServiceRequest, data)

        def _count_data(self, data: Any) -> int:
            return sum(len(s.spans) for r in data.resource_spans for s in r.scope_spans)

    return RequestExporter


class OtlpSink:
    """Encoded batches to an OTLP/gRPC collector, through the SDK's exporter."""

    def __init__(
        self,
        encoder: SpanEncoder,
        otlp_endpoint: str | None,
        credentials: ExporterCredentials | None,
        env: Mapping[str, str],
    ) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from tabadol.client.tracing import RenewableExporter, _exporter

        self._encoder = encoder
        self._parse = ExportTraceServiceRequest.FromString
        self._success = SpanExportResult.SUCCESS
        otlp = _request_exporter_class()

        def build(creds: ExporterCredentials | None) -> SpanExporter | None:
            return _exporter("otlp", otlp_endpoint, None, creds, env, otlp)

        self._renewable: RenewableExporter | None = None
        self._exporter: SpanExporter
        if credentials is not None:
            self._exporter = self._renewable = RenewableExporter(build, credentials)
        else:
            built = build(None)
            assert built is not None
            self._exporter = built

    def export(self, batch: Sequence[Finished]) -> bool:
        request = self._parse(self._encoder.encode(batch))
        return self._exporter.export(cast(Any, request)) is self._success

    def renew_credentials(self, credentials: ExporterCredentials) -> None:
        if self._renewable is not None:
            self._renewable.renew(credentials)

    def shutdown(self) -> None:
        self._exporter.shutdown()


class ConsoleSink:
    """SDK spans built from the batch, printed by the SDK's console exporter (slow; for
    looking, not for production)."""

    def __init__(self, resource: Resource) -> None:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        self._resource = resource
        self._scope = InstrumentationScope(SCOPE)
        self._exporter = ConsoleSpanExporter()

    def export(self, batch: Sequence[Finished]) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult

        spans = [span for finished in batch for span in self.readable(*finished)]
        return self._exporter.export(spans) is SpanExportResult.SUCCESS

    def readable(
        self, trace: CallTrace, record: LedgerRecord, hop_started_ns: int
    ) -> list[ReadableSpan]:
        """The call's spans as the SDK's ReadableSpans."""
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace import Status as SdkStatus
        from opentelemetry.trace import StatusCode as SdkStatusCode
        from opentelemetry.trace.span import TraceState

        def context(span_id: bytes, remote: bool = False) -> SpanContext:
            return SpanContext(
                int.from_bytes(trace.trace_id),
                int.from_bytes(span_id),
                remote,
                TraceFlags(1),
                TraceState.from_header([trace.tracestate]) if trace.tracestate else None,
            )

        code = record.status_code
        status = (
            SdkStatus(SdkStatusCode.UNSET)
            if code == 0
            else SdkStatus(SdkStatusCode.ERROR, _code_name(code))
        )
        name = f"{record.service}/{record.method}"
        rpc = {"rpc.system": "grpc", "rpc.service": record.service, "rpc.method": record.method}
        server = context(trace.span_id)
        spans = [
            ReadableSpan(
                name,
                server,
                context(trace.parent_id, remote=True) if trace.parent_id else None,
                self._resource,
                {
                    **rpc,
                    "tabadol.provider": record.provider,
                    "tabadol.rpc_kind": record.kind,
                    "rpc.grpc.status_code": code,
                    "tabadol.consumer": record.consumer,
                    "tabadol.request_id": record.request_id,
                    "tabadol.request.bytes": record.request_bytes,
                    "tabadol.request.messages": record.request_messages,
                    "tabadol.response.bytes": record.response_bytes,
                    "tabadol.response.messages": record.response_messages,
                    **({"tabadol.protocol": record.protocol} if record.protocol != "grpc" else {}),
                },
                kind=SpanKind.SERVER,
                status=status,
                start_time=record.start_ns,
                end_time=record.end_ns,
                instrumentation_scope=self._scope,
            )
        ]
        if hop_started_ns:
            host, port = server_address(record.endpoint)
            spans.append(
                ReadableSpan(
                    name,
                    context(trace.hop_id),
                    server,
                    self._resource,
                    {
                        **rpc,
                        "server.address": host,
                        "server.port": port,
                        "tabadol.endpoint": record.endpoint,
                        "rpc.grpc.status_code": code,
                    },
                    kind=SpanKind.CLIENT,
                    status=status,
                    start_time=hop_started_ns,
                    end_time=record.end_ns,
                    instrumentation_scope=self._scope,
                )
            )
        return spans

    def renew_credentials(self, credentials: ExporterCredentials) -> None:
        return None

    def shutdown(self) -> None:
        self._exporter.shutdown()


class SpanExport:
    """The exporting thread: takes the queued calls in batches, at most every
    ``schedule_delay_ms`` or as soon as a batch is full, and hands them to ``sink``."""

    def __init__(self, sink: SpanSink, settings: BatchSettings = BatchSettings()) -> None:
        self.sink = sink
        self.settings = settings
        # In calls: each call is up to two spans, and the settings count spans.
        self.capacity = max(1, settings.max_queue_size // 2)
        self.batch = max(1, settings.max_export_batch_size // 2)
        self.queue: deque[Finished] = deque()
        self.wake = threading.Event()
        self.exported = 0
        self.failed = 0
        self.dropped = 0
        self._flushes: list[threading.Event] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tabadol-spans", daemon=True)
        self._thread.start()

    def offer(self, finished: Finished) -> None:
        """Queue a finished call's spans (called on the request path: never waits). A full
        queue drops them, counted; a full batch wakes the thread."""
        queue = self.queue
        if len(queue) >= self.capacity:
            self.dropped += 2 if finished[2] else 1
            return
        queue.append(finished)
        if len(queue) == self.batch:
            self.wake.set()

    def _run(self) -> None:
        delay = self.settings.schedule_delay_ms / 1000
        while True:
            self.wake.wait(delay)
            self.wake.clear()
            with self._lock:
                flushes, self._flushes = self._flushes, []
                stopping = self._stopping
            self._drain()
            for done in flushes:
                done.set()
            if stopping:
                return

    def _drain(self) -> None:
        queue, size = self.queue, self.batch
        while queue:
            batch = [queue.popleft() for _ in range(min(size, len(queue)))]
            count = span_count(batch)
            try:
                delivered = self.sink.export(batch)
            except Exception:
                log.exception("exporting %d of the broker's spans failed", count)
                delivered = False
            if delivered:
                self.exported += count
            else:
                self.failed += count

    def flush(self, timeout_s: float) -> bool:
        """Export everything queued before this call; False on timeout or once stopped."""
        done = threading.Event()
        with self._lock:
            if self._stopping or not self._thread.is_alive():
                return False
            self._flushes.append(done)
        self.wake.set()
        return done.wait(timeout_s)

    def shutdown(self) -> None:
        """Export what is queued, bounded by the export timeout, then close the sink."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self.wake.set()
        self._thread.join(self.settings.export_timeout_ms / 1000)
        if self._thread.is_alive():
            log.warning(
                "the broker's span export did not finish within %d ms; %d calls' spans lost",
                self.settings.export_timeout_ms,
                len(self.queue),
            )
        self.sink.shutdown()

    def renew_credentials(self, credentials: ExporterCredentials) -> None:
        self.sink.renew_credentials(credentials)


def broker_resource(service_name: str) -> Resource:
    """The broker's resource, as the SDK builds one (OTEL_RESOURCE_ATTRIBUTES, detectors)."""
    return Resource.create({"service.name": service_name, "service.instance.id": uuid.uuid4().hex})


def span_export(
    service_name: str,
    exporter: str,
    otlp_endpoint: str | None,
    credentials: ExporterCredentials | None,
    env: Mapping[str, str],
) -> SpanExport | None:
    """The exporting thread for ``exporter`` (otlp, console, none: None)."""
    if exporter == "none":
        return None
    check_exporter(exporter)
    settings = BatchSettings.from_env(env)
    resource = broker_resource(service_name)
    sink: SpanSink = (
        ConsoleSink(resource)
        if exporter == "console"
        else OtlpSink(SpanEncoder(resource), otlp_endpoint, credentials, env)
    )
    return SpanExport(sink, settings)
