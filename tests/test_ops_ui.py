"""The trace viewer's web UI in a real browser, over spans sent by the OpenTelemetry SDK.

Three services export over OTLP to a real viewer: ``post`` calls the broker, the broker
(``tabadol-broker``) forwards to ``nocr``. One exchange succeeds, one fails with NOT_FOUND, and
the broker answers health checks that involve no agency (enough for two result pages).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from playwright.async_api import Browser, Locator, Page, expect

from tabadol.client.tracing import ExporterCredentials, tracer_provider
from tabadol.ops.server import OpsServer
from tabadol.pki import CertificateAuthority
from tabadol.spiffe import ops_dns_name
from tests.support.browser import chromium, console_page
from tests.support.ops import operator_bundle, operator_client, running_ops

METHOD = "tabadol.agencies.nocr.v1.PersonRegistry/InquirePerson"
RPC = {
    "rpc.system": "grpc",
    "rpc.service": "tabadol.agencies.nocr.v1.PersonRegistry",
    "rpc.method": "InquirePerson",
}
MS = 1_000_000  # nanoseconds
NOT_FOUND_MESSAGE = "no person with national ID 29901011234567"
HEALTH_CHECKS = 22  # with the two exchanges: 24 traces, two pages of 20
TRACE_SCREENSHOT = Path("/tmp/ops-trace.png")
DEPS_SCREENSHOT = Path("/tmp/ops-deps.png")
SEARCH_SCREENSHOT = Path("/tmp/ops-search.png")


@dataclass(frozen=True)
class Traces:
    """The traces the viewer holds, by what they show."""

    ok: str
    failed: str


def _trace_id(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def _exchange(post: Tracer, broker: Tracer, nocr: Tracer, t0: int, *, failing: bool) -> str:
    """post -> broker -> nocr, with explicit times so the waterfall has a known shape."""

    def child(
        tracer: Tracer,
        name: str,
        parent: trace.Span,
        kind: SpanKind,
        start_ms: int,
        attributes: dict[str, Any] | None = None,
    ) -> trace.Span:
        # Parentage across the three providers is passed explicitly, as the broker does.
        return tracer.start_span(
            name,
            context=trace.set_span_in_context(parent),
            kind=kind,
            start_time=t0 + start_ms * MS,
            attributes=attributes,
        )

    rpc = {**RPC, "rpc.grpc.status_code": 5 if failing else 0}
    client = post.start_span(METHOD, kind=SpanKind.CLIENT, start_time=t0, attributes=rpc)
    server = child(
        broker,
        METHOD,
        client,
        SpanKind.SERVER,
        5,
        {
            **rpc,
            "tabadol.consumer": "post",
            "tabadol.provider": "nocr",
            "tabadol.request_id": f"req-{'failed' if failing else 'ok'}",
        },
    )
    server.add_event(
        "grant checked", {"tabadol.grant": "post:InquirePerson"}, timestamp=t0 + 15 * MS
    )
    authorize = child(broker, "authorize", server, SpanKind.INTERNAL, 7)
    authorize.end(end_time=t0 + 15 * MS)
    forward = child(broker, METHOD, server, SpanKind.CLIENT, 20, rpc)
    provider = child(nocr, METHOD, forward, SpanKind.SERVER, 25, rpc)
    if failing:
        for span in (provider, forward, server, client):
            span.set_status(Status(StatusCode.ERROR, f"NOT_FOUND: {NOT_FOUND_MESSAGE}"))
    else:
        # Two pieces of work in nocr at once: only the one that ends last is on the critical path.
        query = child(nocr, "registry.query", provider, SpanKind.INTERNAL, 30)
        audit = child(nocr, "audit.write", provider, SpanKind.INTERNAL, 32)
        audit.end(end_time=t0 + 50 * MS)
        query.end(end_time=t0 + 95 * MS)
    provider.end(end_time=t0 + 100 * MS)
    forward.end(end_time=t0 + 105 * MS)
    server.end(end_time=t0 + 115 * MS)
    client.end(end_time=t0 + 120 * MS)
    return _trace_id(client)


def _health_check(broker: Tracer, t0: int) -> None:
    span = broker.start_span("grpc.health.v1.Health/Check", kind=SpanKind.SERVER, start_time=t0)
    span.end(end_time=t0 + 1 * MS)


@pytest.fixture(scope="module")
async def ops(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority
) -> AsyncIterator[OpsServer]:
    async with running_ops(tmp_path_factory.mktemp("ops"), pki) as server:
        yield server


@pytest.fixture(scope="module")
async def empty_ops(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority
) -> AsyncIterator[OpsServer]:
    """A second viewer that never receives a span."""
    async with running_ops(tmp_path_factory.mktemp("empty-ops"), pki) as server:
        yield server


def _sender(pki: CertificateAuthority, service: str) -> ExporterCredentials:
    """Who exports a service's spans: the broker its own, each agency with its certificate."""
    cert, key = (
        (pki.dir / "broker.crt", pki.dir / "broker.key")
        if service == "tabadol-broker"
        else (
            pki.dir / "agencies" / service / "agency.crt",
            pki.dir / "agencies" / service / "agency.key",
        )
    )
    return ExporterCredentials(
        pki.cert_pem(), cert.read_bytes(), key.read_bytes(), ops_dns_name(pki.trust_domain)
    )


