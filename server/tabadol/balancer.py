"""Which provider endpoint a call goes to. Pure: the clock is passed in, nothing waits.

The API, as the broker's shell uses it:

- ``EndpointHealth`` is one provider endpoint's fitness for calls, shared by every route
  that reaches that endpoint. The shell writes what it learns from outside: ``trusted``
  (the provider's certificate was judged against the CRL: None until first checked, then
  True or False) and ``healthy`` (the last active health check). ``available(now)`` says
  whether it may take a call; ``record(reached, now)`` counts a call's outcome and returns
  True when that outcome ejected it (``eject_after`` calls in a row that could not reach
  it set it aside for 1 s, doubling to 30 s while it keeps failing); ``report_due(now)``
  throttles log lines about it to one per 10 s.
- ``Balancer(provider, endpoints)`` chooses among a route's endpoints, each anything with
  a ``health`` (``Endpoint``). ``pick(now, avoid=None)`` returns the next available one,
  round robin (not ``avoid`` if another will do); when none is available, the trusted one
  back soonest, so that the call fails fast and tells; when none is trusted it raises
  ``UntrustedProvider``. A call's outcome is counted on the endpoint picked:
  ``endpoint.health.record(reached, now)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

EJECT_AFTER = 3  # calls in a row that could not reach an endpoint before it is set aside
EJECT_BASE_S = 1.0
EJECT_MAX_S = 30.0
REPORT_INTERVAL_S = 10.0  # at most one log line a while about the same failing endpoint


class UntrustedProvider(Exception):
    """No endpoint of the provider presents a certificate the CRL allows (or none was
    checked yet): the call must not be forwarded."""

    def __init__(self, provider: str, revoked: bool) -> None:
        super().__init__(provider)
        self.provider = provider
        self.revoked = revoked  # False: no endpoint could be reached to be checked yet


class EndpointHealth:
    """Whether one provider endpoint may take calls: trusted, healthy and not ejected."""

    __slots__ = (
        "eject_after",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "reported_at",
        "trusted",
    )

    def __init__(self, eject_after: int = EJECT_AFTER) -> None:
        self.eject_after = eject_after
        # None until the certificate it presents is first judged: an endpoint never judged
        # good gets no calls.
        self.trusted: bool | None = None
        self.healthy = True  # until an active check says otherwise
        self.failures = 0  # calls in a row that could not reach it
        self.ejected_until = 0.0  # monotonic seconds
        self.ejections = 0  # ejections in a row: the next back-off doubles with each
        self.reported_at = float("-inf")  # monotonic seconds

    def available(self, now: float) -> bool:
        return self.trusted is True and self.healthy and now >= self.ejected_until

    def record(self, reached: bool, now: float) -> bool:
        """Count a call's outcome; True when this one ejected the endpoint."""
        if reached:
            self.failures = 0
            # The back-off only resets once the ejection is over: a call that was already
            # under way when it began says nothing about the endpoint now.
            if now >= self.ejected_until:
                self.ejections = 0
            return False
        self.failures += 1
        if self.failures < self.eject_after:
            return False
        self.failures = 0
        self.ejected_until = now + min(EJECT_MAX_S, EJECT_BASE_S * 2**self.ejections)
        self.ejections += 1
        return True

    def report_due(self, now: float) -> bool:
        """Whether a failure of this endpoint is worth a log line now (once per interval):
        a provider that is down fails every call sent to it."""
        if now - self.reported_at < REPORT_INTERVAL_S:
            return False
        self.reported_at = now
        return True


class Endpoint(Protocol):
    """What a balancer chooses among: anything that carries its endpoint's health."""

    @property
    def health(self) -> EndpointHealth: ...


E = TypeVar("E", bound=Endpoint)


class Balancer(Generic[E]):
    """One route's endpoints of ``provider``, round robin over the available ones."""

    __slots__ = ("_entries", "_next", "endpoints", "provider")

    def __init__(self, provider: str, endpoints: Iterable[E]) -> None:
        self.provider = provider
        self.endpoints = tuple(endpoints)
        self._entries = tuple((e.health, e) for e in self.endpoints)
        self._next = itertools.cycle(self._entries).__next__

    def pick(self, now: float, avoid: Endpoint | None = None) -> E:
        """The next available endpoint (not ``avoid`` if another will do). When none is
        available, the trusted one back soonest. UntrustedProvider when none is trusted."""
        shunned = avoid.health if avoid is not None else None
        fallback: tuple[EndpointHealth, E] | None = None
        for _ in self._entries:
            entry = self._next()
            health = entry[0]
            if health.trusted is not True:
                continue
            if health.healthy and now >= health.ejected_until and health is not shunned:
                return entry[1]
            if fallback is None or health.ejected_until < fallback[0].ejected_until:
                fallback = entry
        if shunned is not None and shunned.available(now):
            return next(e for h, e in self._entries if h.available(now))
        if fallback is None:
            revoked = any(h.trusted is False for h, _ in self._entries)
            raise UntrustedProvider(self.provider, revoked)
        return fallback[1]
