"""The conformance provider: gRPC's interop test server, behind a Tabadol ProviderServer.

It behaves as gRPC's interop test descriptions require of a server: responses of the requested
sizes filled with zero bytes, delays between streamed responses, the requested status instead
of OK, and the two echoed metadata keys. UnimplementedCall is left to the generated base class,
so it answers UNIMPLEMENTED like any method a provider declares but never wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio

from tabadol.conformance.v1 import test_service_pb2 as pb
from tabadol.conformance.v1 import test_service_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TestService"].full_name
ECHO_INITIAL_KEY = "x-grpc-test-echo-initial"
ECHO_TRAILING_KEY = "x-grpc-test-echo-trailing-bin"

# grpc.aio ends a handler's request iterator alike when the caller half-closes and when it
# cancels; the cancel reaches the handler's task a moment later (well under a millisecond on
# an idle event loop). Waiting this long at the end of a request stream lets a cancel land
# inside the handler, so that a cancelled stream is never answered as if it were complete.
CANCEL_GRACE_S = 0.02

Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")


@dataclass
class ObservedCall:
    """One call as the provider saw it: its method, its metadata and whether it was cancelled."""

    method: str
    metadata: dict[str, str | bytes]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class ConformanceService(pb_grpc.TestServiceServicer):
    """TestService with the interop server's semantics; keeps every call it saw in ``calls``."""

    def __init__(self) -> None:
        self.calls: list[ObservedCall] = []
        self._arrived = asyncio.Event()

    async def call_with(self, key: str, value: str) -> ObservedCall:
        """The call whose request metadata has ``key: value``, once it has reached the provider."""
        while True:
            for call in self.calls:
                if call.metadata.get(key) == value:
                    return call
            self._arrived.clear()
            await self._arrived.wait()

    async def EmptyCall(self, request: pb.Empty, context: Context) -> pb.Empty:
        with self._observing("EmptyCall", context):
            await _echo_metadata(context)
            return pb.Empty()

    async def UnaryCall(self, request: pb.SimpleRequest, context: Context) -> pb.SimpleResponse:
        with self._observing("UnaryCall", context):
            await _echo_metadata(context)
            await _fail_if_asked(request.response_status, context)
            return pb.SimpleResponse(payload=_zeros(request.response_size))

    async def StreamingOutputCall(
        self, request: pb.StreamingOutputCallRequest, context: Context
    ) -> AsyncIterator[pb.StreamingOutputCallResponse]:
        with self._observing("StreamingOutputCall", context):
            await _echo_metadata(context)
            await _fail_if_asked(request.response_status, context)
            async for response in _responses(request):
                yield response

    async def StreamingInputCall(
        self, request_iterator: AsyncIterator[pb.StreamingInputCallRequest], context: Context
    ) -> pb.StreamingInputCallResponse:
        with self._observing("StreamingInputCall", context):
            await _echo_metadata(context)
            size = 0
            async for request in _until_half_close(request_iterator):
                size += len(request.payload.body)
            return pb.StreamingInputCallResponse(aggregated_payload_size=size)

    async def FullDuplexCall(
        self, request_iterator: AsyncIterator[pb.StreamingOutputCallRequest], context: Context
    ) -> AsyncIterator[pb.StreamingOutputCallResponse]:
        with self._observing("FullDuplexCall", context):
            await _echo_metadata(context)
            async for request in _until_half_close(request_iterator):
                await _fail_if_asked(request.response_status, context)
                async for response in _responses(request):
                    yield response

    @contextmanager
    def _observing(self, method: str, context: Context) -> Iterator[ObservedCall]:
        call = ObservedCall(method, dict(context.invocation_metadata() or ()))
        self.calls.append(call)
        self._arrived.set()
        try:
            yield call
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller cancels or its deadline passes.
            call.cancelled.set()
            raise


def add_to_server(server: grpc.aio.Server) -> ConformanceService:
    """Registers a new ConformanceService on a server that has not started yet, and returns it."""
    # mypy-protobuf marks every method abstract; UnimplementedCall is left out on purpose.
    service = ConformanceService()  # type: ignore[abstract]
    pb_grpc.add_TestServiceServicer_to_server(service, server)
    return service


async def _echo_metadata(context: Context) -> None:
    """Echo the interop keys: one into the initial metadata, one into the trailers."""
    metadata = tuple(context.invocation_metadata() or ())
    initial = tuple((k, v) for k, v in metadata if k == ECHO_INITIAL_KEY)
    if initial:
        await context.send_initial_metadata(initial)
    trailing = tuple((k, v) for k, v in metadata if k == ECHO_TRAILING_KEY)
    if trailing:
        context.set_trailing_metadata(trailing)


async def _until_half_close(requests: AsyncIterator[Request]) -> AsyncIterator[Request]:
    """The request stream, ending in CancelledError instead if the caller cancelled it."""
    async for request in requests:
        yield request
    await asyncio.sleep(CANCEL_GRACE_S)


async def _fail_if_asked(status: pb.EchoStatus, context: Context) -> None:
    if status.code == 0:
        return
    code = _STATUS_CODES.get(status.code)
    if code is None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"response_status.code {status.code} is not a gRPC status code (1 to 16)",
        )
    await context.abort(code, status.message)


async def _responses(
    request: pb.StreamingOutputCallRequest,
) -> AsyncIterator[pb.StreamingOutputCallResponse]:
    for parameters in request.response_parameters:
        if parameters.interval_us:
            await asyncio.sleep(parameters.interval_us / 1_000_000)
        yield pb.StreamingOutputCallResponse(payload=_zeros(parameters.size))


def _zeros(size: int) -> pb.Payload:
    return pb.Payload(body=bytes(size))


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK}
