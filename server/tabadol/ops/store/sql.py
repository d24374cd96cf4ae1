"""SQL that both SQL stores (sqlite.py, postgres.py) run over the same tables: ``traces``,
``spans``, ``span_tags`` and ``trace_parties``."""

from __future__ import annotations

from typing import Any

from tabadol.ops.model import TraceQuery
from tabadol.ops.query import GRPC_CODES


def of_party(mark: str) -> str:
    """Spans of the traces an agency is a party to (bound where ``mark`` stands: the agency)."""
    return f"trace_id IN (SELECT trace_id FROM trace_parties WHERE agency = {mark})"


def search_conditions(query: TraceQuery, mark: str) -> tuple[str, list[Any]]:
    """The WHERE clause over ``traces t`` for a search, and its values: bound, never
    spliced, each where ``mark`` (the driver's placeholder) stands."""
    where = ["1 = 1"]
    params: list[Any] = []
    if query.start_ns is not None:
        where.append("t.start_ns >= ?")
        params.append(query.start_ns)
    if query.end_ns is not None:
        where.append("t.start_ns <= ?")
        params.append(query.end_ns)
    if query.min_duration_ns is not None:
        where.append("t.end_ns - t.start_ns >= ?")
        params.append(query.min_duration_ns)
    if query.max_duration_ns is not None:
        where.append("t.end_ns - t.start_ns <= ?")
        params.append(query.max_duration_ns)
    if query.service or query.operation:
        span_where = ["s.trace_id = t.trace_id"]
        if query.service:
            span_where.append("s.service = ?")
            params.append(query.service)
        if query.operation:
            span_where.append("s.name = ?")
            params.append(query.operation)
        where.append(f"EXISTS (SELECT 1 FROM spans s WHERE {' AND '.join(span_where)})")
    for key, value in query.tags:
        # A bare key also matches the platform's own attribute: consumer=post finds
        # tabadol.consumer=post.
        where.append(
            "EXISTS (SELECT 1 FROM span_tags g WHERE g.trace_id = t.trace_id "
            "AND g.key IN (?, ?) AND g.value = ?)"
        )
        params += [key, f"tabadol.{key}", value]
    if query.party is not None:
        where.append("t.trace_id IN (SELECT trace_id FROM trace_parties WHERE agency = ?)")
        params.append(query.party)
    if query.status == "error":
        where.append("t.error_count > 0")
    elif query.status == "ok":
        where.append("t.error_count = 0")
    elif query.status:
        where.append(
            "EXISTS (SELECT 1 FROM span_tags g WHERE g.trace_id = t.trace_id "
            "AND g.key = 'rpc.grpc.status_code' AND g.value = ?)"
        )
        params.append(str(GRPC_CODES[query.status]))
    return " AND ".join(where).replace("?", mark), params
