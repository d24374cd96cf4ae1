"""Spans in one SQLite file (WAL mode): the trace viewer's embedded store."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabadol.ops.model import (
    STATUS_ERROR,
    Edge,
    SpanEvent,
    SpanRecord,
    TraceQuery,
    TraceSummary,
)
from tabadol.ops.query import GRPC_CODES
from tabadol.ops.store.base import StoreLimits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_span_id TEXT NOT NULL,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    status_code INTEGER NOT NULL,
    status_message TEXT NOT NULL,
    attributes TEXT NOT NULL,
    events TEXT NOT NULL,
    resource TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spans_by_service ON spans (service, name);
CREATE INDEX IF NOT EXISTS spans_by_start ON spans (start_ns);
CREATE TABLE IF NOT EXISTS traces (
    trace_id TEXT PRIMARY KEY,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    span_count INTEGER NOT NULL,
    error_count INTEGER NOT NULL,
    root_service TEXT NOT NULL,
    root_name TEXT NOT NULL,
    has_root INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS traces_by_start ON traces (start_ns);
CREATE TABLE IF NOT EXISTS span_tags (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    service TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS span_tags_by_value ON span_tags (key, value);
CREATE INDEX IF NOT EXISTS span_tags_by_trace ON span_tags (trace_id);
"""

# Only short scalar attributes are searchable; the rest is still stored and shown.
_MAX_TAG_VALUE = 256


def _tag_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        text = str(value)
        return text if len(text) <= _MAX_TAG_VALUE else None
    return None


