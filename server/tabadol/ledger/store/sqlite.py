"""The ledger in one SQLite file, WAL mode: the embedded default."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tabadol.ledger.record import (
    FIELD_NAMES,
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

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    {", ".join(f"{name} NOT NULL" for name in FIELD_NAMES)},
    prev_digest TEXT NOT NULL,
    digest TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_start ON records (start_ns);
CREATE TABLE IF NOT EXISTS seals (
    seq INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    head_digest TEXT NOT NULL,
    sealed_ns INTEGER NOT NULL,
    signer TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS signers (
    fingerprint TEXT PRIMARY KEY,
    certificate_pem BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    mode TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process TEXT NOT NULL,
    opened_ns INTEGER NOT NULL,
    ended_ns INTEGER,
    ended TEXT NOT NULL DEFAULT '',
    accepted INTEGER,
    written INTEGER,
    acknowledged TEXT NOT NULL DEFAULT '',
    signer TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS seal_timestamps (
    seal_seq INTEGER PRIMARY KEY,
    token BLOB NOT NULL,
    gen_time_ns INTEGER NOT NULL
);
"""
# Columns added after the first schema, with the value old rows take (docs/ledger.md).
_ADDED_COLUMNS = {"consumer_serial": "''", "consumer_verified": "1"}
_ADDED_SESSION_COLUMNS = {"acknowledged": "''", "signer": "''"}
_RECORD_COLUMNS = ", ".join(("seq", *FIELD_NAMES, "prev_digest", "digest"))
_SESSION_COLUMNS = ", ".join(f.name for f in dataclasses.fields(Session))
_PRIVATE = 0o600
_CANONICAL_PAGE = 20_000


def _stored(row: Sequence[Any]) -> StoredRecord:
    seq, *values, prev_digest, digest = row
    # consumer_verified: SQLite keeps 0 or 1; anything else is no value a writer wrote, and
    # must not read as true (the reports count verified calls as = 1).
    values[-1] = values[-1] == 1 and type(values[-1]) is int
    return StoredRecord(seq, LedgerRecord(*values), prev_digest, digest)


def make_private(path: Path, *, create: bool = False) -> None:
    """Mode 0600 for a ledger file: created so (with ``create``) or narrowed if it was not.
    SQLite gives the -wal and -shm files it creates the database file's mode."""
    if create:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, _PRIVATE))
    try:
        found = path.lstat()  # a symlink's target is not the ledger's to narrow
        if stat.S_ISREG(found.st_mode) and found.st_mode & 0o077:
            path.chmod(_PRIVATE)
    except FileNotFoundError:
        pass


def _one_chain(chain: str) -> None:
    if chain:
        raise ValueError(f"a SQLite ledger keeps one chain, not one named {chain!r}")


