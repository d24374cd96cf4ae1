"""The ledger on PostgreSQL, shared by every broker node of an exchange.

Each node extends a chain of its own (named by its ``instance``), locked by one row of
``ledger_chains`` for the length of a batch's transaction: nodes never wait on each other,
and several workers of one node take turns. Records go in with COPY; the seal, the chain's
new head and the records commit together, or nothing does.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg_pool

from tabadol.database import Database
from tabadol.ledger.record import (
    FIELD_NAMES,
    FIELD_TYPES,
    GENESIS,
    LedgerRecord,
    Seal,
    StoredRecord,
    chain_digest,
)
from tabadol.ledger.sessions import Session
from tabadol.ledger.store.base import (
    UNAVAILABLE,
    CallGroup,
    LedgerMissing,
    LedgerWriteError,
    SealTimestamp,
    percentile_table,
)

_PAGE = 5000
_SQL_TYPES = {int: "bigint", str: "text", bool: "boolean"}
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ledger_chains (
    chain text PRIMARY KEY,
    count bigint NOT NULL DEFAULT 0,
    head text NOT NULL DEFAULT '{GENESIS}',
    seals bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ledger_records (
    chain text NOT NULL,
    seq bigint NOT NULL,
    {", ".join(f"{name} {_SQL_TYPES[FIELD_TYPES[name]]} NOT NULL" for name in FIELD_NAMES)},
    prev_digest text NOT NULL,
    digest text NOT NULL,
    PRIMARY KEY (chain, seq)
);
CREATE INDEX IF NOT EXISTS ledger_records_by_start ON ledger_records (start_ns, chain, seq);
CREATE TABLE IF NOT EXISTS ledger_seals (
    chain text NOT NULL,
    seq bigint NOT NULL,
    count bigint NOT NULL,
    head_digest text NOT NULL,
    sealed_ns bigint NOT NULL,
    signer text NOT NULL,
    signature text NOT NULL,
    PRIMARY KEY (chain, seq)
);
CREATE TABLE IF NOT EXISTS ledger_signers (
    fingerprint text PRIMARY KEY,
    certificate_pem bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_sessions (
    id text PRIMARY KEY,
    instance text NOT NULL,
    mode text NOT NULL,
    host text NOT NULL,
    pid bigint NOT NULL,
    process text NOT NULL,
    opened_ns bigint NOT NULL,
    ended_ns bigint,
    ended text NOT NULL DEFAULT '',
    accepted bigint,
    written bigint,
    acknowledged text NOT NULL DEFAULT '',
    signer text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS ledger_seal_timestamps (
    chain text NOT NULL,
    seal_seq bigint NOT NULL,
    token bytea NOT NULL,
    gen_time_ns bigint NOT NULL,
    PRIMARY KEY (chain, seal_seq)
);
"""
# One role per node (`tabadol ledger init --one-role-per-node`): a node's role, named as its
# [broker] instance, reads every chain but adds to, and moves, only its own. Row-level
# security guards the rows that move (chains, sessions); records and seals, only ever
# added and added by COPY (which row-level security does not allow), a trigger. Neither
# binds the tables' owner.
_OWN_CHAINS = (
    "\n".join(
        f"""ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tabadol_read ON {table};
CREATE POLICY tabadol_read ON {table} FOR SELECT USING (true);
DROP POLICY IF EXISTS tabadol_add_own ON {table};
CREATE POLICY tabadol_add_own ON {table} FOR INSERT WITH CHECK ({column} = current_user);
DROP POLICY IF EXISTS tabadol_move_own ON {table};
CREATE POLICY tabadol_move_own ON {table} FOR UPDATE USING ({column} = current_user);"""
        for table, column in (("ledger_chains", "chain"), ("ledger_sessions", "instance"))
    )
    + """
CREATE OR REPLACE FUNCTION tabadol_own_chain() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.chain <> current_user AND NOT pg_has_role(
        current_user, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'USAGE'
    ) THEN
        RAISE EXCEPTION 'role % may add only to its own chain, not to %', current_user,
            NEW.chain USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER tabadol_own_chain BEFORE INSERT ON ledger_records
    FOR EACH ROW EXECUTE FUNCTION tabadol_own_chain();
CREATE OR REPLACE TRIGGER tabadol_own_chain BEFORE INSERT ON ledger_seals
    FOR EACH ROW EXECUTE FUNCTION tabadol_own_chain();
CREATE OR REPLACE TRIGGER tabadol_own_chain BEFORE INSERT ON ledger_seal_timestamps
    FOR EACH ROW EXECUTE FUNCTION tabadol_own_chain();
"""
)
_RECORD_COLUMNS = ", ".join(("chain", "seq", *FIELD_NAMES, "prev_digest", "digest"))
_SEAL_COLUMNS = "seq, count, head_digest, sealed_ns, signer, signature, chain"
_SESSION_COLUMNS = ", ".join(f.name for f in dataclasses.fields(Session))


