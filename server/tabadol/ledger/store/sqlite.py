"""The ledger in one SQLite file, WAL mode: the embedded default."""

from __future__ import annotations

import dataclasses
import functools
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tabadol.ledger import rollup
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
    ArchivedPrefix,
    CallGroup,
    LedgerMissing,
    LedgerWriteError,
    SealTimestamp,
    archived_rows_problem,
    signed_prefix,
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
# Where a chain's live part begins once its oldest batches are archived (ArchiveLog).
_ARCHIVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS archived_prefix (
    chain TEXT PRIMARY KEY,
    seal_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    head_digest TEXT NOT NULL,
    sealed_ns INTEGER NOT NULL,
    signer TEXT NOT NULL,
    signature TEXT NOT NULL,
    archived_ns INTEGER NOT NULL,
    archive TEXT NOT NULL,
    rollup_sha256 TEXT NOT NULL,
    statement_signature TEXT NOT NULL,
    certificate_pem BLOB NOT NULL
);
"""
# Rollups (tabadol.ledger.rollup): created, and filled from the records a ledger already
# holds, in one transaction (_keep_rollups). ``chain`` is always '' here; ``archived`` is 1
# for the rows of records moved to archive files. The keys start with the day: the reports
# read days. A provider day's windows are ``[[index, calls, answered], ...]`` and its masks
# hex bitmasks of them (bit i: window i had calls / answers), so a reader ORs a quarter's
# rows without reading their windows (docs/ledger.md, "Rollups"). Those rows are a few KB:
# a rowid table, as SQLite advises for rows that large, where the group rows go WITHOUT ROWID.
_ROLLUP_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rollup_groups (
        day_ns INTEGER NOT NULL,
        chain TEXT NOT NULL,
        archived INTEGER NOT NULL CHECK (archived IN (0, 1)),
        consumer TEXT NOT NULL,
        provider TEXT NOT NULL,
        service TEXT NOT NULL,
        method TEXT NOT NULL,
        status_code INTEGER NOT NULL,
        forwarded INTEGER NOT NULL,
        verified INTEGER NOT NULL,
        grant TEXT NOT NULL DEFAULT '',
        protocol TEXT NOT NULL DEFAULT 'grpc',
        calls INTEGER NOT NULL,
        duration_ns INTEGER NOT NULL,
        request_bytes INTEGER NOT NULL,
        response_bytes INTEGER NOT NULL,
        histogram TEXT NOT NULL,
        PRIMARY KEY (day_ns, chain, archived, consumer, provider, service, method, status_code,
                     forwarded, verified, grant, protocol)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS rollup_provider_days (
        day_ns INTEGER NOT NULL,
        provider TEXT NOT NULL,
        chain TEXT NOT NULL,
        archived INTEGER NOT NULL CHECK (archived IN (0, 1)),
        windows TEXT NOT NULL,
        calls_mask TEXT NOT NULL,
        answered_mask TEXT NOT NULL,
        histogram TEXT NOT NULL,
        PRIMARY KEY (day_ns, provider, chain, archived)
    )""",
)
_ROLLUP_TABLES = ("rollup_groups", "rollup_provider_days")
_GROUP_COLUMNS = (
    "day_ns, consumer, provider, service, method, status_code, forwarded, verified, grant, "
    "protocol, calls, duration_ns, request_bytes, response_bytes, histogram"
)
# The group columns added after rollup_groups was first made: a table without them is keyed
# anew (_rekey_groups), its rows keeping the value its records had then.
_ADDED_GROUP_COLUMNS = ("grant", "protocol")
_GROUP_UPSERT = f"""
    INSERT INTO rollup_groups (day_ns, chain, archived, {_GROUP_COLUMNS.split(", ", 1)[1]})
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day_ns, chain, archived, consumer, provider, service, method, status_code,
                 forwarded, verified, grant, protocol)
    DO UPDATE SET calls = calls + excluded.calls,
                  duration_ns = duration_ns + excluded.duration_ns,
                  request_bytes = request_bytes + excluded.request_bytes,
                  response_bytes = response_bytes + excluded.response_bytes,
                  histogram = rollup_merge(histogram, excluded.histogram)
"""
_DAY_UPSERT = """
    INSERT INTO rollup_provider_days VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (day_ns, provider, chain, archived)
    DO UPDATE SET
        windows = rollup_day_merge(windows, calls_mask, answered_mask, excluded.windows, 0),
        calls_mask = rollup_day_merge(windows, calls_mask, answered_mask, excluded.windows, 1),
        answered_mask = rollup_day_merge(windows, calls_mask, answered_mask, excluded.windows, 2),
                  histogram = rollup_merge(histogram, excluded.histogram)
"""
# The records a query reads beside the rollups: the range's edges, [start, a) and [b, end).
_EDGES = "(start_ns >= ? AND start_ns < ?) OR (start_ns >= ? AND start_ns < ?)"
# As _stored reads it: 1 and no other value is a verified consumer.
_VERIFIED = "(consumer_verified = 1 AND typeof(consumer_verified) = 'integer')"
# Columns added after the first schema, with the value old rows take (docs/ledger.md).
_ADDED_COLUMNS = {
    "consumer_serial": "''", "consumer_verified": "1", "grant": "''", "protocol": "'grpc'"
}  # fmt: skip
_ADDED_SESSION_COLUMNS = {"acknowledged": "''", "signer": "''"}
_RECORD_COLUMNS = ", ".join(("seq", *FIELD_NAMES, "prev_digest", "digest"))
_SESSION_COLUMNS = ", ".join(f.name for f in dataclasses.fields(Session))
_VERIFIED_AT = FIELD_NAMES.index("consumer_verified")
_PRIVATE = 0o600
_CANONICAL_PAGE = 20_000


