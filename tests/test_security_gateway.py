"""The broker's HTTP entry against an outsider: the hostile-input suite's HTTP section.

The trust boundary is the same as on the gRPC port. Identity comes only from the verified
client certificate; whoever the registry does not declare, or the CRL revokes, is refused
before anything about the routes or the request's shape is said; bad input is a 400 that
names the field, and nothing of it reaches a provider; and after every attack the broker
keeps serving everyone else. What reached the providers is read at the providers
themselves: each demo provider traces every call it receives into an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import signal
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tabadol.agencies.nocr.v1 import person_registry_pb2_grpc as nocr_grpc
from tabadol.agencies.tax.v1 import invoice_registry_pb2_grpc as tax_grpc
from tabadol.broker import Broker
from tabadol.client import ProviderServer
from tabadol.demo_agencies import AGENCIES, nocr, tax
from tabadol.pki import CertificateAuthority
from tabadol.protocol import CONSUMER_KEY, GRANT_KEY, PURPOSE_KEY
from tests.conftest import TRUST_DOMAIN
from tests.support.echo import own_pki
from tests.support.exchange import eventually
from tests.support.gateway import (
    BIRTH,
    BIRTH_QUERY,
    PERSON,
    POSTAL_CODE,
    GatewayExchange,
    as_json,
    envelopes,
    gateway_config,
    gateway_exchange,
    unframe,
)
from tests.support.h2raw import RawH2
from tests.support.processes import TABADOL, Process

PERSON_PATH = f"/v1/people/{PERSON.national_id}"
BIRTH_JSON = as_json(BIRTH)

INQUIRE = "/tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson"
VERIFY_PEOPLE = "/tabadol.agencies.nocr.v1.PersonRegistry/VerifyPeople"
LOOKUP = "/tabadol.agencies.post.v1.AddressDirectory/LookupPostalCode"
LIST_ADDRESSES = "/tabadol.agencies.post.v1.AddressDirectory/ListAddresses"
SUBMIT_INVOICES = "/tabadol.agencies.tax.v1.InvoiceRegistry/SubmitInvoices"
MATCH_MOBILE = "/tabadol.agencies.cra.v1.MobileOwnership/MatchMobile"

BODY_LIMIT = 64 * 1024  # [gateway] max_body_bytes here: over it is cheap to send
STREAM_LIMIT = 16  # [broker] max_concurrent_streams here: per consumer connection
NOCR_CONCURRENCY = 3  # nocr's calls in flight at once, over all its connections
CONNECT_JSON = {"content-type": "application/json", "connect-protocol-version": "1"}
CONNECT_STREAM_JSON = {"content-type": "application/connect+json"}
KEY_MATERIAL = ("-----BEGIN", "PRIVATE KEY", "MII")  # PEM armour, DER in base64


class RecordingPersonRegistry(nocr.PersonRegistry):
    """The demo NOCR, keeping the metadata of each InquirePerson call it receives."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def InquirePerson(self, request: Any, context: Any) -> Any:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        return await super().InquirePerson(request, context)


class RecordingInvoiceRegistry(tax.InvoiceRegistry):
    """The demo tax register, keeping how each submission's stream ended: how many invoices
    arrived, and whether the stream was complete (half-closed, so the batch is committed)."""

    def __init__(self) -> None:
        self.submissions: list[tuple[int, bool]] = []

    async def SubmitInvoices(self, request_iterator: Any, context: Any) -> Any:
        seen = 0
        completed = False

        async def counted() -> AsyncIterator[Any]:
            nonlocal seen, completed
            async for invoice in request_iterator:
                seen += 1
                yield invoice
            completed = True

        try:
            return await super().SubmitInvoices(counted(), context)
        finally:
            self.submissions.append((seen, completed))


@dataclass
class Observed:
    """The demo exchange with its HTTP entry, and what reached its providers."""

    exchange: GatewayExchange
    spans: InMemorySpanExporter
    nocr: RecordingPersonRegistry
    tax: RecordingInvoiceRegistry
    pki_dir: Path
    held: list[Any] = field(default_factory=list)

    def reached(self) -> list[str]:
        """The methods the providers received calls for, in the order the calls ended."""
        return [span.name for span in self.spans.get_finished_spans()]

    def client(self, agency: str, *, http2: bool = False) -> httpx.AsyncClient:
        return self.exchange.client(agency, http2=http2)

    @property
    def broker(self) -> Broker:
        return self.exchange.broker


@contextlib.asynccontextmanager
async def observed_exchange(directory: Path, pki: CertificateAuthority) -> AsyncIterator[Observed]:
    """The demo agencies behind a broker with [gateway], each provider tracing what it gets;
    a small body limit, a per-connection stream limit and a concurrency limit for nocr."""
    exporter = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(exporter))
    recording = RecordingPersonRegistry()
    invoices = RecordingInvoiceRegistry()
    agencies = {
        **AGENCIES,
        "nocr": partial(nocr_grpc.add_PersonRegistryServicer_to_server, recording),
        "tax": partial(tax_grpc.add_InvoiceRegistryServicer_to_server, invoices),
    }
    extra = (
        f"max_body_bytes = {BODY_LIMIT}\n\n"
        f'[[limit]]\nconsumer = "nocr"\nconcurrency = {NOCR_CONCURRENCY}\n'
    )
    try:
        async with gateway_exchange(
            directory,
            pki,
            extra,
            broker_extra=f"max_concurrent_streams = {STREAM_LIMIT}\n",
            agencies=agencies,
            tracer_provider=tracer,
        ) as exchange:
            yield Observed(exchange, exporter, recording, invoices, pki.dir)
    finally:
        tracer.shutdown()


@pytest.fixture(scope="module")
async def hx(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority
) -> AsyncIterator[Observed]:
    async with observed_exchange(tmp_path_factory.mktemp("hostile-gateway"), pki) as running:
        yield running


@pytest.fixture(autouse=True)
def no_key_material_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever an attacker sends, the broker's logs never carry certificate or key bytes."""
    caplog.set_level(logging.DEBUG, logger="tabadol")
    yield
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert not any(m in text for m in KEY_MATERIAL[:2]), text[:300]


