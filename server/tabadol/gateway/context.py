"""A call that came in over HTTP, as the broker's request path sees it.

The request path (``tabadol.broker.proxy``) runs on what a gRPC ``ServicerContext`` tells it:
the peer's certificate, the metadata, the time left, the request message, and where the
answer's metadata and status go. ``HttpCallContext`` answers those same questions for an
HTTP request, so a Connect or REST call is admitted, limited, forwarded, traced and recorded
by the very same code as a gRPC call; only the wire forms differ.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, NoReturn

import grpc
import grpc.aio

from tabadol.metadata import Metadata
from tabadol.status import Code

Protocol = Literal["connect", "rest"]


class HttpAbort(grpc.aio.AbortError):
    """The request path ended the call with this status (``context.abort``)."""

    def __init__(self, code: Code, details: str, trailers: Metadata) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers


class HttpCallContext:
    """The parts of ``grpc.aio.ServicerContext`` the request path uses, for an HTTP call."""

    def __init__(
        self,
        protocol: Protocol,
        certificate: bytes | None,
        metadata: Metadata,
        deadline: float | None,  # monotonic seconds
        read: Callable[[], Awaitable[bytes | object]],
    ) -> None:
        self.protocol = protocol
        self._auth = {"x509_pem_cert": [certificate]} if certificate else {}
        self._metadata = metadata
        self._deadline = deadline
        self._read = read
        self.initial_metadata: Metadata = ()
        self.trailing_metadata: Metadata = ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    async def read(self) -> bytes | object:
        """The one request message (decoded from the HTTP request), or ``grpc.aio.EOF``."""
        return await self._read()

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self.initial_metadata = tuple(metadata)  # sent with the answer's first bytes

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        self.trailing_metadata = tuple(metadata)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        raise HttpAbort(Code(code.value[0]), details, tuple(trailing_metadata))
