"""The ops console, attacked: every route needs an identity, each identity sees its share.

A console on a loopback port over HTTPS with a CA of its own (so that revocations here touch
no other test). Spans are put in its store directly, as the collector would after checking
the sender (tests/test_security_collector.py attacks that side); the ledger is written by
the broker's own writer. post called nocr; cra called nocr; and a span from nocr's own
service claims a trace for post, which only the broker's spans can do.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime as dt
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from playwright.async_api import Browser, expect

from tabadol.errors import TabadolError
from tabadol.ledger import LedgerRecord, LedgerWriter
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.ledger.verify import anchor_path
from tabadol.ops.access import (
    Viewer,
    agency_view,
    decide,
    family_of,
    host_name,
    trace_is_visible,
)
from tabadol.ops.ingest import SENDER_ATTRIBUTE
from tabadol.ops.model import SpanEvent, SpanRecord
from tabadol.ops.server import OpsServer, open_accounts
from tabadol.ops.sessions import Sessions
from tabadol.pki import CertificateAuthority
from tabadol.reports.quarter import Quarter
from tests.conftest import TRUST_DOMAIN
from tests.support.browser import chromium, console_page
from tests.support.collector import export_stub, ops_trust
from tests.support.echo import SERVICE as ECHO
from tests.support.echo import write_echo_contracts
from tests.support.ops import (
    AUDITOR,
    OPERATOR,
    console_client,
    operator_bundle,
    person_bundle,
    running_ops,
)
from tests.support.processes import TABADOL

MS = 1_000_000
BROKER = "tabadol-broker"
POST_TRACE, CRA_TRACE, FORGED_TRACE = "a" * 32, "c" * 32, "f" * 32
CRA_SECRET = "cra.Mobile/MatchMobile"
# Where the broker reached nocr, as its spans record it: for operators, not for agencies.
ADDRESSES = {
    "tabadol.endpoint": "10.0.0.1:443",
    "server.address": "10.0.0.1",
    "server.port": 443,
    "net.peer.name": "nocr-internal.example",
}
QUARTER = str(Quarter.containing(dt.datetime.now(dt.UTC)))

CONFIG = f"""
[broker]
listen = "127.0.0.1:0"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{{pki_dir}}"
contracts = ["{{contracts}}"]

[ledger]
path = "ledger.db"

[[agency]]
id = "nocr"
name = "Civil registry"

[[agency]]
id = "post"
name = "Post"

[[agency]]
id = "cra"
name = "Regulator"

