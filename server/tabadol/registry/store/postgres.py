"""The registry on PostgreSQL (psycopg 3): a ``registry_versions`` table whose rows are never
updated or deleted (a trigger refuses it), and ``registry_crls``, the CRLs published.

Each change locks the one row of ``registry_lock`` (``FOR UPDATE``, which needs the UPDATE
privilege there: a role that may only read cannot hold changes up, as it could an advisory
key), waiting at most ``lock_timeout_s``, so versions are numbered one after another
whoever commits; and it sends NOTIFY in the same transaction: nodes hear of a version only
once it is there to read.

Each version carries its link of the audit chain (``version_chain``), computed in the commit's
transaction from the newest row's. A database made before the chain gets the ``chain``
column on first use by a role that owns the table; its older rows have none, and the chain
starts at the first version committed after.
"""

from __future__ import annotations

import datetime as dt
import decimal
import threading
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from tabadol.database import Database
from tabadol.registry.entries import Entries
from tabadol.registry.store.base import (
    LOCK_TIMEOUT_S,
    MAX_CRL_BYTES,
    Announcement,
    CrlTrusted,
    RegistryBusy,
    RegistryHead,
    RegistryRefused,
    RegistryUnavailable,
    RegistryVersion,
    StoredCrl,
    crl_refused,
    next_chain,
    number_refused,
)

REGISTRY_CHANNEL = "tabadol_registry"
CRL_CHANNEL = "tabadol_crl"
_LOCK = 0x7461626164_01  # pg_advisory_xact_lock key: "tabad" + 1 (creating the tables only)
_TIMEOUTS: dict[str, Any] = {"connect_timeout": 3, "tcp_user_timeout": 5000}
STATEMENT_TIMEOUT_S = 30.0  # and for any one statement a change runs

_SCHEMA = f"""
SELECT pg_advisory_xact_lock({_LOCK});
CREATE TABLE IF NOT EXISTS registry_versions (
    version     bigint PRIMARY KEY CHECK (version > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    reason      text NOT NULL,
    entries     jsonb NOT NULL,
    digest      text NOT NULL,
    chain       text
);
CREATE TABLE IF NOT EXISTS registry_crls (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    number       numeric NOT NULL,
    der          bytea NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    published_by text NOT NULL
);
CREATE INDEX IF NOT EXISTS registry_crls_newest ON registry_crls (number DESC, id DESC);
CREATE TABLE IF NOT EXISTS registry_lock (
    id integer PRIMARY KEY CHECK (id = 1)
);
INSERT INTO registry_lock (id) VALUES (1) ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION tabadol_registry_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'tabadol registry: % on % refused: versions and CRLs are never changed, '
        'only added', TG_OP, TG_TABLE_NAME;
END $$;
CREATE OR REPLACE TRIGGER registry_versions_immutable
    BEFORE UPDATE OR DELETE ON registry_versions
    FOR EACH ROW EXECUTE FUNCTION tabadol_registry_immutable();
CREATE OR REPLACE TRIGGER registry_versions_no_truncate
    BEFORE TRUNCATE ON registry_versions
    FOR EACH STATEMENT EXECUTE FUNCTION tabadol_registry_immutable();
CREATE OR REPLACE TRIGGER registry_crls_immutable
    BEFORE UPDATE OR DELETE ON registry_crls
    FOR EACH ROW EXECUTE FUNCTION tabadol_registry_immutable();
CREATE OR REPLACE TRIGGER registry_lock_immutable
    BEFORE UPDATE OR DELETE ON registry_lock
    FOR EACH ROW EXECUTE FUNCTION tabadol_registry_immutable();
CREATE OR REPLACE TRIGGER registry_lock_no_truncate
    BEFORE TRUNCATE ON registry_lock
    FOR EACH STATEMENT EXECUTE FUNCTION tabadol_registry_immutable();
"""


