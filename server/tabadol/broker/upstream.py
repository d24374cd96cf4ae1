"""Provider endpoints as the broker dials them: one channel each, closed only when idle."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc.aio

from tabadol.contracts import MethodContract, RpcKind


class Upstream:
    """One provider endpoint. A reload retires it; its channel closes once its calls end."""

    __slots__ = ("_closing", "channel", "endpoint", "in_flight", "provider", "retired")

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
    """Where one method's calls go: the provider agency and its endpoints, round robin."""

    method: MethodContract
    provider: str
    targets: tuple[tuple[Upstream, Any], ...]  # (endpoint, its stub for this method)
    _next: Callable[[], tuple[Upstream, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next = itertools.cycle(self.targets).__next__

    def pick(self) -> tuple[Upstream, Any]:
        return self._next()
