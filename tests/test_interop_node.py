"""Another language's gRPC stack on both sides of the broker: Node.js (@grpc/grpc-js).

The Node consumer (interop/node/consumer.js) calls the Python demo agencies through the broker
and must get exactly what a Python consumer gets; the Node provider (interop/node/provider.js)
serves Python consumers through a second broker, admits only the broker, and is told the
consumer the broker proved.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from random import Random
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

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
from tabadol.demo_agencies import AGENCIES, SERVICES, sample_invoice, sample_person
from tabadol.pki import CertificateAuthority
from tabadol.spiffe import agency_dns_name
from tabadol.type.v1.date_pb2 import Date
from tests.conftest import TRUST_DOMAIN
from tests.support.node import run_consumer, start_provider
from tests.support.processes import ROOT

CONTRACTS = ROOT / "build" / "contracts.pb"
NODE_PROVIDER_AGENCY = "cra"  # whose bundle the Node provider serves with
SAW_CONSUMER_KEY = "x-node-saw-consumer"
BAD_NATIONAL_ID = "0012345678"  # fails its check digit
M = TypeVar("M", bound=Message)


def interop_broker_toml(
    directory: Path, pki_dir: Path, services: dict[str, tuple[str, str]]
) -> str:
    """A broker for ``services`` (name -> provider agency, endpoint); post may call them all."""
    lines = [
        "[broker]",
        'listen = "127.0.0.1:0"',
        f'trust_domain = "{TRUST_DOMAIN}"',
        f'pki_dir = "{pki_dir}"',
        f'contracts = ["{CONTRACTS}"]',
        'metrics_listen = "127.0.0.1:0"',
        "",
        "[ledger]",
        f'path = "{directory / "ledger.db"}"',
        "",
        "[tracing]",
        'exporter = "none"',
        "",
    ]
    for agency in ("post", "nocr", "cra", "tax"):
        lines += ["[[agency]]", f'id = "{agency}"', f'name = "Agency {agency}"', ""]
    for name, (provider, endpoint) in services.items():
        lines += [
            "[[service]]", f'name = "{name}"', f'provider = "{provider}"',
            f'endpoints = ["{endpoint}"]', "",
            "[[grant]]", 'consumer = "post"', f'service = "{name}"', 'methods = ["*"]', "",
        ]  # fmt: skip
    return "\n".join(lines)


async def start_interop_broker(
    directory: Path, pki_dir: Path, services: dict[str, tuple[str, str]]
) -> Broker:
    if not CONTRACTS.exists():
        pytest.fail(f"{CONTRACTS} is missing: run `make protos`", pytrace=False)
    path = directory / "broker.toml"
    path.write_text(interop_broker_toml(directory, pki_dir, services))
    broker = Broker(config.load(path))
    await broker.start()
    return broker


@pytest.fixture(scope="module")
async def demo_broker(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority
) -> AsyncIterator[str]:
    """A broker in front of the four Python demo agencies; yields its address."""
    providers: dict[str, ProviderServer] = {}
    broker: Broker | None = None
    try:
        for agency, register in AGENCIES.items():
            provider = ProviderServer(pki.dir / "agencies" / agency)
            register(provider.server)
            await provider.start()
            providers[agency] = provider
        services = {SERVICES[a]: (a, p.address) for a, p in providers.items()}
        broker = await start_interop_broker(
            tmp_path_factory.mktemp("demo-broker"), pki.dir, services
        )
        yield f"127.0.0.1:{broker.port}"
    finally:
        if broker is not None:
            await broker.stop(0)
        for provider in providers.values():
            await provider.stop(0)


@pytest.fixture(scope="module")
async def node_provider(pki: CertificateAuthority) -> AsyncIterator[str]:
    """provider.js serving all four contracts with one agency's bundle; yields its address."""
    process, port = await start_provider(pki.dir / "agencies" / NODE_PROVIDER_AGENCY)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await process.stop()


