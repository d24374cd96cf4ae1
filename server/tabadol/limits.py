"""Rate and concurrency limits per consumer, and per consumer and service. Pure: the clock
is passed in, nothing waits."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# A rule for this consumer applies to each agency without a rule of its own over all its
# services, one agency at a time: the identified agencies the registry does not declare.
ANY_OTHER = "*"
# Such an agency has no grant, so each of its calls is a refusal: they come this fast at most.
UNDECLARED_RATE = 5.0
UNDECLARED_BURST = 20.0
# A certificate refused at identity (revoked, undeclared domain, stale CRL...), by the agency
# and serial it claims: its refusals come this fast at most, then RESOURCE_EXHAUSTED.
REFUSED_RATE = 5.0
REFUSED_BURST = 20.0
_KEYS_LIMIT = 10_000  # buckets kept for agencies and certificates not named in the rules


@dataclass(frozen=True)
class LimitRule:
    """A consumer's limits, for all its calls (``service`` None) or for one service."""

    consumer: str
    service: str | None
    rate: float | None  # calls per second, sustained
    burst: float | None  # calls allowed at once above the rate; default: one second's worth
    concurrency: int | None  # calls in flight at once


@dataclass
class TokenBucket:
    """A token bucket: ``rate`` tokens a second, holding at most ``capacity``."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """0.0 if a call may go now (and takes its token), else seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True)
class Refusal:
    """Why a call may not go now, and when it is worth trying again."""

    message: str
    retry_after_s: float


@dataclass(eq=False)
class Admission:
    """Permission for one call; hand it back with ``release`` when the call ends."""

    counters: list[list[int]] = field(default_factory=list)

    def release(self) -> None:
        for counter in self.counters:
            counter[0] -= 1
        self.counters = []


NOTHING_HELD = Admission()  # what a call holds when no limit applies; releasing it does nothing


class Limits:
    """The limits in force. Reconfigure on reload: calls in flight still count."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        refused_rate: float = REFUSED_RATE,
        refused_burst: float = REFUSED_BURST,
    ) -> None:
        self._clock = clock
        self._rules: dict[tuple[str, str | None], LimitRule] = {}
        self._buckets: dict[tuple[str, str | None], TokenBucket] = {}
        self._in_flight: dict[tuple[str, str | None], list[int]] = {}
        self._others: set[str] = set()  # agencies whose limits come from the ANY_OTHER rule
        self._refused_rate, self._refused_burst = refused_rate, refused_burst
        self._refused: dict[str, TokenBucket] = {}

    def configure(self, rules: Iterable[LimitRule]) -> None:
        self._rules = {(r.consumer, r.service): r for r in rules}
        now = self._clock()
        buckets = {}
        for key, rule in self._rules.items():
            if rule.rate is None:
                continue
            capacity = rule.burst if rule.burst is not None else max(1.0, rule.rate)
            old = self._buckets.get(key)
            tokens = min(capacity, old.tokens) if old else capacity
            buckets[key] = TokenBucket(rule.rate, capacity, tokens, old.stamp if old else now)
        self._buckets = buckets
        self._others = set()

    @property
    def active(self) -> bool:
        return bool(self._rules)

    def _rule(self, key: tuple[str, str | None]) -> LimitRule | None:
        rule = self._rules.get(key)
        if rule is not None or key[1] is not None:
            return rule
        rule = self._rules.get((ANY_OTHER, None))
        if rule is not None and key[0] not in self._others:
            if len(self._others) >= _KEYS_LIMIT:  # only an insider mints that many identities
                for other in self._others:
                    self._buckets.pop((other, None), None)
                    if self._in_flight.get((other, None), [1])[0] == 0:
                        del self._in_flight[(other, None)]
                self._others.clear()
            self._others.add(key[0])
            if rule.rate is not None:
                capacity = rule.burst if rule.burst is not None else max(1.0, rule.rate)
                self._buckets[key] = TokenBucket(rule.rate, capacity, capacity, self._clock())
        return rule

    def admit_refused(self, certificate: str) -> Refusal | None:
        """A call refused at identity, from ``certificate`` (the agency and serial it claims):
        None when it may be refused as usual, or a Refusal when it comes too fast."""
        bucket = self._refused.get(certificate)
        now = self._clock()
        if bucket is None:
            if len(self._refused) >= _KEYS_LIMIT:
                self._refused.clear()
            bucket = self._refused[certificate] = TokenBucket(
                self._refused_rate, self._refused_burst, self._refused_burst, now
            )
        wait = bucket.take(now)
        if wait <= 0:
            return None
        return Refusal(
            f"a refused certificate may try at most {self._refused_rate:g} calls/s; "
            f"retry after {wait:.3f} s",
            wait,
        )

    def admit(self, consumer: str, service: str) -> Admission | Refusal:
        """Admit a call, or say which limit it is over (checked for the service first)."""
        if not self._rules:
            return NOTHING_HELD
        now = self._clock()
        held: list[list[int]] = []
        for key in ((consumer, service), (consumer, None)):
            rule = self._rule(key)
            if rule is None:
                continue
            scope = f"for service {service!r}" if key[1] else "across all services"
            if rule.concurrency is not None:
                counter = self._in_flight.setdefault(key, [0])
                if counter[0] >= rule.concurrency:
                    Admission(held).release()
                    return Refusal(
                        f"agency {consumer!r} already has {counter[0]} calls in flight {scope}, "
                        f"its limit; retry when one ends",
                        0.1,
                    )
                counter[0] += 1
                held.append(counter)
            bucket = self._buckets.get(key)
            if bucket is not None:
                wait = bucket.take(now)
                if wait > 0:
                    Admission(held).release()
                    return Refusal(
                        f"agency {consumer!r} is over its rate limit of {rule.rate:g} calls/s "
                        f"{scope}; retry after {wait:.3f} s",
                        wait,
                    )
        return Admission(held)


class RetryBudget:
    """Retries may be at most ``ratio`` of calls: each call earns ``ratio`` of a token (up to
    ``cap``), each retry spends one. A failing provider is not hit twice as hard."""

    def __init__(self, ratio: float, cap: float = 10.0) -> None:
        self.ratio = ratio
        self.cap = cap
        self.tokens = cap

    def earn(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def spend(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