# -- how each attack is judged ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def nothing_reaches_a_provider(hx: Observed) -> AsyncIterator[None]:
    """The block's requests reach no provider, and afterwards the broker still serves: a
    good call goes through, and it is the only call the providers got since."""
    before = len(hx.reached())
    yield
    await still_serves(hx, before)


@contextlib.asynccontextmanager
async def no_invoice_reaches_the_register(hx: Observed) -> AsyncIterator[None]:
    """For client streams, which the broker opens to the provider before their first message
    (as on the gRPC port): no invoice of the block reaches the register, and its stream is
    cancelled, never completed, so no batch is committed."""
    submissions, before = len(hx.tax.submissions), len(hx.reached())
    yield
    assert await eventually(lambda: len(hx.tax.submissions) > submissions)
    assert all(s == (0, False) for s in hx.tax.submissions[submissions:]), hx.tax.submissions
    await still_serves(hx)
    others = [m for m in hx.reached()[before:] if m != SUBMIT_INVOICES]
    assert others == [INQUIRE], others


async def still_serves(hx: Observed, before: int | None = None) -> None:
    async with hx.client("post") as http:
        answer = await http.get(PERSON_PATH, params=BIRTH_QUERY)
    assert answer.status_code == 200, answer.text
    assert answer.json()["nationalId"] == PERSON.national_id
    if before is not None:
        assert await eventually(lambda: len(hx.reached()) > before)
        assert hx.reached()[before:] == [INQUIRE]


def rest_problem(answer: httpx.Response, status: int) -> str:
    """The message of a google.rpc.Status error answer with this HTTP status."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = answer.json()
    assert set(body) == {"code", "message", "details"}, body
    assert not any(m in answer.text for m in KEY_MATERIAL), answer.text[:300]
    return str(body["message"])


def connect_problem(answer: httpx.Response, status: int, code: str) -> str:
    """The message of a Connect unary error with this HTTP status and Connect code."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    body = answer.json()
    assert body["code"] == code, body
    assert not any(m in answer.text for m in KEY_MATERIAL), answer.text[:300]
    return str(body["message"])


def stream_end(answer: httpx.Response) -> dict[str, Any]:
    """The end-of-stream message that closes a Connect streaming answer (always HTTP 200)."""
    assert answer.status_code == 200, (answer.status_code, answer.text)
    frames = unframe(answer.content)
    flags, data = frames[-1]
    assert flags & 0x02, frames
    assert not any(m.encode() in answer.content for m in KEY_MATERIAL)
    return dict(json.loads(data))


def list_addresses_json(**fields: Any) -> bytes:
    request = {"region": {"province": "Tehran"}, "maxResults": 2, **fields}
    return json.dumps(request).encode()


# -- raw HTTP/1.1: what no well-behaved client sends -----------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def open_http1(
    hx: Observed, agency: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = hx.exchange.tls(agency)
    context.set_alpn_protocols(["http/1.1"])
    async with asyncio.timeout(10):
        return await asyncio.open_connection(
            "127.0.0.1", hx.broker.gateway_port, ssl=context, server_hostname="broker"
        )


async def read_answer(reader: asyncio.StreamReader) -> RawAnswer:
    """One HTTP/1.1 response (Content-Length, chunked, or up to the connection's close)."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
        else:
            body = await reader.read()
    return RawAnswer(int(status_line.split()[1]), headers, body)


async def raw_request(hx: Observed, agency: str, request: bytes) -> RawAnswer:
    reader, writer = await open_http1(hx, agency)
    try:
        writer.write(request)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.transport.abort()


def http1(
    verb: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{verb} {target} HTTP/1.1", "host: broker"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body and not any(
        k.lower() in ("content-length", "transfer-encoding") for k in headers or {}
    ):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- identity: only a verified certificate gets as far as HTTP -------------------------------


async def test_a_client_without_a_certificate_is_refused_at_the_handshake(hx: Observed) -> None:
    anonymous = ssl.create_default_context(cafile=str(hx.pki_dir / "ca.crt"))
    anonymous.check_hostname = False
    async with nothing_reaches_a_provider(hx):
        for http2 in (False, True):
            async with httpx.AsyncClient(
                base_url=hx.exchange.url, verify=anonymous, http2=http2, timeout=10
            ) as http:
                with pytest.raises(httpx.TransportError):
                    await http.get(PERSON_PATH, params=BIRTH_QUERY)
                with pytest.raises(httpx.TransportError):
                    await http.get("/openapi.json")


async def test_a_certificate_from_another_ca_is_refused_at_the_handshake(
    hx: Observed, tmp_path: Path
) -> None:
    """An impostor CA with the exchange's trust domain issues itself a "post" certificate."""
    impostor = own_pki(tmp_path, TRUST_DOMAIN, "post")
    forged = ssl.create_default_context(cafile=str(hx.pki_dir / "ca.crt"))
    forged.check_hostname = False
    held = impostor.dir / "agencies" / "post"
    forged.load_cert_chain(held / "agency.crt", held / "agency.key")
    async with nothing_reaches_a_provider(hx):
        for http2 in (False, True):
            async with httpx.AsyncClient(
                base_url=hx.exchange.url, verify=forged, http2=http2, timeout=10
            ) as http:
                with pytest.raises(httpx.TransportError):
                    await http.get(PERSON_PATH, params=BIRTH_QUERY)


# -- deny by default: an undeclared agency learns nothing -------------------------------------