[[service]]
name = "{ECHO}"
provider = "nocr"
endpoints = ["10.0.0.1:443"]
"""


@dataclass(frozen=True)
class Console:
    server: OpsServer
    ca: CertificateAuthority
    config: Path

    def bundle(self, who: str) -> Path:
        """A credentials directory by who holds it: 'operator', 'auditor', 'post', ..."""
        if who == "operator":
            return operator_bundle(self.ca)
        if who == "auditor":
            return person_bundle(self.ca, "auditor", AUDITOR)
        return self.ca.dir / "agencies" / who

    def client(self, who: str | None, **options: Any) -> httpx.AsyncClient:
        if who in ("broker", "ops"):
            return _machine_client(self, who, **options)
        return console_client(self.server, self.bundle(who) if who else None, **options)


def _machine_client(console: Console, name: str, **options: Any) -> httpx.AsyncClient:
    """The broker's or the console's own certificate, used as a client certificate."""
    import ssl

    context = ssl.create_default_context(cafile=str(console.ca.dir / "ca.crt"))
    context.load_cert_chain(console.ca.dir / f"{name}.crt", console.ca.dir / f"{name}.key")
    return httpx.AsyncClient(base_url=console.server.http_url, verify=context, **options)


def _span(trace_id: str, span_id: str, service: str, t0: int, **attributes: Any) -> SpanRecord:
    return SpanRecord(
        trace_id=trace_id, span_id=span_id, parent_span_id="", service=service,
        name=f"{ECHO}/Unary", kind=2, start_ns=t0, end_ns=t0 + 5 * MS,
        attributes=attributes, resource={"service.name": service, SENDER_ATTRIBUTE: _sender(service)},
    )  # fmt: skip


def _sender(service: str) -> str:
    """What the collector stamps: the broker's SPIFFE ID on its spans, an agency's on theirs."""
    return f"spiffe://{TRUST_DOMAIN}/" + ("broker" if service == BROKER else f"agency/{service}")


def _record(n: int, at: int, consumer: str, status: int = 0) -> LedgerRecord:
    return LedgerRecord(
        start_ns=at, end_ns=at + 10 * MS, trace_id="", request_id=f"req-{n}",
        consumer=consumer, provider="nocr", service=ECHO, method="Unary", kind="unary",
        status_code=status, request_bytes=10, request_messages=1, response_bytes=20,
        response_messages=1, endpoint="10.0.0.1:443", broker_instance="b1",
    )  # fmt: skip


def write_ledger(ca: CertificateAuthority, path: Path, calls: list[tuple[str, int]]) -> None:
    """Append calls (consumer, status) to the ledger at ``path``, as the broker's writer does."""
    sealer = Sealer((ca.dir / "broker.key").read_bytes(), (ca.dir / "broker.crt").read_bytes())
    writer = LedgerWriter(SqliteLedgerStore(path), sealer, anchor=anchor_path(path))
    now = time.time_ns() - 1000 * MS
    start = SqliteLedgerStore(path, readonly=True).head()[0] if path.exists() else 0
    for n, (consumer, status) in enumerate(calls, start=start + 1):
        writer.submit(_record(n, now + n * MS, consumer, status))
    writer.close()


def write_config(ca: CertificateAuthority, directory: Path) -> Path:
    contracts = write_echo_contracts(directory / "echo.pb")
    config = directory / "broker.toml"
    config.write_text(CONFIG.format(pki_dir=ca.dir, contracts=contracts), encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("console-pki") / "pki", TRUST_DOMAIN)
    ca.issue_broker()
    for agency in ("post", "nocr", "cra"):
        ca.issue_agency(agency)
    return ca


@pytest.fixture(scope="module")
async def console(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority
) -> AsyncIterator[Console]:
    directory = tmp_path_factory.mktemp("console")
    config = write_config(ca, directory)
    write_ledger(ca, directory / "ledger.db", [("post", 0)] * 3 + [("cra", 0), ("cra", 5)])
    async with running_ops(
        directory, ca, open_accounts(config), allowed_hosts=["ops.example.org"]
    ) as server:
        t0 = time.time_ns() - 60_000 * MS
        server.store.add(
            [
                _span(POST_TRACE, "1" * 16, BROKER, t0, **{"tabadol.consumer": "post",
                      "tabadol.provider": "nocr"}, **ADDRESSES),
                _span(POST_TRACE, "2" * 16, "nocr", t0),
                _span(CRA_TRACE, "3" * 16, BROKER, t0 + MS, **{"tabadol.consumer": "cra",
                      "tabadol.provider": "nocr"}),
                # cra's own service, seen only in cra's trace: post must not learn of it.
                dataclasses.replace(_span(CRA_TRACE, "5" * 16, "cra", t0 + MS), name=CRA_SECRET),
                # nocr's own span may say what it likes: it cannot make this trace post's.
                _span(FORGED_TRACE, "4" * 16, "nocr", t0 + 2 * MS, **{"tabadol.consumer": "post"}),
            ]
        )  # fmt: skip
        yield Console(server, ca, config)


ANONYMOUS_PATHS = [
    "/",
    "/search",
    "/dashboard",
    "/static/js/app.js",
    "/static/css/app.css",
    "/api/services",
    "/api/operations?service=nocr",
    "/api/traces?service=nocr",
    f"/api/traces/{POST_TRACE}",
    "/api/dependencies",
    "/api/tabadol/search",
    "/api/tabadol/agencies",
    "/api/tabadol/whoami",
    "/api/tabadol/dashboard",
    "/api/tabadol/reports",
    f"/reports/quarterly-{QUARTER}.csv",
    f"/reports/quarterly-{QUARTER}.html",
    "/api/no-such-route",
    "/no-such-page",
]


