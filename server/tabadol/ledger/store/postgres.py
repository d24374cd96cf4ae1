"""The ledger on PostgreSQL, shared by every broker node of an exchange.

Each node extends a chain of its own (named by its ``instance``), locked by one row of
``ledger_chains`` for the length of a batch's transaction: nodes never wait on each other,
and several workers of one node take turns. Records go in with COPY; the seal, the chain's
new head, the records and their rollup (``tabadol.ledger.rollup``: rows per chain, so
nodes never share one) commit together, or nothing does.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
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
from tabadol.ledger.rollup import (
    WINDOW_NS,
    GroupKey,
    GroupTotals,
    Histogram,
    ProviderDay,
    ProviderDayKey,
    Rollup,
    add_encoded,
    add_histogram,
    bin_of,
    decode_histogram,
    decode_windows,
    encode_histogram,
    encode_windows,
    masks_after,
    percentiles,
    rollup,
    whole_days,
)
from tabadol.ledger.sessions import Session
from tabadol.ledger.store.base import (
    UNAVAILABLE,
    ArchivedPrefix,
    CallGroup,
    LedgerMissing,
    LedgerWriteError,
    SealTimestamp,
    archived_rows_problem,
    signed_prefix,
)

_PAGE = 5000
_SQL_TYPES = {int: "bigint", str: "text", bool: "boolean"}
# The record fields as columns, quoted: "grant" is a reserved word in PostgreSQL.
_FIELD_COLUMNS = ", ".join(f'"{name}"' for name in FIELD_NAMES)
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
    {", ".join(f'"{name}" {_SQL_TYPES[FIELD_TYPES[name]]} NOT NULL' for name in FIELD_NAMES)},
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
CREATE TABLE IF NOT EXISTS ledger_rollup_groups (
    chain text NOT NULL,
    archived boolean NOT NULL,
    day_ns bigint NOT NULL,
    consumer text NOT NULL,
    provider text NOT NULL,
    service text NOT NULL,
    method text NOT NULL,
    status_code bigint NOT NULL,
    forwarded boolean NOT NULL,
    verified boolean NOT NULL,
    "grant" text NOT NULL DEFAULT '',
    protocol text NOT NULL DEFAULT 'grpc',
    calls bigint NOT NULL,
    duration_ns bigint NOT NULL,
    request_bytes bigint NOT NULL,
    response_bytes bigint NOT NULL,
    histogram text NOT NULL,  -- rollup.encode_histogram: [[bin, calls], ...]
    PRIMARY KEY (chain, archived, day_ns, consumer, provider, service, method, status_code,
                 forwarded, verified, "grant", protocol)
);
CREATE INDEX IF NOT EXISTS ledger_rollup_groups_by_day ON ledger_rollup_groups (day_ns);
CREATE TABLE IF NOT EXISTS ledger_rollup_provider_days (
    chain text NOT NULL,
    archived boolean NOT NULL,
    day_ns bigint NOT NULL,
    provider text NOT NULL,
    windows text NOT NULL,  -- rollup.encode_windows: [[index, calls, answered], ...]
    calls_mask bit(300) NOT NULL,  -- bit i from the left: window i had calls
    answered_mask bit(300) NOT NULL,  -- ... window i had answered calls
    histogram text NOT NULL,  -- of the calls the provider answered
    PRIMARY KEY (chain, archived, day_ns, provider)
);
CREATE INDEX IF NOT EXISTS ledger_rollup_provider_days_by_day
    ON ledger_rollup_provider_days (day_ns);
CREATE TABLE IF NOT EXISTS ledger_archived (
    chain text PRIMARY KEY,
    seal_seq bigint NOT NULL,
    seal_count bigint NOT NULL,
    head_digest text NOT NULL,
    sealed_ns bigint NOT NULL,
    signer text NOT NULL,
    signature text NOT NULL,
    archived_ns bigint NOT NULL,
    archive text NOT NULL,
    rollup_sha256 text NOT NULL,
    statement_signature text NOT NULL,
    certificate_pem bytea NOT NULL
);
"""
_ROLLUP_TABLES = ("ledger_rollup_groups", "ledger_rollup_provider_days")


