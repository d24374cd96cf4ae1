"""@connectrpc/connect-node's client calling the demo services through the broker's HTTP
entry, with the services built at run time from the broker's FileDescriptorSet: every answer
is the one the gRPC path gives to the same request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from random import Random
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from tabadol.agencies.cra.v1 import mobile_ownership_pb2 as cra_pb
from tabadol.agencies.cra.v1 import mobile_ownership_pb2_grpc as cra_grpc
from tabadol.agencies.nocr.v1 import person_registry_pb2 as nocr_pb
from tabadol.agencies.nocr.v1 import person_registry_pb2_grpc as nocr_grpc
from tabadol.agencies.post.v1 import address_directory_pb2 as post_pb
from tabadol.agencies.post.v1 import address_directory_pb2_grpc as post_grpc
from tabadol.agencies.tax.v1 import invoice_registry_pb2_grpc as tax_grpc
from tabadol.client import connect
from tabadol.demo_agencies import sample_invoice, sample_person, sample_postal_code
from tabadol.pki import CertificateAuthority
from tabadol.type.v1.date_pb2 import Date
from tests.support.gateway import GatewayExchange, gateway_exchange
from tests.support.node_connect import ConnectRun, run_connect_consumer

PERSON = sample_person(Random(7))
BIRTH = Date(year=PERSON.birth_date.year, month=PERSON.birth_date.month, day=PERSON.birth_date.day)
INQUIRY = nocr_pb.InquirePersonRequest(national_id=PERSON.national_id, birth_date=BIRTH)
UNKNOWN = nocr_pb.InquirePersonRequest(
    national_id=PERSON.national_id, birth_date=Date(year=BIRTH.year - 1, month=1, day=1)
)
POSTAL_CODE = sample_postal_code(Random(7))
INQUIRE = "tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson"
VERIFY = "tabadol.agencies.nocr.v1.PersonRegistry/VerifyPeople"
LIST_ADDRESSES = "tabadol.agencies.post.v1.AddressDirectory/ListAddresses"
LOOKUP_POSTAL_CODE = "tabadol.agencies.post.v1.AddressDirectory/LookupPostalCode"
SUBMIT = "tabadol.agencies.tax.v1.InvoiceRegistry/SubmitInvoices"


@pytest.fixture(scope="module")
async def exchange(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority
) -> AsyncIterator[GatewayExchange]:
    async with gateway_exchange(tmp_path_factory.mktemp("gateway-node"), pki) as running:
        yield running


def grpc_channel(exchange: GatewayExchange, agency: str) -> grpc.aio.Channel:
    return connect(exchange.grpc_address, exchange.credentials(agency))


def as_json(message: Message) -> dict[str, object]:
    return json_format.MessageToDict(message)


async def node_call(
    exchange: GatewayExchange, agency: str, call: dict[str, Any], *options: str
) -> ConnectRun:
    """connect-node's call, verifying the broker by the name in its certificate."""
    url = f"https://localhost:{exchange.broker.gateway_port}"
    return await run_connect_consumer(url, exchange.credentials(agency), call, *options)


@pytest.mark.parametrize(
    "options",
    [("--codec", "proto"), ("--codec", "json", "--gzip"), ("--http-version", "1.1")],
    ids=["proto", "json-gzip", "http1.1"],
)
async def test_connect_node_unary_is_the_grpc_answer(
    exchange: GatewayExchange, options: tuple[str, ...]
) -> None:
    async with grpc_channel(exchange, "post") as channel:
        expected = await nocr_grpc.PersonRegistryStub(channel).InquirePerson(INQUIRY)
    run = await node_call(
        exchange,
        "post",
        {"method": INQUIRE, "kind": "unary", "request": as_json(INQUIRY)},
        *options,
    )
    assert run.exit_code == 0, run
    assert run.outcome["consumer"] == "post"
    assert run.responses == [as_json(expected)]


async def test_connect_node_unary_of_another_agency_is_the_grpc_answer(
    exchange: GatewayExchange,
) -> None:
    match = cra_pb.MatchMobileRequest(national_id=PERSON.national_id, mobile=PERSON.mobile)
    async with grpc_channel(exchange, "tax") as channel:
        expected = await cra_grpc.MobileOwnershipStub(channel).MatchMobile(match)
    run = await node_call(
        exchange,
        "tax",
        {
            "method": "tabadol.agencies.cra.v1.MobileOwnership/MatchMobile",
            "request": as_json(match),
        },
    )
    assert run.exit_code == 0, run
    assert run.responses == [as_json(expected)]


