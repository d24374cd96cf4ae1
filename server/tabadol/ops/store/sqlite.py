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

from tabadol.ops.ingest import BROKER_SERVICE, is_broker_sender, parties, sender_of
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
    sender TEXT NOT NULL DEFAULT '',  -- the collector's stamp: whose share the span counts in
    received_ns INTEGER NOT NULL DEFAULT 0,  -- size eviction takes a sender's earliest first
    bytes INTEGER NOT NULL DEFAULT 0,  -- about what the span and its tags take
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
-- Who may see a trace: the agencies the broker's own spans name consumer or provider.
CREATE TABLE IF NOT EXISTS trace_parties (
    agency TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    PRIMARY KEY (agency, trace_id, span_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS trace_parties_by_trace ON trace_parties (trace_id);
-- Each sender's share of the store, kept up to date as spans come and go.
CREATE TABLE IF NOT EXISTS sender_usage (
    sender TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    spans INTEGER NOT NULL
);
"""
_SCHEMA_VERSION = 2  # PRAGMA user_version: 2 keeps senders, receipt per span and parties

_SPAN_COLUMNS = (
    "trace_id, span_id, parent_span_id, service, name, kind, start_ns, end_ns, status_code, "
    "status_message, attributes, events, resource"
)

# While over the size cap, each step evicts at least this much of one sender's spans.
_EVICT_STEP_BYTES = 16 * 1024
# What a span's row and each of its index entries take beyond their text, roughly.
_ROW_OVERHEAD = 96

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
            if self._writer.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                # Freed pages go back to the disk only in incremental mode: a store created
                # without it (WAL mode set first) takes it now, once, with a full VACUUM.
                self._writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
                self._writer.execute("VACUUM")
            self._writer.executescript(_SCHEMA)
            self._last_received = self._migrate(self._writer)

    def _migrate(self, conn: sqlite3.Connection) -> int:
        """Bring a store written by an older version up to date; the latest receipt time."""
        conn.execute("BEGIN")
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(traces)")}
            if "received_ns" not in columns:
                # Receipt order was not kept: take start times, but none later than now, so
                # that future-dated traces already stored still age out.
                conn.execute("ALTER TABLE traces ADD COLUMN received_ns INTEGER NOT NULL DEFAULT 0")
                conn.execute("UPDATE traces SET received_ns = min(start_ns, ?)", (self._clock(),))
            conn.execute("CREATE INDEX IF NOT EXISTS traces_by_received ON traces (received_ns)")
            if conn.execute("PRAGMA user_version").fetchone()[0] < _SCHEMA_VERSION:
                self._index_senders_and_parties(conn)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute(
                "CREATE INDEX IF NOT EXISTS spans_by_sender ON spans (sender, received_ns)"
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        latest = conn.execute("SELECT max(received_ns) FROM traces").fetchone()[0]
        return int(latest or 0)

    @staticmethod
    def _index_senders_and_parties(conn: sqlite3.Connection) -> None:
        """For spans stored before senders and parties were kept: read both off each span."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(spans)")}
        for column in ("sender TEXT NOT NULL DEFAULT ''", "received_ns INTEGER NOT NULL DEFAULT 0",
                       "bytes INTEGER NOT NULL DEFAULT 0"):  # fmt: skip
            if column.split()[0] not in columns:
                conn.execute(f"ALTER TABLE spans ADD COLUMN {column}")
        conn.execute(
            f"""
            UPDATE spans SET
                sender = coalesce(json_extract(resource, '$."tabadol.sender"'), ''),
                received_ns = coalesce(
                    (SELECT received_ns FROM traces t WHERE t.trace_id = spans.trace_id), 0),
                bytes = length(attributes) + length(events) + length(resource) + length(name)
                    + length(service) + length(status_message) + {_ROW_OVERHEAD}
            WHERE bytes = 0
            """
        )
        conn.execute("DELETE FROM trace_parties")
        rows = conn.execute(
            f"SELECT {_SPAN_COLUMNS} FROM spans WHERE service = ?", (BROKER_SERVICE,)
        ).fetchall()
        for row in rows:
            span = _span_from_row(row)
            conn.executemany(
                "INSERT OR IGNORE INTO trace_parties VALUES (?,?,?)",
                [(agency, span.trace_id, span.span_id) for agency in parties(span)],
            )
        conn.execute("DELETE FROM sender_usage")
        conn.execute(
            "INSERT INTO sender_usage SELECT sender, sum(bytes), count(*) FROM spans GROUP BY 1"
        )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # Before WAL mode writes the file's first page: afterwards it takes a VACUUM.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
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
                usage: dict[str, list[int]] = {}
                for span in spans:
                    size = self._add_one(conn, span, received)
                    if size:
                        counts = usage.setdefault(sender_of(span), [0, 0])
                        counts[0] += size
                        counts[1] += 1
                conn.executemany(
                    """
                    INSERT INTO sender_usage VALUES (?, ?, ?) ON CONFLICT (sender) DO UPDATE
                    SET bytes = bytes + excluded.bytes, spans = spans + excluded.spans
                    """,
                    [(sender, size, n) for sender, (size, n) in usage.items()],
                )
                # The broker's spans go only to make room for the broker's own: an agency's
                # batch evicts agencies' spans, or is refused.
                for_broker = any(is_broker_sender(sender_of(span)) for span in spans)
                _, evicted = self._evict_to_fit(conn, before=received, for_broker=for_broker)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._last_received = received
            if evicted:
                self._shrink(conn)

    @staticmethod
    def _shrink(conn: sqlite3.Connection) -> None:
        """Give freed pages back to the disk, and empty the write-ahead log, so that the
        files, not only the pages in use, stay near the size cap."""
        # Run to the end: stepped once through execute(), the pragma frees a single page.
        conn.executescript("PRAGMA incremental_vacuum;")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _evict_to_fit(
        self, conn: sqlite3.Connection, before: int | None, *, for_broker: bool = False
    ) -> tuple[int, int]:
        """Inside the caller's transaction: evict spans received before ``before`` (all, if
        None), a sender at a time (``_eviction_target``), earliest received first, until the
        store is under its size cap; how many traces went whole, and how many spans. StoreFull
        if even that is not enough, or if only the broker's spans are left to make room for
        an agency's batch (``for_broker`` false)."""
        removed = spans = 0
        while (used := _used_bytes(conn)) > self.limits.max_bytes:
            target = _eviction_target(conn, before, for_broker=for_broker)
            if target is None:
                if before is None:
                    break
                whose = "a batch" if for_broker else "an agency's batch"
                raise StoreFull(
                    f"{self.path}: {whose} does not fit under the store's size cap "
                    f"of {self.limits.max_bytes} bytes"
                    + ("" if for_broker else " without evicting the broker's spans")
                )
            # Spans' own sizes undercount the pages they fill (indexes, summaries, slack):
            # free the same share of their sizes as the store is over its cap.
            total = conn.execute("SELECT coalesce(sum(bytes), 0) FROM sender_usage").fetchone()[0]
            over = (used - self.limits.max_bytes) / used
            need = max(int(total * over) + 1, _EVICT_STEP_BYTES)
            cursor = conn.execute(
                "SELECT trace_id, span_id, bytes FROM spans WHERE sender = ? AND received_ns < ?"
                " ORDER BY received_ns",
                (target, _INT64_MAX if before is None else before),
            )
            doomed: list[tuple[str, str]] = []
            freed = 0
            while freed < need and (rows := cursor.fetchmany(256)):
                for trace_id, span_id, size in rows:
                    doomed.append((trace_id, span_id))
                    freed += size
                    if freed >= need:
                        break
            cursor.close()
            removed += _delete_spans(conn, doomed)
            spans += len(doomed)
        return removed, spans

    @staticmethod
    def _add_one(conn: sqlite3.Connection, span: SpanRecord, received_ns: int) -> int:
        """Insert one span, its tags and its parties; the bytes it counts for (0 if it was
        already stored)."""
        attributes = json.dumps(span.attributes, default=str)
        events = json.dumps([[e.time_ns, e.name, e.attributes] for e in span.events], default=str)
        resource = json.dumps(span.resource, default=str)
        tags = [
            (span.trace_id, span.span_id, key, text, span.service)
            for key, value in span.attributes.items()
            if (text := _tag_value(value)) is not None
        ]
        if span.is_error:
            tags.append((span.trace_id, span.span_id, "error", "true", span.service))
        size = (
            len(attributes) + len(events) + len(resource) + len(span.name) + len(span.service)
            + len(span.status_message) + _ROW_OVERHEAD
            + sum(len(key) + len(text) + _ROW_OVERHEAD for _, _, key, text, _ in tags)
        )  # fmt: skip
        cursor = conn.execute(
            f"INSERT OR IGNORE INTO spans ({_SPAN_COLUMNS}, sender, received_ns, bytes)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                attributes,
                events,
                resource,
                sender_of(span),
                received_ns,
                size,
            ),
        )
        if cursor.rowcount == 0:  # the same span sent twice
            return 0
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
        conn.executemany("INSERT INTO span_tags VALUES (?,?,?,?,?)", tags)
        conn.executemany(
            "INSERT OR IGNORE INTO trace_parties VALUES (?,?,?)",
            [(agency, span.trace_id, span.span_id) for agency in parties(span)],
        )
        return size

    # -- queries ------------------------------------------------------------------------

    def services(self, party: str | None = None) -> list[str]:
        if party is None:
            rows = self._reader().execute("SELECT DISTINCT service FROM spans ORDER BY service")
        else:
            rows = self._reader().execute(
                f"SELECT DISTINCT service FROM spans WHERE {_OF_PARTY} ORDER BY service", (party,)
            )
        return [r[0] for r in rows]

    def operations(self, service: str, party: str | None = None) -> list[tuple[str, int]]:
        if party is None:
            rows = self._reader().execute(
                "SELECT DISTINCT name, kind FROM spans WHERE service = ? ORDER BY name", (service,)
            )
        else:
            rows = self._reader().execute(
                f"SELECT DISTINCT name, kind FROM spans WHERE service = ? AND {_OF_PARTY}"
                " ORDER BY name",
                (service, party),
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
            f"SELECT {_SPAN_COLUMNS} FROM spans WHERE trace_id = ? ORDER BY start_ns",
            (trace_id.lower(),),
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

    def usage(self) -> dict[str, int]:
        rows = self._reader().execute("SELECT sender, bytes FROM sender_usage ORDER BY sender")
        return {sender: size for sender, size in rows}

    def enforce_retention(self, now_ns: int) -> int:
        cutoff = max(now_ns - int(self.limits.max_age_seconds * 1e9), -(2**63))
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN")
            try:
                removed = _delete_spans(
                    conn,
                    select="SELECT s.trace_id, s.span_id FROM traces t JOIN spans s"
                    " USING (trace_id) WHERE t.end_ns < ? OR t.received_ns < ?",
                    params=(cutoff, cutoff),
                )
                # Summaries without spans (a store an older version wrote) age out too.
                removed += conn.execute(
                    "DELETE FROM traces WHERE end_ns < ? OR received_ns < ?", (cutoff, cutoff)
                ).rowcount
                gone, evicted = self._evict_to_fit(conn, before=None)
                removed += gone
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if removed or evicted:
                self._shrink(conn)
        return removed


_INT64_MAX = 2**63 - 1
# Spans of the traces an agency is a party to (bound: the agency).
_OF_PARTY = "trace_id IN (SELECT trace_id FROM trace_parties WHERE agency = ?)"


def _used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in use by the database on this connection (its open transaction included)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size: int = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def _eviction_target(
    conn: sqlite3.Connection, before: int | None, *, for_broker: bool
) -> str | None:
    """Whose spans go next while the store is over its cap. The broker's spans index every
    agency's traces: they go only to make room for the broker's own (``for_broker``), and
    then only while no agency (any other sender) holds more than a fair share (the store
    split evenly among its senders); at retention (``before`` None), once no agency's are
    left. Otherwise the agency holding the most. Only senders with spans received before
    ``before`` count; None when no sender may lose any."""
    usage = conn.execute("SELECT sender, bytes FROM sender_usage ORDER BY bytes DESC, sender")
    shares: list[tuple[str, int]] = [(str(sender), int(size)) for sender, size in usage if size > 0]
    if not shares:
        return None
    fair = sum(size for _, size in shares) / len(shares)
    limit = _INT64_MAX if before is None else before

    def evictable(sender: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM spans WHERE sender = ? AND received_ns < ? LIMIT 1", (sender, limit)
        ).fetchone()
        return row is not None

    others = [(s, size) for s, size in shares if not is_broker_sender(s) and evictable(s)]
    if others and (others[0][1] > fair or not for_broker):
        return others[0][0]
    if not for_broker and before is not None:
        return None  # never the broker's evidence for an agency's batch
    brokers = [s for s, _ in shares if is_broker_sender(s) and evictable(s)]
    if brokers:
        return brokers[0]
    return others[0][0] if others else None


def _delete_spans(
    conn: sqlite3.Connection,
    doomed: Sequence[tuple[str, str]] = (),
    *,
    select: str = "",
    params: tuple[Any, ...] = (),
) -> int:
    """Delete these (trace_id, span_id) spans, or those ``select`` names, with their tags,
    parties and share, in the caller's transaction, and bring their traces' summaries up to
    date; how many traces went whole."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS doomed (trace_id TEXT, span_id TEXT,"
        " PRIMARY KEY (trace_id, span_id)) WITHOUT ROWID"
    )
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS touched (trace_id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM doomed")
    conn.execute("DELETE FROM touched")
    conn.executemany("INSERT OR IGNORE INTO doomed VALUES (?, ?)", doomed)
    if select:
        conn.execute(f"INSERT OR IGNORE INTO doomed {select}", params)
    conn.execute("INSERT INTO touched SELECT DISTINCT trace_id FROM doomed")
    freed = conn.execute(
        "SELECT s.sender, sum(s.bytes), count(*) FROM spans s"
        " JOIN doomed d ON d.trace_id = s.trace_id AND d.span_id = s.span_id GROUP BY 1"
    ).fetchall()
    conn.executemany(
        "UPDATE sender_usage SET bytes = bytes - ?, spans = spans - ? WHERE sender = ?",
        [(size, n, sender) for sender, size, n in freed],
    )
    conn.execute("DELETE FROM sender_usage WHERE spans <= 0")
    in_doomed = (
        "trace_id IN (SELECT trace_id FROM touched) AND EXISTS (SELECT 1 FROM doomed d"
        " WHERE d.trace_id = {0}.trace_id AND d.span_id = {0}.span_id)"
    )
    for table in ("span_tags", "trace_parties", "spans"):
        conn.execute(f"DELETE FROM {table} WHERE {in_doomed.format(table)}")
    gone: int = conn.execute(
        "DELETE FROM traces WHERE trace_id IN (SELECT trace_id FROM touched)"
        " AND NOT EXISTS (SELECT 1 FROM spans s WHERE s.trace_id = traces.trace_id)"
    ).rowcount
    # What is left of a trace some of whose spans went: its summary from those spans.
    conn.execute(
        """
        UPDATE traces SET
            start_ns = (SELECT min(start_ns) FROM spans s WHERE s.trace_id = traces.trace_id),
            end_ns = (SELECT max(end_ns) FROM spans s WHERE s.trace_id = traces.trace_id),
            span_count = (SELECT count(*) FROM spans s WHERE s.trace_id = traces.trace_id),
            error_count = (SELECT count(*) FROM spans s
                WHERE s.trace_id = traces.trace_id AND s.status_code = ?),
            has_root = EXISTS (SELECT 1 FROM spans s
                WHERE s.trace_id = traces.trace_id AND s.parent_span_id = ''),
            root_service = (SELECT service FROM spans s WHERE s.trace_id = traces.trace_id
                ORDER BY s.parent_span_id != '', s.start_ns LIMIT 1),
            root_name = (SELECT name FROM spans s WHERE s.trace_id = traces.trace_id
                ORDER BY s.parent_span_id != '', s.start_ns LIMIT 1)
        WHERE trace_id IN (SELECT trace_id FROM touched)
        """,
        (STATUS_ERROR,),
    )
    return gone


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
