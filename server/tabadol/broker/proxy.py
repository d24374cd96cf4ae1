"""The request path through the broker: identity, then policy, then route, then forward
(``tabadol.broker.forward``), and on the way out the call's span, metrics and ledger record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc
import grpc.aio

from tabadol.broker.exchange import Exchange
from tabadol.broker.forward import (
    MAX_ATTEMPTS,
    StreamWatch,
    TryElsewhere,
    abort,
    forward_stream,
    forward_unary,
    requests_of,
    single_request,
    within_size,
)
from tabadol.broker.metrics import BrokerMetrics
from tabadol.broker.tracing import BrokerTracing
from tabadol.broker.upstream import Route, UntrustedProvider, Upstream
from tabadol.catalogue import Catalogue
from tabadol.config import BrokerConfig
from tabadol.contracts import Contracts, RpcKind
from tabadol.identity import (
    ConsumerIdentity,
    IdentityRejected,
    claimed_agency,
    identify_consumer,
)
from tabadol.ledger import LedgerWriter
from tabadol.limits import Limits, Refusal, RetryBudget
from tabadol.metadata import (
    REQUEST_ID_KEY,
    RETRY_AFTER_KEY,
    Metadata,
    request_metadata,
    trace_id_of,
)
from tabadol.policy import Policy
from tabadol.refusals import RefusalLog
from tabadol.registry.freshness import RegistryFreshness

log = logging.getLogger("tabadol.broker")

_IDENTITY_CACHE_LIMIT = 10_000
_DEADLINE_SLACK_S = 0.05
Context = grpc.aio.ServicerContext[Any, Any]


class Identities:
    """Certificate → agency, cached per certificate: TLS already verified the chain.

    With ``stale_at`` (POSIX seconds), nobody is identified once the CRL has gone stale:
    the CA may have revoked anyone since, so the broker fails closed.
    """

    def __init__(
        self, trust_domain: str, revoked: frozenset[int], stale_at: float | None = None
    ) -> None:
        self._trust_domain = trust_domain
        self._revoked = revoked
        self._stale_at = stale_at
        # An identity, or why the certificate was refused (a string: a cached exception
        # would grow its traceback with every re-raise).
        self._cache: dict[bytes, ConsumerIdentity | str] = {}

    def identify(self, context: Context) -> ConsumerIdentity:
        if self._stale_at is not None and time.time() >= self._stale_at:
            raise IdentityRejected(
                "the exchange's certificate revocation list is out of date, so no identity "
                "can be trusted; calls are refused until operators publish a fresh one"
            )
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


@dataclass(eq=False)
class _HeldCall:
    """A call in flight from an identified certificate, and what ends it."""

    exchange: Exchange
    task: asyncio.Task[Any] | None
    provider_call: Any = None  # the call to the provider, once made
    ending: str = ""  # why the broker is ending it ("" while it may go on)


class CallsBySerial:
    """Calls in flight, by the serial of the consumer certificate that made them.

    Identity is checked when a call starts; a CRL that revokes a certificate later must also
    end the calls it already holds (a client or bidi stream may last an hour). The call to
    the provider is cancelled, not half-closed, and the consumer is told why.
    """

    def __init__(self) -> None:
        # By the serial as the exchange holds it (hex): no conversion on each call's way.
        self._calls: dict[str, dict[str, _HeldCall]] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, exchange: Exchange) -> None:
        held = _HeldCall(exchange, asyncio.current_task())
        self._calls.setdefault(exchange.consumer_serial, {})[exchange.request_id] = held

    def _held(self, exchange: Exchange) -> _HeldCall | None:
        if not exchange.consumer_verified:
            return None
        calls = self._calls.get(exchange.consumer_serial)
        return calls.get(exchange.request_id) if calls is not None else None

    def forwarding(self, exchange: Exchange, call: Any) -> None:
        """The call to the provider is made: ending the exchange now means cancelling it."""
        held = self._held(exchange)
        if held is None:
            return
        held.provider_call = call
        if held.ending:  # ended between two attempts
            self._stop(held)

    def discard(self, exchange: Exchange) -> None:
        if not exchange.consumer_verified:
            return
        serial = exchange.consumer_serial
        calls = self._calls.get(serial)
        if calls is not None:
            calls.pop(exchange.request_id, None)
            if not calls:
                del self._calls[serial]

    def ended_by_broker(self, exchange: Exchange) -> str:
        """Why the broker ended this call ("" when it did not)."""
        held = self._held(exchange)
        return held.ending if held is not None else ""

    def end_revoked(self, revoked: frozenset[int]) -> int:
        """End every call made with a certificate in ``revoked``; how many were ended."""
        ended = 0
        for serial in {f"{number:x}" for number in revoked} & self._calls.keys():
            for held in list(self._calls[serial].values()):
                why = (
                    f"certificate {serial} of agency {held.exchange.consumer!r} was revoked "
                    "during the call"
                )
                ended += self._end(held, why)
        return ended

    def end_all(self, why: str) -> int:
        """End every call in flight (the CRL went stale: no certificate can be trusted)."""
        return sum(
            self._end(h, why) for calls in self._calls.values() for h in list(calls.values())
        )

    def _end(self, held: _HeldCall, why: str) -> int:
        if held.ending or held.exchange.code is not None:
            return 0  # already ending, one way or another
        held.ending = f"Tabadol broker: {why}; the call was ended"
        return 1 if self._stop(held) else 0

    @staticmethod
    def _stop(held: _HeldCall) -> bool:
        exchange = held.exchange
        if held.provider_call is not None:
            # Forwarding then tells the consumer the status recorded here (as when a stream
            # outlives its service's limit); a call the provider already answered goes on.
            if not held.provider_call.cancel():
                return False
            exchange.ended(grpc.StatusCode.UNAUTHENTICATED, held.ending)
            return True
        if held.task is None or held.task.done():
            return False
        # Not yet forwarded (a unary call still waiting for its request message): the
        # handler, interrupted, answers with this status itself (Proxy._request).
        exchange.ended(grpc.StatusCode.UNAUTHENTICATED, held.ending)
        held.task.cancel()
        return True


class Drain:
    """Calls in flight, and whether the broker is shutting down (then it takes no new ones)."""

    def __init__(self) -> None:
        self.active = False
        self.in_flight = 0
        self.calls = CallsBySerial()  # by consumer certificate, to end them on revocation
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


class FloodRecords:
    """Which throttled refusals of a flooding caller get a ledger record: one a second per
    caller (a certificate that failed identification, or an agency the registry does not
    declare). The rest are counted in the metrics and the refusal log, not written one by
    one: a flood must not fill the ledger's disk, which would stop the whole exchange."""

    def __init__(self, interval_s: float = 1.0, keys_limit: int = 10_000) -> None:
        self._interval = interval_s
        self._limit = keys_limit
        self._last: dict[str, float] = {}

    def record(self, caller: str, now: float) -> bool:
        last = self._last.get(caller)
        if last is not None and now - last < self._interval:
            return False
        if len(self._last) >= self._limit:
            self._last.clear()
        self._last[caller] = now
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
    floods: FloodRecords = field(default_factory=FloodRecords)
    registry: RegistryFreshness | None = None  # with a registry database: how old it may grow


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
        self.refusals = refusals or RefusalLog(log)
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
            if agency in self.agencies:  # contract_public: shown to every declared agency
                visible |= {s.name for s in self.config.services.values() if s.contract_public}
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
            await abort(
                exchange,
                context,
                grpc.StatusCode.UNAVAILABLE,
                "Tabadol broker: this broker is shutting down; retry the call (another broker "
                "instance answers it)",
            )
        registry = self.accounting.registry
        if registry is not None and (stale := registry.refusal(time.time())) is not None:
            # Fail closed ([registry] stale = "refuse"): grants may have changed since.
            self.metrics.refused.labels("registry_stale").inc()
            await abort(exchange, context, grpc.StatusCode.UNAVAILABLE, f"Tabadol broker: {stale}")
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
        await self._admit(exchange, context)
        upstream, stub = await self._pick(exchange, route, context)
        upstream.acquire()
        exchange.upstream, exchange.endpoint = upstream, upstream.endpoint
        trace_headers = (
            self.tracing.start_provider_hop(exchange) if self.tracing is not None else ()
        )
        metadata = request_metadata(incoming, exchange.consumer, exchange.request_id, trace_headers)
        return stub, {"metadata": metadata, "timeout": context.time_remaining()}

    async def _admit(self, exchange: Exchange, context: Context) -> None:
        """Identity, then limits, then policy: names the consumer or aborts the call.

        Limits come before policy so that refused calls count too: an agency cannot probe
        methods it has no grant for (nor fill the ledger with refusals) faster than its rate.
        """
        method = exchange.method
        try:
            identity = self.identities.identify(context)
        except IdentityRejected as e:
            certificate = self._claimed(exchange, context)
            self.refusals.warn(
                ("identity", str(e)), "refused a call to %s: %s (request %s)",
                method.path, e, exchange.request_id,
            )  # fmt: skip
            # Refusals are recorded too: a flood of them from one certificate is throttled.
            too_fast = (
                self.accounting.limits.admit_refused(certificate)
                if self.accounting.limits is not None
                else None
            )
            if too_fast is not None:
                self._sample_flood(exchange, certificate)
                await self._over_limit(
                    exchange, context, Refusal(f"{e}; {too_fast.message}", too_fast.retry_after_s)
                )
            await abort(exchange, context, grpc.StatusCode.UNAUTHENTICATED, f"Tabadol broker: {e}")
        consumer = exchange.consumer = identity.agency_id
        exchange.consumer_serial, exchange.consumer_verified = f"{identity.serial:x}", True
        self.accounting.drain.calls.add(exchange)  # revocable from now on
        limits = self.accounting.limits
        if limits is not None and limits.active:
            verdict = limits.admit(consumer, method.service)
            if isinstance(verdict, Refusal):
                if consumer not in self.agencies:
                    self._sample_flood(exchange, consumer)
                await self._over_limit(exchange, context, verdict)
            exchange.admission = verdict
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
            await abort(
                exchange,
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"Tabadol broker: agency {consumer!r} {why} for method "
                f"{method.name!r} of service {method.service!r}",
            )

    async def _request(self, exchange: Exchange, context: Context) -> bytes:
        """The call's one request message; if the broker ended the call while waiting for it
        (its certificate was revoked), the consumer is told so."""
        try:
            return await single_request(exchange, context)
        except asyncio.CancelledError:
            why = self.accounting.drain.calls.ended_by_broker(exchange)
            if not why:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await abort(exchange, context, grpc.StatusCode.UNAUTHENTICATED, why)

    def _sample_flood(self, exchange: Exchange, caller: str) -> None:
        """A throttled refusal of an unidentified or undeclared caller: recorded once a
        second per caller, otherwise only counted."""
        if not self.accounting.floods.record(caller, time.monotonic()):
            exchange.recorded = True  # nothing written for this one: counted instead
            self.metrics.refused.labels("flood_unrecorded").inc()

    @staticmethod
    def _claimed(exchange: Exchange, context: Context) -> str:
        """For the ledger: whom a refused certificate claims to be, marked unverified. Returns
        the certificate's name for throttling its refusals."""
        name, claim = refused_certificate(context)
        if claim is not None:
            exchange.consumer, exchange.consumer_serial = claim[0], f"{claim[1]:x}"
        return name

    async def _over_limit(self, exchange: Exchange, context: Context, refusal: Refusal) -> NoReturn:
        self.refusals.warn(
            (exchange.consumer, "limit"), "limited %s calling %s: %s",
            exchange.consumer, exchange.method.path, refusal.message,
        )  # fmt: skip
        retry_ms = str(max(1, round(refusal.retry_after_s * 1000)))
        await abort(
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

    async def _pick(
        self, exchange: Exchange, route: Route, context: Context, avoid: Upstream | None = None
    ) -> tuple[Upstream, Any]:
        """An endpoint of the provider whose certificate the CRL allows, or the call ends."""
        try:
            return route.pick(time.monotonic(), avoid=avoid)
        except UntrustedProvider as e:
            why = (
                "presents a revoked certificate"
                if e.revoked
                else "could not be reached to check its certificate"
            )
            self.refusals.warn(
                ("untrusted", route.provider), "not forwarding to %s: it %s (request %s)",
                route.provider, why, exchange.request_id,
            )  # fmt: skip
            await abort(
                exchange,
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"Tabadol broker: provider {route.provider!r} {why}; the call was not forwarded",
            )

    async def _reroute(
        self, exchange: Exchange, route: Route, context: Context, options: dict[str, Any]
    ) -> Any:
        """After a failed attempt of an idempotent call: another endpoint, the time left."""
        failed = exchange.upstream
        assert failed is not None
        self._count_outcome(exchange)
        failed.release()
        exchange.upstream = None
        upstream, stub = await self._pick(exchange, route, context, avoid=failed)
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
        if self.accounting.payload_digests and self.ledger is not None:
            exchange.request_hash = self.ledger.payload_digest()  # keyed: see docs/ledger.md
            exchange.response_hash = self.ledger.payload_digest()
        if self.ledger is not None and self.ledger.strict:
            exchange.durable = self._durable
        return exchange

    async def _durable(
        self, exchange: Exchange, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Strict mode: hand over the record now, and wait until it is on disk; past the
        ledger's max_unwritten_seconds the answer is withheld and the call fails closed."""
        ledger = self.ledger
        assert ledger is not None
        exchange.ended_ns = time.time_ns()
        exchange.recorded = True
        done = ledger.submit(exchange.ledger_record(self.accounting.instance))
        if done is None:
            return
        try:
            # Shielded: the writer still completes the future when the record is written.
            await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(done)), ledger.max_unwritten_s
            )
        except TimeoutError:
            self.metrics.refused.labels("ledger_unavailable").inc()
            details = (
                "Tabadol broker: the transaction ledger could not record this call within "
                f"{ledger.max_unwritten_s:g} s ({ledger.problem or 'its writer is behind'}); "
                "the provider's answer is withheld (strict mode: no answer goes out "
                "unaccounted); its record is written once the ledger can be"
            )
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, details, ((REQUEST_ID_KEY, exchange.request_id),)
            )

    def _finish(self, exchange: Exchange) -> None:
        if not exchange.ended_ns:
            exchange.ended_ns = time.time_ns()
        self.metrics.in_flight.dec()
        self.accounting.drain.end()
        self.accounting.drain.calls.discard(exchange)
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
                    request = await self._request(exchange, context)
                    await within_size(exchange, route, context, exchange.request(request))
                    while True:
                        call = stub(request, **options)
                        self.accounting.drain.calls.forwarding(exchange, call)
                        retry = self._may_retry if route.method.idempotent else None
                        try:
                            response = await forward_unary(call, context, exchange, retry)
                        except TryElsewhere:
                            stub = await self._reroute(exchange, route, context, options)
                            continue
                        await within_size(exchange, route, context, response, "response")
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
                    request = await self._request(exchange, context)
                    await within_size(exchange, route, context, exchange.request(request))
                    call = stub(request, **options)
                    self.accounting.drain.calls.forwarding(exchange, call)
                    async with StreamWatch(call, exchange, route):
                        async for message in forward_stream(call, context, exchange, route):
                            yield message

            return grpc.stream_stream_rpc_method_handler(unary_stream)  # as above

        if kind is RpcKind.CLIENT_STREAMING:

            async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> bytes:
                exchange = begin()
                with _Outcome(self, exchange, context):
                    stub, options = await self._prepare(exchange, route, context)
                    handler = asyncio.current_task()
                    call = stub(requests_of(requests, exchange, handler, route), **options)
                    self.accounting.drain.calls.forwarding(exchange, call)
                    async with StreamWatch(call, exchange, route):
                        response = await forward_unary(call, context, exchange)
                    await within_size(exchange, route, context, response, "response")
                    return exchange.response(response)

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        async def stream_stream(
            requests: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[bytes]:
            exchange = begin()
            with _Outcome(self, exchange, context):
                stub, options = await self._prepare(exchange, route, context)
                handler = asyncio.current_task()
                call = stub(requests_of(requests, exchange, handler, route), **options)
                self.accounting.drain.calls.forwarding(exchange, call)
                async with StreamWatch(call, exchange, route):
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


def refused_certificate(context: Context) -> tuple[str, tuple[str, int] | None]:
    """A certificate refused at identity: its name for throttling its refusals (the agency
    and serial it claims, or its digest when it claims none) and that claim, unverified."""
    pems = cast(list[bytes] | None, context.auth_context().get("x509_pem_cert"))
    if not pems:
        return "", None
    claim = claimed_agency(pems[0])
    if claim is None:
        return hashlib.sha256(pems[0]).hexdigest(), None
    return f"{claim[0]}/{claim[1]:x}", claim


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
