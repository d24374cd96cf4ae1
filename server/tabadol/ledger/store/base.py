"""The ledger's storage interface: append-only records and seals, and the queries on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tabadol.ledger.record import LedgerRecord, Seal, StoredRecord
from tabadol.ledger.sessions import Session


class LedgerWriteError(Exception):
    """The ledger could not be written (disk full, locked, read-only...); the text says why."""


@dataclass(frozen=True)
class CallGroup:
    """Calls in a time range that share consumer, provider, service, method, status and
    whether the consumer's certificate identified it."""

    consumer: str
    provider: str
    service: str
    method: str
    status_code: int
    forwarded: bool  # the broker passed these calls to the provider (it did not refuse them)
    calls: int
    duration_ns_total: int
    # False: refused before identification (revoked, stale CRL...); consumer is only claimed
    verified: bool = True


class LedgerStore(Protocol):
    def head(self) -> tuple[int, str]:
        """(number of records, digest of the last one) — (0, GENESIS) when empty."""
        ...

    def append_sealed(
        self,
        records: Sequence[LedgerRecord],
        seal_with: Callable[[int, int, str], Seal],
        signer_pem: bytes,
    ) -> Seal:
        """Chain ``records`` onto the head as it stands inside the write transaction and seal
        them with ``seal_with(seal_seq, count, head_digest)``; safe with several writers."""
        ...

    def records(self, from_seq: int = 1) -> Iterator[StoredRecord]:
        """Every record from ``from_seq`` on, in order of position."""
        ...

    def records_between(self, start_ns: int, end_ns: int) -> Iterator[StoredRecord]:
        """Records whose call started in [start_ns, end_ns), in order of position."""
        ...

    def seals(self) -> Iterator[Seal]: ...

    def last_seal(self) -> Seal | None: ...

    def signers(self) -> dict[str, bytes]:
        """Signing certificates (PEM) by SHA-256 fingerprint."""
        ...

    def open_session(self, session: Session) -> None:
        """Say in the ledger that a writer has started (docs/ledger.md, "Gaps")."""
        ...

    def end_session(
        self, session_id: str, ended: str, ended_ns: int, accepted: int | None, written: int | None
    ) -> None: ...

    def sessions(self) -> list[Session]: ...

    def acknowledge_session(self, session_id: str, acknowledgement: str) -> None:
        """Record that someone looked into a session's gap (who, when, why)."""
        ...

    def call_groups(self, start_ns: int, end_ns: int) -> list[CallGroup]: ...

    def durations(self, provider: str, start_ns: int, end_ns: int) -> list[int]:
        """Durations (ns), ascending, of the calls a provider answered in the range."""
        ...

    def count_between(self, start_ns: int, end_ns: int) -> int: ...

    def latency_percentiles(
        self,
        start_ns: int,
        end_ns: int,
        percents: Sequence[int],
        consumers: Sequence[str] | None = None,
    ) -> dict[str, tuple[int, dict[int, int]]]:
        """Per service: (calls, {percent: nearest-rank duration in ns}); with ``consumers``,
        only their calls (and those a ledger written before consumers were marked names no
        consumer for)."""
        ...

    def provider_windows(
        self, start_ns: int, end_ns: int, window_ns: int
    ) -> dict[str, tuple[int, int]]:
        """Per provider: (windows in which calls reached it, windows in which it answered)."""
        ...

    def close(self) -> None: ...
