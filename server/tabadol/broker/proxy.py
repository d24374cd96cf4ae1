"""The request path through the broker: identity, then policy, then route, then forward.

Payloads are opaque bytes from end to end: no serializer is configured on either leg, so
what the consumer sent is exactly what the provider receives, and back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc
import grpc.aio

from tabadol.broker.exchange import Exchange
from tabadol.broker.tracing import BrokerTracing
from tabadol.contracts import Contracts, MethodContract, RpcKind
from tabadol.identity import ConsumerIdentity, IdentityRejected, identify_consumer
from tabadol.metadata import REQUEST_ID_KEY, Metadata, request_metadata, response_metadata
from tabadol.policy import Policy

log = logging.getLogger("tabadol.broker")

_IDENTITY_CACHE_LIMIT = 10_000


@dataclass
class Route:
    """Where one method's calls go: the provider agency and its endpoints, round robin."""

    method: MethodContract
    provider: str
    endpoints: tuple[str, ...]
    stubs: tuple[Any, ...]  # one bytes-in/bytes-out multicallable per endpoint
    _next: Callable[[], int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        counter = itertools.cycle(range(len(self.stubs)))
        self._next = counter.__next__

    def pick(self) -> tuple[str, Any]:
        i = self._next()
        return self.endpoints[i], self.stubs[i]


class Identities:
    """Certificate → agency, cached per certificate: TLS already verified the chain."""

    def __init__(self, trust_domain: str, revoked: frozenset[int]) -> None:
        self._trust_domain = trust_domain
        self._revoked = revoked
        self._cache: dict[bytes, ConsumerIdentity | IdentityRejected] = {}

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> ConsumerIdentity:
        pems = cast(list[bytes] | None, context.auth_context().get("x509_pem_cert"))
        if not pems:
            raise IdentityRejected("no client certificate")
        pem = pems[0]
        known = self._cache.get(pem)
        if isinstance(known, ConsumerIdentity) and time.time() < known.expires_at:
            return known
        if isinstance(known, IdentityRejected):
            raise known
        try:
            identity = identify_consumer(
                pem, trust_domain=self._trust_domain, revoked=self._revoked
            )
        except IdentityRejected as e:
            self._remember(pem, e)
            raise
        except ValueError as e:
            raise IdentityRejected(f"unreadable client certificate: {e}") from e
        self._remember(pem, identity)
        return identity

    def _remember(self, pem: bytes, outcome: ConsumerIdentity | IdentityRejected) -> None:
        if len(self._cache) >= _IDENTITY_CACHE_LIMIT:
            self._cache.clear()
        self._cache[pem] = outcome


class Proxy:
    """One configuration's worth of request handling; replaced whole on reload."""

    def __init__(
        self,
        *,
        contracts: Contracts,
        policy: Policy,
        identities: Identities,
        routes: Mapping[str, Route],
        agencies: frozenset[str],
        tracing: BrokerTracing | None = None,
    ) -> None:
        self.contracts = contracts
        self.policy = policy
        self.identities = identities
        self.agencies = agencies
        self.tracing = tracing
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            path: self._handler(route) for path, route in routes.items()
        }

    def handler_for(self, method_path: str) -> grpc.RpcMethodHandler[Any, Any]:
        handler = self.handlers.get(method_path)
        return handler if handler is not None else self._unknown(method_path)

    def _unknown(self, method_path: str) -> grpc.RpcMethodHandler[Any, Any]:
        """A handler that refuses any RPC kind with a message naming what does not exist."""
        message = unknown_method_message(self.contracts, method_path)

        async def refuse(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        return grpc.stream_stream_rpc_method_handler(refuse)

    async def _prepare(
        self, exchange: Exchange, route: Route, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """Identity, policy and route for one call: the stub to call and how to call it."""
        incoming = cast(Metadata, context.invocation_metadata() or ())
        if self.tracing is not None:
            self.tracing.start(exchange, incoming)
        exchange.consumer = await self._admit(exchange, context)
        exchange.endpoint, stub = route.pick()
        exchange.request_id = uuid.uuid4().hex
        trace_headers = (
            self.tracing.start_provider_hop(exchange) if self.tracing is not None else ()
        )
        metadata = request_metadata(incoming, exchange.consumer, exchange.request_id, trace_headers)
        return stub, {"metadata": metadata, "timeout": context.time_remaining()}

    async def _admit(self, exchange: Exchange, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Identity, then policy. Returns the consumer's agency id or aborts the call."""
        method = exchange.method
        try:
            consumer = self.identities.identify(context).agency_id
        except IdentityRejected as e:
            log.warning("refused a call to %s: %s", method.path, e)
            await _abort(exchange, context, grpc.StatusCode.UNAUTHENTICATED, f"Tabadol broker: {e}")
        exchange.consumer = consumer
        if not self.policy.allows(consumer, method.path):
            log.warning("denied %s calling %s", consumer, method.path)
            why = (
                "has no grant"
                if consumer in self.agencies
                else "is not a registered agency and has no grant"
            )
            await _abort(
                exchange,
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"Tabadol broker: agency {consumer!r} {why} for method "
                f"{method.name!r} of service {method.service!r}",
            )
        return consumer

    def _finish(self, exchange: Exchange) -> None:
        exchange.ended_ns = time.time_ns()
        if self.tracing is not None:
            self.tracing.finish(exchange)

    def _handler(self, route: Route) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler for one method, matching its RPC kind."""
        kind = route.method.kind

        if kind is RpcKind.UNARY:

            async def unary_unary(
                request: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> bytes:
                exchange = Exchange(route.method, route.provider)
                with _Outcome(self, exchange, context):
                    stub, options = await self._prepare(exchange, route, context)
                    call = stub(exchange.request(request), **options)
                    return exchange.response(await forward_unary(call, context, exchange))

            return grpc.unary_unary_rpc_method_handler(unary_unary)

        if kind is RpcKind.SERVER_STREAMING:

            async def unary_stream(
                request: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[bytes]:
                exchange = Exchange(route.method, route.provider)
                with _Outcome(self, exchange, context):
                    stub, options = await self._prepare(exchange, route, context)
                    call = stub(exchange.request(request), **options)
                    async for message in forward_stream(call, context, exchange):
                        yield exchange.response(message)

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        if kind is RpcKind.CLIENT_STREAMING:

            async def stream_unary(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
            ) -> bytes:
                exchange = Exchange(route.method, route.provider)
                with _Outcome(self, exchange, context):
                    stub, options = await self._prepare(exchange, route, context)
                    call = stub(_counted(requests, exchange), **options)
                    return exchange.response(await forward_unary(call, context, exchange))

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        async def stream_stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            exchange = Exchange(route.method, route.provider)
            with _Outcome(self, exchange, context):
                stub, options = await self._prepare(exchange, route, context)
                call = stub(_counted(requests, exchange), **options)
                async for message in forward_stream(call, context, exchange):
                    yield exchange.response(message)

        return grpc.stream_stream_rpc_method_handler(stream_stream)


class _Outcome:
    """Records how a call ended, whatever way it ends, and then finishes its exchange."""

    __slots__ = ("context", "exchange", "proxy")

    def __init__(
        self, proxy: Proxy, exchange: Exchange, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self.proxy, self.exchange, self.context = proxy, exchange, context

    def __enter__(self) -> Exchange:
        return self.exchange

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        exchange = self.exchange
        if exc_type is not None and exchange.code is None:
            if issubclass(exc_type, asyncio.CancelledError | GeneratorExit):
                remaining = self.context.time_remaining()
                expired = remaining is not None and remaining <= 0
                exchange.ended(
                    grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED,
                    "deadline exceeded" if expired else "cancelled by the consumer",
                )
            elif not issubclass(exc_type, grpc.aio.AbortError):
                log.error("unexpected error in %s", exchange.method.path, exc_info=exc)
                exchange.ended(
                    grpc.StatusCode.UNKNOWN, f"internal broker error: {exc_type.__name__}"
                )
        self.proxy._finish(exchange)


async def _counted(requests: AsyncIterator[bytes], exchange: Exchange) -> AsyncIterator[bytes]:
    async for message in requests:
        yield exchange.request(message)


async def _abort(
    exchange: Exchange,
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    details: str,
    trailing: Metadata = (),
) -> NoReturn:
    exchange.ended(code, details)
    await context.abort(code, details, trailing)


def unknown_method_message(contracts: Contracts, path: str) -> str:
    service, _, method = path.lstrip("/").partition("/")
    if not service or not method or "/" in method:
        return f"Tabadol broker: {path!r} is not a gRPC method path (/package.Service/Method)"
    if service not in contracts.services:
        return f"Tabadol broker: unknown service {service!r}"
    return f"Tabadol broker: service {service!r} has no method {method!r}"


async def forward_unary(
    call: Any, context: grpc.aio.ServicerContext[Any, Any], exchange: Exchange
) -> bytes:
    """Await a unary-response call and relay its metadata and status to the consumer."""
    try:
        response: bytes = await call
        initial = response_metadata(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        context.set_trailing_metadata(_trailers(await call.trailing_metadata(), exchange))
        exchange.ended(grpc.StatusCode.OK)
        return response
    except grpc.aio.AioRpcError as e:
        await relay_error(e, context, exchange, headers_sent=False)
    except asyncio.CancelledError:
        call.cancel()
        raise


async def forward_stream(
    call: Any, context: grpc.aio.ServicerContext[Any, Any], exchange: Exchange
) -> AsyncIterator[bytes]:
    """Relay a streaming-response call message by message, then its trailers and status."""
    headers_sent = False
    try:
        initial = response_metadata(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
            headers_sent = True
        while (message := await call.read()) is not grpc.aio.EOF:
            headers_sent = True
            yield message
        trailers = _trailers(await call.trailing_metadata(), exchange)
        context.set_trailing_metadata(trailers)
        code = await call.code()
        if code is not grpc.StatusCode.OK:
            await _abort(exchange, context, code, await call.details() or "", trailers)
        exchange.ended(grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as e:
        await relay_error(e, context, exchange, headers_sent=headers_sent)
    except (asyncio.CancelledError, GeneratorExit):
        call.cancel()
        raise


def _trailers(trailing: Metadata | None, exchange: Exchange) -> Metadata:
    return (*response_metadata(trailing), (REQUEST_ID_KEY, exchange.request_id))


async def relay_error(
    error: grpc.aio.AioRpcError,
    context: grpc.aio.ServicerContext[Any, Any],
    exchange: Exchange,
    *,
    headers_sent: bool,
) -> NoReturn:
    """End the consumer's call with the provider's status, details and metadata."""
    code, details = error.code(), error.details() or ""
    if not headers_sent:
        initial = response_metadata(error.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
    if code is grpc.StatusCode.UNAVAILABLE and not error.initial_metadata():
        # The provider never answered: say which agency, so the consumer's ops team knows
        # it is not their own link to the broker.
        details = f"Tabadol broker: provider {exchange.provider!r} unavailable: {details}"
    trailing = cast(Metadata | None, error.trailing_metadata())
    await _abort(exchange, context, code, details, _trailers(trailing, exchange))
