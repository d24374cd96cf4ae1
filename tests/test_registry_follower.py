"""Broker nodes following the registry database: changes applied within seconds without
SIGHUP, a version a node cannot apply refused, and the database going away and coming back."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tabadol import config
from tabadol.broker import Broker
from tabadol.broker.registry_follower import kept_registry_path
from tabadol.broker.server import reload_from_file
from tabadol.client import connect
from tabadol.errors import ConfigError
from tabadol.pki import CertificateAuthority
from tabadol.registry import open_registry
from tabadol.registry.entries import digest
from tabadol.registry.store import RegistryHead
from tests.conftest import DEFAULT_GRANTS, RunningProvider
from tests.support.echo import SERVICE, UNARY
from tests.support.exchange import eventually
from tests.support.postgres import PostgresCluster, create_database
from tests.support.registry import import_registry, registry_config, registry_toml, tabadol

ONLY_POST = f'[[grant]]\nconsumer = "post"\nservice = "{SERVICE}"\nmethods = ["*"]\n'


async def call(
    broker: Broker, pki: CertificateAuthority, agency: str, body: bytes = b"hi", **kw: object
) -> grpc.StatusCode:
    async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / agency) as channel:
        try:
            await channel.unary_unary(UNARY)(body, timeout=10, **kw)  # type: ignore[arg-type]
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def gauge(broker: Broker, name: str) -> float:
    value = broker.metrics.registry.get_sample_value(name)
    assert value is not None
    return value


class Node:
    def __init__(
        self,
        directory: Path,
        pki: CertificateAuthority,
        contracts: Path,
        url: str,
        provider: str,
        registry: str = "",
    ) -> None:
        self.config = registry_config(directory, pki.dir, contracts, url, registry)
        self.file = directory / "registry.toml"
        self.provider = provider
        self.directory = directory

    def publish(self, grants: str, reason: str = "test") -> None:
        self.file.write_text(registry_toml([self.provider], grants))
        import_registry(self.config, self.file, reason=reason)

    async def start(self) -> Broker:
        broker = Broker(config.load(self.config))
        await broker.start()
        return broker


@pytest.fixture
async def node(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    postgres_url: str,
) -> AsyncIterator[tuple[Node, Broker]]:
    n = Node(tmp_path, pki, echo_contracts, postgres_url, echo_provider.address)
    n.publish(DEFAULT_GRANTS, "first")
    broker = await n.start()
    try:
        yield n, broker
    finally:
        await broker.stop(0)


async def test_a_committed_grant_revocation_applies_without_sighup(
    node: tuple[Node, Broker], pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    n, broker = node
    assert broker.config.registry_version == 1
    assert await call(broker, pki, "nocr") == grpc.StatusCode.OK
    async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "nocr") as channel:
        echo_provider.echo.call_started.clear()
        in_flight = asyncio.ensure_future(
            channel.unary_unary(UNARY)(
                b"started before", metadata=(("x-test-sleep", "1.5"),), timeout=30
            )
        )
        await echo_provider.echo.call_started.wait()  # admitted on version 1
        n.publish(ONLY_POST, "nocr's grant ends")
        committed = time.monotonic()
        assert await eventually(lambda: broker.config.registry_version == 2)
        applied_in = time.monotonic() - committed
        assert await call(broker, pki, "nocr") == grpc.StatusCode.PERMISSION_DENIED
        # The call admitted on version 1 is ended too: its grant no longer admits it.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await in_flight
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked or expired during the call" in (ended.value.details() or "")
    assert applied_in <= 2.0
    assert await call(broker, pki, "post") == grpc.StatusCode.OK
    assert gauge(broker, "tabadol_registry_version") == 2
    assert kept_registry_path(broker.config).stat().st_mode & 0o777 == 0o600


async def test_a_version_this_node_cannot_apply_is_refused_and_the_old_one_keeps_serving(
    node: tuple[Node, Broker], pki: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    n, broker = node
    # Committed past `registry import`'s checks (say, by a node with other contracts).
    bad = {
        "agency": [{"id": "post", "name": "Post"}],
        "service": [],
        "grant": [{"consumer": "post", "service": "missing", "methods": ["*"]}],
        "limit": [],
    }
    url = broker.config.registry.url
    assert url is not None
    store = open_registry(url)
    try:
        with caplog.at_level(logging.ERROR, "tabadol.broker.registry"):
            store.commit(bad, "someone", "bad", digest(bad))
            assert await eventually(
                lambda: (
                    "registry version 2 of" in caplog.text and "refused by this node" in caplog.text
                )
            )
        assert (
            "[[grant]] #1 (consumer 'post'): service 'missing' is not a declared [[service]]"
            in caplog.text
        )
        assert broker.config.registry_version == 1
        assert await call(broker, pki, "nocr") == grpc.StatusCode.OK
        # The next good version is applied.
        n.publish(ONLY_POST, "fixed")
        assert await eventually(lambda: broker.config.registry_version == 3)
    finally:
        store.close()


async def test_a_refused_version_lets_the_age_grow_is_shown_and_is_tried_again_on_sighup(
    node: tuple[Node, Broker], pki: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    n, broker = node
    follower = broker.registry
    assert follower is not None
    bad = {
        "agency": [{"id": "post", "name": "Post"}],
        "grant": [{"consumer": "post", "service": "missing", "methods": ["*"]}],
    }
    url = broker.config.registry.url
    assert url is not None
    store = open_registry(url)
    try:
        with caplog.at_level(logging.ERROR, "tabadol.broker.registry"):
            store.commit(bad, "someone", "bad", digest(bad))
            assert await eventually(lambda: gauge(broker, "tabadol_registry_refused_version") == 2)
            confirmed = follower.freshness.confirmed_at
            await follower.check()  # the database answers, but its head is not in force
            assert follower.freshness.confirmed_at == confirmed
            assert "cannot apply the registry database's current version, 2" in (
                follower.freshness.behind or ""
            )
            assert caplog.text.count("refused by this node") == 1  # said once
            assert reload_from_file(broker, n.config)  # SIGHUP: tried again
            assert await eventually(lambda: caplog.text.count("refused by this node") == 2)
        assert broker.config.registry_version == 1
        n.publish(ONLY_POST, "fixed")
        assert await eventually(lambda: broker.config.registry_version == 3)
        assert await eventually(lambda: gauge(broker, "tabadol_registry_refused_version") == 0)
        assert follower.freshness.behind is None
        assert follower.freshness.confirmed_at > confirmed
    finally:
        store.close()


async def test_nothing_of_the_follower_runs_on_after_it_stops(
    node: tuple[Node, Broker],
) -> None:
    n, broker = node
    follower = broker.registry
    assert follower is not None
    entered, release = threading.Event(), threading.Event()
    head = follower.store.head

    def held_head() -> RegistryHead | None:
        entered.set()
        release.wait(10)
        return head()

    follower.store.head = held_head  # type: ignore[method-assign]
    try:
        n.publish(ONLY_POST, "v2")  # the follower's next check waits in head()
        assert await asyncio.to_thread(entered.wait, 10)

        def checks() -> list[asyncio.Task[object]]:
            return [t for t in asyncio.all_tasks() if "RegistryFollower.check" in repr(t)]

        assert checks() != []
        await follower.stop()
        assert checks() == []  # cancelled and awaited: it will apply nothing, keep nothing
    finally:
        release.set()
    assert broker.config.registry_version == 1


async def test_sighup_rereads_the_file_and_keeps_the_registry_version(
    node: tuple[Node, Broker], pki: CertificateAuthority
) -> None:
    n, broker = node
    assert reload_from_file(broker, n.config)
    assert broker.config.registry_version == 1 and len(broker.config.grants) == 2
    assert await call(broker, pki, "nocr") == grpc.StatusCode.OK


async def test_a_node_refuses_to_start_with_an_empty_registry(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, postgres_url: str
) -> None:
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, postgres_url)
    with pytest.raises(ConfigError, match="holds no registry version yet: import one"):
        Broker(config.load(cfg))


async def test_the_database_going_away_is_survived_then_refused_past_max_age_then_caught_up(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    cluster = PostgresCluster()  # a server of this test's own, to stop and start
    try:
        cluster.start()
        url = create_database(cluster.url())
        n = Node(
            tmp_path,
            pki,
            echo_contracts,
            url,
            echo_provider.address,
            'max_age_seconds = 3\nstale = "refuse"',
        )
        n.publish(DEFAULT_GRANTS)
        broker = await n.start()
        try:
            await cluster_stop(cluster)
            # Within max_age the last good version serves, and its age grows.
            assert await call(broker, pki, "nocr") == grpc.StatusCode.OK
            assert await eventually(lambda: gauge(broker, "tabadol_registry_age_seconds") >= 1.0)
            # Past it: new calls are refused, saying why and since when; health says so.
            assert await eventually(lambda: stale_refusal(broker, pki), seconds=10)
            assert await eventually(
                lambda: is_health(broker, pki, health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            # A restart while the database is down starts from the version the node kept.
            await broker.stop(0)
            broker = await n.start()
            assert broker.config.registry_version == 1
            await cluster_start(cluster)
            assert await eventually(
                lambda: gauge(broker, "tabadol_registry_age_seconds") < 1.0, seconds=10
            )
            assert await call(broker, pki, "nocr") == grpc.StatusCode.OK
            assert await eventually(
                lambda: is_health(broker, pki, health_pb2.HealthCheckResponse.SERVING)
            )
            n.publish(ONLY_POST)  # LISTEN is back: a change applies within seconds again
            assert await eventually(lambda: broker.config.registry_version == 2)
        finally:
            await broker.stop(0)
        # With neither the database nor a kept version, a node does not start.
        await cluster_stop(cluster)
        kept_registry_path(broker.config).unlink()
        with pytest.raises(ConfigError, match=r"is unreachable.*no registry version of its own"):
            Broker(config.load(n.config))
    finally:
        cluster.remove()


async def cluster_stop(cluster: PostgresCluster) -> None:
    await asyncio.to_thread(cluster.stop)


async def cluster_start(cluster: PostgresCluster) -> None:
    await asyncio.to_thread(cluster.start)


async def stale_refusal(broker: Broker, pki: CertificateAuthority) -> bool:
    async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "nocr") as channel:
        try:
            await channel.unary_unary(UNARY)(b"x", timeout=10)
        except grpc.aio.AioRpcError as e:
            details = e.details() or ""
            return (
                e.code() == grpc.StatusCode.UNAVAILABLE
                and "registry is stale" in details
                and "has not been reachable since" in details
            )
    return False


async def health(broker: Broker, pki: CertificateAuthority) -> int:
    async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(answer.status)


async def is_health(broker: Broker, pki: CertificateAuthority, status: int) -> bool:
    return await health(broker, pki) == status


async def test_a_crl_published_in_the_database_is_taken_by_the_node(
    tmp_path: Path, echo_contracts: Path, postgres_url: str
) -> None:
    import shutil

    from tests.conftest import TRUST_DOMAIN
    from tests.support.echo import own_pki, start_echo
    from tests.support.registry import tabadol

    ca = own_pki(tmp_path, TRUST_DOMAIN, "echo", "post", "nocr")
    ca.write_crl()
    node_pki = tmp_path / "node-pki"  # the node's copy: the CA publishes through the database
    node_pki.mkdir()
    for name in ("ca.crt", "broker.crt", "broker.key", "crl.pem"):
        shutil.copy(ca.dir / name, node_pki / name)
    provider, _ = await start_echo(ca.dir / "agencies" / "echo")
    n = Node(tmp_path, ca, echo_contracts, postgres_url, provider.address)
    n.config.write_text(n.config.read_text().replace(str(ca.dir), str(node_pki)))
    n.publish(DEFAULT_GRANTS)
    broker = await n.start()
    try:
        assert await call(broker, ca, "nocr") == grpc.StatusCode.OK
        ca.revoke_agency("nocr")
        code, _, err = tabadol(
            "registry", "publish-crl", "--config", str(n.config), str(ca.dir / "crl.pem")
        )
        assert code == 0, err
        assert await eventually(
            lambda: call_code_is(broker, ca, "nocr", grpc.StatusCode.UNAUTHENTICATED), seconds=5
        )
        assert await call(broker, ca, "post") == grpc.StatusCode.OK
        assert (node_pki / "crl.pem").read_bytes() == (ca.dir / "crl.pem").read_bytes()
    finally:
        await broker.stop(0)
        await provider.stop(0)


async def call_code_is(
    broker: Broker, pki: CertificateAuthority, agency: str, code: grpc.StatusCode
) -> bool:
    return await call(broker, pki, agency) == code


# -- what the node kept, and versions going backwards --------------------------------------


def keep_by_hand(cfg: Path, provider: str, number: int, confirmed_at: float | None) -> Path:
    """A kept registry file as a node writes it, with whatever number and time."""
    from tabadol.registry.entries import entries_data

    file = cfg.parent / "kept-source.toml"
    file.write_text(registry_toml([provider]))
    entries = entries_data(config.read_registry_file(file))
    data: dict[str, object] = {
        "database": "x",
        "version": number,
        "created_at": "2026-01-01T00:00:00+00:00",
        "created_by": "tester",
        "reason": "",
        "digest": digest(entries),
        "entries": entries,
    }
    if confirmed_at is not None:
        data["confirmed_at"] = confirmed_at
    kept = kept_registry_path(config.load(cfg))
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(data))
    kept.chmod(0o600)
    return kept


@pytest.mark.parametrize(
    ("confirmed", "age_at_least"),
    [(-500.0, 499.0), (None, 10**9)],  # as the file says; without a time, long ago
)
def test_a_start_without_the_database_takes_the_confirmed_time_inside_the_kept_file(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    confirmed: float | None,
    age_at_least: float,
) -> None:
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, "postgresql://u@127.0.0.1:1/db")
    kept = keep_by_hand(
        cfg, "127.0.0.1:1", 4, None if confirmed is None else time.time() + confirmed
    )
    os.utime(kept)  # the file's own time says nothing
    broker = Broker(config.load(cfg))
    assert broker.config.registry_version == 4
    assert broker.registry is not None
    assert broker.registry.freshness.age(time.time()) >= age_at_least


def test_a_kept_time_in_the_future_is_taken_as_now(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    cfg = registry_config(tmp_path, pki.dir, echo_contracts, "postgresql://u@127.0.0.1:1/db")
    keep_by_hand(cfg, "127.0.0.1:1", 4, time.time() + 10**6)
    broker = Broker(config.load(cfg))
    assert broker.registry is not None
    assert broker.registry.freshness.confirmed_at <= time.time()


def test_a_start_on_a_current_version_this_node_refuses_counts_the_age_from_the_kept_one(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, postgres_url: str
) -> None:
    n = Node(tmp_path, pki, echo_contracts, postgres_url, "127.0.0.1:1")
    n.publish(DEFAULT_GRANTS, "v1")
    bad = {"grant": [{"consumer": "post", "service": "missing", "methods": ["*"]}]}
    store = open_registry(postgres_url)
    try:
        store.commit(bad, "someone", "bad", digest(bad))
    finally:
        store.close()
    keep_by_hand(n.config, "127.0.0.1:1", 1, time.time() - 500)
    broker = Broker(config.load(n.config))
    assert broker.config.registry_version == 1
    assert broker.registry is not None
    assert broker.registry.freshness.age(time.time()) >= 499
    assert "cannot apply the registry database's current version, 2" in (
        broker.registry.freshness.behind or ""
    )


def test_a_restart_takes_the_databases_version_even_below_the_kept_one_and_says_so(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = Node(tmp_path, pki, echo_contracts, postgres_url, "127.0.0.1:1")
    n.publish(DEFAULT_GRANTS, "v1")
    keep_by_hand(n.config, "127.0.0.1:1", 5, time.time())
    with caplog.at_level(logging.WARNING, "tabadol.broker.registry"):
        broker = Broker(config.load(n.config))
    assert broker.config.registry_version == 1
    assert "holds version 1 as its newest, below version 5 this node applied before" in caplog.text
    assert "--skip-to 6" in caplog.text


async def test_a_head_going_backwards_is_refused_once_logged_and_skip_to_moves_on(
    node: tuple[Node, Broker], pki: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    n, broker = node
    n.publish(ONLY_POST, "v2: nocr's grant ends")
    assert await eventually(lambda: broker.config.registry_version == 2)
    url = broker.config.registry.url
    assert url is not None and broker.registry is not None
    with caplog.at_level(logging.ERROR, "tabadol.broker.registry"):
        with psycopg.connect(url, autocommit=True) as su:  # a restore that lost version 2
            su.execute("ALTER TABLE registry_versions DISABLE TRIGGER USER")
            su.execute("DELETE FROM registry_versions WHERE version = 2")
        for _ in range(3):
            await broker.registry.check()
    said = "says its newest version is 1, below version 2 this node has read there"
    assert caplog.text.count(said) == 1
    assert "keeps serving version 2" in caplog.text and "--skip-to 3" in caplog.text
    assert broker.config.registry_version == 2
    assert await eventually(lambda: gauge(broker, "tabadol_registry_version") == 2)
    assert await call(broker, pki, "nocr") == grpc.StatusCode.PERMISSION_DENIED
    assert gauge(broker, "tabadol_registry_age_seconds") < 60  # the database is reachable
    # The operator's way on: the registry meant to be in force, above every version seen.
    n.file.write_text(registry_toml([n.provider], DEFAULT_GRANTS))
    code, _, err = tabadol(
        "registry", "import", "--config", str(n.config), str(n.file), "--skip-to", "3"
    )
    assert code == 0, err
    assert await eventually(lambda: broker.config.registry_version == 3)
    assert await call(broker, pki, "nocr") == grpc.StatusCode.OK
