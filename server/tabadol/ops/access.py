"""Who may see what on the ops console. Pure: identities and paths in, decisions out.

- Operators see everything.
- Auditors see the ledger views (dashboard, reports) but no raw spans.
- An agency sees the traces and ledger rows in which it is consumer or provider, and its
  own quarterly assessment; the services and operations of those traces only; and never
  the addresses of the machines behind the exchange (``HIDDEN_FROM_AGENCIES``). An agency
  the exchange's configuration does not declare sees nothing.
- The broker and the ops console's own certificates see nothing: they are machines.
- Nobody else gets anything: no identity is 401, an identity without the right is 403.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tabadol.identity import Role
from tabadol.ops.ingest import parties
from tabadol.ops.model import Edge, SpanEvent, SpanRecord

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
# Where the broker reached a provider, and any peer's address: an agency's view of a trace
# leaves them out (operators see them). Prefixes end with a dot.
HIDDEN_FROM_AGENCIES = ("tabadol.endpoint", "server.address", "server.port")
HIDDEN_PREFIXES_FROM_AGENCIES = ("net.peer.", "network.peer.", "net.sock.peer.")
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


def decide(
    viewer: Viewer | None,
    family: Family,
    why_unknown: str = "",
    declared: Collection[str] | None = None,
) -> Allowed | Refused:
    """Whether ``viewer`` may see a path of ``family``; ``why_unknown`` says why there is no
    viewer (a rejected certificate, an expired session); ``declared`` is the agencies the
    exchange's configuration declares, None when the console runs without one."""
    if viewer is None:
        return Refused(
            401,
            why_unknown
            or "log in: present a client certificate from the platform CA, or open a login link",
        )
    if viewer.agency is not None and declared is not None and viewer.agency not in declared:
        return Refused(
            403,
            f"{viewer} is not declared in the exchange's configuration: an agency sees the "
            "console once the broker's configuration lists it as an [[agency]]",
        )
    if family not in RIGHTS[viewer.role]:
        return Refused(403, f"{viewer} may not see {WHAT[family]}")
    return Allowed(viewer)


def trace_is_visible(spans: Sequence[SpanRecord], agency: str) -> bool:
    """A trace is an agency's when one of the broker's spans names it consumer or provider;
    another service's spans cannot claim a trace for anyone."""
    return any(agency in parties(span) for span in spans)


def hidden_from_agencies(key: str) -> bool:
    """Whether an attribute holds an address an agency's view leaves out."""
    return key in HIDDEN_FROM_AGENCIES or key.startswith(HIDDEN_PREFIXES_FROM_AGENCIES)


def agency_view(spans: Iterable[SpanRecord]) -> list[SpanRecord]:
    """Spans as an agency may see them: without the addresses of the exchange's machines."""

    def kept(attributes: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in attributes.items() if not hidden_from_agencies(k)}

    return [
        dataclasses.replace(
            span,
            attributes=kept(span.attributes),
            events=tuple(SpanEvent(e.time_ns, e.name, kept(e.attributes)) for e in span.events),
        )
        for span in spans
    ]


def refuse_hidden_tags(tags: Iterable[tuple[str, str]]) -> None:
    """ValueError for a tag filter on an attribute agencies may not see: a search by it
    would confirm a guessed address. A bare key also means its ``tabadol.`` form."""
    for key, _ in tags:
        if hidden_from_agencies(key) or hidden_from_agencies(f"tabadol.{key}"):
            raise ValueError(f"tag {key!r}: agencies may not search by the exchange's addresses")


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