def _stored(row: Sequence[Any]) -> StoredRecord:
    seq, *values, prev_digest, digest = row
    # consumer_verified: SQLite keeps 0 or 1; anything else is no value a writer wrote, and
    # must not read as true (the reports count verified calls as = 1).
    verified = values[_VERIFIED_AT]
    values[_VERIFIED_AT] = verified == 1 and type(verified) is int
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


def _merge_histograms(mine: str, added: str) -> str:
    """rollup_merge(a, b) in SQL: histogram ``a`` with ``b``'s counts added."""
    return rollup.add_encoded(mine, added)[0]


@functools.lru_cache(maxsize=8)
def _merged_windows(
    mine: str, calls_mask: str, answered_mask: str, added: str
) -> tuple[str, str, str]:
    windows, changed = rollup.add_encoded(mine, added)
    calls, answered = rollup.masks_after(
        rollup.decode_mask(calls_mask), rollup.decode_mask(answered_mask), changed
    )
    return windows, rollup.encode_mask(calls), rollup.encode_mask(answered)


def _merge_windows(mine: str, calls_mask: str, answered_mask: str, added: str, part: int) -> str:
    """rollup_day_merge(windows, calls_mask, answered_mask, added, part) in SQL: a provider
    day's windows with ``added``'s counts added (part 0), or the masks of the sum (1:
    windows with calls, 2: answered). One upsert asks for all three alike: the sum is
    made once."""
    return _merged_windows(mine, calls_mask, answered_mask, added)[part]


def _one_chain(chain: str) -> None:
    if chain:
        raise ValueError(f"a SQLite ledger keeps one chain, not one named {chain!r}")


