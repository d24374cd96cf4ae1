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
    ) -> None:
        self.contracts = contracts
        self.policy = policy
        self.identities = identities
        self.agencies = agencies
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

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], route: Route) -> str:
        """Identity, then policy. Returns the consumer's agency id or aborts the call."""
        try:
            consumer = self.identities.identify(context).agency_id
        except IdentityRejected as e:
            log.warning("refused a call to %s: %s", route.method.path, e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"Tabadol broker: {e}")
        if not self.policy.allows(consumer, route.method.path):
            log.warning("denied %s calling %s", consumer, route.method.path)
            why = (
                "has no grant"
                if consumer in self.agencies
                else "is not a registered agency and has no grant"
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Tabadol broker: agency {consumer!r} {why} for method "
                f"{route.method.name!r} of service {route.method.service!r}",
            )
        return consumer

    def _handler(self, route: Route) -> grpc.RpcMethodHandler[Any, Any]:
        kind = route.method.kind

        def outbound(
            consumer: str, context: grpc.aio.ServicerContext[Any, Any]
        ) -> tuple[Any, dict[str, Any], str]:
            _endpoint, stub = route.pick()
            request_id = uuid.uuid4().hex
            options = {
                "metadata": request_metadata(
                    context.invocation_metadata() or (), consumer, request_id
                ),
                "timeout": context.time_remaining(),
            }
            return stub, options, request_id

        if kind is RpcKind.UNARY:

            async def unary_unary(
                request: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> bytes:
                consumer = await self._admit(context, route)
                stub, options, request_id = outbound(consumer, context)
                return await forward_unary(stub(request, **options), context, route, request_id)

            return grpc.unary_unary_rpc_method_handler(unary_unary)

        if kind is RpcKind.SERVER_STREAMING:

            async def unary_stream(
                request: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[bytes]:
                consumer = await self._admit(context, route)
                stub, options, request_id = outbound(consumer, context)
                async for message in forward_stream(
                    stub(request, **options), context, route, request_id
                ):
                    yield message

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        if kind is RpcKind.CLIENT_STREAMING:

            async def stream_unary(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
            ) -> bytes:
                consumer = await self._admit(context, route)
                stub, options, request_id = outbound(consumer, context)
                return await forward_unary(stub(requests, **options), context, route, request_id)

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        async def stream_stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            consumer = await self._admit(context, route)
            stub, options, request_id = outbound(consumer, context)
            async for message in forward_stream(
                stub(requests, **options), context, route, request_id
            ):
                yield message

        return grpc.stream_stream_rpc_method_handler(stream_stream)


def unknown_method_message(contracts: Contracts, path: str) -> str:
    service, _, method = path.lstrip("/").partition("/")
    if not service or not method or "/" in method:
        return f"Tabadol broker: {path!r} is not a gRPC method path (/package.Service/Method)"
    if service not in contracts.services:
        return f"Tabadol broker: unknown service {service!r}"
    return f"Tabadol broker: service {service!r} has no method {method!r}"


async def forward_unary(
    call: Any, context: grpc.aio.ServicerContext[Any, Any], route: Route, request_id: str
) -> bytes:
    """Await a unary-response call and relay its metadata and status to the consumer."""
    try:
        response: bytes = await call
        initial = response_metadata(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        context.set_trailing_metadata(_trailers(await call.trailing_metadata(), request_id))
        return response
    except grpc.aio.AioRpcError as e:
        await relay_error(e, context, route, request_id, headers_sent=False)
    except asyncio.CancelledError:
        call.cancel()
        raise


async def forward_stream(
    call: Any, context: grpc.aio.ServicerContext[Any, Any], route: Route, request_id: str
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
        context.set_trailing_metadata(_trailers(await call.trailing_metadata(), request_id))
        code = await call.code()
        if code is not grpc.StatusCode.OK:
            await context.abort(code, await call.details(), context.trailing_metadata())
    except grpc.aio.AioRpcError as e:
        await relay_error(e, context, route, request_id, headers_sent=headers_sent)
    except (asyncio.CancelledError, GeneratorExit):
        call.cancel()
        raise


def _trailers(trailing: Metadata | None, request_id: str) -> Metadata:
    return (*response_metadata(trailing), (REQUEST_ID_KEY, request_id))


async def relay_error(
    error: grpc.aio.AioRpcError,
    context: grpc.aio.ServicerContext[Any, Any],
    route: Route,
    request_id: str,
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
        # The provider never answered: say which agency and where, so the consumer's ops
        # team knows it is not their own link to the broker.
        details = f"Tabadol broker: provider {route.provider!r} unavailable: {details}"
    trailing = cast(Metadata | None, error.trailing_metadata())
    await context.abort(code, details, _trailers(trailing, request_id))
