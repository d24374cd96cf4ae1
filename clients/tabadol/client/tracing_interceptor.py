"""A CLIENT span per call, with W3C trace context sent in the call's metadata.

OpenTelemetry's contrib gRPC aio client interceptors wait for the call to finish inside
the interceptor. That swallows a cancel of unary-response calls (opentelemetry-python-
contrib issue 3271) and blocks ``call.write()`` on client-streaming calls until the call
ends. These interceptors never wait: they end the span from the call's done callback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_ENDING: set[asyncio.Future[None]] = set()  # span-ending tasks, kept until they run


class _Tracing:
    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("tabadol.client", tracer_provider=tracer_provider)

    def _start(self, details: grpc.aio.ClientCallDetails) -> tuple[Any, grpc.aio.ClientCallDetails]:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in carrier.items():
            metadata.add(key, value)
        return span, grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def _traced(self, continuation: Any, details: Any, request: Any) -> Any:
        span, details = self._start(details)
        call = await continuation(details, request)

        def done(finished: Any) -> None:
            # The call is over, so its status is ready at once; reading it is async in aio.
            task = asyncio.ensure_future(_end_span(span, finished))
            _ENDING.add(task)
            task.add_done_callback(_ENDING.discard)

        call.add_done_callback(done)
        return call


# gRPC files an interceptor under the first kind it implements, so one class per kind.
class _UnaryUnary(_Tracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self._traced(continuation, client_call_details, request)


class _UnaryStream(_Tracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self._traced(continuation, client_call_details, request)


class _StreamUnary(_Tracing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._traced(continuation, client_call_details, request_iterator)


class _StreamStream(_Tracing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._traced(continuation, client_call_details, request_iterator)


def tracing_interceptors(
    tracer_provider: TracerProvider | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that trace every RPC kind."""
    return [
        kind(tracer_provider) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
    ]


async def _end_span(span: Any, call: Any) -> None:
    code: grpc.StatusCode = await call.code()
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            # The code's name, not the details: these spans go to the exchange's collector,
            # and a provider's message can carry personal data.
            span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