@pytest.mark.parametrize("path", ANONYMOUS_PATHS)
async def test_without_a_certificate_or_session_every_route_is_401(
    console: Console, path: str
) -> None:
    async with console.client(None) as anonymous:
        response = await anonymous.get(path)
    assert response.status_code == 401, response.text
    assert POST_TRACE not in response.text
    if path.startswith("/api/"):
        assert response.json()["errors"][0]["code"] == 401  # the Jaeger error envelope
    else:
        assert "Log in" in response.text


OK, FORBIDDEN = 200, 403
# Every route family, for every kind of identity: what each may open.
MATRIX: dict[str, dict[str, int]] = {
    "/": {"operator": OK, "auditor": OK, "post": OK, "broker": FORBIDDEN, "ops": FORBIDDEN},
    "/static/js/app.js": {"operator": OK, "auditor": OK, "post": OK, "broker": FORBIDDEN},
    "/api/tabadol/whoami": {"operator": OK, "auditor": OK, "post": OK, "ops": FORBIDDEN},
    "/api/services": {"operator": OK, "auditor": FORBIDDEN, "post": OK, "broker": FORBIDDEN},
    "/api/traces": {"operator": OK, "auditor": FORBIDDEN, "post": OK, "ops": FORBIDDEN},
    f"/api/traces/{POST_TRACE}": {"operator": OK, "auditor": FORBIDDEN, "post": OK},
    "/api/dependencies": {"operator": OK, "auditor": FORBIDDEN, "post": FORBIDDEN},
    "/api/tabadol/search": {"operator": OK, "auditor": FORBIDDEN, "post": OK},
    "/api/tabadol/agencies": {"operator": OK, "auditor": FORBIDDEN, "post": OK},
    "/api/tabadol/dashboard": {"operator": OK, "auditor": OK, "post": OK, "broker": FORBIDDEN},
    "/api/tabadol/reports": {"operator": OK, "auditor": OK, "post": OK, "ops": FORBIDDEN},
    f"/reports/quarterly-{QUARTER}.json": {"operator": OK, "auditor": OK, "post": OK},
}
CASES = [(path, who, status) for path, row in MATRIX.items() for who, status in row.items()]


@pytest.mark.parametrize(("path", "who", "status"), CASES)
async def test_each_identity_opens_only_its_route_families(
    console: Console, path: str, who: str, status: int
) -> None:
    async with console.client(who) as client:
        response = await client.get(path)
    assert response.status_code == status, response.text
    if status == FORBIDDEN and path.startswith("/api/"):
        assert response.json()["errors"][0]["code"] == 403


