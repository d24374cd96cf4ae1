"""What a second review of the HTTP entry found, kept fixed: a CA rotated out on reload is
trusted no more; a granted agency cannot hold the broker's event loop with a crafted query;
numbers past Python's digit limit are plain 400s; a method of a service the exchange does not
offer is UNIMPLEMENTED, as on the gRPC port."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.wrappers_pb2 import DoubleValue

from tabadol.broker.credentials import BrokerCredentials
from tabadol.gateway.http_rules import Binding, PathTemplate, fill_request
from tabadol.gateway.server import GatewayServer, tls_context
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN
from tests.support.gateway import BIRTH_QUERY, PERSON, GatewayExchange
from tests.support.gateway import exchange as exchange


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def credentials(ca: CertificateAuthority) -> BrokerCredentials:
    return BrokerCredentials.load(ca.dir, TRUST_DOMAIN, ca.dir / "broker.toml")


async def answer(port: int, holder: CertificateAuthority, trusting: CertificateAuthority) -> str:
    """The status line a client with ``holder``'s agency certificate gets, or why not."""
    context = ssl.create_default_context(cafile=str(trusting.dir / "ca.crt"))
    held = holder.dir / "agencies" / "nocr"
    context.load_cert_chain(held / "agency.crt", held / "agency.key")
    context.check_hostname = False
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
    except (ssl.SSLError, ConnectionError) as e:
        return f"refused: {type(e).__name__}"
    return data.split(b"\r\n")[0].decode() if data else "refused: closed"


@pytest.fixture
async def two_cas(tmp_path: Path) -> AsyncIterator[tuple[CertificateAuthority, ...]]:
    cas = []
    for name in ("old", "new"):
        ca = CertificateAuthority.init(tmp_path / name, TRUST_DOMAIN)
        ca.issue_broker()
        ca.issue_agency("nocr")
        ca.write_crl()
        cas.append(ca)
    yield tuple(cas)


async def test_a_ca_rotated_out_on_reload_is_trusted_no_more(
    two_cas: tuple[CertificateAuthority, CertificateAuthority],
) -> None:
    old, new = two_cas
    gateway = GatewayServer(hello, "127.0.0.1:0", tls_context(credentials(old)), 16)
    await gateway.start()
    try:
        assert await answer(gateway.port, old, old) == "HTTP/1.1 200 "
        gateway.reload(credentials(new))
        assert await answer(gateway.port, new, new) == "HTTP/1.1 200 "  # new identity served
        assert (await answer(gateway.port, old, new)).startswith("refused")
        assert (await answer(gateway.port, old, old)).startswith("refused")
    finally:
        await gateway.stop(0)


REST = Binding("GET", PathTemplate.parse("/v1/people/{national_id}"), "", "")


def test_crafted_query_keys_and_numbers_are_refused_in_linear_time() -> None:
    """Each of these took seconds to minutes of the event loop before (regexes that
    backtracked over the caller's text, int() past its digit limit); now each is a 400."""
    from tabadol.agencies.nocr.v1.person_registry_pb2 import InquirePersonRequest

    for query, named in [
        # Sizes at which the old regexes would have run past the test's timeout.
        (b"[" * 200_000 + b"=1", "unknown query parameter"),
        (b"birth_date.year=" + b"1" * 5_000, "out of range"),
        (b"birth_date.year=" + b"1" * 8_000 + b"x", "not an integer"),
    ]:
        with pytest.raises(Exception) as refused:
            fill_request(InquirePersonRequest(), REST, {"national_id": "1"}, query, b"")
        assert type(refused.value).__name__ == "BadRequest"
        assert named in str(refused.value)
        assert len(str(refused.value)) < 300  # the caller's text is not echoed whole
    number = Binding("GET", PathTemplate.parse("/v1/numbers/{value}"), "", "")
    with pytest.raises(Exception) as refused:
        fill_request(DoubleValue(), number, {"value": "1" * 100_000 + "x"}, b"", b"")
    assert type(refused.value).__name__ == "BadRequest"
    assert "is not a number" in str(refused.value)


async def test_a_method_in_the_contracts_but_not_offered_is_unimplemented(
    exchange: GatewayExchange, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="tabadol")
    async with exchange.client("nocr") as http:
        connect_ = await http.post("/tabadol.conformance.v1.TestService/EmptyCall", json={})
        rest = await http.get("/v1/conformance/empty")
    async with exchange.client("post") as http:  # granted InquirePerson
        huge = await http.get(
            f"/v1/people/{PERSON.national_id}",
            params={**BIRTH_QUERY, "birth_date.year": "1" * 5_000},
        )
    assert connect_.status_code == 501
    assert connect_.json()["code"] == "unimplemented"
    assert "not offered on this exchange" in connect_.json()["message"]
    assert rest.status_code == 501
    assert "not offered on this exchange" in rest.json()["message"]
    assert huge.status_code == 400
    assert "out of range" in huge.json()["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no tracebacks
