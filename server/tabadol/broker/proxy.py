"""The request path through the broker. A call reads top to bottom: its facts, then the
admission decision (``tabadol.admission``: identity, limits, policy, endpoint), then the
forward (``tabadol.broker.forward``), then its answer; on the way out, its span, metrics and
ledger record. A refusal or a provider's error ends a call as an ``Ending``, answered in one
place (``Proxy._answer``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc
import grpc.aio

from tabadol.admission import (
    CallFacts,
    FloodRecords,
    Identities,
    Now,
    Refused,
    Rules,
    admit,
    trailers_of,
    untrusted,
)
from tabadol.balancer import UntrustedProvider
from tabadol.broker.call import OK, Call, Ending, RequestIds, Traffic
from tabadol.broker.forward import (
    GRPC_CODES,
    MAX_ATTEMPTS,
    StreamWatch,
    TryElsewhere,
    forward_stream,
    forward_unary,
    requests_of,
    single_request,
    within_size,
)
from tabadol.broker.metrics import BrokerMetrics
from tabadol.broker.tracing import NO_TRACING, BrokerTracing
from tabadol.broker.upstream import Route, Target, Upstream
from tabadol.catalogue import Catalogue
from tabadol.config import BrokerConfig
from tabadol.contracts import Contracts, RpcKind
from tabadol.gateway.context import HttpCallContext
from tabadol.identity import ConsumerIdentity, IdentityRejected
from tabadol.ledger import LedgerWriter
from tabadol.limits import Limits, RetryBudget
from tabadol.metadata import REQUEST_ID_KEY, Metadata
from tabadol.policy import Policy
from tabadol.refusals import RefusalLog
from tabadol.registry.freshness import RegistryFreshness
from tabadol.status import Code

log = logging.getLogger("tabadol.broker")

_DEADLINE_SLACK_S = 0.05
Context = grpc.aio.ServicerContext[Any, Any]


def peer_certificate(context: Context) -> bytes | None:
    """The certificate the consumer presented, as TLS verified it (None without one)."""
    pems = cast(list[bytes] | None, context.auth_context().get("x509_pem_cert"))
    return pems[0] if pems else None


@dataclass(eq=False)
class _HeldCall:
    """A call in flight from an identified certificate, and what ends it."""

    call: Call
    task: asyncio.Task[Any] | None
    ending: str = ""  # why the broker is ending it ("" while it may go on)
    code: Code = Code.UNAUTHENTICATED  # and the status the consumer is told


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

    def add(self, call: Call) -> None:
        held = _HeldCall(call, asyncio.current_task())
        self._calls.setdefault(call.caller.serial, {})[call.request_id] = held

    def _held(self, call: Call) -> _HeldCall | None:
        if not call.caller.verified:
            return None
        calls = self._calls.get(call.caller.serial)
        return calls.get(call.request_id) if calls is not None else None

    def forwarding(self, call: Call, provider_call: Any) -> None:
        """The call to the provider is made: ending the call now means cancelling it."""
        call.provider_call = provider_call
        held = self._held(call)
        if held is not None and held.ending:  # ended between two attempts
            self._stop(held)

    def discard(self, call: Call) -> None:
        if not call.caller.verified:
            return
        serial = call.caller.serial
        calls = self._calls.get(serial)
        if calls is not None:
            calls.pop(call.request_id, None)
            if not calls:
                del self._calls[serial]

    def end_revoked(self, revoked: frozenset[int]) -> int:
        """End every call made with a certificate in ``revoked``; how many were ended."""
        ended = 0
        for serial in {f"{number:x}" for number in revoked} & self._calls.keys():
            for held in list(self._calls[serial].values()):
                why = (
                    f"certificate {serial} of agency {held.call.caller.agency!r} was revoked "
                    "during the call"
                )
                ended += self._end(held, why)
        return ended

    def end_ungranted(self, policy: Policy, wall: float) -> int:
        """End every call whose grant no longer admits it at ``wall`` (revoked, or expired)
        and that no other grant admits; how many were ended."""
        ended = 0
        for calls in list(self._calls.values()):
            for held in list(calls.values()):
                call = held.call
                path = call.facts.method.path
                if call.grant and policy.grant_for(call.caller.agency, path, wall) is None:
                    why = (
                        f"grant {call.grant} of agency {call.caller.agency!r} no longer admits "
                        f"{path} (revoked or expired during the call)"
                    )
                    ended += self._end(held, why, Code.PERMISSION_DENIED)
        return ended

    def end_all(self, why: str) -> int:
        """End every call in flight (the CRL went stale: no certificate can be trusted)."""
        return sum(
            self._end(h, why) for calls in self._calls.values() for h in list(calls.values())
        )

    def _end(self, held: _HeldCall, why: str, code: Code = Code.UNAUTHENTICATED) -> int:
        if held.ending or held.call.outcome is not None:
            return 0  # already ending, one way or another
        held.ending = f"Tabadol broker: {why}; the call was ended"
        held.code = code
        return 1 if self._stop(held) else 0

    @staticmethod
    def _stop(held: _HeldCall) -> bool:
        call = held.call
        if call.provider_call is not None:
            # Forwarding then tells the consumer the status recorded here (as when a stream
            # outlives its service's limit); a call the provider already answered goes on.
            if not call.provider_call.cancel():
                return False
            call.cut(held.code, held.ending)
            return True
        if held.task is None or held.task.done():
            return False
        # Not yet forwarded (a unary call still waiting for its request message): the
        # handler, interrupted, answers with this status itself (Proxy._request).
        call.cut(held.code, held.ending)
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


@dataclass(frozen=True)
class Accounting:
    """What the broker does with every finished call, besides answering it."""

    instance: str  # this broker, as ledger records name it
    metrics: BrokerMetrics
    tracing: BrokerTracing = NO_TRACING
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
        self.accounting = accounting
        self.tracing = accounting.tracing
        self.metrics = accounting.metrics
        self.ledger = accounting.ledger
        self.refusals = refusals or RefusalLog(log)
        self.rules = Rules(
            identities, policy, frozenset(config.agencies), accounting.limits, accounting.floods
        )
        self.offered = frozenset(route.method.service for route in routes.values())
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            path: self._handler(route) for path, route in routes.items()
        }
        self.upstreams_by_service: dict[str, list[Upstream]] = {}
        for route in routes.values():
            upstreams = self.upstreams_by_service.setdefault(route.method.service, [])
            upstreams.extend(u for u, _ in route.targets if u not in upstreams)
        self._catalogues: dict[str, tuple[Catalogue, float]] = {}  # and until when it holds
        self.request_ids = RequestIds()

    def catalogue_for(self, agency: str) -> Catalogue:
        """The contracts as this agency may see them (built once per configuration, and again
        when one of its grants expires)."""
        now = time.time()
        kept = self._catalogues.get(agency)
        if kept is not None and now < kept[1]:
            return kept[0]
        visible = {
            method.service
            for path in self.rules.policy.allowed_paths(agency, now)
            if (method := self.contracts.method(path)) is not None
        }
        if agency in self.rules.agencies:  # contract_public: shown to every declared agency
            visible |= {s.name for s in self.config.services.values() if s.contract_public}
        catalogue = Catalogue(self.contracts.files, visible)
        self._catalogues[agency] = (catalogue, self.rules.policy.next_expiry(agency, now))
        return catalogue

    def identify(self, context: Context) -> ConsumerIdentity:
        """The agency whose certificate made this call, or IdentityRejected."""
        return self.rules.identities.identify(peer_certificate(context), time.time())

    def handler_for(self, method_path: str) -> grpc.RpcMethodHandler[Any, Any]:
        handler = self.handlers.get(method_path)
        return handler if handler is not None else self._unknown(method_path)

    def _unknown(self, method_path: str) -> grpc.RpcMethodHandler[Any, Any]:
        """Refuse any RPC kind: UNAUTHENTICATED for a bad identity, else UNIMPLEMENTED."""

        async def refuse(requests: AsyncIterator[bytes], context: Context) -> None:
            request_id = self.request_ids.next()
            trailers = ((REQUEST_ID_KEY, request_id),)
            self.metrics.refused.labels("unknown_method").inc()
            try:
                self.identify(context)
            except IdentityRejected as e:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, f"Tabadol broker: {e}", trailers
                )
            message = unknown_method_message(self.contracts, self.offered, method_path)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message, trailers)

        return grpc.stream_stream_rpc_method_handler(refuse)

    # The request path, in the order a call takes it.

    def _arrive(self, route: Route, context: Context) -> Call:
        """The call's facts, as they stand when it arrives."""
        incoming = cast(Metadata, context.invocation_metadata() or ())
        trace = self.tracing.begin(incoming)
        ledger, registry = self.ledger, self.accounting.registry
        facts = CallFacts(
            route.method,
            route.provider,
            self.request_ids.next(),
            peer_certificate(context),
            incoming,
            self.tracing.provider_headers(trace),
            draining=self.accounting.drain.active,
            registry_stale=registry.refusal(time.time()) if registry is not None else None,
            ledger_problem=(
                None
                if ledger is None or ledger.accepting
                else ledger.problem or f"its writer is {ledger.backlog} records behind"
            ),
            # The gateway's calls say which HTTP protocol they came by.
            protocol=(
                context.protocol
                if type(context) is HttpCallContext  # type: ignore[comparison-overlap]
                else "grpc"
            ),
        )
        traffic = (
            Traffic(ledger.payload_digest(), ledger.payload_digest())  # keyed: docs/ledger.md
            if self.accounting.payload_digests and ledger is not None
            else Traffic()
        )
        self.accounting.drain.begin()
        return Call(facts, trace, traffic)

    def _admit(self, call: Call, route: Route) -> tuple[Target, dict[str, Any]]:
        """The admission decision: the endpoint to call and how, or the call ends refused."""
        decision = admit(call.facts, self.rules, route.balancer, Now(time.time(), time.monotonic()))
        if isinstance(decision, Refused):
            self._refused(call, decision)
        call.caller, call.held, call.grant = decision.caller, decision.held, decision.grant
        self.accounting.drain.calls.add(call)  # revocable from now on
        return decision.endpoint, {"metadata": decision.headers}

    def _refused(self, call: Call, refused: Refused) -> NoReturn:
        call.caller = refused.caller
        call.recorded = not refused.recorded  # nothing to record for this one: counted instead
        if refused.counted:
            self.metrics.refused.labels(refused.counted).inc()
        if refused.warning is not None:
            key, message, args = refused.warning
            self.refusals.warn(key, message, *args)
        raise Ending(refused.code, refused.details, trailers_of(refused, call.request_id))

    def _attempt(self, call: Call, target: Target) -> Any:
        """The call goes to this endpoint now: its stub. Only a call forwarded names an
        endpoint in its record and counts for or against the endpoint's health."""
        upstream = target.upstream
        upstream.acquire()
        call.upstream, call.unreachable = upstream, False
        call.attempts += 1
        if not call.hop_started_ns:
            call.hop_started_ns = time.time_ns()
        return target.stub

    async def _request(self, call: Call, context: Context) -> bytes:
        """The call's one request message; if the broker ended the call while waiting for it
        (its certificate was revoked), the consumer is told so."""
        try:
            return await single_request(context)
        except asyncio.CancelledError:
            if call.cut_off is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            raise call.cut_off from None

    def _reroute(self, call: Call, route: Route, context: Context, options: dict[str, Any]) -> Any:
        """After a failed attempt of an idempotent call: another endpoint, the time left."""
        failed = call.upstream
        assert failed is not None
        self._count_outcome(call)
        failed.release()
        call.upstream = None
        try:
            target = route.balancer.pick(time.monotonic(), avoid=failed)
        except UntrustedProvider as e:
            self._refused(call, untrusted(call.facts, call.caller, e))
        options["timeout"] = context.time_remaining()
        return self._attempt(call, target)

    def _may_retry(self, call: Call, context: Context) -> bool:
        """Only an idempotent unary call, not yet answered, with time and budget left."""
        budget = self.accounting.retries
        remaining = context.time_remaining()
        return (
            call.facts.method.idempotent
            and call.attempts < MAX_ATTEMPTS
            and (remaining is None or remaining > 0)
            and budget is not None
            and budget.spend()
        )

    async def _settle(self, call: Call) -> None:
        """Strict mode: hand over the record now, and wait until it is on disk; past the
        ledger's max_unwritten_seconds the answer is withheld and the call fails closed."""
        ledger = self.ledger
        if ledger is None or not ledger.strict or call.recorded:
            return
        call.recorded = True
        done = ledger.submit(call.ledger_record(self.accounting.instance))
        if done is None:
            return
        try:
            # Shielded: the writer still completes the future when the record is written.
            await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(done)), ledger.max_unwritten_s
            )
        except TimeoutError:
            self.metrics.refused.labels("ledger_unavailable").inc()
            raise Ending(
                Code.UNAVAILABLE,
                "Tabadol broker: the transaction ledger could not record this call within "
                f"{ledger.max_unwritten_s:g} s ({ledger.problem or 'its writer is behind'}); "
                "the provider's answer is withheld (strict mode: no answer goes out "
                "unaccounted); its record is written once the ledger can be",
            ) from None

    async def _succeed(self, call: Call) -> None:
        call.end(OK)
        await self._settle(call)

    async def _answer(self, call: Call, context: Context, ending: Ending) -> NoReturn:
        """The one place a call ends with a status other than OK."""
        call.end(ending)
        try:
            await self._settle(call)
        except Ending as withheld:
            ending = withheld
        trailers = ending.trailers or ((REQUEST_ID_KEY, call.request_id),)
        await context.abort(GRPC_CODES[ending.code], ending.details, trailers)

    def _interrupted(self, call: Call, context: Context, error: BaseException) -> None:
        """The call ended without an answer: the consumer went away, its deadline passed, the
        broker cut it off (then that reason stands), or the broker failed."""
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            if call.cut_off is not None:
                call.end(call.cut_off)
                return
            remaining = context.time_remaining()
            # The consumer's own deadline usually cancels the call a moment before the
            # broker's copy of it fires: within that moment it is the deadline that ended it.
            expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
            call.end(
                Ending(Code.DEADLINE_EXCEEDED, "deadline exceeded")
                if expired
                else Ending(Code.CANCELLED, "cancelled by the consumer")
            )
        elif not isinstance(error, grpc.aio.AbortError):
            log.error(
                "unexpected error in %s (request %s)",
                call.facts.method.path,
                call.request_id,
                exc_info=error,
            )
            call.end(Ending(Code.UNKNOWN, f"internal broker error: {type(error).__name__}"))

    def _count_outcome(self, call: Call) -> None:
        upstream = call.upstream
        if upstream is not None and upstream.health.record(not call.unreachable, time.monotonic()):
            log.warning(
                "provider %s endpoint %s set aside after %d calls in a row could not reach it",
                call.facts.provider,
                upstream.endpoint,
                upstream.health.eject_after,
            )

    def _finish(self, call: Call) -> None:
        """On the way out, however the call ended: release what it held, then its span,
        metrics and ledger record, from one record of it."""
        if call.outcome is None:  # nothing ended it: never expected
            call.end(Ending(Code.UNKNOWN, "the call ended without an outcome"))
        drain = self.accounting.drain
        drain.end()
        drain.calls.discard(call)
        call.held.release()
        if self.accounting.retries is not None:
            self.accounting.retries.earn()
        if call.upstream is not None:
            self._count_outcome(call)
            call.upstream.release()
        record = call.ledger_record(self.accounting.instance)
        self.tracing.end(call.trace, record, call.hop_started_ns)
        self.metrics.observe(record)
        if self.ledger is not None and not call.recorded:
            call.recorded = True
            self.ledger.submit(record)

    def _handler(self, route: Route) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler for one method, matching its RPC kind."""
        kind = route.method.kind
        calls = self.accounting.drain.calls
        retry = self._may_retry if route.method.idempotent else None

        if kind is RpcKind.UNARY:

            async def unary_unary(requests: AsyncIterator[bytes], context: Context) -> bytes:
                call = self._arrive(route, context)
                try:
                    target, options = self._admit(call, route)
                    request = await self._request(call, context)
                    request = within_size(route, call.traffic.request(request))
                    options["timeout"] = context.time_remaining()
                    stub = self._attempt(call, target)
                    while True:
                        provider_call = stub(request, **options)
                        calls.forwarding(call, provider_call)
                        try:
                            response = await forward_unary(provider_call, context, call, retry)
                        except TryElsewhere:
                            stub = self._reroute(call, route, context, options)
                            continue
                        response = call.traffic.response(within_size(route, response, "response"))
                        await self._succeed(call)
                        return response
                except Ending as ending:
                    await self._answer(call, context, ending)
                except BaseException as error:
                    self._interrupted(call, context, error)
                    raise
                finally:
                    self._finish(call)

            # Registered as a request stream: gRPC's asyncio unary handling leaves a call that
            # half-closes without its message hanging forever, with no status.
            return grpc.stream_unary_rpc_method_handler(unary_unary)

        if kind is RpcKind.SERVER_STREAMING:

            async def unary_stream(
                requests: AsyncIterator[bytes], context: Context
            ) -> AsyncIterator[bytes]:
                call = self._arrive(route, context)
                try:
                    target, options = self._admit(call, route)
                    request = await self._request(call, context)
                    request = within_size(route, call.traffic.request(request))
                    stub = self._attempt(call, target)
                    provider_call = stub(request, timeout=context.time_remaining(), **options)
                    calls.forwarding(call, provider_call)
                    async with StreamWatch(provider_call, call, route):
                        async for message in forward_stream(provider_call, context, call, route):
                            yield message
                    await self._succeed(call)
                except Ending as ending:
                    await self._answer(call, context, ending)
                except BaseException as error:
                    self._interrupted(call, context, error)
                    raise
                finally:
                    self._finish(call)

            return grpc.stream_stream_rpc_method_handler(unary_stream)  # as above

        if kind is RpcKind.CLIENT_STREAMING:

            async def stream_unary(requests: AsyncIterator[bytes], context: Context) -> bytes:
                call = self._arrive(route, context)
                try:
                    target, options = self._admit(call, route)
                    handler = asyncio.current_task()
                    provider_call = self._attempt(call, target)(
                        requests_of(requests, call, handler, route),
                        timeout=context.time_remaining(),
                        **options,
                    )
                    calls.forwarding(call, provider_call)
                    async with StreamWatch(provider_call, call, route):
                        response = await forward_unary(provider_call, context, call)
                    response = call.traffic.response(within_size(route, response, "response"))
                    await self._succeed(call)
                    return response
                except Ending as ending:
                    await self._answer(call, context, ending)
                except BaseException as error:
                    self._interrupted(call, context, error)
                    raise
                finally:
                    self._finish(call)

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        async def stream_stream(
            requests: AsyncIterator[bytes], context: Context
        ) -> AsyncIterator[bytes]:
            call = self._arrive(route, context)
            try:
                target, options = self._admit(call, route)
                handler = asyncio.current_task()
                provider_call = self._attempt(call, target)(
                    requests_of(requests, call, handler, route),
                    timeout=context.time_remaining(),
                    **options,
                )
                calls.forwarding(call, provider_call)
                async with StreamWatch(provider_call, call, route):
                    async for message in forward_stream(provider_call, context, call, route):
                        yield message
                await self._succeed(call)
            except Ending as ending:
                await self._answer(call, context, ending)
            except BaseException as error:
                self._interrupted(call, context, error)
                raise
            finally:
                self._finish(call)

        return grpc.stream_stream_rpc_method_handler(stream_stream)


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