async def test_a_refused_identity_is_logged_with_who_and_what(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tabadol.ops")
    # An auditor of their own: repeats of one kind of refusal are logged once per interval.
    bundle = person_bundle(console.ca, "auditor", "bahram")
    async with console_client(console.server, bundle) as auditor:
        for _ in range(3):
            assert (await auditor.get("/api/traces/" + "b" * 32)).status_code == 403
    assert f"403 for GET /api/traces/{'b' * 32}" in caplog.text
    assert "auditor 'bahram' may not see raw spans" in caplog.text
    assert caplog.text.count("auditor 'bahram' may not see") == 1


async def test_an_agency_finds_only_traces_the_broker_recorded_it_in(console: Console) -> None:
    async with console.client("post") as post:
        found = (await post.get("/api/tabadol/search")).json()
        assert [t["traceID"] for t in found["data"]] == [POST_TRACE]
        assert found["total"] == 1
        full = (await post.get("/api/traces", params={"service": "nocr"})).json()
        assert [t["traceID"] for t in full["data"]] == [POST_TRACE]
        # Another agency's trace, and the one a non-broker span claims for post, are not found.
        for other in (CRA_TRACE, FORGED_TRACE):
            response = await post.get(f"/api/traces/{other}")
            assert response.status_code == 404, other
        graph = (await post.get("/api/tabadol/agencies", params={"lookback": 3_600_000})).json()
        assert [(e["consumer"], e["provider"]) for e in graph["data"]] == [("post", "nocr")]
    async with console.client("operator") as operator:
        everything = (await operator.get("/api/tabadol/search")).json()
        assert everything["total"] == 3


async def test_a_provider_agency_sees_the_traces_of_calls_to_it(console: Console) -> None:
    async with console.client("nocr") as nocr:
        found = (await nocr.get("/api/tabadol/search")).json()
    assert sorted(t["traceID"] for t in found["data"]) == [POST_TRACE, CRA_TRACE]


async def test_an_agency_lists_only_the_services_and_operations_of_its_own_traces(
    console: Console,
) -> None:
    # Review of issue 10: /api/services and the operations lists were not scoped, and post
    # learned that another agency calls cra's MatchMobile.
    async with console.client("post") as post:
        services = (await post.get("/api/services")).json()["data"]
        assert services == ["nocr", BROKER]
        for path, params in (
            ("/api/services/cra/operations", {}),
            ("/api/operations", {"service": "cra"}),
        ):
            response = await post.get(path, params=params)
            assert response.status_code == 200
            assert response.json()["data"] == [], path
            assert CRA_SECRET not in response.text
    async with console.client("cra") as cra:
        assert (await cra.get("/api/services/cra/operations")).json()["data"] == [CRA_SECRET]
    async with console.client("operator") as operator:
        assert "cra" in (await operator.get("/api/services")).json()["data"]


async def test_an_agency_never_sees_where_the_broker_reached_a_provider(console: Console) -> None:
    # Review of issue 10: broker spans shown to an agency carried nocr's internal address.
    def tags(body: dict[str, Any]) -> set[str]:
        return {t["key"] for trace in body["data"] for s in trace["spans"] for t in s["tags"]}

    async with console.client("post") as post:
        for path in (f"/api/traces/{POST_TRACE}", "/api/traces"):
            body = (await post.get(path)).json()
            assert "tabadol.consumer" in tags(body)
            assert not tags(body) & set(ADDRESSES), path
            assert "10.0.0.1" not in json.dumps(body)
        # Nor may it confirm a guessed address by searching for it.
        for tag in ("tabadol.endpoint:10.0.0.1:443", "endpoint:10.0.0.1:443", "net.peer.name:x"):
            response = await post.get("/api/traces", params={"tag": tag})
            assert response.status_code == 400, tag
            assert "may not search by the exchange's addresses" in response.text
    async with console.client("operator") as operator:
        body = (await operator.get(f"/api/traces/{POST_TRACE}")).json()
        assert set(ADDRESSES) <= tags(body)
        found = await operator.get("/api/traces", params={"tag": "endpoint:10.0.0.1:443"})
        assert [t["traceID"] for t in found.json()["data"]] == [POST_TRACE]


async def test_decoys_naming_an_agency_do_not_hide_its_traces_from_it(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    # Review of issue 10: 4200 decoy spans tagged with tax (from another agency) emptied
    # tax's view: candidates came from any span's tags, the newest 2000 at most.
    async with running_ops(tmp_path, ca) as server:
        t0 = time.time_ns() - 60_000 * MS
        server.store.add(
            [_span(POST_TRACE, "1" * 16, BROKER, t0, **{"tabadol.consumer": "post",
                   "tabadol.provider": "nocr"})]
        )  # fmt: skip
        server.store.add(
            [
                _span(f"{n:032x}", "1" * 16, "cra", t0 + (n + 1) * MS,
                      **{"tabadol.consumer": "post", "tabadol.provider": "post"})
                for n in range(4200)
            ]
        )  # fmt: skip
        async with console_client(server, ca.dir / "agencies" / "post") as post:
            found = (await post.get("/api/tabadol/search", params={"lookback": "1h"})).json()
            assert [t["traceID"] for t in found["data"]] == [POST_TRACE]
            assert found["total"] == 1
            full = (await post.get("/api/traces", params={"offset": 2500})).json()
            assert full["data"] == [] and full["total"] == 1  # no window on paging


async def test_an_agency_the_configuration_does_not_declare_is_refused_everywhere(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    # Review of issue 10: a valid agency certificate whose id is in no [[agency]] opened the
    # dashboard and the reports, and exported spans.
    caplog.set_level(logging.WARNING, logger="tabadol.ops")
    if not (console.ca.dir / "agencies" / "ghost").exists():
        console.ca.issue_agency("ghost")
    async with console.client("ghost") as ghost:
        for path in ("/", "/api/tabadol/whoami", "/api/tabadol/dashboard", "/api/traces",
                     f"/reports/quarterly-{QUARTER}.csv"):  # fmt: skip
            response = await ghost.get(path)
            assert response.status_code == 403, path
            assert "agency &#x27;ghost&#x27; is not declared" in response.text or (
                "agency 'ghost' is not declared" in response.text
            )
    assert "agency 'ghost' is not declared in the exchange's configuration" in caplog.text
    # Its spans too: the collector of the same console knows the declared agencies.
    bundle = console.ca.dir / "agencies" / "ghost"
    key_cert = (bundle / "agency.key").read_bytes(), (bundle / "agency.crt").read_bytes()
    channel, stub = export_stub(
        (console.server.otlp_address, TRUST_DOMAIN), key_cert, console.ca.cert_pem()
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Export(_export_request("ghost"), timeout=10)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "agency 'ghost'" in (refused.value.details() or "")


def _export_request(service: str) -> ExportTraceServiceRequest:
    now = time.time_ns()
    name = KeyValue(key="service.name", value=AnyValue(string_value=service))
    span = Span(trace_id=b"\x07" * 16, span_id=b"\x07" * 8, name="x",
                start_time_unix_nano=now, end_time_unix_nano=now + MS)  # fmt: skip
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[name]), scope_spans=[ScopeSpans(spans=[span])]
            )
        ]
    )


