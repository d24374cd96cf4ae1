"""How a call crosses the broker once admitted: messages, metadata, status and time limits.

Payloads are opaque bytes: no serializer is configured on either leg. Nothing here answers
the consumer with a status: a call that must end raises ``Ending``, and the request path
(``tabadol.broker.proxy``) answers it in one place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, cast

import grpc
import grpc.aio

from tabadol.broker.call import Call, Ending
from tabadol.broker.upstream import Route
from tabadol.metadata import REQUEST_ID_KEY, Metadata, response_metadata
from tabadol.status import Code

log = logging.getLogger("tabadol.broker")
Context = grpc.aio.ServicerContext[Any, Any]
GRPC_CODES = {Code(c.value[0]): c for c in grpc.StatusCode}


def code_of(status: grpc.StatusCode) -> Code:
    return Code(status.value[0])


async def requests_of(
    requests: AsyncIterator[bytes],
    call: Call,
    handler: asyncio.Task[Any] | None,
    route: Route,
) -> AsyncIterator[bytes]:
    """The consumer's messages, counted, ending in a cancel (not a half-close) if it cancelled.

    gRPC ends a server's request iterator the same way whether the consumer half-closed or
    went away. Passing that on as a half-close would tell the provider the stream was
    complete; a provider might then commit a batch the consumer abandoned.
    """
    limit = route.max_message_bytes
    try:
        async for message in requests:
            if limit is not None and len(message) > limit:
                # Ends the provider call; forwarding then reports this status to the consumer.
                call.cut(Code.RESOURCE_EXHAUSTED, _too_big(len(message), route))
                raise asyncio.CancelledError("a request message is over the service's size limit")
            yield call.traffic.request(message)
    except Ending as refused:
        # The consumer's stream itself could not give the next message (the gateway could not
        # decode it): the provider call is cancelled, not half-closed, and the consumer told.
        # Cancelled here and now: raised into gRPC's request-writing task alone, a
        # CancelledError before the first message may still leave the call half-closed.
        call.cut(refused.code, refused.details)
        if call.provider_call is not None:
            call.provider_call.cancel()
        raise asyncio.CancelledError(refused.details) from None
    # The consumer's cancel reaches the handler's task a loop turn or two after the iterator
    # ends (more on a busy loop); raising here makes gRPC cancel the provider call instead
    # of half-closing it. Ten turns cost microseconds on a genuine half-close.
    for _ in range(10):
        if handler is not None and (handler.cancelling() or handler.done()):
            raise asyncio.CancelledError("the consumer cancelled mid-stream")
        await asyncio.sleep(0)


async def single_request(context: Context) -> bytes:
    """The one request message of a unary-request call, or INTERNAL without it.

    Read from the context, not through the handler's request iterator: the same read
    without an async generator around it (measured: 5% of the broker's CPU per unary call).
    """
    message = await context.read()
    if message is not grpc.aio.EOF:
        return cast(bytes, message)
    raise Ending(
        Code.INTERNAL,
        "Tabadol broker: the call ended its request stream without a request message",
    )


def _cancelled_by_broker() -> bool:
    """The provider call was cancelled, but not because our own task was (a channel closed)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class TryElsewhere(Exception):
    """The attempt failed before any answer, and the call may be retried elsewhere."""


async def forward_unary(
    provider_call: Any,
    context: Context,
    call: Call,
    retry: Callable[[Call, Context], bool] | None = None,
) -> bytes:
    """Await a unary-response call and relay its metadata to the consumer."""
    try:
        response: bytes = await provider_call
        initial = response_metadata(await provider_call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        context.set_trailing_metadata(_trailers(await provider_call.trailing_metadata(), call))
        return response
    except grpc.aio.AioRpcError as e:
        # Counted against the endpoint whether or not the call is retried elsewhere.
        call.unreachable = _unreachable(e)
        if call.unreachable and retry is not None and retry(call, context):
            raise TryElsewhere from e
        await relay_error(e, context, call, headers_sent=False)
    except asyncio.CancelledError:
        provider_call.cancel()
        if _cancelled_by_broker():
            _provider_lost(call)
        raise


async def forward_stream(
    provider_call: Any, context: Context, call: Call, route: Route
) -> AsyncIterator[bytes]:
    """Relay a streaming-response call message by message, then its trailers; a status
    other than OK ends the call with it."""
    headers_sent = False
    try:
        initial = response_metadata(await provider_call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
            headers_sent = True
        limit = route.max_message_bytes
        while (message := await provider_call.read()) is not grpc.aio.EOF:
            headers_sent = True
            if limit is not None and len(message) > limit:
                provider_call.cancel()
                raise Ending(Code.RESOURCE_EXHAUSTED, _too_big(len(message), route, "response"))
            yield call.traffic.response(message)
        trailers = _trailers(await provider_call.trailing_metadata(), call)
        context.set_trailing_metadata(trailers)
        code = await provider_call.code()
        if code is not grpc.StatusCode.OK:
            details = _for_the_consumer(code, await provider_call.details() or "", call)
            raise Ending(code_of(code), details, trailers)
    except grpc.aio.AioRpcError as e:
        call.unreachable = _unreachable(e)
        await relay_error(e, context, call, headers_sent=headers_sent)
    except (asyncio.CancelledError, GeneratorExit) as e:
        provider_call.cancel()
        if isinstance(e, asyncio.CancelledError) and _cancelled_by_broker():
            _provider_lost(call)
        raise


def _provider_lost(call: Call) -> NoReturn:
    if call.cut_off is not None:
        # The broker itself ended the provider call, for a reason already recorded (a size
        # or time limit of the service, a revocation): that is what the consumer is told.
        raise call.cut_off
    raise Ending(
        Code.UNAVAILABLE,
        f"Tabadol broker: the call to provider {call.facts.provider!r} was cut off on the "
        "broker's side (its channel closed); it is safe to retry only if the method is idempotent",
    )


def _trailers(trailing: Metadata | None, call: Call) -> Metadata:
    return (*response_metadata(trailing), (REQUEST_ID_KEY, call.request_id))


# gRPC's own words when the broker could not reach the provider at all: then the broker says
# so in its own words, naming the provider agency. A provider's own UNAVAILABLE passes
# unchanged, unless it names an address (an endpoint, ipv4:, ipv6:, unix:): consumers are
# not shown the exchange's internal addresses.
_UNREACHABLE = ("failed to connect to all addresses", "DNS resolution failed")
MAX_ATTEMPTS = 3


def unreachable_message(call: Call) -> str:
    """What a consumer is told when no endpoint of the provider could be reached."""
    return (
        f"Tabadol broker: provider {call.facts.provider!r} unreachable for service "
        f"{call.facts.method.service!r}: the broker's connection to it failed; retry later"
    )


def _names_the_endpoint(details: str, call: Call) -> bool:
    """gRPC's own transport failure (it names the peer's address), not the provider's text."""
    endpoint = call.endpoint
    return (
        details.startswith(_UNREACHABLE)
        or (bool(endpoint) and endpoint in details)
        or any(scheme in details for scheme in ("ipv4:", "ipv6:", "unix:"))
    )


def _unreachable(error: grpc.aio.AioRpcError) -> bool:
    """The attempt never reached a provider: safe to count against the endpoint."""
    return error.code() is grpc.StatusCode.UNAVAILABLE and (error.details() or "").startswith(
        _UNREACHABLE
    )


def _too_big(size: int, route: Route, what: str = "request") -> str:
    return (
        f"Tabadol broker: a {what} message of {size} bytes is over the limit of "
        f"{route.max_message_bytes} bytes for service {route.method.service!r}"
    )


def within_size(route: Route, message: bytes, what: str = "request") -> bytes:
    limit = route.max_message_bytes
    if limit is not None and len(message) > limit:
        raise Ending(Code.RESOURCE_EXHAUSTED, _too_big(len(message), route, what))
    return message


class StreamWatch:
    """Ends a stream that runs past the service's maximum duration or falls idle."""

    def __init__(self, provider_call: Any, call: Call, route: Route) -> None:
        self._provider_call, self._call, self._route = provider_call, call, route
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        if self._route.max_stream_seconds or self._route.stream_idle_seconds:
            self._call.traffic.last_activity = time.monotonic()
            self._task = asyncio.create_task(self._watch())

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        route, traffic = self._route, self._call.traffic
        started = time.monotonic()
        while True:
            now = time.monotonic()
            ends = started + route.max_stream_seconds if route.max_stream_seconds else None
            idles = (
                traffic.last_activity + route.stream_idle_seconds
                if route.stream_idle_seconds
                else None
            )
            if ends is not None and now >= ends:
                why = f"a stream of service {route.method.service!r} may last at most {route.max_stream_seconds:g} s"
            elif idles is not None and now >= idles:
                why = f"the stream was idle for {route.stream_idle_seconds:g} s, the limit for service {route.method.service!r}"
            else:
                await asyncio.sleep(min(t for t in (ends, idles) if t is not None) - now)
                continue
            self._call.cut(Code.DEADLINE_EXCEEDED, f"Tabadol broker: {why}")
            self._provider_call.cancel()
            return


async def relay_error(
    error: grpc.aio.AioRpcError,
    context: Context,
    call: Call,
    *,
    headers_sent: bool,
) -> NoReturn:
    """End the consumer's call with the provider's status, details and metadata."""
    code, details = error.code(), error.details() or ""
    if not headers_sent:
        initial = response_metadata(error.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
    trailing = cast(Metadata | None, error.trailing_metadata())
    details = _for_the_consumer(code, details, call)
    raise Ending(code_of(code), details, _trailers(trailing, call))


def _for_the_consumer(code: grpc.StatusCode, details: str, call: Call) -> str:
    """The provider's status details, unless they are gRPC's own words naming the endpoint's
    address: that is the operator's to know (the log has it; the ledger record and the span
    name the endpoint), not the consumer's."""
    if code is not grpc.StatusCode.UNAVAILABLE or not _names_the_endpoint(details, call):
        return details
    upstream = call.upstream
    if upstream is not None and upstream.health.report_due(time.monotonic()):
        log.warning(
            "provider %s endpoint %s unreachable (request %s): %s",
            call.facts.provider, upstream.endpoint, call.request_id, details,
        )  # fmt: skip
    return unreachable_message(call)
