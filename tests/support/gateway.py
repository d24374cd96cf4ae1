"""The demo agencies behind a broker with its HTTP entry: each agency a real mTLS provider,
the demo's registry and grants, ``[gateway]`` on a free loopback port; HTTP clients that
present an agency's certificate, as an agency's web application would; the demo data the
gateway's tests ask about, and the gRPC path's answers that the HTTP answers must equal."""

from __future__ import annotations

import contextlib
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from random import Random

import grpc.aio
import httpx
import pytest
import tomli_w
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.trace import TracerProvider

from tabadol import config
from tabadol.agencies.cra.v1 import mobile_ownership_pb2 as cra_pb
from tabadol.agencies.cra.v1 import mobile_ownership_pb2_grpc as cra_grpc
from tabadol.agencies.nocr.v1 import person_registry_pb2 as nocr_pb
from tabadol.agencies.nocr.v1 import person_registry_pb2_grpc as nocr_grpc
from tabadol.agencies.post.v1 import address_directory_pb2 as post_pb
from tabadol.agencies.post.v1 import address_directory_pb2_grpc as post_grpc
from tabadol.agencies.tax.v1 import invoice_registry_pb2 as tax_pb
from tabadol.agencies.tax.v1 import invoice_registry_pb2_grpc as tax_grpc
from tabadol.broker import Broker
from tabadol.client import ProviderServer, connect
from tabadol.demo import demo_entries
from tabadol.demo_agencies import AGENCIES, sample_invoice, sample_person, sample_postal_code
from tabadol.pki import CertificateAuthority
from tabadol.registry.entries import entries_data
from tabadol.type.v1.date_pb2 import Date
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, broker_toml

CONTRACTS = Path(__file__).resolve().parents[2] / "build" / "contracts.pb"

# -- the demo data the tests ask about: each request one the demo agencies answer ------------

PERSON = sample_person(Random(7))
BIRTH = Date(year=PERSON.birth_date.year, month=PERSON.birth_date.month, day=PERSON.birth_date.day)
BIRTH_QUERY = {
    "birth_date.year": PERSON.birth_date.year,
    "birth_date.month": PERSON.birth_date.month,
    "birth_date.day": PERSON.birth_date.day,
}
INQUIRY = nocr_pb.InquirePersonRequest(national_id=PERSON.national_id, birth_date=BIRTH)
# A real national id with the wrong birth date: the registry's NOT_FOUND.
UNKNOWN = nocr_pb.InquirePersonRequest(
    national_id=PERSON.national_id, birth_date=Date(year=BIRTH.year - 1, month=1, day=1)
)
POSTAL_CODE = sample_postal_code(Random(7))
MOBILE_MATCH = cra_pb.MatchMobileRequest(national_id=PERSON.national_id, mobile=PERSON.mobile)
INVOICES = tuple(sample_invoice(Random(n)) for n in range(3))
# VerifyPeople's three verdicts in turn: a match, a person not on record, a mismatch.
VERIFY_QUERIES = (
    nocr_pb.VerifyPersonRequest(reference="0", national_id=PERSON.national_id, birth_date=BIRTH),
    nocr_pb.VerifyPersonRequest(
        reference="1", national_id=UNKNOWN.national_id, birth_date=UNKNOWN.birth_date
    ),
    nocr_pb.VerifyPersonRequest(
        reference="2", national_id=PERSON.national_id, birth_date=BIRTH, first_name="Nobody"
    ),
)