async def _wait_for_trace(client: httpx.AsyncClient, trace_id: str, spans: int) -> None:
    """Ingest is asynchronous: poll the API until the whole trace is stored."""
    for _ in range(200):
        response = await client.get(f"/api/traces/{trace_id}")
        if response.status_code == 200 and len(response.json()["data"][0]["spans"]) == spans:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"trace {trace_id} did not arrive with {spans} spans within 10s")


async def _wait_for_trace_count(client: httpx.AsyncClient, count: int) -> None:
    for _ in range(200):
        response = await client.get("/api/tabadol/search", params={"limit": 1})
        if response.status_code == 200 and response.json()["total"] == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the viewer did not hold {count} traces within 10s")


@pytest.fixture(scope="module")
async def traces(ops: OpsServer, pki: CertificateAuthority) -> Traces:
    providers: list[TracerProvider] = []
    for name in ("post", "tabadol-broker", "nocr"):
        made = tracer_provider(
            name,
            otlp_endpoint=f"https://{ops.otlp_address}",
            credentials=_sender(pki, name),
            env={},
        )
        assert made is not None
        providers.append(made[0])
    post, broker, nocr = (p.get_tracer("tests.test_ops_ui") for p in providers)
    now = time.time_ns()
    ok = _exchange(post, broker, nocr, now - 3000 * MS, failing=False)
    failed = _exchange(post, broker, nocr, now - 2000 * MS, failing=True)
    for i in range(HEALTH_CHECKS):
        _health_check(broker, now - (1000 - 10 * i) * MS)
    # force_flush blocks on the export: keep it off the event loop the viewer runs on.
    flushed = await asyncio.gather(*(asyncio.to_thread(p.force_flush) for p in providers))
    assert all(flushed), "the SDK could not export the spans to the viewer"
    await asyncio.gather(*(asyncio.to_thread(p.shutdown) for p in providers))
    async with operator_client(ops, pki) as client:
        await _wait_for_trace(client, ok, 7)
        await _wait_for_trace(client, failed, 5)
        await _wait_for_trace_count(client, 2 + HEALTH_CHECKS)
    return Traces(ok=ok, failed=failed)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


@pytest.fixture
async def page(
    browser: Browser, ops: OpsServer, traces: Traces, pki: CertificateAuthority
) -> AsyncIterator[Page]:
    """A browser on the console, logged in with the tests' operator's client certificate."""
    async with console_page(browser, ops, operator_bundle(pki)) as opened:
        yield opened


def _rows(page: Page, service: str | None = None, operation: str | None = None) -> Locator:
    """Waterfall rows, by service and (short) operation name."""
    selector = ".span-row" + (f'[data-service="{service}"]' if service else "")
    rows = page.locator(selector)
    if operation:
        rows = rows.filter(
            has=page.locator(".operation", has_text=re.compile(f"^{re.escape(operation)}$"))
        )
    return rows


async def test_search_by_service_shows_the_count_and_opens_a_trace(
    page: Page, traces: Traces
) -> None:
    await page.goto("/")
    await expect(page.locator(".result-count")).to_have_text("24 traces")

    await page.get_by_label("Service (agency)").select_option("post")
    await expect(page.get_by_label("Operation (method)")).to_contain_text(METHOD)
    await page.get_by_role("button", name="Find traces").click()

    await expect(page).to_have_url(re.compile(r"/search\?service=post"))
    await expect(page.locator(".result-count")).to_have_text("2 traces")
    results = page.locator(".results-table tbody tr")
    await expect(results).to_have_count(2)
    # Newest first: the failed exchange came after the successful one.
    await expect(results.nth(0)).to_contain_text("4 errors")
    await expect(results.nth(1)).to_contain_text("tabadol-broker")
    await page.screenshot(path=str(SEARCH_SCREENSHOT), full_page=True)

    await page.go_back()
    await expect(page.locator(".result-count")).to_have_text("24 traces")
    await expect(page.get_by_label("Service (agency)")).to_have_value("")
    await page.go_forward()
    await expect(page.locator(".result-count")).to_have_text("2 traces")

    await results.nth(1).get_by_role("link").click()
    await expect(page).to_have_url(re.compile(f"/trace/{traces.ok}$"))
    await expect(page.get_by_role("heading", level=1)).to_contain_text(METHOD)