@pytest.fixture(scope="module")
async def node_broker(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority, node_provider: str
) -> AsyncIterator[str]:
    """A broker that routes all four services to the Node provider; yields its address."""
    services = {name: (NODE_PROVIDER_AGENCY, node_provider) for name in SERVICES.values()}
    broker = await start_interop_broker(tmp_path_factory.mktemp("node-broker"), pki.dir, services)
    yield f"127.0.0.1:{broker.port}"
    await broker.stop(0)


def bundle(pki: CertificateAuthority, agency: str) -> Path:
    return pki.dir / "agencies" / agency


def as_json(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)


def parsed(value: dict[str, Any], message_type: type[M]) -> M:
    """What Node printed (proto-loader's object form) as a Python message, for exact comparison."""
    return json_format.ParseDict(value, message_type())


def person_request(seed: int) -> nocr_pb.InquirePersonRequest:
    person = sample_person(Random(seed))
    birth = person.birth_date
    return nocr_pb.InquirePersonRequest(
        national_id=person.national_id,
        birth_date=Date(year=birth.year, month=birth.month, day=birth.day),
    )


def verify_queries() -> list[nocr_pb.VerifyPersonRequest]:
    """Queries with every verdict the Python registry gives a living person's data."""
    queries = [
        nocr_pb.VerifyPersonRequest(
            reference=f"q{i}", national_id=r.national_id, birth_date=r.birth_date
        )
        for i, r in enumerate(person_request(seed) for seed in range(20, 24))
    ]
    queries[1].first_name = "Nobody"
    queries.append(nocr_pb.VerifyPersonRequest(reference="bad", national_id=BAD_NATIONAL_ID))
    queries.append(
        nocr_pb.VerifyPersonRequest(reference="no-date", national_id=queries[0].national_id)
    )
    return queries


def invoices(count: int) -> list[tax_pb.Invoice]:
    """``count`` valid invoices, then one whose total is off by a rial."""
    batch = [sample_invoice(Random(100 + i)) for i in range(count)]
    wrong = sample_invoice(Random(99))
    wrong.total_rials += 1
    return [*batch, wrong]


# The Node consumer, through the broker, against the Python demo agencies


async def test_node_consumer_gets_the_person_a_python_consumer_gets(
    demo_broker: str, pki: CertificateAuthority
) -> None:
    request = person_request(11)
    run = await run_consumer(demo_broker, bundle(pki, "post"), "unary", as_json(request))
    assert run.exit_code == 0, run
    async with connect(demo_broker, bundle(pki, "post")) as channel:
        expected = await nocr_grpc.PersonRegistryStub(channel).InquirePerson(request, timeout=5)
    assert parsed(run.document["response"], nocr_pb.Person) == expected
    assert run.document["response"]["gender"] == nocr_pb.Gender.Name(expected.gender)
    assert re.fullmatch(r"[0-9a-f]{32}", run.document["request_id"])


async def test_node_consumer_streams_the_addresses_a_python_consumer_gets(
    demo_broker: str, pki: CertificateAuthority
) -> None:
    request = post_pb.ListAddressesRequest(
        region=post_pb.Region(province="Fars", city="Shiraz"), max_results=25
    )
    run = await run_consumer(demo_broker, bundle(pki, "post"), "server_streaming", as_json(request))
    assert run.exit_code == 0, run
    async with connect(demo_broker, bundle(pki, "post")) as channel:
        call = post_grpc.AddressDirectoryStub(channel).ListAddresses(request, timeout=10)
        expected = [address async for address in call]
    assert len(expected) == 25
    assert [parsed(a, post_pb.Address) for a in run.document["responses"]] == expected


async def test_node_consumer_submits_a_client_stream_of_invoices(
    demo_broker: str, pki: CertificateAuthority
) -> None:
    batch = invoices(12)
    json_lines = "\n".join(as_json(invoice) for invoice in batch)
    run = await run_consumer(demo_broker, bundle(pki, "post"), "client_streaming", stdin=json_lines)
    assert run.exit_code == 0, run
    async with connect(demo_broker, bundle(pki, "post")) as channel:
        stub = tax_grpc.InvoiceRegistryStub(channel)
        expected = await stub.SubmitInvoices(iter(batch), timeout=10)
    receipt = parsed(run.document["response"], tax_pb.SubmissionReceipt)
    assert receipt.receipt_id and receipt.receipt_id != expected.receipt_id  # one per submission
    receipt.receipt_id = expected.receipt_id = ""
    assert receipt == expected
    assert (receipt.accepted_count, receipt.rejected_count) == (12, 1)
    # int64 crosses as a decimal string, exactly, whatever its size.
    assert run.document["response"]["accepted_total_rials"] == str(expected.accepted_total_rials)


