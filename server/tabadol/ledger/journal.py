"""The journal: records of answered calls that the ledger could not take, kept on local disk.

JSON lines, appended and fsynced, beside the ledger (``<ledger path>.journal``, mode 0600).
Every line names the writer session it came from. Several broker processes may append to
one journal; ``flock`` keeps their lines whole and lets the next start rewrite it safely.

The next start seals what it replays with the broker's key, so the journal must not be a way
in for records the broker never wrote: every append ends with a signature line, signed by
the broker's key, over exactly the lines it appended. At replay, only lines under a valid
signature by a broker certificate of this exchange, for a session the ledger knows and that
has not ended, signed by the certificate that opened that session, count (``refusal``); the
others are set aside in ``<journal>.rejected``. Blocks whose records are all in the ledger
already (written when an outage ended) are settled: dropped quietly.

Anyone who can write the ledger's directory can put things in the journal's place: every
journal-family file is opened without following symlinks and without blocking, must be a
regular file, is read up to ``MAX_JOURNAL_BYTES``, and its lock is waited for at most
``LOCK_WAIT_S``: each case ends in an error naming the file, never a hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tabadol.ledger.record import FIELD_NAMES, FIELD_TYPES, LedgerRecord, StoredRecord
from tabadol.ledger.seal import Sealer, fingerprint, signed_by
from tabadol.ledger.sessions import Session
from tabadol.state_files import replace_file, sync_directory

log = logging.getLogger("tabadol.ledger")

MAX_JOURNAL_BYTES = 1 << 30  # more than any outage leaves: beyond it, something else is there
LOCK_WAIT_S = 60.0  # how long to wait for another process's lock on the journal
_LOCK_LOG_S = 5.0


def journal_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".journal")


def rejected_path(journal: Path) -> Path:
    """Where lines that failed the checks at replay are kept, for someone to look into."""
    return journal.with_name(journal.name + ".rejected")


@dataclass(frozen=True)
class JournalEntry:
    """A record a session could not write, or the line a session leaves when it stops."""

    session: str
    record: LedgerRecord | None = None
    closed: tuple[int, int] | None = None  # (accepted, written) when the session stopped

    def line(self) -> bytes:
        fields: dict[str, Any] = {"session": self.session}
        if self.record is not None:
            fields["record"] = asdict(self.record)
        if self.closed is not None:
            fields["accepted"], fields["written"] = self.closed
        return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


def parse_line(raw: bytes) -> JournalEntry | None:
    """An entry, or None for a line that is not one (a write cut short by a crash)."""
    try:
        fields = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, dict) or not isinstance(fields.get("session"), str):
        return None
    record = fields.get("record")
    if isinstance(record, dict):
        # Written by a broker from before grants, or protocols, were recorded.
        record = {"grant": "", "protocol": "grpc", **record}
        if record.keys() != set(FIELD_NAMES) or not all(
            type(record[name]) is FIELD_TYPES[name] for name in FIELD_NAMES
        ):
            return None
        return JournalEntry(fields["session"], record=LedgerRecord(**record))
    accepted, written = fields.get("accepted"), fields.get("written")
    if type(accepted) is int and type(written) is int:
        return JournalEntry(fields["session"], closed=(accepted, written))
    return None


def signed_payload(session: str, signed_ns: int, lines: bytes) -> bytes:
    """What a journal signature covers: the session, the time and the appended lines' digest."""
    digest = hashlib.sha256(lines).hexdigest()
    return f"tabadol-ledger-journal:v1:{session}:{signed_ns}:{digest}".encode()