async def test_results_page_through_twenty_traces_at_a_time(page: Page) -> None:
    await page.goto("/search")
    results = page.locator(".results-table tbody tr")
    await expect(results).to_have_count(20)
    pager = page.get_by_role("navigation", name="Result pages").first
    await expect(pager).to_contain_text("1\N{EN DASH}20 of 24")
    await expect(pager.get_by_role("button", name="← Newer")).to_be_disabled()

    await pager.get_by_role("button", name="Older →").click()
    await expect(page).to_have_url(re.compile(r"offset=20"))
    await expect(results).to_have_count(4)
    await expect(pager).to_contain_text("21\N{EN DASH}24 of 24")
    await expect(pager.get_by_role("button", name="Older →")).to_be_disabled()
    # The oldest traces are the two exchanges.
    await expect(results.last).to_contain_text("PersonRegistry/InquirePerson")

    await page.go_back()
    await expect(pager).to_contain_text("1\N{EN DASH}20 of 24")


async def test_trace_waterfall_shows_services_attributes_and_collapses_subtrees(
    page: Page, traces: Traces
) -> None:
    await page.goto(f"/trace/{traces.ok}")
    legend = page.get_by_role("list", name="Services (bar colours)")
    for service in ("post", "tabadol-broker", "nocr"):
        await expect(legend).to_contain_text(service)
        await expect(_rows(page, service).first).to_be_visible()
    await expect(page.locator(".span-row:visible")).to_have_count(7)

    broker_server = _rows(page, "tabadol-broker").first
    await broker_server.locator(".span-label").click()
    details = page.locator("#span-details")
    await expect(details).to_be_visible()
    consumer = details.locator(".kv tr").filter(
        has=page.get_by_role("rowheader", name="tabadol.consumer", exact=True)
    )
    await expect(consumer.locator("td")).to_have_text("post")
    await expect(details).to_contain_text("server")  # the span kind
    await expect(details).to_contain_text("grant checked")  # the span's event
    await page.screenshot(path=str(TRACE_SCREENSHOT), full_page=True)

    await broker_server.get_by_role("button", name=re.compile("^Collapse")).click()
    await expect(page.locator(".span-row:visible")).to_have_count(2)
    await expect(broker_server).to_contain_text("+5")
    await broker_server.get_by_role("button", name=re.compile("^Expand")).click()
    await expect(page.locator(".span-row:visible")).to_have_count(7)

    await page.get_by_role("button", name="Collapse all").click()
    await expect(page.locator(".span-row:visible")).to_have_count(1)
    await page.get_by_role("button", name="Expand all").click()
    await expect(page.locator(".span-row:visible")).to_have_count(7)


async def test_critical_path_leaves_out_work_that_finished_early(
    page: Page, traces: Traces
) -> None:
    await page.goto(f"/trace/{traces.ok}")
    on_path = page.locator(".span-row.on-critical-path")
    await expect(on_path).to_have_count(6)
    audit = _rows(page, "nocr", "audit.write")
    query = _rows(page, "nocr", "registry.query")
    await expect(audit.locator(".critical-mark")).to_be_hidden()
    await expect(query.locator(".critical-mark")).to_be_visible()
    # authorize ran before the broker forwarded the call, so it delayed the end as well.
    await expect(
        _rows(page, "tabadol-broker", "authorize").locator(".critical-mark")
    ).to_be_visible()

    toggle = page.get_by_role("button", name="Show critical path")
    await expect(toggle).to_have_attribute("aria-pressed", "true")
    await toggle.click()
    await expect(toggle).to_have_attribute("aria-pressed", "false")
    await expect(query.locator(".critical-mark")).to_be_hidden()


