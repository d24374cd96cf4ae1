"""Who may see what on the ops console. Pure: identities and paths in, decisions out.

- Operators see everything.
- Auditors see the ledger views (dashboard, reports) but no raw spans.
- An agency sees the traces and ledger rows in which it is consumer or provider, and its
  own quarterly assessment; the services and operations of those traces only; and never
  the addresses of the machines behind the exchange (``HIDDEN_FROM_AGENCIES``). An agency
  the exchange's configuration does not declare sees nothing.
- The Access page: an agency sees and acts on the grants and requests of the services it
  provides and those it holds or made; an operator, all of them, and the audit trail (the
  registry's version history). The access desk (``tabadol.access.desk``) judges each
  action again; this table only says who reaches it.
- Auditors read the audit trail and nothing else of access: they check what was changed,
  they change nothing, and grants in force are the parties' and the operators' business.
- A change (any method but GET and HEAD) must come from the console's own pages: JSON,
  sent by a script of the console's origin (``unsafe_request_problem``), never a form
  another site posts with the viewer's certificate or session cookie.
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
# search and agency graph), the service graph, the ledger's views, grants and access
# requests, the registry's audit trail, and the login link itself.
Family = Literal["page", "spans", "service-graph", "ledger", "access", "audit", "login"]
Via = Literal["certificate", "login link"]

RIGHTS: dict[Role, frozenset[Family]] = {
    "operator": frozenset({"page", "spans", "service-graph", "ledger", "access", "audit"}),
    "auditor": frozenset({"page", "ledger", "audit"}),
    # Scoped to the agency's own rows, services, grants and requests.
    "agency": frozenset({"page", "spans", "ledger", "access"}),
    "broker": frozenset(),
    "ops": frozenset(),
}
WHAT = {
    "page": "the console",
    "spans": "raw spans (traces, search and the agency graph)",
    "service-graph": "the service graph of every span",
    "ledger": "the ledger views (dashboard and reports)",
    "access": "grants and access requests",
    "audit": "the registry's audit trail",
    "login": "the login link",
}
LEDGER_PATHS = ("/api/tabadol/dashboard", "/api/tabadol/reports")
ACCESS_API = "/api/tabadol/access"
AUDIT_API = "/api/tabadol/access/audit"
SAFE_METHODS = ("GET", "HEAD")
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
    if path == AUDIT_API or path.startswith(AUDIT_API + "/"):
        return "audit"
    if path == ACCESS_API or path.startswith(ACCESS_API + "/"):
        return "access"
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


def unsafe_request_problem(
    method: str,
    content_type: str | None,
    origin: str | None,
    fetch_site: str | None,
    host: str,
) -> str | None:
    """Why a request that changes something is refused, or None when it may go on. It must
    be JSON (which no HTML form can send without the browser asking the server first) and
    say it comes from this console's own origin: ``Origin`` and, when the browser sends it,
    ``Sec-Fetch-Site``. Either missing or another site's is refused: a certificate or a
    session cookie rides along with any site's request, so they prove nothing here."""
    if method.upper() in SAFE_METHODS:
        return None
    kind = (content_type or "").partition(";")[0].strip().lower()
    if kind != "application/json":
        return (
            f"a {method.upper()} must send JSON (Content-Type: application/json), not "
            f"{kind or 'no content type'}: the console's changes come from its own pages"
        )
    if fetch_site is not None and fetch_site.strip().lower() != "same-origin":
        return (
            f"a {method.upper()} from another site is refused (Sec-Fetch-Site: "
            f"{fetch_site.strip()}): make changes on the console's own pages"
        )
    if origin is None:
        return (
            f"a {method.upper()} must say where it comes from (an Origin header naming this "
            "console): browsers send it; scripts must too"
        )
    if _origin(origin) != _origin(f"https://{host}"):
        return (
            f"a {method.upper()} from another origin ({origin.strip()}) is refused: make "
            "changes on the console's own pages"
        )
    return None


def _origin(origin: str) -> str:
    """An origin as browsers compare them: lower-case, without the default port."""
    return origin.strip().lower().removesuffix(":443")


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
