"""Three broker nodes, one exchange: `tabadol broker` processes on 127.0.0.1, .2 and .3
sharing one registry and one ledger on PostgreSQL, consumers balancing over them with
``connect([...])`` under steady load; a node killed, a grant revoked, a bad change refused,
and the database stopped, with every answered call accounted for."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from tabadol.client import connect
from tabadol.ledger.store.postgres import PostgresLedgerStore
from tabadol.pki import CertificateAuthority
from tabadol.protocol import REQUEST_ID_KEY
from tests.conftest import AGENCIES, TRUST_DOMAIN
from tests.support.echo import (
    CLIENT_STREAM,
    SERVICE,
    UNARY,
    EchoProvider,
    start_echo,
    write_echo_contracts,
)
from tests.support.exchange import eventually
from tests.support.postgres import PostgresCluster
from tests.support.processes import TABADOL, Process
from tests.support.registry import registry_toml, tabadol

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
GRANTS = f"""
[[grant]]
consumer = "post"
service = "{SERVICE}"
methods = ["*"]

[[grant]]
consumer = "tax"
service = "{SERVICE}"
methods = ["Unary"]
"""


def node_toml(host: str, name: str, pki: Path, contracts: Path, url: str, ledger: str) -> str:
    return f"""[broker]
listen = "{host}:0"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{pki}"
contracts = ["{contracts}"]
metrics_listen = "{host}:0"
instance = "{name}"
shutdown_grace_seconds = 5

[tracing]
exporter = "none"

[ledger]
path = "ledger.db"
url = "{url}"
batch_interval_ms = 20
{ledger}