_OBJECTS = (
    "ledger_chains", "ledger_records", "ledger_records_by_start", "ledger_seals",
    "ledger_signers", "ledger_sessions", "ledger_seal_timestamps",
)  # fmt: skip


def _missing_objects(conn: psycopg.Connection[Any]) -> bool:
    """Whether any table or index of the ledger is missing (the schema is then made)."""
    found = conn.execute(
        "SELECT count(to_regclass(name)) FROM unnest(%s::text[]) AS name", (list(_OBJECTS),)
    ).fetchone()
    return found is None or found[0] < len(_OBJECTS)


def _distinct_chains(table: str, alias: str) -> str:
    """The distinct chains of a table whose primary key starts with ``chain``."""
    return f"""(
        WITH RECURSIVE {alias}(chain) AS (
            (SELECT chain FROM {table} ORDER BY chain LIMIT 1)
            UNION ALL
            SELECT (SELECT t.chain FROM {table} t WHERE t.chain > {alias}.chain
                    ORDER BY t.chain LIMIT 1)
            FROM {alias} WHERE {alias}.chain IS NOT NULL
        ) SELECT chain FROM {alias} WHERE chain IS NOT NULL
    )"""


def _read_only(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")


def _stored(row: Sequence[Any]) -> StoredRecord:
    _chain, seq, *values, prev_digest, digest = row
    return StoredRecord(seq, LedgerRecord(*values), prev_digest, digest)


class PostgresLedgerStore:
    """A LedgerStore in a PostgreSQL database, over a small connection pool."""

    def __init__(self, url: str, *, readonly: bool = False, connect_timeout_s: float = 5.0) -> None:
        self._database = Database(url)
        self.where = self._database.where
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=connect_timeout_s,
            # A connection the server dropped is found before a write relies on it.
            check=psycopg_pool.ConnectionPool.check_connection,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, round(connect_timeout_s)),
            },
            # Read-only after connecting, not in the startup options: libpq's
            # target_session_attrs=read-write (or primary) would take such a session for a
            # standby's and refuse every host.
            configure=_read_only if readonly else None,
            name="tabadol-ledger",
        )
        self._known_signers: set[str] = set()
        self._signers_lock = threading.Lock()
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
            with self._pool.connection() as conn:
                missing = _missing_objects(conn)
                if missing and readonly:
                    self._pool.close()
                    raise LedgerMissing(f"{self.where}: no ledger here (no broker wrote it yet)")
                if missing:  # only then: a role that does not own the tables may write them
                    with conn.transaction():
                        # Any role may hold an advisory lock: wait for it, not for ever.
                        conn.execute("SET LOCAL lock_timeout = '10s'")
                        conn.execute("SELECT pg_advisory_xact_lock(hashtext('tabadol-ledger'))")
                        conn.execute(_SCHEMA)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            self._pool.close()
            raise LedgerWriteError(
                f"{self.where}: cannot open the ledger: {self._database.why(e)}"
            ) from e

    def close(self) -> None:
        self._pool.close()

    def confine_chains_to_roles(self) -> None:
        """Row-level security: each node's role (named as its instance) may add to and move
        only its own chain and sessions; run by the tables' owner, whom it does not bind."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute(_OWN_CHAINS)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise LedgerWriteError(f"{self.where}: {self._database.why(e)}") from e

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            with self._pool.connection() as conn:
                return conn.execute(sql, params).fetchall()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise LedgerWriteError(f"{self.where}: {self._database.why(e)}") from e

    def _write(self, sql: str, params: Sequence[Any]) -> None:
        try:
            with self._pool.connection() as conn:
                conn.execute(sql, params)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise LedgerWriteError(f"{self.where}: {self._database.why(e)}") from e

    def chain_for(self, instance: str) -> str:
        """A chain per node, so nodes never wait on one lock."""
        return instance

    def chains(self) -> list[str]:
        """Every chain any record or seal names, not only those ``ledger_chains`` lists:
        rows added under a name no node seals must meet verify, not slip into the reports.
        A skip scan of each table's primary key: one index probe per chain."""
        rows = self._query(
            f"{_distinct_chains('ledger_records', 'r')} UNION "
            f"{_distinct_chains('ledger_seals', 's')} ORDER BY 1"
        )
        return [row[0] for row in rows]

    def head(self, chain: str = "") -> tuple[int, str]:
        rows = self._query("SELECT count, head FROM ledger_chains WHERE chain = %s", (chain,))
        return (rows[0][0], rows[0][1]) if rows else (0, GENESIS)

    def append_sealed(
        self,
        records: Sequence[LedgerRecord],
        seal_with: Callable[[int, int, str], Seal],
        signer_pem: bytes,
        chain: str = "",
        session: str = "",
    ) -> Seal:
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute(
                    "INSERT INTO ledger_chains (chain) VALUES (%s) ON CONFLICT DO NOTHING",
                    (chain,),
                )
                row = conn.execute(
                    "SELECT count, head, seals FROM ledger_chains WHERE chain = %s FOR UPDATE",
                    (chain,),
                ).fetchone()
                assert row is not None  # inserted just above if it was not there
                count, head, seals = row
                stored = []
                for record in records:
                    count += 1
                    digest = chain_digest(head, record)
                    stored.append(StoredRecord(count, record, head, digest))
                    head = digest
                seal = seal_with(seals + 1, count, head)
                with conn.cursor().copy(
                    f"COPY ledger_records ({_RECORD_COLUMNS}) FROM STDIN"
                ) as copy:
                    for r in stored:
                        copy.write_row((chain, r.seq, *r.record.values(), r.prev_digest, r.digest))
                conn.execute(
                    f"INSERT INTO ledger_seals ({_SEAL_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    dataclasses.astuple(seal),
                )
                if seal.signer not in self._known_signers:
                    conn.execute(
                        "INSERT INTO ledger_signers VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        (seal.signer, signer_pem),
                    )
                conn.execute(
                    "UPDATE ledger_chains SET count = %s, head = %s, seals = %s WHERE chain = %s",
                    (count, head, seal.seq, chain),
                )
                if session:
                    conn.execute(
                        "UPDATE ledger_sessions SET written = coalesce(written, 0) + %s "
                        "WHERE id = %s",
                        (len(stored), session),
                    )
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise LedgerWriteError(f"{self.where}: {self._database.why(e)}") from e
        with self._signers_lock:
            self._known_signers.add(seal.signer)
        return seal

    def _pages(self, sql: str, params: Sequence[Any], key: Callable[[Any], tuple[Any, ...]],
               first: tuple[Any, ...]) -> Iterator[Any]:  # fmt: skip
        """Rows in keyset pages (``sql`` has one %s-tuple placeholder for the last key), so a
        huge ledger streams instead of loading whole."""
        last = first
        while True:
            rows = self._query(sql, [*params, *last])
            yield from rows
            if len(rows) < _PAGE:
                return
            last = key(rows[-1])

    def records(self, chain: str = "", from_seq: int = 1) -> Iterator[StoredRecord]:
        sql = (
            f"SELECT {_RECORD_COLUMNS} FROM ledger_records WHERE chain = %s AND seq > %s "
            f"ORDER BY seq LIMIT {_PAGE}"
        )
        for row in self._pages(sql, [chain], lambda r: (r[1],), (from_seq - 1,)):
            yield _stored(row)

    def records_between(self, start_ns: int, end_ns: int) -> Iterator[StoredRecord]:
        sql = (
            f"SELECT {_RECORD_COLUMNS} FROM ledger_records WHERE start_ns < %s "
            f"AND (start_ns, chain, seq) > (%s, %s, %s) ORDER BY start_ns, chain, seq "
            f"LIMIT {_PAGE}"
        )
        start = FIELD_NAMES.index("start_ns") + 2
        for row in self._pages(
            sql, [end_ns], lambda r: (r[start], r[0], r[1]), (start_ns - 1, "\uffff", 0)
        ):
            yield _stored(row)

    def seals(self, chain: str = "") -> Iterator[Seal]:
        sql = (
            f"SELECT {_SEAL_COLUMNS} FROM ledger_seals WHERE chain = %s AND seq > %s "
            f"ORDER BY seq LIMIT {_PAGE}"
        )
        for row in self._pages(sql, [chain], lambda r: (r[0],), (0,)):
            yield Seal(*row)

    def last_seal(self, chain: str = "") -> Seal | None:
        rows = self._query(
            f"SELECT {_SEAL_COLUMNS} FROM ledger_seals WHERE chain = %s ORDER BY seq DESC LIMIT 1",
            (chain,),
        )
        return Seal(*rows[0]) if rows else None

    def signers(self) -> dict[str, bytes]:
        return {fp: bytes(pem) for fp, pem in self._query("SELECT * FROM ledger_signers")}

    def open_session(self, session: Session) -> None:
        placeholders = ", ".join(["%s"] * len(dataclasses.fields(Session)))
        self._write(
            f"INSERT INTO ledger_sessions ({_SESSION_COLUMNS}) VALUES ({placeholders})",
            dataclasses.astuple(session),
        )

    def end_session(
        self, session_id: str, ended: str, ended_ns: int, accepted: int | None, written: int | None
    ) -> None:
        self._write(
            "UPDATE ledger_sessions SET ended = %s, ended_ns = %s, accepted = %s, written = %s "
            "WHERE id = %s",
            (ended, ended_ns, accepted, written, session_id),
        )

    def acknowledge_session(self, session_id: str, acknowledgement: str) -> None:
        self._write(
            "UPDATE ledger_sessions SET acknowledged = %s WHERE id = %s",
            (acknowledgement, session_id),
        )

    def sessions(self) -> list[Session]:
        rows = self._query(f"SELECT {_SESSION_COLUMNS} FROM ledger_sessions ORDER BY opened_ns")
        return [Session(*row) for row in rows]

    def add_timestamp(self, chain: str, seal_seq: int, token_der: bytes, gen_time_ns: int) -> None:
        self._write(
            "INSERT INTO ledger_seal_timestamps VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (chain, seal_seq, token_der, gen_time_ns),
        )

    def timestamps(self, chain: str = "") -> Iterator[SealTimestamp]:
        sql = (
            "SELECT chain, seal_seq, token, gen_time_ns FROM ledger_seal_timestamps "
            f"WHERE chain = %s AND seal_seq > %s ORDER BY seal_seq LIMIT {_PAGE}"
        )
        for c, seq, token, ns in self._pages(sql, [chain], lambda r: (r[1],), (0,)):
            yield SealTimestamp(c, seq, bytes(token), ns)

    _AFTER_TIMESTAMPED = (
        "(SELECT coalesce(max(seal_seq), 0) FROM ledger_seal_timestamps WHERE chain = %s)"
    )

    def untimestamped(self, chain: str = "", limit: int = 100) -> list[Seal]:
        rows = self._query(
            f"SELECT {_SEAL_COLUMNS} FROM ledger_seals WHERE chain = %s "
            f"AND seq > {self._AFTER_TIMESTAMPED} ORDER BY seq LIMIT %s",
            (chain, chain, limit),
        )
        return [Seal(*row) for row in rows]

    def untimestamped_count(self, chain: str = "") -> int:
        rows = self._query(
            "SELECT greatest(0, coalesce((SELECT seals FROM ledger_chains WHERE chain = %s), 0) "
            f"- {self._AFTER_TIMESTAMPED})",
            (chain, chain),
        )
        return int(rows[0][0])

    def records_count(self) -> int:
        return int(self._query("SELECT coalesce(sum(count), 0) FROM ledger_chains")[0][0])

    def call_groups(self, start_ns: int, end_ns: int) -> list[CallGroup]:
        rows = self._query(
            """
            SELECT consumer, provider, service, method, status_code, endpoint <> '', count(*),
                   sum(end_ns - start_ns), consumer_verified
            FROM ledger_records WHERE start_ns >= %s AND start_ns < %s
            GROUP BY 1, 2, 3, 4, 5, 6, 9 ORDER BY 1, 2, 3, 4, 5, 6, 9
            """,
            (start_ns, end_ns),
        )
        return [
            CallGroup(c, p, s, m, code, fwd, n, int(d), v)
            for c, p, s, m, code, fwd, n, d, v in rows
        ]

    def durations(self, provider: str, start_ns: int, end_ns: int) -> list[int]:
        rows = self._query(
            """
            SELECT end_ns - start_ns FROM ledger_records
            WHERE start_ns >= %s AND start_ns < %s AND provider = %s AND endpoint <> ''
                AND status_code <> %s
            ORDER BY 1
            """,
            (start_ns, end_ns, provider, UNAVAILABLE),
        )
        return [r[0] for r in rows]

    def count_between(self, start_ns: int, end_ns: int) -> int:
        rows = self._query(
            "SELECT count(*) FROM ledger_records WHERE start_ns >= %s AND start_ns < %s",
            (start_ns, end_ns),
        )
        return int(rows[0][0])

    def latency_percentiles(
        self,
        start_ns: int,
        end_ns: int,
        percents: Sequence[int],
        consumers: Sequence[str] | None = None,
    ) -> dict[str, tuple[int, dict[int, int]]]:
        """As the SQLite store's: nearest rank, over identified consumers' calls."""
        only = "" if consumers is None else "AND consumer = ANY(%s)"
        params: list[Any] = [start_ns, end_ns]
        if consumers is not None:
            params.append(["", *consumers])
        rank_of = " OR ".join(f"rn = (n * {int(p)} + 99) / 100" for p in percents) or "false"
        rows = self._query(
            f"""
            SELECT service, n, rn, d FROM (
                SELECT service, end_ns - start_ns AS d,
                       row_number() OVER (PARTITION BY service ORDER BY end_ns - start_ns) AS rn,
                       count(*) OVER (PARTITION BY service) AS n
                FROM ledger_records
                WHERE start_ns >= %s AND start_ns < %s AND consumer_verified {only}
            ) ranked WHERE {rank_of} ORDER BY service, rn
            """,
            params,
        )
        return percentile_table(rows, percents)

    def provider_windows(
        self, start_ns: int, end_ns: int, window_ns: int
    ) -> dict[str, tuple[int, int]]:
        rows = self._query(
            """
            SELECT provider, count(*), sum(answered::int) FROM (
                SELECT provider, (start_ns - %s) / %s AS window, bool_or(status_code <> %s) AS answered
                FROM ledger_records
                WHERE start_ns >= %s AND start_ns < %s AND endpoint <> ''
                GROUP BY 1, 2
            ) windows GROUP BY 1
            """,
            (start_ns, window_ns, UNAVAILABLE, start_ns, end_ns),
        )
        return {provider: (int(windows), int(answered)) for provider, windows, answered in rows}
