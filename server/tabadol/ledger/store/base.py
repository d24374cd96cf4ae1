"""The ledger's storage interface, split by role: the append-only log (chains of records,
their seals, the writers' sessions) and the queries the reports and the dashboard run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tabadol.ledger.record import LedgerRecord, Seal, StoredRecord
from tabadol.ledger.rollup import Histogram, Rollup
from tabadol.ledger.sessions import Session

UNAVAILABLE = 14  # gRPC's code when the provider could not be reached: it answered nothing


class LedgerWriteError(Exception):
    """The ledger could not be written (disk full, locked, read-only...); the text says why."""


class LedgerMissing(LedgerWriteError):
    """There is no ledger to read yet: no broker has written one where the settings say."""


@dataclass(frozen=True)
class CallGroup:
    """Calls in a time range that share consumer, provider, service, method, status,
    whether the consumer's certificate identified it, the grant that admitted them and the
    protocol they came in by."""

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
    grant: str = ""  # the id of the grant that admitted these calls; "" when none did
    protocol: str = "grpc"  # what these calls came in by: grpc, connect or rest


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

    def answered_histograms(self, start_ns: int, end_ns: int) -> dict[str, Histogram]:
        """Per provider, the duration histogram (``tabadol.ledger.rollup``) of the calls it
        answered in the range: forwarded, and not UNAVAILABLE. Providers that answered
        none are left out."""
        ...

    def count_between(self, start_ns: int, end_ns: int) -> int: ...

    def latency_percentiles(
        self,
        start_ns: int,
        end_ns: int,
        percents: Sequence[int],
        consumers: Sequence[str] | None = None,
    ) -> dict[str, tuple[int, dict[int, int]]]:
        """Per service: (calls, {percent: nearest-rank duration in ns, read from the
        histograms}) of verified consumers' calls; with ``consumers``, only their calls (and
        those a ledger written before consumers were marked names no consumer for)."""
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


class RollupLog(Protocol):
    """Rollups (``tabadol.ledger.rollup``) kept beside the records: each batch's rollup is
    added in the transaction that writes the batch, so they never drift from the ledger.
    The queries above read them for whole Asia/Tehran days, and records only at the edges
    of a range that does not start and end at midnight. Rows of archived records are kept
    apart (``archived``), so reports still count them and verify still checks the rest."""

    def rollup_rows(
        self, chain: str = "", *, archived: bool = False, days: tuple[int, int] | None = None
    ) -> Rollup:
        """A chain's rollup rows: those of its live records, or of its archived ones; with
        ``days`` (a, b), only those of the days that start in [a, b)."""
        ...

    def rebuild_rollup(self, chain: str = "") -> Rollup:
        """Replace a chain's live rollup rows with the rollup of its live records, in one
        transaction; the rows of archived records stay. Returns what the rows held before."""
        ...


@dataclass(frozen=True)
class ArchivedPrefix:
    """Where a chain's live part begins: its records up to seal ``seal.seq`` (record
    ``seal.count``) were archived (``tabadol ledger archive``) and removed from the store."""

    chain: str
    seal: Seal  # the last archived seal: the live chain continues from its head digest
    archived_ns: int  # when it was removed
    archive: str  # the archive file's name and SHA-256, as the archiver wrote them
    rollup_sha256: str  # Rollup.digest() of the chain's archived rollup rows after the move
    signature: str  # the archiver's ECDSA signature (hex) over statement()
    certificate: bytes  # the archiver's certificate (PEM)

    def statement(self) -> bytes:
        """What the archiver signs: this prefix, and the archived rollup rows' digest."""
        seal = self.seal
        fields = [self.chain, seal.seq, seal.count, seal.head_digest, self.archived_ns,
                  self.archive, self.rollup_sha256]  # fmt: skip
        return b"tabadol-ledger-archived:v1:" + json.dumps(fields).encode()


def signed_prefix(
    chain: str,
    through: Seal,
    archived_ns: int,
    archive: str,
    archived_rows: Rollup,
    sign_with: Callable[[bytes], str],
    signer_pem: bytes,
) -> ArchivedPrefix:
    """The prefix a store notes, its statement signed over ``archived_rows`` (the chain's
    archived rollup rows as the move left them, read back inside its transaction)."""
    unsigned = ArchivedPrefix(
        chain, through, archived_ns, archive, archived_rows.digest(), "", signer_pem
    )
    return dataclasses.replace(unsigned, signature=sign_with(unsigned.statement()))


def archived_rows_problem(previous: ArchivedPrefix | None, archived_rows: Rollup) -> str | None:
    """Why a chain's archived rollup rows are not those its last archiving signed (no
    prefix: no rows), so a removal would sign rows someone else wrote; None: they are."""
    signed = previous.rollup_sha256 if previous is not None else Rollup().digest()
    if archived_rows.digest() == signed:
        return None
    return (
        "the chain's archived rollup rows are not those its last archiving signed (they "
        "were changed since; `tabadol ledger verify` says so): nothing removed"
    )


class ArchiveLog(Protocol):
    """Removing a chain's oldest sealed batches once they are safe in archive files."""

    def archived(self, chain: str = "") -> ArchivedPrefix | None:
        """The chain's archived prefix; None when nothing was archived."""
        ...

    def remove_archived(
        self,
        chain: str,
        through: Seal,
        archived_ns: int,
        archive: str,
        sign_with: Callable[[bytes], str],
        signer_pem: bytes,
    ) -> ArchivedPrefix:
        """In one transaction: remove the chain's records 1..``through.count`` and seals
        1..``through.seq`` (and their timestamps), move their rollup to the archived rows,
        and note the prefix, its statement signed with ``sign_with`` over the archived rows'
        digest as they are then. Refuses (LedgerWriteError) unless ``through`` is a seal the
        chain holds, after any prefix already archived, and the archived rows are still those
        the previous prefix signed (none: none). Returns the prefix noted."""
        ...


class LedgerStore(LedgerLog, LedgerQueries, TimestampLog, RollupLog, ArchiveLog, Protocol):
    """A store that is all of these: every implementation here is."""
