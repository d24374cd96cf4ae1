"""The broker's HTTP entry: every demo method called over Connect and REST/JSON with a real
HTTP client and an agency's certificate, answered as the gRPC path answers it, through the
same admission, ledger and limits."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from google.protobuf import json_format

from tabadol import config
from tabadol.agencies.cra.v1 import mobile_ownership_pb2 as cra_pb
from tabadol.agencies.nocr.v1 import person_registry_pb2 as nocr_pb
from tabadol.agencies.post.v1 import address_directory_pb2 as post_pb
from tabadol.agencies.post.v1 import address_directory_pb2_grpc as post_grpc
from tabadol.agencies.tax.v1 import invoice_registry_pb2 as tax_pb
from tabadol.broker import Broker
from tabadol.errors import ConfigError
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.pki import CertificateAuthority
from tests.conftest import RunningProvider
from tests.support.echo import UNARY
from tests.support.exchange import eventually
from tests.support.gateway import (
    BIRTH,
    BIRTH_QUERY,
    INQUIRY,
    INVOICES,
    MOBILE_MATCH,
    PERSON,
    POSTAL_CODE,
    GatewayExchange,
    as_json,
    envelopes,
    grpc_channel,
    inquire_person_over_grpc,
    list_addresses_over_grpc,
    match_mobile_over_grpc,
    running_echo_gateway,
    submit_invoices_over_grpc,
    unframe,
)
from tests.support.gateway import exchange as exchange  # a fixture: the alias keeps it

INQUIRE = "/tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson"


# -- every demo method, both ways, answered as over gRPC ------------------------------------


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
async def test_rest_get_person_is_the_grpc_answer(exchange: GatewayExchange, http2: bool) -> None:
    expected = await inquire_person_over_grpc(exchange, "post")
    async with exchange.client("post", http2=http2) as http:
        answer = await http.get(f"/v1/people/{PERSON.national_id}", params=BIRTH_QUERY)
    assert answer.status_code == 200, answer.text
    assert answer.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == as_json(expected)
    assert answer.json()["nationalId"] == PERSON.national_id


async def test_rest_additional_binding_posts_the_whole_request(exchange: GatewayExchange) -> None:
    body = {"nationalId": PERSON.national_id, "birthDate": as_json(BIRTH)}
    async with exchange.client("post") as http:
        by_post = await http.post("/v1/people:inquire", json=body)
        by_get = await http.get(f"/v1/people/{PERSON.national_id}", params=BIRTH_QUERY)
    assert by_post.status_code == 200, by_post.text
    assert by_post.json() == by_get.json()


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "http2"])
async def test_connect_unary_json_and_binary_are_the_grpc_answer(
    exchange: GatewayExchange, http2: bool
) -> None:
    expected = await inquire_person_over_grpc(exchange, "post")
    async with exchange.client("post", http2=http2) as http:
        as_text = await http.post(
            INQUIRE,
            content=json_format.MessageToJson(INQUIRY),
            headers={"content-type": "application/json", "connect-protocol-version": "1"},
        )
        as_bytes = await http.post(
            INQUIRE,
            content=INQUIRY.SerializeToString(),
            headers={"content-type": "application/proto", "connect-protocol-version": "1"},
        )
    assert as_text.status_code == 200, as_text.text
    assert as_text.json() == as_json(expected)
    assert as_bytes.status_code == 200, as_bytes.text
    assert as_bytes.headers["content-type"] == "application/proto"
    assert nocr_pb.Person.FromString(as_bytes.content) == expected


async def test_postal_code_lookup_and_mobile_match_both_ways(exchange: GatewayExchange) -> None:
    async with grpc_channel(exchange, "tax") as channel:
        address = await post_grpc.AddressDirectoryStub(channel).LookupPostalCode(
            post_pb.LookupPostalCodeRequest(postal_code=POSTAL_CODE)
        )
    matched = await match_mobile_over_grpc(exchange, "tax")
    async with exchange.client("tax") as http:
        rest_address = await http.get(f"/v1/postal-codes/{POSTAL_CODE}")
        rest_match = await http.post("/v1/mobile-ownership:match", json=as_json(MOBILE_MATCH))
        connect_match = await http.post(
            "/tabadol.agencies.cra.v1.MobileOwnership/MatchMobile", json=as_json(MOBILE_MATCH)
        )
    assert rest_address.json() == as_json(address)
    assert rest_match.json() == as_json(matched) == connect_match.json()
    assert matched.result == cra_pb.MATCH_RESULT_MATCH


async def test_a_server_stream_as_ndjson_and_as_connect_envelopes(
    exchange: GatewayExchange,
) -> None:
    request, expected = await list_addresses_over_grpc(exchange, "nocr")
    assert len(expected) == 5
    async with exchange.client("nocr") as http:
        lines = await http.get(
            f"/v1/provinces/{request.region.province}/addresses",
            params={"region.city": request.region.city, "max_results": 5},
        )
        enveloped = await http.post(
            "/tabadol.agencies.post.v1.AddressDirectory/ListAddresses",
            content=envelopes(json_format.MessageToJson(request).encode()),
            headers={"content-type": "application/connect+json"},
        )
    assert lines.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in lines.text.splitlines()] == expected
    frames = unframe(enveloped.content)
    assert [json.loads(data) for flags, data in frames[:-1]] == expected
    assert frames[-1][0] == 2  # end of stream, no error
    assert "error" not in json.loads(frames[-1][1])


async def test_a_client_stream_over_connect_http2(exchange: GatewayExchange) -> None:
    expected = await submit_invoices_over_grpc(exchange, "post")
    async with exchange.client("post", http2=True) as http:
        answer = await http.post(
            "/tabadol.agencies.tax.v1.InvoiceRegistry/SubmitInvoices",
            content=envelopes(*(json_format.MessageToJson(i).encode() for i in INVOICES)),
            headers={"content-type": "application/connect+json"},
        )
    assert answer.status_code == 200
    frames = unframe(answer.content)
    receipt = json_format.Parse(frames[0][1], tax_pb.SubmissionReceipt())
    assert receipt.accepted_count == expected.accepted_count == 3
    assert receipt.receipt_id != expected.receipt_id  # each submission its own receipt
    assert frames[-1][0] == 2


async def test_a_bidi_stream_over_connect_http2(exchange: GatewayExchange) -> None:
    queries = [
        nocr_pb.VerifyPersonRequest(
            reference=str(n), national_id=PERSON.national_id, birth_date=BIRTH
        )
        for n in range(3)
    ]
    async with exchange.client("tax", http2=True) as http:
        answer = await http.post(
            "/tabadol.agencies.nocr.v1.PersonRegistry/VerifyPeople",
            content=envelopes(*(q.SerializeToString() for q in queries)),
            headers={"content-type": "application/connect+proto"},
        )
    async with exchange.client("tax") as http1:
        over_h1 = await http1.post(
            "/tabadol.agencies.nocr.v1.PersonRegistry/VerifyPeople",
            content=envelopes(queries[0].SerializeToString()),
            headers={"content-type": "application/connect+proto"},
        )
    frames = unframe(answer.content)
    results = [nocr_pb.VerifyPersonResult.FromString(data) for _, data in frames[:-1]]
    assert [r.reference for r in results] == ["0", "1", "2"]
    assert all(r.verdict == nocr_pb.VERDICT_MATCH for r in results)
    assert over_h1.status_code == 505
    assert "HTTP/2" in over_h1.json()["message"]


# -- the same admission --------------------------------------------------------------------


async def test_no_grant_is_403_before_the_body_is_read(exchange: GatewayExchange) -> None:
    async with exchange.client("cra") as http:  # cra may not list the post's addresses
        rest = await http.get("/v1/provinces/Tehran/addresses", params={"nonsense": "1"})
        connect_ = await http.post(
            "/tabadol.agencies.post.v1.AddressDirectory/LookupPostalCode",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert rest.status_code == 403
    assert rest.json()["code"] == 7  # PERMISSION_DENIED, google.rpc.Status
    assert "has no grant" in rest.json()["message"]
    assert connect_.status_code == 403
    assert connect_.json()["code"] == "permission_denied"


async def test_unknown_routes_and_methods_are_named(exchange: GatewayExchange) -> None:
    async with exchange.client("post") as http:
        nowhere = await http.get("/v1/nowhere")
        wrong_verb = await http.delete(f"/v1/postal-codes/{POSTAL_CODE}")
        no_method = await http.post(
            "/tabadol.agencies.nocr.v1.PersonRegistry/Nope",
            json={},
        )
    assert nowhere.status_code == 404
    assert wrong_verb.status_code == 405
    assert no_method.status_code == 501
    assert no_method.json()["code"] == "unimplemented"
    assert "no method 'Nope'" in no_method.json()["message"]


async def test_the_ledger_records_the_protocol_each_call_came_by(
    exchange: GatewayExchange,
) -> None:
    async with exchange.client("post") as http:
        rest = await http.get(f"/v1/people/{PERSON.national_id}", params=BIRTH_QUERY)
        connect_ = await http.post(
            INQUIRE, json={"nationalId": PERSON.national_id, "birthDate": as_json(BIRTH)}
        )
    await inquire_person_over_grpc(exchange, "post")
    ids = {rest.headers["x-tabadol-request-id"]: "rest"}
    ids[connect_.headers["trailer-x-tabadol-request-id"]] = "connect"

    def recorded() -> dict[str, str]:
        store = SqliteLedgerStore(exchange.broker.config.ledger.path, readonly=True)
        try:
            return {s.record.request_id: s.record.protocol for s in store.records()}
        finally:
            store.close()

    assert await eventually(lambda: set(ids) <= recorded().keys())
    by_id = recorded()
    assert {k: by_id[k] for k in ids} == ids
    assert "grpc" in by_id.values()


@pytest.mark.parametrize("header", [("connect-timeout-ms", "0"), ("grpc-timeout", "1n")])
async def test_a_deadline_header_becomes_the_providers_deadline(
    exchange: GatewayExchange, header: tuple[str, str]
) -> None:
    async with exchange.client("nocr") as http:
        request = post_pb.ListAddressesRequest(region=post_pb.Region(province="Tehran"))
        answer = await http.post(
            "/tabadol.agencies.post.v1.AddressDirectory/ListAddresses",
            content=envelopes(request.SerializeToString()),
            headers={"content-type": "application/connect+proto", header[0]: header[1]},
        )
    end = json.loads(unframe(answer.content)[-1][1])
    assert end["error"]["code"] == "deadline_exceeded"


async def test_bad_json_is_400_naming_the_field_and_never_reaches_the_provider(
    exchange: GatewayExchange,
) -> None:
    async with exchange.client("post") as http:
        wrong_type = await http.post(
            "/v1/people:inquire", json={"nationalId": PERSON.national_id, "birthDate": 5}
        )
        unknown = await http.post("/v1/people:inquire", json={"nationalIdd": "1"})
        after = await http.get(f"/v1/people/{PERSON.national_id}", params=BIRTH_QUERY)
    assert wrong_type.status_code == 400
    assert (
        "birthDate" in wrong_type.json()["message"] or "birth_date" in wrong_type.json()["message"]
    )
    assert unknown.status_code == 400
    assert "nationalIdd" in unknown.json()["message"]
    assert after.status_code == 200


async def test_the_openapi_document_is_the_callers(exchange: GatewayExchange) -> None:
    async with exchange.client("post") as http:
        post_doc = (await http.get("/openapi.json")).json()
    async with exchange.client("cra") as http:
        cra_doc = (await http.get("/openapi.json")).json()
    assert post_doc["openapi"].startswith("3.1")
    assert post_doc["servers"] == [{"url": exchange.url}]
    assert "/v1/people/{national_id}" in post_doc["paths"]
    assert "/v1/people/{national_id}" in cra_doc["paths"]  # cra may inquire too
    assert "/v1/postal-codes/{postal_code}" not in post_doc["paths"]  # post has no grant on itself
    assert "/v1/postal-codes/{postal_code}" not in cra_doc["paths"]


def test_the_gateway_section_is_checked_like_the_rest(tmp_path: Path) -> None:
    base = (
        '[broker]\nlisten = "127.0.0.1:7443"\ntrust_domain = "tabadol.example"\n'
        'pki_dir = "pki"\ncontracts = ["c.pb"]\n'
    )
    for section, problem in [
        ('[gateway]\nlisten = "127.0.0.1:7443"\n', "[gateway] listen 127.0.0.1:7443 is also"),
        ('[gateway]\nlisten = "127.0.0.1:8443"\npublic_url = "http://x"\n', "not an https://"),
        ('[gateway]\nlisten = "127.0.0.1:8443"\nmax_json_depth = 1000\n', "max_json_depth"),
        ('[gateway]\nlisten = "127.0.0.1:8443"\nport = 1\n', "[gateway] port: unknown key"),
    ]:
        with pytest.raises(ConfigError) as refused:
            config.parse(base + section, tmp_path / "broker.toml")
        assert problem in str(refused.value)
    parsed = config.parse(
        base + '[gateway]\nlisten = "0.0.0.0:8443"\npublic_url = "https://api.example/x/"\n',
        tmp_path / "broker.toml",
    )
    assert parsed.gateway is not None and parsed.gateway.public_url == "https://api.example/x"


async def test_traceparent_carries_the_trace_into_the_ledger(exchange: GatewayExchange) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with exchange.client("post") as http:
        answer = await http.get(
            f"/v1/people/{PERSON.national_id}",
            params=BIRTH_QUERY,
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
    request_id = answer.headers["x-tabadol-request-id"]

    def traced() -> str | None:
        store = SqliteLedgerStore(exchange.broker.config.ledger.path, readonly=True)
        try:
            return next(
                (s.record.trace_id for s in store.records() if s.record.request_id == request_id),
                None,
            )
        finally:
            store.close()

    assert await eventually(lambda: traced() is not None)
    assert traced() == trace_id


# -- what the provider sees ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def echo_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> AsyncIterator[Broker]:
    directory = tmp_path_factory.mktemp("echo-gateway")
    async with running_echo_gateway(
        directory, pki.dir, echo_contracts, echo_provider.address
    ) as broker:
        yield broker


@pytest.mark.parametrize(
    ("header", "bound"), [(("connect-timeout-ms", "5000"), 5.0), (("grpc-timeout", "3S"), 3.0)]
)
async def test_the_provider_gets_the_callers_deadline_and_metadata_but_not_its_platform_keys(
    echo_gateway: Broker,
    echo_provider: RunningProvider,
    pki: CertificateAuthority,
    header: tuple[str, str],
    bound: float,
) -> None:
    held = pki.dir / "agencies" / "post"
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
    context.load_cert_chain(held / "agency.crt", held / "agency.key")
    url = f"https://localhost:{echo_gateway.gateway_port}"
    async with httpx.AsyncClient(base_url=url, verify=context) as http:
        answer = await http.post(
            UNARY,
            json={"data": "aGVsbG8="},
            headers={
                header[0]: header[1],
                "x-agency-ref": "case-17",
                "x-tabadol-consumer": "nocr",  # a lie: the broker's own value replaces it
                "x-tabadol-grant": "forged",
            },
        )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"data": "aGVsbG8="}
    seen = echo_provider.echo.calls[-1]
    # gRPC rounds the timeout it sends on up to its unit: a few milliseconds over at most.
    assert seen.time_remaining is not None and 0 < seen.time_remaining <= bound + 0.1
    assert seen.metadata["x-agency-ref"] == "case-17"
    assert seen.metadata["x-tabadol-consumer"] == "post"
    assert seen.metadata["x-tabadol-grant"] != "forged"
    assert seen.consumer == "post"


async def test_one_http2_connection_carries_calls_past_a_thousand(
    echo_gateway: Broker, pki: CertificateAuthority
) -> None:
    """An agency's connection lasts: no cap on the requests one connection may carry."""
    held = pki.dir / "agencies" / "post"
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
    context.load_cert_chain(held / "agency.crt", held / "agency.key")
    url = f"https://localhost:{echo_gateway.gateway_port}"
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, verify=context, http2=True) as http:
        for _ in range(22):
            answers = await asyncio.gather(
                *(http.post(UNARY, json={"data": "AA=="}) for _ in range(50))
            )
            statuses += [a.status_code for a in answers]
    assert statuses == [200] * 1100  # none failed as a connection closed under them


def test_a_rule_that_cannot_be_served_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    """One bad google.api.http rule is a bad contract: named at load, not found out later as
    a gateway with no routes."""
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    from tests.support.gateway import CONTRACTS

    contracts = descriptor_pb2.FileDescriptorSet.FromString(CONTRACTS.read_bytes())
    post = next(f for f in contracts.file if f.package == "tabadol.agencies.post.v1")
    lookup = next(m for m in post.service[0].method if m.name == "LookupPostalCode")
    rule = lookup.options.Extensions[annotations_pb2.http]
    rule.get = "/v1/people/{postal_code}"  # the path InquirePerson's rule claims
    bad = tmp_path / "contracts.pb"
    bad.write_bytes(contracts.SerializeToString())
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[broker]\ntrust_domain = "tabadol.example"\npki_dir = "pki"\ncontracts = ["{bad}"]\n'
    )
    with pytest.raises(ConfigError) as refused:
        config.load(path)
    assert "[broker] contracts" in str(refused.value)
    assert "InquirePerson" in str(refused.value) and "LookupPostalCode" in str(refused.value)
    assert "GET /v1/people/{" in str(refused.value)
