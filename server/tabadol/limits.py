"""Rate and concurrency limits per consumer, and per consumer and service. Pure: the clock
is passed in, nothing waits."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LimitRule:
    """A consumer's limits, for all its calls (``service`` None) or for one service."""

    consumer: str
    service: str | None
    rate: float | None  # calls per second, sustained
    burst: float | None  # calls allowed at once above the rate; default: one second's worth
    concurrency: int | None  # calls in flight at once


@dataclass
class _Bucket:
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


@dataclass
class Admission:
    """Permission for one call; hand it back with ``release`` when the call ends."""

    counters: list[list[int]] = field(default_factory=list)

    def release(self) -> None:
        for counter in self.counters:
            counter[0] -= 1
        self.counters = []


_NOTHING_HELD = Admission()


class Limits:
    """The limits in force. Reconfigure on reload: calls in flight still count."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._rules: dict[tuple[str, str | None], LimitRule] = {}
        self._buckets: dict[tuple[str, str | None], _Bucket] = {}
        self._in_flight: dict[tuple[str, str | None], list[int]] = {}

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
            buckets[key] = _Bucket(rule.rate, capacity, tokens, old.stamp if old else now)
        self._buckets = buckets

    @property
    def active(self) -> bool:
        return bool(self._rules)

    def admit(self, consumer: str, service: str) -> Admission | Refusal:
        """Admit a call, or say which limit it is over (checked for the service first)."""
        if not self._rules:
            return _NOTHING_HELD
        now = self._clock()
        held: list[list[int]] = []
        for key in ((consumer, service), (consumer, None)):
            rule = self._rules.get(key)
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
