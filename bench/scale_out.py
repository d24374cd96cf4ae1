"""Tabadol's scale-out benchmark: several broker nodes on one PostgreSQL.

    BENCH_SECONDS=5 .venv/bin/python bench/scale_out.py     # or: make bench-scale

From one run:
1. ledger records/s committed into PostgreSQL by three nodes at once (three processes, a
   chain each), by one node, and into SQLite by one process (and by three sharing the
   file); every chain verified afterwards;
2. registry change-to-enforcement latency on three ``tabadol broker`` processes sharing one
   registry database, p50, p99 and max over every (change, node) pair;
3. the broker's CPU per call (every feature on, as ``make bench`` runs it) with the ledger
   on SQLite and on PostgreSQL, measured in alternating rounds.

PostgreSQL: ``--postgres URL`` or ``TABADOL_TEST_POSTGRES`` names a server (its user needs
CREATEDB); otherwise a private one is started from Debian's package in a temporary
directory, with fsync on. Writes bench/results/scale_out.json and scale_out.md. Method and
reading: docs/performance.md, "Several nodes on PostgreSQL".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ledger_nodes, registry_latency, targets  # noqa: E402
from bench.loadgen import WORKLOADS, Generators  # noqa: E402
from bench.run import PYTHON, RESULTS, default_seconds, progress  # noqa: E402
from bench.scale_report import ScaleRun, summarise  # noqa: E402
from bench.targets import Platform  # noqa: E402
from tabadol.config import LedgerSection  # noqa: E402
from tabadol.database import describe as describe_url  # noqa: E402
from tests.support.load import BrokerProcess, ledger_verify  # noqa: E402
from tests.support.postgres import ENV, PostgresCluster, create_database  # noqa: E402

SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "max_connections")


@dataclass
class PostgresServer:
    """The server every measurement uses: its URL, and its CPU time when it is ours."""

    url: str
    where: str
    postmaster_pid: int | None = None

    def cpu_seconds(self) -> float | None:
        """The postmaster's and every backend's CPU time (live and ended), from /proc."""
        return targets.tree_cpu_seconds(self.postmaster_pid) if self.postmaster_pid else None

    def describe(self) -> dict[str, Any]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            settings = {s: conn.execute(f"SHOW {s}").fetchone() for s in SETTINGS}
        return {
            "where": self.where,
            "version": version[0] if version else "?",
            "settings": {k: v[0] if v else "?" for k, v in settings.items()},
            "server_cpu_measured": self.postmaster_pid is not None,
        }


@contextmanager
def postgres_server(url: str | None) -> Iterator[PostgresServer]:
    """The server ``url`` (or $TABADOL_TEST_POSTGRES) names, else a private one of ours."""
    url = url or os.environ.get(ENV)
    if url:
        yield PostgresServer(url, f"given ({describe_url(url)}); its CPU is not measured")
        return
    cluster = PostgresCluster()
    try:
        cluster.start()
        # The tests' cluster runs without fsync; a ledger benchmark must not (SQLite syncs).
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET fsync = on")
            conn.execute("ALTER SYSTEM SET full_page_writes = on")
            conn.execute("SELECT pg_reload_conf()")
        _until_fsync_on(cluster.url())
        pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
        yield PostgresServer(
            cluster.url(),
            "a private server on this machine (tests/support/postgres.py), sharing its cores "
            "with everything else measured",
            pid,
        )
    finally:
        cluster.remove()


def _until_fsync_on(url: str, timeout: float = 10) -> None:
    """Until new sessions see the reloaded settings (a reload is a signal, not a wait)."""
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SHOW fsync").fetchone()
        if row and row[0] == "on":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL still runs with fsync {row} after a reload")
        time.sleep(0.05)


# --- 1. Ledger records/s ---------------------------------------------------------------------


def measure_ledgers(
    platform: Platform, server: PostgresServer, seconds: float, warmup_s: float
) -> list[dict[str, Any]]:
    batch_ms = LedgerSection().batch_interval_ms  # the default
    cases: list[tuple[str, Callable[[], str], int]] = [
        ("sqlite, one process", lambda: str(platform.dir / "ledger-1.db"), 1),
        ("postgresql, one node", lambda: create_database(server.url, "ledger"), 1),
        ("postgresql, three nodes", lambda: create_database(server.url, "ledger"), 3),
        ("sqlite, three processes, one file", lambda: str(platform.dir / "ledger-3.db"), 3),
    ]
    runs = []
    for name, where, nodes in cases:
        run = ledger_nodes.measure(
            name, ledger_nodes.Store(where()), nodes, platform.pki, seconds, warmup_s, batch_ms
        )
        verified = "verified" if run.verified_ok else f"NOT VERIFIED: {run.verified}"
        print(
            f"  ledger {name:<34} {run.records_per_s:>9,.0f} records/s  ({verified})",
            file=sys.stderr,
            flush=True,
        )
        runs.append(run.as_dict())
    return runs


# --- 3. CPU per call: the ledger on SQLite vs PostgreSQL --------------------------------------


async def ledger_cpu(
    platform: Platform,
    server: PostgresServer,
    provider: str,
    otlp: str,
    args: argparse.Namespace,
    warmup_s: float,
) -> dict[str, Any]:
    """The full-featured broker twice, one ledger each, measured in alternating order."""
    workload = WORKLOADS[0]  # unary, 100 B
    ledger_url = create_database(server.url, "ledger")
    brokers: dict[str, tuple[BrokerProcess, targets.Target]] = {}
    rounds: list[dict[str, dict[str, Any]]] = []
    measured_server: Callable[[], float] = lambda: server.cpu_seconds() or 0.0  # noqa: E731
    try:
        brokers["sqlite"] = await targets.start_broker(platform, provider, otlp, name="sqlite")
        brokers["postgresql"] = await targets.start_broker(
            platform, provider, otlp, name="postgresql", ledger_url=ledger_url
        )
        generators = Generators(args.generators)
        try:
            for i in range(args.rounds):
                order = ["sqlite", "postgresql"] if i % 2 == 0 else ["postgresql", "sqlite"]
                pair: dict[str, dict[str, Any]] = {}
                for key in order:
                    m = await generators.measure(
                        brokers[key][1], workload, args.concurrency, args.seconds, warmup_s,
                        measured_server,
                    )  # fmt: skip
                    progress(m)
                    server_us = m.provider_cpu_us if server.postmaster_pid else None
                    pair[key] = {
                        "calls_per_s": m.per_s,
                        "broker_cpu_us": m.proxy_cpu_us,
                        "server_cpu_us": server_us,
                        "total_cpu_us": (m.proxy_cpu_us or 0) + (server_us or 0)
                        if server_us is not None
                        else None,
                        "p50_ms": m.p50_ms,
                        "p99_ms": m.p99_ms,
                        "calls": m.units,
                        "errors": m.errors,
                        "error": m.error,
                    }
                rounds.append(pair)
        finally:
            await generators.close()
        written = {
            k: await b.metric("tabadol_ledger_records_written_total")
            for k, (b, _) in brokers.items()
        }
        verified = {}
        for key, (broker, _) in brokers.items():
            await broker.terminate()  # drains: its last batch is sealed
            code, out = await ledger_verify(broker.config)
            verified[key] = {"ok": code == 0, "output": out.strip()}
    finally:
        for broker, _ in brokers.values():
            await broker.stop()
    return {
        "workload": workload.key,
        "concurrency": args.concurrency,
        "rounds": rounds,
        "summary": _cpu_summary(rounds),
        "ledger_records_written": written,
        "verify": verified,
    }


def _cpu_summary(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("sqlite", "postgresql"):
        out[key] = {
            figure: summarise([r[key][figure] for r in rounds])
            for figure in ("broker_cpu_us", "server_cpu_us", "total_cpu_us", "calls_per_s")
        }
        out[key]["errors"] = sum(r[key]["errors"] for r in rounds)

    def ratios(figure: str) -> dict[str, float | None]:
        paired = [
            r["postgresql"][figure] / r["sqlite"][figure]
            for r in rounds
            if r["postgresql"][figure] is not None and r["sqlite"][figure]
        ]
        return summarise(list(paired))

    # Round by round: each pair ran back to back, so the machine's drift mostly cancels.
    out["ratio"] = {"broker_cpu": ratios("broker_cpu_us"), "total_cpu": ratios("total_cpu_us")}
    return out


# --- The run ---------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> ScaleRun:
    run = ScaleRun(
        command=f"BENCH_SECONDS={args.seconds:g} {shlex.quote(PYTHON)} bench/scale_out.py",
        seconds=args.seconds,
    )
    warmup_s = min(0.5, max(0.2, args.seconds / 4))  # as bench/run.py warms up
    with (
        tempfile.TemporaryDirectory(prefix="tabadol-bench-scale-") as tmp_name,
        postgres_server(args.postgres) as server,
    ):
        platform = Platform.create(Path(tmp_name))
        run.postgres = server.describe()
        print(f"PostgreSQL: {run.postgres}", file=sys.stderr, flush=True)
        run.ledger = await asyncio.to_thread(
            measure_ledgers, platform, server, args.seconds, warmup_s
        )
        async with AsyncExitStack() as stack:
            provider, provider_address = await targets.start_provider(platform)
            stack.push_async_callback(provider.stop)
            registry_url = create_database(server.url, "exchange")
            registry = await registry_latency.measure(
                platform, registry_url, provider_address, args.changes
            )
            run.registry = registry.as_dict()
            s = registry.summary()
            print(
                f"  registry: {s['pairs']} (change, node) pairs: p50 {s['p50_ms']:.1f} ms, "
                f"p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms, missed {registry.missed}",
                file=sys.stderr,
                flush=True,
            )
            collector, otlp = await targets.start_collector(platform)
            stack.push_async_callback(collector.stop)
            run.ledger_cpu = await ledger_cpu(
                platform, server, provider_address, otlp, args, warmup_s
            )
    if not run.postgres.get("server_cpu_measured"):
        run.notes.append(
            "PostgreSQL's own CPU was not measured (a server given by URL): the broker + "
            "server column is empty"
        )
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="per measurement (default: $BENCH_SECONDS or 5)"
    )
    parser.add_argument(
        "--postgres",
        default=None,
        help=f"a server URL with CREATEDB (default: ${ENV}, else a private one)",
    )
    parser.add_argument("--changes", type=int, default=40, help="registry commits (at least 40)")
    parser.add_argument("--rounds", type=int, default=3, help="CPU measurements per ledger")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight under load")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where scale_out.* go")
    arguments = parser.parse_args()
    if arguments.seconds is None:
        arguments.seconds = default_seconds()
    result = asyncio.run(main(arguments))
    print()
    print(result.text())
    json_path, md_path = result.write(arguments.results)
    print(f"wrote {json_path} and {md_path}")