[registry]
url = "{url}"
poll_seconds = 0.5
"""


@dataclass
class Exchange:
    """Three nodes, their configuration files, the registry file last imported."""

    directory: Path
    pki: CertificateAuthority
    url: str
    echo: EchoProvider
    endpoint: str
    configs: list[Path] = field(default_factory=list)
    nodes: list[Process | None] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    def credentials(self, agency: str) -> Path:
        return self.pki.dir / "agencies" / agency

    def import_registry(self, grants: str, reason: str) -> tuple[int, str, str]:
        path = self.directory / "registry.toml"
        path.write_text(registry_toml([self.endpoint], grants, AGENCIES))
        return tabadol(
            "registry", "import", "--config", str(self.configs[0]), str(path),
            "--reason", reason, "--by", "operator/test",
        )  # fmt: skip

    async def start(self, index: int) -> None:
        process = await Process.start(str(TABADOL), "broker", "--config", str(self.configs[index]))
        port = (await process.wait_for(rf"broker listening on {HOSTS[index]}:(\d+)"))[1]
        address = f"{HOSTS[index]}:{port}"
        if index < len(self.nodes):
            self.nodes[index], self.addresses[index] = process, address
        else:
            self.nodes.append(process)
            self.addresses.append(address)

    async def stop(self, index: int) -> int:
        """SIGTERM: the node drains and writes its ledger; its exit status."""
        process = self.nodes[index]
        assert process is not None
        process.proc.send_signal(signal.SIGTERM)
        status = await process.exit_status()
        await process.stop()
        self.nodes[index] = None
        return status

    def kill(self, index: int) -> None:
        process = self.nodes[index]
        assert process is not None
        process.kill()


@contextlib.asynccontextmanager
async def exchange(
    directory: Path, pki: CertificateAuthority, url: str, ledger: tuple[str, str, str]
) -> AsyncIterator[Exchange]:
    contracts = write_echo_contracts(directory / "echo.pb", idempotent=True)
    provider, echo = await start_echo(pki.dir / "agencies" / "echo")
    ex = Exchange(directory, pki, url, echo, provider.address)
    for i, host in enumerate(HOSTS):
        node = directory / f"node-{i + 1}"
        node.mkdir()
        path = node / "broker.toml"
        path.write_text(node_toml(host, f"node-{i + 1}", pki.dir, contracts, url, ledger[i]))
        ex.configs.append(path)
    code, _, err = ex.import_registry(GRANTS, "the exchange opens")
    assert code == 0, err
    try:
        for i in range(len(HOSTS)):
            await ex.start(i)
        yield ex
    finally:
        for process in ex.nodes:
            if process is not None:
                await process.stop()
        await provider.stop(0)


@dataclass
class Outcomes:
    ok: list[str] = field(default_factory=list)  # request ids of calls answered OK
    failed: dict[str, list[grpc.aio.AioRpcError]] = field(default_factory=dict)

    def fail(self, kind: str, error: grpc.aio.AioRpcError) -> None:
        self.failed.setdefault(kind, []).append(error)


async def steady_load(channel: grpc.aio.Channel, outcomes: Outcomes, stop: asyncio.Event) -> None:
    """Two loops of idempotent unary calls and one of client streams (not idempotent),
    back to back until ``stop``."""

    async def unary() -> None:
        while not stop.is_set():
            call = channel.unary_unary(UNARY)(b"load", timeout=20)
            try:
                await call
                outcomes.ok.append(_request_id(await call.trailing_metadata()))
            except grpc.aio.AioRpcError as e:
                outcomes.fail("unary", e)

    async def stream() -> None:
        while not stop.is_set():
            call = channel.stream_unary(CLIENT_STREAM)(iter([b"a", b"b"]), timeout=20)
            try:
                await call
                outcomes.ok.append(_request_id(await call.trailing_metadata()))
            except grpc.aio.AioRpcError as e:
                outcomes.fail("stream", e)

    await asyncio.gather(unary(), unary(), stream())


def _request_id(metadata: grpc.aio.Metadata | None) -> str:
    found = dict(metadata or ()).get(REQUEST_ID_KEY)
    assert isinstance(found, str), "the broker names every exchange in its trailers"
    return found


async def one_call(address: str, credentials: Path) -> grpc.StatusCode:
    """One unary call through one node only (no balancing, no retry)."""
    async with connect(address, credentials) as channel:
        try:
            await channel.unary_unary(UNARY)(b"probe", timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK


async def every_node(ex: Exchange, agency: str, code: grpc.StatusCode) -> bool:
    found = await asyncio.gather(*(one_call(a, ex.credentials(agency)) for a in ex.addresses))
    return all(c is code for c in found)


def ledger_ids(url: str) -> set[str]:
    store = PostgresLedgerStore(url, readonly=True)
    try:
        return {stored.record.request_id for stored in store.records_between(0, 2**63 - 1)}
    finally:
        store.close()


def verify(config: Path) -> tuple[int, str]:
    code, out, err = tabadol("ledger", "verify", "--config", str(config))
    return code, out + err


STRICT = 'mode = "strict"'


async def test_a_node_killed_under_load_loses_only_calls_in_flight_on_it_and_nothing_answered(
    tmp_path: Path, pki: CertificateAuthority, postgres_url: str
) -> None:
    """Strict mode (every answer waits for its record): after kill -9 of one node, only the
    non-idempotent calls in flight on it may fail, idempotent ones succeed by retry on
    another node, every answered call is in the ledger, and all three chains verify."""
    async with exchange(tmp_path, pki, postgres_url, (STRICT, STRICT, STRICT)) as ex:
        outcomes, stop = Outcomes(), asyncio.Event()
        # The test process has not imported the echo contract: name its idempotent method.
        async with connect(
            ex.addresses, ex.credentials("post"), idempotent_methods=[UNARY]
        ) as channel:
            load = asyncio.create_task(steady_load(channel, outcomes, stop))
            assert await eventually(lambda: len(outcomes.ok) >= 60)
            ex.kill(2)  # kill -9, calls in flight
            answered_at_kill = len(outcomes.ok)
            assert await eventually(lambda: len(outcomes.ok) >= answered_at_kill + 60)
            stop.set()
            await load
        assert "unary" not in outcomes.failed, outcomes.failed  # retried on another node
        lost = outcomes.failed.get("stream", [])
        assert all(e.code() is grpc.StatusCode.UNAVAILABLE for e in lost)
        assert len(lost) <= 1  # one stream loop: at most its one call in flight on the node
        for i in (0, 1):
            assert await ex.stop(i) == 0
    answered = set(outcomes.ok)
    assert answered <= ledger_ids(postgres_url)  # every answered call is accounted for
    code, report = verify(ex.configs[0])
    assert code == 0, report
    for name in ("node-1", "node-2", "node-3"):
        assert f"node {name}: OK:" in report


async def test_a_grant_revoked_by_registry_import_is_refused_by_every_node(
    tmp_path: Path, pki: CertificateAuthority, postgres_url: str
) -> None:
    async with exchange(tmp_path, pki, postgres_url, ("", "", "")) as ex:
        outcomes, stop = Outcomes(), asyncio.Event()
        async with connect(ex.addresses, ex.credentials("post")) as channel:
            load = asyncio.create_task(steady_load(channel, outcomes, stop))
            assert await every_node(ex, "tax", grpc.StatusCode.OK)
            without_tax = GRANTS.split('[[grant]]\nconsumer = "tax"')[0]
            code, out, err = ex.import_registry(without_tax, "tax's legal basis ended")
            assert code == 0, err
            assert "version 2" in out
            # Applied by every node without SIGHUP (docs/performance.md measures how fast).
            assert await eventually(
                lambda: every_node(ex, "tax", grpc.StatusCode.PERMISSION_DENIED)
            )
            stop.set()
            await load
        assert not outcomes.failed, outcomes.failed  # post's calls went on throughout
        code, out, _ = tabadol("registry", "history", "--config", str(ex.configs[0]))
        assert code == 0 and "tax's legal basis ended" in out and "operator/test" in out


async def test_a_bad_registry_change_is_refused_whole_and_every_node_keeps_the_last(
    tmp_path: Path, pki: CertificateAuthority, postgres_url: str
) -> None:
    async with exchange(tmp_path, pki, postgres_url, ("", "", "")) as ex:
        bad = GRANTS.replace('methods = ["Unary"]', 'methods = ["Unary", "Unnary"]')
        bad = bad.replace('consumer = "post"', 'consumer = "posst"')
        code, _, err = ex.import_registry(bad, "a typo")
        assert code != 0
        assert "[[grant]] #1 (consumer 'posst')" in err and "not a declared [[agency]]" in err
        assert "[[grant]] #2 (consumer 'tax')" in err and "'Unnary'" in err
        code, out, _ = tabadol("registry", "history", "--config", str(ex.configs[0]))
        assert "a typo" not in out  # no version was made
        assert await every_node(ex, "post", grpc.StatusCode.OK)
        assert await every_node(ex, "tax", grpc.StatusCode.OK)


async def test_a_stopped_database_leaves_the_nodes_serving_and_everything_catches_up(
    tmp_path: Path, pki: CertificateAuthority, own_postgres: PostgresCluster
) -> None:
    """Nodes 1 and 2 batched (records wait up to 30 s), node 3 strict (fails closed after
    1 s): while the database is down, nodes 1 and 2 serve from the last registry version
    with records queued, node 3 refuses with a status that names the ledger; all catch up
    when it returns, and every answered call is in the ledger."""
    url = own_postgres.create_database()
    modes = ("max_unwritten_seconds = 30", "max_unwritten_seconds = 30",
             f"{STRICT}\nmax_unwritten_seconds = 1")  # fmt: skip
    async with exchange(tmp_path, pki, url, modes) as ex:
        answered: list[str] = []

        async def call(index: int) -> grpc.StatusCode:
            async with connect(ex.addresses[index], ex.credentials("post")) as channel:
                call = channel.unary_unary(UNARY)(b"x", timeout=20)
                try:
                    await call
                except grpc.aio.AioRpcError as e:
                    assert "ledger" in (e.details() or "")
                    return e.code()
                answered.append(_request_id(await call.trailing_metadata()))
                return grpc.StatusCode.OK

        assert [await call(i) for i in range(3)] == [grpc.StatusCode.OK] * 3
        own_postgres.stop("immediate")
        for _ in range(3):
            assert await call(0) is grpc.StatusCode.OK
            assert await call(1) is grpc.StatusCode.OK
        assert await call(2) is grpc.StatusCode.UNAVAILABLE
        own_postgres.start()

        async def caught_up() -> bool:
            return await call(2) is grpc.StatusCode.OK

        assert await eventually(caught_up, 30)
        for i in range(3):
            assert await ex.stop(i) == 0
    assert set(answered) <= ledger_ids(url)
    code, report = verify(ex.configs[0])
    assert code == 0, report
    for name in ("node-1", "node-2", "node-3"):
        assert f"node {name}: OK:" in report