async def test_node_consumer_verifies_people_one_query_at_a_time_in_a_bidi_stream(
    demo_broker: str, pki: CertificateAuthority
) -> None:
    queries = verify_queries()
    array = json.dumps(
        [json_format.MessageToDict(q, preserving_proto_field_name=True) for q in queries]
    )
    run = await run_consumer(demo_broker, bundle(pki, "post"), "bidi", array)
    assert run.exit_code == 0, run
    async with connect(demo_broker, bundle(pki, "post")) as channel:
        call = nocr_grpc.PersonRegistryStub(channel).VerifyPeople(iter(queries), timeout=10)
        expected = [result async for result in call]
    results = [parsed(r, nocr_pb.VerifyPersonResult) for r in run.document["responses"]]
    assert results == expected
    assert [r["verdict"] for r in run.document["responses"]] == [
        "VERDICT_MATCH", "VERDICT_MISMATCH", "VERDICT_MATCH", "VERDICT_MATCH",
        "VERDICT_INVALID_NATIONAL_ID", "VERDICT_NOT_FOUND",
    ]  # fmt: skip


async def test_node_consumer_gets_the_providers_invalid_argument_unchanged(
    demo_broker: str, pki: CertificateAuthority
) -> None:
    request = person_request(11)
    request.national_id = BAD_NATIONAL_ID
    run = await run_consumer(
        demo_broker, bundle(pki, "post"), "error",
        "tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson", as_json(request),
    )  # fmt: skip
    assert run.exit_code == 1, run
    assert run.document["code"] == "INVALID_ARGUMENT"
    assert run.document["details"] == (
        f"national id {BAD_NATIONAL_ID} fails its check digit: expected 9, got 8"
    )
    assert re.fullmatch(r"[0-9a-f]{32}", run.document["request_id"])