class SqliteLedgerStore:
    """A LedgerStore in one SQLite file. ``synchronous=FULL``: a commit is on disk."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._readonly = readonly
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
                self._conn.executescript(_ARCHIVE_SCHEMA)
                self._add_columns()
            self._conn.execute("PRAGMA busy_timeout = 2000")
            self._columns = self._record_columns()
            if not readonly:
                self._conn.create_function("rollup_merge", 2, _merge_histograms, deterministic=True)
                self._conn.create_function(
                    "rollup_day_merge", 5, _merge_windows, deterministic=True
                )
            self._rollups_kept = self._keep_rollups()
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
            count, head, _ = self._tip()
        return count, head

    def _tip(self) -> tuple[int, str, int]:
        """(records, head digest, last seal's number) of the chain, its archived prefix
        included: the live tables are empty right after everything was archived."""
        row = self._conn.execute(
            "SELECT seq, digest FROM records ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        last = self._conn.execute("SELECT max(seq) FROM seals").fetchone()[0]
        if row is not None and last is not None:
            return row[0], row[1], last
        prefix = self._prefix()
        start = (
            (0, GENESIS, 0)
            if prefix is None
            else (prefix.seal.count, prefix.seal.head_digest, prefix.seal.seq)
        )
        count, head = (row[0], row[1]) if row is not None else start[:2]
        return count, head, last if last is not None else start[2]

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
                    count, head, last = self._tip()
                    stored = []
                    for record in records:
                        count += 1
                        digest = chain_digest(head, record)
                        stored.append(StoredRecord(count, record, head, digest))
                        head = digest
                    seal = seal_with(last + 1, count, head)
                    self._insert(stored, seal, signer_pem)
                    self._add_rollup(rollup.rollup(records))
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

    def _iterate(
        self, sql: str, params: Sequence[Any], page: int = 5000, after: int = 0
    ) -> Iterator[Any]:
        """Rows in pages, in order of position after ``after``, so a huge ledger streams
        instead of loading whole."""
        last = after
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

    def _rollup_columns(self) -> str:
        """The columns of rollup.ROLLUP_FIELDS, consumer_verified read as _stored reads it."""
        missing = {c.rsplit(" AS ", 1)[1] for c in self._columns.split(", ") if " AS " in c}
        return ", ".join(
            _ADDED_COLUMNS[name]
            if name in missing
            else _VERIFIED
            if name == "consumer_verified"
            else name
            for name in rollup.ROLLUP_FIELDS
        )

    def canonical_rows(self, from_seq: int, to_seq: int) -> Iterator[tuple[int, str, str, bytes]]:
        """(seq, prev_digest, digest, LedgerRecord.canonical()) of records ``from_seq`` to
        ``to_seq``: a verifier's fast read. SQLite renders the JSON itself where that is
        byte for byte what Python renders (the written types, nothing to escape)."""
        for seq, prev, digest, canonical, _ in self._canonical(from_seq, to_seq, ""):
            yield seq, prev, digest, canonical

    def canonical_and_rollup_rows(
        self, from_seq: int, to_seq: int
    ) -> Iterator[tuple[int, str, str, bytes, rollup.RollupFields]]:
        """canonical_rows with each record's rollup.ROLLUP_FIELDS beside it, in one read: a
        verifier checks the chain and sums the rollup in one pass."""
        yield from self._canonical(from_seq, to_seq, self._rollup_columns())

    def _canonical(
        self, from_seq: int, to_seq: int, extra: str
    ) -> Iterator[tuple[int, str, str, bytes, Any]]:
        missing = {c.rsplit(" AS ", 1)[1] for c in self._columns.split(", ") if " AS " in c}
        value = {n: _ADDED_COLUMNS[n] if n in missing else n for n in FIELD_NAMES}
        v1 = ", ".join(value[n] for n in FIELD_NAMES[: FIELD_NAMES.index("consumer_serial")])
        v2 = ", ".join(value[n] for n in FIELD_NAMES[:_VERIFIED_AT])
        serial, verified, grant, protocol = (
            value["consumer_serial"], value["consumer_verified"], value["grant"],
            value["protocol"],
        )  # fmt: skip
        boolean = f"json(CASE {verified} WHEN 1 THEN 'true' ELSE 'false' END)"
        sql = f"""
            SELECT seq, prev_digest, digest, CASE
                WHEN typeof({serial}) != 'text' OR typeof({verified}) != 'integer'
                    OR {verified} NOT IN (0, 1) OR typeof({grant}) != 'text'
                    OR typeof({protocol}) != 'text' THEN NULL
                WHEN {protocol} != 'grpc'
                    THEN json_array(4, {v2}, {boolean}, {grant}, {protocol})
                WHEN {grant} != '' THEN json_array(3, {v2}, {boolean}, {grant})
                WHEN {serial} = '' AND {verified} = 1 THEN json_array(1, {v1})
                ELSE json_array(2, {v2}, {boolean})
            END{f", {extra}" if extra else ""}
            FROM records WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT {_CANONICAL_PAGE}
        """
        last = from_seq - 1
        while last < to_seq:
            rows = self._query(sql, (last, to_seq))
            # Python escapes DEL and beyond ASCII and SQLite does not: Python renders those.
            odd = [
                seq
                for seq, _, _, text, *_ in rows
                if text is None or not text.isascii() or not text.isprintable() or "\\" in text
            ]
            exact: dict[int, bytes] = {}
            if odd:
                found = self._query(
                    f"SELECT {self._columns} FROM records WHERE seq IN ({', '.join('?' * len(odd))})",
                    odd,
                )
                exact = {row[0]: _stored(row).record.canonical() for row in found}
            for seq, prev, digest, text, *fields in rows:
                canonical = exact[seq] if seq in exact else text.encode()
                yield seq, prev, digest, canonical, tuple(fields) if extra else None
            if len(rows) < _CANONICAL_PAGE:
                return
            last = rows[-1][0]

    def records_between(self, start_ns: int, end_ns: int) -> Iterator[StoredRecord]:
        # The positions the range's records lie between, by the start index; then pages in
        # order of position from the first of them. (Paged by position from the beginning,
        # SQLite would walk every record before the range's first to fill the first page.)
        lowest, highest = self._query(
            "SELECT min(seq), max(seq) FROM records WHERE start_ns >= ? AND start_ns < ?",
            (start_ns, end_ns),
        )[0]
        if lowest is None:
            return
        sql = (
            f"SELECT {self._columns} FROM records WHERE +start_ns >= ? AND +start_ns < ? "
            "AND seq <= ?"
        )  # the unary + keeps SQLite on the position order, not the start index
        for row in self._iterate(sql, [start_ns, end_ns, highest], after=lowest - 1):
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
        if rows:
            return Seal(*rows[0])
        prefix = self.archived()  # every seal archived: the chain goes on from the last
        return prefix.seal if prefix is not None else None

    def _prefix(self) -> ArchivedPrefix | None:
        """The archived prefix, read on this connection (inside a caller's transaction)."""
        try:
            row = self._conn.execute("SELECT * FROM archived_prefix WHERE chain = ''").fetchone()
        except sqlite3.OperationalError:  # a ledger from before archives, opened read-only
            return None
        if row is None:
            return None
        chain, seq, count, head, sealed_ns, signer, signature, archived_ns, archive, *signed = row
        seal = Seal(seq, count, head, sealed_ns, signer, signature, chain)
        rollup_sha256, statement_signature, certificate = signed
        if not isinstance(certificate, bytes):  # SQLite keeps whatever it is given
            certificate = str(certificate).encode()
        return ArchivedPrefix(
            chain, seal, archived_ns, archive, str(rollup_sha256), str(statement_signature),
            certificate,
        )  # fmt: skip

    def archived(self, chain: str = "") -> ArchivedPrefix | None:
        _one_chain(chain)
        with self._lock:
            return self._prefix()

    def remove_archived(
        self,
        chain: str,
        through: Seal,
        archived_ns: int,
        archive: str,
        sign_with: Callable[[bytes], str],
        signer_pem: bytes,
    ) -> ArchivedPrefix:
        _one_chain(chain)
        with self._lock:
            try:
                # Summed before the write lock is taken, so brokers writing the same file wait
                # less: sealed records do not change, and the seal is checked under the lock.
                removed = rollup.rollup_of_fields(
                    self._conn.execute(
                        f"SELECT {self._rollup_columns()} FROM records WHERE seq <= ?",
                        (through.count,),
                    )
                )
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    row = self._conn.execute(
                        "SELECT * FROM seals WHERE seq = ?", (through.seq,)
                    ).fetchone()
                    if row is None or Seal(*row) != through:
                        raise LedgerWriteError(
                            f"{self.path}: seal {through.seq} is not in the live ledger as "
                            "archived: nothing removed"
                        )
                    if why := archived_rows_problem(self._prefix(), self._rollup_rows(True, None)):
                        raise LedgerWriteError(f"{self.path}: {why}")
                    self._move_to_archived(chain, removed)
                    self._conn.execute("DELETE FROM records WHERE seq <= ?", (through.count,))
                    self._conn.execute("DELETE FROM seals WHERE seq <= ?", (through.seq,))
                    self._conn.execute(
                        "DELETE FROM seal_timestamps WHERE seal_seq <= ?", (through.seq,)
                    )
                    prefix = signed_prefix(
                        chain, through, archived_ns, archive, self._rollup_rows(True, None),
                        sign_with, signer_pem,
                    )  # fmt: skip
                    self._conn.execute(
                        "INSERT OR REPLACE INTO archived_prefix VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            chain, through.seq, through.count, through.head_digest,
                            through.sealed_ns, through.signer, through.signature,
                            archived_ns, archive, prefix.rollup_sha256, prefix.signature,
                            signer_pem,
                        ),
                    )  # fmt: skip
                    self._conn.execute("COMMIT")
                    return prefix
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise LedgerWriteError(
                    f"{self.path}: cannot remove the archived records: {e}"
                ) from e

    def _move_to_archived(self, chain: str, removed: rollup.Rollup) -> None:
        """Inside remove_archived's transaction: the removed records' rollup leaves the
        live rows for the archived ones, so reports still count them."""
        if self._rollups_kept:
            self._add_rollup(removed, sign=-1)
            self._add_rollup(removed, archived=True)

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
            "SELECT max(0, coalesce((SELECT max(seq) FROM seals), 0) - max("
            f"{self._AFTER_TIMESTAMPED}, (SELECT coalesce(max(seal_seq), 0) FROM archived_prefix)))"
        )
        return int(rows[0][0])

    # -- rollups (RollupLog) and the queries that read them -------------------------------

    def _add_rollup(self, rows: rollup.Rollup, *, archived: bool = False, sign: int = 1) -> None:
        """Add rollup rows (``sign=-1``: take them away) to the live or archived rows, inside
        the caller's write transaction. Rows left at no calls go."""
        self._conn.executemany(
            _GROUP_UPSERT,
            [
                (key.day_ns, "", int(archived), key.consumer, key.provider, key.service,
                 key.method, key.status_code, int(key.forwarded), int(key.verified), key.grant,
                 key.protocol, sign * t.calls, sign * t.duration_ns, sign * t.request_bytes,
                 sign * t.response_bytes,
                 rollup.encode_histogram({i: sign * n for i, n in t.histogram.items()}))
                for key, t in rows.groups.items()
            ],
        )  # fmt: skip
        days = []
        for key, day in rows.provider_days.items():
            if sign < 0:
                day = rollup.ProviderDay()
                day.add(rows.provider_days[key], sign)
            calls_mask, answered_mask = day.masks()
            days.append(
                (key.day_ns, key.provider, "", int(archived), rollup.encode_windows(day.windows),
                 rollup.encode_mask(calls_mask), rollup.encode_mask(answered_mask),
                 rollup.encode_histogram(day.histogram))
            )  # fmt: skip
        self._conn.executemany(_DAY_UPSERT, days)
        if sign < 0:
            self._conn.execute("DELETE FROM rollup_groups WHERE calls = 0 AND histogram = '[]'")
            self._conn.execute(
                "DELETE FROM rollup_provider_days WHERE windows = '[]' AND histogram = '[]'"
            )

    def _keep_rollups(self) -> bool:
        """Create the rollup tables if they are not there, and fill them from the records a
        ledger written before rollups holds (once: docs/ledger.md, "Rollups"). Whether the
        ledger keeps rollups (one opened read-only may predate them: records answer)."""
        current = not self._missing_rollup_tables() and not self._groups_lack()
        if current or self._readonly:  # read-only, older group rows: records answer
            return current
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            missing = self._missing_rollup_tables()  # another process may have been first
            if "rollup_groups" not in missing and self._groups_lack():
                self._rekey_groups()
            for table in _ROLLUP_SCHEMA:
                self._conn.execute(table)
            if missing:
                built = self._records_rollup()
                if "rollup_groups" not in missing:
                    built.groups.clear()
                if "rollup_provider_days" not in missing:
                    built.provider_days.clear()
                self._add_rollup(built)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return True

    def _groups_lack(self) -> list[str]:
        """The added group columns rollup_groups lacks (none if it is not there at all)."""
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(rollup_groups)")}
        return [name for name in _ADDED_GROUP_COLUMNS if have and name not in have]

    def _rekey_groups(self) -> None:
        """Key the group rows of a ledger from before grants or protocols by them too,
        inside the caller's transaction: each old row keeps its sums under grant '' or
        protocol 'grpc', as its records have (none was written with another), so nothing is
        summed again."""
        lacking = self._groups_lack()
        kept = ", ".join(c for c in _GROUP_COLUMNS.split(", ") if c not in lacking)
        self._conn.execute("ALTER TABLE rollup_groups RENAME TO rollup_groups_before")
        self._conn.execute(_ROLLUP_SCHEMA[0])
        self._conn.execute(
            f"INSERT INTO rollup_groups (chain, archived, {kept}) "
            f"SELECT chain, archived, {kept} FROM rollup_groups_before"
        )
        self._conn.execute("DROP TABLE rollup_groups_before")

    def _missing_rollup_tables(self) -> set[str]:
        found = self._conn.execute(
            f"SELECT name FROM sqlite_master WHERE name IN {_ROLLUP_TABLES}"
        ).fetchall()
        return set(_ROLLUP_TABLES) - {name for (name,) in found}

    def _records_rollup(self) -> rollup.Rollup:
        """The rollup of every record, read on this connection (in the caller's transaction)."""
        cursor = self._conn.execute(f"SELECT {self._rollup_columns()} FROM records")
        return rollup.rollup_of_fields(cursor)

    def rollup_rows(
        self, chain: str = "", *, archived: bool = False, days: tuple[int, int] | None = None
    ) -> rollup.Rollup:
        _one_chain(chain)
        with self._lock:
            return self._rollup_rows(archived, days)

    def _rollup_rows(self, archived: bool, days: tuple[int, int] | None) -> rollup.Rollup:
        result = rollup.Rollup()
        if not self._rollups_kept:
            return result
        first, end = days if days is not None else (-(2**63), 2**63 - 1)
        for row in self._conn.execute(
            f"SELECT {_GROUP_COLUMNS} FROM rollup_groups WHERE day_ns >= ? AND day_ns < ? "
            "AND archived = ?",
            (first, end, int(archived)),
        ):
            day, consumer, provider, service, method, code, fwd, verified, *more, hist = row
            grant, protocol, *sums = more
            key = rollup.GroupKey(
                day, consumer, provider, service, method, code, bool(fwd), bool(verified), grant,
                protocol,
            )  # fmt: skip
            calls, duration, request, response = sums
            result.groups[key] = rollup.GroupTotals(
                calls, duration, request, response, rollup.decode_histogram(hist)
            )
        for day, provider, windows, calls_mask, answered_mask, hist in self._conn.execute(
            "SELECT day_ns, provider, windows, calls_mask, answered_mask, histogram "
            "FROM rollup_provider_days WHERE day_ns >= ? AND day_ns < ? AND archived = ?",
            (first, end, int(archived)),
        ):
            result.provider_days[rollup.ProviderDayKey(day, provider)] = rollup.ProviderDay(
                rollup.decode_windows(windows),
                rollup.decode_histogram(hist),
                (rollup.decode_mask(calls_mask), rollup.decode_mask(answered_mask)),
            )
        return result

    def rebuild_rollup(self, chain: str = "") -> rollup.Rollup:
        _one_chain(chain)
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    before = self._rollup_rows(False, None)
                    self._conn.execute("DELETE FROM rollup_groups WHERE archived = 0")
                    self._conn.execute("DELETE FROM rollup_provider_days WHERE archived = 0")
                    self._add_rollup(self._records_rollup())
                    self._conn.execute("COMMIT")
                    return before
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise LedgerWriteError(f"{self.path}: {e}") from e

    def _split(self, start_ns: int, end_ns: int) -> tuple[list[int], list[int]]:
        """(days, edges): rollup rows answer for the days starting in [days[0], days[1]),
        and records for the edges left, [start, a) and [b, end) (the parameters of _EDGES).
        A ledger without rollups (an old one, read-only): no days, records answer all."""
        if not self._rollups_kept:
            return [], [start_ns, start_ns, start_ns, end_ns]
        a, b = rollup.whole_days(start_ns, end_ns)
        return [a, b], [start_ns, a, b, end_ns]

    def call_groups(self, start_ns: int, end_ns: int) -> list[CallGroup]:
        days, edges = self._split(start_ns, end_ns)
        rolled = (
            """
            SELECT consumer AS c, provider AS p, service AS s, method AS m,
                   status_code AS code, forwarded AS fwd, calls AS n, duration_ns AS d,
                   verified AS v, grant AS g, protocol AS pr
            FROM rollup_groups WHERE day_ns >= ? AND day_ns < ?
            UNION ALL"""
            if days
            else ""
        )
        have = self._columns.split(", ")
        grant, protocol = (n if n in have else _ADDED_COLUMNS[n] for n in ("grant", "protocol"))
        rows = self._query(
            f"""
            SELECT c, p, s, m, code, fwd, sum(n), sum(d), v, g, pr FROM ({rolled}
                SELECT consumer AS c, provider AS p, service AS s, method AS m,
                       status_code AS code, endpoint != '' AS fwd, count(*) AS n,
                       sum(end_ns - start_ns) AS d, {_VERIFIED} AS v, {grant} AS g,
                       {protocol} AS pr
                FROM records WHERE {_EDGES} GROUP BY 1, 2, 3, 4, 5, 6, 9, 10, 11
            )
            GROUP BY 1, 2, 3, 4, 5, 6, 9, 10, 11 ORDER BY 1, 2, 3, 4, 5, 6, 9, 10, 11
            """,
            (*days, *edges),
        )
        return [
            CallGroup(c, p, s, m, code, bool(fwd), n, d, bool(v), g, pr)
            for c, p, s, m, code, fwd, n, d, v, g, pr in rows
        ]

    def answered_histograms(self, start_ns: int, end_ns: int) -> dict[str, rollup.Histogram]:
        days, edges = self._split(start_ns, end_ns)
        found: dict[str, rollup.Histogram] = {}
        if days:
            for provider, text in self._query(
                "SELECT provider, histogram FROM rollup_provider_days "
                "WHERE day_ns >= ? AND day_ns < ?",
                days,
            ):
                rollup.add_histogram(found.setdefault(provider, {}), rollup.decode_histogram(text))
        for provider, duration in self._query(
            f"SELECT provider, end_ns - start_ns FROM records WHERE ({_EDGES}) "
            "AND endpoint != '' AND status_code != ?",
            (*edges, UNAVAILABLE),
        ):
            histogram = found.setdefault(provider, {})
            index = rollup.bin_of(duration)
            histogram[index] = histogram.get(index, 0) + 1
        return {provider: histogram for provider, histogram in found.items() if histogram}

    def count_between(self, start_ns: int, end_ns: int) -> int:
        days, edges = self._split(start_ns, end_ns)
        rolled = (
            "SELECT coalesce(sum(calls), 0) FROM rollup_groups WHERE day_ns >= ? AND day_ns < ?"
        )
        rows = self._query(
            f"SELECT ({rolled if days else 0}) + (SELECT count(*) FROM records WHERE {_EDGES})",
            (*days, *edges),
        )
        return int(rows[0][0])

    def latency_percentiles(
        self,
        start_ns: int,
        end_ns: int,
        percents: Sequence[int],
        consumers: Sequence[str] | None = None,
    ) -> dict[str, tuple[int, dict[int, int]]]:
        """Per service: (calls, {percent: nearest-rank duration in ns, from the histograms})
        in the range, of identified consumers' calls (a refused certificate's call measures
        nothing); with ``consumers``, only theirs (and those with no consumer, of a schema 1
        ledger)."""
        days, edges = self._split(start_ns, end_ns)
        only, named = "", [*(consumers or ())]
        if consumers is not None:
            only = f"AND consumer IN ('', {', '.join('?' * len(consumers))})"
        per_service: dict[str, rollup.Histogram] = {}
        if days:
            for service, text in self._query(
                "SELECT service, histogram FROM rollup_groups WHERE day_ns >= ? AND day_ns < ? "
                f"AND verified = 1 {only}",
                (*days, *named),
            ):
                rollup.add_histogram(
                    per_service.setdefault(service, {}), rollup.decode_histogram(text)
                )
        for service, duration in self._query(
            f"SELECT service, end_ns - start_ns FROM records WHERE ({_EDGES}) "
            f"AND {_VERIFIED} {only}",
            (*edges, *named),
        ):
            histogram = per_service.setdefault(service, {})
            index = rollup.bin_of(duration)
            histogram[index] = histogram.get(index, 0) + 1
        return {
            service: (sum(histogram.values()), rollup.percentiles(histogram, percents))
            for service, histogram in sorted(per_service.items())
        }

    def provider_windows(
        self, start_ns: int, end_ns: int, window_ns: int
    ) -> dict[str, tuple[int, int]]:
        """Per provider: (windows with calls, answered windows), in the five-minute windows
        of the epoch (rollup.WINDOW_NS): a Tehran midnight, and so a quarter, starts one."""
        if window_ns != rollup.WINDOW_NS:
            raise ValueError(
                f"availability windows are the rollups' {rollup.WINDOW_NS // 10**9} s ones, "
                f"not {window_ns} ns (tabadol.ledger.rollup.WINDOW_NS)"
            )
        days, edges = self._split(start_ns, end_ns)
        masks: dict[tuple[str, int], list[int]] = {}  # (provider, day) -> OR of its rows' masks
        if days:
            for provider, day, calls_mask, answered_mask in self._query(
                "SELECT provider, day_ns, calls_mask, answered_mask FROM rollup_provider_days "
                "WHERE day_ns >= ? AND day_ns < ?",
                days,
            ):
                both = masks.setdefault((provider, day), [0, 0])
                both[0] |= rollup.decode_mask(calls_mask)
                both[1] |= rollup.decode_mask(answered_mask)
        found: dict[str, tuple[int, int]] = {}
        for (provider, _), (calls_mask, answered_mask) in masks.items():
            if not calls_mask:
                continue
            windows, answered = found.get(provider, (0, 0))
            found[provider] = (
                windows + calls_mask.bit_count(),
                answered + answered_mask.bit_count(),
            )
        w = rollup.WINDOW_NS  # the edges' windows: of other days than the rows', so they add
        for provider, windows, answered in self._query(
            f"""
            SELECT provider, count(*), sum(answered > 0) FROM (
                SELECT provider, start_ns - ((start_ns % {w}) + {w}) % {w} AS w,
                       sum(status_code != {UNAVAILABLE}) AS answered
                FROM records WHERE ({_EDGES}) AND endpoint != '' GROUP BY 1, 2
            ) GROUP BY 1
            """,
            edges,
        ):
            before = found.get(provider, (0, 0))
            found[provider] = (before[0] + windows, before[1] + answered)
        return found
