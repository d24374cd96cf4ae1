"""The ledger in memory: every chain and query of the stores on disk, for fast tests."""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from tabadol.ledger import rollup
from tabadol.ledger.record import GENESIS, LedgerRecord, Seal, StoredRecord, chain_digest
from tabadol.ledger.rollup import Histogram, Rollup
from tabadol.ledger.sessions import Session
from tabadol.ledger.store.base import (
    ArchivedPrefix,
    CallGroup,
    LedgerWriteError,
    SealTimestamp,
    archived_rows_problem,
    signed_prefix,
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
        self._archived: dict[str, ArchivedPrefix] = {}
        # Rollup rows by (chain, archived): a chain's live rows grow with each batch.
        self._rollups: dict[tuple[str, bool], Rollup] = defaultdict(Rollup)
        self.fail: str | None = None

    def _writable(self) -> None:
        if self.fail is not None:
            raise LedgerWriteError(self.fail)

    def chain_for(self, instance: str) -> str:
        return instance

    def chains(self) -> list[str]:
        with self._lock:
            named = [c for c, rows in (*self._records.items(), *self._seals.items()) if rows]
            return sorted({*named, *self._archived})

    def head(self, chain: str = "") -> tuple[int, str]:
        with self._lock:
            return self._tip(chain)[:2]

    def _tip(self, chain: str) -> tuple[int, str, int]:
        """(records, head digest, last seal's number), the archived prefix included."""
        records, seals = self._records.get(chain), self._seals.get(chain)
        prefix = self._archived.get(chain)
        start = (
            (0, GENESIS, 0)
            if prefix is None
            else (prefix.seal.count, prefix.seal.head_digest, prefix.seal.seq)
        )
        count, head = (records[-1].seq, records[-1].digest) if records else start[:2]
        return count, head, seals[-1].seq if seals else start[2]

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
            count, head, last = self._tip(chain)
            batch = []
            for record in records:
                count += 1
                digest = chain_digest(head, record)
                batch.append(StoredRecord(count, record, head, digest))
                head = digest
            seal = seal_with(last + 1, count, head)
            self._rollups[chain, False].add(rollup.rollup(records))
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
            records = self._records.get(chain, [])
            first = records[0].seq if records else 1  # after an archived prefix, not 1
            snapshot = list(records[max(0, from_seq - first) :])
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
            prefix = self._archived.get(chain)  # every seal archived: the chain goes on
            return seals[-1] if seals else prefix.seal if prefix is not None else None

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
        prefix = self._archived.get(chain)  # archived seals are done with
        return max(self._timestamps.get(chain, {}), default=prefix.seal.seq if prefix else 0)

    def untimestamped(self, chain: str = "", limit: int = 100) -> list[Seal]:
        with self._lock:
            after = self._last_timestamped(chain)
            return [s for s in self._seals.get(chain, ()) if s.seq > after][:limit]

    def untimestamped_count(self, chain: str = "") -> int:
        with self._lock:
            seals = self._seals.get(chain)
            return max(0, seals[-1].seq - self._last_timestamped(chain)) if seals else 0

    def archived(self, chain: str = "") -> ArchivedPrefix | None:
        with self._lock:
            return self._archived.get(chain)

    def remove_archived(
        self,
        chain: str,
        through: Seal,
        archived_ns: int,
        archive: str,
        sign_with: Callable[[bytes], str],
        signer_pem: bytes,
    ) -> ArchivedPrefix:
        with self._lock:
            self._writable()
            seals = self._seals.get(chain, [])
            if through not in seals:
                raise LedgerWriteError(
                    f"seal {through.seq} is not in the live ledger (chain {chain!r}) as "
                    "archived: nothing removed"
                )
            archived_rows = self._rollups.get((chain, True), Rollup())
            if why := archived_rows_problem(self._archived.get(chain), archived_rows):
                raise LedgerWriteError(why)
            records = self._records[chain]
            removed = [r for r in records if r.seq <= through.count]
            self._move_to_archived(chain, rollup.rollup(r.record for r in removed))
            self._records[chain] = records[len(removed) :]
            self._seals[chain] = [s for s in seals if s.seq > through.seq]
            stamps = self._timestamps.get(chain, {})
            for seq in [seq for seq in stamps if seq <= through.seq]:
                del stamps[seq]
            self._archived[chain] = prefix = signed_prefix(
                chain, through, archived_ns, archive, self._rollups[chain, True],
                sign_with, signer_pem,
            )  # fmt: skip
            return prefix

    def _move_to_archived(self, chain: str, removed: rollup.Rollup) -> None:
        """The removed records' rollup leaves the chain's live rows for its archived ones."""
        self._rollups[chain, False].add(removed, sign=-1)
        self._rollups[chain, True].add(removed)

    def records_count(self) -> int:
        with self._lock:
            return sum(len(records) for records in self._records.values())

    def rollup_rows(
        self, chain: str = "", *, archived: bool = False, days: tuple[int, int] | None = None
    ) -> Rollup:
        with self._lock:
            return _copy(self._rollups.get((chain, archived), Rollup()), days)

    def rebuild_rollup(self, chain: str = "") -> Rollup:
        with self._lock:
            self._writable()
            before = _copy(self._rollups.get((chain, False), Rollup()))
            live = self._records.get(chain, ())
            self._rollups[chain, False] = rollup.rollup(r.record for r in live)
            return before

    def _range(self, start_ns: int, end_ns: int) -> Rollup:
        """The rollup of the calls that started in the range: the rows of the whole days in
        it (every chain, live and archived), and the records at its edges."""
        a, b = rollup.whole_days(start_ns, end_ns)
        result = Rollup()
        with self._lock:
            for rows in self._rollups.values():
                result.add(_copy(rows, (a, b)))
        edges = (r for r in _in_range(self._all(), start_ns, end_ns) if not a <= r.start_ns < b)
        result.add(rollup.rollup(edges))
        return result

    def call_groups(self, start_ns: int, end_ns: int) -> list[CallGroup]:
        groups: dict[tuple[str, str, str, str, int, bool, bool, str, str], list[int]] = {}
        for key, totals in self._range(start_ns, end_ns).groups.items():
            calls_and_total = groups.setdefault(
                (key.consumer, key.provider, key.service, key.method, key.status_code,
                 key.forwarded, key.verified, key.grant, key.protocol),
                [0, 0],
            )  # fmt: skip
            calls_and_total[0] += totals.calls
            calls_and_total[1] += totals.duration_ns
        return [
            CallGroup(c, p, s, m, code, fwd, n, total, verified, grant, protocol)
            for (c, p, s, m, code, fwd, verified, grant, protocol), (n, total) in sorted(
                groups.items()
            )
        ]

    def answered_histograms(self, start_ns: int, end_ns: int) -> dict[str, Histogram]:
        found: dict[str, Histogram] = {}
        for key, day in self._range(start_ns, end_ns).provider_days.items():
            if day.histogram:
                rollup.add_histogram(found.setdefault(key.provider, {}), day.histogram)
        return found

    def count_between(self, start_ns: int, end_ns: int) -> int:
        return sum(totals.calls for totals in self._range(start_ns, end_ns).groups.values())

    def latency_percentiles(
        self,
        start_ns: int,
        end_ns: int,
        percents: Sequence[int],
        consumers: Sequence[str] | None = None,
    ) -> dict[str, tuple[int, dict[int, int]]]:
        allowed = None if consumers is None else {"", *consumers}
        per_service: dict[str, Histogram] = defaultdict(dict)
        for key, totals in self._range(start_ns, end_ns).groups.items():
            if key.verified and (allowed is None or key.consumer in allowed):
                rollup.add_histogram(per_service[key.service], totals.histogram)
        return {
            service: (sum(histogram.values()), rollup.percentiles(histogram, percents))
            for service, histogram in sorted(per_service.items())
        }

    def provider_windows(
        self, start_ns: int, end_ns: int, window_ns: int
    ) -> dict[str, tuple[int, int]]:
        _five_minutes(window_ns)
        found: dict[str, tuple[int, int]] = {}
        # The range's rows are summed across chains first, so a window whose calls and
        # answer were written by two nodes counts once.
        for key, day in self._range(start_ns, end_ns).provider_days.items():
            calls_mask, answered_mask = day.masks()
            if calls_mask:
                windows, answered = found.get(key.provider, (0, 0))
                found[key.provider] = (
                    windows + calls_mask.bit_count(),
                    answered + answered_mask.bit_count(),
                )
        return found

    def close(self) -> None:
        pass


def _between(records: Iterable[StoredRecord], start_ns: int, end_ns: int) -> Iterator[StoredRecord]:
    return (r for r in records if start_ns <= r.record.start_ns < end_ns)


def _in_range(
    records: Iterable[StoredRecord], start_ns: int, end_ns: int
) -> Iterator[LedgerRecord]:
    return (r.record for r in _between(records, start_ns, end_ns))


def _copy(rows: Rollup, days: tuple[int, int] | None = None) -> Rollup:
    """A copy of rollup rows (of the days that start in ``days``) that owes them nothing."""
    result = Rollup()
    for key, totals in rows.groups.items():
        if days is None or days[0] <= key.day_ns < days[1]:
            result.groups[key] = rollup.GroupTotals(
                totals.calls, totals.duration_ns, totals.request_bytes, totals.response_bytes,
                dict(totals.histogram),
            )  # fmt: skip
    for dkey, day in rows.provider_days.items():
        if days is None or days[0] <= dkey.day_ns < days[1]:
            result.provider_days[dkey] = rollup.ProviderDay(
                {index: list(counts) for index, counts in day.windows.items()},
                dict(day.histogram),
            )
    return result


def _five_minutes(window_ns: int) -> None:
    if window_ns != rollup.WINDOW_NS:
        raise ValueError(
            f"availability windows are the rollups' {rollup.WINDOW_NS // 10**9} s ones, "
            f"not {window_ns} ns (tabadol.ledger.rollup.WINDOW_NS)"
        )