UNDECLARED_PROBES = [
    ("GET", PERSON_PATH, {}, b""),  # a real route
    ("GET", "/v1/nowhere", {}, b""),  # no such route
    ("DELETE", f"/v1/postal-codes/{POSTAL_CODE}", {}, b""),  # a real path, the wrong verb
    ("GET", "/v1/people/", {}, b""),  # a real route, its path field missing
    ("POST", "/v1/people:inquire", {"content-type": "application/json"}, b"{not json"),
    ("POST", INQUIRE, CONNECT_JSON, b"{}"),  # a real method
    ("POST", "/tabadol.agencies.nocr.v1.PersonRegistry/Nope", CONNECT_JSON, b"{}"),
    ("POST", "/no.such.Service/Method", CONNECT_JSON, b"{}"),
    # A real method, and what would be wrong with the request if the caller were admitted:
    ("POST", INQUIRE, {**CONNECT_JSON, "connect-protocol-version": "2"}, b"{}"),
    ("POST", INQUIRE, {"content-type": "application/xml"}, b"<a/>"),
    ("POST", INQUIRE, {**CONNECT_JSON, "connect-timeout-ms": "soon"}, b"{}"),
    ("POST", INQUIRE, {**CONNECT_JSON, "x-note": b"caf\xe9"}, b"{}"),
    ("POST", VERIFY_PEOPLE, {"content-type": "application/connect+json"}, b""),  # bidi, HTTP/1.1
    ("GET", "/openapi.json", {}, b""),
]


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
async def test_an_undeclared_agency_gets_the_same_403_for_every_route_real_or_not(
    hx: Observed, http2: bool
) -> None:
    """ "echo" holds a certificate of the exchange's CA but the registry does not declare it:
    whatever it asks, the answer is the same refusal, so it cannot map routes or methods."""
    answers = []
    async with nothing_reaches_a_provider(hx), hx.client("echo", http2=http2) as http:
        for verb, target, headers, body in UNDECLARED_PROBES:
            answer = await http.request(verb, target, headers=headers, content=body)
            answers.append((verb, target, answer))
    problems = []
    for verb, target, answer in answers:
        status, message = answer.status_code, ""
        if answer.headers.get("content-type", "").startswith("application/connect+"):
            error = stream_end(answer)["error"]  # a stream (bidi over HTTP/2) ends in its error
            status = 403 if error["code"] == "permission_denied" else error["code"]
            message = error["message"]
        elif answer.content:
            message = answer.json().get("message", "")
        rest = target.startswith("/v1/")
        if (
            # 403, or once it refuses fast (a refused certificate is throttled, as on the gRPC
            # port) 429: the same answer for every probe either way.
            status not in (403, 429)
            or "'echo' is not a registered agency" not in message
            # A REST route's method is not the caller's to learn.
            or (rest and ("PersonRegistry" in message or "AddressDirectory" in message))
            or any(m in answer.text for m in KEY_MATERIAL)
        ):
            problems.append((verb, target, status, message))
    assert problems == [], "\n".join(map(str, problems))


async def test_an_agency_without_a_grant_learns_nothing_of_the_request_schema(
    hx: Observed,
) -> None:
    """cra may not list addresses: its malformed, oversized or unknown-field requests are
    all the same 403, never a 400 that would describe the schema."""
    async with nothing_reaches_a_provider(hx):
        async with hx.client("cra") as http:
            answers = [
                await http.get("/v1/provinces/Tehran/addresses", params={"max_results": "-1"}),
                await http.get("/v1/provinces/Tehran/addresses", params={"guess": "1"}),
                await http.post(
                    LOOKUP,
                    content=b"x" * (BODY_LIMIT + 1),
                    headers={"content-type": "application/json"},
                ),
            ]
        async with hx.client("cra") as http:
            streamed = await http.post(
                LIST_ADDRESSES, content=envelopes(b"{]"), headers=CONNECT_STREAM_JSON
            )
    assert "has no grant" in rest_problem(answers[0], 403)
    assert "has no grant" in rest_problem(answers[1], 403)
    assert "has no grant" in connect_problem(answers[2], 403, "permission_denied")
    end = stream_end(streamed)  # a Connect stream's errors come in its last envelope
    assert end["error"]["code"] == "permission_denied"
    assert "has no grant" in end["error"]["message"]


# -- revocation on every leg -----------------------------------------------------------------


async def serves_tax(hx: Observed) -> None:
    """A good call by another agency to another provider (revoking nocr revokes its provider
    certificate too)."""
    async with hx.client("tax") as http:
        answer = await http.get(f"/v1/postal-codes/{POSTAL_CODE}")
    assert answer.status_code == 200, answer.text


async def test_a_revoked_agency_is_refused_and_its_open_http_stream_is_ended(
    tmp_path: Path,
) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "nocr", "post", "cra", "tax")
    async with observed_exchange(tmp_path, ca) as own:
        async with own.client("nocr", http2=True) as http:
            # Not read after its first line: HTTP/2 flow control keeps the stream in flight.
            request = http.build_request("GET", "/v1/provinces/Tehran/addresses")
            streaming = await http.send(request, stream=True)
            assert streaming.status_code == 200
            lines = streaming.aiter_lines()
            first = json.loads(await anext(lines))
            assert first["province"] == "Tehran"

            ca.revoke_agency("nocr")
            own.broker.reload(own.broker.config)

            rest = [json.loads(line) async for line in lines if line]
            await streaming.aclose()
            # The same connection, opened before the revocation, and a new one.
            same_connection = await http.get(f"/v1/postal-codes/{POSTAL_CODE}")
            document = await http.get("/openapi.json")
        async with own.client("nocr") as fresh:
            new_connection = await fresh.post(
                LOOKUP, json={"postalCode": POSTAL_CODE}, headers=CONNECT_JSON
            )
        await serves_tax(own)
    assert len(rest) < 3300, "the stream ran to its end through the revocation"
    error = rest[-1]["error"]
    assert error["code"] == 16  # UNAUTHENTICATED
    assert "revoked during the call" in error["message"]
    for answer in (same_connection, document):
        assert "revoked" in rest_problem(answer, 401)
    assert "revoked" in connect_problem(new_connection, 401, "unauthenticated")


async def test_a_revoked_agencys_connect_stream_over_http2_is_ended(tmp_path: Path) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "nocr", "post", "cra", "tax")
    async with observed_exchange(tmp_path, ca) as own:
        async with own.client("nocr", http2=True) as http:
            request = http.build_request(
                "POST",
                LIST_ADDRESSES,
                content=envelopes(json.dumps({"region": {"province": "Tehran"}}).encode()),
                headers=CONNECT_STREAM_JSON,
            )
            streaming = await http.send(request, stream=True)
            chunks = streaming.aiter_bytes()
            assert await anext(chunks)
            ca.revoke_agency("nocr")
            own.broker.reload(own.broker.config)
            rest = b"".join([chunk async for chunk in chunks])
        await serves_tax(own)
    end = json.loads(rest[rest.rindex(b'{"error"') :])
    assert end["error"]["code"] == "unauthenticated"
    assert "revoked during the call" in end["error"]["message"]


