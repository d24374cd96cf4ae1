"""What the span collector admits: who may send spans, and how large and how dated they may
be. Pure: no gRPC, no store; the collector turns a refusal into a status in one place.

- Only the broker and agencies send spans; operators, auditors and the ops console do not.
- Only the broker may call itself ``tabadol-broker``: the agency graph and the exchange's
  error rates are read from its spans.
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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from tabadol.identity import PlatformIdentity
from tabadol.ops.model import SpanEvent, SpanRecord

BROKER_SERVICE = "tabadol-broker"
SENDER_ATTRIBUTE = "tabadol.sender"
SENDER_ROLES = ("broker", "agency")

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
    """The SPIFFE ID the sender's certificate carries (identity already verified)."""
    path = f"{who.role}/{who.name}" if who.name else who.role
    return f"spiffe://{trust_domain}/{path}"


def admit_sender(who: PlatformIdentity, services: Iterable[str]) -> SenderRefused | None:
    """None when ``who`` may export spans under these service names."""
    if who.role not in SENDER_ROLES:
        return SenderRefused(
            "PERMISSION_DENIED",
            f"{who} may not send spans: only the broker and agencies export to the collector",
        )
    if who.role != "broker" and BROKER_SERVICE in set(services):
        return SenderRefused(
            "PERMISSION_DENIED",
            f"{who} may not send spans as service {BROKER_SERVICE!r}: only the broker does",
        )
    return None


def admit_spans(
    records: Sequence[SpanRecord], sender: str, limits: SpanLimits, now_ns: int
) -> tuple[list[SpanRecord], int]:
    """The records to store, stamped, cut to the limits and clamped in time; and how many
    were dropped for being dated outside the window."""
    low = now_ns - int(limits.max_age_s * 1e9)
    high = now_ns + int(limits.max_future_s * 1e9)
    kept = []
    for record in records:
        if not low <= record.start_ns <= high:
            continue
        kept.append(_bounded(record, sender, limits, low, high))
    return kept, len(records) - len(kept)


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
