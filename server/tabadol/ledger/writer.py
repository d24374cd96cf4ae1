"""The ledger writer: records come in from the request path, go to disk in sealed batches.

The request path never waits on the disk (except in strict mode, where it waits for its
own record). A background thread commits what has queued up every ``batch_interval`` as one
transaction, with a seal signed by the broker in the same transaction: whatever is on disk
is sealed, even after a kill -9. If the ledger cannot be written, records stay queued, are
saved in the journal beside the ledger, and the thread retries; once ``buffer_records`` are
waiting, or the oldest has waited ``max_unwritten`` seconds, ``accepting`` turns False and
the broker refuses new calls. A stop writes the backlog to the ledger, else to the journal
(the next start writes it to the ledger), else raises RecordsLost; each writer's session in
the ledger lets ``ledger verify`` show a writer that lost records (docs/ledger.md). Every
journal append is signed with the broker's key, and a start replays only what a broker of
this exchange signed for a session the ledger knows, with the certificate that opened that
session: the journal is no way in for records the broker never wrote. Once what a session
journaled during an outage is in the ledger, the session takes it out of the journal.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path

from tabadol.errors import TabadolError
from tabadol.ledger.journal import Journal, JournalEntry, in_ledger, open_regular, review
from tabadol.ledger.record import LedgerRecord, Seal
from tabadol.ledger.seal import Sealer
from tabadol.ledger.sessions import ABANDONED, CLEAN, JOURNALED, Session, alive, process_tag
from tabadol.ledger.store import LedgerStore, LedgerWriteError
from tabadol.ledger.store.sqlite import make_private
from tabadol.ledger.verify import read_anchor

log = logging.getLogger("tabadol.ledger")

_MAX_BATCH = 5000
_MAX_BACKOFF_S = 2.0


class RecordsLost(TabadolError):
    """A stop could save records of answered calls neither in the ledger nor in the journal."""

    def __init__(self, count: int, message: str) -> None:
        super().__init__(message)
        self.count = count


def _refuse_lost_batches(anchor: Path, chain: str, last: Seal | None) -> None:
    """LedgerWriteError when the seals witness holds seals the ledger no longer has (a
    restore that lost batches): a start would seal new batches under their numbers and
    break the chain for good."""
    try:
        witnessed = [seal for seal in read_anchor(anchor) if seal.chain == chain]
    except TabadolError as e:
        raise LedgerWriteError(str(e)) from e
    if not witnessed or (last is not None and witnessed[-1].seq <= last.seq):
        return
    held = f"seal {last.seq} over {last.count} records" if last is not None else "no seal"
    raise LedgerWriteError(
        f"the ledger has lost sealed batches: this node's seals witness {anchor} holds seal "
        f"{witnessed[-1].seq} over {witnessed[-1].count} records"
        f"{f' of chain {chain}' if chain else ''}, the ledger only {held} (a restore that "
        "lost them?). Starting would seal new batches under their numbers and break the "
        "chain for good: restore the lost batches (replay the archived WAL, or an older "
        f"copy), or, if they are lost for good, move {anchor} aside, keep it as evidence "
        "of the loss, and start again"
    )


class LedgerWriter:
    def __init__(
        self,
        store: LedgerStore,
        sealer: Sealer,
        *,
        batch_interval_s: float = 0.1,
        buffer_records: int = 100_000,
        max_unwritten_s: float = 5.0,
        strict: bool = False,
        anchor: Path | None = None,
        journal: Path | None = None,
        journal_signers: Callable[[bytes, int], str | None] | None = None,
        instance: str = "",
        digest_key: bytes | None = None,
    ) -> None:
        """Recover what stopped writers left in the journal, then start a session: raises
        LedgerWriteError if the ledger (or the journal) cannot be written now.

        ``journal_signers(cert_pem, signed_ns)`` says why a certificate could not vouch for
        journal lines it signed then (``signers.signer_check``), or None; a journal needs it.
        """
        if journal is not None and journal_signers is None:
            raise ValueError("a journal needs journal_signers to judge its signatures")
        self._store = store
        self._sealer = sealer
        # The journal is signed by the certificate that opened the session, the only one whose
        # journal lines count for it at the next start, even after a reload onto another.
        self._journal_sealer = sealer
        self._interval = batch_interval_s
        self._limit = buffer_records
        self._max_unwritten = max_unwritten_s
        self.strict = strict
        self._anchor = anchor
        self._journal = Journal(journal) if journal is not None else None
        self._journal_signers = journal_signers
        self._keyed = (
            hmac.new(digest_key, digestmod=hashlib.sha256) if digest_key is not None else None
        )
        # (record, strict mode's future, monotonic time it was queued)
        self._queue: collections.deque[tuple[LedgerRecord, Future[None] | None, float]] = (
            collections.deque()
        )
        self._journaled = 0  # how many records at the front of the queue the journal holds
        self._journaled_ids: set[str] = set()  # their request ids, until written and settled
        self._wake = threading.Condition()
        self._closing = False
        self.problem: str | None = None  # why the last write failed, until one succeeds
        self.journal_problem: str | None = None
        self.accepted = 0
        self.written = 0
        if anchor is not None:
            make_private(anchor)  # the journal's own files are checked as they are opened
        self.chain = store.chain_for(instance)
        last = store.last_seal(self.chain)
        if anchor is not None:
            _refuse_lost_batches(anchor, self.chain, last)
        self._last_sealed_ns = last.sealed_ns if last is not None else 0
        self._last_seal_seq = last.seq if last is not None else 0
        pid = os.getpid()
        self.session = Session(
            id=uuid.uuid4().hex,
            instance=instance,
            mode="strict" if strict else "batched",
            host=socket.gethostname(),
            pid=pid,
            process=process_tag(pid) or "",
            opened_ns=time.time_ns(),
            signer=sealer.signer,
        )
        self._recover()
        store.open_session(self.session)
        self._thread = threading.Thread(target=self._run, name="tabadol-ledger", daemon=True)
        self._thread.start()

    def use_sealer(self, sealer: Sealer) -> None:
        """Seal with a new broker identity from the next batch on (after a reload)."""
        self._sealer = sealer

    def payload_digest(self) -> hmac.HMAC:
        """A keyed digest of one direction of a call's payload ([ledger] payload_digests)."""
        if self._keyed is None:
            raise ValueError("payload digests need the key: pass digest_key")
        return self._keyed.copy()  # the key is set up once, not for every call

    @property
    def max_unwritten_s(self) -> float:
        """How long a record may wait for the ledger before the broker fails closed."""
        return self._max_unwritten

    @property
    def backlog(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        """False once the buffer is full or the oldest record has waited too long: the
        broker then refuses new calls."""
        if len(self._queue) >= self._limit:
            return False
        try:
            oldest = self._queue[0][2]
        except IndexError:
            return True
        return time.monotonic() - oldest <= self._max_unwritten

    def submit(self, record: LedgerRecord) -> Future[None] | None:
        """Queue a record. In strict mode, a future that completes once it is on disk."""
        done: Future[None] | None = Future() if self.strict else None
        self.accepted += 1
        self._queue.append((record, done, time.monotonic()))
        if self.strict or len(self._queue) >= _MAX_BATCH:
            with self._wake:
                self._wake.notify()
        return done

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop. What the ledger cannot take goes to the
        journal; RecordsLost if it cannot go there either."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        try:
            self._end_session()
        finally:
            self._store.close()

    def _end_session(self) -> None:
        backlog, problem = len(self._queue), self.problem
        if not backlog:
            try:
                self._store.end_session(
                    self.session.id, CLEAN, time.time_ns(), self.accepted, self.written
                )
                return
            except LedgerWriteError as e:
                problem = str(e)  # the journal keeps the closing line instead
        try:
            self._save_backlog()
            self._journal_append(
                [JournalEntry(self.session.id, closed=(self.accepted, self.written))]
            )
        except OSError as e:
            lost = backlog - self._journaled
            where = self._journal.path if self._journal is not None else "(none)"
            why = e.strerror or str(e)
            if lost:
                raise RecordsLost(
                    lost,
                    f"ledger: {lost} records of calls already answered are lost: the ledger "
                    f"could not be written ({problem}) and the journal {where} could not be "
                    f"written either ({why}); `tabadol ledger verify` reports the gap",
                ) from e
            log.error(
                "ledger: cannot record that this broker stopped cleanly (%s; journal %s: %s); "
                "`tabadol ledger verify` will report a gap for it",
                problem,
                where,
                why,
            )
            return
        if backlog:
            log.warning(
                "ledger: %d records could not be written before stopping (%s); they are saved "
                "in the journal %s and written to the ledger at the next start",
                backlog,
                problem,
                self._journal.path if self._journal is not None else "",
            )

    def _journal_append(self, entries: list[JournalEntry]) -> None:
        if self._journal is None:
            raise OSError("no journal is configured")
        self._journal.append(entries, self._journal_sealer)

    def _save_backlog(self) -> None:
        """Journal (and fsync) the queued records the journal does not hold yet; OSError if
        it cannot be written."""
        count = len(self._queue)
        records = [self._queue[i][0] for i in range(self._journaled, count)]
        self._journal_append([JournalEntry(self.session.id, record=r) for r in records])
        self._journaled = count
        self._journaled_ids.update(record.request_id for record in records)

    def _recover(self) -> None:
        """Write the records stopped writers left in the journal; end their sessions.

        Only lines a broker of this exchange signed, for a session of this ledger that has
        not ended, are written; the rest are set aside in ``<journal>.rejected``."""
        if self._journal is None or self._journal_signers is None:
            sessions = {s.id: s for s in self._store.sessions() if not s.ended}
            running = {sid for sid, s in sessions.items() if alive(s) is not False}
            self._end_stopped(sessions, running, {}, {})
            return
        try:
            with self._journal.exclusive() as held:
                # Read under the journal's lock: every session that appended is in it.
                known = {s.id: s for s in self._store.sessions()}
                written = in_ledger(held.blocks, self._store.records_between)
                judged = review(held.blocks, known, self._journal_signers, written)
                if judged.settled:
                    log.info(
                        "ledger: %d records in the journal %s were already in the ledger "
                        "(written when an outage ended); dropped from the journal",
                        judged.settled_records,
                        self._journal.path,
                    )
                sessions = {sid: s for sid, s in known.items() if not s.ended}
                running = {sid for sid, s in sessions.items() if alive(s) is not False}
                entries = [e for block in judged.accepted for e in block.entries]
                # A session that left its closing line has stopped, whatever its pid says.
                closed = {e.session: e.closed for e in entries if e.closed is not None}
                running -= closed.keys()
                recovered = self._replay(
                    [e for e in entries if e.session not in running and e.record is not None]
                )
                self._end_stopped(sessions, running, closed, recovered)
                if judged.refused:
                    aside = held.set_aside(judged.refused)
                    log.error(
                        "ledger: REJECTED %d lines of the journal %s: they could not be "
                        "verified and were NOT written to the ledger (%s); they are kept in "
                        "%s, and `tabadol ledger verify` fails until someone has looked into "
                        "them",
                        judged.refused_lines,
                        self._journal.path,
                        judged.reasons(),
                        aside,
                    )
                held.replace([b for b in judged.accepted if b.session in running])
        except OSError as e:
            raise LedgerWriteError(
                f"{self._journal.path}: cannot recover the journal: {e.strerror or e}"
            ) from e

    def _replay(self, entries: list[JournalEntry]) -> dict[str, int]:
        """Write journaled records not already in the ledger, in sealed batches; how many
        per session."""
        records = [(e.session, e.record) for e in entries if e.record is not None]
        if not records:
            return {}
        starts = [record.start_ns for _, record in records]
        seen = {
            stored.record.request_id
            for stored in self._store.records_between(min(starts), max(starts) + 1)
        }
        fresh = []
        for sid, record in records:  # once each, even if a signed append appears twice
            if record.request_id not in seen:
                seen.add(record.request_id)
                fresh.append((sid, record))
        for i in range(0, len(fresh), _MAX_BATCH):
            self._witness(self._append([r for _, r in fresh[i : i + _MAX_BATCH]]))
        per_session = dict(collections.Counter(sid for sid, _ in fresh))
        if fresh:
            log.warning(
                "ledger: wrote %d records that stopped brokers had saved in the journal %s (%s)",
                len(fresh),
                self._journal.path if self._journal is not None else "",
                ", ".join(f"session {sid[:12]}: {n}" for sid, n in per_session.items()),
            )
        return per_session

    def _end_stopped(
        self,
        sessions: dict[str, Session],
        running: set[str],
        closed: dict[str, tuple[int, int]],
        recovered: dict[str, int],
    ) -> None:
        now = time.time_ns()
        for sid, session in sessions.items():
            if sid in running:
                continue
            if sid in closed:
                accepted, written = closed[sid]
                self._store.end_session(
                    sid, JOURNALED, now, accepted, written + recovered.get(sid, 0)
                )
                continue
            self._store.end_session(sid, ABANDONED, now, None, None)
            if session.mode != "strict":
                log.warning(
                    "ledger: broker session %s (pid %d) stopped without a clean stop; records "
                    "of calls it answered may be missing, and `tabadol ledger verify` says so",
                    sid[:12],
                    session.pid,
                )

    def _append(self, records: list[LedgerRecord]) -> Seal:
        sealer = self._sealer

        def seal_now(seq: int, count: int, head: str) -> Seal:
            if seq <= self._last_seal_seq:
                # Inside the transaction: nothing is written on a chain that went back.
                raise LedgerWriteError(
                    f"the ledger no longer holds this node's chain{f' {self.chain}' if self.chain else ''} "
                    f"as it sealed it: this node's last seal was {self._last_seal_seq}, the "
                    f"ledger now ends before seal {seq} (sealed batches were removed): calls "
                    "are refused; `tabadol ledger verify` shows the break"
                )
            # Dated inside the write transaction, so several writers sharing one ledger date
            # their seals in the order the chain holds them; and never before this writer's
            # last seal (`ledger verify` requires seal times not to go back), even if the
            # clock does.
            return sealer.seal(
                seq, count, head, max(time.time_ns(), self._last_sealed_ns), self.chain
            )

        seal = self._store.append_sealed(  # LedgerWriteError: nothing was written
            records, seal_now, sealer.cert_pem, self.chain, self.session.id
        )
        self._last_sealed_ns = seal.sealed_ns
        self._last_seal_seq = seal.seq
        return seal

    def _run(self) -> None:
        failures = 0
        while True:
            with self._wake:
                if not self._closing and (not self.strict or not self._queue):
                    self._wake.wait(
                        self._interval
                        if not self.problem
                        else min(_MAX_BACKOFF_S, self._interval * 2**failures)
                    )
                closing = self._closing
            if self._queue:
                try:
                    self._write_batch()
                    failures = 0
                except LedgerWriteError as e:
                    failures += 1
                    if self.problem != str(e):
                        log.error(
                            "ledger: cannot write (%s); %d records waiting", e, len(self._queue)
                        )
                    self.problem = str(e)
                    self._journal_waiting()
                    if closing and failures > 1:  # what waits is in the journal by now
                        return
                    continue
            if closing and not self._queue:
                return

    def _journal_waiting(self) -> None:
        """While the ledger cannot be written, keep what waits safe in the journal too."""
        try:
            self._save_backlog()
        except OSError as e:
            why = e.strerror or str(e)
            if self.journal_problem != why:
                log.error(
                    "ledger: cannot save the waiting records in the journal %s either: %s",
                    self._journal.path if self._journal is not None else "",
                    why,
                )
            self.journal_problem = why
        else:
            self.journal_problem = None

    def _write_batch(self) -> None:
        batch = [self._queue[i] for i in range(min(_MAX_BATCH, len(self._queue)))]
        seal = self._append([record for record, _, _ in batch])  # on error the batch stays
        for _ in batch:
            self._queue.popleft()
        had_journaled = self._journaled
        self._journaled = max(0, self._journaled - len(batch))
        if had_journaled and not self._journaled:
            self._settle()
        self.written += len(batch)
        if self.problem is not None:
            log.warning("ledger: writing again after: %s", self.problem)
            self.problem = None
        for _, done, _ in batch:
            if done is not None:
                done.set_result(None)
        self._witness(seal)

    def _settle(self) -> None:
        """Everything journaled is in the ledger now: take it out of the journal, or the
        next start would find it there after this session ended."""
        if self._journal is None:
            return
        try:
            gone = self._journal.settle(self.session.id, self._journaled_ids)
        except OSError as e:
            log.error(
                "ledger: cannot remove the records written since from the journal %s (%s); "
                "the next start finds them in the ledger and drops them",
                self._journal.path,
                e.strerror or e,
            )
        else:
            log.info(
                "ledger: %d journaled records are in the ledger now; removed from %s",
                gone,
                self._journal.path,
            )
        self._journaled_ids.clear()

    def _witness(self, seal: Seal) -> None:
        """Append the seal to the anchor file: a copy outside the database to detect truncation."""
        if self._anchor is None:
            return
        fields = asdict(seal)
        if not seal.chain:
            del fields["chain"]  # a ledger of one chain: the anchor's lines as they always were
        line = (json.dumps(fields) + "\n").encode()
        try:
            # Never through a link a local writer of the directory planted, nor into a FIFO.
            fd = open_regular(self._anchor, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            log.error(
                "ledger: cannot append to the anchor file %s: %s",
                self._anchor,
                e.strerror,
            )
