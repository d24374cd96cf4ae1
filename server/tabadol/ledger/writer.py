"""The ledger writer: records come in from the request path, go to disk in sealed batches.

The request path never waits on the disk (except in strict mode, where it waits for its
own record). A background thread commits what has queued up every ``batch_interval`` as one
transaction, with a seal signed by the broker in the same transaction: whatever is on disk
is sealed, even after a kill -9. If the ledger cannot be written, records
stay queued and the thread retries; once ``buffer_records`` are waiting, ``accepting``
turns False and the broker refuses new calls: no exchange goes unaccounted.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path

from tabadol.ledger.record import LedgerRecord, Seal
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import LedgerStore, LedgerWriteError

log = logging.getLogger("tabadol.ledger")

_MAX_BATCH = 5000
_MAX_BACKOFF_S = 2.0


class LedgerWriter:
    def __init__(
        self,
        store: LedgerStore,
        sealer: Sealer,
        *,
        batch_interval_s: float = 0.1,
        buffer_records: int = 100_000,
        strict: bool = False,
        anchor: Path | None = None,
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._interval = batch_interval_s
        self._limit = buffer_records
        self.strict = strict
        self._anchor = anchor
        self._queue: collections.deque[tuple[LedgerRecord, Future[None] | None]] = (
            collections.deque()
        )
        self._wake = threading.Condition()
        self._closing = False
        self.problem: str | None = None  # why the last write failed, until one succeeds
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="tabadol-ledger", daemon=True)
        self._thread.start()

    def use_sealer(self, sealer: Sealer) -> None:
        """Seal with a new broker identity from the next batch on (after a reload)."""
        self._sealer = sealer

    @property
    def backlog(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        """False once the buffer is full: the broker then refuses new calls."""
        return len(self._queue) < self._limit

    def submit(self, record: LedgerRecord) -> Future[None] | None:
        """Queue a record. In strict mode, a future that completes once it is on disk."""
        done: Future[None] | None = Future() if self.strict else None
        self._queue.append((record, done))
        if self.strict or len(self._queue) >= _MAX_BATCH:
            with self._wake:
                self._wake.notify()
        return done

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop. A graceful stop loses nothing."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._queue:
            log.error(
                "ledger: %d records could not be written before stopping: %s",
                len(self._queue),
                self.problem,
            )
        self._store.close()

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
                    if closing and failures > 3:
                        return
                    continue
            if closing and not self._queue:
                return

    def _write_batch(self) -> None:
        batch = [self._queue[i] for i in range(min(_MAX_BATCH, len(self._queue)))]
        sealer = self._sealer
        seal = self._store.append_sealed(  # LedgerWriteError: the batch stays queued
            [record for record, _ in batch],
            lambda seq, count, head: sealer.seal(seq, count, head, time.time_ns()),
            sealer.cert_pem,
        )
        for _ in batch:
            self._queue.popleft()
        self.written += len(batch)
        if self.problem is not None:
            log.warning("ledger: writing again after: %s", self.problem)
            self.problem = None
        for _, done in batch:
            if done is not None:
                done.set_result(None)
        self._witness(seal)

    def _witness(self, seal: Seal) -> None:
        """Append the seal to the anchor file: a copy outside the database to detect truncation."""
        if self._anchor is None:
            return
        try:
            with self._anchor.open("a") as f:
                f.write(json.dumps(asdict(seal)) + "\n")
        except OSError as e:
            log.error("ledger: cannot append to the anchor file %s: %s", self._anchor, e.strerror)
