"""Spans in PostgreSQL (psycopg 3 and its pool): several ops consoles on one database serve
the same traces. Tables live in their own schema, ``tabadol_spans``, created at the first
open (under an advisory lock, so that consoles starting together do not race).

Retention and eviction delete in batches, by primary key, at most ``batch_spans`` spans per
transaction; not by dropping time partitions. Age retention is per trace (its end or its
first receipt), and size eviction per sender, earliest received first, never the broker's
spans for an agency's batch: neither lines up with partitions of time, and dropping one
would take every sender's spans of that time at once. Every write (an ``add``, each
retention batch) holds one advisory lock, as SQLite's single writer does, so that the size
cap and each sender's share hold across consoles; an age batch picks and locks its rows
before it takes that lock and holds it for one batch only, so an export waits for at most
one batch. The size cap counts the bytes the stores count (encoding.py), not PostgreSQL's
pages: those shrink only as autovacuum reuses them.

Errors reaching the database raise StoreUnavailable naming it (user, host, port, database,
never the password): the collector answers UNAVAILABLE and exporters retry; the console
answers 503; retention tries again at its next run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from tabadol.database import Database
from tabadol.errors import TabadolError
from tabadol.ops.ingest import is_broker_sender, sender_of
from tabadol.ops.model import STATUS_ERROR, Edge, SpanRecord, TraceQuery, TraceSummary
from tabadol.ops.store.base import StoreLimits, StoreUnavailable
from tabadol.ops.store.encoding import SPAN_COLUMNS, EncodedSpan, decode_span, encode_span
from tabadol.ops.store.eviction import eviction_need, eviction_target, store_full
from tabadol.ops.store.sql import of_party, search_conditions

SCHEMA = "tabadol_spans"
# pg_advisory_xact_lock keys: creating the schema; every write to it.
_SCHEMA_LOCK = 0x7461_6264_0001
_WRITE_LOCK = 0x7461_6264_0002
DEFAULT_BATCH_SPANS = 1000
DEFAULT_TIMEOUT_SECONDS = 5.0
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)
_SERVER = 2  # OTLP span kind

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
SET LOCAL search_path TO {SCHEMA};
CREATE TABLE IF NOT EXISTS spans (
    trace_id text COLLATE "C" NOT NULL,
    span_id text COLLATE "C" NOT NULL,
    parent_span_id text COLLATE "C" NOT NULL,
    service text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    kind integer NOT NULL,
    start_ns bigint NOT NULL,
    end_ns bigint NOT NULL,
    status_code integer NOT NULL,
    status_message text NOT NULL,
    attributes text NOT NULL,
    events text NOT NULL,
    resource text NOT NULL,
    sender text COLLATE "C" NOT NULL,  -- the collector's stamp: whose share it counts in
    received_ns bigint NOT NULL,  -- size eviction takes a sender's earliest first
    bytes integer NOT NULL,  -- about what the span and its tags take
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_by_service ON spans (service, name);
CREATE INDEX IF NOT EXISTS spans_by_start ON spans (start_ns);
CREATE INDEX IF NOT EXISTS spans_by_sender ON spans (sender, received_ns);
CREATE TABLE IF NOT EXISTS traces (
    trace_id text COLLATE "C" PRIMARY KEY,
    start_ns bigint NOT NULL,
    end_ns bigint NOT NULL,
    span_count integer NOT NULL,
    error_count integer NOT NULL,
    root_service text COLLATE "C" NOT NULL,
    root_name text COLLATE "C" NOT NULL,
    has_root boolean NOT NULL,
    received_ns bigint NOT NULL  -- first received; age retention counts from it
);
CREATE INDEX IF NOT EXISTS traces_by_start ON traces (start_ns);
CREATE INDEX IF NOT EXISTS traces_by_received ON traces (received_ns);
CREATE TABLE IF NOT EXISTS span_tags (
    trace_id text COLLATE "C" NOT NULL,
    span_id text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    value text COLLATE "C" NOT NULL,
    service text COLLATE "C" NOT NULL
);
CREATE INDEX IF NOT EXISTS span_tags_by_value ON span_tags (key, value);
CREATE INDEX IF NOT EXISTS span_tags_by_span ON span_tags (trace_id, span_id);
-- Who may see a trace: the agencies the broker's own spans name consumer or provider.
CREATE TABLE IF NOT EXISTS trace_parties (
    agency text COLLATE "C" NOT NULL,
    trace_id text COLLATE "C" NOT NULL,
    span_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (agency, trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS trace_parties_by_span ON trace_parties (trace_id, span_id);
-- Each sender's share of the store, kept up to date as spans come and go.
CREATE TABLE IF NOT EXISTS sender_usage (
    sender text COLLATE "C" PRIMARY KEY,
    bytes bigint NOT NULL,
    spans bigint NOT NULL
);
-- The latest receipt time given out: strictly increasing across every console.
CREATE TABLE IF NOT EXISTS receipt_clock (
    id integer PRIMARY KEY CHECK (id = 1),
    last_received bigint NOT NULL
);
INSERT INTO receipt_clock VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
"""

