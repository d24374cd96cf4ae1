"""``/metrics`` over HTTPS, for the platform's operators and auditors only.

The series name agencies, services, methods and call counts: who trades with whom is not
for anyone who reaches the port. The broker's own certificate serves them, the TLS handshake
requires a client certificate from the platform CA, and each request is then judged: an
operator or an auditor, not revoked, reads; anyone else gets 401 or 403, logged.

prometheus-client's server can require a client certificate but does not show it to the
application, so this one does. Like prometheus-client's, it accepts in one thread and answers
each connection in a short-lived thread of its own, which also does the TLS handshake (a slow
client holds up only its own thread).
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.registry import Collector

from tabadol.broker.credentials import BrokerCredentials
from tabadol.errors import ConfigError
from tabadol.identity import IdentityRejected, PlatformIdentity, identify_peer
from tabadol.refusals import RefusalLog

log = logging.getLogger("tabadol.broker")

READERS = ("operator", "auditor")
PEER_CERTIFICATE = "tabadol.peer_certificate"  # WSGI environ key: the client's leaf, DER
_CONNECTION_TIMEOUT_S = 10.0  # for the handshake and for each read and write after it

Credentials = Callable[[], BrokerCredentials]  # the ones in force now: they follow reloads


@dataclass(frozen=True, slots=True)
class Refused:
    status: str  # an HTTP status line: "401 Unauthorized", "403 Forbidden"
    reason: str


def authorize(
    cert_pem: bytes, *, trust_domain: str, revoked: Collection[int]
) -> PlatformIdentity | Refused:
    """Whether the holder of a certificate TLS verified against the CA may read the metrics."""
    try:
        who = identify_peer(cert_pem, trust_domain=trust_domain, revoked=revoked)
    except IdentityRejected as e:
        return Refused("401 Unauthorized", str(e))
    if who.role not in READERS:
        return Refused(
            "403 Forbidden", f"{who} may not read the broker's metrics: operators and auditors may"
        )
    return who


def server_context(
    creds: BrokerCredentials, setting: str = "[broker] metrics_listen"
) -> ssl.SSLContext:
    """TLS 1.2+ with the broker's certificate; the client must present one of the CA's.
    ``setting`` names the listener in errors."""
    if creds.cert_path is None or creds.key_path is None:
        raise ConfigError(f"{setting}: the broker's credentials have no files")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(creds.cert_path, creds.key_path)
        context.load_verify_locations(cadata=creds.ca_pem.decode("ascii"))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{setting}: cannot serve HTTPS with {creds.cert_path}, "
            f"{creds.key_path} and the CA: {e}"
        ) from e
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class _Handler(WSGIRequestHandler):
    timeout = _CONNECTION_TIMEOUT_S  # also bounds the handshake, done here in its own thread

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        self.request.do_handshake()  # an error goes to MetricsServer.handle_error
        super().setup()

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ[PEER_CERTIFICATE] = self.request.getpeercert(binary_form=True)
        return environ

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged one by one; refusals are (MetricsServer.refusals)."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """An HTTPS server of one registry's ``/metrics``; ``start`` it, ``stop`` it."""

    daemon_threads = True

    def __init__(
        self, listen: str, registry: Collector, credentials: Credentials, trust_domain: str
    ) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        self.address_family = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        self._credentials = credentials
        self._trust_domain = trust_domain
        current = credentials()
        self._tls = (current, server_context(current))  # a bad file fails the start
        self.refusals = RefusalLog(log)
        super().__init__((host, int(port)), _Handler)
        self.set_app(self._guard(make_wsgi_app(registry)))

    @property
    def port(self) -> int:
        return int(self.server_port)

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="tabadol-metrics", daemon=True).start()

    def stop(self) -> None:
        """Stop serving and close the port, off the caller's thread (shutdown waits for the
        serving thread, and the caller may be an event loop)."""

        def shut() -> None:
            self.shutdown()
            self.server_close()

        threading.Thread(target=shut, name="tabadol-metrics-stop", daemon=True).start()

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        try:
            # The handshake waits for the connection's own thread (_Handler.setup).
            tls = self._context().wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        except OSError:
            connection.close()
            raise  # serve_forever drops the connection and serves on
        return tls, address

    def _context(self) -> ssl.SSLContext:
        """The TLS context of the credentials in force: a reload may bring a new certificate."""
        held, context = self._tls
        current = self._credentials()
        if current is not held:
            try:
                context = server_context(current)
            except ConfigError as e:
                log.error("%s; /metrics keeps the certificate it had", e)
            self._tls = (current, context)
        return context

    def _guard(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def guard(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            peer = str(environ.get("REMOTE_ADDR", "?"))
            der = environ.get(PEER_CERTIFICATE)
            decision = (
                authorize(
                    ssl.DER_cert_to_PEM_cert(der).encode("ascii"),
                    trust_domain=self._trust_domain,
                    revoked=self._credentials().revoked,
                )
                if der  # always, as the handshake requires one; never serve without
                else Refused("401 Unauthorized", "no client certificate")
            )
            if isinstance(decision, Refused):
                self.refusals.warn(
                    (peer, decision.reason),  # a reason names a certificate the CA issued
                    "metrics: refused a scrape from %s (%s): %s",
                    peer,
                    decision.status,
                    decision.reason,
                )
                start_response(decision.status, [("Content-Type", "text/plain; charset=utf-8")])
                return [f"{decision.reason}\n".encode()]
            return app(environ, start_response)

        return guard

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        peer = str(client_address[0])
        if isinstance(error, ssl.SSLError):  # no certificate, or not one of the CA's
            reason = error.reason or str(error)
            self.refusals.warn(
                ("handshake", peer), "metrics: refused a TLS handshake from %s: %s", peer, reason
            )
        elif isinstance(error, OSError):  # reset, timed out
            self.refusals.warn(
                ("connection", peer), "metrics: connection from %s failed: %s", peer, error
            )
        else:
            log.exception("metrics: answering %s failed", peer)
