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
from tabadol.ops.model import STATUS_ERROR, Edge, SpanRecord, TraceQuery, TraceSummary
from tabadol.ops.store.base import StoreLimits
from tabadol.ops.store.encoding import ROW_OVERHEAD, SPAN_COLUMNS, decode_span, encode_span
from tabadol.ops.store.eviction import eviction_need, eviction_target, store_full
from tabadol.ops.store.sql import of_party, search_conditions

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
                    + length(service) + length(status_message) + {ROW_OVERHEAD}
            WHERE bytes = 0
            """
        )
        conn.execute("DELETE FROM trace_parties")
        rows = conn.execute(
            f"SELECT {SPAN_COLUMNS} FROM spans WHERE service = ?", (BROKER_SERVICE,)
        ).fetchall()
        for row in rows:
            span = decode_span(row)
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
        None), a sender at a time (``eviction_target``), earliest received first, until the
        store is under its size cap; how many traces went whole, and how many spans. StoreFull
        if even that is not enough, or if only the broker's spans are left to make room for
        an agency's batch (``for_broker`` false)."""
        removed = spans = 0
        limit = _INT64_MAX if before is None else before

        def evictable(sender: str) -> bool:
            row = conn.execute(
                "SELECT 1 FROM spans WHERE sender = ? AND received_ns < ? LIMIT 1", (sender, limit)
            ).fetchone()
            return row is not None

        while (used := _used_bytes(conn)) > self.limits.max_bytes:
            usage = conn.execute("SELECT sender, bytes FROM sender_usage").fetchall()
            target = eviction_target(
                usage, evictable, for_broker=for_broker, at_retention=before is None
            )
            if target is None:
                if before is None:
                    break
                raise store_full(self.path, self.limits.max_bytes, for_broker=for_broker)
            # Spans' own sizes undercount the pages they fill (indexes, summaries, slack):
            # free the same share of their sizes as the store is over its cap.
            total = sum(size for _, size in usage)
            need = eviction_need(used, self.limits.max_bytes, total)
            cursor = conn.execute(
                "SELECT trace_id, span_id, bytes FROM spans WHERE sender = ? AND received_ns < ?"
                " ORDER BY received_ns",
                (target, limit),
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
        encoded = encode_span(span)
        cursor = conn.execute(
            f"INSERT OR IGNORE INTO spans ({SPAN_COLUMNS}, sender, received_ns, bytes)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (*encoded.columns(), encoded.sender, received_ns, encoded.size),
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
        conn.executemany(
            "INSERT INTO span_tags VALUES (?,?,?,?,?)",
            [(span.trace_id, span.span_id, key, text, span.service) for key, text in encoded.tags],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO trace_parties VALUES (?,?,?)",
            [(agency, span.trace_id, span.span_id) for agency in encoded.parties],
        )
        return encoded.size

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
        where, params = search_conditions(query, "?")
        conn = self._reader()
        total = conn.execute(f"SELECT count(*) FROM traces t WHERE {where}", params).fetchone()[0]
        rows = conn.execute(
            f"SELECT trace_id, start_ns, end_ns, span_count, error_count, root_service, "
            f"root_name FROM traces t WHERE {where} ORDER BY start_ns DESC LIMIT ? OFFSET ?",
            [*params, query.limit, query.offset],
        ).fetchall()
        services: dict[str, list[str]] = {}
        for trace_id, service in conn.execute(  # one query for the page, not one per trace
            "SELECT DISTINCT trace_id, service FROM spans WHERE trace_id IN "
            "(SELECT value FROM json_each(?)) ORDER BY 1, 2",
            (json.dumps([row[0] for row in rows]),),
        ):
            services.setdefault(trace_id, []).append(service)
        summaries = [
            TraceSummary(trace_id, start, end, spans, errors, root_service, root_name,
                         tuple(services.get(trace_id, ())))
            for trace_id, start, end, spans, errors, root_service, root_name in rows
        ]  # fmt: skip
        return summaries, total

    def trace(self, trace_id: str) -> list[SpanRecord]:
        rows = self._reader().execute(
            f"SELECT {SPAN_COLUMNS} FROM spans WHERE trace_id = ? ORDER BY start_ns",
            (trace_id.lower(),),
        )
        return [decode_span(r) for r in rows]

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
_OF_PARTY = of_party("?")


def _used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in use by the database on this connection (its open transaction included)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size: int = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


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
