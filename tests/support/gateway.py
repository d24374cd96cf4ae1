"""The demo agencies behind a broker with its HTTP entry: each agency a real mTLS provider,
the demo's registry and grants, ``[gateway]`` on a free loopback port; and HTTP clients that
present an agency's certificate, as an agency's web application would."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import tomli_w

from tabadol import config
from tabadol.broker import Broker
from tabadol.client import ProviderServer
from tabadol.demo import demo_entries
from tabadol.demo_agencies import AGENCIES
from tabadol.pki import CertificateAuthority
from tabadol.registry.entries import entries_data
from tests.conftest import TRUST_DOMAIN

CONTRACTS = Path(__file__).resolve().parents[2] / "build" / "contracts.pb"


@dataclass
class GatewayExchange:
    broker: Broker
    pki: CertificateAuthority
    providers: dict[str, ProviderServer]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.broker.gateway_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def credentials(self, agency: str) -> Path:
        return self.pki.dir / "agencies" / agency

    def tls(self, agency: str) -> ssl.SSLContext:
        """What an agency's HTTP client trusts and presents."""
        held = self.credentials(agency)
        context = ssl.create_default_context(cafile=str(self.pki.dir / "ca.crt"))
        context.load_cert_chain(held / "agency.crt", held / "agency.key")
        context.check_hostname = False  # the broker's name is a SPIFFE ID, not 127.0.0.1
        return context

    def client(self, agency: str, *, http2: bool = False) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, verify=self.tls(agency), http2=http2, timeout=30
        )


def gateway_config(
    directory: Path, pki_dir: Path, endpoints: dict[str, str], extra: str = ""
) -> Path:
    """A broker configuration with the demo's registry entries and an HTTP entry."""
    entries = {k: v for k, v in entries_data(demo_entries(endpoints)).items() if v}
    head = f"""[broker]
listen = "127.0.0.1:0"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{pki_dir}"
contracts = ["{CONTRACTS}"]
metrics_listen = "127.0.0.1:0"

[tracing]
exporter = "none"

[gateway]
listen = "127.0.0.1:0"
{extra}
"""
    path = directory / "broker.toml"
    path.write_text(head + "\n" + tomli_w.dumps(entries))
    return path


@contextlib.asynccontextmanager
async def gateway_exchange(
    directory: Path, pki: CertificateAuthority, extra: str = ""
) -> AsyncIterator[GatewayExchange]:
    providers: dict[str, ProviderServer] = {}
    broker: Broker | None = None
    try:
        for agency, add_to_server in AGENCIES.items():
            provider = ProviderServer(pki.dir / "agencies" / agency)
            add_to_server(provider.server)
            await provider.start()
            providers[agency] = provider
        endpoints = {agency: p.address for agency, p in providers.items()}
        broker = Broker(config.load(gateway_config(directory, pki.dir, endpoints, extra)))
        await broker.start()
        for provider in providers.values():  # as deployed providers do: the broker's CRL
            provider.follow_broker(f"127.0.0.1:{broker.port}")
        yield GatewayExchange(broker, pki, providers)
    finally:
        if broker is not None:
            await broker.stop(0)
        for provider in providers.values():
            await provider.stop(0)
