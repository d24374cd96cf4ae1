"""The registry in one SQLite file (WAL mode): the embedded default, for an exchange whose
broker runs on one node. Its tables mirror PostgreSQL's: ``registry_versions``, whose rows
triggers keep from being updated or deleted, and ``registry_crls``.

Each change is one ``BEGIN IMMEDIATE`` transaction, so the processes that share the file
(the broker, ``tabadol registry``, the ops console) number versions one after another. SQLite
has no NOTIFY: a commit is announced to the listeners in the same process only, and the
broker polls every ``poll_seconds`` for the rest.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

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

# In the file's header: what tells a Tabadol registry from any other SQLite database.
APPLICATION_ID = int.from_bytes(b"TBDR", "big")
SCHEMA_VERSION = 1  # PRAGMA user_version
_CRL_DIGITS = 49  # a CRL number is below 2**160 < 10**49: kept zero-padded, ordered as text
_PRIVATE = 0o600
_NEVER = "versions and CRLs are never changed, only added"

_SCHEMA = (
    """CREATE TABLE registry_versions (
        version    INTEGER PRIMARY KEY CHECK (version > 0),
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        reason     TEXT NOT NULL,
        entries    TEXT NOT NULL,
        digest     TEXT NOT NULL,
        chain      TEXT NOT NULL
    )""",
    """CREATE TABLE registry_crls (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        number       TEXT NOT NULL,
        der          BLOB NOT NULL,
        published_at TEXT NOT NULL,
        published_by TEXT NOT NULL
    )""",
    "CREATE INDEX registry_crls_newest ON registry_crls (number DESC, id DESC)",
    *(
        f"""CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table}
        BEGIN
            SELECT RAISE(ABORT, 'tabadol registry: {op} on {table} refused: {_NEVER}');
        END"""
        for table in ("registry_versions", "registry_crls")
        for op in ("UPDATE", "DELETE")
    ),
)
_COLUMNS = "version, created_at, created_by, reason, entries, digest, chain"
_SELECT = f"SELECT {_COLUMNS} FROM registry_versions"
_SELECT_CRLS = "SELECT number, der, published_at, published_by, id FROM registry_crls"
# A row no CRL of the exchange can be is never read (one written by hand, say).
_CAN_BE_CRL = (
    f"typeof(number) = 'text' AND length(number) = {_CRL_DIGITS} "
    "AND number NOT GLOB '*[^0-9]*' "
    f"AND typeof(der) = 'blob' AND length(der) <= {MAX_CRL_BYTES}"
)

# The listeners in this process, by file: a commit here is heard at once.
_Listener = tuple[asyncio.AbstractEventLoop, asyncio.Queue[Announcement]]
_LISTENERS: dict[str, set[_Listener]] = {}
_LISTENERS_LOCK = threading.Lock()


class SqliteRegistryStore:
    """A Registry in one SQLite file, made (mode 0600) on first use."""

    def __init__(self, path: Path, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.path = path.absolute()
        self.where = str(self.path)
        self.lock_timeout_s = lock_timeout_s
        self._key = os.path.realpath(self.path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one statement at a time on the one connection

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """The connection, opened on first use; RegistryUnavailable naming the file if the
        file cannot be opened or read."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._open()
                yield self._conn
            except sqlite3.Error as e:
                raise RegistryUnavailable(f"registry database {self.where}: {e}") from None

    def _open(self) -> sqlite3.Connection:
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # The exchange's grants: 0600, before SQLite creates the file (its -wal and -shm
            # files take the database file's mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, _PRIVATE))
        except OSError as e:
            raise RegistryUnavailable(
                f"registry database {self.where}: cannot open or create it: "
                f"{e.strerror or e} (the user running Tabadol needs to write {directory})"
            ) from None
        if not os.access(directory, os.W_OK):
            raise RegistryUnavailable(
                f"registry database {self.where}: its directory {directory} is not writable "
                "by the user running Tabadol, and SQLite keeps its -wal and -shm files there"
            )
        conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=self.lock_timeout_s
        )
        try:
            try:
                application = conn.execute("PRAGMA application_id").fetchone()[0]
            except sqlite3.DatabaseError as e:
                raise RegistryUnavailable(
                    f"registry database {self.where} is not a SQLite database ({e}): "
                    "[registry] url must name the registry's file, or a file that does not "
                    "exist yet"
                ) from None
            if application != APPLICATION_ID:
                self._refuse_foreign(conn, application)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # a committed version is on disk
            self._create_tables(conn)
            schema = conn.execute("PRAGMA user_version").fetchone()[0]
            if schema > SCHEMA_VERSION:
                raise RegistryUnavailable(
                    f"registry database {self.where} was written by a newer Tabadol (schema "
                    f"{schema}; this one knows {SCHEMA_VERSION}): upgrade this one"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _refuse_foreign(self, conn: sqlite3.Connection, application: int) -> None:
        """Refuse a database that is not a Tabadol registry; an empty one becomes one."""
        if application != 0:
            raise RegistryUnavailable(
                f"registry database {self.where} is the SQLite database of another "
                f"application (application_id {application:#x}), not a Tabadol registry"
            )
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name LIMIT 6"
            )
        ]
        if tables:
            listed = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise RegistryUnavailable(
                f"registry database {self.where} is a SQLite database of something else "
                f"(its tables: {listed}), not a Tabadol registry: [registry] url must name "
                "the registry's file, or a file that does not exist yet"
            )

    def _create_tables(self, conn: sqlite3.Connection) -> None:
        """The tables, made once: whoever takes the write lock first makes them."""
        if conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
            return
        with self._transaction(conn, "create the registry tables"):
            application = conn.execute("PRAGMA application_id").fetchone()[0]
            if application == APPLICATION_ID:
                return  # another process made them while this one waited
            self._refuse_foreign(conn, application)
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection, what: str) -> Iterator[None]:
        """One write transaction; RegistryBusy when another holds the lock too long."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF in (
                sqlite3.SQLITE_BUSY,
                sqlite3.SQLITE_LOCKED,
            ):
                raise RegistryBusy(
                    f"registry database {self.where}: cannot {what}: another change held the "
                    f"registry's write lock for more than {self.lock_timeout_s:g} s; nothing "
                    "was changed: try again"
                ) from None
            raise
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a COMMIT that failed (disk full) too: the next may go
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _changing(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._session() as conn, self._transaction(conn, what):
            yield conn

    def head(self) -> RegistryHead | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT version, digest FROM registry_versions ORDER BY version DESC LIMIT 1"
            ).fetchone()
        return RegistryHead(int(row[0]), str(row[1])) if row else None

    def current(self) -> RegistryVersion | None:
        return self._one("ORDER BY version DESC LIMIT 1", ())

    def version(self, number: int) -> RegistryVersion | None:
        return self._one("WHERE version = ?", (number,))

    def history(self, after: int = 0, limit: int | None = None) -> list[RegistryVersion]:
        with self._session() as conn:
            rows = conn.execute(
                f"{_SELECT} WHERE version > ? ORDER BY version LIMIT ?",
                (after, -1 if limit is None else limit),
            ).fetchall()
        return [_version(row) for row in rows]

    def _one(self, where: str, args: tuple[Any, ...]) -> RegistryVersion | None:
        with self._session() as conn:
            row = conn.execute(f"{_SELECT} {where}", args).fetchone()
        return _version(row) if row else None

    def commit(
        self, entries: Entries, by: str, reason: str, digest: str, number: int | None = None
    ) -> RegistryVersion:
        with self._changing("commit a registry version") as conn:
            newest_row = conn.execute(
                "SELECT version, chain FROM registry_versions ORDER BY version DESC LIMIT 1"
            ).fetchone()
            newest = int(newest_row[0]) if newest_row is not None else 0
            refused = number_refused(self.where, number, newest)
            if refused is not None:
                raise RegistryRefused(refused)
            chosen = number if number is not None else newest + 1
            now = dt.datetime.now(dt.UTC)
            previous = str(newest_row[1]) if newest_row is not None else None
            chain = next_chain(self.where, newest, previous, chosen, now, by, reason, digest)
            conn.execute(
                f"INSERT INTO registry_versions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (chosen, _iso(now), by, reason, _json(entries), digest, chain),
            )
        self._announce(Announcement("registry", chosen))
        return RegistryVersion(chosen, now, by, reason, entries, digest, chain)

    def crls(self, above: int | None = None, skip: Collection[int] = ()) -> list[StoredCrl]:
        skipped = sorted(skip)
        with self._session() as conn:
            rows = conn.execute(
                f"{_SELECT_CRLS} WHERE {_CAN_BE_CRL} AND number > ? "
                f"AND id NOT IN ({', '.join('?' * len(skipped))}) "
                "ORDER BY number DESC, id DESC",
                (_padded(above) if above is not None and above >= 0 else "", *skipped),
            ).fetchall()
        return [_crl(row) for row in rows]

    def publish_crl(self, der: bytes, number: int, by: str, trusted: CrlTrusted) -> StoredCrl:
        if not 0 <= number < 10**_CRL_DIGITS:
            raise RegistryRefused(
                f"{self.where}: CRL number {number} cannot be stored: a CRL number is a whole "
                f"number from 0 to below 10^{_CRL_DIGITS}"
            )
        with self._changing("publish a CRL") as conn:
            rows = conn.execute(
                f"{_SELECT_CRLS} WHERE {_CAN_BE_CRL} AND number >= ? ORDER BY number DESC, id DESC",
                (_padded(number),),
            ).fetchall()
            held = next((c for c in map(_crl, rows) if trusted(c)), None)
            if held is not None:
                raise RegistryRefused(crl_refused(self.where, held.number, number))
            now = dt.datetime.now(dt.UTC)
            added = conn.execute(
                "INSERT INTO registry_crls (number, der, published_at, published_by) "
                "VALUES (?, ?, ?, ?)",
                (_padded(number), der, _iso(now), by),
            )
            row_id = added.lastrowid
        assert row_id is not None
        self._announce(Announcement("crl", number))
        return StoredCrl(number, der, now, by, row_id)

    def _announce(self, announcement: Announcement) -> None:
        with _LISTENERS_LOCK:
            listeners = list(_LISTENERS.get(self._key, ()))
        for loop, queue in listeners:
            loop.call_soon_threadsafe(queue.put_nowait, announcement)

    async def announcements(self) -> AsyncIterator[Announcement]:
        """The commits made in this process; another process's are found by polling."""
        listener: _Listener = (asyncio.get_running_loop(), asyncio.Queue[Announcement]())
        with _LISTENERS_LOCK:
            _LISTENERS.setdefault(self._key, set()).add(listener)
        try:
            while True:
                yield await listener[1].get()
        finally:
            with _LISTENERS_LOCK:
                listeners = _LISTENERS.get(self._key, set())
                listeners.discard(listener)
                if not listeners:
                    _LISTENERS.pop(self._key, None)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _json(entries: Entries) -> str:
    return json.dumps(entries, ensure_ascii=False, separators=(",", ":"))


def _padded(number: int) -> str:
    return f"{number:0{_CRL_DIGITS}d}"


def _time(text: object) -> dt.datetime:
    """A stored time; one that is not (a row changed by hand) reads as the epoch, and
    ``tabadol registry verify`` names its version."""
    try:
        when = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return dt.datetime.fromtimestamp(0, dt.UTC)
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _version(row: tuple[Any, ...]) -> RegistryVersion:
    number, created_at, created_by, reason, entries, digest, chain = row
    try:
        data: Any = json.loads(entries)
    except (TypeError, ValueError):
        data = entries  # not JSON: the readers' shape check names it
    return RegistryVersion(
        int(number),
        _time(created_at),
        str(created_by),
        str(reason),
        cast(Entries, data),
        str(digest),
        str(chain or ""),
    )


def _crl(row: tuple[Any, ...]) -> StoredCrl:
    number, der, published_at, published_by, row_id = row
    return StoredCrl(int(number), bytes(der), _time(published_at), str(published_by), int(row_id))
