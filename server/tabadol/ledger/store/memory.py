"""The ledger in memory: every chain and query of the stores on disk, for fast tests."""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tabadol.ledger.record import GENESIS, LedgerRecord, Seal, StoredRecord, chain_digest
from tabadol.ledger.sessions import Session
from tabadol.ledger.store.base import (
    UNAVAILABLE,
    CallGroup,
    LedgerWriteError,
    SealTimestamp,
    nearest_rank,
    percentile_table,
)


class MemoryLedgerStore:
    """A LedgerStore in this process's memory; one chain per writer name, as on PostgreSQL.
    ``fail`` makes every write raise LedgerWriteError with that text (an outage)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, list[StoredRecord]] = defaultdict(list)
        self._seals: dict[str, list[Seal]] = defaultdict(list)
        self._signers: dict[str, bytes] = {}
        self._sessions: dict[str, Session] = {}
        self._timestamps: dict[str, dict[int, SealTimestamp]] = defaultdict(dict)
        self.fail: str | None = None

    def _writable(self) -> None:
        if self.fail is not None:
            raise LedgerWriteError(self.fail)

    def chain_for(self, instance: str) -> str:
        return instance

    def chains(self) -> list[str]:
        with self._lock:
            named = [c for c, rows in (*self._records.items(), *self._seals.items()) if rows]
            return sorted(set(named))

    def head(self, chain: str = "") -> tuple[int, str]:
        with self._lock:
            records = self._records.get(chain)
            return (len(records), records[-1].digest) if records else (0, GENESIS)

    def append_sealed(
        self,
        records: Sequence[LedgerRecord],
        seal_with: Callable[[int, int, str], Seal],
        signer_pem: bytes,
        chain: str = "",
        session: str = "",
    ) -> Seal:
        with self._lock:
            self._writable()
            stored = self._records[chain]
            count, head = (len(stored), stored[-1].digest) if stored else (0, GENESIS)
            batch = []
            for record in records:
                count += 1
                digest = chain_digest(head, record)
                batch.append(StoredRecord(count, record, head, digest))
                head = digest
            seal = seal_with(len(self._seals[chain]) + 1, count, head)
            stored.extend(batch)
            self._seals[chain].append(seal)
            self._signers.setdefault(seal.signer, signer_pem)
            if session in self._sessions:
                before = self._sessions[session]
                self._sessions[session] = dataclasses.replace(
                    before, written=(before.written or 0) + len(batch)
                )
            return seal

    def records(self, chain: str = "", from_seq: int = 1) -> Iterator[StoredRecord]:
        with self._lock:
            snapshot = list(self._records.get(chain, ())[max(0, from_seq - 1) :])
        yield from snapshot

    def _all(self) -> list[StoredRecord]:
        with self._lock:
            return [r for chain in sorted(self._records) for r in self._records[chain]]

    def records_between(self, start_ns: int, end_ns: int) -> Iterator[StoredRecord]:
        yield from _between(self._all(), start_ns, end_ns)

    def seals(self, chain: str = "") -> Iterator[Seal]:
        with self._lock:
            snapshot = list(self._seals.get(chain, ()))
        yield from snapshot

    def last_seal(self, chain: str = "") -> Seal | None:
        with self._lock:
            seals = self._seals.get(chain)
            return seals[-1] if seals else None

    def signers(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._signers)

    def open_session(self, session: Session) -> None:
        with self._lock:
            self._writable()
            self._sessions[session.id] = session

    def end_session(
        self, session_id: str, ended: str, ended_ns: int, accepted: int | None, written: int | None
    ) -> None:
        self._update(session_id, ended=ended, ended_ns=ended_ns, accepted=accepted, written=written)

    def acknowledge_session(self, session_id: str, acknowledgement: str) -> None:
        self._update(session_id, acknowledged=acknowledgement)

    def _update(self, session_id: str, **changes: Any) -> None:
        with self._lock:
            self._writable()
            if session_id in self._sessions:
                self._sessions[session_id] = dataclasses.replace(
                    self._sessions[session_id], **changes
                )

    def sessions(self) -> list[Session]:
        with self._lock:
            return sorted(self._sessions.values(), key=lambda s: s.opened_ns)

    def add_timestamp(self, chain: str, seal_seq: int, token_der: bytes, gen_time_ns: int) -> None:
        with self._lock:
            self._writable()
            stamp = SealTimestamp(chain, seal_seq, token_der, gen_time_ns)
            self._timestamps[chain].setdefault(seal_seq, stamp)

    def timestamps(self, chain: str = "") -> Iterator[SealTimestamp]:
        with self._lock:
            snapshot = sorted(self._timestamps.get(chain, {}).items())
        yield from (stamp for _, stamp in snapshot)

    def _last_timestamped(self, chain: str) -> int:
        return max(self._timestamps.get(chain, {}), default=0)

    def untimestamped(self, chain: str = "", limit: int = 100) -> list[Seal]:
        with self._lock:
            after = self._last_timestamped(chain)
            return [s for s in self._seals.get(chain, ()) if s.seq > after][:limit]

    def untimestamped_count(self, chain: str = "") -> int:
        with self._lock:
            seals = self._seals.get(chain)
            return max(0, seals[-1].seq - self._last_timestamped(chain)) if seals else 0

    def records_count(self) -> int:
        with self._lock:
            return sum(len(records) for records in self._records.values())

    def call_groups(self, start_ns: int, end_ns: int) -> list[CallGroup]:
        groups: dict[tuple[str, str, str, str, int, bool, bool], list[int]] = {}
        for r in _in_range(self._all(), start_ns, end_ns):
            key = (
                r.consumer, r.provider, r.service, r.method, r.status_code,
                r.endpoint != "", r.consumer_verified,
            )  # fmt: skip
            calls_and_total = groups.setdefault(key, [0, 0])
            calls_and_total[0] += 1
            calls_and_total[1] += r.duration_ns
        return [
            CallGroup(c, p, s, m, code, fwd, n, total, verified)
            for (c, p, s, m, code, fwd, verified), (n, total) in sorted(groups.items())
        ]

    def durations(self, provider: str, start_ns: int, end_ns: int) -> list[int]:
        return sorted(
            r.duration_ns
            for r in _in_range(self._all(), start_ns, end_ns)
            if r.provider == provider and r.endpoint and r.status_code != UNAVAILABLE
        )

    def count_between(self, start_ns: int, end_ns: int) -> int:
        return sum(1 for _ in _in_range(self._all(), start_ns, end_ns))

    def latency_percentiles(
        self,
        start_ns: int,
        end_ns: int,
        percents: Sequence[int],
        consumers: Sequence[str] | None = None,
    ) -> dict[str, tuple[int, dict[int, int]]]:
        allowed = None if consumers is None else {"", *consumers}
        per_service: dict[str, list[int]] = defaultdict(list)
        for r in _in_range(self._all(), start_ns, end_ns):
            if r.consumer_verified and (allowed is None or r.consumer in allowed):
                per_service[r.service].append(r.duration_ns)
        rows = []
        for service in sorted(per_service):
            durations = sorted(per_service[service])
            n = len(durations)
            ranks = {nearest_rank(n, p) for p in percents} - {0}
            rows += [(service, n, rank, durations[rank - 1]) for rank in sorted(ranks)]
        return percentile_table(rows, percents)

    def provider_windows(
        self, start_ns: int, end_ns: int, window_ns: int
    ) -> dict[str, tuple[int, int]]:
        answered: dict[str, dict[int, bool]] = defaultdict(dict)
        for r in _in_range(self._all(), start_ns, end_ns):
            if r.endpoint:
                windows = answered[r.provider]
                window = (r.start_ns - start_ns) // window_ns
                windows[window] = windows.get(window, False) or r.status_code != UNAVAILABLE
        return {p: (len(w), sum(w.values())) for p, w in answered.items()}

    def close(self) -> None:
        pass


def _between(records: Iterable[StoredRecord], start_ns: int, end_ns: int) -> Iterator[StoredRecord]:
    return (r for r in records if start_ns <= r.record.start_ns < end_ns)


def _in_range(
    records: Iterable[StoredRecord], start_ns: int, end_ns: int
) -> Iterator[LedgerRecord]:
    return (r.record for r in _between(records, start_ns, end_ns))