async def test_a_thousand_tag_filters_is_a_400_naming_the_parameter(console: Console) -> None:
    # Review of issue 10: 1000 tags overflowed SQLite's expression tree: a 500, a traceback.
    params = httpx.QueryParams([("lookback", "1h"), *(("tag", f"k{n}:v") for n in range(1000))])
    async with console.client("operator") as operator:
        for path in ("/api/traces", "/api/tabadol/search"):
            response = await operator.get(path, params=params)
            assert response.status_code == 400, response.text
            assert response.json()["errors"][0]["msg"].startswith("tags: at most 32")
        many = json.dumps({f"k{n}": "v" for n in range(33)})
        assert (await operator.get("/api/traces", params={"tags": many})).status_code == 400
        enough = httpx.QueryParams([("tag", f"k{n}:v") for n in range(32)])
        assert (await operator.get("/api/traces", params=enough)).status_code == 200


async def test_an_agency_dashboard_counts_only_its_own_ledger_rows(console: Console) -> None:
    async with console.client("cra") as cra:
        mine = (await cra.get("/api/tabadol/dashboard")).json()
    async with console.client("operator") as operator:
        everyone = (await operator.get("/api/tabadol/dashboard")).json()
    assert everyone["transactions"]["allTime"] == 5
    assert mine["transactions"]["allTime"] == 2
    assert mine["transactions"]["today"] == 2
    assert mine["topConsumers"] == [{"agency": "cra", "calls": 2}]
    assert mine["errorRateToday"] == 0.5
    assert mine["latencyByService"] == []  # cra provides nothing: no service latency of others'


