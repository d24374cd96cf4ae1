"""The broker's HTTP entry called by clients Tabadol did not write: the ``connectrpc``
package's Connect client (over HTTP/2, gzip-compressed, with an agency's certificate) and
curl, each answer compared with the gRPC path's answer to the same request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import grpc.aio
import pytest
from connectrpc.client import ConnectClient
from connectrpc.code import Code as ConnectCode
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from google.protobuf import json_format
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from pyqwest import Client, HTTPTransport, HTTPVersion

from tabadol.agencies.cra.v1 import mobile_ownership_pb2 as cra_pb
from tabadol.agencies.nocr.v1 import person_registry_pb2 as nocr_pb
from tabadol.agencies.post.v1 import address_directory_pb2 as post_pb
from tabadol.agencies.post.v1 import address_directory_pb2_grpc as post_grpc
from tabadol.agencies.tax.v1 import invoice_registry_pb2 as tax_pb
from tests.support.gateway import (
    INQUIRY,
    INVOICES,
    MOBILE_MATCH,
    PERSON,
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

PERSON_REGISTRY = nocr_pb.DESCRIPTOR.services_by_name["PersonRegistry"]
ADDRESS_DIRECTORY = post_pb.DESCRIPTOR.services_by_name["AddressDirectory"]
INVOICE_REGISTRY = tax_pb.DESCRIPTOR.services_by_name["InvoiceRegistry"]


# -- the connectrpc package's client --------------------------------------------------------


@dataclass(frozen=True)
class GoogleProtobufCodec:
    """A connectrpc codec for google.protobuf messages (connectrpc's own codecs speak its
    own protobuf runtime, protobuf-py)."""

    codec: str  # "proto" or "json", the codec's name on the wire

    def name(self) -> str:
        return self.codec

    def encode(self, message: Message) -> bytes:
        if self.codec == "proto":
            return message.SerializeToString()
        return json_format.MessageToJson(message).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Message:
        message = message_class()
        if self.codec == "proto":
            message.ParseFromString(bytes(data))
        else:
            json_format.Parse(bytes(data), message, ignore_unknown_fields=True)
        return message


_STREAM_TYPES = {
    (False, False): StreamType.UNARY,
    (True, False): StreamType.CLIENT_STREAM,
    (False, True): StreamType.SERVER_STREAM,
    (True, True): StreamType.BIDI_STREAM,
}


def method_info(service: ServiceDescriptor, name: str) -> MethodInfo[Any, Any]:
    """A method as connectrpc calls it, from the contract's descriptor (no generated stub)."""
    method = service.methods_by_name[name]
    return MethodInfo(
        name=name,
        service_name=service.full_name,
        input=GetMessageClass(method.input_type),
        output=GetMessageClass(method.output_type),
        idempotency_level=IdempotencyLevel.UNKNOWN,
        stream_type=_STREAM_TYPES[method.client_streaming, method.server_streaming],
    )


@contextlib.asynccontextmanager
async def connect_client(
    exchange: GatewayExchange, agency: str, codec: str = "proto", *, http2: bool = True
) -> AsyncIterator[ConnectClient]:
    """connectrpc's client as an agency configures it: its certificate and key, the
    exchange's CA, HTTP/2 (unless told), and connectrpc's default gzip request compression."""
    held = exchange.credentials(agency)
    async with (
        HTTPTransport(
            tls_ca_cert=(exchange.pki.dir / "ca.crt").read_bytes(),
            tls_cert=(held / "agency.crt").read_bytes(),
            tls_key=(held / "agency.key").read_bytes(),
            http_version=HTTPVersion.HTTP2 if http2 else HTTPVersion.HTTP1,
            timeout=30,
        ) as transport,
        ConnectClient(
            exchange.named_url, codec=GoogleProtobufCodec(codec), http_client=Client(transport)
        ) as client,
    ):
        yield client


async def each(messages: Iterable[Message]) -> AsyncIterator[Message]:
    for message in messages:
        yield message


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
@pytest.mark.parametrize("codec", ["proto", "json"])
async def test_connectrpc_unary_is_the_grpc_answer(
    exchange: GatewayExchange, codec: str, http2: bool
) -> None:
    expected = await inquire_person_over_grpc(exchange, "post")
    async with connect_client(exchange, "post", codec, http2=http2) as client:
        answer = await client.execute_unary(
            request=INQUIRY, method=method_info(PERSON_REGISTRY, "InquirePerson")
        )
    assert isinstance(answer, nocr_pb.Person)
    assert as_json(answer) == as_json(expected)
    assert answer.national_id == PERSON.national_id


async def test_connectrpc_unary_of_another_agency_is_the_grpc_answer(
    exchange: GatewayExchange,
) -> None:
    mobile_ownership = cra_pb.DESCRIPTOR.services_by_name["MobileOwnership"]
    expected = await match_mobile_over_grpc(exchange, "tax")
    async with connect_client(exchange, "tax", "json") as client:
        answer = await client.execute_unary(
            request=MOBILE_MATCH, method=method_info(mobile_ownership, "MatchMobile")
        )
    assert as_json(answer) == as_json(expected)
    assert answer.result == cra_pb.MATCH_RESULT_MATCH


