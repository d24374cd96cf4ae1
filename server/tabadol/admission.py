"""Whether a call may go, and where: one pure decision from the call's facts.

``admit`` takes what the broker knows when a call arrives (its certificate, method, metadata,
the broker's own state) and returns ``Admitted`` (who called, the provider endpoint, the
metadata the provider receives) or ``Refused`` (the status, the details the consumer reads,
whether the ledger records it). It reads no socket or file, and no clock but the one the
limits were given: the shell passes ``now`` and turns a refusal into its protocol's status
in one place. The broker's own services use ``admit_platform``, the same checks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Generic, Literal, NamedTuple, Protocol, TypeVar

from tabadol.balancer import UntrustedProvider
from tabadol.contracts import MethodContract
from tabadol.identity import (
    ConsumerIdentity,
    IdentityRejected,
    claimed_agency,
    claimed_role,
    identify_consumer,
    identify_peer,
)
from tabadol.limits import NOTHING_HELD, Admission, Limits, Refusal
from tabadol.metadata import REQUEST_ID_KEY, RETRY_AFTER_KEY, Metadata, request_metadata
from tabadol.policy import Policy
from tabadol.status import Code

_CACHE_LIMIT = 10_000
_REFUSAL_KEPT_S = 60.0  # how long a refused certificate's verdict is reused
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Caller(NamedTuple):
    """Who made a call, as the ledger records it: the agency, its certificate's serial (hex),
    and whether the certificate proved it (False: only claimed, by a refused certificate)."""

    agency: str
    serial: str
    verified: bool


NOBODY = Caller("", "", False)


class Now(NamedTuple):
    wall: float  # POSIX seconds: certificate validity, CRL age
    monotonic: float  # endpoint back-off, throttling


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
        # An identity, or why the certificate was refused and until when that stands (a
        # string: a cached exception would grow its traceback with every re-raise).
        self._cache: dict[bytes, ConsumerIdentity | tuple[str, float]] = {}

    def identify(self, pem: bytes | None, now: float) -> ConsumerIdentity:
        """The agency ``pem`` (the certificate TLS verified) proves, or IdentityRejected."""
        if self._stale_at is not None and now >= self._stale_at:
            raise IdentityRejected(
                "the exchange's certificate revocation list is out of date, so no identity "
                "can be trusted; calls are refused until operators publish a fresh one"
            )
        if not pem:
            raise IdentityRejected("no client certificate")
        known = self._cache.get(pem)
        if isinstance(known, ConsumerIdentity) and now < known.expires_at:
            return known
        if isinstance(known, tuple) and now < known[1]:
            raise IdentityRejected(known[0])
        try:
            identity = identify_consumer(
                pem,
                trust_domain=self._trust_domain,
                revoked=self._revoked,
                now=lambda: dt.datetime.fromtimestamp(now, dt.UTC),
            )
        except IdentityRejected as e:
            # Judged again after a while: a certificate not yet valid becomes valid.
            self._remember(pem, (str(e), now + _REFUSAL_KEPT_S))
            raise
        self._remember(pem, identity)
        return identity

    def operator(self, pem: bytes | None, now: float) -> str | None:
        """The operator ``pem`` proves (its name); None when it is no operator's certificate.
        IdentityRejected when it is an operator's but revoked or expired, or when the CRL is
        stale. Not cached: operators act rarely."""
        if not pem or claimed_role(pem, self._trust_domain)[0] != "operator":
            return None
        if self._stale_at is not None and now >= self._stale_at:
            self.identify(pem, now)  # refuses, saying the CRL is stale
        who = identify_peer(
            pem,
            trust_domain=self._trust_domain,
            revoked=self._revoked,
            now=lambda: dt.datetime.fromtimestamp(now, dt.UTC),
        )
        return who.name

    def _remember(self, pem: bytes, outcome: ConsumerIdentity | tuple[str, float]) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[pem] = outcome


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


class Endpoints(Protocol[T_co]):
    """A route's provider endpoints (``tabadol.balancer``): the next one to call, or
    UntrustedProvider when none presents a certificate the CRL allows."""

    def pick(self, now: float) -> T_co: ...


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What the broker knows of a call when it arrives, before deciding anything."""

    method: MethodContract
    provider: str
    request_id: str
    certificate: bytes | None  # the PEM certificate TLS verified (None: the peer sent none)
    incoming: Metadata  # the consumer's metadata
    trace_headers: Metadata = ()  # the broker's own trace context for the provider
    draining: bool = False  # the broker is shutting down
    registry_stale: str | None = None  # why the registry can no longer be trusted
    ledger_problem: str | None = None  # why the ledger cannot account for a call now
    protocol: str = "grpc"  # how it came in: "grpc", or through the gateway "connect"/"rest"


@dataclass(frozen=True)
class Rules:
    """One configuration's worth of what admission checks against."""

    identities: Identities
    policy: Policy
    agencies: frozenset[str]  # declared by the registry
    limits: Limits | None = None
    floods: FloodRecords = dataclasses.field(default_factory=FloodRecords)  # see FloodRecords


