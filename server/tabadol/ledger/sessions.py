"""Writer sessions: each ledger writer says in the ledger when it starts and how it stopped,
so that answered calls it could not write show up as a gap instead of going missing.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# How a session ended; "" while it runs (or when its process died without saying).
CLEAN = "clean"  # every record it accepted is in the ledger
JOURNALED = "journaled"  # its backlog went to the journal; a later start wrote it
ABANDONED = "abandoned"  # its process was found gone without a clean stop


@dataclass(frozen=True)
class Session:
    """One ledger writer's run: which process, and how many records it accepted and wrote."""

    id: str
    instance: str
    mode: str  # batched or strict
    host: str
    pid: int
    process: str  # process_tag(pid) when it started: tells a reused pid from the writer's
    opened_ns: int
    ended_ns: int | None = None
    ended: str = ""
    accepted: int | None = None  # records handed to the writer (calls answered or refused)
    written: int | None = None  # of them, records that reached the ledger
    acknowledged: str = ""  # who looked into its gap, when and why (`ledger acknowledge`)
    # The fingerprint of the broker certificate that opened it: the only signer whose journal
    # lines count for it ("" in a ledger from before sessions were bound to a signer).
    signer: str = ""

    @property
    def missing(self) -> int:
        return max(0, (self.accepted or 0) - (self.written or 0))


def process_tag(pid: int) -> str | None:
    """What tells this process from a later one with the same pid; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # Linux, and no such process
        try:  # no /proc: the pid alone
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    except OSError:
        return ""
    state, *rest = stat.rsplit(")", 1)[1].split()
    if state in ("Z", "X"):  # dead, waiting to be reaped
        return None
    return f"{boot}:{rest[18]}"  # field 22 of stat: the process's start time in clock ticks


def alive(session: Session) -> bool | None:
    """Whether the session's process still runs; None when it ran on another host."""
    if session.host != socket.gethostname():
        return None
    return process_tag(session.pid) == session.process


def _when(ns: int | None) -> str:
    if ns is None:
        return "?"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="seconds")


_UNSAVED = (
    "stopped without a clean stop and without saving the records it had not yet written: "
    "the calls it answered in its last moments are missing from the ledger (how many is unknown)"
)


@dataclass(frozen=True)
class SessionFinding:
    gap: bool  # True: answered calls are missing from the ledger; verify fails
    text: str

    def __str__(self) -> str:
        return f"{'GAP' if self.gap else 'NOTE'}: {self.text}"


def session_findings(
    sessions: Iterable[Session],
    alive: Callable[[Session], bool | None],
    journaled: Callable[[str], int | None],
) -> list[SessionFinding]:
    """What the sessions say about answered calls missing from the ledger. Pure.

    ``journaled(session_id)`` is how many of a session's records wait in the journal when
    it left its closing line there (the next start writes them), else None.
    """
    findings = []
    for s in sessions:
        finding = _finding(s, alive, journaled)
        if finding is None:
            continue
        if finding.gap and s.acknowledged:
            finding = SessionFinding(
                False, f"{finding.text} (gap acknowledged by {s.acknowledged})"
            )
        findings.append(finding)
    return findings


def _finding(
    s: Session,
    alive: Callable[[Session], bool | None],
    journaled: Callable[[str], int | None],
) -> SessionFinding | None:
    who = (
        f"broker session {s.id[:12]} (instance {s.instance!r}, pid {s.pid} on {s.host}, "
        f"started {_when(s.opened_ns)})"
    )
    if s.ended == ABANDONED:
        if s.mode == "strict":  # every call it answered waited for its record
            return None
        return SessionFinding(True, f"{who} {_UNSAVED} (found at {_when(s.ended_ns)})")
    if s.ended:
        if s.missing:
            return SessionFinding(True, f"{who} lost {s.missing} records of answered calls")
        return None
    waiting = journaled(s.id)  # a session that left its closing line has stopped
    running = alive(s) if waiting is None else False
    if running:
        return None
    if waiting is not None:
        return SessionFinding(
            False,
            f"{who} stopped with {waiting} records in the journal; the next start "
            "writes them to the ledger",
        )
    if running is None:
        return SessionFinding(
            False,
            f"{who} has not stopped cleanly; it ran on another host, so it cannot "
            "be told from here whether it still runs",
        )
    if s.mode != "strict":
        return SessionFinding(True, f"{who} {_UNSAVED}")
    return None
