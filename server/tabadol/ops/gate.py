"""The ops console's one door: every request passes here before any route sees it.

In order: the Host header must name this console (DNS rebinding), the caller is identified
by its verified client certificate (revocation checked on every request) or by a session a
login link opened, ``access.decide`` says whether that identity may see the path (an
agency the exchange's configuration does not declare may see none), and a request that
changes something must be JSON from the console's own origin (cross-site request forgery).
A refusal is answered and logged here, in one place; a route reads ``request.state.viewer``.
"""

from __future__ import annotations

import functools
import html
import json
import logging
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tabadol.identity import IdentityRejected
from tabadol.ops import jaeger
from tabadol.ops.access import (
    Allowed,
    Refused,
    Viewer,
    decide,
    family_of,
    host_name,
    unsafe_request_problem,
)
from tabadol.ops.sessions import COOKIE, Sessions
from tabadol.ops.trust import OpsTrust
from tabadol.refusals import RefusalLog

log = logging.getLogger("tabadol.ops")

REFUSED_PAGE = Path(__file__).parent / "static" / "refused.html"
# Every answer: never framed (clickjacking), never sniffed, never sent on as a Referer
# (a login link's token must not leak to another site), never cached by a proxy.
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True)
class ConsoleAccess:
    """What the door needs: the PKI to check certificates, the open sessions, and the host
    names this console answers to."""

    trust: OpsTrust
    sessions: Sessions
    hosts: frozenset[str]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def session_secret(scope: Scope) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(raw)
    except CookieError:
        return None
    morsel = cookies.get(COOKIE)
    return morsel.value if morsel is not None else None


def client_certificate(scope: Scope) -> bytes | None:
    """The verified client certificate (PEM) of this request's connection, if one was sent."""
    tls = scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or ()
    for pem in chain:
        return pem.encode("ascii") if isinstance(pem, str) else bytes(pem)
    return None


def identify(scope: Scope, access: ConsoleAccess) -> tuple[Viewer | None, str]:
    """Who sent this request, or None and why not. A certificate, when sent, decides alone:
    a revoked one is refused even if the browser also holds a session cookie."""
    pem = client_certificate(scope)
    if pem is not None:
        try:
            who = access.trust.identify(pem)
        except IdentityRejected as e:
            return None, f"client certificate refused: {e}"
        return Viewer(who.role, who.name, "certificate", who.expires_at), ""
    secret = session_secret(scope)
    if secret is not None:
        viewer = access.sessions.viewer(secret)
        if viewer is None:
            return None, "your session has expired or is unknown: open a new login link"
        return viewer, ""
    return None, ""


@functools.cache
def _refused_template() -> str:
    """Read once: a flood of refusals must not cost a file read each."""
    return REFUSED_PAGE.read_text(encoding="utf-8")


def _refusal_page(status: int, title: str, message: str, viewer: Viewer | None) -> bytes:
    who = f"You are logged in as {viewer} ({viewer.via})." if viewer else "You are not logged in."
    page = _refused_template()
    for slot, text in (("title", title), ("message", message), ("who", who)):
        page = page.replace("{{" + slot + "}}", html.escape(text))
    return page.replace("{{status}}", str(status)).encode()


TITLES = {400: "Bad request", 401: "Log in", 403: "Not for you", 421: "Wrong address"}


async def respond_refused(
    scope: Scope, send: Send, status: int, message: str, viewer: Viewer | None = None
) -> None:
    """The refusal, in the Jaeger error envelope for the API and as a page elsewhere."""
    if str(scope.get("path", "")).startswith("/api/"):
        body = json.dumps(jaeger.error_envelope(status, message)).encode()
        kind = b"application/json"
    else:
        body = _refusal_page(status, TITLES.get(status, "Refused"), message, viewer)
        kind = b"text/html; charset=utf-8"
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Tabadol realm="ops", mutual-tls'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: Host check, identity, authorization, refusal. Nothing passes it
    unidentified but the login link, which is how an identity is obtained."""

    def __init__(self, app: ASGIApp, access: ConsoleAccess) -> None:
        self.app = app
        self.access = access
        self.refusals = RefusalLog(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send)
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "?"
        path = str(scope.get("path", ""))
        if scope["type"] != "http":
            self.refusals.warn(
                ("websocket", peer), "ops console: refused a websocket from %s", peer
            )
            await send({"type": "websocket.close", "code": 1008})
            return
        header = _header(scope, b"host") or ""
        name = host_name(header)
        if name is None or name not in self.access.hosts:
            self.refusals.warn(
                ("host", header),
                "ops console: refused %s %s from %s: Host %r is not a name this console serves "
                "(DNS rebinding?); add it with --allowed-host if it is yours",
                scope.get("method"),
                path,
                peer,
                header,
            )
            await respond_refused(
                scope, send, 421, f"this console does not serve the host {header!r}"
            )
            return
        family = family_of(path)
        if family == "login":
            await self._login(scope, receive, send, peer)
            return
        viewer, why = identify(scope, self.access)
        decision = decide(viewer, family, why, self.access.trust.agencies)
        if isinstance(decision, Allowed):
            forged = unsafe_request_problem(
                str(scope.get("method", "")),
                _header(scope, b"content-type"),
                _header(scope, b"origin"),
                _header(scope, b"sec-fetch-site"),
                header,
            )
            if forged is not None:
                decision = Refused(403, forged)
        if not isinstance(decision, Allowed):
            who = str(viewer) if viewer else "anonymous"
            self.refusals.warn(
                (str(decision.status), who, family),
                "ops console: %d for %s %s from %s (%s): %s",
                decision.status,
                scope.get("method"),
                path,
                peer,
                who,
                decision.message,
            )
            await respond_refused(scope, send, decision.status, decision.message, viewer)
            return
        scope.setdefault("state", {})["viewer"] = decision.viewer
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send, peer: str) -> None:
        """Exchange a login link's one-time token for a session cookie, then go to /."""
        token = Request(scope).query_params.get("token", "")
        redeemed = self.access.sessions.redeem(token) if token else None
        if redeemed is None:
            self.refusals.warn(
                ("login", peer), "ops console: refused a login link from %s: unknown, used or "
                "expired token", peer
            )  # fmt: skip
            await respond_refused(
                scope,
                send,
                401,
                "this login link is unknown, already used or expired: a link opens one "
                "session, once, within 15 minutes. Ask for a new one, or log in with your "
                "client certificate.",
            )
            return
        secret, viewer = redeemed
        log.info("ops console: %s logged in from %s with a login link", viewer, peer)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            secret,
            max_age=int(self.access.sessions.session_ttl_s),
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        await response(scope, receive, send)


def _with_security_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers: list[Any] = list(message.get("headers", []))
            present = {k.lower() for k, _ in headers}
            headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
            message = {**message, "headers": headers}
        await send(message)

    return sending
