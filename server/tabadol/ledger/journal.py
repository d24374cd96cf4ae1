"""The journal: records of answered calls that the ledger could not take, kept on local disk.

JSON lines, appended and fsynced, beside the ledger (``<ledger path>.journal``, mode 0600).
Every line names the writer session it came from. Several broker processes may append to
one journal; ``flock`` keeps their lines whole and lets the next start rewrite it safely.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tabadol.ledger.record import FIELD_NAMES, FIELD_TYPES, LedgerRecord


def journal_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".journal")


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
        if record.keys() != set(FIELD_NAMES) or not all(
            type(record[name]) is FIELD_TYPES[name] for name in FIELD_NAMES
        ):
            return None
        return JournalEntry(fields["session"], record=LedgerRecord(**record))
    accepted, written = fields.get("accepted"), fields.get("written")
    if type(accepted) is int and type(written) is int:
        return JournalEntry(fields["session"], closed=(accepted, written))
    return None


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entries: list[JournalEntry]) -> None:
        """Append and fsync; OSError if they could not be saved."""
        if not entries:
            return
        data = b"".join(entry.line() for entry in entries)
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, self.path):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                    _sync_directory(self.path.parent)
                    return
            finally:
                os.close(fd)  # and the lock with it
            # A start rewrote the journal while this waited for the lock: append to the new one.

    def read(self) -> list[JournalEntry]:
        """Every entry, without taking the lock (for ``ledger verify``)."""
        try:
            return _parse(self.path.read_bytes())
        except FileNotFoundError:
            return []

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[HeldJournal]:
        """The journal, locked against appends, to be read and then replaced."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                yield HeldJournal(self.path, [])
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(fd, self.path):
                    continue
                with os.fdopen(os.dup(fd), "rb") as f:
                    entries = _parse(f.read())
                yield HeldJournal(self.path, entries)
                return
            finally:
                os.close(fd)


class HeldJournal:
    def __init__(self, path: Path, entries: list[JournalEntry]) -> None:
        self.path = path
        self.entries = entries

    def replace(self, keep: list[JournalEntry]) -> None:
        """Leave only ``keep`` in the journal (none: remove it)."""
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            _sync_directory(self.path.parent)
            return
        temporary = self.path.with_name(self.path.name + ".new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"".join(entry.line() for entry in keep))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        _sync_directory(self.path.parent)


def _parse(data: bytes) -> list[JournalEntry]:
    return [entry for raw in data.splitlines() if (entry := parse_line(raw)) is not None]


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