@pytest.mark.parametrize("codec", ["proto", "json"])
async def test_connect_node_server_stream_is_the_grpc_answer(
    exchange: GatewayExchange, codec: str
) -> None:
    async with grpc_channel(exchange, "nocr") as channel:
        directory = post_grpc.AddressDirectoryStub(channel)
        first = await directory.LookupPostalCode(
            post_pb.LookupPostalCodeRequest(postal_code=POSTAL_CODE)
        )
        request = post_pb.ListAddressesRequest(
            region=post_pb.Region(province=first.province, city=first.city), max_results=5
        )
        expected = [as_json(a) async for a in directory.ListAddresses(request)]
    assert len(expected) == 5
    run = await node_call(
        exchange,
        "nocr",
        {"method": LIST_ADDRESSES, "kind": "server_streaming", "request": as_json(request)},
        "--codec", codec, "--gzip",
    )  # fmt: skip
    assert run.exit_code == 0, run
    assert run.responses == expected


async def test_connect_node_client_stream_is_the_grpc_answer(exchange: GatewayExchange) -> None:
    invoices = [sample_invoice(Random(n)) for n in range(3)]
    async with grpc_channel(exchange, "post") as channel:
        expected = await tax_grpc.InvoiceRegistryStub(channel).SubmitInvoices(iter(invoices))
    run = await node_call(
        exchange,
        "post",
        {"method": SUBMIT, "kind": "client_streaming", "requests": [as_json(i) for i in invoices]},
        "--gzip",
    )
    assert run.exit_code == 0, run
    [receipt] = run.responses
    assert receipt["receiptId"] != expected.receipt_id  # each submission its own receipt
    assert {**receipt, "receiptId": expected.receipt_id} == as_json(expected)
    assert receipt["acceptedCount"] == 3


@pytest.mark.parametrize("codec", ["proto", "json"])
async def test_connect_node_bidi_stream_answers_each_query_as_it_comes(
    exchange: GatewayExchange, codec: str
) -> None:
    queries = [
        nocr_pb.VerifyPersonRequest(
            reference="0", national_id=PERSON.national_id, birth_date=BIRTH
        ),
        nocr_pb.VerifyPersonRequest(
            reference="1", national_id=UNKNOWN.national_id, birth_date=UNKNOWN.birth_date
        ),
        nocr_pb.VerifyPersonRequest(
            reference="2", national_id=PERSON.national_id, birth_date=BIRTH, first_name="Nobody"
        ),
    ]
    async with grpc_channel(exchange, "tax") as channel:
        expected = [
            as_json(r)
            async for r in nocr_grpc.PersonRegistryStub(channel).VerifyPeople(iter(queries))
        ]
    run = await node_call(
        exchange,
        "tax",
        {"method": VERIFY, "kind": "bidi_streaming", "requests": [as_json(q) for q in queries]},
        "--codec", codec,
    )  # fmt: skip
    assert run.exit_code == 0, run
    assert run.responses == expected
    assert [r["verdict"] for r in run.responses] == [
        "VERDICT_MATCH",
        "VERDICT_NOT_FOUND",
        "VERDICT_MISMATCH",
    ]


async def test_connect_node_gets_the_providers_not_found_with_the_brokers_message(
    exchange: GatewayExchange,
) -> None:
    async with grpc_channel(exchange, "post") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
            await nocr_grpc.PersonRegistryStub(channel).InquirePerson(UNKNOWN)
    run = await node_call(exchange, "post", {"method": INQUIRE, "request": as_json(UNKNOWN)})
    assert run.exit_code == 1, run
    assert run.responses == []
    assert run.outcome["code"] == "not_found"
    assert run.outcome["message"] == over_grpc.value.details()


async def test_connect_node_without_a_grant_is_permission_denied(
    exchange: GatewayExchange,
) -> None:
    lookup = post_pb.LookupPostalCodeRequest(postal_code=POSTAL_CODE)
    listing = post_pb.ListAddressesRequest(region=post_pb.Region(province="Tehran"))
    async with grpc_channel(exchange, "cra") as channel:  # cra may not read the post's data
        directory = post_grpc.AddressDirectoryStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary_grpc:
            await directory.LookupPostalCode(lookup)
        with pytest.raises(grpc.aio.AioRpcError) as stream_grpc:
            async for _ in directory.ListAddresses(listing):
                pass
    unary = await node_call(
        exchange, "cra", {"method": LOOKUP_POSTAL_CODE, "request": as_json(lookup)}
    )
    streamed = await node_call(
        exchange, "cra", {"method": LIST_ADDRESSES, "request": as_json(listing)}
    )
    for run, over_grpc in ((unary, unary_grpc), (streamed, stream_grpc)):
        assert over_grpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert run.exit_code == 1, run
        assert run.outcome["code"] == "permission_denied"
        assert run.outcome["message"] == over_grpc.value.details()