@pytest.mark.parametrize("codec", ["proto", "json"])
async def test_connectrpc_server_stream_is_the_grpc_answer(
    exchange: GatewayExchange, codec: str
) -> None:
    request, expected = await list_addresses_over_grpc(exchange, "nocr")
    assert len(expected) == 5
    async with connect_client(exchange, "nocr", codec) as client:
        answers = [
            as_json(a)
            async for a in client.execute_server_stream(
                request=request, method=method_info(ADDRESS_DIRECTORY, "ListAddresses")
            )
        ]
    assert answers == expected


async def test_connectrpc_client_stream_is_the_grpc_answer(exchange: GatewayExchange) -> None:
    expected = await submit_invoices_over_grpc(exchange, "post")
    async with connect_client(exchange, "post") as client:
        receipt = await client.execute_client_stream(
            request=each(INVOICES), method=method_info(INVOICE_REGISTRY, "SubmitInvoices")
        )
    assert isinstance(receipt, tax_pb.SubmissionReceipt)
    assert receipt.receipt_id and receipt.receipt_id != expected.receipt_id  # one per submission
    receipt.receipt_id = expected.receipt_id
    assert as_json(receipt) == as_json(expected)
    assert receipt.accepted_count == 3


async def test_connectrpc_bidi_stream_answers_each_query_as_it_comes(
    exchange: GatewayExchange,
) -> None:
    """The next query is sent only once the previous one is answered: the gateway relays
    each message as it arrives, in both directions, over one HTTP/2 stream."""
    expected = await verify_people_over_grpc(exchange, "tax")
    outbox: asyncio.Queue[nocr_pb.VerifyPersonRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[nocr_pb.VerifyPersonRequest]:
        while (query := await outbox.get()) is not None:
            yield query

    answers = []
    outbox.put_nowait(VERIFY_QUERIES[0])
    async with connect_client(exchange, "tax") as client:
        async with asyncio.timeout(30):  # a bound: a buffered stream would wait forever
            async for result in client.execute_bidi_stream(
                request=requests(), method=method_info(PERSON_REGISTRY, "VerifyPeople")
            ):
                answers.append(as_json(result))
                more = len(answers) < len(VERIFY_QUERIES)
                outbox.put_nowait(VERIFY_QUERIES[len(answers)] if more else None)
    assert answers == expected
    assert [a["verdict"] for a in answers] == [
        "VERDICT_MATCH",
        "VERDICT_NOT_FOUND",
        "VERDICT_MISMATCH",
    ]


@pytest.mark.parametrize("codec", ["proto", "json"])
async def test_connectrpc_raises_the_providers_not_found_with_the_brokers_message(
    exchange: GatewayExchange, codec: str
) -> None:
    over_grpc = await unknown_person_over_grpc(exchange, "post")
    assert over_grpc.code() == grpc.StatusCode.NOT_FOUND
    async with connect_client(exchange, "post", codec) as client:
        with pytest.raises(ConnectError) as over_connect:
            await client.execute_unary(
                request=UNKNOWN, method=method_info(PERSON_REGISTRY, "InquirePerson")
            )
    assert over_connect.value.code is ConnectCode.NOT_FOUND
    assert over_connect.value.message == over_grpc.details()
    assert PERSON.national_id in over_connect.value.message


async def test_connectrpc_without_a_grant_is_permission_denied(exchange: GatewayExchange) -> None:
    request = post_pb.ListAddressesRequest(region=post_pb.Region(province="Tehran"))
    async with grpc_channel(exchange, "cra") as channel:  # cra may not list the post's addresses
        with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
            async for _ in post_grpc.AddressDirectoryStub(channel).ListAddresses(request):
                pass
    assert over_grpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with connect_client(exchange, "cra") as client:
        with pytest.raises(ConnectError) as refused:
            async for _ in client.execute_server_stream(
                request=request, method=method_info(ADDRESS_DIRECTORY, "ListAddresses")
            ):
                pass
    assert refused.value.code is ConnectCode.PERMISSION_DENIED
    assert refused.value.message == over_grpc.value.details()


async def test_a_refusal_leaves_the_connection_to_the_callers_other_calls(
    exchange: GatewayExchange,
) -> None:
    """A refusal is answered before the request body is read; the client's body still
    arrives on its HTTP/2 stream, and the connection its other calls share must survive it."""
    inquire = method_info(PERSON_REGISTRY, "InquirePerson")
    async with connect_client(exchange, "cra") as client:  # one HTTP/2 connection
        before = await client.execute_unary(request=INQUIRY, method=inquire)
        for _ in range(2):
            with pytest.raises(ConnectError) as refused:
                await client.execute_unary(
                    request=post_pb.LookupPostalCodeRequest(postal_code=POSTAL_CODE),
                    method=method_info(ADDRESS_DIRECTORY, "LookupPostalCode"),
                )
            assert refused.value.code is ConnectCode.PERMISSION_DENIED
            assert "has no grant" in refused.value.message
            after = await client.execute_unary(request=INQUIRY, method=inquire)
            assert after == before


# -- curl -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurlRun:
    exit_code: int
    status: int
    http_version: str
    content_type: str
    body: bytes
    stderr: str


_WRITE_OUT = "\n%{http_code} %{http_version} %{content_type}"


async def curl(exchange: GatewayExchange, agency: str, *args: str, url: str = "") -> CurlRun:
    """Run Debian's curl with an agency's certificate, verifying the broker by its name."""
    executable = shutil.which("curl")
    if executable is None:
        pytest.fail(
            "curl is missing: run `make test` (it installs Debian's curl) or apt-get install curl",
            pytrace=False,
        )
    held = exchange.credentials(agency)
    proc = await asyncio.create_subprocess_exec(
        executable,
        "--silent",
        "--show-error",
        "--no-buffer",
        "--max-time", "30",
        "--cacert", str(exchange.pki.dir / "ca.crt"),
        "--cert", str(held / "agency.crt"),
        "--key", str(held / "agency.key"),
        "--write-out", _WRITE_OUT,
        *args,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    body, _, written = out.rpartition(b"\n")
    status, version, content_type = written.decode().split(" ", 2)  # 000 0 without an answer
    return CurlRun(
        proc.returncode, int(status), version, content_type, body, err.decode(errors="replace")
    )


def people_url(exchange: GatewayExchange, request: nocr_pb.InquirePersonRequest) -> str:
    date = request.birth_date
    return (
        f"{exchange.named_url}/v1/people/{request.national_id}"
        f"?birth_date.year={date.year}&birth_date.month={date.month}&birth_date.day={date.day}"
    )


@pytest.mark.parametrize("version", ["--http2", "--http1.1"])
async def test_curl_get_is_the_grpc_answer(exchange: GatewayExchange, version: str) -> None:
    expected = await inquire_person_over_grpc(exchange, "post")
    run = await curl(exchange, "post", version, url=people_url(exchange, INQUIRY))
    assert run.exit_code == 0, run.stderr
    assert run.status == 200, run.body
    assert run.http_version == ("2" if version == "--http2" else "1.1")
    assert run.content_type == "application/json"
    assert json.loads(run.body) == as_json(expected)


async def test_curl_posts_a_json_body(exchange: GatewayExchange) -> None:
    expected = await match_mobile_over_grpc(exchange, "tax")
    run = await curl(
        exchange,
        "tax",
        "--header", "content-type: application/json",
        "--data-raw", json.dumps({"national_id": PERSON.national_id, "mobile": PERSON.mobile}),
        url=f"{exchange.named_url}/v1/mobile-ownership:match",
    )  # fmt: skip
    assert run.status == 200, run.body
    assert json.loads(run.body) == as_json(expected)


async def test_curl_reads_a_server_stream_as_ndjson(exchange: GatewayExchange) -> None:
    request, expected = await list_addresses_over_grpc(exchange, "nocr")
    run = await curl(
        exchange,
        "nocr",
        "--http2",
        "--get",
        "--data-urlencode", f"region.city={request.region.city}",
        "--data-urlencode", "max_results=5",
        url=f"{exchange.named_url}/v1/provinces/{quote(request.region.province)}/addresses",
    )  # fmt: skip
    assert run.status == 200, run.body
    assert run.content_type == "application/x-ndjson"
    assert [json.loads(line) for line in run.body.splitlines()] == expected
    assert len(expected) == 5


async def test_curl_gets_the_providers_not_found_as_google_rpc_status(
    exchange: GatewayExchange,
) -> None:
    over_grpc = await unknown_person_over_grpc(exchange, "post")
    run = await curl(exchange, "post", url=people_url(exchange, UNKNOWN))
    assert run.status == 404
    assert json.loads(run.body) == {
        "code": grpc.StatusCode.NOT_FOUND.value[0],
        "message": over_grpc.details(),
        "details": [],
    }


async def test_curl_checks_the_brokers_name(exchange: GatewayExchange) -> None:
    """The verification above is real: a name the broker's certificate lacks is refused."""
    port = exchange.broker.gateway_port
    run = await curl(
        exchange,
        "post",
        "--resolve", f"elsewhere.example:{port}:127.0.0.1",
        url=f"https://elsewhere.example:{port}/v1/postal-codes/{POSTAL_CODE}",
    )  # fmt: skip
    assert run.exit_code == 60, run.stderr  # CURLE_PEER_FAILED_VERIFICATION
    assert "elsewhere.example" in run.stderr