# One role per node (`tabadol ledger init --one-role-per-node`): a node's role, named as its
# [broker] instance, reads every chain but adds to, and moves, only its own. Row-level
# security guards the rows that move (chains, sessions, the live rollup rows); records and
# seals, only ever added and added by COPY (which row-level security does not allow), a
# trigger. Archiving (removing records, moving rollups to archived rows, ledger_archived) is
# the tables' owner's, whom neither binds: a node's role may not touch archived rows, nor
# remove records, seals or timestamps even if a DBA grants it DELETE (a statement trigger:
# one check per DELETE, whatever the number of rows it removes).
def _own_rows(table: str, column: str, only: str = "", *, remove: bool = False) -> str:
    mine = f"{column} = current_user{only}"
    return f"""ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tabadol_read ON {table};
CREATE POLICY tabadol_read ON {table} FOR SELECT USING (true);
DROP POLICY IF EXISTS tabadol_add_own ON {table};
CREATE POLICY tabadol_add_own ON {table} FOR INSERT WITH CHECK ({mine});
DROP POLICY IF EXISTS tabadol_move_own ON {table};
CREATE POLICY tabadol_move_own ON {table} FOR UPDATE USING ({mine}) WITH CHECK ({mine});
DROP POLICY IF EXISTS tabadol_remove_own ON {table};
{f"CREATE POLICY tabadol_remove_own ON {table} FOR DELETE USING ({mine});" if remove else ""}"""


