"""The request path through the broker: identity, then policy, then route, then forward.

Payloads are opaque bytes from end to end: no serializer is configured on either leg, so
what the consumer sent is exactly what the provider receives, and back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc
import grpc.aio

from tabadol.broker.exchange import Exchange
from tabadol.broker.metrics import BrokerMetrics
from tabadol.broker.tracing import BrokerTracing
from tabadol.broker.upstream import Route, Upstream
from tabadol.catalogue import Catalogue
from tabadol.config import BrokerConfig
from tabadol.contracts import Contracts, RpcKind
from tabadol.identity import ConsumerIdentity, IdentityRejected, identify_consumer
from tabadol.ledger import LedgerWriter
from tabadol.limits import Limits, Refusal, RetryBudget
from tabadol.metadata import (
    REQUEST_ID_KEY,
    RETRY_AFTER_KEY,
    Metadata,
    request_metadata,
    response_metadata,
    trace_id_of,
)
from tabadol.policy import Policy

log = logging.getLogger("tabadol.broker")

_IDENTITY_CACHE_LIMIT = 10_000
_DEADLINE_SLACK_S = 0.05
_REFUSAL_LOG_INTERVAL_S = 10.0
Context = grpc.aio.ServicerContext[Any, Any]


class Identities:
    """Certificate → agency, cached per certificate: TLS already verified the chain."""

    def __init__(self, trust_domain: str, revoked: frozenset[int]) -> None:
        self._trust_domain = trust_domain
        self._revoked = revoked
        # An identity, or why the certificate was refused (a string: a cached exception
        # would grow its traceback with every re-raise).
        self._cache: dict[bytes, ConsumerIdentity | str] = {}

    def identify(self, context: Context) -> ConsumerIdentity:
        pems = cast(list[bytes] | None, context.auth_context().get("x509_pem_cert"))
        if not pems:
            raise IdentityRejected("no client certificate")
        pem = pems[0]
        known = self._cache.get(pem)
        if isinstance(known, ConsumerIdentity) and time.time() < known.expires_at:
            return known
        if isinstance(known, str):
            raise IdentityRejected(known)
        try:
            identity = identify_consumer(
                pem, trust_domain=self._trust_domain, revoked=self._revoked
            )
        except IdentityRejected as e:
            self._remember(pem, str(e))
            raise
        self._remember(pem, identity)
        return identity

    def _remember(self, pem: bytes, outcome: ConsumerIdentity | str) -> None:
        if len(self._cache) >= _IDENTITY_CACHE_LIMIT:
            self._cache.clear()
        self._cache[pem] = outcome


class RefusalLog:
    """Warn about refused calls, at most once per interval for the same kind of refusal.

    A misconfigured or hostile agency can be refused thousands of times a second; the log
    must stay readable and cheap. Suppressed repeats are counted into the next line.
    """

    def __init__(self, interval_s: float = _REFUSAL_LOG_INTERVAL_S) -> None:
        self._interval = interval_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warn(self, key: tuple[str, str], message: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (0.0, 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > _IDENTITY_CACHE_LIMIT:
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            log.warning(message + " (and %d more like it)", *args, suppressed)
        else:
            log.warning(message, *args)


class Drain:
    """Calls in flight, and whether the broker is shutting down (then it takes no new ones)."""

    def __init__(self) -> None:
        self.active = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False when ``timeout`` came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True)
class Accounting:
    """What the broker does with every finished call, besides answering it."""

    instance: str  # this broker, as ledger records name it
    metrics: BrokerMetrics
    tracing: BrokerTracing | None = None
    ledger: LedgerWriter | None = None
    payload_digests: bool = False
    limits: Limits | None = None  # rate and concurrency, per consumer (and service)
    retries: RetryBudget | None = None  # for idempotent unary methods
    drain: Drain = field(default_factory=Drain)


class Proxy:
    """One configuration's worth of request handling; replaced whole on reload."""

    def __init__(
        self,
        *,
        contracts: Contracts,
        identities: Identities,
        policy: Policy,
        routes: Mapping[str, Route],
        config: BrokerConfig,
        accounting: Accounting,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.config = config  # the registry this handling was built from
        self.contracts = contracts
        self.identities = identities
        self.policy = policy
        self.agencies = frozenset(config.agencies)
        self.accounting = accounting
        self.tracing = accounting.tracing
        self.metrics = accounting.metrics
        self.ledger = accounting.ledger
        self.refusals = refusals or RefusalLog()
        self.offered = frozenset(route.method.service for route in routes.values())
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            path: self._handler(route) for path, route in routes.items()
        }
        self.upstreams_by_service: dict[str, list[Upstream]] = {}
        for route in routes.values():
            upstreams = self.upstreams_by_service.setdefault(route.method.service, [])
            upstreams.extend(u for u, _ in route.targets if u not in upstreams)
        self._catalogues: dict[str, Catalogue] = {}

    def catalogue_for(self, agency: str) -> Catalogue:
        """The contracts as this agency may see them (built once per configuration)."""
        catalogue = self._catalogues.get(agency)
        if catalogue is None:
            visible = {
                method.service
                for path in self.policy.allowed_paths(agency)
                if (method := self.contracts.method(path)) is not None
            }
            catalogue = Catalogue(self.contracts.files, visible)
            self._catalogues[agency] = catalogue
        return catalogue

    def handler_for(self, method_path: str) -> grpc.RpcMethodHandler[Any, Any]:
        handler = self.handlers.get(method_path)
        return handler if handler is not None else self._unknown(method_path)

    def _unknown(self, method_path: str) -> grpc.RpcMethodHandler[Any, Any]:
        """Refuse any RPC kind: UNAUTHENTICATED for a bad identity, else UNIMPLEMENTED."""

        async def refuse(requests: AsyncIterator[bytes], context: Context) -> None:
            request_id = uuid.uuid4().hex
            trailers = ((REQUEST_ID_KEY, request_id),)
            self.metrics.refused.labels("unknown_method").inc()
            try:
                self.identities.identify(context)
            except IdentityRejected as e:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, f"Tabadol broker: {e}", trailers
                )
            message = unknown_method_message(self.contracts, self.offered, method_path)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message, trailers)

        return grpc.stream_stream_rpc_method_handler(refuse)

    async def _prepare(
        self, exchange: Exchange, route: Route, context: Context
    ) -> tuple[Any, dict[str, Any]]:
        """Identity, policy and route for one call: the stub to call and how to call it."""
        incoming = cast(Metadata, context.invocation_metadata() or ())
        if self.accounting.drain.active:
            # Refused outright, before any work: safe for the consumer to retry elsewhere.
            await _abort(
                exchange,
                context,
                grpc.StatusCode.UNAVAILABLE,
                "Tabadol broker: this broker is shutting down; retry the call (another broker "
                "instance answers it)",
            )
        if self.ledger is not None and not self.ledger.accepting:
            # Fail closed: an exchange the ledger cannot account for must not happen.
            self.metrics.refused.labels("ledger_unavailable").inc()
            exchange.recorded = True  # nothing to record: the call is refused before it starts
            details = (
                "Tabadol broker: the transaction ledger cannot be written "
                f"({self.ledger.problem or f'its writer is {self.ledger.backlog} records behind'}); calls are refused until "
                "it can, so that no exchange goes unaccounted"
            )
            exchange.ended(grpc.StatusCode.UNAVAILABLE, details)
            trailers = ((REQUEST_ID_KEY, exchange.request_id),)
            await context.abort(grpc.StatusCode.UNAVAILABLE, details, trailers)
        if self.tracing is not None:
            self.tracing.start(exchange, incoming)
        else:
            exchange.trace_id = trace_id_of(incoming)
        exchange.consumer = await self._admit(exchange, context)
        limits = self.accounting.limits
        if limits is not None and limits.active:
            verdict = limits.admit(exchange.consumer, route.method.service)
            if isinstance(verdict, Refusal):
                await self._over_limit(exchange, context, verdict)
            exchange.admission = verdict
        upstream, stub = route.pick(time.monotonic())
        upstream.acquire()
        exchange.upstream, exchange.endpoint = upstream, upstream.endpoint
        trace_headers = (
            self.tracing.start_provider_hop(exchange) if self.tracing is not None else ()
        )
        metadata = request_metadata(incoming, exchange.consumer, exchange.request_id, trace_headers)
        return stub, {"metadata": metadata, "timeout": context.time_remaining()}

    async def _admit(self, exchange: Exchange, context: Context) -> str:
        """Identity, then policy. Returns the consumer's agency id or aborts the call."""
        method = exchange.method
        try:
            consumer = self.identities.identify(context).agency_id
        except IdentityRejected as e:
            self.refusals.warn(
                ("identity", str(e)), "refused a call to %s: %s (request %s)",
                method.path, e, exchange.request_id,
            )  # fmt: skip
            await _abort(exchange, context, grpc.StatusCode.UNAUTHENTICATED, f"Tabadol broker: {e}")
        exchange.consumer = consumer
        if not self.policy.allows(consumer, method.path):
            self.refusals.warn(
                (consumer, method.path), "denied %s calling %s (request %s)",
                consumer, method.path, exchange.request_id,
            )  # fmt: skip
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

    async def _over_limit(self, exchange: Exchange, context: Context, refusal: Refusal) -> NoReturn:
        self.refusals.warn(
            (exchange.consumer, "limit"), "limited %s calling %s: %s",
            exchange.consumer, exchange.method.path, refusal.message,
        )  # fmt: skip
        retry_ms = str(max(1, round(refusal.retry_after_s * 1000)))
        await _abort(
            exchange,
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Tabadol broker: {refusal.message}",
            (
                (REQUEST_ID_KEY, exchange.request_id),
                # gRPC's own retry pushback (gRFC A6), and the same for people and scripts.
                ("grpc-retry-pushback-ms", retry_ms),
                (RETRY_AFTER_KEY, retry_ms),
            ),
        )

    def _reroute(
        self, exchange: Exchange, route: Route, context: Context, options: dict[str, Any]
    ) -> Any:
        """After a failed attempt of an idempotent call: another endpoint, the time left."""
        failed = exchange.upstream
        assert failed is not None
        self._count_outcome(exchange)
        failed.release()
        upstream, stub = route.pick(time.monotonic(), avoid=failed)
        upstream.acquire()
        exchange.upstream, exchange.endpoint = upstream, upstream.endpoint
        exchange.unreachable = False
        exchange.attempts += 1
        options["timeout"] = context.time_remaining()
        if exchange.client_span is not None and exchange.client_span.is_recording():
            exchange.client_span.add_event("retry", {"tabadol.endpoint": upstream.endpoint})
        return stub

    def _may_retry(self, exchange: Exchange, context: Context) -> bool:
        """Only an idempotent unary call, not yet answered, with time and budget left."""
        budget = self.accounting.retries
        remaining = context.time_remaining()
        return (
            exchange.method.idempotent
            and exchange.attempts < MAX_ATTEMPTS
            and (remaining is None or remaining > 0)
            and budget is not None
            and budget.spend()
        )

    def _count_outcome(self, exchange: Exchange) -> None:
        upstream = exchange.upstream
        if upstream is not None and upstream.outcome(not exchange.unreachable, time.monotonic()):
            log.warning(
                "provider %s endpoint %s set aside after %d calls in a row could not reach it",
                exchange.provider,
                upstream.endpoint,
                upstream.eject_after,
            )

    def _begin(self, route: Route) -> Exchange:
        exchange = Exchange(route.method, route.provider, request_id=uuid.uuid4().hex)
        self.metrics.in_flight.inc()
        self.accounting.drain.begin()
        if self.accounting.payload_digests:
            exchange.request_hash, exchange.response_hash = hashlib.sha256(), hashlib.sha256()
        if self.ledger is not None and self.ledger.strict:
            exchange.durable = self._durable
        return exchange

    async def _durable(self, exchange: Exchange) -> None:
        """Strict mode: hand over the record now, and wait until it is on disk."""
        assert self.ledger is not None
        exchange.ended_ns = time.time_ns()
        exchange.recorded = True
        done = self.ledger.submit(exchange.ledger_record(self.accounting.instance))
        if done is not None:
            await asyncio.wrap_future(done)

    def _finish(self, exchange: Exchange) -> None:
        if not exchange.ended_ns:
            exchange.ended_ns = time.time_ns()
        self.metrics.in_flight.dec()
        self.accounting.drain.end()
        if exchange.admission is not None:
            exchange.admission.release()
        if self.accounting.retries is not None:
            self.accounting.retries.earn()
        if exchange.upstream is not None:
            self._count_outcome(exchange)
            exchange.upstream.release()
        if self.tracing is not None:
            self.tracing.finish(exchange)
        self.metrics.observe(exchange)
        if self.ledger is not None and not exchange.recorded:
            exchange.recorded = True
            self.ledger.submit(exchange.ledger_record(self.accounting.instance))

    def _handler(self, route: Route) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler for one method, matching its RPC kind."""
        kind = route.method.kind

        def begin() -> Exchange:
            return self._begin(route)

        if kind is RpcKind.UNARY:

            async def unary_unary(requests: AsyncIterator[bytes], context: Context) -> bytes:
                exchange = begin()
                with _Outcome(self, exchange, context):
                    stub, options = await self._prepare(exchange, route, context)
                    request = await _single(requests, exchange, context)
                    await _within_size(exchange, route, context, exchange.request(request))
                    while True:
                        call = stub(request, **options)
                        retry = self._may_retry if route.method.idempotent else None
                        try:
                            response = await forward_unary(call, context, exchange, retry)
                        except _TryElsewhere:
                            stub = self._reroute(exchange, route, context, options)
                            continue
                        await _within_size(exchange, route, context, response, "response")
                        return exchange.response(response)

            # Registered as a request stream: gRPC's asyncio unary handling leaves a call that
            # half-closes without its message hanging forever, with no status.
            return grpc.stream_unary_rpc_method_handler(unary_unary)

        if kind is RpcKind.SERVER_STREAMING:

            async def unary_stream(
                requests: AsyncIterator[bytes], context: Context
            ) -> AsyncIterator[bytes]:
                exchange = begin()
                with _Outcome(self, exchange, context):
                    stub, options = await self._prepare(exchange, route, context)
                    request = await _single(requests, exchange, context)
                    await _within_size(exchange, route, context, exchange.request(request))
                    call = stub(request, **options)
                    async with _StreamWatch(call, exchange, route):
                        async for message in forward_stream(call, context, exchange, route):
                            yield message

            return grpc.stream_stream_rpc_method_handler(unary_stream)  # as above

        if kind is RpcKind.CLIENT_STREAMING:

            async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> bytes:
                exchange = begin()
                with _Outcome(self, exchange, context):
                    stub, options = await self._prepare(exchange, route, context)
                    handler = asyncio.current_task()
                    call = stub(_requests(requests, exchange, handler, route), **options)
                    async with _StreamWatch(call, exchange, route):
                        response = await forward_unary(call, context, exchange)
                    await _within_size(exchange, route, context, response, "response")
                    return exchange.response(response)

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        async def stream_stream(
            requests: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[bytes]:
            exchange = begin()
            with _Outcome(self, exchange, context):
                stub, options = await self._prepare(exchange, route, context)
                handler = asyncio.current_task()
                call = stub(_requests(requests, exchange, handler, route), **options)
                async with _StreamWatch(call, exchange, route):
                    async for message in forward_stream(call, context, exchange, route):
                        yield message

        return grpc.stream_stream_rpc_method_handler(stream_stream)


class _Outcome:
    """Records how a call ended, whatever way it ends, and then finishes its exchange."""

    __slots__ = ("context", "exchange", "proxy")

    def __init__(self, proxy: Proxy, exchange: Exchange, context: Context) -> None:
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
                # The consumer's own deadline usually cancels the call a moment before the
                # broker's copy of it fires: within that moment it is the deadline that ended it.
                expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
                exchange.ended(
                    grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED,
                    "deadline exceeded" if expired else "cancelled by the consumer",
                )
            elif not issubclass(exc_type, grpc.aio.AbortError):
                log.error(
                    "unexpected error in %s (request %s)",
                    exchange.method.path,
                    exchange.request_id,
                    exc_info=exc,
                )
                exchange.ended(
                    grpc.StatusCode.UNKNOWN, f"internal broker error: {exc_type.__name__}"
                )
        self.proxy._finish(exchange)


async def _requests(
    requests: AsyncIterator[bytes],
    exchange: Exchange,
    handler: asyncio.Task[Any] | None,
    route: Route | None = None,
) -> AsyncIterator[bytes]:
    """The consumer's messages, counted, ending in a cancel (not a half-close) if it cancelled.

    gRPC ends a server's request iterator the same way whether the consumer half-closed or
    went away. Passing that on as a half-close would tell the provider the stream was
    complete; a provider might then commit a batch the consumer abandoned.
    """
    limit = route.max_message_bytes if route is not None else None
    async for message in requests:
        if limit is not None and len(message) > limit:
            # Ends the provider call; forwarding then reports this status to the consumer.
            exchange.ended(grpc.StatusCode.RESOURCE_EXHAUSTED, _too_big(len(message), route))
            raise asyncio.CancelledError("a request message is over the service's size limit")
        yield exchange.request(message)
    # The consumer's cancel reaches the handler's task a loop turn or two after the iterator
    # ends (more on a busy loop); raising here makes gRPC cancel the provider call instead
    # of half-closing it. Ten turns cost microseconds on a genuine half-close.
    for _ in range(10):
        if handler is not None and (handler.cancelling() or handler.done()):
            raise asyncio.CancelledError("the consumer cancelled mid-stream")
        await asyncio.sleep(0)


async def _single(requests: AsyncIterator[bytes], exchange: Exchange, context: Context) -> bytes:
    """The one request message of a unary-request call, or INTERNAL without it."""
    async for message in requests:
        return message
    await _abort(
        exchange,
        context,
        grpc.StatusCode.INTERNAL,
        "Tabadol broker: the call ended its request stream without a request message",
    )


def unknown_method_message(contracts: Contracts, offered: frozenset[str], path: str) -> str:
    service, _, method = path[1:].partition("/")
    if not path.startswith("/") or not service or not method or "/" in method:
        shown = path if len(path) <= 200 else path[:200] + "…"  # never echo a huge path
        return f"Tabadol broker: {shown!r} is not a gRPC method path (/package.Service/Method)"
    if service not in contracts.services:
        return f"Tabadol broker: unknown service {service!r}"
    if service not in offered:
        return f"Tabadol broker: service {service!r} is not offered on this exchange"
    return f"Tabadol broker: service {service!r} has no method {method!r}"


async def _abort(
    exchange: Exchange,
    context: Context,
    code: grpc.StatusCode,
    details: str,
    trailing: Metadata | None = None,
) -> NoReturn:
    exchange.ended(code, details)
    if trailing is None:
        trailing = ((REQUEST_ID_KEY, exchange.request_id),)
    await exchange.settle()
    await context.abort(code, details, trailing)


def _cancelled_by_broker() -> bool:
    """The provider call was cancelled, but not because our own task was (a channel closed)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class _TryElsewhere(Exception):
    """The attempt failed before any answer, and the call may be retried elsewhere."""