class SqliteSpanStore:
    """A SpanStore in one SQLite database file; safe to use from several threads."""

    def __init__(self, path: Path | str, limits: StoreLimits | None = None) -> None:
        self.path = str(path)
        self.limits = limits or StoreLimits()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []  # one per reading thread, closed with us
        self._writer = self._connect()
        with self._write_lock:
            self._writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._writer.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self.path == ":memory:":
            return self._writer
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._write_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._write_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._writer.close()

    # -- ingest -------------------------------------------------------------------------

    def add(self, spans: Sequence[SpanRecord]) -> None:
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN")
            try:
                for span in spans:
                    self._add_one(conn, span)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _add_one(conn: sqlite3.Connection, span: SpanRecord) -> None:
        cursor = conn.execute(
            "INSERT OR IGNORE INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                span.trace_id,
                span.span_id,
                span.parent_span_id,
                span.service,
                span.name,
                span.kind,
                span.start_ns,
                span.end_ns,
                span.status_code,
                span.status_message,
                json.dumps(span.attributes, default=str),
                json.dumps([[e.time_ns, e.name, e.attributes] for e in span.events], default=str),
                json.dumps(span.resource, default=str),
            ),
        )
        if cursor.rowcount == 0:  # the same span sent twice
            return
        is_root = int(not span.parent_span_id)
        conn.execute(
            """
            INSERT INTO traces VALUES (?,?,?,1,?,?,?,?)
            ON CONFLICT (trace_id) DO UPDATE SET
                start_ns = min(start_ns, excluded.start_ns),
                end_ns = max(end_ns, excluded.end_ns),
                span_count = span_count + 1,
                error_count = error_count + excluded.error_count,
                root_service = CASE WHEN excluded.has_root OR (NOT has_root
                    AND excluded.start_ns < start_ns) THEN excluded.root_service
                    ELSE root_service END,
                root_name = CASE WHEN excluded.has_root OR (NOT has_root
                    AND excluded.start_ns < start_ns) THEN excluded.root_name
                    ELSE root_name END,
                has_root = max(has_root, excluded.has_root)
            """,
            (
                span.trace_id,
                span.start_ns,
                span.end_ns,
                int(span.is_error),
                span.service,
                span.name,
                is_root,
            ),
        )
        tags = [
            (span.trace_id, span.span_id, key, text, span.service)
            for key, value in span.attributes.items()
            if (text := _tag_value(value)) is not None
        ]
        if span.is_error:
            tags.append((span.trace_id, span.span_id, "error", "true", span.service))
        conn.executemany("INSERT INTO span_tags VALUES (?,?,?,?,?)", tags)

    # -- queries ------------------------------------------------------------------------

    def services(self) -> list[str]:
        rows = self._reader().execute("SELECT DISTINCT service FROM spans ORDER BY service")
        return [r[0] for r in rows]

    def operations(self, service: str) -> list[tuple[str, int]]:
        rows = self._reader().execute(
            "SELECT DISTINCT name, kind FROM spans WHERE service = ? ORDER BY name", (service,)
        )
        return [(r[0], r[1]) for r in rows]

    def search(self, query: TraceQuery) -> tuple[list[TraceSummary], int]:
        where, params = _conditions(query)
        conn = self._reader()
        total = conn.execute(f"SELECT count(*) FROM traces t WHERE {where}", params).fetchone()[0]
        rows = conn.execute(
            f"SELECT trace_id, start_ns, end_ns, span_count, error_count, root_service, "
            f"root_name FROM traces t WHERE {where} ORDER BY start_ns DESC LIMIT ? OFFSET ?",
            [*params, query.limit, query.offset],
        ).fetchall()
        summaries = []
        for row in rows:
            services = tuple(
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT service FROM spans WHERE trace_id = ? ORDER BY service",
                    (row[0],),
                )
            )
            trace_id, start, end, spans, errors, root_service, root_name = row
            summaries.append(
                TraceSummary(trace_id, start, end, spans, errors, root_service, root_name, services)
            )
        return summaries, total

    def trace(self, trace_id: str) -> list[SpanRecord]:
        rows = self._reader().execute(
            "SELECT * FROM spans WHERE trace_id = ? ORDER BY start_ns", (trace_id.lower(),)
        )
        return [_span_from_row(r) for r in rows]

    def dependencies(self, start_ns: int, end_ns: int) -> list[Edge]:
        rows = self._reader().execute(
            """
            SELECT p.service, c.service, count(*), sum(c.status_code = ?)
            FROM spans c JOIN spans p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id
            WHERE c.start_ns BETWEEN ? AND ? AND p.service != c.service
            GROUP BY 1, 2 ORDER BY 1, 2
            """,
            (STATUS_ERROR, start_ns, end_ns),
        )
        return [Edge(*r) for r in rows]

    def agency_calls(self, start_ns: int, end_ns: int) -> list[Edge]:
        rows = self._reader().execute(
            """
            SELECT c.value, p.value, count(*), sum(s.status_code = ?)
            FROM spans s
            JOIN span_tags c ON c.trace_id = s.trace_id AND c.span_id = s.span_id
                AND c.key = 'tabadol.consumer'
            JOIN span_tags p ON p.trace_id = s.trace_id AND p.span_id = s.span_id
                AND p.key = 'tabadol.provider'
            WHERE s.kind = 2 AND s.start_ns BETWEEN ? AND ?
            GROUP BY 1, 2 ORDER BY 1, 2
            """,
            (STATUS_ERROR, start_ns, end_ns),
        )
        return [Edge(*r) for r in rows]

    # -- retention ----------------------------------------------------------------------

    def used_bytes(self) -> int:
        conn = self._reader()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size: int = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def enforce_retention(self, now_ns: int) -> int:
        cutoff = now_ns - int(self.limits.max_age_seconds * 1e9)
        removed = self._delete("SELECT trace_id FROM traces WHERE end_ns < ?", (cutoff,))
        while self.used_bytes() > self.limits.max_bytes:
            count = self._reader().execute("SELECT count(*) FROM traces").fetchone()[0]
            if count == 0:
                break
            batch = max(1, count // 20)  # the oldest 5% at a time
            removed += self._delete(
                "SELECT trace_id FROM traces ORDER BY start_ns LIMIT ?", (batch,)
            )
        if removed:
            with self._write_lock:
                self._writer.execute("PRAGMA incremental_vacuum")
        return removed

    def _delete(self, select: str, params: tuple[Any, ...]) -> int:
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN")
            try:
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (trace_id TEXT PRIMARY KEY)")
                conn.execute("DELETE FROM doomed")
                conn.execute(f"INSERT INTO doomed {select}", params)
                n: int = conn.execute("SELECT count(*) FROM doomed").fetchone()[0]
                for table in ("span_tags", "spans", "traces"):
                    conn.execute(
                        f"DELETE FROM {table} WHERE trace_id IN (SELECT trace_id FROM doomed)"
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return n


def _conditions(query: TraceQuery) -> tuple[str, list[Any]]:
    """The WHERE clause over ``traces t`` for a query; values are bound, never spliced."""
    where = ["1"]
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
    return " AND ".join(where), params


def _span_from_row(row: tuple[Any, ...]) -> SpanRecord:
    (
        trace_id,
        span_id,
        parent,
        service,
        name,
        kind,
        start,
        end,
        code,
        message,
        attrs,
        events,
        res,
    ) = row
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
