"""Ledger records per second committed by one or several nodes at once, each an OS process
with its own LedgerWriter (batched mode), into PostgreSQL (a chain per node) or SQLite (one
file, one chain, one write lock).

Each writer is fed as fast as it takes records (its backlog kept at two full batches) for
the measured window; what counts is what the store holds at the window's start and end,
read from the store itself. Afterwards every chain is verified (``tabadol.ledger.verify``).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ledger_write import broker_like_record  # noqa: E402
from tabadol.config import LedgerSection  # noqa: E402
from tabadol.database import is_database_url  # noqa: E402
from tabadol.ledger import LedgerWriter  # noqa: E402
from tabadol.ledger.record import Seal  # noqa: E402
from tabadol.ledger.seal import Sealer  # noqa: E402
from tabadol.ledger.signers import signer_check  # noqa: E402
from tabadol.ledger.store import LedgerStore, open_ledger  # noqa: E402
from tabadol.ledger.verify import Verdict, verify  # noqa: E402
from tests.conftest import TRUST_DOMAIN  # noqa: E402

BACKLOG = 10_000  # two of the writer's largest batches: it never waits for work
CHECK_EVERY = 1_000  # submissions between looks at the stop signal
DISTINCT_RECORDS = 5_000  # submitted in turn (building each one anew would measure that)


@dataclass(frozen=True)
class Store:
    """Where the writers commit: ``postgresql://...`` or a SQLite file's path."""

    where: str

    @property
    def postgres(self) -> bool:
        return is_database_url(self.where)

    def open(self, *, readonly: bool = False) -> LedgerStore:
        settings = (
            LedgerSection(url=self.where) if self.postgres else LedgerSection(path=Path(self.where))
        )
        return open_ledger(settings, readonly=readonly)


@dataclass
class LedgerRun:
    """One configuration measured: N writer processes into one store."""

    name: str
    engine: str  # "postgresql" | "sqlite"
    nodes: int
    batch_ms: float = 100
    seconds: float = 0.0
    committed: int = 0  # records sealed between the seals that bracket the window
    records_per_s: float = 0.0
    per_chain: dict[str, int] = field(default_factory=dict)  # the same, per chain
    written_total: int = 0  # every record the writers committed, drain included
    verified: dict[str, str] = field(default_factory=dict)  # chain -> Verdict text
    verified_ok: bool = False
    machine_busy: float = 0.0  # share of all the machine's cores busy in the window
    verified_records: int = 0  # in every chain: equals written_total when nothing is lost
    # What the writers logged at ERROR: batches they could not commit at once and retried
    write_failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- In a writer process ---------------------------------------------------------------------


def _writer_main(
    conn: Connection, store: Store, instance: str, pki: str, batch_ms: float, stop: Event
) -> None:
    failures = _WriteFailures()
    logging.getLogger("tabadol.ledger").addHandler(failures)
    sealer = Sealer(
        (Path(pki) / "broker.key").read_bytes(), (Path(pki) / "broker.crt").read_bytes()
    )
    writer = LedgerWriter(store.open(), sealer, batch_interval_s=batch_ms / 1000, instance=instance)
    records = itertools.cycle([broker_like_record(i, instance) for i in range(DISTINCT_RECORDS)])
    conn.send("ready")
    conn.recv()  # go
    while not stop.is_set():
        for _ in range(CHECK_EVERY):
            if writer.backlog < BACKLOG:
                writer.submit(next(records))
            else:
                time.sleep(0.0005)  # the writer has two full batches: let it work
    writer.close(timeout=120)
    conn.send({"written": writer.written, "failures": failures.messages})


class _WriteFailures(logging.Handler):
    """What the writer logged at ERROR: a batch it could not commit (and then retried)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --- In the parent ---------------------------------------------------------------------------


@contextmanager
def _writers(store: Store, instances: list[str], pki: Path, batch_ms: float) -> Iterator[
    tuple[list[Connection], Event]
]:  # fmt: skip
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    pipes, processes = [], []
    try:
        for instance in instances:
            parent, child = context.Pipe()
            process = context.Process(
                target=_writer_main,
                args=(child, store, instance, str(pki), batch_ms, stop),
                daemon=True,
            )
            process.start()
            child.close()
            pipes.append(parent)
            processes.append(process)
        yield pipes, stop
    finally:
        stop.set()
        for process in processes:
            process.join(180)
            if process.exitcode is None:
                process.kill()


def _busy(before: Any, after: Any) -> float:
    """The share of the machine's CPU time (every core, every process) not idle."""
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    total = sum(after) - sum(before)
    return 1 - idle / total if total else 0.0


