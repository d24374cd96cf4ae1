"""Who may see what on the ops console. Pure: identities and paths in, decisions out.

- Operators see everything.
- Auditors see the ledger views (dashboard, reports) but no raw spans.
- An agency sees the traces and ledger rows in which it is consumer or provider, and its
  own quarterly assessment.
- The broker and the ops console's own certificates see nothing: they are machines.
- Nobody else gets anything: no identity is 401, an identity without the right is 403.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from tabadol.identity import Role
from tabadol.ops.ingest import BROKER_SERVICE, SENDER_ATTRIBUTE
from tabadol.ops.model import Edge, SpanRecord

# What a path shows: the web UI's pages and files, raw spans (the Jaeger API and Tabadol's
# search and agency graph), the service graph, the ledger's views, and the login link itself.
Family = Literal["page", "spans", "service-graph", "ledger", "login"]
Via = Literal["certificate", "login link"]

RIGHTS: dict[Role, frozenset[Family]] = {
    "operator": frozenset({"page", "spans", "service-graph", "ledger"}),
    "auditor": frozenset({"page", "ledger"}),
    "agency": frozenset({"page", "spans", "ledger"}),  # scoped to the agency's own rows
    "broker": frozenset(),
    "ops": frozenset(),
}
WHAT = {
    "page": "the console",
    "spans": "raw spans (traces, search and the agency graph)",
    "service-graph": "the service graph of every span",
    "ledger": "the ledger views (dashboard and reports)",
    "login": "the login link",
}
LEDGER_PATHS = ("/api/tabadol/dashboard", "/api/tabadol/reports")
PAGE_APIS = ("/api/tabadol/whoami",)


@dataclass(frozen=True)
class Viewer:
    """Who is looking, how they proved it, and until when that proof holds (POSIX seconds)."""

    role: Role
    name: str
    via: Via
    expires_at: float

    @property
    def agency(self) -> str | None:
        """The agency whose rows alone this viewer may see; None for the platform's people."""
        return self.name if self.role == "agency" else None

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}" if self.name else f"the {self.role}"


@dataclass(frozen=True)
class Allowed:
    viewer: Viewer


@dataclass(frozen=True)
class Refused:
    """An HTTP status (401: who are you; 403: not for you) and a message naming why."""

    status: Literal[401, 403]
    message: str


def family_of(path: str) -> Family:
    """What a request path shows. Unknown API paths count as raw spans (the strictest
    family any agency may enter), unknown pages as pages; both then answer 404."""
    if path == "/login":
        return "login"
    if path.startswith("/reports/") or path in LEDGER_PATHS:
        return "ledger"
    if path in PAGE_APIS:
        return "page"
    if path == "/api/dependencies":
        return "service-graph"
    if path == "/api" or path.startswith("/api/"):
        return "spans"
    return "page"


def decide(viewer: Viewer | None, family: Family, why_unknown: str = "") -> Allowed | Refused:
    """Whether ``viewer`` may see a path of ``family``; ``why_unknown`` says why there is no
    viewer (a rejected certificate, an expired session)."""
    if viewer is None:
        return Refused(
            401,
            why_unknown
            or "log in: present a client certificate from the platform CA, or open a login link",
        )
    if family not in RIGHTS[viewer.role]:
        return Refused(403, f"{viewer} may not see {WHAT[family]}")
    return Allowed(viewer)


def _from_broker(span: SpanRecord) -> bool:
    """Sent as ``tabadol-broker`` by the broker's certificate: the collector refuses that
    service name from anyone else, and stamps every span with its verified sender."""
    sender = str(span.resource.get(SENDER_ATTRIBUTE, ""))
    _, _, path = sender.removeprefix("spiffe://").partition("/")
    return span.service == BROKER_SERVICE and sender.startswith("spiffe://") and path == "broker"


def trace_is_visible(spans: Sequence[SpanRecord], agency: str) -> bool:
    """A trace is an agency's when one of the broker's spans names it consumer or provider;
    another service's spans cannot claim a trace for anyone."""
    return any(
        _from_broker(span)
        and agency
        in (span.attributes.get("tabadol.consumer"), span.attributes.get("tabadol.provider"))
        for span in spans
    )


def own_edges(edges: Iterable[Edge], agency: str) -> list[Edge]:
    """The agency-graph edges in which this agency is consumer or provider."""
    return [e for e in edges if agency in (e.parent, e.child)]


def host_name(header: str) -> str | None:
    """The name in a Host header, lower-case, without port or IPv6 brackets; None if it is
    not of the form host[:port]."""
    header = header.strip().lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name
    name, sep, port = header.partition(":")
    if sep and not port.isdigit():
        return None
    return name or None


def served_names(
    bind_host: str, certificate_names: Iterable[str], extra: Iterable[str]
) -> frozenset[str]:
    """The names the console answers to: where it is bound (unless a wildcard), loopback,
    its certificate's names, and those given with --allowed-host."""
    names = {"localhost", "127.0.0.1", "::1"}
    if bind_host not in ("", "0.0.0.0", "::"):
        names.add(bind_host.strip("[]").lower())
    names.update(n.strip("[]").lower() for n in (*certificate_names, *extra))
    return frozenset(names)


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