# -- the broker's own x-tabadol-* headers cannot be forged ------------------------------------


async def test_spoofed_tabadol_headers_are_replaced_by_the_brokers_own(hx: Observed) -> None:
    spoofed = {
        CONSUMER_KEY: "tax",
        GRANT_KEY: "forged-grant",
        PURPOSE_KEY: "anything%20goes",
        "X-Tabadol-Request-Id": "forged-id",
        "x-tabadol-consumer-bin": "dGF4",
    }
    before = len(hx.nocr.metadata)
    async with hx.client("post") as http, hx.client("post", http2=True) as http2:
        answers = [
            await http.get(PERSON_PATH, params=BIRTH_QUERY, headers=spoofed),
            await http2.post(
                INQUIRE,
                json={"nationalId": PERSON.national_id, "birthDate": BIRTH_JSON},
                headers={**CONNECT_JSON, **spoofed},
            ),
        ]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    seen = hx.nocr.metadata[before:]
    assert len(seen) == 2
    for metadata in seen:
        assert metadata[CONSUMER_KEY] == "post"
        assert metadata[GRANT_KEY] != "forged-grant"
        assert metadata[PURPOSE_KEY] != "anything%20goes"
        assert "Postal" in metadata[PURPOSE_KEY] or "mail" in metadata[PURPOSE_KEY]
        assert metadata["x-tabadol-request-id"] != "forged-id"
        assert "x-tabadol-consumer-bin" not in metadata
    assert answers[0].headers["x-tabadol-request-id"] != "forged-id"


# -- bad input: 400 naming the problem, never forwarded ---------------------------------------


async def test_malformed_json_is_400_naming_the_problem(hx: Observed) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        rest = await http.post(
            "/v1/people:inquire",
            content=b'{"nationalId": "1234567890",',
            headers={"content-type": "application/json"},
        )
        connect_ = await http.post(INQUIRE, content=b"{'single': 'quotes'}", headers=CONNECT_JSON)
        trailing = await http.post(INQUIRE, content=b"{} {}", headers=CONNECT_JSON)
        not_object = await http.post(INQUIRE, content=b"[1, 2]", headers=CONNECT_JSON)
        duplicate = await http.post(
            INQUIRE, content=b'{"nationalId": "1", "nationalId": "2"}', headers=CONNECT_JSON
        )
        nan = await http.post(
            "/v1/people:inquire", content=b'{"birthDate": {"year": NaN}}',
            headers={"content-type": "application/json"},
        )  # fmt: skip
    assert "JSON" in rest_problem(rest, 400)
    assert "JSON" in connect_problem(connect_, 400, "invalid_argument")
    assert "JSON" in connect_problem(trailing, 400, "invalid_argument")
    connect_problem(not_object, 400, "invalid_argument")
    assert "nationalId" in connect_problem(duplicate, 400, "invalid_argument")
    rest_problem(nan, 400)


async def test_wrong_types_are_400_naming_the_field(hx: Observed) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        as_number = await http.post(
            "/v1/people:inquire", json={"nationalId": 1234567890, "birthDate": BIRTH_JSON}
        )
        as_string = await http.post(
            INQUIRE,
            json={"nationalId": PERSON.national_id, "birthDate": {**BIRTH_JSON, "year": "soon"}},
            headers=CONNECT_JSON,
        )
        as_list = await http.post(
            "/v1/people:inquire", json={"nationalId": PERSON.national_id, "birthDate": [1]}
        )
        in_query = await http.get(PERSON_PATH, params={**BIRTH_QUERY, "birth_date.day": "x"})
        float_int = await http.get(PERSON_PATH, params={**BIRTH_QUERY, "birth_date.day": "1.5"})
    assert "nationalId" in rest_problem(as_number, 400) or "national_id" in as_number.text
    assert "year" in connect_problem(as_string, 400, "invalid_argument")
    assert "birthDate" in rest_problem(as_list, 400) or "birth_date" in as_list.text
    assert "birth_date.day" in rest_problem(in_query, 400)
    assert "birth_date.day" in rest_problem(float_int, 400)


@pytest.mark.parametrize(
    "what, query, body",
    [
        ("int32 over", {"birth_date.year": "2147483648"}, None),
        ("int32 under", {"birth_date.year": "-2147483649"}, None),
        ("int32 in JSON", None, {"birthDate": {**BIRTH_JSON, "year": 2147483648}}),
        ("int32 as exponent", None, {"birthDate": {**BIRTH_JSON, "year": 1e10}}),
        ("int32 huge text", None, {"birthDate": {**BIRTH_JSON, "year": "9" * 5000}}),
    ],
)
async def test_int32_values_out_of_range_are_400_naming_the_field(
    hx: Observed, what: str, query: dict[str, str] | None, body: dict[str, Any] | None
) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        if query is not None:
            answer = await http.get(PERSON_PATH, params={**BIRTH_QUERY, **query})
        else:
            answer = await http.post(
                "/v1/people:inquire", json={"nationalId": PERSON.national_id, **(body or {})}
            )
    message = rest_problem(answer, 400)
    assert "year" in message, message


@pytest.mark.parametrize("value", ["4294967296", "-1", "1.5", "0x10"])
async def test_uint32_values_out_of_range_are_400_naming_the_field(
    hx: Observed, value: str
) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("nocr") as http:
        rest = await http.get("/v1/provinces/Tehran/addresses", params={"max_results": value})
        connect_ = await http.post(
            LIST_ADDRESSES,
            content=envelopes(list_addresses_json(maxResults=value)),
            headers=CONNECT_STREAM_JSON,
        )
    assert "max_results" in rest_problem(rest, 400)
    end = stream_end(connect_)
    assert end["error"]["code"] == "invalid_argument"
    assert "maxResults" in end["error"]["message"] or "max_results" in end["error"]["message"]


