"""Names shared by both sides of the wire: SPIFFE IDs and the DNS names TLS verifies."""

import re

# Both are used with fullmatch: `$` would let a trailing newline through into logs and paths.
AGENCY_ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
TRUST_DOMAIN_PATTERN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?")


def agency_spiffe_id(trust_domain: str, agency_id: str) -> str:
    return f"spiffe://{trust_domain}/agency/{agency_id}"


def broker_spiffe_id(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/broker"


def agency_dns_name(trust_domain: str, agency_id: str) -> str:
    """The name TLS verifies when the broker dials an agency's provider endpoint."""
    return f"{agency_id}.agency.{trust_domain}"


def broker_dns_name(trust_domain: str) -> str:
    """The name TLS verifies when an agency dials the broker."""
    return f"broker.{trust_domain}"


def trust_domain_of_agency(spiffe_id: str) -> tuple[str, str]:
    """Split ``spiffe://<domain>/agency/<id>`` into (domain, id); ValueError otherwise."""
    rest = spiffe_id.removeprefix("spiffe://")
    domain, _, path = rest.partition("/")
    kind, _, agency_id = path.partition("/")
    if rest == spiffe_id or kind != "agency" or not AGENCY_ID_PATTERN.fullmatch(agency_id):
        raise ValueError(f"{spiffe_id!r} is not a Tabadol agency identity")
    return domain, agency_id


def operator_spiffe_id(trust_domain: str, name: str) -> str:
    """A person who runs the exchange: sees everything on the ops console."""
    return f"spiffe://{trust_domain}/operator/{name}"


def auditor_spiffe_id(trust_domain: str, name: str) -> str:
    """A regulator or auditor: the ledger views, dashboard and reports, not raw spans."""
    return f"spiffe://{trust_domain}/auditor/{name}"


def ops_spiffe_id(trust_domain: str) -> str:
    """The ops console and span collector (``tabadol ops``)."""
    return f"spiffe://{trust_domain}/ops"


def ops_dns_name(trust_domain: str) -> str:
    """The name TLS verifies when a browser, tool or exporter dials the ops console."""
    return f"ops.{trust_domain}"
