"""Provider endpoints as the broker dials them: one channel each, closed only when idle."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc.aio

from tabadol.contracts import MethodContract, RpcKind

EJECT_BASE_S = 1.0
EJECT_MAX_S = 30.0
REPORT_INTERVAL_S = 10.0  # at most one log line a while about the same failing endpoint


class Upstream:
    """One provider endpoint. A reload retires it; its channel closes once its calls end.

    It is available unless the active health check finds it failing, or it was ejected:
    after ``eject_after`` calls in a row that could not reach it, it is set aside for a
    back-off period (1 s, doubling to 30 s while it keeps failing).
    """

    __slots__ = (
        "_closing",
        "channel",
        "eject_after",
        "ejected_until",
        "ejections",
        "endpoint",
        "failures",
        "healthy",
        "in_flight",
        "presented",
        "provider",
        "reported_at",
        "retired",
        "trusted",
    )

    def __init__(
        self,
        provider: str,
        endpoint: str,
        channel: grpc.aio.Channel,
        closing: set[asyncio.Task[None]],
    ) -> None:
        self.provider = provider
        self.endpoint = endpoint
        self.channel = channel
        self.in_flight = 0
        self.retired = False
        self._closing = closing
        self.healthy = True  # until an active check says otherwise
        self.failures = 0  # calls in a row that could not reach it
        self.ejected_until = 0.0  # monotonic seconds
        self.ejections = 0
        self.eject_after = 3
        self.reported_at = float("-inf")  # monotonic seconds
        # The certificate it last presented, and whether the CRL allows it: None until
        # the first check (broker/provider_trust.py); an endpoint never judged good gets
        # no calls.
        self.presented: bytes | None = None
        self.trusted: bool | None = None

    def available(self, now: float) -> bool:
        return self.trusted is True and self.healthy and now >= self.ejected_until

    def outcome(self, reached: bool, now: float) -> bool:
        """Count a call's outcome; True when this one ejected the endpoint."""
        if reached:
            self.failures = 0
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

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self._close()

    def retire(self) -> None:
        """No new calls will come; close as soon as the ones in flight have ended."""
        if not self.retired:
            self.retired = True
            if self.in_flight == 0:
                self._close()

    def _close(self) -> None:
        task = asyncio.get_running_loop().create_task(self.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def stub(self, method: MethodContract) -> Any:
        """A multicallable with no serializers: payloads cross as the bytes they arrived as."""
        match method.kind:
            case RpcKind.UNARY:
                return self.channel.unary_unary(method.path)
            case RpcKind.SERVER_STREAMING:
                return self.channel.unary_stream(method.path)
            case RpcKind.CLIENT_STREAMING:
                return self.channel.stream_unary(method.path)
            case RpcKind.BIDI_STREAMING:
                return self.channel.stream_stream(method.path)


@dataclass
class Route:
    """Where one method's calls go: the provider agency and its endpoints, round robin over
    the available ones. Settings of the service travel with it."""

    method: MethodContract
    provider: str
    targets: tuple[tuple[Upstream, Any], ...]  # (endpoint, its stub for this method)
    max_message_bytes: int | None = None
    max_stream_seconds: float | None = None
    stream_idle_seconds: float | None = None
    _next: Callable[[], tuple[Upstream, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next = itertools.cycle(self.targets).__next__

    def pick(self, now: float, avoid: Upstream | None = None) -> tuple[Upstream, Any]:
        """The next available endpoint (not ``avoid`` if another will do). When none is
        available, the one back soonest: the call then fails fast, and tells. An endpoint
        whose certificate is revoked or not yet checked is never picked: UntrustedProvider."""
        fallback: tuple[Upstream, Any] | None = None
        for _ in range(len(self.targets)):
            target = self._next()
            upstream = target[0]
            if upstream.available(now) and upstream is not avoid:
                return target
            if upstream.trusted is True and (
                fallback is None or upstream.ejected_until < fallback[0].ejected_until
            ):
                fallback = target
        if avoid is not None and any(u.available(now) for u, _ in self.targets):
            return next(t for t in self.targets if t[0].available(now))
        if fallback is None:
            revoked = any(u.trusted is False for u, _ in self.targets)
            raise UntrustedProvider(self.provider, revoked)
        return fallback


class UntrustedProvider(Exception):
    """No endpoint of the provider presents a certificate the CRL allows (or none was
    checked yet): the call must not be forwarded."""

    def __init__(self, provider: str, revoked: bool) -> None:
        super().__init__(provider)
        self.provider = provider
        self.revoked = revoked  # False: no endpoint could be reached to be checked yet
