"""What every span store keeps of a span: its JSON columns, its searchable tags, whose share
it counts in, and about how many bytes it takes there."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from tabadol.ops.ingest import parties, sender_of
from tabadol.ops.model import SpanEvent, SpanRecord

# The columns a span is stored in, in this order (decode_span reads them back).
SPAN_COLUMNS = (
    "trace_id, span_id, parent_span_id, service, name, kind, start_ns, end_ns, status_code, "
    "status_message, attributes, events, resource"
)
# What a span's row and each of its index entries take beyond their text, roughly.
ROW_OVERHEAD = 96
# Only short scalar attributes are searchable; the rest is still stored and shown.
MAX_TAG_VALUE = 256


def tag_value(value: Any) -> str | None:
    """An attribute's searchable text; None for one that is not searchable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        text = str(value)
        return text if len(text) <= MAX_TAG_VALUE else None
    return None


@dataclass(frozen=True)
class EncodedSpan:
    span: SpanRecord
    attributes: str  # JSON
    events: str  # JSON: [[time_ns, name, attributes], ...]
    resource: str  # JSON
    tags: tuple[tuple[str, str], ...]  # (key, text): what a search by tag finds it by
    sender: str  # the collector's stamp: whose share it counts in
    parties: frozenset[str]  # the agencies a broker's span names: who may see its trace
    size: int  # about the bytes it and its tags take: what the size cap counts

    def columns(self) -> tuple[Any, ...]:
        """The values of SPAN_COLUMNS."""
        s = self.span
        return (
            s.trace_id, s.span_id, s.parent_span_id, s.service, s.name, s.kind, s.start_ns,
            s.end_ns, s.status_code, s.status_message, self.attributes, self.events, self.resource,
        )  # fmt: skip


_NUL = "\x00"
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _storable(value: Any) -> Any:
    """``value`` as every store keeps it: U+0000 replaced (U+FFFD; PostgreSQL's text cannot
    hold it), and a NaN or infinite double as OTLP's JSON writes it ("NaN", "Infinity"),
    which the console's JSON can carry."""
    if isinstance(value, str):
        return value.replace(_NUL, "\ufffd")
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE.get(value, "NaN")
    if isinstance(value, list | tuple):
        return type(value)(_storable(v) for v in value)
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    return value


def _needs_cleaning(span: SpanRecord, *encoded: str) -> bool:
    texts = (span.name, span.service, span.status_message)
    return any(_NUL in t for t in texts) or any(
        "\\u0000" in e or "NaN" in e or "Infinity" in e for e in encoded
    )  # a false alarm (a string holding "NaN") only costs a second encoding


def encode_span(span: SpanRecord) -> EncodedSpan:
    encoded = _encoded(span)
    if _needs_cleaning(span, *encoded[:3]):
        span = replace(
            span,
            name=_storable(span.name),
            service=_storable(span.service),
            status_message=_storable(span.status_message),
            attributes=_storable(span.attributes),
            events=tuple(
                replace(e, name=_storable(e.name), attributes=_storable(e.attributes))
                for e in span.events
            ),
            resource=_storable(span.resource),
        )
        encoded = _encoded(span)
    return encoded[3]


def _encoded(span: SpanRecord) -> tuple[str, str, str, EncodedSpan]:
    attributes = json.dumps(span.attributes, default=str)
    events = json.dumps([[e.time_ns, e.name, e.attributes] for e in span.events], default=str)
    resource = json.dumps(span.resource, default=str)
    tags = [
        (key, text)
        for key, value in span.attributes.items()
        if (text := tag_value(value)) is not None
    ]
    if span.is_error:
        tags.append(("error", "true"))
    # In bytes as stored (UTF-8); the JSON columns are ASCII (escaped) already.
    size = (
        len(attributes) + len(events) + len(resource) + _bytes(span.name)
        + _bytes(span.service) + _bytes(span.status_message) + ROW_OVERHEAD
        + sum(_bytes(key) + _bytes(text) + ROW_OVERHEAD for key, text in tags)
    )  # fmt: skip
    return (
        attributes,
        events,
        resource,
        EncodedSpan(
            span, attributes, events, resource, tuple(tags), sender_of(span), parties(span), size
        ),
    )


def _bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def decode_span(row: tuple[Any, ...]) -> SpanRecord:
    """A span from the values of SPAN_COLUMNS."""
    (trace_id, span_id, parent, service, name, kind, start, end, code, message, attrs, events,
     res) = row  # fmt: skip
    return SpanRecord(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        service=service,
        name=name,
        kind=kind,
        start_ns=start,
        end_ns=end,
        status_code=code,
        status_message=message,
        attributes=json.loads(attrs),
        events=tuple(SpanEvent(t, n, a) for t, n, a in json.loads(events)),
        resource=json.loads(res),
    )