@dataclass(frozen=True)
class JournalSignature:
    """The line that ends one append: the broker's signature over the lines before it."""

    session: str
    lines: int  # how many lines before this one it covers
    signed_ns: int
    signer: str  # the certificate's fingerprint, as in the ledger's signers table
    cert: str  # the signing broker certificate, PEM: judged against the CA at replay
    signature: str  # hex ECDSA-SHA256 over signed_payload(session, signed_ns, lines)

    def line(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode() + b"\n"


_SIGNATURE_TYPES = {
    "session": str,
    "lines": int,
    "signed_ns": int,
    "signer": str,
    "cert": str,
    "signature": str,
}


def parse_signature(raw: bytes) -> JournalSignature | None:
    try:
        fields = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if (
        isinstance(fields, dict)
        and fields.keys() == _SIGNATURE_TYPES.keys()
        and all(type(fields[k]) is t for k, t in _SIGNATURE_TYPES.items())
    ):
        return JournalSignature(**fields)
    return None


def sign(entries: list[JournalEntry], sealer: Sealer, signed_ns: int) -> bytes:
    """The lines of one append: the entries (all of one session), then their signature."""
    sessions = {entry.session for entry in entries}
    if len(sessions) != 1:
        raise ValueError("one journal append holds the entries of one session")
    (session,) = sessions
    body = b"".join(entry.line() for entry in entries)
    signature = JournalSignature(
        session=session,
        lines=len(entries),
        signed_ns=signed_ns,
        signer=sealer.signer,
        cert=sealer.cert_pem.decode("ascii"),
        signature=sealer.sign(signed_payload(session, signed_ns, body)),
    )
    return body + signature.line()


@dataclass(frozen=True)
class Block:
    """Lines of the journal that stand or fall together: those one signature line covers
    (with it), or lines no signature covers (``signature`` None)."""

    lines: tuple[bytes, ...]  # as found, each with its newline (but a cut-short last one)
    signature: JournalSignature | None = None
    signature_line: bytes = b""

    @property
    def raw(self) -> bytes:
        return b"".join(self.lines) + self.signature_line

    @property
    def line_count(self) -> int:
        return len(self.lines) + (1 if self.signature_line else 0)

    @property
    def session(self) -> str:
        return self.signature.session if self.signature is not None else ""

    @functools.cached_property
    def entries(self) -> list[JournalEntry]:
        """Parsed once: recovery looks at a block's entries several times."""
        return [entry for raw in self.lines if (entry := parse_line(raw)) is not None]

    @functools.cached_property
    def records(self) -> list[LedgerRecord] | None:
        """Its records, when every line is one; else None."""
        entries = self.entries
        if not entries or len(entries) != len(self.lines):
            return None
        found = [entry.record for entry in entries if entry.record is not None]
        return found if len(found) == len(entries) else None


def blocks(data: bytes) -> list[Block]:
    """The journal's lines, grouped by the signature lines that cover them. Pure.

    A signature line covers the ``lines`` lines right before it; any before those that no
    signature covers (a forgery, or an append a crash cut short) form a block of their own.
    """
    raws = [line + b"\n" for line in data.split(b"\n")]
    raws[-1] = raws[-1][:-1]  # what follows the last newline: nothing, or a cut-short line
    if not raws[-1]:
        raws.pop()
    found: list[Block] = []
    pending: list[bytes] = []
    for raw in raws:
        signature = parse_signature(raw) if raw.endswith(b"\n") else None
        if signature is None:
            pending.append(raw)
            continue
        split = max(0, len(pending) - max(signature.lines, 0))
        if split:
            found.append(Block(tuple(pending[:split])))
        found.append(Block(tuple(pending[split:]), signature, raw))
        pending = []
    if pending:
        found.append(Block(tuple(pending)))
    return found


def refusal(
    block: Block,
    sessions: Mapping[str, Session],
    signer_problem: Callable[[bytes, int], str | None],
) -> str | None:
    """Why a block must not reach the ledger, or None. Pure.

    ``sessions`` is every session of the ledger; ``signer_problem`` judges whether a
    certificate could vouch for what it signed at a time (``signers.signer_check``).
    """
    signature = block.signature
    if signature is None:
        return "no signature line covers them"
    if len(block.lines) != signature.lines:
        return (
            f"their signature line covers {signature.lines} lines but {len(block.lines)} precede it"
        )
    entries = block.entries
    if len(entries) != len(block.lines):
        return "a line under the signature is not a journal entry"
    if any(entry.session != signature.session for entry in entries):
        return "a line names another session than its signature"
    cert = signature.cert.encode("utf-8", "surrogateescape")
    try:
        signer = fingerprint(cert)
    except ValueError:
        return "their signature line holds no certificate"
    if signer != signature.signer or not signed_by(
        signed_payload(signature.session, signature.signed_ns, b"".join(block.lines)),
        signature.signature,
        cert,
    ):
        return (
            "their signature does not match them (changed after signing, or signed by another key)"
        )
    if why := signer_problem(cert, signature.signed_ns):
        return f"their signer is not a broker of this exchange: {why}"
    session = sessions.get(signature.session)
    if session is None:
        return f"session {signature.session[:12]} is not one the ledger knows"
    if session.signer and session.signer != signer:
        return (
            f"session {signature.session[:12]} was opened by broker certificate "
            f"{session.signer[:16]}, not by their signer {signer[:16]}"
        )
    if session.ended:
        return f"session {signature.session[:12]} had already ended ({session.ended})"
    return None


@dataclass(frozen=True)
class Review:
    """A journal judged: what may be replayed, and what is refused, with why."""

    accepted: list[Block]
    refused: list[tuple[Block, str]]
    settled: list[Block] = dataclasses.field(default_factory=list)  # all in the ledger already

    @property
    def settled_records(self) -> int:
        return sum(len(block.lines) for block in self.settled)

    @property
    def refused_lines(self) -> int:
        return sum(block.line_count for block, _ in self.refused)

    def reasons(self) -> str:
        """``N lines: why; …`` for a log line or a report."""
        counts: dict[str, int] = {}
        for block, why in self.refused:
            counts[why] = counts.get(why, 0) + block.line_count
        return "; ".join(f"{n} lines: {why}" for why, n in counts.items())


def review(
    found: list[Block],
    sessions: Mapping[str, Session],
    signer_problem: Callable[[bytes, int], str | None],
    written: Collection[str] = frozenset(),
) -> Review:
    """Judge every block; ``written``: request ids of the journal's records the ledger holds
    (``in_ledger``): a block of records all among them is settled, whoever signed it."""
    accepted, refused, settled = [], [], []
    for block in found:
        records = block.records
        if records is not None and all(r.request_id in written for r in records):
            settled.append(block)
            continue
        why = refusal(block, sessions, signer_problem)
        if why is None:
            accepted.append(block)
        else:
            refused.append((block, why))
    return Review(accepted, refused, settled)


def in_ledger(
    found: Iterable[Block], records_between: Callable[[int, int], Iterable[StoredRecord]]
) -> set[str]:
    """The request ids of the blocks' records that the ledger already holds."""
    wanted = {
        e.record.request_id: e.record.start_ns
        for block in found
        for e in block.entries
        if e.record is not None
    }
    if not wanted:
        return set()
    starts = wanted.values()
    return {
        stored.record.request_id
        for stored in records_between(min(starts), max(starts) + 1)
        if stored.record.request_id in wanted
    }


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entries: list[JournalEntry], sealer: Sealer) -> None:
        """Append the entries (all of one session) and their signature, fsynced; OSError if
        they could not be saved."""
        if not entries:
            return
        data = sign(entries, sealer, time.time_ns())
        while True:
            fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            try:
                lock(fd, fcntl.LOCK_EX, self.path)
                if _same_file(fd, self.path):
                    # After a line a crash cut short, start a new line: this append's lines
                    # must be exactly the lines its signature covers.
                    size = os.fstat(fd).st_size
                    start = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
                    _write_all(fd, start + data)
                    sync_directory(self.path.parent)
                    return
            finally:
                os.close(fd)  # and the lock with it
            # A start rewrote the journal while this waited for the lock: append to the new one.

    def settle(self, session: str, written: Collection[str]) -> int:
        """Remove the session's blocks whose records are all among ``written`` (request ids
        the writer put in the ledger after journaling them); how many records went."""
        with self.exclusive() as held:
            keep, gone = [], 0
            for block in held.blocks:
                records = block.records
                if (
                    block.session == session
                    and records is not None
                    and all(r.request_id in written for r in records)
                ):
                    gone += len(records)
                else:
                    keep.append(block)
            if gone:
                held.replace(keep)
        return gone

    @contextlib.contextmanager
    def reading(self) -> Iterator[list[Block]]:
        """Every block, with no append or start changing the journal until the block ends
        (for ``ledger verify``: read the sessions inside, and they match the journal)."""
        with self._locked(os.O_RDONLY, fcntl.LOCK_SH) as found:
            yield found

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[HeldJournal]:
        """The journal, locked against appends, to be read and then replaced."""
        with self._locked(os.O_RDWR, fcntl.LOCK_EX) as found:
            yield HeldJournal(self.path, found)

    @contextlib.contextmanager
    def _locked(self, flags: int, how: int) -> Iterator[list[Block]]:
        while True:
            try:
                fd = open_regular(self.path, flags)
            except FileNotFoundError:
                yield []
                return
            try:
                lock(fd, how, self.path)
                if not _same_file(fd, self.path):
                    continue  # a start replaced it while this waited: lock the new one
                found = blocks(read_capped(fd, self.path))
                yield found
                return
            finally:
                os.close(fd)