async def test_an_agency_report_holds_only_its_own_assessment(console: Console) -> None:
    async with console.client("post") as post:
        response = await post.get(f"/reports/quarterly-{QUARTER}.csv")
    assert response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {row["agency_id"] for row in rows} == {"post"}
    async with console.client("auditor") as auditor:
        response = await auditor.get(f"/reports/quarterly-{QUARTER}.csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {row["agency_id"] for row in rows} == {"nocr", "post", "cra"}


async def test_a_report_is_built_once_until_the_ledger_grows(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    config = write_config(ca, tmp_path)
    write_ledger(ca, tmp_path / "ledger.db", [("post", 0)])
    async with running_ops(tmp_path, ca, open_accounts(config)) as server:
        reports = server.app.state.reports
        async with console_client(server, operator_bundle(ca)) as operator:
            path = f"/reports/quarterly-{QUARTER}.json"
            first = (await operator.get(path)).json()
            assert (await operator.get(path)).json() == first
            assert reports.builds == 1
            write_ledger(ca, tmp_path / "ledger.db", [("cra", 0)])
            second = (await operator.get(path)).json()
            assert reports.builds == 2
            assert second != first
            # Another viewer's scope is another report.
        async with console_client(server, ca.dir / "agencies" / "post") as post:
            await post.get(path)
        assert reports.builds == 3


async def test_a_revoked_operator_is_refused_on_the_same_connection_without_restart(
    console: Console,
) -> None:
    bundle = person_bundle(console.ca, "operator", "mallory")
    async with console_client(console.server, bundle) as mallory:
        assert (await mallory.get("/api/tabadol/search")).status_code == 200
        console.ca.revoke_person("operator", "mallory", reason="key-compromise")
        # The console re-reads crl.pem within a second: poll, boundedly.
        deadline = time.monotonic() + 5
        status = 200
        while status == 200 and time.monotonic() < deadline:
            response = await mallory.get("/api/tabadol/search")
            status = response.status_code
            await asyncio.sleep(0.1)
        assert status == 401
        assert "revoked" in response.json()["errors"][0]["msg"]
    async with console.client("operator") as olivia:  # others are unaffected
        assert (await olivia.get("/api/tabadol/search")).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "", "[::1"])
async def test_a_host_header_the_console_does_not_serve_is_refused(
    console: Console, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tabadol.ops")
    async with console.client("operator", headers={"Host": host}) as rebound:
        response = await rebound.get("/api/tabadol/search")
    assert response.status_code == 421
    assert POST_TRACE not in response.text
    assert "is not a name this console serves (DNS rebinding?)" in caplog.text


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "ops.tabadol.example", "ops.example.org"]
)
async def test_the_names_the_console_serves_are_accepted(console: Console, host: str) -> None:
    port = console.server.http_url.rsplit(":", 1)[1]
    async with console.client("operator", headers={"Host": f"{host}:{port}"}) as client:
        assert (await client.get("/api/tabadol/whoami")).status_code == 200


async def test_a_login_link_opens_one_session_once(console: Console) -> None:
    link = console.server.login_link()
    path = link.removeprefix(console.server.http_url)
    async with console.client(None) as browser:
        opened = await browser.get(path)
        assert opened.status_code == 303
        cookie = opened.headers["set-cookie"]
        for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
            assert attribute in cookie
        whoami = (await browser.get("/api/tabadol/whoami")).json()
        assert (whoami["role"], whoami["via"]) == ("operator", "login link")
    async with console.client(None) as thief:
        replayed = await thief.get(path)
        assert replayed.status_code == 401
        assert "already used or expired" in replayed.text
        assert (await thief.get("/api/tabadol/search")).status_code == 401


async def test_a_made_up_token_or_session_cookie_opens_nothing(console: Console) -> None:
    async with console.client(None, cookies={"tabadol_session": "guess"}) as guesser:
        assert (await guesser.get("/login", params={"token": "guess"})).status_code == 401
        response = await guesser.get("/api/tabadol/search")
        assert response.status_code == 401
        assert "session has expired or is unknown" in response.json()["errors"][0]["msg"]


def test_login_tokens_expire_and_sessions_expire() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    late = sessions.issue_token("operator", "demo")
    now[0] += 15 * 60
    assert sessions.redeem(late) is None  # 15 minutes: too late
    redeemed = sessions.redeem(sessions.issue_token("operator", "demo"))
    assert redeemed is not None
    secret, viewer = redeemed
    assert sessions.viewer(secret) == viewer
    now[0] += 12 * 3600
    assert sessions.viewer(secret) is None  # 12 hours: logged out


