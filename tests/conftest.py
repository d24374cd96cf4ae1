"""Shared fixtures: one PKI, an echo provider and a broker, all real, on loopback ports."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.client import ProviderServer, connect
from tabadol.pki import CertificateAuthority
from tests.support import postgres as pg
from tests.support.echo import SERVICE, EchoProvider, write_echo_contracts

TRUST_DOMAIN = "tabadol.example"
LARGE_MESSAGES = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
AGENCIES = ("echo", "post", "nocr", "cra", "tax")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "pki", TRUST_DOMAIN)
    ca.issue_broker()
    for agency in AGENCIES:
        ca.issue_agency(agency)
    ca.issue_person("operator", "prometheus")  # scrapes /metrics (tests/support/metrics.py)
    return ca


@pytest.fixture(scope="session")
def echo_contracts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_echo_contracts(tmp_path_factory.mktemp("contracts") / "echo.pb")


@dataclass
class RunningProvider:
    echo: EchoProvider
    server: ProviderServer

    @property
    def address(self) -> str:
        return self.server.address


@pytest.fixture(scope="session")
async def echo_provider(pki: CertificateAuthority) -> AsyncIterator[RunningProvider]:
    server = ProviderServer(pki.dir / "agencies" / "echo", options=LARGE_MESSAGES)
    echo = EchoProvider()
    server.server.add_generic_rpc_handlers((echo,))
    await server.start()
    yield RunningProvider(echo, server)
    await server.stop(0)


def broker_toml(
    *,
    pki_dir: Path,
    contracts: Path,
    endpoints: list[str],
    grants: str,
    listen: str = "127.0.0.1:0",
    extra_broker: str = "",
    tracing: str = 'exporter = "none"',
) -> str:
    agencies = "".join(f'[[agency]]\nid = "{a}"\nname = "Agency {a}"\n\n' for a in AGENCIES)
    endpoint_list = ", ".join(f'"{e}"' for e in endpoints)
    return f"""[broker]
listen = "{listen}"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{pki_dir}"
contracts = ["{contracts}"]
metrics_listen = "127.0.0.1:0"
{extra_broker}

[tracing]
{tracing}

{agencies}
[[service]]
name = "{SERVICE}"
provider = "echo"
endpoints = [{endpoint_list}]

{grants}
"""


# post may call everything; nocr only the unary method; cra and tax nothing.
DEFAULT_GRANTS = f"""
[[grant]]
consumer = "post"
service = "{SERVICE}"
methods = ["*"]

[[grant]]
consumer = "nocr"
service = "{SERVICE}"
methods = ["Unary"]
"""


async def start_broker(
    directory: Path,
    pki_dir: Path,
    contracts: Path,
    endpoints: list[str],
    grants: str = DEFAULT_GRANTS,
    tracing: str = 'exporter = "none"',
    ledger: str = "",
) -> Broker:
    """A broker on a free loopback port with a config file written to ``directory``;
    ``ledger`` holds extra lines for its [ledger] section."""
    path = directory / "broker.toml"
    path.write_text(
        broker_toml(
            pki_dir=pki_dir, contracts=contracts, endpoints=endpoints, grants=grants,
            tracing=tracing,
        )
        + (f"\n[ledger]\n{ledger}\n" if ledger else "")
    )  # fmt: skip
    broker = Broker(config.load(path))
    await broker.start()
    return broker


@pytest.fixture(scope="session")
async def broker(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> AsyncIterator[Broker]:
    broker = await start_broker(
        tmp_path_factory.mktemp("broker"), pki.dir, echo_contracts, [echo_provider.address]
    )
    # As a deployed provider does: learn the broker certificates' revocations from it.
    echo_provider.server.follow_broker(f"127.0.0.1:{broker.port}")
    yield broker
    await broker.stop(0)


@pytest.fixture(scope="session")
def channel_for(broker: Broker, pki: CertificateAuthority) -> Callable[[str], grpc.aio.Channel]:
    """A channel to the broker as the given agency (cached per agency for the session)."""
    channels: dict[str, grpc.aio.Channel] = {}

    def make(agency: str) -> grpc.aio.Channel:
        if agency not in channels:
            channels[agency] = connect(
                f"127.0.0.1:{broker.port}", pki.dir / "agencies" / agency, options=LARGE_MESSAGES
            )
        return channels[agency]

    return make


def plain_channel(broker: Broker, pki: CertificateAuthority, agency: str) -> grpc.aio.Channel:
    """A channel as a hostile or non-Tabadol client would open it: mTLS, no helpers."""
    bundle = pki.dir / "agencies" / agency
    creds = grpc.ssl_channel_credentials(
        pki.cert_pem(), (bundle / "agency.key").read_bytes(), (bundle / "agency.crt").read_bytes()
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{broker.port}",
        creds,
        options=[("grpc.ssl_target_name_override", f"broker.{TRUST_DOMAIN}")],
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server for the session: ``TABADOL_TEST_POSTGRES``, or a private one
    started here from Debian's binaries (never skipped: `make test` installs them)."""
    if given := os.environ.get(pg.ENV):
        yield given
        return
    cluster = pg.PostgresCluster()
    try:
        cluster.start()
        yield cluster.url()
    finally:
        cluster.remove()


@pytest.fixture
def postgres_url(postgres: str) -> str:
    """A fresh, empty database of its own for one test."""
    return pg.create_database(postgres)


@pytest.fixture
def own_postgres() -> Iterator[pg.PostgresCluster]:
    """A private PostgreSQL server for one test, which it may stop and start again."""
    cluster = pg.PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