class HeldJournal:
    def __init__(self, path: Path, found: list[Block]) -> None:
        self.path = path
        self.blocks = found

    def set_aside(self, refused: list[tuple[Block, str]]) -> Path:
        """Append refused lines, each with why, to ``<journal>.rejected`` (0600, fsynced)."""
        path = rejected_path(self.path)
        found_ns = time.time_ns()
        data = b"".join(
            json.dumps(
                {
                    "found_ns": found_ns,
                    "reason": why,
                    "line": raw.rstrip(b"\n").decode("utf-8", "surrogateescape"),
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
            for block, why in refused
            for raw in (*block.lines, *((block.signature_line,) if block.signature_line else ()))
        )
        try:
            fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            raise OSError(e.errno, f"{path}: {e.strerror or e}") from e
        sync_directory(path.parent)
        return path

    def replace(self, keep: list[Block]) -> None:
        """Leave only ``keep`` in the journal, as found (none: remove it)."""
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            sync_directory(self.path.parent)
            return
        # A temporary name of its own, created exclusively: nothing planted at a known name
        # (a symlink, a FIFO) is followed or written through.
        replace_file(self.path, b"".join(block.raw for block in keep), 0o600)


def rejected_lines(journal: Path) -> int:
    """How many lines earlier starts set aside in ``<journal>.rejected``."""
    path = rejected_path(journal)
    try:
        fd = open_regular(path, os.O_RDONLY)
        try:
            return read_capped(fd, path).count(b"\n")
        finally:
            os.close(fd)
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise OSError(e.errno, f"{path}: {e.strerror or e}") from e


def open_regular(path: Path, flags: int) -> int:
    """Open a journal-family file (created 0600 with O_CREAT) that must be a regular file:
    no symlink followed, no FIFO or device waited on. OSError naming what is there instead."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(
                errno.ELOOP, "it is a symbolic link; the journal's files must be regular files"
            ) from e
        if e.errno == errno.ENXIO:  # a FIFO with no reader, opened to write
            raise OSError(e.errno, "it is a FIFO, not a regular file") from e
        raise
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            kind = "a directory" if stat.S_ISDIR(found.st_mode) else "a FIFO, device or socket"
            raise OSError(errno.EINVAL, f"it is {kind}, not a regular file")
        if found.st_mode & 0o077 and flags & (os.O_WRONLY | os.O_RDWR):
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(fd: int, path: Path) -> bytes:
    """The file's bytes, up to MAX_JOURNAL_BYTES; OSError beyond."""
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read(MAX_JOURNAL_BYTES + 1)
    if len(data) > MAX_JOURNAL_BYTES:
        raise OSError(
            errno.EFBIG,
            f"it holds more than {MAX_JOURNAL_BYTES} bytes, more than any outage leaves; "
            "move it away and look into it",
        )
    return data


def lock(fd: int, how: int, path: Path) -> None:
    """flock, waiting at most ``LOCK_WAIT_S`` and saying so in the log while it waits."""
    limit = LOCK_WAIT_S
    started = time.monotonic()
    said = -_LOCK_LOG_S
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - started
        if waited >= limit:
            raise OSError(
                errno.EWOULDBLOCK,
                f"another process has held its lock for {limit:g} s; is another broker "
                "starting, or someone holding it? Giving up",
            )
        if waited - said >= _LOCK_LOG_S:
            log.warning(
                "ledger: waiting for the journal lock on %s (held by another process)", path
            )
            said = waited
        time.sleep(min(delay, max(0.0, limit - waited)))
        delay = min(delay * 2, 0.25)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.lstat(path).st_ino
    except FileNotFoundError:
        return False
