"""Login links and the sessions they open, as Jupyter does for a newcomer's browser.

A link carries a random one-time token; opening it exchanges the token for a session cookie.
Tokens are single-use and short-lived, sessions expire, and only hashes are kept: a memory
dump or a log line shows no usable secret. Pure: an injected clock, no I/O.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tabadol.identity import Role
from tabadol.ops.access import Viewer

LINK_TTL_S = 15 * 60.0
SESSION_TTL_S = 12 * 3600.0
COOKIE = "tabadol_session"
_MAX_SESSIONS = 10_000


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class _Pending:
    role: Role
    name: str
    expires_at: float


@dataclass
class Sessions:
    """Issued login tokens and open sessions, by the SHA-256 of their secret."""

    clock: Callable[[], float] = time.time
    link_ttl_s: float = LINK_TTL_S
    session_ttl_s: float = SESSION_TTL_S
    _links: dict[str, _Pending] = field(default_factory=dict)
    _sessions: dict[str, Viewer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def issue_token(self, role: Role, name: str) -> str:
        """A new one-time login token for ``role`` ``name``."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._forget_expired()
            self._links[_digest(token)] = _Pending(role, name, self.clock() + self.link_ttl_s)
        return token

    def redeem(self, token: str) -> tuple[str, Viewer] | None:
        """Exchange a token for (session secret, viewer), once; None if it is unknown,
        used or expired."""
        with self._lock:
            pending = self._links.pop(_digest(token), None)
            now = self.clock()
            if pending is None or pending.expires_at <= now:
                return None
            self._forget_expired()
            if len(self._sessions) >= _MAX_SESSIONS:
                return None
            secret = secrets.token_urlsafe(32)
            viewer = Viewer(pending.role, pending.name, "login link", now + self.session_ttl_s)
            self._sessions[_digest(secret)] = viewer
            return secret, viewer

    def viewer(self, secret: str) -> Viewer | None:
        """Who holds this session cookie, while the session lasts."""
        with self._lock:
            found = self._sessions.get(_digest(secret))
            if found is not None and found.expires_at <= self.clock():
                del self._sessions[_digest(secret)]
                return None
            return found

    def _forget_expired(self) -> None:
        now = self.clock()
        for table in (self._links, self._sessions):
            for key in [k for k, v in table.items() if v.expires_at <= now]:
                del table[key]
