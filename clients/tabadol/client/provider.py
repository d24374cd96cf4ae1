"""The provider side: serve an agency's servicers over mTLS to the broker, and only to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.trace import TracerProvider

from tabadol.client.broker_revocations import DEFAULT_REFRESH_SECONDS, BrokerRevocations
from tabadol.client.credentials import AgencyCredentials
from tabadol.protocol import (
    CONSUMER_KEY,
    GRANT_KEY,
    KEEPALIVE_LISTEN,
    PURPOSE_KEY,
    REQUEST_ID_KEY,
)
from tabadol.spiffe import broker_spiffe_id

log = logging.getLogger("tabadol.client")


def _metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    raise LookupError(f"no {key} in the call metadata (is this call from the Tabadol broker?)")


def consumer_agency(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The agency id of the consumer behind this call, as the broker proved it."""
    return _metadata_value(context, CONSUMER_KEY)


def request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The broker's id for this exchange, for correlating logs with the exchange's ledger."""
    return _metadata_value(context, REQUEST_ID_KEY)


def grant(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The id of the grant under which the broker admitted this call."""
    return _metadata_value(context, GRANT_KEY)


def purpose(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The legal basis of this call: its grant's purpose reference, else the purpose text;
    "" when the grant records none."""
    try:
        return urllib.parse.unquote(_metadata_value(context, PURPOSE_KEY))
    except LookupError:
        return ""


@dataclass(eq=False)
class _CallInFlight:
    task: asyncio.Task[Any] | None
    in_servicer: bool = True  # awaiting the servicer's code (not gRPC sending its answer)
    ended: str = ""  # why it was ended: its broker certificate was revoked during the call


class _CallsInFlight:
    """The provider's calls in flight, by the serial of the broker certificate that made them,
    so that a CRL revoking that certificate ends them too, not only the calls after it."""

    def __init__(self) -> None:
        self._calls: dict[int, set[_CallInFlight]] = {}

    @contextlib.contextmanager
    def track(self, serial: int) -> Iterator[_CallInFlight]:
        call = _CallInFlight(asyncio.current_task())
        self._calls.setdefault(serial, set()).add(call)
        try:
            yield call
        finally:
            calls = self._calls.get(serial)
            if calls is not None:
                calls.discard(call)
                if not calls:
                    del self._calls[serial]

    def end_revoked(self, revoked: frozenset[int]) -> None:
        for serial in revoked & self._calls.keys():
            log.warning(
                "ending %d call(s) in flight from broker certificate %x: the CRL revokes it",
                len(self._calls[serial]),
                serial,
            )
            for call in self._calls[serial]:
                if call.ended:
                    continue
                call.ended = (
                    f"Tabadol provider: broker certificate {serial:x} was revoked during the call"
                )
                # In the servicer's code: interrupt it. While gRPC sends an answer, the
                # stream ends as soon as that send returns (see _guard).
                if call.in_servicer and call.task is not None and not call.task.done():
                    call.task.cancel()


class _BrokerOnly(grpc.aio.ServerInterceptor):
    """Admit calls only from the broker's certificate; any other agency gets PERMISSION_DENIED.

    Every agency certificate comes from the same CA, so TLS alone would admit any agency;
    and the ``x-tabadol-consumer`` header is only meaningful when the broker set it. A broker
    certificate the exchange's CRL revokes (or supersedes) is refused too, and the calls it
    already has in flight are ended when the provider takes that CRL.
    """

    def __init__(self, broker_id: str, revocations: BrokerRevocations) -> None:
        self._broker_id = broker_id.encode()
        self._revocations = revocations
        self.calls = _CallsInFlight()
        revocations.on_newer_crl(self.calls.end_revoked)

    async def intercept_service(  # type: ignore[override]  # the stubs' generic base
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        return _guard(handler, self._check, self.calls)

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> int:
        """The serial of the broker certificate making this call, or the call is refused."""
        auth = context.auth_context()
        if auth.get("peer_spiffe_id") != [self._broker_id]:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "this provider endpoint accepts calls only from the Tabadol broker",
            )
        await self._revocations.ensure()
        pems = list(auth.get("x509_pem_cert") or ())
        why = self._revocations.refusal(pems[0]) if pems else "no broker certificate"
        if why is not None:
            log.warning("refused a call from a broker certificate: %s", why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"Tabadol provider: {why}")
        return self._revocations.serial(pems[0])


async def _ended(call: _CallInFlight, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """After the servicer was interrupted: tell the broker why, if it was a revocation."""
    if not call.ended:
        return
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, call.ended)


def _guard(
    handler: grpc.RpcMethodHandler[Any, Any],
    check: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[int]],
    calls: _CallsInFlight,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with ``check`` run before its behaviour, and the call tracked by its
    broker certificate while it runs."""
    if handler.unary_unary or handler.stream_unary:
        inner: Any = handler.unary_unary or handler.stream_unary

        async def respond(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            serial = await check(context)
            with calls.track(serial) as call:
                try:
                    return await inner(request, context)
                except asyncio.CancelledError:
                    await _ended(call, context)
                    raise

        field = "unary_unary" if handler.unary_unary else "stream_unary"
        return handler._replace(**{field: respond})  # type: ignore[attr-defined, no-any-return]

    inner_stream: Any = handler.unary_stream or handler.stream_stream

    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        serial = await check(context)
        with calls.track(serial) as call:
            try:
                result = inner_stream(request, context)
                if not hasattr(result, "__aiter__"):  # a coroutine that writes with context.write()
                    await result
                    return
                messages = aiter(result)
                while True:
                    call.in_servicer = True
                    try:
                        message = await anext(messages)
                    except StopAsyncIteration:
                        return
                    finally:
                        call.in_servicer = False
                    yield message
                    if call.ended:  # revoked while gRPC was sending that message
                        await _ended(call, context)
            except asyncio.CancelledError:
                await _ended(call, context)
                raise

    field = "unary_stream" if handler.unary_stream else "stream_stream"
    return handler._replace(**{field: stream})  # type: ignore[attr-defined, no-any-return]


class ProviderServer:
    """A ``grpc.aio.Server`` for an agency's services, reachable only through the broker.

    Register servicers on ``.server`` with the generated ``add_*Servicer_to_server``, then
    ``await start()``. ``port`` is the bound port (useful with ``listen="127.0.0.1:0"``).
    Calls are traced with OpenTelemetry, continuing the broker's trace, through
    ``tracer_provider`` or the global one.
    """

    def __init__(
        self,
        credentials_dir: str | Path,
        listen: str = "127.0.0.1:0",
        *,
        options: Sequence[tuple[str, Any]] = (),
        tracer_provider: TracerProvider | None = None,
        broker: str | None = None,
        crl_refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
    ) -> None:
        self.credentials = AgencyCredentials.load(credentials_dir)
        crl_file = Path(credentials_dir) / "crl.pem"
        self.revocations = BrokerRevocations(
            self.credentials,
            crl_file=crl_file if crl_file.exists() else None,
            refresh_seconds=crl_refresh_seconds,
            keep=crl_file,
        )
        self._broker = broker
        self.server = grpc.aio.server(
            interceptors=[
                # Outermost, so that refused calls are traced too.
                # Health checks are the broker's, every few seconds: not exchanges worth a trace.
                aio_server_interceptor(  # type: ignore[no-untyped-call]
                    tracer_provider=tracer_provider,
                    filter_=filters.negate(filters.health_check()),
                ),
                _BrokerOnly(broker_spiffe_id(self.credentials.trust_domain), self.revocations),
            ],
            options=[*KEEPALIVE_LISTEN, *options],
        )
        server_creds = grpc.ssl_server_credentials(
            [(self.credentials.key_pem, self.credentials.cert_pem)],
            root_certificates=self.credentials.ca_pem,
            require_client_auth=True,
        )
        self.port = self.server.add_secure_port(listen, server_creds)
        # The standard health service, which the broker checks: SERVING until stop().
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        if self._broker is not None:
            self.follow_broker(self._broker)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def follow_broker(self, address: str) -> None:
        """Learn revocations from the broker at ``address``: a revoked or superseded broker
        certificate is refused within ``crl_refresh_seconds`` of the broker loading the CRL."""
        self.revocations.follow(address)

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()  # the broker stops sending calls here
        await self.server.stop(grace)
        await self.revocations.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()
