"""Spans in one SQLite file (WAL mode): the trace viewer's embedded store."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
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
from tabadol.ops.store.base import StoreFull, StoreLimits

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
    has_root INTEGER NOT NULL,
    received_ns INTEGER NOT NULL DEFAULT 0  -- first received; retention evicts by this
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

# Evict at most this share of the traces per step while over the size cap.
_EVICT_SHARE = 20

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

    def __init__(
        self,
        path: Path | str,
        limits: StoreLimits | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.path = str(path)
        self.limits = limits or StoreLimits()
        self._clock = clock
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # Spans name agencies and people: 0600, before SQLite creates the file (its -wal
            # and -shm files take the database file's mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []  # one per reading thread, closed with us
        self._writer = self._connect()
        with self._write_lock:
            # The write-ahead log counts against the disk too: checkpoint it often enough,
            # and truncate it after, that the files stay near the size cap (not only the
            # pages in use).
            wal_bytes = max(400 * 1024, min(self.limits.max_bytes // 4, 4 * 1024**2))
            self._writer.execute(f"PRAGMA journal_size_limit = {wal_bytes}")
            self._writer.execute(f"PRAGMA wal_autocheckpoint = {wal_bytes // 4096}")
            self._writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._writer.executescript(_SCHEMA)
            self._last_received = self._migrate(self._writer)

    def _migrate(self, conn: sqlite3.Connection) -> int:
        """Bring a store written by an older version up to date; the latest receipt time."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(traces)")}
        if "received_ns" not in columns:
            # Receipt order was not kept: take start times, but none later than now, so
            # that future-dated traces already stored still age out.
            conn.execute("ALTER TABLE traces ADD COLUMN received_ns INTEGER NOT NULL DEFAULT 0")
            conn.execute("UPDATE traces SET received_ns = min(start_ns, ?)", (self._clock(),))
        conn.execute("CREATE INDEX IF NOT EXISTS traces_by_received ON traces (received_ns)")
        latest = conn.execute("SELECT max(received_ns) FROM traces").fetchone()[0]
        return int(latest or 0)

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
        if not spans:
            return
        with self._write_lock:
            conn = self._writer
            # Strictly increasing, so that eviction by receipt has no ties between batches.
            received = max(self._clock(), self._last_received + 1)
            conn.execute("BEGIN")
            try:
                for span in spans:
                    self._add_one(conn, span, received)
                evicted = self._evict_to_fit(conn, {s.trace_id for s in spans})
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._last_received = received
            if evicted:
                conn.execute("PRAGMA incremental_vacuum").fetchall()

    def _evict_to_fit(self, conn: sqlite3.Connection, batch: set[str]) -> int:
        """Inside the adding transaction: delete the earliest-received other traces until
        the store is under its size cap; StoreFull if even that is not enough."""
        evicted = 0
        while _used_bytes(conn) > self.limits.max_bytes:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS batch (trace_id TEXT PRIMARY KEY)")
            if evicted == 0:
                conn.execute("DELETE FROM batch")
                conn.executemany("INSERT INTO batch VALUES (?)", [(t,) for t in batch])
            count = conn.execute(
                "SELECT count(*) FROM traces WHERE trace_id NOT IN (SELECT trace_id FROM batch)"
            ).fetchone()[0]
            if count == 0:
                raise StoreFull(
                    f"{self.path}: {len(batch)} traces do not fit under the store's size cap "
                    f"of {self.limits.max_bytes} bytes"
                )
            evicted += _delete_traces(
                conn,
                "SELECT trace_id FROM traces WHERE trace_id NOT IN (SELECT trace_id FROM batch)"
                " ORDER BY received_ns, rowid LIMIT ?",
                (max(1, count // _EVICT_SHARE),),
            )
        return evicted

    @staticmethod
    def _add_one(conn: sqlite3.Connection, span: SpanRecord, received_ns: int) -> None:
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
            INSERT INTO traces VALUES (?,?,?,1,?,?,?,?,?)
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
                received_ns,
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
        # Only spans the collector stamped as the broker's: an agency can write any
        # attribute it likes, and must not draw edges or error rates between others.
        rows = self._reader().execute(
            """
            SELECT c.value, p.value, count(*), sum(s.status_code = ?)
            FROM spans s
            JOIN span_tags c ON c.trace_id = s.trace_id AND c.span_id = s.span_id
                AND c.key = 'tabadol.consumer'
            JOIN span_tags p ON p.trace_id = s.trace_id AND p.span_id = s.span_id
                AND p.key = 'tabadol.provider'
            WHERE s.kind = 2 AND s.start_ns BETWEEN ? AND ?
                AND json_extract(s.resource, '$."tabadol.sender"') LIKE 'spiffe://%/broker'
                AND json_extract(s.resource, '$."tabadol.sender"') NOT LIKE 'spiffe://%/%/%'
            GROUP BY 1, 2 ORDER BY 1, 2
            """,
            (STATUS_ERROR, start_ns, end_ns),
        )
        return [Edge(*r) for r in rows]

    # -- retention ----------------------------------------------------------------------

    def used_bytes(self) -> int:
        return _used_bytes(self._reader())

    def enforce_retention(self, now_ns: int) -> int:
        cutoff = max(now_ns - int(self.limits.max_age_seconds * 1e9), -(2**63))
        removed = self._delete(
            "SELECT trace_id FROM traces WHERE end_ns < ? OR received_ns < ?", (cutoff, cutoff)
        )
        while self.used_bytes() > self.limits.max_bytes:
            count = self._reader().execute("SELECT count(*) FROM traces").fetchone()[0]
            if count == 0:
                break
            # The earliest received first: a sender's timestamps cannot keep its traces in.
            removed += self._delete(
                "SELECT trace_id FROM traces ORDER BY received_ns, rowid LIMIT ?",
                (max(1, count // _EVICT_SHARE),),
            )
        if removed:
            with self._write_lock:
                self._writer.execute("PRAGMA incremental_vacuum").fetchall()
        return removed

    def _delete(self, select: str, params: tuple[Any, ...]) -> int:
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN")
            try:
                n = _delete_traces(conn, select, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return n


def _used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in use by the database on this connection (its open transaction included)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size: int = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def _delete_traces(conn: sqlite3.Connection, select: str, params: tuple[Any, ...]) -> int:
    """Delete the traces ``select`` names, in the caller's transaction; how many."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (trace_id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM doomed")
    conn.execute(f"INSERT INTO doomed {select}", params)
    n: int = conn.execute("SELECT count(*) FROM doomed").fetchone()[0]
    for table in ("span_tags", "spans", "traces"):
        conn.execute(f"DELETE FROM {table} WHERE trace_id IN (SELECT trace_id FROM doomed)")
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
