"""Spans in the JSON shapes of Jaeger's query API, so Jaeger tools can read Tabadol."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tabadol.ops.model import KIND_NAMES, STATUS_ERROR, STATUS_OK, Edge, SpanRecord


def _tag(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    if isinstance(value, str):
        return {"key": key, "type": "string", "value": value}
    return {"key": key, "type": "string", "value": str(value)}


def span_tags(span: SpanRecord) -> list[dict[str, Any]]:
    tags = [_tag(k, v) for k, v in span.attributes.items()]
    if span.kind in (2, 3, 4, 5):
        tags.append(_tag("span.kind", KIND_NAMES[span.kind]))
    if span.status_code == STATUS_ERROR:
        tags.append(_tag("otel.status_code", "ERROR"))
        tags.append(_tag("error", True))
        if span.status_message:
            tags.append(_tag("otel.status_description", span.status_message))
    elif span.status_code == STATUS_OK:
        tags.append(_tag("otel.status_code", "OK"))
    return tags


def trace_json(spans: Sequence[SpanRecord]) -> dict[str, Any]:
    """One trace: its spans with references, and one process per service instance."""
    processes: dict[tuple[str, str], str] = {}
    process_json: dict[str, Any] = {}
    span_ids = {s.span_id for s in spans}
    out = []
    for span in spans:
        key = (span.service, str(span.resource.get("service.instance.id", "")))
        if key not in processes:
            pid = f"p{len(processes) + 1}"
            processes[key] = pid
            process_json[pid] = {
                "serviceName": span.service,
                "tags": [_tag(k, v) for k, v in span.resource.items() if k != "service.name"],
            }
        references = []
        warnings = []
        if span.parent_span_id:
            references.append(
                {"refType": "CHILD_OF", "traceID": span.trace_id, "spanID": span.parent_span_id}
            )
            if span.parent_span_id not in span_ids:
                warnings.append(f"parent span {span.parent_span_id} was not received")
        out.append(
            {
                "traceID": span.trace_id,
                "spanID": span.span_id,
                "operationName": span.name,
                "references": references,
                "startTime": span.start_ns // 1000,
                "duration": span.duration_ns // 1000,
                "tags": span_tags(span),
                "logs": [
                    {
                        "timestamp": e.time_ns // 1000,
                        "fields": [
                            _tag("event", e.name),
                            *(_tag(k, v) for k, v in e.attributes.items()),
                        ],
                    }
                    for e in span.events
                ],
                "processID": processes[key],
                "warnings": warnings or None,
            }
        )
    trace_id = spans[0].trace_id if spans else ""
    return {"traceID": trace_id, "spans": out, "processes": process_json, "warnings": None}


def envelope(
    data: Any, *, total: int = 0, limit: int = 0, offset: int = 0, errors: Any = None
) -> dict[str, Any]:
    """Jaeger's response wrapper."""
    return {"data": data, "total": total, "limit": limit, "offset": offset, "errors": errors}


def error_envelope(status: int, message: str) -> dict[str, Any]:
    return envelope(None, errors=[{"code": status, "msg": message}])


def dependencies_json(edges: Iterable[Edge]) -> list[dict[str, Any]]:
    return [{"parent": e.parent, "child": e.child, "callCount": e.calls} for e in edges]