@pytest.mark.parametrize("bind", ["0.0.0.0:0", "10.1.2.3:0", "ops.example.org:0"])
async def test_no_login_link_for_a_console_reachable_from_other_machines(
    tmp_path: Path, ca: CertificateAuthority, bind: str
) -> None:
    server = OpsServer(tmp_path / "spans.db", trust=ops_trust(ca), http=bind, otlp="127.0.0.1:0")
    try:
        with pytest.raises(TabadolError, match="only for a console bound to a loopback"):
            server.login_link()
    finally:
        server.store.close()


async def test_a_huge_lookback_is_a_400_naming_the_parameter(console: Console) -> None:
    async with console.client("operator") as operator:
        for path in ("/api/tabadol/search", "/api/traces"):
            response = await operator.get(path, params={"lookback": "9" * 30 + "d"})
            assert response.status_code == 400, response.text
            assert response.json()["errors"][0]["msg"].startswith("lookback")
        response = await operator.get("/api/tabadol/agencies", params={"lookback": "9" * 30})
        assert response.status_code == 400
        assert "lookback" in response.json()["errors"][0]["msg"]
        response = await operator.get("/api/tabadol/search", params={"offset": "9" * 30})
        assert response.status_code == 400


async def test_every_answer_forbids_framing_and_referrers(console: Console) -> None:
    async with console.client("operator") as operator:
        for path in ("/", "/api/tabadol/whoami"):
            headers = (await operator.get(path)).headers
            assert headers["x-frame-options"] == "DENY"
            assert headers["referrer-policy"] == "no-referrer"


async def test_the_span_store_is_created_private(tmp_path: Path, ca: CertificateAuthority) -> None:
    old = os.umask(0o022)
    try:
        async with running_ops(tmp_path, ca) as server:
            server.store.add([_span("e" * 32, "5" * 16, BROKER, time.time_ns())])
            files = await asyncio.to_thread(lambda: list(tmp_path.glob("spans.db*")))
            assert len(files) >= 2  # the database and its write-ahead log
            for path in files:
                assert path.stat().st_mode & 0o077 == 0, path
    finally:
        os.umask(old)