def _until_every_chain_sealed(store: Store, instances: list[str], timeout: float = 60) -> None:
    """Until each writer has committed its first batch (a bounded poll of the store)."""
    reader = store.open()
    try:
        expected = {reader.chain_for(i) for i in instances}
        deadline = time.monotonic() + timeout
        while set(reader.chains()) != expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ledger writers sealed no batch within {timeout:g} s")
            time.sleep(0.05)
    finally:
        reader.close()


def _window(seals: list[Seal], start_ns: int, end_ns: int) -> tuple[str, int, int]:
    """(chain, records sealed, ns between the seals): from the chain's last seal made before
    ``start_ns`` to its last one made by ``end_ns``."""
    first = max((s for s in seals if s.sealed_ns <= start_ns), key=lambda s: s.seq, default=None)
    last = max((s for s in seals if s.sealed_ns <= end_ns), key=lambda s: s.seq, default=None)
    if first is None or last is None:
        raise RuntimeError("no seal before the window: the writers committed nothing in warm-up")
    return last.chain, last.count - first.count, last.sealed_ns - first.sealed_ns


def measure(
    name: str, store: Store, nodes: int, pki: Path, seconds: float, warmup_s: float,
    batch_ms: float = 100,
) -> LedgerRun:  # fmt: skip
    """``nodes`` writer processes (instances node-1...) committing into ``store``."""
    run = LedgerRun(name, "postgresql" if store.postgres else "sqlite", nodes, batch_ms)
    instances = [f"node-{i + 1}" for i in range(nodes)]
    with _writers(store, instances, pki, batch_ms) as (pipes, stop):
        for pipe in pipes:
            if (said := pipe.recv()) != "ready":
                raise RuntimeError(f"ledger writer process said {said!r}, not ready")
        for pipe in pipes:
            pipe.send("go")
        _until_every_chain_sealed(store, instances)
        time.sleep(warmup_s)
        started, cpu_before = time.time_ns(), psutil.cpu_times()
        time.sleep(seconds)
        ended, cpu_after = time.time_ns(), psutil.cpu_times()
        stop.set()
        outcomes = [pipe.recv() for pipe in pipes]
    reader = store.open(readonly=True)
    try:
        windows = [_window(list(reader.seals(c)), started, ended) for c in reader.chains()]
    finally:
        reader.close()
    run.seconds = (ended - started) / 1e9
    run.machine_busy = _busy(cpu_before, cpu_after)
    run.per_chain = {chain: n for chain, n, _ in windows}
    run.committed = sum(run.per_chain.values())
    # Each chain's rate between the seals that bracket the window, added up: a batch of
    # 5,000 records is too coarse a step for the window's own ends.
    run.records_per_s = sum(n / (span_ns / 1e9) for _, n, span_ns in windows if span_ns)
    run.written_total = sum(o["written"] for o in outcomes)
    run.write_failures = [m for o in outcomes for m in o["failures"]]
    verdicts = verify_chains(store, pki)
    run.verified = {chain or "(the one chain)": str(v) for chain, v in verdicts.items()}
    run.verified_ok = bool(verdicts) and all(v.ok for v in verdicts.values())
    run.verified_records = sum(v.records for v in verdicts.values())
    return run


def verify_chains(store: Store, pki: Path) -> dict[str, Verdict]:
    """Every chain in the store checked as ``tabadol ledger verify`` checks it: records,
    links, seals and their signers (the exchange's CA; no revocations here)."""
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    signer_problem = signer_check(ca_cert=ca, trust_domain=TRUST_DOMAIN, revoked_at={})
    reader = store.open(readonly=True)
    try:
        signers = reader.signers()
        verdicts = {
            chain: verify(reader.records(chain), reader.seals(chain), signers, signer_problem)
            for chain in reader.chains()
        }
    finally:
        reader.close()
    return verdicts
