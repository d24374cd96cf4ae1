"""The registry on PostgreSQL (psycopg 3): a ``registry_versions`` table whose rows are never
updated or deleted (a trigger refuses it), and ``registry_crls``, the CRLs published.

Each commit takes a transaction-level advisory lock, so versions are numbered one after
another whoever commits, and NOTIFY ``tabadol_registry`` in the same transaction: nodes
hear of a version only once it is there to read.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from tabadol.database import Database
from tabadol.registry.entries import Entries
from tabadol.registry.store.base import (
    Announcement,
    RegistryHead,
    RegistryRefused,
    RegistryUnavailable,
    RegistryVersion,
    StoredCrl,
)

REGISTRY_CHANNEL = "tabadol_registry"
CRL_CHANNEL = "tabadol_crl"
_LOCK = 0x7461626164_01  # pg_advisory_xact_lock key: "tabad" + 1
_TIMEOUTS: dict[str, Any] = {"connect_timeout": 3, "tcp_user_timeout": 5000}

_SCHEMA = f"""
SELECT pg_advisory_xact_lock({_LOCK});
CREATE TABLE IF NOT EXISTS registry_versions (
    version     bigint PRIMARY KEY CHECK (version > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    reason      text NOT NULL,
    entries     jsonb NOT NULL,
    digest      text NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_crls (
    number       numeric PRIMARY KEY,
    der          bytea NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    published_by text NOT NULL
);
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
"""


class PostgresRegistryStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._database = Database(url)
        self.where = self._database.where
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._lock = threading.Lock()  # one statement at a time on the one connection
        self._ready = False  # the tables are there (made on first use: a node may start
        # while the database is down)

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """The connection (made again if it was lost); RegistryUnavailable if it cannot be."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = psycopg.connect(self.url, autocommit=True, **_TIMEOUTS)
                if not self._ready:
                    found = self._conn.execute("SELECT to_regclass('registry_crls')").fetchone()
                    if not (found and found[0]):
                        with self._conn.transaction():
                            self._conn.execute(_SCHEMA)
                    self._ready = True
                yield self._conn
            except psycopg.OperationalError as e:
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
                raise RegistryUnavailable(
                    f"registry database {self.where} is unreachable: {self._database.why(e)}"
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

    def history(self) -> list[RegistryVersion]:
        with self._session() as conn:
            rows = conn.execute(f"{_SELECT} ORDER BY version").fetchall()
        return [_version(row) for row in rows]

    def _one(self, where: str, args: tuple[Any, ...]) -> RegistryVersion | None:
        with self._session() as conn:
            row = conn.execute(f"{_SELECT} {where}", args).fetchone()
        return _version(row) if row else None

    def commit(self, entries: Entries, by: str, reason: str, digest: str) -> RegistryVersion:
        with self._session() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            row = conn.execute(
                "INSERT INTO registry_versions (version, created_by, reason, entries, digest) "
                "SELECT coalesce(max(version), 0) + 1, %s, %s, %s, %s FROM registry_versions "
                "RETURNING version, created_at, created_by, reason, entries, digest",
                (by, reason, Jsonb(entries), digest),
            ).fetchone()
            assert row is not None
            conn.execute("SELECT pg_notify(%s, %s)", (REGISTRY_CHANNEL, str(row[0])))
        return _version(row)

    def crl(self) -> StoredCrl | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT number, der, published_at, published_by FROM registry_crls "
                "ORDER BY number DESC LIMIT 1"
            ).fetchone()
        return StoredCrl(int(row[0]), bytes(row[1]), row[2], row[3]) if row else None

    def publish_crl(self, der: bytes, number: int, by: str) -> StoredCrl:
        with self._session() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            held = conn.execute("SELECT max(number) FROM registry_crls").fetchone()
            if held and held[0] is not None and number <= int(held[0]):
                raise RegistryRefused(
                    f"{self.where}: the registry holds CRL number {int(held[0])}; number "
                    f"{number} is not newer (a CRL only moves forward)"
                )
            row = conn.execute(
                "INSERT INTO registry_crls (number, der, published_by) VALUES (%s, %s, %s) "
                "RETURNING published_at",
                (number, der, by),
            ).fetchone()
            assert row is not None
            conn.execute("SELECT pg_notify(%s, %s)", (CRL_CHANNEL, str(number)))
        return StoredCrl(number, der, row[0], by)

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


_SELECT = "SELECT version, created_at, created_by, reason, entries, digest FROM registry_versions"


def _version(row: tuple[Any, ...]) -> RegistryVersion:
    number, created_at, created_by, reason, entries, digest = row
    created = created_at if isinstance(created_at, dt.datetime) else dt.datetime.now(dt.UTC)
    return RegistryVersion(number, created, created_by, reason, entries, digest)
