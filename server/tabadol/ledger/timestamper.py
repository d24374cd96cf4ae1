"""The timestamper: a thread beside the ledger writer that asks an RFC 3161 TSA to date this
node's seals, off the call path. While the TSA is down or answers wrongly, the seals wait in
the ledger (``backlog`` says how many) and it retries with back-off; calls never wait."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tabadol.errors import TabadolError
from tabadol.ledger.store import LedgerStore, LedgerWriteError
from tabadol.ledger.timestamps import (
    TimestampRefused,
    TsaTrust,
    accept_response,
    timestamp_request,
)

log = logging.getLogger("tabadol.ledger")

_MAX_ANSWER_BYTES = 1 << 20


def read_tsa_certificate(path: Path) -> bytes:
    """The PEM of ``[ledger] tsa_certificate``; TabadolError names the file and the problem."""
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise TabadolError(f"[ledger] tsa_certificate {path}: cannot read it: {e}") from e
    try:
        TsaTrust.from_pem(pem)
    except ValueError as e:
        raise TabadolError(f"[ledger] tsa_certificate {path}: {e}") from e
    return pem


class TsaUnavailable(Exception):
    """The TSA could not be asked (refused connection, timeout, HTTP error)."""


def ask_tsa(url: str, query: bytes, timeout_s: float) -> bytes:
    """POST a TimeStampReq; the TimeStampResp's bytes, or TsaUnavailable saying why."""
    request = urllib.request.Request(
        url, data=query, method="POST", headers={"Content-Type": "application/timestamp-query"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            body: bytes = answer.read(_MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise TsaUnavailable(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TsaUnavailable(str(getattr(e, "reason", e))) from None
    if len(body) > _MAX_ANSWER_BYTES:
        raise TsaUnavailable(f"the answer is larger than {_MAX_ANSWER_BYTES} bytes")
    return body


class Timestamper:
    """Timestamps the seals of one chain, oldest first, in a daemon thread; it owns
    ``store`` (a handle of its own on the ledger) and closes it."""

    def __init__(
        self,
        store: LedgerStore,
        chain: str,
        url: str,
        tsa_pem: bytes,
        *,
        timeout_s: float = 10.0,
        poll_s: float = 1.0,
        max_backoff_s: float = 60.0,
        batch: int = 100,
    ) -> None:
        self._store = store
        self.chain = chain
        self.url = url
        self._trust = TsaTrust.from_pem(tsa_pem)
        self._timeout = timeout_s
        self._poll = poll_s
        self._max_backoff = max_backoff_s
        self._batch = batch
        self._stop = threading.Event()
        self.backlog = 0  # seals waiting for a timestamp, as last counted
        self.timestamped = 0  # tokens this timestamper stored
        self.problem: str | None = None  # why the last attempt failed, until one succeeds
        self._thread = threading.Thread(target=self._run, name="ledger-timestamper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():  # a TSA answer still on its way: the thread ends at it
            log.warning("ledger: the timestamper did not stop within %g s; left to end", timeout)
            return
        self._store.close()

    def timestamp_waiting(self) -> int:
        """Timestamp what waits, oldest first, until none does; how many it stored. Stops at
        the first seal it cannot: TsaUnavailable, TimestampRefused or LedgerWriteError."""
        stored = 0
        while not self._stop.is_set():
            seals = self._store.untimestamped(self.chain, self._batch)
            if not seals:
                break
            for seal in seals:
                request = timestamp_request(seal)
                answer = ask_tsa(self.url, request.as_bytes(), self._timeout)
                token, gen_time_ns = accept_response(answer, seal, self._trust, request)
                self._store.add_timestamp(self.chain, seal.seq, token, gen_time_ns)
                stored += 1
                self.timestamped += 1
                if self._stop.is_set():
                    break
        return stored

    def _run(self) -> None:
        backoff = 0.0
        next_try = 0.0
        while not self._stop.is_set():
            try:
                self.backlog = self._store.untimestamped_count(self.chain)
                if self.backlog and time.monotonic() >= next_try:
                    self.timestamp_waiting()
                    self.backlog = self._store.untimestamped_count(self.chain)
                    if self.problem is not None:
                        log.info("the TSA at %s timestamps seals again", self.url)
                    self.problem, backoff = None, 0.0
            except (TsaUnavailable, TimestampRefused, LedgerWriteError) as e:
                kind = "refused" if isinstance(e, TimestampRefused) else "failed"
                problem = f"timestamping seals at {self.url} {kind}: {e}"
                if problem != self.problem:  # once per problem, not at every retry
                    log.error("%s; %d seals wait, retrying with back-off", problem, self.backlog)
                self.problem = problem
                backoff = min(self._max_backoff, max(1.0, backoff * 2))
                next_try = time.monotonic() + backoff
            self._stop.wait(self._poll)