async def test_jump_to_error_selects_the_failed_span_and_shows_its_status(
    page: Page, traces: Traces
) -> None:
    await page.goto(f"/trace/{traces.failed}")
    jump = page.get_by_role("button", name="Jump to error")
    await jump.click()
    selected = page.locator(".span-row.selected")
    await expect(selected).to_have_count(1)
    await expect(selected).to_have_class(re.compile(r"\bis-error\b"))
    await expect(selected).to_have_attribute("data-service", "post")
    details = page.locator("#span-details")
    await expect(details).to_contain_text("ERROR")
    await expect(details).to_contain_text(NOT_FOUND_MESSAGE)
    await expect(page.locator(".jump-status")).to_have_text("Error 1 of 4")

    await jump.click()
    await expect(selected).to_have_attribute("data-service", "tabadol-broker")
    await expect(details).to_contain_text("gRPC 5 NOT_FOUND")
    await expect(page.locator(".jump-status")).to_have_text("Error 2 of 4")

    # The selected span is in the address: a reload (or a shared link) opens it again.
    await expect(page).to_have_url(re.compile(r"\?span=[0-9a-f]{16}$"))
    await page.reload()
    await expect(selected).to_have_attribute("data-service", "tabadol-broker")
    await expect(details).to_contain_text(NOT_FOUND_MESSAGE)


async def test_dependency_edge_leads_to_the_traces_between_the_agencies(page: Page) -> None:
    await page.goto("/dependencies")
    edge = page.get_by_role("link", name=re.compile(r"^post → nocr: 2 calls · 50% errors"))
    await expect(edge).to_be_visible()
    row = page.get_by_role("row").filter(has_text="post").filter(has_text="nocr")
    await expect(row).to_have_text(re.compile(r"post\s*nocr\s*2\s*1\s*50%"))
    await page.screenshot(path=str(DEPS_SCREENSHOT), full_page=True)

    await edge.click()
    await expect(page).to_have_url(re.compile(r"/search\?.*tags="))
    await expect(page.get_by_label("Attributes")).to_have_value("consumer=post provider=nocr")
    await expect(page.get_by_label("Service (agency)")).to_have_value("")
    await expect(page.get_by_label("Time range")).to_have_value("custom")
    await expect(page.locator(".result-count")).to_have_text("2 traces")


async def test_pages_without_spans_say_there_is_nothing_yet(
    browser: Browser, empty_ops: OpsServer, pki: CertificateAuthority
) -> None:
    async with console_page(browser, empty_ops, operator_bundle(pki)) as page:
        await _nothing_yet(page, empty_ops)


async def _nothing_yet(page: Page, empty_ops: OpsServer) -> None:
    await page.goto(f"{empty_ops.http_url}/dependencies?lookback=15m")
    await expect(page.get_by_label("Window")).to_have_value("15m")
    await expect(
        page.get_by_text("No calls between agencies in the last 15 minutes.")
    ).to_be_visible()
    await expect(page.get_by_role("table")).to_have_count(0)

    await page.goto(f"{empty_ops.http_url}/search")
    await expect(page.locator(".result-count")).to_have_text("0 traces")
    await expect(page.get_by_text("No traces match these filters.")).to_be_visible()


async def test_download_json_link_serves_the_trace(page: Page, traces: Traces) -> None:
    await page.goto(f"/trace/{traces.ok}")
    link = page.get_by_role("link", name="Download JSON")
    await expect(link).to_have_attribute("href", f"/api/traces/{traces.ok}")
    async with page.expect_download() as started:
        await link.click()
    download = await started.value
    path = await download.path()
    body = json.loads(await asyncio.to_thread(Path(path).read_text))
    assert body["data"][0]["traceID"] == traces.ok
    assert len(body["data"][0]["spans"]) == 7


async def test_copy_button_puts_the_trace_id_on_the_clipboard(page: Page, traces: Traces) -> None:
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    await page.goto(f"/trace/{traces.ok}")
    await page.get_by_role("button", name="Copy ID").click()
    await expect(page.locator(".copy-status")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == traces.ok


async def test_bad_duration_filter_shows_the_api_message(page: Page) -> None:
    await page.goto("/search")
    await page.get_by_label("Min").fill("abc")
    await page.get_by_role("button", name="Find traces").click()
    await expect(page.get_by_role("alert")).to_contain_text(
        "'abc' is not a duration such as 250ms, 1.5s or 2h"
    )


async def test_unknown_trace_says_it_was_not_found(page: Page) -> None:
    await page.goto(f"/trace/{'0' * 31}1")
    await expect(page.get_by_role("heading", name="Trace not found")).to_be_visible()
    await expect(page.get_by_role("alert")).to_contain_text("not found")