class PostgresRegistryStore:
    def __init__(self, url: str, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.url = url
        self.lock_timeout_s = lock_timeout_s
        self._database = Database(url)
        self.where = self._database.where
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._lock = threading.Lock()  # one statement at a time on the one connection
        self._ready = False  # the tables are there (made on first use: a node may start
        # while the database is down)
        self._chained = True  # registry_versions has its chain column

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """The connection (made again if it was lost); RegistryUnavailable if it cannot be."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = psycopg.connect(self.url, autocommit=True, **_TIMEOUTS)
                if not self._ready:
                    found = self._conn.execute("SELECT to_regclass('registry_lock')").fetchone()
                    if not (found and found[0]):
                        self._create_tables(self._conn)
                    self._chained = self._chain_column(self._conn)
                    self._ready = True
                yield self._conn
            except psycopg.OperationalError as e:
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
                raise RegistryUnavailable(
                    f"registry database {self.where} is unreachable: {self._database.why(e)}"
                ) from None

    def _create_tables(self, conn: psycopg.Connection[TupleRow]) -> None:
        try:
            with conn.transaction():
                self._bound(conn)
                conn.execute(_SCHEMA)
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            raise RegistryBusy(
                f"registry database {self.where}: cannot create the registry tables: another "
                f"session held their lock for more than {self.lock_timeout_s:g} s; try again"
            ) from None

    def _chain_column(self, conn: psycopg.Connection[TupleRow]) -> bool:
        """Whether registry_versions has its chain column, adding it to a table made before
        the audit chain when this role owns it; a role that does not reads the old rows."""
        found = conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('registry_versions') "
            "AND attname = 'chain' AND NOT attisdropped"
        ).fetchone()
        if found is not None:
            return True
        try:
            with conn.transaction():
                self._bound(conn)
                conn.execute("ALTER TABLE registry_versions ADD COLUMN IF NOT EXISTS chain text")
        except psycopg.errors.InsufficientPrivilege:
            return False
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            raise RegistryBusy(
                f"registry database {self.where}: cannot add the audit chain's column to "
                f"registry_versions: another session held the table for more than "
                f"{self.lock_timeout_s:g} s; try again"
            ) from None
        return True

    def _bound(self, conn: psycopg.Connection[TupleRow]) -> None:
        """Within a transaction: wait for no lock, nor any statement, for ever."""
        conn.execute(
            "SELECT set_config('lock_timeout', %s, true), "
            "set_config('statement_timeout', %s, true)",
            (f"{round(self.lock_timeout_s * 1000)}ms", f"{round(STATEMENT_TIMEOUT_S * 1000)}ms"),
        )

    @contextmanager
    def _changing(self, what: str) -> Iterator[psycopg.Connection[TupleRow]]:
        """One transaction holding the registry's lock; RegistryBusy when another change
        holds it too long (nothing is changed then)."""
        with self._session() as conn:
            try:
                with conn.transaction():
                    self._bound(conn)
                    locked = conn.execute(
                        "SELECT id FROM registry_lock WHERE id = 1 FOR UPDATE"
                    ).fetchone()
                    if locked is None:
                        raise RegistryRefused(
                            f"registry database {self.where}: the registry_lock table has lost "
                            "its row, so changes cannot be serialised; as the tables' owner: "
                            "INSERT INTO registry_lock VALUES (1)"
                        )
                    yield conn
            except psycopg.errors.LockNotAvailable:
                raise RegistryBusy(
                    f"registry database {self.where}: cannot {what}: another change held the "
                    f"registry lock for more than {self.lock_timeout_s:g} s; nothing was "
                    "changed: try again (if it persists, look for a session holding "
                    "registry_lock in pg_locks)"
                ) from None
            except psycopg.errors.QueryCanceled:
                raise RegistryBusy(
                    f"registry database {self.where}: cannot {what}: a statement took more "
                    f"than {STATEMENT_TIMEOUT_S:g} s; nothing was changed: try again"
                ) from None

    def head(self) -> RegistryHead | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT version, digest FROM registry_versions ORDER BY version DESC LIMIT 1"
            ).fetchone()
        return RegistryHead(row[0], row[1]) if row else None

    def current(self) -> RegistryVersion | None:
        return self._one("ORDER BY version DESC LIMIT 1", ())

    def version(self, number: int) -> RegistryVersion | None:
        return self._one("WHERE version = %s", (number,))

    def history(self, after: int = 0, limit: int | None = None) -> list[RegistryVersion]:
        with self._session() as conn:
            rows = conn.execute(
                f"{self._select()} WHERE version > %s ORDER BY version LIMIT %s", (after, limit)
            ).fetchall()
        return [_version(row) for row in rows]

    def _one(self, where: str, args: tuple[Any, ...]) -> RegistryVersion | None:
        with self._session() as conn:
            row = conn.execute(f"{self._select()} {where}", args).fetchone()
        return _version(row) if row else None

    def _select(self) -> str:
        return _SELECT.format(chain="chain" if self._chained else "NULL::text")

    def commit(
        self, entries: Entries, by: str, reason: str, digest: str, number: int | None = None
    ) -> RegistryVersion:
        with self._changing("commit a registry version") as conn:
            if not self._chained:
                raise RegistryRefused(
                    f"registry database {self.where}: registry_versions was made before the "
                    "audit chain and lacks its column, which only the table's owner can add: "
                    "run any `tabadol registry` command once as the owner (or, as the owner: "
                    "ALTER TABLE registry_versions ADD COLUMN chain text)"
                )
            newest_row = conn.execute(
                "SELECT version, chain FROM registry_versions ORDER BY version DESC LIMIT 1"
            ).fetchone()
            newest = int(newest_row[0]) if newest_row is not None else 0
            refused = number_refused(self.where, number, newest)
            if refused is not None:
                raise RegistryRefused(refused)
            chosen = number if number is not None else newest + 1
            # The chain covers the stored time: set here (timestamptz keeps microseconds).
            now = dt.datetime.now(dt.UTC)
            previous = newest_row[1] if newest_row is not None else None
            chain = next_chain(self.where, newest, previous, chosen, now, by, reason, digest)
            row = conn.execute(
                "INSERT INTO registry_versions "
                "(version, created_at, created_by, reason, entries, digest, chain) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "RETURNING version, created_at, created_by, reason, entries, digest, chain",
                (chosen, now, by, reason, Jsonb(entries), digest, chain),
            ).fetchone()
            assert row is not None
            conn.execute("SELECT pg_notify(%s, %s)", (REGISTRY_CHANNEL, str(row[0])))
        return _version(row)

    def crls(self, above: int | None = None, skip: Collection[int] = ()) -> list[StoredCrl]:
        with self._session() as conn:
            rows = conn.execute(
                f"{_SELECT_CRLS} WHERE (%s::numeric IS NULL OR number > %s::numeric) "
                f"AND {_CAN_BE_CRL} AND NOT (id = ANY(%s::bigint[])) "
                "ORDER BY number DESC, id DESC",
                (above, above, sorted(skip)),
            ).fetchall()
        return [c for c in map(_crl, rows) if c is not None]

    def publish_crl(self, der: bytes, number: int, by: str, trusted: CrlTrusted) -> StoredCrl:
        with self._changing("publish a CRL") as conn:
            rows = conn.execute(
                f"{_SELECT_CRLS} WHERE number >= %s AND {_CAN_BE_CRL} "
                "ORDER BY number DESC, id DESC",
                (number,),
            ).fetchall()
            held = next((c for c in map(_crl, rows) if c is not None and trusted(c)), None)
            if held is not None:
                raise RegistryRefused(crl_refused(self.where, held.number, number))
            row = conn.execute(
                "INSERT INTO registry_crls (number, der, published_by) VALUES (%s, %s, %s) "
                "RETURNING published_at, id",
                (number, der, by),
            ).fetchone()
            assert row is not None
            conn.execute("SELECT pg_notify(%s, %s)", (CRL_CHANNEL, str(number)))
        return StoredCrl(number, der, row[0], by, row[1])

    async def announcements(self) -> AsyncIterator[Announcement]:
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **_TIMEOUTS)
        except psycopg.OperationalError as e:
            raise RegistryUnavailable(
                f"registry database {self.where} is unreachable: {self._database.why(e)}"
            ) from None
        try:
            await conn.execute(f"LISTEN {REGISTRY_CHANNEL}")
            await conn.execute(f"LISTEN {CRL_CHANNEL}")
            async for notify in conn.notifies():
                number = int(notify.payload) if notify.payload.isdigit() else 0
                if notify.channel == REGISTRY_CHANNEL:
                    yield Announcement("registry", number)
                else:
                    yield Announcement("crl", number)
        except psycopg.OperationalError as e:
            raise RegistryUnavailable(
                f"registry database {self.where}: lost the LISTEN connection: {self._database.why(e)}"
            ) from None
        finally:
            await conn.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_SELECT = (
    "SELECT version, created_at, created_by, reason, entries, digest, {chain} "
    "FROM registry_versions"
)
_SELECT_CRLS = "SELECT number, der, published_at, published_by, id FROM registry_crls"
# A row no CRL of the exchange can be is never read: too large, or a number that is not a
# whole one below 2**160 (RFC 5280: at most 20 octets; NaN and infinities compare above all).
_CAN_BE_CRL = (
    f"octet_length(der) <= {MAX_CRL_BYTES} AND number < 1e49 AND number > -1e49 "
    "AND number = trunc(number)"
)


def _crl(row: tuple[Any, ...]) -> StoredCrl | None:
    """A CRL row; None for a number no CRL can have (NaN, infinite, fractional)."""
    number, der, published_at, published_by, row_id = row
    if not isinstance(number, decimal.Decimal) or not number.is_finite() or number % 1 != 0:
        return None
    return StoredCrl(int(number), bytes(der), published_at, str(published_by), int(row_id))


def _version(row: tuple[Any, ...]) -> RegistryVersion:
    number, created_at, created_by, reason, entries, digest, chain = row
    created = created_at if isinstance(created_at, dt.datetime) else dt.datetime.now(dt.UTC)
    return RegistryVersion(number, created, created_by, reason, entries, digest, chain or "")
