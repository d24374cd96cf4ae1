"""The ledger's storage interface, split by role: the append-only log (chains of records,
their seals, the writers' sessions) and the queries the reports and the dashboard run."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tabadol.ledger.record import LedgerRecord, Seal, StoredRecord
from tabadol.ledger.sessions import Session

UNAVAILABLE = 14  # gRPC's code when the provider could not be reached: it answered nothing


class LedgerWriteError(Exception):
    """The ledger could not be written (disk full, locked, read-only...); the text says why."""


class LedgerMissing(LedgerWriteError):
    """There is no ledger to read yet: no broker has written one where the settings say."""


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


def nearest_rank(n: int, percent: int) -> int:
    """The 1-based rank of a percentile among ``n`` sorted values (nearest-rank method)."""
    return (n * percent + 99) // 100


def percentile_table(
    rows: Iterable[tuple[str, int, int, int]], percents: Sequence[int]
) -> dict[str, tuple[int, dict[int, int]]]:
    """(service, n, rank, duration) rows of the ranks asked for, into per service: (calls,
    {percent: duration})."""
    result: dict[str, tuple[int, dict[int, int]]] = {}
    for service, n, rank, duration in rows:
        _, table = result.setdefault(service, (n, {}))
        for p in percents:
            if nearest_rank(n, p) == rank:
                table[p] = duration
    return result


class LedgerLog(Protocol):
    """Hash chains of records, sealed in batches. One chain per writer name (a broker node's
    ``instance``) where the store can keep several (``chain_for``), so nodes never wait on
    each other; SQLite keeps one chain that every writer extends in turn."""

    def chain_for(self, instance: str) -> str:
        """The chain a writer named ``instance`` extends."""
        ...

    def chains(self) -> list[str]:
        """The chains that hold records or seals, in name order."""
        ...

    def head(self, chain: str = "") -> tuple[int, str]:
        """(number of records, digest of the last one) of a chain: (0, GENESIS) when empty."""
        ...

    def append_sealed(
        self,
        records: Sequence[LedgerRecord],
        seal_with: Callable[[int, int, str], Seal],
        signer_pem: bytes,
        chain: str = "",
        session: str = "",
    ) -> Seal:
        """Chain ``records`` onto the chain's head as it stands inside the write transaction
        and seal them with ``seal_with(seal_seq, count, head_digest)``, all or nothing; safe
        with several writers of one chain. With ``session``, that writer's count of records
        written grows in the same transaction (verify knows what a running node wrote)."""
        ...

    def records(self, chain: str = "", from_seq: int = 1) -> Iterator[StoredRecord]:
        """A chain's records from ``from_seq`` on, in order of position."""
        ...

    def records_between(self, start_ns: int, end_ns: int) -> Iterator[StoredRecord]:
        """Every chain's records whose call started in [start_ns, end_ns)."""
        ...

    def seals(self, chain: str = "") -> Iterator[Seal]: ...

    def last_seal(self, chain: str = "") -> Seal | None: ...

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

    def close(self) -> None: ...


class LedgerQueries(Protocol):
    """Aggregates over every chain's records, for the reports and the dashboard."""

    def records_count(self) -> int:
        """How many records all chains hold (changes whenever a batch is written)."""
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


@dataclass(frozen=True)
class SealTimestamp:
    """An RFC 3161 timestamp token a TSA signed over a seal's payload (docs/ledger.md)."""

    chain: str
    seal_seq: int
    token: bytes  # DER TimeStampToken (a CMS ContentInfo), as `openssl ts -verify -token_in` reads
    gen_time_ns: int  # the time the TSA put in it (UTC, ns)


class TimestampLog(Protocol):
    """Trusted timestamps of seals. The timestamper works along a chain in order, so the
    seals waiting for one are those after the last timestamped seal."""

    def add_timestamp(self, chain: str, seal_seq: int, token_der: bytes, gen_time_ns: int) -> None:
        """Keep a seal's token; a seal already timestamped keeps its first one."""
        ...

    def timestamps(self, chain: str = "") -> Iterator[SealTimestamp]:
        """A chain's tokens, in order of seal."""
        ...

    def untimestamped(self, chain: str = "", limit: int = 100) -> list[Seal]:
        """The first ``limit`` seals after the chain's last timestamped seal, in order."""
        ...

    def untimestamped_count(self, chain: str = "") -> int:
        """How many seals follow the chain's last timestamped seal."""
        ...


class LedgerStore(LedgerLog, LedgerQueries, TimestampLog, Protocol):
    """A store that is all of these: every implementation here is."""
