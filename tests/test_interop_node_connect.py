"""@connectrpc/connect-node's client calling the demo services through the broker's HTTP
entry, with the services built at run time from the broker's FileDescriptorSet: every answer
is the one the gRPC path gives to the same request."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest

from tabadol.agencies.post.v1 import address_directory_pb2 as post_pb
from tabadol.agencies.post.v1 import address_directory_pb2_grpc as post_grpc
from tests.support.gateway import (
    INQUIRY,
    INVOICES,
    MOBILE_MATCH,
    POSTAL_CODE,
    UNKNOWN,
    VERIFY_QUERIES,
    GatewayExchange,
    as_json,
    grpc_channel,
    inquire_person_over_grpc,
    list_addresses_over_grpc,
    match_mobile_over_grpc,
    submit_invoices_over_grpc,
    unknown_person_over_grpc,
    verify_people_over_grpc,
)
from tests.support.gateway import exchange as exchange  # a fixture: the alias keeps it
from tests.support.node_connect import ConnectRun, run_connect_consumer

INQUIRE = "tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson"
VERIFY = "tabadol.agencies.nocr.v1.PersonRegistry/VerifyPeople"
LIST_ADDRESSES = "tabadol.agencies.post.v1.AddressDirectory/ListAddresses"
LOOKUP_POSTAL_CODE = "tabadol.agencies.post.v1.AddressDirectory/LookupPostalCode"
SUBMIT = "tabadol.agencies.tax.v1.InvoiceRegistry/SubmitInvoices"


async def node_call(
    exchange: GatewayExchange, agency: str, call: dict[str, Any], *options: str
) -> ConnectRun:
    """connect-node's call, verifying the broker by the name in its certificate."""
    return await run_connect_consumer(
        exchange.named_url, exchange.credentials(agency), call, *options
    )


@pytest.mark.parametrize(
    "options",
    [("--codec", "proto"), ("--codec", "json", "--gzip"), ("--http-version", "1.1")],
    ids=["proto", "json-gzip", "http1.1"],
)
async def test_connect_node_unary_is_the_grpc_answer(
    exchange: GatewayExchange, options: tuple[str, ...]
) -> None:
    expected = await inquire_person_over_grpc(exchange, "post")
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
    expected = await match_mobile_over_grpc(exchange, "tax")
    run = await node_call(
        exchange,
        "tax",
        {
            "method": "tabadol.agencies.cra.v1.MobileOwnership/MatchMobile",
            "request": as_json(MOBILE_MATCH),
        },
    )
    assert run.exit_code == 0, run
    assert run.responses == [as_json(expected)]


@pytest.mark.parametrize("codec", ["proto", "json"])
async def test_connect_node_server_stream_is_the_grpc_answer(
    exchange: GatewayExchange, codec: str
) -> None:
    request, expected = await list_addresses_over_grpc(exchange, "nocr")
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
    expected = await submit_invoices_over_grpc(exchange, "post")
    run = await node_call(
        exchange,
        "post",
        {"method": SUBMIT, "kind": "client_streaming", "requests": [as_json(i) for i in INVOICES]},
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
    expected = await verify_people_over_grpc(exchange, "tax")
    run = await node_call(
        exchange,
        "tax",
        {"method": VERIFY, "kind": "bidi_streaming", "requests": [as_json(q) for q in VERIFY_QUERIES]},
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
    over_grpc = await unknown_person_over_grpc(exchange, "post")
    run = await node_call(exchange, "post", {"method": INQUIRE, "request": as_json(UNKNOWN)})
    assert run.exit_code == 1, run
    assert run.responses == []
    assert run.outcome["code"] == "not_found"
    assert run.outcome["message"] == over_grpc.details()


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