async def test_ops_starts_before_the_broker_has_written_its_ledger(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    config = write_config(ca, tmp_path)
    async with (
        running_ops(tmp_path, ca, open_accounts(config)) as server,
        console_client(server, operator_bundle(ca)) as operator,
    ):
        empty = (await operator.get("/api/tabadol/dashboard")).json()
        assert empty["transactions"]["allTime"] == 0
        write_ledger(ca, tmp_path / "ledger.db", [("post", 0)])
        written = (await operator.get("/api/tabadol/dashboard")).json()
        assert written["transactions"]["allTime"] == 1


async def test_tabadol_ops_without_a_configuration_refuses_to_start() -> None:
    started = await asyncio.create_subprocess_exec(
        str(TABADOL), "ops", "--http", "127.0.0.1:0", "--otlp", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(started.communicate(), 60)
    assert started.returncode != 0
    assert b"needs --config" in err
    assert b"no unauthenticated mode" in err


def test_the_rights_table_files_every_path_under_one_family() -> None:
    # Pure: decisions for each role on each family, as access.py states them.
    person = {r: Viewer(r, "x", "certificate", 2e9) for r in ("operator", "auditor", "agency")}
    assert family_of("/api/dependencies") == "service-graph"
    assert family_of("/reports/quarterly-1404-Q1.csv") == "ledger"
    assert family_of("/api/tabadol/anything-new") == "spans"
    assert decide(person["auditor"], "spans") != decide(person["operator"], "spans")
    assert decide(None, "page").status == 401  # type: ignore[union-attr]
    assert host_name("[::1]:443") == "::1"
    assert host_name("a:b") is None
    assert not trace_is_visible(
        [_span("1" * 32, "1" * 16, "post", 0, **{"tabadol.consumer": "x"})], "x"
    )
    # A span named tabadol-broker counts only when the collector stamped it as the broker's:
    # not when unstamped (stored before stamping) nor stamped with another sender.
    stamped = _span("1" * 32, "1" * 16, BROKER, 0, **{"tabadol.consumer": "x"})
    assert trace_is_visible([stamped], "x")
    for sender in ("", f"spiffe://{TRUST_DOMAIN}/agency/x", f"spiffe://{TRUST_DOMAIN}/broker/x"):
        forged = dataclasses.replace(stamped, resource={SENDER_ATTRIBUTE: sender})
        assert not trace_is_visible([forged], "x"), sender


def test_undeclared_agencies_and_the_exchanges_addresses_are_decided_purely() -> None:
    post = Viewer("agency", "post", "certificate", 2e9)
    refused = decide(post, "page", declared=frozenset({"nocr"}))
    assert refused.status == 403  # type: ignore[union-attr]
    assert "agency 'post' is not declared" in refused.message  # type: ignore[union-attr]
    assert decide(post, "page", declared=frozenset({"post"})).viewer == post  # type: ignore[union-attr]
    assert decide(post, "page", declared=None).viewer == post  # type: ignore[union-attr]
    operator = Viewer("operator", "o", "certificate", 2e9)
    assert decide(operator, "spans", declared=frozenset()).viewer == operator  # type: ignore[union-attr]
    span = dataclasses.replace(
        _span("1" * 32, "1" * 16, BROKER, 0, **ADDRESSES, **{"tabadol.consumer": "post"}),
        events=(SpanEvent(0, "e", {"net.peer.ip": "10.0.0.1", "k": "v"}),),
    )
    [shown] = agency_view([span])
    assert shown.attributes == {"tabadol.consumer": "post"}
    assert shown.events[0].attributes == {"k": "v"}


def test_the_access_rules_are_pure() -> None:
    code = (
        "import sys, tabadol.ops.access, tabadol.ops.sessions; "
        "print(sorted(m for m in ('grpc', 'asyncio', 'sqlite3', 'opentelemetry', 'starlette') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- in a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


async def test_an_operator_logs_in_with_a_client_certificate_in_the_browser(
    browser: Browser, console: Console
) -> None:
    async with console_page(browser, console.server, console.bundle("operator")) as page:
        await page.goto("/")
        await expect(page.locator("#whoami")).to_have_text(f"Logged in as operator {OPERATOR!r}")
        await expect(page.locator(".result-count")).to_have_text("3 traces")


async def test_a_newcomer_logs_in_with_the_login_link_in_the_browser(
    browser: Browser, console: Console
) -> None:
    link = console.server.login_link("operator", "demo")
    async with console_page(browser, console.server, None) as page:
        await page.goto(link)
        await expect(page).to_have_url(re.compile(r"/(search)?$"))
        await expect(page.locator("#whoami")).to_have_text("Logged in as operator 'demo'")
        await expect(page.locator(".result-count")).to_have_text("3 traces")
        await page.reload()  # the session cookie, not the link, keeps them logged in
        await expect(page.locator(".result-count")).to_have_text("3 traces")
    async with console_page(browser, console.server, None) as stranger:
        response = await stranger.goto(link)
        assert response is not None and response.status == 401
        await expect(stranger.get_by_role("heading", level=1)).to_have_text("Log in")


async def test_an_auditor_in_the_browser_gets_the_dashboard_and_no_span_tabs(
    browser: Browser, console: Console
) -> None:
    async with console_page(browser, console.server, console.bundle("auditor")) as page:
        await page.goto("/")
        await expect(page).to_have_url(re.compile(r"/dashboard$"))
        await expect(page.locator("#whoami")).to_have_text(f"Logged in as auditor {AUDITOR!r}")
        nav = page.get_by_role("navigation", name="Main")
        await expect(nav.get_by_role("link", name="Dashboard")).to_be_visible()
        await expect(nav.get_by_role("link", name="Search")).to_be_hidden()
        await expect(nav.get_by_role("link", name="Dependencies")).to_be_hidden()