async def forward_unary(
    call: Any,
    context: Context,
    exchange: Exchange,
    retry: Callable[[Exchange, Context], bool] | None = None,
) -> bytes:
    """Await a unary-response call and relay its metadata and status to the consumer."""
    try:
        response: bytes = await call
        initial = response_metadata(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        context.set_trailing_metadata(_trailers(await call.trailing_metadata(), exchange))
        exchange.ended(grpc.StatusCode.OK)
        await exchange.settle()
        return response
    except grpc.aio.AioRpcError as e:
        if retry is not None and _unreachable(e) and retry(exchange, context):
            exchange.unreachable = True
            raise _TryElsewhere from e
        await relay_error(e, context, exchange, headers_sent=False)
    except asyncio.CancelledError:
        call.cancel()
        if _cancelled_by_broker():
            await _provider_lost(exchange, context)
        raise


async def forward_stream(
    call: Any, context: Context, exchange: Exchange, route: Route | None = None
) -> AsyncIterator[bytes]:
    """Relay a streaming-response call message by message, then its trailers and status."""
    headers_sent = False
    try:
        initial = response_metadata(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
            headers_sent = True
        limit = route.max_message_bytes if route is not None else None
        while (message := await call.read()) is not grpc.aio.EOF:
            headers_sent = True
            if limit is not None and len(message) > limit:
                call.cancel()
                await _abort(
                    exchange,
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    _too_big(len(message), route, "response"),
                )
            yield exchange.response(message)
        trailers = _trailers(await call.trailing_metadata(), exchange)
        context.set_trailing_metadata(trailers)
        code = await call.code()
        if code is not grpc.StatusCode.OK:
            await _abort(exchange, context, code, await call.details() or "", trailers)
        exchange.ended(grpc.StatusCode.OK)
        await exchange.settle()
    except grpc.aio.AioRpcError as e:
        await relay_error(e, context, exchange, headers_sent=headers_sent)
    except (asyncio.CancelledError, GeneratorExit) as e:
        call.cancel()
        if isinstance(e, asyncio.CancelledError) and _cancelled_by_broker():
            await _provider_lost(exchange, context)
        raise


async def _provider_lost(exchange: Exchange, context: Context) -> NoReturn:
    if exchange.code is not None:
        # The broker itself ended the provider call, for a reason already recorded (a size
        # or time limit of the service): that is what the consumer is told.
        await context.abort(
            exchange.code, exchange.details, ((REQUEST_ID_KEY, exchange.request_id),)
        )
    await _abort(
        exchange,
        context,
        grpc.StatusCode.UNAVAILABLE,
        f"Tabadol broker: the call to provider {exchange.provider!r} was cut off on the "
        "broker's side (its channel closed); it is safe to retry only if the method is idempotent",
    )


def _trailers(trailing: Metadata | None, exchange: Exchange) -> Metadata:
    return (*response_metadata(trailing), (REQUEST_ID_KEY, exchange.request_id))


# gRPC's own words when the broker could not reach the provider at all: then, and only then,
# the broker names the provider agency (a provider's own UNAVAILABLE passes unchanged).
_UNREACHABLE = ("failed to connect to all addresses", "DNS resolution failed")
MAX_ATTEMPTS = 3


def _unreachable(error: grpc.aio.AioRpcError) -> bool:
    """The attempt never reached a provider: safe to count against the endpoint."""
    return error.code() is grpc.StatusCode.UNAVAILABLE and (error.details() or "").startswith(
        _UNREACHABLE
    )


def _too_big(size: int, route: Route | None, what: str = "request") -> str:
    limit = route.max_message_bytes if route is not None else None
    service = route.method.service if route is not None else "?"
    return (
        f"Tabadol broker: a {what} message of {size} bytes is over the limit of {limit} bytes "
        f"for service {service!r}"
    )


async def _within_size(
    exchange: Exchange, route: Route, context: Context, message: bytes, what: str = "request"
) -> None:
    limit = route.max_message_bytes
    if limit is not None and len(message) > limit:
        await _abort(
            exchange,
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _too_big(len(message), route, what),
        )


class _StreamWatch:
    """Ends a stream that runs past the service's maximum duration or falls idle."""

    def __init__(self, call: Any, exchange: Exchange, route: Route) -> None:
        self._call, self._exchange, self._route = call, exchange, route
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        if self._route.max_stream_seconds or self._route.stream_idle_seconds:
            self._exchange.last_activity = time.monotonic()
            self._task = asyncio.create_task(self._watch())

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        route, exchange = self._route, self._exchange
        started = time.monotonic()
        while True:
            now = time.monotonic()
            ends = started + route.max_stream_seconds if route.max_stream_seconds else None
            idles = (
                exchange.last_activity + route.stream_idle_seconds
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
            exchange.ended(grpc.StatusCode.DEADLINE_EXCEEDED, f"Tabadol broker: {why}")
            self._call.cancel()
            return


async def relay_error(
    error: grpc.aio.AioRpcError,
    context: Context,
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
    if code is grpc.StatusCode.UNAVAILABLE and details.startswith(_UNREACHABLE):
        details = f"Tabadol broker: provider {exchange.provider!r} unreachable: {details}"
    trailing = cast(Metadata | None, error.trailing_metadata())
    await _abort(exchange, context, code, details, _trailers(trailing, exchange))
