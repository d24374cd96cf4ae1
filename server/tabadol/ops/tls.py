"""HTTPS for the ops console: its TLS context, and the client certificate handed to the app.

Uvicorn verifies a client certificate when asked (``CERT_OPTIONAL`` here, so that a browser
without one can still open a login link) but does not show it to the application. This
protocol adds it to each request's scope as the ASGI TLS extension defines it
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM), which Uvicorn itself may one day
fill; the app reads only that. Identity and revocation are then checked on every request.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from tabadol.ops.trust import OpsTrust


def server_context(trust: OpsTrust) -> ssl.SSLContext:
    """TLS 1.2+ with the ops certificate; a client certificate is asked for and, when one is
    sent, must chain to the platform CA or the handshake fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(trust.cert_path, trust.key_path)
    context.load_verify_locations(cadata=trust.ca_pem.decode("ascii"))
    context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols(["http/1.1"])
    return context


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection; None when it is not over TLS."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    # Only the leaf is reachable before Python 3.13; it is all the identity needs.
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }


class ClientCertH11Protocol(H11Protocol):
    """Uvicorn's HTTP/1.1 protocol, with the verified client certificate in every scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = tls_extension(transport)
        if tls is None:
            return
        app = self.app

        async def with_tls(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {}).setdefault("tls", tls)
            await app(scope, receive, send)

        self.app = with_tls