async def test_node_consumer_without_a_grant_is_refused_by_the_broker(
    demo_broker: str, pki: CertificateAuthority
) -> None:
    request = post_pb.ListAddressesRequest(region=post_pb.Region(province="Tehran"))
    run = await run_consumer(demo_broker, bundle(pki, "cra"), "server_streaming", as_json(request))
    assert run.exit_code == 1, run
    assert run.document["code"] == "PERMISSION_DENIED"
    assert run.document["details"] == (
        "Tabadol broker: agency 'cra' has no grant for method 'ListAddresses' of service "
        "'tabadol.agencies.post.v1.AddressDirectory'"
    )
    assert run.document["responses"] == []
    async with connect(demo_broker, bundle(pki, "cra")) as channel:
        call = post_grpc.AddressDirectoryStub(channel).ListAddresses(request, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _ = [address async for address in call]
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == run.document["details"]


# The Node provider, behind the broker, serving Python consumers


async def saw_consumer(call: grpc.aio.Call) -> str | bytes | None:
    """The consumer agency the Node provider was told, from the response's initial metadata."""
    initial = await call.initial_metadata()
    return initial.get(SAW_CONSUMER_KEY) if initial is not None else None


async def test_node_provider_answers_unary_calls_through_the_broker(
    node_broker: str, pki: CertificateAuthority
) -> None:
    request = person_request(11)
    async with connect(node_broker, bundle(pki, "post")) as channel:
        inquiry = nocr_grpc.PersonRegistryStub(channel).InquirePerson(request, timeout=5)
        person = await inquiry
        lookup = post_grpc.AddressDirectoryStub(channel).LookupPostalCode(
            post_pb.LookupPostalCodeRequest(postal_code="1315693564"), timeout=5
        )
        address = await lookup
        matching_line = "0912000000" + request.national_id[-1]
        match = cra_grpc.MobileOwnershipStub(channel).MatchMobile(
            cra_pb.MatchMobileRequest(national_id=request.national_id, mobile=matching_line),
            timeout=5,
        )
        matched = await match
        other_line = "0912000000" + str((int(request.national_id[-1]) + 1) % 10)
        unmatched = await cra_grpc.MobileOwnershipStub(channel).MatchMobile(
            cra_pb.MatchMobileRequest(national_id=request.national_id, mobile=other_line),
            timeout=5,
        )
    assert (person.national_id, person.first_name) == (request.national_id, "Node")
    assert person.last_name == f"Person-{request.national_id[-4:]}"
    assert person.birth_date == request.birth_date
    assert person.life_status == nocr_pb.LIFE_STATUS_ALIVE
    assert (address.postal_code, address.street, address.building_number) == (
        "1315693564", "Node Street", "93564",
    )  # fmt: skip
    assert matched.result == cra_pb.MATCH_RESULT_MATCH
    assert unmatched.result == cra_pb.MATCH_RESULT_NO_MATCH
    for call in (inquiry, lookup, match):
        assert await saw_consumer(call) == "post"


async def test_node_provider_streams_addresses_through_the_broker(
    node_broker: str, pki: CertificateAuthority
) -> None:
    async with connect(node_broker, bundle(pki, "post")) as channel:
        stub = post_grpc.AddressDirectoryStub(channel)
        call = stub.ListAddresses(
            post_pb.ListAddressesRequest(
                region=post_pb.Region(province="Fars", city="Shiraz"), max_results=5
            ),
            timeout=10,
        )
        addresses = [address async for address in call]
        unlimited = [a async for a in stub.ListAddresses(
            post_pb.ListAddressesRequest(region=post_pb.Region(province="Gilan")), timeout=10
        )]  # fmt: skip
    assert [a.postal_code for a in addresses] == [f"10000{n:05d}" for n in range(1, 6)]
    assert {(a.province, a.city) for a in addresses} == {("Fars", "Shiraz")}
    assert all(a.HasField("location") for a in addresses)
    assert len(unlimited) == 12  # the Node directory's size of a region
    assert await saw_consumer(call) == "post"


async def test_node_provider_receives_a_client_stream_of_invoices(
    node_broker: str, pki: CertificateAuthority
) -> None:
    batch = invoices(6)
    async with connect(node_broker, bundle(pki, "post")) as channel:
        call = tax_grpc.InvoiceRegistryStub(channel).SubmitInvoices(iter(batch), timeout=10)
        receipt = await call
    valid = batch[:-1]
    assert receipt.receipt_id == "node-7"
    assert (receipt.accepted_count, receipt.rejected_count) == (6, 1)
    assert receipt.accepted_total_rials == sum(invoice.total_rials for invoice in valid)
    assert receipt.accepted_vat_rials == sum(
        item.vat_rials for invoice in valid for item in invoice.line_items
    )
    [rejection] = receipt.rejections
    assert (rejection.index, rejection.invoice_number) == (6, batch[-1].invoice_number)
    assert rejection.reason.startswith(f"total_rials is {batch[-1].total_rials} but")
    assert await saw_consumer(call) == "post"


async def test_node_provider_answers_each_bidi_query_before_the_next_is_sent(
    node_broker: str, pki: CertificateAuthority
) -> None:
    queries = verify_queries()
    queries[2].first_name = "Node"  # the Node registry's given name for everyone
    verdicts: list[str] = []
    async with connect(node_broker, bundle(pki, "post")) as channel:
        call = nocr_grpc.PersonRegistryStub(channel).VerifyPeople(timeout=10)
        for query in queries:
            await call.write(query)
            result = await call.read()
            assert isinstance(result, nocr_pb.VerifyPersonResult)
            assert result.reference == query.reference
            verdicts.append(nocr_pb.Verdict.Name(result.verdict))
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert verdicts == [
        "VERDICT_MATCH", "VERDICT_MISMATCH", "VERDICT_MATCH", "VERDICT_MATCH",
        "VERDICT_INVALID_NATIONAL_ID", "VERDICT_NOT_FOUND",
    ]  # fmt: skip
    assert await saw_consumer(call) == "post"


async def test_node_providers_error_status_reaches_the_python_consumer(
    node_broker: str, pki: CertificateAuthority
) -> None:
    async with connect(node_broker, bundle(pki, "post")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await nocr_grpc.PersonRegistryStub(channel).InquirePerson(
                nocr_pb.InquirePersonRequest(national_id=BAD_NATIONAL_ID), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        f"national id {BAD_NATIONAL_ID} fails its check digit: expected 9, got 8"
    )


CallOfKind = Callable[[grpc.aio.Channel, tuple[tuple[str, str], ...]], Awaitable[grpc.aio.Call]]


async def unary_call(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.Call:
    call = nocr_grpc.PersonRegistryStub(channel).InquirePerson(
        person_request(11), metadata=metadata, timeout=5
    )
    await call
    return call


async def server_streaming_call(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.Call:
    call = post_grpc.AddressDirectoryStub(channel).ListAddresses(
        post_pb.ListAddressesRequest(region=post_pb.Region(province="Fars"), max_results=2),
        metadata=metadata,
        timeout=5,
    )
    _ = [address async for address in call]
    return call


async def client_streaming_call(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.Call:
    call = tax_grpc.InvoiceRegistryStub(channel).SubmitInvoices(
        iter(invoices(2)), metadata=metadata, timeout=5
    )
    await call
    return call


async def bidi_call(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.Call:
    call = nocr_grpc.PersonRegistryStub(channel).VerifyPeople(
        iter(verify_queries()), metadata=metadata, timeout=5
    )
    _ = [result async for result in call]
    return call


RPC_KINDS: dict[str, CallOfKind] = {
    "unary": unary_call,
    "server_streaming": server_streaming_call,
    "client_streaming": client_streaming_call,
    "bidi": bidi_call,
}


@pytest.mark.parametrize("kind", RPC_KINDS)
async def test_node_provider_is_told_the_consumer_the_broker_proved_not_the_one_claimed(
    node_broker: str, pki: CertificateAuthority, kind: str
) -> None:
    claimed = (("x-tabadol-consumer", "tax"), ("x-tabadol-request-id", "forged"))
    async with connect(node_broker, bundle(pki, "post")) as channel:
        call = await RPC_KINDS[kind](channel, claimed)
    assert await saw_consumer(call) == "post"


async def client_streaming_refused(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.Call:
    # Nothing is sent: a grpc.aio client still writing when the server ends the call may
    # report INTERNAL instead of the status it was sent (grpc/grpc#36066).
    call = tax_grpc.InvoiceRegistryStub(channel).SubmitInvoices(metadata=metadata, timeout=5)
    await call
    return call


async def bidi_refused(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.Call:
    call = nocr_grpc.PersonRegistryStub(channel).VerifyPeople(metadata=metadata, timeout=5)
    await call.read()
    return call


REFUSED_KINDS: dict[str, CallOfKind] = {
    **RPC_KINDS,
    "client_streaming": client_streaming_refused,
    "bidi": bidi_refused,
}


@pytest.mark.parametrize("kind", REFUSED_KINDS)
async def test_node_provider_refuses_an_agency_calling_it_directly(
    node_provider: str, pki: CertificateAuthority, kind: str
) -> None:
    post = bundle(pki, "post")
    creds = grpc.ssl_channel_credentials(
        pki.cert_pem(), (post / "agency.key").read_bytes(), (post / "agency.crt").read_bytes()
    )
    target = agency_dns_name(TRUST_DOMAIN, NODE_PROVIDER_AGENCY)
    async with grpc.aio.secure_channel(
        node_provider, creds, options=[("grpc.ssl_target_name_override", target)]
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await REFUSED_KINDS[kind](channel, (("x-tabadol-consumer", "post"),))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == (
        "this provider endpoint accepts calls only from the Tabadol broker "
        f"(spiffe://{TRUST_DOMAIN}/broker), not from spiffe://{TRUST_DOMAIN}/agency/post"
    )