class SqliteLedgerStore:
    """A LedgerStore in one SQLite file. ``synchronous=FULL``: a commit is on disk."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            if readonly:
                if not self.path.exists():
                    raise LedgerMissing(f"{self.path}: no ledger here")
                self._conn = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, check_same_thread=False
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                make_private(self.path, create=True)
                for suffix in ("-wal", "-shm"):
                    make_private(self.path.with_name(self.path.name + suffix))
                self._conn = sqlite3.connect(
                    self.path, check_same_thread=False, isolation_level=None
                )
                self._conn.execute("PRAGMA busy_timeout = 2000")
                self._conn.execute("PRAGMA journal_mode = WAL")
                self._conn.execute("PRAGMA synchronous = FULL")
                self._conn.executescript(_SCHEMA)
                self._add_columns()
            self._conn.execute("PRAGMA busy_timeout = 2000")
            self._columns = self._record_columns()
        except (sqlite3.Error, OSError) as e:
            raise LedgerWriteError(f"{self.path}: cannot open the ledger: {e}") from e

    def _add_columns(self) -> None:
        """Bring a ledger written by an older broker up to the current record fields."""
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(records)")}
        for name, default in _ADDED_COLUMNS.items():
            if name not in have:
                self._conn.execute(
                    f"ALTER TABLE records ADD COLUMN {name} NOT NULL DEFAULT {default}"
                )
        sessions = {row[1] for row in self._conn.execute("PRAGMA table_info(sessions)")}
        for name, default in _ADDED_SESSION_COLUMNS.items():
            if name not in sessions:
                self._conn.execute(
                    f"ALTER TABLE sessions ADD COLUMN {name} TEXT NOT NULL DEFAULT {default}"
                )

    def _record_columns(self) -> str:
        """The record columns to select: an older ledger opened read-only lacks the newest."""
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(records)")}
        return ", ".join(
            name if name in have else f"{_ADDED_COLUMNS[name]} AS {name}"
            for name in ("seq", *FIELD_NAMES, "prev_digest", "digest")
        )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def chain_for(self, instance: str) -> str:
        """One chain: SQLite's write lock puts every writer's batches in one order."""
        return ""

    def chains(self) -> list[str]:
        return [""] if self.last_seal() is not None or self.head()[0] else []

    def records_count(self) -> int:
        return self.head()[0]

    def head(self, chain: str = "") -> tuple[int, str]:
        _one_chain(chain)
        with self._lock:
            row = self._conn.execute(
                "SELECT seq, digest FROM records ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def _insert(self, records: Sequence[StoredRecord], seal: Seal, signer_pem: bytes) -> None:
        placeholders = ", ".join("?" * (len(FIELD_NAMES) + 3))
        self._conn.executemany(
            f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES ({placeholders})",
            [(r.seq, *r.record.values(), r.prev_digest, r.digest) for r in records],
        )
        self._conn.execute(
            "INSERT INTO seals VALUES (?, ?, ?, ?, ?, ?)",
            (seal.seq, seal.count, seal.head_digest, seal.sealed_ns, seal.signer, seal.signature),
        )
        self._conn.execute("INSERT OR IGNORE INTO signers VALUES (?, ?)", (seal.signer, signer_pem))

    def append_sealed(
        self,
        records: Sequence[LedgerRecord],
        seal_with: Callable[[int, int, str], Seal],
        signer_pem: bytes,
        chain: str = "",
        session: str = "",
    ) -> Seal:
        """Extend the chain from the head as it is inside the write transaction, so several
        broker processes can write one ledger: SQLite's write lock puts their batches in
        one order, each linked to the one before."""
        _one_chain(chain)
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    row = self._conn.execute(
                        "SELECT seq, digest FROM records ORDER BY seq DESC LIMIT 1"
                    ).fetchone()
                    count, head = (row[0], row[1]) if row else (0, GENESIS)
                    last = self._conn.execute("SELECT max(seq) FROM seals").fetchone()[0] or 0
                    stored = []
                    for record in records:
                        count += 1
                        digest = chain_digest(head, record)
                        stored.append(StoredRecord(count, record, head, digest))
                        head = digest
                    seal = seal_with(last + 1, count, head)
                    self._insert(stored, seal, signer_pem)
                    if session:
                        self._conn.execute(
                            "UPDATE sessions SET written = coalesce(written, 0) + ? WHERE id = ?",
                            (len(stored), session),
                        )
                    self._conn.execute("COMMIT")
                    return seal
                except BaseException:
                    if self._conn.in_transaction:  # SQLite rolls back by itself on a full disk
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise LedgerWriteError(f"{self.path}: {e}") from e

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _iterate(self, sql: str, params: Sequence[Any], page: int = 5000) -> Iterator[Any]:
        """Rows in pages, so a huge ledger streams instead of loading whole."""
        last = 0
        while True:
            rows = self._query(f"{sql} AND seq > ? ORDER BY seq LIMIT {page}", [*params, last])
            yield from rows
            if len(rows) < page:
                return
            last = rows[-1][0]

    def records(self, chain: str = "", from_seq: int = 1) -> Iterator[StoredRecord]:
        _one_chain(chain)
        for row in self._iterate(f"SELECT {self._columns} FROM records WHERE seq >= ?", [from_seq]):
            yield _stored(row)

    def canonical_rows(self, from_seq: int, to_seq: int) -> Iterator[tuple[int, str, str, bytes]]:
        """(seq, prev_digest, digest, LedgerRecord.canonical()) of records ``from_seq`` to
        ``to_seq``: a verifier's fast read. SQLite renders the JSON itself where that is
        byte for byte what Python renders (the written types, nothing to escape)."""
        missing = {c.rsplit(" AS ", 1)[1] for c in self._columns.split(", ") if " AS " in c}
        value = {n: _ADDED_COLUMNS[n] if n in missing else n for n in FIELD_NAMES}
        v1 = ", ".join(value[n] for n in FIELD_NAMES[: FIELD_NAMES.index("consumer_serial")])
        v2 = ", ".join(value[n] for n in FIELD_NAMES[:-1])
        serial, verified = value["consumer_serial"], value["consumer_verified"]
        sql = f"""
            SELECT seq, prev_digest, digest, CASE
                WHEN typeof({serial}) != 'text' OR typeof({verified}) != 'integer'
                    OR {verified} NOT IN (0, 1) THEN NULL
                WHEN {serial} = '' AND {verified} = 1 THEN json_array(1, {v1})
                ELSE json_array(2, {v2}, json(CASE {verified} WHEN 1 THEN 'true' ELSE 'false' END))
            END FROM records WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT {_CANONICAL_PAGE}
        """
        last = from_seq - 1
        while last < to_seq:
            rows = self._query(sql, (last, to_seq))
            # Python escapes DEL and beyond ASCII and SQLite does not: Python renders those.
            odd = [
                seq
                for seq, _, _, text in rows
                if text is None or not text.isascii() or not text.isprintable() or "\\" in text
            ]
            exact: dict[int, bytes] = {}
            if odd:
                found = self._query(
                    f"SELECT {self._columns} FROM records WHERE seq IN ({', '.join('?' * len(odd))})",
                    odd,
                )
                exact = {row[0]: _stored(row).record.canonical() for row in found}
            for seq, prev, digest, text in rows:
                yield seq, prev, digest, exact[seq] if seq in exact else text.encode()
            if len(rows) < _CANONICAL_PAGE:
                return
            last = rows[-1][0]

    def records_between(self, start_ns: int, end_ns: int) -> Iterator[StoredRecord]:
        sql = f"SELECT {self._columns} FROM records WHERE start_ns >= ? AND start_ns < ?"
        for row in self._iterate(sql, [start_ns, end_ns]):
            yield _stored(row)

    def seals(self, chain: str = "") -> Iterator[Seal]:
        _one_chain(chain)
        last = 0
        while rows := self._query(
            "SELECT * FROM seals WHERE seq > ? ORDER BY seq LIMIT 5000", (last,)
        ):
            yield from (Seal(*row) for row in rows)
            last = rows[-1][0]

    def last_seal(self, chain: str = "") -> Seal | None:
        _one_chain(chain)
        rows = self._query("SELECT * FROM seals ORDER BY seq DESC LIMIT 1")
        return Seal(*rows[0]) if rows else None

    def signers(self) -> dict[str, bytes]:
        return {fp: bytes(pem) for fp, pem in self._query("SELECT * FROM signers")}

    def open_session(self, session: Session) -> None:
        placeholders = ", ".join("?" * len(dataclasses.fields(Session)))
        self._write(
            f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({placeholders})",
            dataclasses.astuple(session),
        )

    def end_session(
        self, session_id: str, ended: str, ended_ns: int, accepted: int | None, written: int | None
    ) -> None:
        self._write(
            "UPDATE sessions SET ended = ?, ended_ns = ?, accepted = ?, written = ? WHERE id = ?",
            (ended, ended_ns, accepted, written, session_id),
        )

    def acknowledge_session(self, session_id: str, acknowledgement: str) -> None:
        self._write(
            "UPDATE sessions SET acknowledged = ? WHERE id = ?", (acknowledgement, session_id)
        )

    def sessions(self) -> list[Session]:
        try:
            have = {row[1] for row in self._query("PRAGMA table_info(sessions)")}
            columns = ", ".join(
                name if name in have else f"{_ADDED_SESSION_COLUMNS[name]} AS {name}"
                for name in _SESSION_COLUMNS.split(", ")  # an older ledger, read-only
            )
            rows = self._query(f"SELECT {columns} FROM sessions ORDER BY opened_ns")
        except sqlite3.OperationalError:  # a ledger from before sessions, opened read-only
            return []
        return [Session(*row) for row in rows]

    def _write(self, sql: str, params: Sequence[Any]) -> None:
        with self._lock:
            try:
                self._conn.execute(sql, params)
            except sqlite3.Error as e:
                raise LedgerWriteError(f"{self.path}: {e}") from e

    def add_timestamp(self, chain: str, seal_seq: int, token_der: bytes, gen_time_ns: int) -> None:
        _one_chain(chain)
        self._write(
            "INSERT OR IGNORE INTO seal_timestamps VALUES (?, ?, ?)",
            (seal_seq, token_der, gen_time_ns),
        )

    def timestamps(self, chain: str = "") -> Iterator[SealTimestamp]:
        _one_chain(chain)
        last = 0
        while True:
            try:
                rows = self._query(
                    "SELECT seal_seq, token, gen_time_ns FROM seal_timestamps WHERE seal_seq > ? "
                    "ORDER BY seal_seq LIMIT 5000",
                    (last,),
                )
            except sqlite3.OperationalError:  # a ledger from before timestamps, read-only
                return
            yield from (SealTimestamp("", seq, bytes(token), ns) for seq, token, ns in rows)
            if len(rows) < 5000:
                return
            last = rows[-1][0]

    _AFTER_TIMESTAMPED = "(SELECT coalesce(max(seal_seq), 0) FROM seal_timestamps)"

    def untimestamped(self, chain: str = "", limit: int = 100) -> list[Seal]:
        _one_chain(chain)
        rows = self._query(
            f"SELECT * FROM seals WHERE seq > {self._AFTER_TIMESTAMPED} ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [Seal(*row) for row in rows]

    def untimestamped_count(self, chain: str = "") -> int:
        _one_chain(chain)
        rows = self._query(
            f"SELECT max(0, coalesce((SELECT max(seq) FROM seals), 0) - {self._AFTER_TIMESTAMPED})"
        )
        return int(rows[0][0])

    def call_groups(self, start_ns: int, end_ns: int) -> list[CallGroup]:
        rows = self._query(
            """
            SELECT consumer, provider, service, method, status_code, endpoint != '', count(*),
                   sum(end_ns - start_ns), consumer_verified
            FROM records WHERE start_ns >= ? AND start_ns < ?
            GROUP BY 1, 2, 3, 4, 5, 6, 9 ORDER BY 1, 2, 3, 4, 5, 6, 9
            """,
            (start_ns, end_ns),
        )
        return [
            CallGroup(c, p, s, m, code, bool(fwd), n, d, bool(v))
            for c, p, s, m, code, fwd, n, d, v in rows
        ]

    def durations(self, provider: str, start_ns: int, end_ns: int) -> list[int]:
        rows = self._query(
            """
            SELECT end_ns - start_ns FROM records
            WHERE start_ns >= ? AND start_ns < ? AND provider = ? AND endpoint != ''
                AND status_code != ?
            ORDER BY 1
            """,
            (start_ns, end_ns, provider, UNAVAILABLE),
        )
        return [r[0] for r in rows]

    def count_between(self, start_ns: int, end_ns: int) -> int:
        rows = self._query(
            "SELECT count(*) FROM records WHERE start_ns >= ? AND start_ns < ?", (start_ns, end_ns)
        )
        return int(rows[0][0])

    def latency_percentiles(
        self,
        start_ns: int,
        end_ns: int,
        percents: Sequence[int],
        consumers: Sequence[str] | None = None,
    ) -> dict[str, tuple[int, dict[int, int]]]:
        """Per service: (calls, {percent: nearest-rank duration in ns}) in the range, of
        identified consumers' calls (a refused certificate's call measures nothing); with
        ``consumers``, only theirs (and those with no consumer, of a schema 1 ledger)."""
        ranks = ", ".join(f"(n * {p} + 99) / 100" for p in percents)
        only = ""
        if consumers is not None:
            only = f"AND consumer IN ('', {', '.join('?' * len(consumers))})"
        rows = self._query(
            f"""
            SELECT service, n, rn, d FROM (
                SELECT service, end_ns - start_ns AS d,
                       row_number() OVER (PARTITION BY service ORDER BY end_ns - start_ns) AS rn,
                       count(*) OVER (PARTITION BY service) AS n
                FROM records WHERE start_ns >= ? AND start_ns < ? AND consumer_verified = 1 {only}
            ) WHERE rn IN ({ranks}) ORDER BY service, rn
            """,
            (start_ns, end_ns, *(consumers or ())),
        )
        return percentile_table(rows, percents)

    def provider_windows(
        self, start_ns: int, end_ns: int, window_ns: int
    ) -> dict[str, tuple[int, int]]:
        rows = self._query(
            """
            SELECT provider, count(*), sum(answered) FROM (
                SELECT provider, (start_ns - ?) / ? AS window, max(status_code != ?) AS answered
                FROM records
                WHERE start_ns >= ? AND start_ns < ? AND endpoint != ''
                GROUP BY 1, 2
            ) GROUP BY 1
            """,
            (start_ns, window_ns, UNAVAILABLE, start_ns, end_ns),
        )
        return {provider: (windows, answered) for provider, windows, answered in rows}