Connection = psycopg.Connection[tuple[Any, ...]]


class PostgresSpanStore:
    """A SpanStore in a PostgreSQL database; safe to use from several threads, and from
    several processes on one database."""

    def __init__(
        self,
        url: str,
        limits: StoreLimits | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
        batch_spans: int = DEFAULT_BATCH_SPANS,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_connections: int = 8,
    ) -> None:
        self._database = Database(url)
        self.where = self._database.where
        self.limits = limits or StoreLimits()
        self.batch_spans = batch_spans
        self._clock = clock
        self._timeout = timeout_seconds
        try:
            conninfo_to_dict(url)
        except psycopg.Error as e:
            reason = self._database.scrub(str(e))
            raise TabadolError(f"{self.where}: not a PostgreSQL URL: {reason}") from e
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            url,
            kwargs={"connect_timeout": max(1, int(timeout_seconds))},
            min_size=1,
            max_size=max_connections,
            open=False,
            configure=self._configure,
            check=ConnectionPool.check_connection,
            name="tabadol-spans",
            timeout=timeout_seconds,
        )
        try:
            self._pool.open(wait=True, timeout=timeout_seconds)
        except PoolTimeout as e:
            self._pool.close()
            raise self._unavailable(e) from e
        try:
            self._create_schema()
        except BaseException:
            self._pool.close()
            raise

    @staticmethod
    def _configure(conn: Connection) -> None:
        conn.execute(f"SET search_path TO {SCHEMA}")
        conn.commit()

    def _create_schema(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(_DDL)

    def _unavailable(self, error: Exception) -> StoreUnavailable:
        if isinstance(error, PoolTimeout):
            reason = f"no connection within {self._timeout:g} s (is the server up and reachable?)"
        elif isinstance(error, PoolClosed):
            reason = "the store is closed"
        else:
            lines = str(error).strip().splitlines()
            reason = lines[0] if lines else type(error).__name__
        return StoreUnavailable(f"span store {self.where}: {self._database.scrub(reason)}")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A pooled connection in one transaction: committed at the end, rolled back on an
        error; a database that cannot be reached raises StoreUnavailable."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, PoolClosed) as e:
            raise self._unavailable(e) from e

    def close(self) -> None:
        self._pool.close()

    # -- ingest -------------------------------------------------------------------------

    def add(self, spans: Sequence[SpanRecord]) -> None:
        if not spans:
            return
        batch: dict[tuple[str, str], EncodedSpan] = {}
        for span in spans:
            batch.setdefault((span.trace_id, span.span_id), encode_span(span))
        for_broker = any(is_broker_sender(sender_of(span)) for span in spans)
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            row = conn.execute(
                "UPDATE receipt_clock SET last_received = greatest(last_received + 1, %s)"
                " RETURNING last_received",
                (self._clock(),),
            ).fetchone()
            assert row is not None
            received = int(row[0])
            trace_ids, span_ids = zip(*batch, strict=True)
            stored = set(
                conn.execute(
                    "SELECT s.trace_id, s.span_id FROM spans s"
                    " JOIN unnest(%s::text[], %s::text[]) AS b (trace_id, span_id)"
                    " ON b.trace_id = s.trace_id AND b.span_id = s.span_id",
                    (list(trace_ids), list(span_ids)),
                ).fetchall()
            )
            new = [e for key, e in batch.items() if key not in stored]  # not sent before
            self._insert(conn, new, received)
            self._evict_to_fit(conn, before=received, for_broker=for_broker)

    @staticmethod
    def _insert(conn: Connection, new: Sequence[EncodedSpan], received_ns: int) -> None:
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO spans ({SPAN_COLUMNS}, sender, received_ns, bytes)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT DO NOTHING",
                [(*e.columns(), e.sender, received_ns, e.size) for e in new],
            )
            cur.executemany(
                """
                INSERT INTO traces AS t VALUES (%s,%s,%s,1,%s,%s,%s,%s,%s)
                ON CONFLICT (trace_id) DO UPDATE SET
                    start_ns = least(t.start_ns, excluded.start_ns),
                    end_ns = greatest(t.end_ns, excluded.end_ns),
                    span_count = t.span_count + 1,
                    error_count = t.error_count + excluded.error_count,
                    root_service = CASE WHEN excluded.has_root OR (NOT t.has_root
                        AND excluded.start_ns < t.start_ns) THEN excluded.root_service
                        ELSE t.root_service END,
                    root_name = CASE WHEN excluded.has_root OR (NOT t.has_root
                        AND excluded.start_ns < t.start_ns) THEN excluded.root_name
                        ELSE t.root_name END,
                    has_root = t.has_root OR excluded.has_root
                """,
                [
                    (
                        s.trace_id,
                        s.start_ns,
                        s.end_ns,
                        int(s.is_error),
                        s.service,
                        s.name,
                        not s.parent_span_id,
                        received_ns,
                    )
                    for s in (e.span for e in new)
                ],
            )
            cur.executemany(
                "INSERT INTO span_tags VALUES (%s,%s,%s,%s,%s)",
                [
                    (e.span.trace_id, e.span.span_id, key, text, e.span.service)
                    for e in new
                    for key, text in e.tags
                ],
            )
            cur.executemany(
                "INSERT INTO trace_parties VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
                [(agency, e.span.trace_id, e.span.span_id) for e in new for agency in e.parties],
            )
            usage: dict[str, list[int]] = {}
            for e in new:
                counts = usage.setdefault(e.sender, [0, 0])
                counts[0] += e.size
                counts[1] += 1
            cur.executemany(
                """
                INSERT INTO sender_usage AS u VALUES (%s, %s, %s) ON CONFLICT (sender) DO UPDATE
                SET bytes = u.bytes + excluded.bytes, spans = u.spans + excluded.spans
                """,
                [(sender, size, n) for sender, (size, n) in sorted(usage.items())],
            )

    def _evict_to_fit(self, conn: Connection, before: int, *, for_broker: bool) -> None:
        """Inside an add's transaction: evict spans received before ``before``, a sender at
        a time (eviction.py), earliest received first, until the store is under its size
        cap. StoreFull if that is not enough, or if only the broker's spans could make room
        for an agency's batch (``for_broker`` false)."""
        cap = self.limits.max_bytes
        exhausted: set[str] = set()  # what is left of them, a retention batch is deleting

        def evictable(sender: str) -> bool:
            return sender not in exhausted and _has_spans_before(conn, sender, before)

        while (used := _used_bytes(conn)) > cap:
            usage = conn.execute("SELECT sender, bytes FROM sender_usage").fetchall()
            target = eviction_target(usage, evictable, for_broker=for_broker, at_retention=False)
            if target is None:
                raise store_full(self.where, cap, for_broker=for_broker)
            doomed = self._earliest(conn, target, before, eviction_need(used, cap, used))
            if not doomed:
                exhausted.add(target)
            _delete_spans(conn, doomed)

    def _earliest(
        self, conn: Connection, sender: str, before: int, need: int
    ) -> list[tuple[str, str]]:
        """A sender's earliest received spans, received before ``before``, up to ``need``
        bytes and at most a batch; locked, skipping any a retention batch holds."""
        rows = conn.execute(
            "SELECT trace_id, span_id, bytes FROM spans WHERE sender = %s AND received_ns < %s"
            " ORDER BY received_ns LIMIT %s FOR UPDATE SKIP LOCKED",
            (sender, before, self.batch_spans),
        ).fetchall()
        doomed: list[tuple[str, str]] = []
        freed = 0
        for trace_id, span_id, size in rows:
            if freed >= need:
                break
            doomed.append((trace_id, span_id))
            freed += size
        return doomed

    # -- queries ------------------------------------------------------------------------

    def _rows(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as conn:
            return conn.execute(query, params).fetchall()

    def services(self, party: str | None = None) -> list[str]:
        if party is None:
            rows = self._rows("SELECT DISTINCT service FROM spans ORDER BY service")
        else:
            rows = self._rows(
                f"SELECT DISTINCT service FROM spans WHERE {of_party('%s')} ORDER BY service",
                (party,),
            )
        return [r[0] for r in rows]

    def operations(self, service: str, party: str | None = None) -> list[tuple[str, int]]:
        where, params = "service = %s", [service]
        if party is not None:
            where, params = f"{where} AND {of_party('%s')}", [service, party]
        rows = self._rows(
            f"SELECT DISTINCT name, kind FROM spans WHERE {where} ORDER BY name, kind", params
        )
        return [(r[0], r[1]) for r in rows]

    def search(self, query: TraceQuery) -> tuple[list[TraceSummary], int]:
        where, params = search_conditions(query, "%s")
        with self._connection() as conn:
            row = conn.execute(f"SELECT count(*) FROM traces t WHERE {where}", params).fetchone()
            total = int(row[0]) if row else 0
            rows = conn.execute(
                "SELECT trace_id, start_ns, end_ns, span_count, error_count, root_service,"
                f" root_name FROM traces t WHERE {where}"
                " ORDER BY start_ns DESC, trace_id DESC LIMIT %s OFFSET %s",
                [*params, query.limit, query.offset],
            ).fetchall()
            services: dict[str, list[str]] = {}
            for trace_id, service in conn.execute(
                "SELECT DISTINCT trace_id, service FROM spans WHERE trace_id = ANY(%s)"
                " ORDER BY trace_id, service",
                ([r[0] for r in rows],),
            ):
                services.setdefault(trace_id, []).append(service)
        summaries = [
            TraceSummary(trace_id, start, end, count, errors, root_service, root_name,
                         tuple(services.get(trace_id, ())))
            for trace_id, start, end, count, errors, root_service, root_name in rows
        ]  # fmt: skip
        return summaries, total

    def trace(self, trace_id: str) -> list[SpanRecord]:
        rows = self._rows(
            f"SELECT {SPAN_COLUMNS} FROM spans WHERE trace_id = %s ORDER BY start_ns, span_id",
            (trace_id.lower(),),
        )
        return [decode_span(r) for r in rows]

    def dependencies(self, start_ns: int, end_ns: int) -> list[Edge]:
        rows = self._rows(
            """
            SELECT p.service, c.service, count(*), count(*) FILTER (WHERE c.status_code = %s)
            FROM spans c JOIN spans p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id
            WHERE c.start_ns BETWEEN %s AND %s AND p.service <> c.service
            GROUP BY 1, 2 ORDER BY 1, 2
            """,
            (STATUS_ERROR, start_ns, end_ns),
        )
        return [Edge(*r) for r in rows]

    def agency_calls(self, start_ns: int, end_ns: int) -> list[Edge]:
        # Only spans the collector stamped as the broker's: an agency can write any
        # attribute it likes, and must not draw edges or error rates between others.
        rows = self._rows(
            """
            SELECT c.value, p.value, count(*), count(*) FILTER (WHERE s.status_code = %s)
            FROM spans s
            JOIN span_tags c ON c.trace_id = s.trace_id AND c.span_id = s.span_id
                AND c.key = 'tabadol.consumer'
            JOIN span_tags p ON p.trace_id = s.trace_id AND p.span_id = s.span_id
                AND p.key = 'tabadol.provider'
            WHERE s.kind = %s AND s.start_ns BETWEEN %s AND %s
                AND s.sender LIKE %s AND s.sender NOT LIKE %s
            GROUP BY 1, 2 ORDER BY 1, 2
            """,
            (STATUS_ERROR, _SERVER, start_ns, end_ns, "spiffe://%/broker", "spiffe://%/%/%"),
        )
        return [Edge(*r) for r in rows]

    # -- retention ----------------------------------------------------------------------

    def used_bytes(self) -> int:
        with self._connection() as conn:
            return _used_bytes(conn)

    def usage(self) -> dict[str, int]:
        rows = self._rows("SELECT sender, bytes FROM sender_usage ORDER BY sender")
        return {sender: int(size) for sender, size in rows}

    def enforce_retention(self, now_ns: int) -> int:
        cutoff = max(now_ns - int(self.limits.max_age_seconds * 1e9), _INT64_MIN)
        removed = 0
        while (gone := self._expire_batch(cutoff)) is not None:
            removed += gone
        while (gone := self._evict_batch()) is not None:
            removed += gone
        return removed

    def _expire_batch(self, cutoff: int) -> int | None:
        """Delete one batch of the spans of traces that ended, or were first received,
        before ``cutoff``; how many traces went whole, None when there was nothing left."""
        with self._connection() as conn:
            # Rows first, the write lock after: adds carry on while this waits for rows.
            doomed = conn.execute(
                "SELECT s.trace_id, s.span_id FROM traces t JOIN spans s USING (trace_id)"
                " WHERE t.end_ns < %s OR t.received_ns < %s ORDER BY t.received_ns"
                " LIMIT %s FOR UPDATE OF s",
                (cutoff, cutoff, self.batch_spans),
            ).fetchall()
            if not doomed:
                return None
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            return _delete_spans(conn, [(t, s) for t, s in doomed])

    def _evict_batch(self) -> int | None:
        """While over the size cap: delete one batch of spans as eviction.py says (the
        broker's only once no agency's are left); how many traces went whole, None when
        under the cap or nothing more may go."""
        cap = self.limits.max_bytes
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            used = _used_bytes(conn)
            if used <= cap:
                return None
            usage = conn.execute("SELECT sender, bytes FROM sender_usage").fetchall()
            target = eviction_target(
                usage,
                lambda sender: _has_spans_before(conn, sender, _INT64_MAX),
                for_broker=False,
                at_retention=True,
            )
            if target is None:
                return None
            doomed = self._earliest(conn, target, _INT64_MAX, eviction_need(used, cap, used))
            if not doomed:
                return None  # all held by another console's retention: it evicts them
            return _delete_spans(conn, doomed)


def _used_bytes(conn: Connection) -> int:
    row = conn.execute("SELECT coalesce(sum(bytes), 0) FROM sender_usage").fetchone()
    return int(row[0]) if row else 0


def _has_spans_before(conn: Connection, sender: str, before: int) -> bool:
    row = conn.execute(
        "SELECT 1 FROM spans WHERE sender = %s AND received_ns < %s LIMIT 1", (sender, before)
    ).fetchone()
    return row is not None


def _delete_spans(conn: Connection, doomed: Sequence[tuple[str, str]]) -> int:
    """Delete these (trace_id, span_id) spans with their tags, parties and share, in the
    caller's transaction (which holds the write lock), and bring their traces' summaries up
    to date; how many traces went whole."""
    if not doomed:
        return 0
    trace_ids, span_ids = (list(column) for column in zip(*doomed, strict=True))
    keys = "unnest(%s::text[], %s::text[]) AS d (trace_id, span_id)"
    match = "x.trace_id = d.trace_id AND x.span_id = d.span_id"
    deleted = conn.execute(
        f"DELETE FROM spans x USING {keys} WHERE {match} RETURNING x.sender, x.bytes, x.trace_id",
        (trace_ids, span_ids),
    ).fetchall()
    for table in ("span_tags", "trace_parties"):
        conn.execute(f"DELETE FROM {table} x USING {keys} WHERE {match}", (trace_ids, span_ids))
    freed: dict[str, list[int]] = {}
    for sender, size, _ in deleted:
        counts = freed.setdefault(sender, [0, 0])
        counts[0] += size
        counts[1] += 1
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE sender_usage SET bytes = bytes - %s, spans = spans - %s WHERE sender = %s",
            [(size, n, sender) for sender, (size, n) in sorted(freed.items())],
        )
    conn.execute("DELETE FROM sender_usage WHERE spans <= 0")
    touched = sorted({trace_id for _, _, trace_id in deleted})
    gone = conn.execute(
        "DELETE FROM traces t WHERE t.trace_id = ANY(%s)"
        " AND NOT EXISTS (SELECT 1 FROM spans s WHERE s.trace_id = t.trace_id)",
        (touched,),
    ).rowcount
    # What is left of a trace some of whose spans went: its summary from those spans.
    conn.execute(
        """
        UPDATE traces t SET start_ns = a.start_ns, end_ns = a.end_ns, span_count = a.spans,
            error_count = a.errors, has_root = a.has_root, root_service = a.root_service,
            root_name = a.root_name
        FROM (
            SELECT trace_id, min(start_ns) AS start_ns, max(end_ns) AS end_ns, count(*) AS spans,
                count(*) FILTER (WHERE status_code = %s) AS errors,
                bool_or(parent_span_id = '') AS has_root,
                (array_agg(service ORDER BY parent_span_id <> '', start_ns, span_id))[1]
                    AS root_service,
                (array_agg(name ORDER BY parent_span_id <> '', start_ns, span_id))[1] AS root_name
            FROM spans WHERE trace_id = ANY(%s) GROUP BY trace_id
        ) a
        WHERE t.trace_id = a.trace_id
        """,
        (STATUS_ERROR, touched),
    )
    return max(gone, 0)