@dataclass(frozen=True, slots=True)
class Admitted(Generic[T]):
    caller: Caller
    endpoint: T  # the provider endpoint to forward to
    headers: Metadata  # what the provider receives
    held: Admission  # counted against the consumer's concurrency limits until released
    grant: str = ""  # the id of the grant that admitted the call


Warning = tuple[tuple[str, ...], str, tuple[object, ...]]  # RefusalLog key, format, arguments


@dataclass(frozen=True, slots=True)
class Refused:
    code: Code
    details: str  # what the consumer reads
    caller: Caller = NOBODY
    trailers: Metadata = ()  # besides the request id: retry pushback
    recorded: bool = True  # whether the ledger records the refused call
    counted: str = ""  # the label of the broker's refusal counter, when it has one
    warning: Warning | None = None  # the (throttled) log line


def admit(
    facts: CallFacts, rules: Rules, endpoints: Endpoints[T], now: Now
) -> Admitted[T] | Refused:
    """The broker's own state, then identity, then limits, then policy, then the endpoint.

    Limits come before policy so that refused calls count too: an agency cannot probe
    methods it has no grant for (nor fill the ledger with refusals) faster than its rate.
    """
    if facts.draining:
        # Refused outright, before any work: safe for the consumer to retry elsewhere.
        return Refused(
            Code.UNAVAILABLE,
            "Tabadol broker: this broker is shutting down; retry the call (another broker "
            "instance answers it)",
        )
    if facts.registry_stale is not None:
        # Fail closed ([registry] stale = "refuse"): grants may have changed since.
        return Refused(
            Code.UNAVAILABLE, f"Tabadol broker: {facts.registry_stale}", counted="registry_stale"
        )
    if facts.ledger_problem is not None:
        # Fail closed: an exchange the ledger cannot account for must not happen.
        return Refused(
            Code.UNAVAILABLE,
            f"Tabadol broker: the transaction ledger cannot be written ({facts.ledger_problem}); "
            "calls are refused until it can, so that no exchange goes unaccounted",
            recorded=False,
            counted="ledger_unavailable",
        )
    method = facts.method
    try:
        identity = rules.identities.identify(facts.certificate, now.wall)
    except IdentityRejected as e:
        return _unidentified(facts, rules, e, now)
    consumer = identity.agency_id
    caller = Caller(consumer, f"{identity.serial:x}", True)
    held = NOTHING_HELD
    if rules.limits is not None and rules.limits.active:
        verdict = rules.limits.admit(consumer, method.service)
        if isinstance(verdict, Refusal):
            flood = consumer not in rules.agencies
            return over_limit(facts, rules, caller, verdict, consumer if flood else None, now)
        held = verdict
    grant = rules.policy.grant_for(consumer, method.path, now.wall)
    if grant is None:
        held.release()
        why = (
            "has no grant"
            if consumer in rules.agencies
            else "is not a registered agency and has no grant"
        )
        return Refused(
            Code.PERMISSION_DENIED,
            f"Tabadol broker: agency {consumer!r} {why} for method {method.name!r} of service "
            f"{method.service!r}",
            caller,
            warning=(
                (consumer, method.path),
                "denied %s calling %s (request %s)",
                (consumer, method.path, facts.request_id),
            ),
        )
    try:
        endpoint = endpoints.pick(now.monotonic)
    except UntrustedProvider as e:
        held.release()
        return untrusted(facts, caller, e)
    headers = request_metadata(
        facts.incoming, consumer, facts.request_id, facts.trace_headers, grant.id, grant.purpose
    )
    return Admitted(caller, endpoint, headers, held, grant.id)


def admit_platform(
    certificate: bytes | None, method: str, rules: Rules, now: Now
) -> Caller | Refused:
    """A call to the broker's own services (discovery, reflection, health): only a declared
    agency may ask. A certificate refused too often is throttled as on the request path."""
    try:
        identity = rules.identities.identify(certificate, now.wall)
    except IdentityRejected as e:
        why, counted = str(e), "platform_unauthenticated"
        code, key = Code.UNAUTHENTICATED, ("platform", "identity", why)
        warning: Warning = (key, "refused a call to %s: %s", (method, why))
    else:
        agency = identity.agency_id
        if agency in rules.agencies:
            return Caller(agency, f"{identity.serial:x}", True)
        why, counted = (
            f"agency {agency!r} is not a registered agency of this exchange",
            ("platform_undeclared"),
        )
        code = Code.PERMISSION_DENIED
        warning = (("platform", agency), "refused %s calling %s: not a registered agency",
                   (agency, method))  # fmt: skip
    return _platform_refusal(certificate, rules, code, why, counted, warning)


