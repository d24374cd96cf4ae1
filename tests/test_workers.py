"""`tabadol broker --workers N`: several processes, one port, one ledger, one scrape."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tabadol.broker.supervisor import Supervisor
from tabadol.client import connect
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, RunningProvider, broker_toml
from tests.support.echo import UNARY
from tests.support.metrics import scrape_async
from tests.support.processes import TABADOL, Process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    tmp_path: Path, pki: CertificateAuthority, contracts: Path, provider: str
) -> tuple[Path, int, int]:
    port, metrics = free_port(), free_port()
    text = broker_toml(
        pki_dir=pki.dir, contracts=contracts, endpoints=[provider], grants=DEFAULT_GRANTS,
        listen=f"127.0.0.1:{port}",
    ).replace('metrics_listen = "127.0.0.1:0"', f'metrics_listen = "127.0.0.1:{metrics}"')  # fmt: skip
    config = tmp_path / "broker.toml"
    config.write_text(text + '\n[ledger]\npath = "ledger.db"\n')
    return config, port, metrics


async def calls_over_many_connections(port: int, pki: CertificateAuthority, count: int) -> int:
    """Calls spread over separate connections, so the kernel spreads them over workers."""
    done = 0
    for i in range(count):
        async with connect(f"127.0.0.1:{port}", pki.dir / "agencies" / "post") as channel:
            assert await channel.unary_unary(UNARY)(f"{i}".encode(), timeout=10) == f"{i}".encode()
            done += 1
    return done


@asynccontextmanager
async def two_workers(config: Path) -> AsyncIterator[Process]:
    """``tabadol broker --workers 2``, once both workers listen; killed, with any worker
    left, on the way out."""
    supervisor = await Process.start(
        str(TABADOL), "broker", "--config", str(config), "--workers", "2"
    )
    try:
        await supervisor.wait_for(r"supervising 2 broker workers")
        for _ in range(2):
            await supervisor.wait_for(r"\[worker \d\]: broker listening")
        yield supervisor
    finally:
        await supervisor.stop()


async def test_workers_share_the_port_and_one_ledger_survive_a_crash_reload_and_drain(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    config, port, metrics_port = write_config(tmp_path, pki, echo_contracts, echo_provider.address)
    async with two_workers(config) as supervisor:
        made = await calls_over_many_connections(port, pki, 30)

        # One scrape shows the whole broker.
        scrape = await scrape_async(f"https://127.0.0.1:{metrics_port}/metrics", pki.dir)
        calls = sum(
            sample.value
            for family in text_string_to_metric_families(scrape)
            for sample in family.samples
            if sample.name == "tabadol_calls_total" and sample.labels.get("code") == "OK"
        )
        assert calls == made

        # A worker that dies is replaced, and the broker serves on meanwhile. (Its records
        # are written first: kill -9 may lose the last batch, which test_ledger_crash covers.)
        await ledger_holds(tmp_path / "ledger.db", made)
        os.kill(int(_pids(supervisor.lines)[0]), signal.SIGKILL)
        await supervisor.wait_for(r"exited with status -9; restarting it")
        # Its live gauges (calls in flight, ledger backlog) leave the shared scrape with it.
        assert not [line for line in supervisor.lines if "could not clear the metrics" in line]
        await supervisor.wait_for(r"\[worker \d\]: broker listening")
        made += await calls_over_many_connections(port, pki, 10)

        # SIGHUP reaches every worker.
        supervisor.proc.send_signal(signal.SIGHUP)
        for _ in range(2):
            await supervisor.wait_for(r"\[worker \d\]: configuration reloaded")

        # SIGTERM drains: calls in flight complete.
        seen = len(echo_provider.echo.calls)
        async with connect(f"127.0.0.1:{port}", pki.dir / "agencies" / "post") as channel:
            slow = [
                asyncio.ensure_future(
                    channel.unary_unary(UNARY)(
                        b"slow", metadata=(("x-test-sleep", "1"),), timeout=30
                    )
                )
                for _ in range(5)
            ]
            async with asyncio.timeout(30):
                while len(echo_provider.echo.calls) < seen + 5:  # all in flight at the provider
                    echo_provider.echo.call_started.clear()
                    await echo_provider.echo.call_started.wait()
            supervisor.proc.send_signal(signal.SIGTERM)
            assert await asyncio.gather(*slow) == [b"slow"] * 5
        made += 5
        assert await supervisor.exit_status() == 0, "".join(supervisor.lines)

    store = SqliteLedgerStore(tmp_path / "ledger.db", readonly=True)
    records = list(store.records())
    store.close()
    assert len(records) == made  # every call, from every worker, in one chain
    assert len({r.record.broker_instance for r in records}) >= 2
    check = await asyncio.create_subprocess_exec(
        str(TABADOL), "ledger", "verify", "--config", str(config), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await check.communicate()
    # The worker killed above shows as a gap: a kill -9 may lose answered calls (docs/ledger.md).
    assert check.returncode == 1 and out.decode().count("GAP") == 1, out
    assert f"OK: {made} records" in out.decode()


async def test_workers_drain_and_stop_when_their_supervisor_is_killed(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    config, port, _ = write_config(tmp_path, pki, echo_contracts, echo_provider.address)
    async with two_workers(config) as supervisor:
        assert await calls_over_many_connections(port, pki, 2) == 2
        os.kill(supervisor.proc.pid, signal.SIGKILL)
        for _ in range(2):
            await supervisor.wait_for(r"\[worker \d\]: broker stopped")
        # The workers held the supervisor's stderr: it closes once both have exited.
        assert await supervisor.exit_status() == -signal.SIGKILL


async def test_a_stop_during_a_worker_restart_still_ends_every_worker(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    config, _, _ = write_config(tmp_path, pki, echo_contracts, echo_provider.address)
    async with two_workers(config) as supervisor:
        os.kill(int(_pids(supervisor.lines)[0]), signal.SIGKILL)
        await supervisor.wait_for(r"exited with status -9; restarting it")
        # Within the restart's pause (or its start-up): the replacement must not outlive this.
        supervisor.proc.send_signal(signal.SIGTERM)
        await supervisor.wait_for(r"all workers stopped")
        # Every worker has ended (they hold its stderr: it is closed). 1 when the killed one
        # still counts for its slot; 0 when its replacement started, got SIGTERM and drained.
        assert await supervisor.exit_status() in (0, 1)


async def test_a_slot_whose_first_worker_never_started_is_not_watched(tmp_path: Path) -> None:
    # SIGTERM between the first and the second worker's start: the second is never spawned,
    # and the supervisor must still end cleanly rather than fail looking it up.
    supervisor = Supervisor(tmp_path / "broker.toml", workers=2)
    supervisor.stopping = True
    await supervisor._spawn(1)
    assert 1 not in supervisor.workers
    await asyncio.wait_for(supervisor._watch(1), 10)
    shutil.rmtree(supervisor._metrics_dir)


async def ledger_holds(path: Path, count: int) -> None:
    """Wait, boundedly, until the workers have committed ``count`` records."""
    for _ in range(200):
        store = SqliteLedgerStore(path, readonly=True)
        held = store.head()[0]
        store.close()
        if held >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger holds {held} records, not {count}")


def _pids(lines: list[str]) -> list[str]:
    """The worker pids the supervisor announced, in order."""
    return [m[1] for line in lines if (m := re.search(r"worker \d started \(pid (\d+)\)", line))]


async def test_workers_need_a_named_port(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"], grants="")
    )
    process = await Process.start(str(TABADOL), "broker", "--config", str(config), "--workers", "2")
    await process.wait_for(r"workers share one port; port 0 would give each its own")
    assert await process.exit_status() == 2