_LIVE = " AND NOT archived"  # a node's role may change its chain's live rollup rows only
_OWN_CHAINS = (
    "\n".join(
        (
            _own_rows("ledger_chains", "chain"),
            _own_rows("ledger_sessions", "instance"),
            *(_own_rows(t, "chain", _LIVE, remove=True) for t in _ROLLUP_TABLES),
            _own_rows("ledger_archived", "chain", " AND false"),  # the owner's alone
        )
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
CREATE OR REPLACE FUNCTION tabadol_owner_removes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_has_role(
        current_user, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'USAGE'
    ) THEN
        RAISE EXCEPTION 'role % may not remove rows of %: archiving is the tables'' owner''s',
            current_user, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END $$;
"""
    + "\n".join(
        f"""CREATE OR REPLACE TRIGGER tabadol_own_chain BEFORE INSERT ON {table}
    FOR EACH ROW EXECUTE FUNCTION tabadol_own_chain();
CREATE OR REPLACE TRIGGER tabadol_owner_removes BEFORE DELETE OR TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION tabadol_owner_removes();"""
        for table in ("ledger_records", "ledger_seals", "ledger_seal_timestamps")
    )
)
_RECORD_COLUMNS = f"chain, seq, {_FIELD_COLUMNS}, prev_digest, digest"
# Columns added after a table's first schema, with the value old rows take (docs/ledger.md):
# _make_schema adds them to a ledger made before them. The group rows' grant and protocol
# are part of their key: their old rows keep their sums under grant '' and protocol 'grpc',
# as their records have.
_ADDED_COLUMNS = (("ledger_records", "grant", "text", "''"),
                  ("ledger_rollup_groups", "grant", "text", "''"),
                  ("ledger_records", "protocol", "text", "'grpc'"),
                  ("ledger_rollup_groups", "protocol", "text", "'grpc'"))  # fmt: skip
_SEAL_COLUMNS = "seq, count, head_digest, sealed_ns, signer, signature, chain"
_PREFIX_COLUMNS = (
    "seal_seq, seal_count, head_digest, sealed_ns, signer, signature, archived_ns, archive, "
    "rollup_sha256, statement_signature, certificate_pem"
)


def _prefix(chain: str, row: Sequence[Any]) -> ArchivedPrefix:
    """A ledger_archived row (its _PREFIX_COLUMNS) as the prefix it notes."""
    seq, count, head, sealed_ns, signer, signature, archived_ns, archive, *signed = row
    seal = Seal(seq, count, head, sealed_ns, signer, signature, chain)
    rollup_sha256, statement_signature, certificate = signed
    return ArchivedPrefix(
        chain, seal, archived_ns, archive, rollup_sha256, statement_signature, bytes(certificate)
    )


_SESSION_COLUMNS = ", ".join(f.name for f in dataclasses.fields(Session))


_OBJECTS = (
    "ledger_chains", "ledger_records", "ledger_records_by_start", "ledger_seals",
    "ledger_signers", "ledger_sessions", "ledger_seal_timestamps", "ledger_rollup_groups",
    "ledger_rollup_groups_by_day", "ledger_rollup_provider_days",
    "ledger_rollup_provider_days_by_day", "ledger_archived",
)  # fmt: skip


def _missing_objects(conn: psycopg.Connection[Any]) -> bool:
    """Whether any table, index or added column of the ledger is missing (the schema is
    then made)."""
    found = conn.execute(
        "SELECT (SELECT count(to_regclass(name)) FROM unnest(%s::text[]) AS name), "
        "(SELECT count(*) FROM unnest(%s::text[], %s::text[]) AS added(t, name) "
        "JOIN pg_attribute ON attrelid = to_regclass(t) AND attname = name "
        "AND NOT attisdropped)",
        (list(_OBJECTS), [t for t, *_ in _ADDED_COLUMNS], [c for _, c, *_ in _ADDED_COLUMNS]),
    ).fetchone()
    return found is None or found[0] < len(_OBJECTS) or found[1] < len(_ADDED_COLUMNS)


def _add_columns(conn: psycopg.Connection[Any]) -> None:
    """Add the columns a ledger made before them lacks; a group row's key then takes in its
    grant and protocol."""
    rekey = False
    for table, column, sql_type, default in _ADDED_COLUMNS:
        row = conn.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attname = %s AND NOT attisdropped",
            (table, column),
        ).fetchone()
        if row is not None and row[0]:
            continue
        conn.execute(  # a constant default: no table rewrite
            f'ALTER TABLE {table} ADD COLUMN "{column}" {sql_type} NOT NULL DEFAULT {default}'
        )
        rekey = rekey or table == "ledger_rollup_groups"
    if rekey:
        key = conn.execute(
            "SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'ledger_rollup_groups'::regclass AND contype = 'p'"
        ).fetchone()
        drop = f'DROP CONSTRAINT "{key[0]}", ' if key is not None else ""
        conn.execute(
            f"ALTER TABLE ledger_rollup_groups {drop}"
            f"ADD PRIMARY KEY (chain, archived, {_GROUP_KEY})"
        )


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


_GROUP_KEY = (
    "day_ns, consumer, provider, service, method, status_code, forwarded, verified, "
    '"grant", protocol'
)
_GROUP_KEY_TYPES = (
    "bigint", "text", "text", "text", "text", "bigint", "boolean", "boolean", "text", "text"
)  # fmt: skip
_GROUP_COLUMNS = f"{_GROUP_KEY}, calls, duration_ns, request_bytes, response_bytes, histogram"
# The histogram is JSON text, not jsonb: parsing jsonb's numerics made each batch's write
# several times slower (docs/performance.md), and reads parse only the rows they need.
_GROUP_TYPES = (*_GROUP_KEY_TYPES, "bigint", "bigint", "bigint", "bigint", "text")
# A provider day: its windows and histogram JSON text as the groups' histogram, its masks
# bit(300) (a day has at most 300 windows), which PostgreSQL ORs (bit_or) and counts
# (bit_count) itself: availability reads a quarter's masks without sending them here.
_DAY_KEY = "day_ns, provider"
_DAY_COLUMNS = f"{_DAY_KEY}, windows, calls_mask, answered_mask, histogram"
_DAY_TYPES = ("bigint", "text", "text", "bit(300)", "bit(300)", "text")
_NO_DAY = ("[]", "0", "0", "[]")  # a provider day not stored yet, as stored
_ROLLUP_ROWS = "chain = %s AND archived = %s"


def _unnest(types: Sequence[str]) -> str:
    """Rows passed as one array per column: one statement, however many rows."""
    return "unnest(" + ", ".join(f"%s::{t}[]" for t in types) + ")"


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


def _bits(mask: int) -> str:
    """A window bitmask as bit(300) text: window i is the i-th bit from the left (the cast
    to bit(300) pads the right with zeros)."""
    return format(mask, "b")[::-1]


def _mask(bits: str) -> int:
    return int(bits[::-1], 2)


def _group_rows(
    conn: psycopg.Connection[Any],
    where: str,
    params: Sequence[Any],
    keys: Collection[GroupKey] | None = None,
) -> dict[GroupKey, GroupTotals]:
    """Call group rows matching ``where``; with ``keys``, only those."""
    sql = f"SELECT {_GROUP_COLUMNS} FROM ledger_rollup_groups WHERE {where}"
    params = list(params)
    if keys is not None:
        sql += f" AND ({_GROUP_KEY}) IN (SELECT * FROM {_unnest(_GROUP_KEY_TYPES)})"
        params += _columns(list(keys), len(_GROUP_KEY_TYPES))
    return {
        GroupKey(*key): GroupTotals(calls, duration, request, response, decode_histogram(hist))
        for *key, calls, duration, request, response, hist in conn.execute(sql, params)
    }


def _day_rows(
    conn: psycopg.Connection[Any],
    where: str,
    params: Sequence[Any],
    keys: Collection[ProviderDayKey] | None = None,
) -> dict[ProviderDayKey, tuple[str, str, str, str]]:
    """Provider day rows matching ``where`` (with ``keys``, only those), as stored: (windows,
    calls mask, answered mask, histogram), text."""
    sql = f"SELECT {_DAY_COLUMNS} FROM ledger_rollup_provider_days WHERE {where}"
    params = list(params)
    if keys is not None:
        sql += f" AND ({_DAY_KEY}) IN (SELECT * FROM unnest(%s::bigint[], %s::text[]))"
        params += [[k.day_ns for k in keys], [k.provider for k in keys]]
    return {
        ProviderDayKey(day, provider): (windows, calls, answered, histogram)
        for day, provider, windows, calls, answered, histogram in conn.execute(sql, params)
    }


def _rollup_rows(conn: psycopg.Connection[Any], where: str, params: Sequence[Any]) -> Rollup:
    """Rollup rows matching ``where``; a provider day's masks as read (verify checks them
    against its windows)."""
    found = Rollup(_group_rows(conn, where, params))
    for key, (windows, calls, answered, histogram) in _day_rows(conn, where, params).items():
        found.provider_days[key] = ProviderDay(
            decode_windows(windows), decode_histogram(histogram), (_mask(calls), _mask(answered))
        )
    return found


def _write_groups(
    conn: psycopg.Connection[Any],
    chain: str,
    archived: bool,
    groups: Mapping[GroupKey, GroupTotals],
) -> None:
    """Insert (or overwrite) call group rows in one statement."""
    if not groups:
        return
    values = [
        (*k, t.calls, t.duration_ns, t.request_bytes, t.response_bytes,
         encode_histogram(t.histogram))
        for k, t in groups.items()
    ]  # fmt: skip
    conn.execute(
        f"INSERT INTO ledger_rollup_groups (chain, archived, {_GROUP_COLUMNS}) "
        f"SELECT %s, %s, * FROM {_unnest(_GROUP_TYPES)} "
        f"ON CONFLICT (chain, archived, {_GROUP_KEY}) DO UPDATE SET calls = EXCLUDED.calls, "
        "duration_ns = EXCLUDED.duration_ns, request_bytes = EXCLUDED.request_bytes, "
        "response_bytes = EXCLUDED.response_bytes, histogram = EXCLUDED.histogram",
        [chain, archived, *_columns(values, len(_GROUP_TYPES))],
    )


def _write_days(
    conn: psycopg.Connection[Any], chain: str, archived: bool, rows: Sequence[Sequence[Any]]
) -> None:
    """Insert (or overwrite) provider day rows (_DAY_COLUMNS, as text) in one statement."""
    if rows:
        conn.execute(
            f"INSERT INTO ledger_rollup_provider_days (chain, archived, {_DAY_COLUMNS}) "
            f"SELECT %s, %s, * FROM {_unnest(_DAY_TYPES)} "
            f"ON CONFLICT (chain, archived, {_DAY_KEY}) DO UPDATE SET windows = EXCLUDED.windows, "
            "calls_mask = EXCLUDED.calls_mask, answered_mask = EXCLUDED.answered_mask, "
            "histogram = EXCLUDED.histogram",
            [chain, archived, *_columns(rows, len(_DAY_TYPES))],
        )


def _write_rollup(conn: psycopg.Connection[Any], chain: str, archived: bool, rows: Rollup) -> None:
    """Insert (or overwrite) rollup rows, one statement per table."""
    _write_groups(conn, chain, archived, rows.groups)
    days = []
    for key, day in rows.provider_days.items():
        calls, answered = day.masks()
        days.append(
            (key.day_ns, key.provider, encode_windows(day.windows), _bits(calls),
             _bits(answered), encode_histogram(day.histogram))
        )  # fmt: skip
    _write_days(conn, chain, archived, days)


def _delete_rows(
    conn: psycopg.Connection[Any], table: str, key: str, types: Sequence[str],
    chain: str, archived: bool, keys: Sequence[Sequence[Any]],
) -> None:  # fmt: skip
    if keys:
        conn.execute(
            f"DELETE FROM {table} WHERE {_ROLLUP_ROWS} "
            f"AND ({key}) IN (SELECT * FROM {_unnest(types)})",
            [chain, archived, *_columns(keys, len(types))],
        )


def _add_rollup(
    conn: psycopg.Connection[Any], chain: str, archived: bool, change: Rollup, sign: int = 1
) -> None:
    """Add ``change`` to a chain's rows (``sign=-1``: take it away) under the chain's lock:
    per table, the rows it touches read in one query, summed here, written back in one
    statement; rows left at nothing go."""
    if change.groups:
        summed = Rollup(_group_rows(conn, _ROLLUP_ROWS, (chain, archived), change.groups))
        summed.add(Rollup(change.groups), sign)
        _write_groups(conn, chain, archived, summed.groups)
        gone = [k for k in change.groups if k not in summed.groups]
        _delete_rows(
            conn, "ledger_rollup_groups", _GROUP_KEY, _GROUP_KEY_TYPES, chain, archived, gone
        )
    if change.provider_days:
        _add_days(conn, chain, archived, change.provider_days, sign)


def _add_days(
    conn: psycopg.Connection[Any], chain: str, archived: bool,
    change: Mapping[ProviderDayKey, ProviderDay], sign: int,
) -> None:  # fmt: skip
    """_add_rollup's provider days. A row's windows and histogram are added to as text
    (rollup.add_encoded: a batch touches a few windows of a day), and its masks change only
    at the windows the batch touched, as SQLite's do: a mask changed by hand elsewhere stays
    wrong for verify to find."""
    stored = _day_rows(conn, _ROLLUP_ROWS, (chain, archived), change.keys())
    written, gone = [], []
    for key, day in change.items():
        windows, calls_bits, answered_bits, histogram = stored.get(key, _NO_DAY)
        windows, touched = add_encoded(
            windows,
            encode_windows({i: (sign * n, sign * ok) for i, (n, ok) in day.windows.items()}),
        )
        histogram, _ = add_encoded(
            histogram, encode_histogram({i: sign * n for i, n in day.histogram.items()})
        )
        calls, answered = masks_after(_mask(calls_bits), _mask(answered_bits), touched)
        if windows == "[]" and histogram == "[]":
            gone.append((key.day_ns, key.provider))
        else:
            written.append(
                (key.day_ns, key.provider, windows, _bits(calls), _bits(answered), histogram)
            )
    _write_days(conn, chain, archived, written)
    _delete_rows(
        conn, "ledger_rollup_provider_days", _DAY_KEY, ("bigint", "text"), chain, archived, gone
    )


def _rollup_of_records(
    conn: psycopg.Connection[Any], chain: str, through_seq: int | None = None
) -> Rollup:
    """The rollup of a chain's records (up to ``through_seq``), read in the caller's
    transaction through a server-side cursor: a chain of any size streams."""
    result = Rollup()
    sql = f"SELECT {_FIELD_COLUMNS} FROM ledger_records WHERE chain = %s"
    params: list[Any] = [chain]
    if through_seq is not None:
        sql += " AND seq <= %s"
        params.append(through_seq)
    with conn.cursor(name="tabadol_ledger_rollup") as cursor:
        cursor.execute(sql, params)
        while page := cursor.fetchmany(_PAGE):
            result.add(rollup(LedgerRecord(*row) for row in page))
    return result


def _record_chains(conn: psycopg.Connection[Any]) -> list[str]:
    return [row[0] for row in conn.execute(_distinct_chains("ledger_records", "r"))]


def _edges(start_ns: int, end_ns: int) -> tuple[int, int, str, list[int]]:
    """(a, b, where, params): the range's whole days [a, b), read from rollups, and the SQL
    condition on records for what is left at its edges, read from records."""
    a, b = whole_days(start_ns, end_ns)
    where = "((start_ns >= %s AND start_ns < %s) OR (start_ns >= %s AND start_ns < %s))"
    return a, b, where, [start_ns, a, b, end_ns]


def _has_records_table(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('ledger_records') IS NOT NULL").fetchone()
    return bool(row and row[0])


def _make_schema(conn: psycopg.Connection[Any]) -> None:
    """Make what is missing. A rollup table made on a ledger that holds records (written
    before it) gets those records' rollup in the same transaction: no reader ever sees the
    records without it. A provider day table made where the group rows are confined to
    their nodes (``confine_chains_to_roles``) is confined the same way at once."""
    row = conn.execute(
        "SELECT to_regclass('ledger_records') IS NOT NULL, "
        "to_regclass('ledger_rollup_groups') IS NOT NULL, "
        "to_regclass('ledger_rollup_provider_days') IS NOT NULL, "
        "coalesce((SELECT relrowsecurity FROM pg_class "
        "WHERE oid = to_regclass('ledger_rollup_groups')), false)"
    ).fetchone()
    assert row is not None
    records_were_there, groups_were_there, days_were_there, confined = row
    conn.execute(_SCHEMA)
    _add_columns(conn)
    if records_were_there and not (groups_were_there and days_were_there):
        for chain in _record_chains(conn):
            built = _rollup_of_records(conn, chain)
            if groups_were_there:
                built.groups.clear()
            if days_were_there:
                built.provider_days.clear()
            _write_rollup(conn, chain, False, built)
    if confined and not days_were_there:
        conn.execute(_own_rows("ledger_rollup_provider_days", "chain", _LIVE, remove=True))


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
                    written_before = _has_records_table(conn)
                    self._pool.close()
                    if written_before:
                        raise LedgerWriteError(
                            f"{self.where}: the ledger was written before rollups (or before "
                            "grants or protocols were recorded): run `tabadol ledger init` as "
                            "the tables' owner (it adds them)"
                        )
                    raise LedgerMissing(f"{self.where}: no ledger here (no broker wrote it yet)")
                if missing:  # only then: a role that does not own the tables may write them
                    with conn.transaction():
                        # Any role may hold an advisory lock: wait for it, not for ever.
                        conn.execute("SET LOCAL lock_timeout = '10s'")
                        conn.execute("SELECT pg_advisory_xact_lock(hashtext('tabadol-ledger'))")
                        _make_schema(conn)
        except psycopg.errors.InsufficientPrivilege as e:
            self._pool.close()
            raise LedgerWriteError(
                f"{self.where}: cannot open the ledger: some of its tables or columns are "
                "missing (its rollups, grant or protocol columns, if it was written before "
                "them) and "
                "this role may not make them: "
                "run `tabadol ledger init` (or `tabadol ledger rollup --rebuild`) as the "
                f"tables' owner, which builds the rollups from the records: {self._database.why(e)}"
            ) from e
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
        """Every chain any record, seal or archived prefix names, not only those
        ``ledger_chains`` lists: rows added under a name no node seals must meet verify, not
        slip into the reports. A skip scan of each table's primary key: one probe a chain."""
        rows = self._query(
            f"{_distinct_chains('ledger_records', 'r')} UNION "
            f"{_distinct_chains('ledger_seals', 's')} UNION "
            "SELECT chain FROM ledger_archived ORDER BY 1"
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
        change = rollup(records)  # before the chain's lock: it needs nothing stored
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
                _add_rollup(conn, chain, False, change)
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
        if rows:
            return Seal(*rows[0])
        prefix = self.archived(chain)  # every seal archived: the chain goes on from the last
        return prefix.seal if prefix is not None else None

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

    _AFTER_TIMESTAMPED = (  # archived seals are done with
        "(SELECT coalesce(max(seal_seq), (SELECT seal_seq FROM ledger_archived a "
        "WHERE a.chain = %s), 0) FROM ledger_seal_timestamps WHERE chain = %s)"
    )

    def untimestamped(self, chain: str = "", limit: int = 100) -> list[Seal]:
        rows = self._query(
            f"SELECT {_SEAL_COLUMNS} FROM ledger_seals WHERE chain = %s "
            f"AND seq > {self._AFTER_TIMESTAMPED} ORDER BY seq LIMIT %s",
            (chain, chain, chain, limit),
        )
        return [Seal(*row) for row in rows]

    def untimestamped_count(self, chain: str = "") -> int:
        rows = self._query(
            "SELECT greatest(0, coalesce((SELECT seals FROM ledger_chains WHERE chain = %s), 0) "
            f"- {self._AFTER_TIMESTAMPED})",
            (chain, chain, chain),
        )
        return int(rows[0][0])

    # -- rollups and archives ------------------------------------------------------------

    def rollup_rows(
        self, chain: str = "", *, archived: bool = False, days: tuple[int, int] | None = None
    ) -> Rollup:
        """A chain's rollup rows; with ``days`` (a, b), only those of the days that start in
        [a, b)."""
        try:
            with self._pool.connection() as conn:
                if days is None:
                    return _rollup_rows(conn, _ROLLUP_ROWS, (chain, archived))
                return _rollup_rows(
                    conn,
                    f"{_ROLLUP_ROWS} AND day_ns >= %s AND day_ns < %s",
                    (chain, archived, *days),
                )
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise LedgerWriteError(f"{self.where}: {self._database.why(e)}") from e

    def rebuild_rollup(self, chain: str = "") -> Rollup:
        try:
            with self._pool.connection() as conn, conn.transaction():
                # The chain's lock: no batch of its writers adds to the rows meanwhile.
                conn.execute("SELECT 1 FROM ledger_chains WHERE chain = %s FOR UPDATE", (chain,))
                before = _rollup_rows(conn, _ROLLUP_ROWS, (chain, False))
                for table in _ROLLUP_TABLES:
                    conn.execute(f"DELETE FROM {table} WHERE {_ROLLUP_ROWS}", (chain, False))
                _write_rollup(conn, chain, False, _rollup_of_records(conn, chain))
                return before
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise LedgerWriteError(f"{self.where}: {self._database.why(e)}") from e

    def archived(self, chain: str = "") -> ArchivedPrefix | None:
        rows = self._query(
            f"SELECT {_PREFIX_COLUMNS} FROM ledger_archived WHERE chain = %s", (chain,)
        )
        return _prefix(chain, rows[0]) if rows else None

    def remove_archived(
        self,
        chain: str,
        through: Seal,
        archived_ns: int,
        archive: str,
        sign_with: Callable[[bytes], str],
        signer_pem: bytes,
    ) -> ArchivedPrefix:
        """As the tables' owner (with one role per node, a node's role may not)."""
        name = f"chain {chain!r}" if chain else "the chain"
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT 1 FROM ledger_chains WHERE chain = %s FOR UPDATE", (chain,))
                held = conn.execute(
                    f"SELECT {_SEAL_COLUMNS} FROM ledger_seals WHERE chain = %s AND seq = %s",
                    (chain, through.seq),
                ).fetchone()
                row = conn.execute(
                    f"SELECT {_PREFIX_COLUMNS} FROM ledger_archived WHERE chain = %s", (chain,)
                ).fetchone()
                previous = _prefix(chain, row) if row is not None else None
                if previous is not None and through.seq <= previous.seal.seq:
                    raise LedgerWriteError(
                        f"{self.where}: {name} was archived through seal {previous.seal.seq} "
                        f"already: seal {through.seq} is not after it"
                    )
                if held is None or Seal(*held) != through:
                    raise LedgerWriteError(
                        f"{self.where}: {name} holds no seal {through.seq} as the archive "
                        f"{archive!r} names it: nothing removed"
                    )
                archived_rows = _rollup_rows(conn, _ROLLUP_ROWS, (chain, True))
                if why := archived_rows_problem(previous, archived_rows):
                    raise LedgerWriteError(f"{self.where}: {name}: {why}")
                change = _rollup_of_records(conn, chain, through.count)
                for table, column, last in (
                    ("ledger_records", "seq", through.count),
                    ("ledger_seals", "seq", through.seq),
                    ("ledger_seal_timestamps", "seal_seq", through.seq),
                ):
                    conn.execute(
                        f"DELETE FROM {table} WHERE chain = %s AND {column} <= %s", (chain, last)
                    )
                _add_rollup(conn, chain, False, change, -1)
                _add_rollup(conn, chain, True, change)
                prefix = signed_prefix(
                    chain, through, archived_ns, archive,
                    _rollup_rows(conn, _ROLLUP_ROWS, (chain, True)), sign_with, signer_pem,
                )  # fmt: skip
                conn.execute(
                    "INSERT INTO ledger_archived VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (chain) DO UPDATE SET seal_seq = EXCLUDED.seal_seq, "
                    "seal_count = EXCLUDED.seal_count, head_digest = EXCLUDED.head_digest, "
                    "sealed_ns = EXCLUDED.sealed_ns, signer = EXCLUDED.signer, "
                    "signature = EXCLUDED.signature, archived_ns = EXCLUDED.archived_ns, "
                    "archive = EXCLUDED.archive, rollup_sha256 = EXCLUDED.rollup_sha256, "
                    "statement_signature = EXCLUDED.statement_signature, "
                    "certificate_pem = EXCLUDED.certificate_pem",
                    (chain, through.seq, through.count, through.head_digest, through.sealed_ns,
                     through.signer, through.signature, archived_ns, archive,
                     prefix.rollup_sha256, prefix.signature, signer_pem),
                )  # fmt: skip
                return prefix
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            raise LedgerWriteError(f"{self.where}: {self._database.why(e)}") from e

    # -- queries: rollups for whole days, records at the edges ------------------------------

    def records_count(self) -> int:
        """Records the live store holds (archived ones are gone from it)."""
        rows = self._query(
            "SELECT coalesce(sum(count), 0) - coalesce((SELECT sum(seal_count) "
            "FROM ledger_archived), 0) FROM ledger_chains"
        )
        return int(rows[0][0])

    def call_groups(self, start_ns: int, end_ns: int) -> list[CallGroup]:
        a, b, edges, params = _edges(start_ns, end_ns)
        rows = self._query(
            f"""
            SELECT consumer, provider, service, method, status_code, forwarded, sum(calls),
                   sum(duration_ns), verified, "grant", protocol FROM (
                SELECT consumer, provider, service, method, status_code, forwarded, calls,
                       duration_ns, verified, "grant", protocol
                FROM ledger_rollup_groups WHERE day_ns >= %s AND day_ns < %s
                UNION ALL
                SELECT consumer, provider, service, method, status_code, endpoint <> '',
                       count(*), sum(end_ns - start_ns), consumer_verified, "grant", protocol
                FROM ledger_records WHERE {edges} GROUP BY 1, 2, 3, 4, 5, 6, 9, 10, 11
            ) rows GROUP BY 1, 2, 3, 4, 5, 6, 9, 10, 11 ORDER BY 1, 2, 3, 4, 5, 6, 9, 10, 11
            """,
            [a, b, *params],
        )
        return [
            CallGroup(c, p, s, m, code, fwd, int(n), int(d), v, g, pr)
            for c, p, s, m, code, fwd, n, d, v, g, pr in rows
        ]

    def _histograms(
        self, start_ns: int, end_ns: int, column: str, rows: str, records: str,
        params: Sequence[Any],
    ) -> dict[Any, Histogram]:  # fmt: skip
        """Per value of ``column``: the duration histogram of the calls that ``rows`` (a
        condition on call groups) and ``records`` (one on records) select, with ``params``
        for each. PostgreSQL sums the groups' bins (many small histograms: faster there than
        decoded here); records at the edges are binned here."""
        a, b, edges, edge_params = _edges(start_ns, end_ns)
        result: dict[Any, Histogram] = {}
        for key, index, calls in self._query(
            f"""
            SELECT {column}, (bin->>0)::bigint, sum((bin->>1)::bigint)
            FROM ledger_rollup_groups, jsonb_array_elements(histogram::jsonb) AS bin
            WHERE day_ns >= %s AND day_ns < %s AND {rows} GROUP BY 1, 2
            """,
            [a, b, *params],
        ):
            add_histogram(result.setdefault(key, {}), {index: int(calls)})
        for key, duration, calls in self._query(
            f"SELECT {column}, end_ns - start_ns, count(*) FROM ledger_records "
            f"WHERE {edges} AND {records} GROUP BY 1, 2",
            [*edge_params, *params],
        ):
            add_histogram(result.setdefault(key, {}), {bin_of(duration): calls})
        return result

    def answered_histograms(self, start_ns: int, end_ns: int) -> dict[str, Histogram]:
        """The provider days' histograms read and summed here: a few large rows, which
        decode faster here than PostgreSQL expands them as jsonb (docs/performance.md)."""
        a, b, edges, params = _edges(start_ns, end_ns)
        found: dict[str, Histogram] = {}
        for provider, text in self._query(
            "SELECT provider, histogram FROM ledger_rollup_provider_days "
            "WHERE day_ns >= %s AND day_ns < %s",
            [a, b],
        ):
            add_histogram(found.setdefault(provider, {}), decode_histogram(text))
        for provider, duration, calls in self._query(
            "SELECT provider, end_ns - start_ns, count(*) FROM ledger_records "
            f"WHERE {edges} AND endpoint <> '' AND status_code <> {UNAVAILABLE} GROUP BY 1, 2",
            params,
        ):
            add_histogram(found.setdefault(provider, {}), {bin_of(duration): calls})
        return {provider: histogram for provider, histogram in found.items() if histogram}

    def count_between(self, start_ns: int, end_ns: int) -> int:
        a, b, edges, params = _edges(start_ns, end_ns)
        rows = self._query(
            "SELECT (SELECT coalesce(sum(calls), 0) FROM ledger_rollup_groups "
            "WHERE day_ns >= %s AND day_ns < %s) "
            f"+ (SELECT count(*) FROM ledger_records WHERE {edges})",
            [a, b, *params],
        )
        return int(rows[0][0])

    def latency_percentiles(
        self,
        start_ns: int,
        end_ns: int,
        percents: Sequence[int],
        consumers: Sequence[str] | None = None,
    ) -> dict[str, tuple[int, dict[int, int]]]:
        """As the other stores': nearest rank, read from the merged histograms."""
        rows, records, params = "verified", "consumer_verified", []
        if consumers is not None:
            rows += " AND consumer = ANY(%s)"
            records += " AND consumer = ANY(%s)"
            params.append(["", *consumers])
        per_service = self._histograms(start_ns, end_ns, "service", rows, records, params)
        return {
            service: (sum(histogram.values()), percentiles(histogram, percents))
            for service, histogram in sorted(per_service.items())
        }

    def provider_windows(
        self, start_ns: int, end_ns: int, window_ns: int
    ) -> dict[str, tuple[int, int]]:
        """Windows aligned to the epoch, WINDOW_NS wide (the rollups' only width)."""
        if window_ns != WINDOW_NS:
            raise ValueError(
                f"availability windows are the rollups' {WINDOW_NS // 10**9} s ones, "
                f"not {window_ns} ns (tabadol.ledger.rollup.WINDOW_NS)"
            )
        a, b, edges, params = _edges(start_ns, end_ns)
        found: dict[str, tuple[int, int]] = {}
        # Whole days: each (provider, day)'s masks ORed over every chain, live and archived
        # (a window with calls on one node and its answer on another is answered once).
        for provider, windows, answered in self._query(
            """
            SELECT provider, sum(bit_count(calls)), sum(bit_count(answered)) FROM (
                SELECT provider, bit_or(calls_mask) AS calls, bit_or(answered_mask) AS answered
                FROM ledger_rollup_provider_days WHERE day_ns >= %s AND day_ns < %s
                GROUP BY provider, day_ns
            ) days GROUP BY 1 HAVING sum(bit_count(calls)) > 0
            """,
            [a, b],
        ):
            found[provider] = (int(windows), int(answered))
        # The edges' windows, from records: of other days than the rows', so they add.
        w = WINDOW_NS
        for provider, windows, answered in self._query(
            f"""
            SELECT provider, count(*), count(*) FILTER (WHERE answered) FROM (
                SELECT provider, bool_or(status_code <> {UNAVAILABLE}) AS answered
                FROM ledger_records WHERE endpoint <> '' AND {edges}
                GROUP BY provider, start_ns - ((start_ns %% {w}) + {w}) %% {w}
            ) windows GROUP BY 1
            """,
            params,
        ):
            before = found.get(provider, (0, 0))
            found[provider] = (before[0] + int(windows), before[1] + int(answered))
        return found