def _platform_refusal(
    certificate: bytes | None, rules: Rules, code: Code, why: str, counted: str, warning: Warning
) -> Refused:
    """A refused call to the broker's own services, throttled per claimed certificate as on
    the request path: past the rate, RESOURCE_EXHAUSTED with the pushback."""
    name, caller = claimed(certificate)
    too_fast = rules.limits.admit_refused(name) if rules.limits is not None else None
    if too_fast is not None:
        return Refused(
            Code.RESOURCE_EXHAUSTED,
            f"Tabadol broker: {why}; {too_fast.message}",
            caller,
            _pushback(too_fast),
            counted=counted,
            warning=warning,
        )
    return Refused(code, f"Tabadol broker: {why}", caller, counted=counted, warning=warning)


def admit_access(
    certificate: bytes | None, method: str, rules: Rules, now: Now
) -> tuple[Literal["agency", "operator"], str] | Refused:
    """A call to the Access service: an operator's certificate, or as for the other platform
    services a declared agency's (``admit_platform``). Nobody else."""
    try:
        operator = rules.identities.operator(certificate, now.wall)
    except IdentityRejected as e:  # an operator's certificate, revoked or expired
        why = str(e)
        warning: Warning = (("platform", "identity", why), "refused a call to %s: %s",
                            (method, why))  # fmt: skip
        return _platform_refusal(
            certificate, rules, Code.UNAUTHENTICATED, why, "platform_unauthenticated", warning
        )
    if operator is not None:
        return "operator", operator
    decision = admit_platform(certificate, method, rules, now)
    return decision if isinstance(decision, Refused) else ("agency", decision.agency)


def untrusted(facts: CallFacts, caller: Caller, e: UntrustedProvider) -> Refused:
    """No endpoint of the provider may be called: its certificate is revoked or unchecked."""
    why = (
        "presents a revoked certificate"
        if e.revoked
        else "could not be reached to check its certificate"
    )
    return Refused(
        Code.UNAVAILABLE,
        f"Tabadol broker: provider {facts.provider!r} {why}; the call was not forwarded",
        caller,
        warning=(
            ("untrusted", facts.provider),
            "not forwarding to %s: it %s (request %s)",
            (facts.provider, why, facts.request_id),
        ),
    )


def _unidentified(facts: CallFacts, rules: Rules, e: IdentityRejected, now: Now) -> Refused:
    """A certificate that proves no agency. Refusals are recorded too, as whom it claims to
    be (unverified); a flood of them from one certificate is throttled."""
    name, caller = claimed(facts.certificate)
    too_fast = rules.limits.admit_refused(name) if rules.limits is not None else None
    warning: Warning = (
        ("identity", str(e)),
        "refused a call to %s: %s (request %s)",
        (facts.method.path, e, facts.request_id),
    )
    if too_fast is not None:
        refusal = Refusal(f"{e}; {too_fast.message}", too_fast.retry_after_s)
        limited = over_limit(facts, rules, caller, refusal, name, now)
        return dataclasses.replace(limited, warning=warning)
    return Refused(Code.UNAUTHENTICATED, f"Tabadol broker: {e}", caller, warning=warning)


def over_limit(
    facts: CallFacts,
    rules: Rules,
    caller: Caller,
    refusal: Refusal,
    flooding: str | None,
    now: Now,
) -> Refused:
    """RESOURCE_EXHAUSTED with when to retry. A flooding caller's refusals (``flooding``
    names it) are recorded once a second."""
    recorded = flooding is None or rules.floods.record(flooding, now.monotonic)
    return Refused(
        Code.RESOURCE_EXHAUSTED,
        f"Tabadol broker: {refusal.message}",
        caller,
        _pushback(refusal),
        recorded=recorded,
        counted="" if recorded else "flood_unrecorded",
        warning=(
            (caller.agency, "limit"),
            "limited %s calling %s: %s",
            (caller.agency, facts.method.path, refusal.message),
        ),
    )


def _pushback(refusal: Refusal) -> Metadata:
    """When to try again: gRPC's own retry pushback (gRFC A6), and the same for people and
    scripts, in milliseconds."""
    retry_ms = str(max(1, round(refusal.retry_after_s * 1000)))
    return (("grpc-retry-pushback-ms", retry_ms), (RETRY_AFTER_KEY, retry_ms))


def trailers_of(refused: Refused, request_id: str) -> Metadata:
    """The trailing metadata a refusal goes out with: the request id, then its own."""
    return ((REQUEST_ID_KEY, request_id), *refused.trailers)


def claimed(pem: bytes | None) -> tuple[str, Caller]:
    """A certificate refused at identity: its name for throttling its refusals (the agency
    and serial it claims, or its digest when it claims none), and that claim, unverified."""
    if not pem:
        return "", NOBODY
    claim = claimed_agency(pem)
    if claim is None:
        return hashlib.sha256(pem).hexdigest(), NOBODY
    return f"{claim[0]}/{claim[1]:x}", Caller(claim[0], f"{claim[1]:x}", False)