async def test_int64_values_out_of_range_end_a_client_stream_naming_the_field(
    hx: Observed,
) -> None:
    """An invoice's total over int64, over Connect (client streams have no REST route)."""
    invoice = {"invoiceNumber": "1", "totalRials": "9223372036854775808"}
    async with no_invoice_reaches_the_register(hx), hx.client("post", http2=True) as http:
        answer = await http.post(
            SUBMIT_INVOICES,
            content=envelopes(json.dumps(invoice).encode()),
            headers=CONNECT_STREAM_JSON,
        )
    end = stream_end(answer)
    assert end["error"]["code"] == "invalid_argument"
    assert "totalRials" in end["error"]["message"] or "total_rials" in end["error"]["message"]


async def test_a_bad_message_after_good_ones_cancels_the_batch_instead_of_committing_it(
    hx: Observed,
) -> None:
    """Two good invoices, then one the gateway cannot decode: the consumer is told
    INVALID_ARGUMENT, so the register must see a cancel, never a complete stream it would
    commit as a batch of two."""
    good = json.dumps({"invoiceNumber": "1", "sellerNationalId": PERSON.national_id}).encode()
    ended = []
    for bad in (b'{"totalRials": "9223372036854775808"}', gzip.compress(b" " * (BODY_LIMIT + 1))):
        before = len(hx.tax.submissions)
        flags = 0x01 if bad[:2] == b"\x1f\x8b" else 0
        async with hx.client("post", http2=True) as http:
            answer = await http.post(
                SUBMIT_INVOICES,
                content=envelopes(good, good) + envelopes(bad, flags=flags),
                headers={**CONNECT_STREAM_JSON, "connect-content-encoding": "gzip"},
            )
        assert stream_end(answer)["error"]["code"] == "invalid_argument"
        assert await eventually(lambda n=before: len(hx.tax.submissions) > n)
        ended += hx.tax.submissions[before:]
    assert [completed for _, completed in ended] == [False, False], ended
    await still_serves(hx)


async def test_unknown_fields_are_refused_naming_them(hx: Observed) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        top = await http.post(
            "/v1/people:inquire",
            json={"nationalId": PERSON.national_id, "birthDate": BIRTH_JSON, "isAdmin": True},
        )
        nested = await http.post(
            INQUIRE,
            json={"nationalId": PERSON.national_id, "birthDate": {**BIRTH_JSON, "era": "AP"}},
            headers=CONNECT_JSON,
        )
        any_type = await http.post(
            INQUIRE,
            json={"nationalId": PERSON.national_id, "@type": "type.googleapis.com/x.Y"},
            headers=CONNECT_JSON,
        )
    assert "isAdmin" in rest_problem(top, 400)
    assert "era" in connect_problem(nested, 400, "invalid_argument")
    assert "@type" in connect_problem(any_type, 400, "invalid_argument")


@pytest.mark.parametrize("depth", [40, 30_000])
async def test_json_nested_too_deeply_is_400(hx: Observed, depth: int) -> None:
    """Deeper than the limit of 32, and as deep as the body limit lets an attacker go."""
    objects_deep = min(depth, 5000)
    deep = (
        b'{"nationalId": "1", "birthDate": '
        + b'{"year": ' * objects_deep
        + b"1"
        + b"}" * objects_deep
        + b"}"
    )
    arrays = b"[" * depth + b"]" * depth
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        objects = await http.post(
            "/v1/people:inquire", content=deep, headers={"content-type": "application/json"}
        )
        lists = await http.post(INQUIRE, content=arrays, headers=CONNECT_JSON)
    assert "nested too deeply" in rest_problem(objects, 400)
    assert "nested too deeply" in connect_problem(lists, 400, "invalid_argument")


def body_chunks(total: int, size: int = 8192) -> Any:
    async def chunks() -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            yield b" " * min(size, total - sent)
            sent += size

    return chunks()


@pytest.mark.parametrize(
    "http2, declared",
    [(False, True), (False, False), (True, True), (True, False)],
    ids=["http1.1-content-length", "http1.1-chunked", "http2-content-length", "http2-data-only"],
)
async def test_a_body_over_the_limit_is_413_and_never_forwarded(
    hx: Observed, http2: bool, declared: bool
) -> None:
    size = BODY_LIMIT * 4
    async with nothing_reaches_a_provider(hx), hx.client("post", http2=http2) as http:
        rest = await http.post(
            "/v1/people:inquire",
            content=b" " * size if declared else body_chunks(size),
            headers={"content-type": "application/json"},
        )
        connect_ = await http.post(
            INQUIRE,
            content=b" " * size if declared else body_chunks(size),
            headers=CONNECT_JSON,
        )
    if not declared:
        assert "content-length" not in rest.request.headers
    assert f"limit of {BODY_LIMIT} bytes" in rest_problem(rest, 413)
    assert f"limit of {BODY_LIMIT} bytes" in connect_problem(connect_, 413, "resource_exhausted")


def bomb(size: int = 50 * 1024 * 1024) -> bytes:
    return gzip.compress(b" " * size, compresslevel=9)


