"""Provider endpoints as the broker dials them: one channel each, closed only when idle.

Which endpoint a call goes to is decided in ``tabadol.balancer``; this module is the shell
around it that owns the gRPC channels.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc.aio

from tabadol.balancer import Balancer, EndpointHealth
from tabadol.contracts import MethodContract, RpcKind


class Upstream:
    """One provider endpoint. A reload retires it; its channel closes once its calls end.

    Whether it may take calls is its ``health`` (``tabadol.balancer.EndpointHealth``),
    shared by every route that reaches it.
    """

    __slots__ = (
        "_closing",
        "channel",
        "endpoint",
        "health",
        "in_flight",
        "presented",
        "provider",
        "retired",
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
        self.health = EndpointHealth()
        # The certificate it last presented (broker/provider_trust.py judges it into
        # ``health.trusted``): None until the first check.
        self.presented: bytes | None = None

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


class Target(NamedTuple):
    """One endpoint of a route, with its stub for the route's method."""

    upstream: Upstream
    stub: Any

    @property
    def health(self) -> EndpointHealth:
        return self.upstream.health


@dataclass
class Route:
    """Where one method's calls go: the provider agency and its endpoints, round robin over
    the available ones (``balancer``). Settings of the service travel with it."""

    method: MethodContract
    provider: str
    targets: tuple[Target, ...]  # each endpoint, with its stub for this method
    max_message_bytes: int | None = None
    max_stream_seconds: float | None = None
    stream_idle_seconds: float | None = None
    balancer: Balancer[Target] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.balancer = Balancer(self.provider, self.targets)