@dataclass
class GatewayExchange:
    broker: Broker
    pki: CertificateAuthority
    providers: dict[str, ProviderServer]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.broker.gateway_port}"

    @property
    def named_url(self) -> str:
        """The gateway by the name in the broker's certificate, so that clients verify it."""
        return f"https://localhost:{self.broker.gateway_port}"

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
    directory: Path,
    pki_dir: Path,
    endpoints: dict[str, str],
    extra: str = "",
    *,
    broker_extra: str = "",
) -> Path:
    """A broker configuration with the demo's registry entries and an HTTP entry; ``extra``
    follows ``[gateway]``'s listen, ``broker_extra`` goes into ``[broker]``."""
    entries = {k: v for k, v in entries_data(demo_entries(endpoints)).items() if v}
    head = f"""[broker]
listen = "127.0.0.1:0"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{pki_dir}"
contracts = ["{CONTRACTS}"]
metrics_listen = "127.0.0.1:0"
{broker_extra}
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
    directory: Path,
    pki: CertificateAuthority,
    extra: str = "",
    *,
    broker_extra: str = "",
    agencies: Mapping[str, Callable[[grpc.aio.Server], None]] = AGENCIES,
    tracer_provider: TracerProvider | None = None,
) -> AsyncIterator[GatewayExchange]:
    """``agencies`` registers each agency's services on its provider (the demo's own unless
    told); ``tracer_provider`` traces what the providers receive."""
    providers: dict[str, ProviderServer] = {}
    broker: Broker | None = None
    try:
        for agency, add_to_server in agencies.items():
            provider = ProviderServer(
                pki.dir / "agencies" / agency, tracer_provider=tracer_provider
            )
            add_to_server(provider.server)
            await provider.start()
            providers[agency] = provider
        endpoints = {agency: p.address for agency, p in providers.items()}
        path = gateway_config(directory, pki.dir, endpoints, extra, broker_extra=broker_extra)
        broker = Broker(config.load(path))
        await broker.start()
        for provider in providers.values():  # as deployed providers do: the broker's CRL
            provider.follow_broker(f"127.0.0.1:{broker.port}")
        yield GatewayExchange(broker, pki, providers)
    finally:
        if broker is not None:
            await broker.stop(0)
        for provider in providers.values():
            await provider.stop(0)


@pytest.fixture(scope="module")
async def exchange(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority
) -> AsyncIterator[GatewayExchange]:
    """The demo exchange with its HTTP entry, one for each test module that imports it."""
    async with gateway_exchange(tmp_path_factory.mktemp("gateway"), pki) as running:
        yield running


@contextlib.asynccontextmanager
async def running_echo_gateway(
    directory: Path, pki_dir: Path, contracts: Path, endpoint: str, gateway: str = ""
) -> AsyncIterator[Broker]:
    """A broker for the echo service (every agency granted) with an HTTP entry; ``gateway``
    adds to its ``[gateway]`` section."""
    path = directory / "broker.toml"
    path.write_text(
        broker_toml(
            pki_dir=pki_dir, contracts=contracts, endpoints=[endpoint], grants=DEFAULT_GRANTS
        )
        + f'\n[gateway]\nlisten = "127.0.0.1:0"\n{gateway}'
    )
    broker = Broker(config.load(path))
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop(0)


def grpc_channel(exchange: GatewayExchange, agency: str) -> grpc.aio.Channel:
    return connect(exchange.grpc_address, exchange.credentials(agency))


def as_json(message: Message) -> dict[str, object]:
    return json_format.MessageToDict(message)


def envelopes(*messages: bytes, flags: int = 0) -> bytes:
    """Connect's streaming body: each message behind its flags byte and 4-byte length."""
    return b"".join(struct.pack(">BI", flags, len(m)) + m for m in messages)


def unframe(body: bytes) -> list[tuple[int, bytes]]:
    """A Connect streaming body's envelopes, as (flags, message) in order."""
    frames = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        frames.append((flags, body[5 : 5 + length]))
        body = body[5 + length :]
    return frames


# -- the gRPC path's answers, which the same request over HTTP must get ---------------------


async def inquire_person_over_grpc(exchange: GatewayExchange, agency: str) -> nocr_pb.Person:
    async with grpc_channel(exchange, agency) as channel:
        return await nocr_grpc.PersonRegistryStub(channel).InquirePerson(INQUIRY)


async def unknown_person_over_grpc(exchange: GatewayExchange, agency: str) -> grpc.aio.AioRpcError:
    """The registry's NOT_FOUND for UNKNOWN, with the broker's message."""
    async with grpc_channel(exchange, agency) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await nocr_grpc.PersonRegistryStub(channel).InquirePerson(UNKNOWN)
    return refused.value


async def match_mobile_over_grpc(
    exchange: GatewayExchange, agency: str
) -> cra_pb.MatchMobileResponse:
    async with grpc_channel(exchange, agency) as channel:
        return await cra_grpc.MobileOwnershipStub(channel).MatchMobile(MOBILE_MATCH)


async def list_addresses_over_grpc(
    exchange: GatewayExchange, agency: str
) -> tuple[post_pb.ListAddressesRequest, list[dict[str, object]]]:
    """A request for five addresses in POSTAL_CODE's city, and the addresses listed."""
    async with grpc_channel(exchange, agency) as channel:
        directory = post_grpc.AddressDirectoryStub(channel)
        first = await directory.LookupPostalCode(
            post_pb.LookupPostalCodeRequest(postal_code=POSTAL_CODE)
        )
        request = post_pb.ListAddressesRequest(
            region=post_pb.Region(province=first.province, city=first.city), max_results=5
        )
        return request, [as_json(a) async for a in directory.ListAddresses(request)]


async def submit_invoices_over_grpc(
    exchange: GatewayExchange, agency: str
) -> tax_pb.SubmissionReceipt:
    async with grpc_channel(exchange, agency) as channel:
        return await tax_grpc.InvoiceRegistryStub(channel).SubmitInvoices(iter(INVOICES))


async def verify_people_over_grpc(
    exchange: GatewayExchange, agency: str
) -> list[dict[str, object]]:
    async with grpc_channel(exchange, agency) as channel:
        stub = nocr_grpc.PersonRegistryStub(channel)
        return [as_json(r) async for r in stub.VerifyPeople(iter(VERIFY_QUERIES))]
