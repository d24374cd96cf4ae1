"""What the span collector admits: who may send spans, and how large and how dated they may
be. Pure: no gRPC, no store; the collector turns a refusal into a status in one place.

- Only the broker and agencies send spans; operators, auditors and the ops console do not;
  nor does an agency the exchange's configuration does not declare (when it is known).
- Only the broker may call itself ``tabadol-broker``, or anything that reads the same once
  case, width, spaces, dashes and invisible characters are set aside: the agency graph, the
  exchange's error rates and who may see which trace are read from its spans.
- An agency exports under its own name: a service name that is not its id, nor begins with
  ``<id>-``, ``<id>.`` or ``<id>/``, is rewritten to ``<id>/<name>`` (not refused:
  exporters retry a refused batch for ever). Where declared ids nest (``tax`` and
  ``tax-office``), a name belongs to the longest id it falls under.
- Every span is stamped with its sender's SPIFFE ID (resource ``tabadol.sender``), replacing
  whatever the sender wrote there.
- Oversized spans are cut down, not refused: attributes beyond ``max_attributes`` are
  dropped (the first ones kept), string values longer than ``max_value_chars`` truncated,
  events beyond ``max_events`` dropped; links are not stored at all.
- Timestamps: a span that starts more than ``max_future_s`` ahead of the collector's clock,
  or before the retention window, is dropped (and counted back to the sender as rejected);
  its end and its events' times are clamped into the window.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from tabadol.identity import PlatformIdentity
from tabadol.ops.model import SpanEvent, SpanRecord
from tabadol.spiffe import agency_spiffe_id, broker_spiffe_id

BROKER_SERVICE = "tabadol-broker"
SENDER_ATTRIBUTE = "tabadol.sender"
SENDER_ROLES = ("broker", "agency")
# The broker's span attributes that name the parties of a call: who may see its trace.
PARTY_ATTRIBUTES = ("tabadol.consumer", "tabadol.provider")
SERVICE_SEPARATORS = ("-", ".", "/")

DEFAULT_MAX_ATTRIBUTES = 128  # the OpenTelemetry SDK's own default span limit
DEFAULT_MAX_VALUE_CHARS = 4096
DEFAULT_MAX_EVENTS = 128
DEFAULT_MAX_NAME_CHARS = 1024
DEFAULT_MAX_FUTURE_S = 300.0
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class SpanLimits:
    """How much of one span the collector keeps, and the time window it accepts."""

    max_attributes: int = DEFAULT_MAX_ATTRIBUTES  # per span, per event, per resource
    max_value_chars: int = DEFAULT_MAX_VALUE_CHARS
    max_events: int = DEFAULT_MAX_EVENTS
    max_name_chars: int = DEFAULT_MAX_NAME_CHARS  # span, event and service names
    max_future_s: float = DEFAULT_MAX_FUTURE_S
    max_age_s: float = DEFAULT_MAX_AGE_S  # the store's retention age


@dataclass(frozen=True)
class SenderRefused:
    """Why a sender may not export: a gRPC status code name and a message naming it."""

    code: Literal["UNAUTHENTICATED", "PERMISSION_DENIED"]
    message: str


def sender_spiffe_id(who: PlatformIdentity, trust_domain: str) -> str:
    """The SPIFFE ID the sender's certificate carries (identity already verified: the
    broker or an agency, the only senders admit_sender lets through)."""
    if who.role == "broker":
        return broker_spiffe_id(trust_domain)
    return agency_spiffe_id(trust_domain, who.name)


def is_broker_sender(sender: str) -> bool:
    """Whether a ``tabadol.sender`` stamp is the broker's SPIFFE ID (of the trust domain the
    collector stamped it in: the only one it admits)."""
    _, _, path = sender.removeprefix("spiffe://").partition("/")
    return sender.startswith("spiffe://") and path == "broker"


def sender_of(span: SpanRecord) -> str:
    """Who the collector says sent a span; "" for one stored without its stamp."""
    return str(span.resource.get(SENDER_ATTRIBUTE, ""))


def from_broker(span: SpanRecord) -> bool:
    """Sent as ``tabadol-broker`` by the broker's certificate: the collector refuses that
    service name from anyone else, and stamps every span with its verified sender."""
    return span.service == BROKER_SERVICE and is_broker_sender(sender_of(span))


def parties(span: SpanRecord) -> frozenset[str]:
    """The agencies a broker span names consumer or provider; none for anyone else's span,
    which can claim a trace for nobody."""
    if not from_broker(span):
        return frozenset()
    return frozenset(
        value
        for key in PARTY_ATTRIBUTES
        if isinstance(value := span.attributes.get(key), str) and value
    )


def _skeleton(name: str) -> str:
    """A name as it reads: compatibility forms folded, case folded, and every character
    that is not a letter or digit (spaces, dashes, dots, invisible ones) left out."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return "".join(c for c in folded if c.isalnum())