async def test_a_gzip_bomb_is_refused_before_it_is_inflated(hx: Observed) -> None:
    compressed = bomb()
    assert len(compressed) < BODY_LIMIT
    async with (
        nothing_reaches_a_provider(hx),
        hx.client("post") as http,
        hx.client("nocr") as nocr_http,
    ):
        rest = await http.post(
            "/v1/people:inquire",
            content=compressed,
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        connect_ = await http.post(
            INQUIRE, content=compressed, headers={**CONNECT_JSON, "content-encoding": "gzip"}
        )
        enveloped = await nocr_http.post(
            LIST_ADDRESSES,
            content=envelopes(compressed, flags=0x01),
            headers={**CONNECT_STREAM_JSON, "connect-content-encoding": "gzip"},
        )
        truncated = await http.post(
            INQUIRE,
            content=gzip.compress(b'{"nationalId": "1"}')[:-9],
            headers={**CONNECT_JSON, "content-encoding": "gzip"},
        )
        unknown = await http.post(
            INQUIRE, content=b"{}", headers={**CONNECT_JSON, "content-encoding": "br"}
        )
    assert "decompresses to more than" in rest_problem(rest, 400)
    assert "decompresses to more than" in connect_problem(connect_, 400, "invalid_argument")
    end = stream_end(enveloped)
    assert end["error"]["code"] == "invalid_argument"
    assert "decompresses to more than" in end["error"]["message"]
    assert "gzip" in connect_problem(truncated, 400, "invalid_argument")
    assert "'br'" in connect_problem(unknown, 501, "unimplemented")


async def test_a_gzip_bomb_in_a_client_stream_is_refused(hx: Observed) -> None:
    """The bomb is the stream's first message: the broker cancels the provider call before
    any invoice; gRPC may show the provider that cancel as a stream ended with none (a
    provider that commits must check the call was not cancelled), but no invoice arrives."""
    submissions = len(hx.tax.submissions)
    async with hx.client("post", http2=True) as http:
        answer = await http.post(
            SUBMIT_INVOICES,
            content=envelopes(bomb(), flags=0x01),
            headers={**CONNECT_STREAM_JSON, "connect-content-encoding": "gzip"},
        )
    end = stream_end(answer)
    assert end["error"]["code"] == "invalid_argument"
    assert "decompresses to more than" in end["error"]["message"]
    assert await eventually(lambda: len(hx.tax.submissions) > submissions)
    assert [seen for seen, _ in hx.tax.submissions[submissions:]] == [0]
    await still_serves(hx)


async def test_invalid_utf8_is_400(hx: Observed) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        body = await http.post(
            "/v1/people:inquire",
            content=b'{"nationalId": "12\xff\xfe34567890"}',
            headers={"content-type": "application/json"},
        )
        connect_ = await http.post(
            INQUIRE, content=b'{"nationalId": "\xc0\xaf"}', headers=CONNECT_JSON
        )
        in_path = await http.get("/v1/people/%FF%FE", params=BIRTH_QUERY)
        in_query = await http.get(PERSON_PATH + "?birth_date.year=%FF", params=None)
        surrogate = await http.post(
            INQUIRE, content=b'{"nationalId": "\\ud800"}', headers=CONNECT_JSON
        )
    assert "UTF-8" in rest_problem(body, 400)
    assert "UTF-8" in connect_problem(connect_, 400, "invalid_argument")
    assert "UTF-8" in rest_problem(in_path, 400)
    assert "UTF-8" in rest_problem(in_query, 400) or "year" in in_query.text
    connect_problem(surrogate, 400, "invalid_argument")


async def test_a_missing_path_field_is_400_naming_it(hx: Observed) -> None:
    async with (
        nothing_reaches_a_provider(hx),
        hx.client("post") as http,
        hx.client("nocr") as nocr_http,
    ):
        person = await http.get("/v1/people/", params=BIRTH_QUERY)
        province = await nocr_http.get("/v1/provinces//addresses")
    assert "national_id" in rest_problem(person, 400)
    assert "region.province" in rest_problem(province, 400)


async def test_unknown_and_duplicate_query_parameters_are_400_naming_them(hx: Observed) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        unknown = await http.get(PERSON_PATH, params={**BIRTH_QUERY, "debug": "1"})
        duplicate = await http.get(
            PERSON_PATH,
            params=[*BIRTH_QUERY.items(), ("birth_date.year", PERSON.birth_date.year + 1)],
        )
        # The path binds national_id: the query may not say otherwise.
        overridden = await http.get(
            PERSON_PATH, params={**BIRTH_QUERY, "national_id": "0000000000"}
        )
        on_a_body_route = await http.post(
            "/v1/people:inquire?national_id=0000000000",
            json={"nationalId": PERSON.national_id, "birthDate": BIRTH_JSON},
        )
    assert "debug" in rest_problem(unknown, 400)
    assert "birth_date.year" in rest_problem(duplicate, 400)
    assert "national_id" in rest_problem(overridden, 400)
    assert "national_id" in rest_problem(on_a_body_route, 400)


async def test_dot_segments_and_encoded_slashes_do_not_change_the_route(hx: Observed) -> None:
    """cra may inquire people and nothing else: neither dot segments nor encoded slashes in a
    path variable take it to the post's directory."""
    before = len(hx.reached())
    dotted = await raw_request(hx, "cra", http1("GET", f"/v1/people/../postal-codes/{POSTAL_CODE}"))
    encoded = await raw_request(
        hx, "cra", http1("GET", f"/v1/people/%2E%2E/postal-codes/{POSTAL_CODE}")
    )
    async with hx.client("cra") as http:
        slashed = await http.get(
            f"/v1/people/..%2F..%2Fpostal-codes%2F{POSTAL_CODE}", params=BIRTH_QUERY
        )
    assert dotted.status == 404, dotted
    assert encoded.status == 404, encoded
    # The encoded slash stays inside national_id: InquirePerson gets it as data, and NOCR
    # says it is no national id.
    assert slashed.status_code == 400, slashed.text
    assert "national" in slashed.json()["message"].lower()
    assert LOOKUP not in hx.reached()[before:]
    assert hx.reached()[before:] == [INQUIRE]
    await still_serves(hx)


# -- headers ---------------------------------------------------------------------------------


async def test_huge_and_many_headers_are_refused_and_the_broker_serves_on(hx: Observed) -> None:
    async with nothing_reaches_a_provider(hx):
        huge = await raw_request(hx, "post", http1("GET", PERSON_PATH, {"x-filler": "a" * 200_000}))
        many = await raw_request(
            hx, "post", http1("GET", PERSON_PATH, {f"x-h{i}": "v" for i in range(5000)})
        )
        async with hx.client("post", http2=True) as http:
            with contextlib.suppress(httpx.TransportError):
                huge2 = await http.get(PERSON_PATH, headers={"x-filler": "a" * 200_000})
                assert huge2.status_code in (400, 431), huge2.text
    assert huge.status in (400, 431), huge
    assert many.status in (400, 431), many


async def test_more_metadata_than_grpc_carries_is_refused_at_the_edge(hx: Observed) -> None:
    """Headers HTTP takes (under its own limits) but gRPC metadata could not carry to the
    provider: refused by the gateway, naming the problem, not by the provider."""
    headers = {f"x-h{i}": "v" * 100 for i in range(120)}  # about 13 KB
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        answer = await http.get(PERSON_PATH, params=BIRTH_QUERY, headers=headers)
    assert answer.status_code in (400, 431), answer.text
    assert "metadata" in answer.json()["message"] or "header" in answer.json()["message"]


@pytest.mark.parametrize(
    "headers, named",
    [
        ({"x-note": "caf\xe9"}, "x-note"),
        ({"x-note": "tab\there"}, "x-note"),
        ({"x-data-bin": "!!!not base64"}, "x-data-bin"),
        ({"x-key!bang": "v"}, "x-key!bang"),
    ],
    ids=["latin-1", "control", "bad-base64", "bad-key"],
)
async def test_a_header_metadata_cannot_carry_is_400_naming_it(
    hx: Observed, headers: dict[str, str], named: str
) -> None:
    async with nothing_reaches_a_provider(hx):
        answer = await raw_request(
            hx,
            "post",
            http1("GET", PERSON_PATH + "?" + httpx.QueryParams(BIRTH_QUERY).__str__(), headers),
        )
    assert answer.status == 400, answer
    assert named.split(":")[0] in answer.json()["message"], answer.json()


# -- Connect's envelopes and headers ---------------------------------------------------------


@pytest.mark.parametrize(
    "body, named",
    [
        (struct.pack(">BI", 0, 100) + b'{"region"', "ended inside an envelope"),
        (struct.pack(">BI", 0, 2**32 - 1) + b"{}", "over the gateway's limit"),
        (envelopes(list_addresses_json(), flags=0x02), "end-of-stream"),
        (envelopes(list_addresses_json()) + b"xyz", "ended inside an envelope"),
        (envelopes(list_addresses_json(), list_addresses_json()), "one request message"),
        (envelopes(list_addresses_json(), flags=0x01), "Connect-Content-Encoding"),
        (b"", "one request message"),
    ],
    ids=[
        "past-the-end",
        "huge-length",
        "end-stream-flag",
        "garbage-after",
        "two",
        "compressed",
        "none",
    ],
)
async def test_malformed_connect_envelopes_end_the_stream_naming_the_problem(
    hx: Observed, body: bytes, named: str
) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("nocr") as http:
        answer = await http.post(LIST_ADDRESSES, content=body, headers=CONNECT_STREAM_JSON)
    end = stream_end(answer)
    assert end["error"]["code"] == "invalid_argument"
    assert named in end["error"]["message"], end


@pytest.mark.parametrize(
    "body, named",
    [
        (envelopes(b"{}", flags=0x02), "end-of-stream"),
        (struct.pack(">BI", 0, 50) + b"{}", "ended inside an envelope"),
        (struct.pack(">BI", 0, 2**31) + b"{}", "over the gateway's limit"),
    ],
    ids=["end-stream-flag", "past-the-end", "huge-length"],
)
async def test_malformed_envelopes_in_a_client_stream_end_it_naming_the_problem(
    hx: Observed, body: bytes, named: str
) -> None:
    async with no_invoice_reaches_the_register(hx), hx.client("post", http2=True) as http:
        answer = await http.post(SUBMIT_INVOICES, content=body, headers=CONNECT_STREAM_JSON)
    end = stream_end(answer)
    assert end["error"]["code"] == "invalid_argument"
    assert named in end["error"]["message"], end


@pytest.mark.parametrize(
    "header, value",
    [
        ("connect-timeout-ms", "-1"),
        ("connect-timeout-ms", "1.5"),
        ("connect-timeout-ms", "12345678901"),
        ("connect-timeout-ms", ""),
        ("grpc-timeout", "1x"),
        ("grpc-timeout", "123456789S"),
        ("grpc-timeout", "-5S"),
    ],
)
async def test_a_bad_timeout_header_is_400_naming_it(hx: Observed, header: str, value: str) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        connect_ = await http.post(
            INQUIRE,
            json={"nationalId": PERSON.national_id, "birthDate": BIRTH_JSON},
            headers={**CONNECT_JSON, header: value},
        )
        rest = await http.get(PERSON_PATH, params=BIRTH_QUERY, headers={header: value})
    assert header.lower() in connect_problem(connect_, 400, "invalid_argument").lower()
    assert header.lower() in rest_problem(rest, 400).lower()


async def test_the_largest_timeouts_are_served(hx: Observed) -> None:
    """The longest deadlines the headers can say still make a provider call (no overflow)."""
    async with hx.client("post") as http:
        for header, value in (("connect-timeout-ms", "9999999999"), ("grpc-timeout", "99999999H")):
            answer = await http.post(
                INQUIRE,
                json={"nationalId": PERSON.national_id, "birthDate": BIRTH_JSON},
                headers={**CONNECT_JSON, header: value},
            )
            assert answer.status_code == 200, (header, answer.text)
    await still_serves(hx)


async def test_connect_protocol_version_2_is_refused(hx: Observed) -> None:
    async with nothing_reaches_a_provider(hx), hx.client("post") as http:
        answer = await http.post(
            INQUIRE,
            json={"nationalId": PERSON.national_id, "birthDate": BIRTH_JSON},
            headers={**CONNECT_JSON, "connect-protocol-version": "2"},
        )
    assert "Connect-Protocol-Version" in connect_problem(answer, 400, "invalid_argument")


async def test_a_bidi_stream_over_http1_is_refused(hx: Observed) -> None:
    query = {"reference": "1", "nationalId": PERSON.national_id, "birthDate": BIRTH_JSON}
    async with nothing_reaches_a_provider(hx), hx.client("tax") as http:
        answer = await http.post(
            VERIFY_PEOPLE,
            content=envelopes(json.dumps(query).encode()),
            headers=CONNECT_STREAM_JSON,
        )
    assert answer.status_code == 505
    assert "HTTP/2" in answer.json()["message"]


# -- slow and greedy clients -----------------------------------------------------------------


async def test_slow_clients_do_not_hold_the_broker(hx: Observed) -> None:
    """Clients that open requests and trickle their headers or bodies, or never finish the
    TLS handshake: everyone else, that agency included, is served meanwhile."""
    held: list[asyncio.StreamWriter] = []
    silent: list[asyncio.StreamWriter] = []
    try:
        for _ in range(20):
            _, writer = await open_http1(hx, "post")
            writer.write(
                http1(
                    "POST",
                    "/v1/people:inquire",
                    {"content-type": "application/json", "content-length": "1000"},
                )
                + b'{"nationalId"'
            )
            held.append(writer)
            _, writer = await open_http1(hx, "post")
            writer.write(b"GET /v1/people/")  # the request line, never finished
            held.append(writer)
            _, writer = await asyncio.open_connection("127.0.0.1", hx.broker.gateway_port)
            writer.write(b"\x16\x03\x01")  # a TLS record begun, never finished
            silent.append(writer)
        for writer in held + silent:
            await writer.drain()
        assert await eventually(lambda: hx.broker.drain.in_flight >= 20)
        for _ in range(3):
            await still_serves(hx)
        async with hx.client("tax", http2=True) as http:
            answer = await http.get(f"/v1/postal-codes/{POSTAL_CODE}")
        assert answer.status_code == 200, answer.text
    finally:
        for writer in held + silent:
            writer.transport.abort()
    assert await eventually(lambda: hx.broker.drain.in_flight == 0)
    await still_serves(hx)


async def test_a_request_held_open_does_not_hold_up_the_brokers_stop(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    """A client opens an HTTP/2 request and never finishes its body: SIGTERM still stops
    the broker once its grace period is over."""
    providers: dict[str, ProviderServer] = {}
    broker: Process | None = None
    try:
        for agency, add_to_server in AGENCIES.items():
            providers[agency] = ProviderServer(pki.dir / "agencies" / agency)
            add_to_server(providers[agency].server)
            await providers[agency].start()
        path = gateway_config(
            tmp_path,
            pki.dir,
            {a: p.address for a, p in providers.items()},
            broker_extra="shutdown_grace_seconds = 1\n",
        )
        broker = await Process.start(str(TABADOL), "broker", "--config", str(path))
        port = int((await broker.wait_for(r"HTTP/JSON entry .* at https://127\.0\.0\.1:(\d+)"))[1])
        raw = await RawH2.open(port, pki.dir / "agencies" / "post", f"broker.{TRUST_DOMAIN}")
        stream = raw.conn.get_next_available_stream_id()
        raw.conn.send_headers(
            stream,
            [
                (":method", "POST"), (":scheme", "https"), (":path", "/v1/people:inquire"),
                (":authority", "broker"), ("content-type", "application/json"),
            ],
        )  # fmt: skip
        raw.conn.send_data(stream, b'{"nationalId": ')
        await raw.flush()
        context = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
        context.check_hostname = False
        held = pki.dir / "agencies" / "post"
        context.load_cert_chain(held / "agency.crt", held / "agency.key")
        async with httpx.AsyncClient(verify=context, timeout=10) as http:
            answer = await http.get(f"https://127.0.0.1:{port}{PERSON_PATH}", params=BIRTH_QUERY)
        assert answer.status_code == 200, answer.text

        broker.proc.send_signal(signal.SIGTERM)
        try:
            assert await broker.exit_status(timeout=30) == 0
        finally:
            raw.close()
    finally:
        if broker is not None:
            await broker.stop()
        for provider in providers.values():
            await provider.stop(0)


async def test_clients_that_break_off_leave_no_tracebacks_in_the_log(
    hx: Observed, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up mid-request, or after its answer without a TLS goodbye, is
    everyday traffic: not an unhandled exception logged at ERROR with a traceback."""
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        reader, writer = await open_http1(hx, "post")
        writer.write(http1("GET", PERSON_PATH + "?" + str(httpx.QueryParams(BIRTH_QUERY))))
        await writer.drain()
        assert (await read_answer(reader)).status == 200
        writer.transport.abort()
        reader, writer = await open_http1(hx, "post")
        writer.write(http1("POST", "/v1/people:inquire", {"content-length": "100"}) + b"{")
        await writer.drain()
        writer.transport.abort()
    async with hx.client("post") as http:
        with contextlib.suppress(httpx.TransportError):  # answered before the body is all sent
            await http.post(
                "/v1/people:inquire",
                content=body_chunks(BODY_LIMIT * 4),
                headers={"content-type": "application/json"},
            )
    await still_serves(hx)
    unhandled = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert unhandled == [], [r.getMessage() for r in unhandled]


async def test_many_streams_on_one_http2_connection_meet_the_brokers_limits(
    hx: Observed,
) -> None:
    """nocr may have 3 calls in flight; it opens 10 streams on one connection and reads
    none: the others are refused with 429, and once it lets go, it is served again."""
    async with hx.client("nocr", http2=True) as http:
        requests = [http.build_request("GET", "/v1/provinces/Tehran/addresses") for _ in range(10)]
        answers = await asyncio.gather(*(http.send(r, stream=True) for r in requests))
        statuses = sorted(a.status_code for a in answers)
        refused = [a for a in answers if a.status_code != 200]
        for answer in refused:
            await answer.aread()
        for answer in answers:
            await answer.aclose()
        assert statuses == [200] * NOCR_CONCURRENCY + [429] * (10 - NOCR_CONCURRENCY)
        assert all("3 calls in flight" in a.json()["message"] for a in refused), refused[0].text
        assert await eventually(lambda: hx.broker.drain.in_flight == 0)
        again = await http.get(f"/v1/postal-codes/{POSTAL_CODE}")
    assert again.status_code == 200, again.text
    await still_serves(hx)


async def test_the_gateway_advertises_no_more_streams_per_connection_than_the_broker_allows(
    hx: Observed,
) -> None:
    raw = await RawH2.open(
        hx.broker.gateway_port, hx.exchange.credentials("post"), f"broker.{TRUST_DOMAIN}"
    )
    try:
        advertised = await raw.max_concurrent_streams()
    finally:
        raw.close()
    assert advertised <= STREAM_LIMIT
    await still_serves(hx)


# -- the OpenAPI document is the caller's, and only a known caller's ---------------------------


async def test_openapi_is_refused_to_an_undeclared_agency(hx: Observed) -> None:
    async with hx.client("echo") as http:
        answer = await http.get("/openapi.json")
    message = rest_problem(answer, 403)
    assert "echo" in message
    assert "paths" not in answer.text
    await still_serves(hx)
