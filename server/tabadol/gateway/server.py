"""The gateway's listener: HTTP/1.1 and HTTP/2 over the broker's own mTLS.

Hypercorn speaks HTTP (h11 and h2) to the application; the listener is the gateway's own, so
that each connection's verified client certificate reaches every request's scope as the ASGI
TLS extension (``client_cert_chain``), which Hypercorn does not fill itself. The TLS context
asks for a client certificate and refuses a handshake without one chaining to the exchange's
CA: as on the gRPC port, nobody unauthenticated gets as far as HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from typing import Any

import h2.events
import hypercorn.protocol
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol.h2 import H2Protocol

from tabadol.broker.credentials import BrokerCredentials
from tabadol.broker.metrics_server import server_context
from tabadol.errors import ConfigError
from tabadol.ops.tls import tls_extension

log = logging.getLogger("tabadol.gateway")

CERTIFICATE_KEY = "tabadol.client_certificate"  # in each scope: the verified PEM, as bytes
_HANDSHAKE_S = 10.0
_KEEP_ALIVE_S = 60.0
_CUT_S = 1.0  # how long a connection cut at stop may take to end


def tls_context(credentials: BrokerCredentials) -> ssl.SSLContext:
    """TLS 1.2+ with the broker's certificate (read again at each reload: a new context);
    a client certificate chaining to the exchange's CA is required; h2 before http/1.1."""
    context = server_context(credentials, "[gateway] listen")
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


class GatewayServer:
    """Serves an ASGI application on ``listen`` until stopped."""

    def __init__(
        self, app: Any, listen: str, context: ssl.SSLContext, max_concurrent_streams: int
    ) -> None:
        self._app = ASGIWrapper(app)
        self._listen = listen
        self._context = context
        # The listener keeps its first context; each handshake is handed the one in force, so
        # a reload replaces the CA (one taken out of ca.crt is trusted no more), not adds to it.
        self._current = context
        context.sni_callback = self._in_force
        self._config = HypercornConfig()
        self._config.keep_alive_timeout = _KEEP_ALIVE_S
        # Hypercorn ends a connection after 1,000 requests by default; over HTTP/2 the calls
        # in flight on it then fail at the client. An agency's connection lasts.
        self._config.keep_alive_max_requests = sys.maxsize
        self._config.ssl_handshake_timeout = _HANDSHAKE_S
        self._config.accesslog = None
        self._config.errorlog = log
        # As on the gRPC port ([broker] max_concurrent_streams): calls at once per connection.
        self._config.h2_max_concurrent_streams = max_concurrent_streams
        self._worker = WorkerContext(None)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.port = 0

    async def start(self, reuse_port: bool = False) -> None:
        host, _, port = self._listen.rpartition(":")
        try:
            self._server = await asyncio.start_server(
                self._connected,
                host.strip("[]") or None,
                int(port),
                ssl=self._context,
                ssl_handshake_timeout=_HANDSHAKE_S,
                reuse_port=reuse_port,
            )
        except OSError as e:
            raise ConfigError(f"[gateway] listen: cannot bind {self._listen}: {e.strerror}") from e
        self.port = self._server.sockets[0].getsockname()[1]

    def reload(self, credentials: BrokerCredentials) -> None:
        """New handshakes use the broker's certificate and the CA as reloaded."""
        self._current = tls_context(credentials)  # ConfigError names the files

    def _in_force(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        if self._current is not context:
            ssl_object.context = self._current

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            tls = tls_extension(writer.transport)
            app: Any = self._app if tls is None else _WithTls(self._app, tls)
            server = TCPServer(
                app, asyncio.get_running_loop(), self._config, self._worker, {}, reader, writer
            )
            try:
                await server.run()
            except* OSError as broken:  # a client that broke off (TLS or TCP): not an error
                log.debug("a gateway connection broke off: %s", broken.exceptions[0])
        except asyncio.CancelledError:
            pass  # cut at the end of the grace period: the connection is closed
        finally:
            self._connections.pop(task, None)

    async def stop(self, grace: float) -> None:
        """Stop listening; let requests under way finish within ``grace``, then cut them."""
        if self._server is None:
            return
        self._server.close()
        await self._worker.terminated.set()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=grace)
            for task in pending:  # Hypercorn sees the connection gone and ends its requests
                self._connections[task].transport.abort()
            if pending:
                _, pending = await asyncio.wait(pending, timeout=_CUT_S)
            for task in pending:
                task.cancel()
            if pending:  # bounded, and the caller's own cancellation is not swallowed
                await asyncio.wait(pending, timeout=_CUT_S)
        self._server = None


class _H2Protocol(H2Protocol):
    """Hypercorn's HTTP/2, keeping the connection when DATA arrives for a stream already
    answered. A refusal (no grant, a body over the limit) is answered before the body is
    read; Hypercorn 0.18 then fails the whole connection with a KeyError, and with it every
    other call the consumer has on it (pgjones/hypercorn#329, unfixed upstream)."""

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                # Dropped, but credited: the connection's flow-control window stays open.
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            else:  # one at a time: an earlier event may let the application end a stream
                await super()._handle_events([event])
        await self._flush()


# The protocol Hypercorn's connections choose for ALPN "h2"; only the gateway uses Hypercorn.
hypercorn.protocol.H2Protocol = _H2Protocol  # type: ignore[attr-defined]


class _WithTls:
    """Hypercorn's application wrapper, adding the connection's TLS extension to each scope."""

    def __init__(self, app: ASGIWrapper, tls: dict[str, Any]) -> None:
        self._app, self._tls = app, tls
        chain = tls["client_cert_chain"]
        # The certificate as the request path takes it, made once per connection: one object,
        # whose hash the identity cache computes once.
        self._certificate = chain[0].encode("ascii") if chain else None

    async def __call__(self, scope: Any, receive: Any, send: Any, *spawn: Any) -> None:
        scope.setdefault("extensions", {})["tls"] = self._tls
        scope[CERTIFICATE_KEY] = self._certificate
        await self._app(scope, receive, send, *spawn)