_BROKER_SKELETON = _skeleton(BROKER_SERVICE)


def reads_as_broker(service: str) -> bool:
    """Whether a service name is, or could pass for, ``tabadol-broker``."""
    return _skeleton(service) == _BROKER_SKELETON


def service_owner(service: str, agencies: Iterable[str]) -> str | None:
    """The agency whose namespace a service name is in: the id itself, or the id followed by
    ``-``, ``.`` or ``/``; the longest such id when they nest; None if no agency's."""
    owners = [
        a
        for a in agencies
        if service == a
        or (service.startswith(a) and service[len(a) : len(a) + 1] in SERVICE_SEPARATORS)
    ]
    return max(owners, key=len, default=None)


def own_service_name(service: str, agency: str, declared: Collection[str] = ()) -> str:
    """The name an agency's spans are stored under: its own if the name is in its namespace
    (and not in a longer declared id's), else ``<agency>/<service>``."""
    if service_owner(service, {agency, *declared}) == agency:
        return service
    return f"{agency}/{service}"


def admit_sender(
    who: PlatformIdentity, services: Iterable[str], declared: Collection[str] | None = None
) -> SenderRefused | None:
    """None when ``who`` may export spans under these service names; ``declared`` is the
    set of agencies the exchange's configuration declares, None when it is not known."""
    if who.role not in SENDER_ROLES:
        return SenderRefused(
            "PERMISSION_DENIED",
            f"{who} may not send spans: only the broker and agencies export to the collector",
        )
    if who.role == "agency" and declared is not None and who.name not in declared:
        return SenderRefused(
            "PERMISSION_DENIED",
            f"{who} may not send spans: it is not declared in the exchange's configuration",
        )
    if who.role != "broker":
        for service in sorted(set(services)):
            if reads_as_broker(service):
                return SenderRefused(
                    "PERMISSION_DENIED",
                    f"{who} may not send spans as service {service!r}: it reads as "
                    f"{BROKER_SERVICE!r}, and only the broker sends as that",
                )
    return None


def admit_spans(
    records: Sequence[SpanRecord],
    sender: str,
    limits: SpanLimits,
    now_ns: int,
    *,
    agency: str | None = None,
    declared: Collection[str] = (),
) -> tuple[list[SpanRecord], int]:
    """The records to store, stamped, cut to the limits, clamped in time and, when an
    ``agency`` sent them, named in its namespace; and how many were dropped for being dated
    outside the window."""
    low = now_ns - int(limits.max_age_s * 1e9)
    high = now_ns + int(limits.max_future_s * 1e9)
    kept = []
    for record in records:
        if not low <= record.start_ns <= high:
            continue
        if agency is not None:
            record = _renamed(record, own_service_name(record.service, agency, declared))
        kept.append(_bounded(record, sender, limits, low, high))
    return kept, len(records) - len(kept)


def _renamed(record: SpanRecord, service: str) -> SpanRecord:
    if service == record.service:
        return record
    return replace(record, service=service, resource={**record.resource, "service.name": service})


def _bounded(
    record: SpanRecord, sender: str, limits: SpanLimits, low: int, high: int
) -> SpanRecord:
    def clamp(t: int) -> int:
        return min(max(t, low), high)

    resource = _attributes(record.resource, limits)
    resource.pop(SENDER_ATTRIBUTE, None)
    if len(resource) >= limits.max_attributes:
        resource.pop(next(reversed(resource)))
    resource[SENDER_ATTRIBUTE] = sender
    return replace(
        record,
        service=record.service[: limits.max_name_chars],
        name=record.name[: limits.max_name_chars],
        end_ns=min(max(record.end_ns, record.start_ns), high),
        status_message=record.status_message[: limits.max_value_chars],
        attributes=_attributes(record.attributes, limits),
        events=tuple(
            SpanEvent(
                clamp(e.time_ns),
                e.name[: limits.max_name_chars],
                _attributes(e.attributes, limits),
            )
            for e in record.events[: limits.max_events]
        ),
        resource=resource,
    )


def _attributes(values: Mapping[str, Any], limits: SpanLimits) -> dict[str, Any]:
    kept = list(values.items())[: limits.max_attributes]
    return {k[: limits.max_name_chars]: _value(v, limits) for k, v in kept}


def _value(value: Any, limits: SpanLimits) -> Any:
    if isinstance(value, str):
        return value[: limits.max_value_chars]
    if isinstance(value, list):
        return [_value(v, limits) for v in value[: limits.max_attributes]]
    if isinstance(value, dict):
        return _attributes(value, limits)
    return value
