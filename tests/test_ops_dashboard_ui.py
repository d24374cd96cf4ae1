"""The ops dashboard and the quarterly reports page in a real browser, over a real ledger.

The ledger is written by the broker's own writer and sealed with the broker's key. Three
agencies: post and tax consume, nocr and tax provide. Today's eight calls are placed a few
seconds ago (the dashboard's "today" is the day in Tehran); a few more go earlier in this
quarter, when it began more than a day ago, and in the previous quarter.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, expect

from tabadol.ledger import LedgerRecord, LedgerWriter
from tabadol.ledger.seal import Sealer
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.ledger.verify import anchor_path
from tabadol.ops.server import OpsServer, open_accounts
from tabadol.pki import CertificateAuthority
from tabadol.reports.quarter import TEHRAN, Quarter
from tests.conftest import TRUST_DOMAIN
from tests.support.browser import chromium, console_page
from tests.support.echo import SERVICE as ECHO
from tests.support.echo import write_echo_contracts
from tests.support.ops import operator_bundle, running_ops
from tests.test_reports import write_tax_contracts

TAX = "tabadol.test.v1.Tax"
MS = 1_000_000  # nanoseconds
HOUR = 3600 * 1000 * MS
DAY = 24 * HOUR
DASHBOARD_SCREENSHOT = Path("/tmp/ops-dashboard.png")
REPORTS_SCREENSHOT = Path("/tmp/ops-reports.png")
DASHBOARD_API = "/api/tabadol/dashboard"
AGENCIES = {"nocr", "post", "tax"}

CONFIG = f"""
[broker]
listen = "127.0.0.1:0"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{{pki_dir}}"
contracts = ["contracts/echo.pb", "contracts/tax.pb"]

[ledger]
path = "ledger.db"

[[agency]]
id = "nocr"
name = "National Organization for Civil Registration"

[[agency]]
id = "post"
name = "Post"

[[agency]]
id = "tax"
name = "National Tax Administration"

[[service]]
name = "{ECHO}"
provider = "nocr"
endpoints = ["10.0.0.1:443"]

[[service]]
name = "{TAX}"
provider = "tax"
endpoints = ["10.0.0.2:443"]
"""


@dataclass(frozen=True)
class Call:
    consumer: str
    provider: str
    service: str
    method: str
    status: int  # gRPC status code
    ms: int


# Today: 8 calls, 2 of them errors (25%). post consumed 6, tax 2; nocr served 6, tax 2.
# Echo's durations 10..60 ms: nearest-rank p50 is the 3rd (30 ms), p95 and p99 the 6th (60 ms).
# Tax's 120 and 2000 ms: p50 is the 1st (120 ms), p95 and p99 the 2nd (2 s).
TODAY = [
    Call("post", "nocr", ECHO, "Unary", 0, 10),
    Call("post", "nocr", ECHO, "Unary", 0, 20),
    Call("post", "nocr", ECHO, "Unary", 0, 30),
    Call("post", "nocr", ECHO, "Unary", 0, 40),
    Call("tax", "nocr", ECHO, "Unary", 5, 50),
    Call("tax", "nocr", ECHO, "Unary", 0, 60),
    Call("post", "tax", TAX, "Pay", 0, 120),
    Call("post", "tax", TAX, "Assess", 14, 2000),
]
EARLIER_THIS_QUARTER = [Call("nocr", "tax", TAX, "Assess", 0, 80)] * 3
PREVIOUS_QUARTER = [Call("post", "nocr", ECHO, "Unary", 0, 15)] * 4


@dataclass(frozen=True)
class Ledger:
    """The configuration naming the ledger, and the figures the dashboard should show."""

    config: Path
    quarter: Quarter
    this_quarter: int
    all_time: int


def _record(n: int, at: int, call: Call) -> LedgerRecord:
    return LedgerRecord(
        start_ns=at, end_ns=at + call.ms * MS, trace_id="", request_id=f"req-{n}",
        consumer=call.consumer, provider=call.provider, service=call.service,
        method=call.method, kind="unary", status_code=call.status, request_bytes=10,
        request_messages=1, response_bytes=20, response_messages=1,
        endpoint="10.0.0.1:443", broker_instance="b1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority) -> Ledger:
    directory = tmp_path_factory.mktemp("exchange")
    (directory / "contracts").mkdir()
    write_echo_contracts(directory / "contracts" / "echo.pb")
    write_tax_contracts(directory / "contracts" / "tax.pb")
    config = directory / "broker.toml"
    config.write_text(CONFIG.format(pki_dir=pki.dir), encoding="utf-8")

    now = time.time_ns()
    quarter = Quarter.containing(dt.datetime.fromtimestamp(now / 1e9, dt.UTC))
    midnight = dt.datetime.fromtimestamp(now / 1e9, TEHRAN).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    # A few seconds ago, but never before Tehran's midnight: all of it must count as today.
    today = max(now - 5000 * MS, int(midnight.timestamp()) * 1_000_000_000)
    placed = [(today + i * 100 * MS, c) for i, c in enumerate(TODAY)]
    if now - quarter.start_ns > DAY:
        placed += [
            (quarter.start_ns + HOUR + i * MS, c) for i, c in enumerate(EARLIER_THIS_QUARTER)
        ]
    previous = quarter.previous().start_ns + DAY
    placed += [(previous + i * MS, c) for i, c in enumerate(PREVIOUS_QUARTER)]

    sealer = Sealer((pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes())
    path = directory / "ledger.db"
    writer = LedgerWriter(SqliteLedgerStore(path), sealer, anchor=anchor_path(path))
    for n, (at, call) in enumerate(placed, start=1):
        writer.submit(_record(n, at, call))
    writer.close()
    return Ledger(
        config=config,
        quarter=quarter,
        this_quarter=len(placed) - len(PREVIOUS_QUARTER),
        all_time=len(placed),
    )


@pytest.fixture(scope="module")
async def ops(
    tmp_path_factory: pytest.TempPathFactory, ledger: Ledger, pki: CertificateAuthority
) -> AsyncIterator[OpsServer]:
    accounts = open_accounts(ledger.config)
    async with running_ops(tmp_path_factory.mktemp("ops"), pki, accounts) as server:
        yield server


@pytest.fixture(scope="module")
async def no_ledger_ops(
    tmp_path_factory: pytest.TempPathFactory, pki: CertificateAuthority
) -> AsyncIterator[OpsServer]:
    """A viewer shown no ledger: it has spans but no dashboard."""
    async with running_ops(tmp_path_factory.mktemp("no-ledger"), pki) as server:
        yield server


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


@pytest.fixture
async def page(browser: Browser, ops: OpsServer, pki: CertificateAuthority) -> AsyncIterator[Page]:
    """A browser on the console, logged in with the tests' operator's client certificate."""
    async with console_page(browser, ops, operator_bundle(pki)) as opened:
        yield opened


def _tile(page: Page, label: str) -> Locator:
    return page.get_by_role("group", name=label, exact=True)


def _dashboard_requests(page: Page) -> list[str]:
    """The dashboard API calls the page makes from now on."""
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url) if r.url.endswith(DASHBOARD_API) else None)
    return seen


async def test_dashboard_tiles_show_todays_quarters_and_all_time_counts(
    page: Page, ledger: Ledger
) -> None:
    await page.goto("/search")
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Dashboard").click()
    await expect(page).to_have_url(re.compile(r"/dashboard$"))
    await expect(page.get_by_role("link", name="Dashboard")).to_have_attribute(
        "aria-current", "page"
    )
    await expect(page.get_by_role("heading", level=1)).to_have_text("Dashboard")

    expected = {
        "Transactions today": "8",
        f"Transactions in {ledger.quarter}": str(ledger.this_quarter),
        "Transactions all time": str(ledger.all_time),
        "Agencies registered": "3",
        "Agencies active today": "3",
        "Error rate today": "25%",
        "Refused before identification today": "0",
        "From agencies not in the registry today": "0",
    }
    for label, value in expected.items():
        await expect(_tile(page, label).locator(".tile-value")).to_have_text(value)
    await expect(_tile(page, f"Transactions in {ledger.quarter}")).to_contain_text(
        ledger.quarter.period
    )
    await expect(page.locator(".banner")).to_be_hidden()

    # Generated on the server just now: local time shown, UTC on hover.
    updated = page.locator(".updated time")
    await expect(updated).to_have_attribute("title", re.compile(r"^\d{4}-\d\d-\d\d .* UTC$"))


async def test_top_agencies_are_ranked_by_calls_with_proportional_bars(page: Page) -> None:
    await page.goto("/dashboard")
    consumers = page.get_by_role("list", name="Top consumers today").get_by_role("listitem")
    await expect(consumers).to_have_text(
        [re.compile(r"^post\s*6 calls$"), re.compile(r"^tax\s*2 calls$")]
    )
    providers = page.get_by_role("list", name="Top providers today").get_by_role("listitem")
    await expect(providers).to_have_text(
        [re.compile(r"^nocr\s*6 calls$"), re.compile(r"^tax\s*2 calls$")]
    )
    top = await consumers.nth(0).locator(".top-bar > span").bounding_box()
    second = await consumers.nth(1).locator(".top-bar > span").bounding_box()
    assert top is not None and second is not None
    assert second["width"] / top["width"] == pytest.approx(2 / 6, rel=0.02)


async def test_latency_table_has_a_row_per_service_with_humanised_percentiles(
    page: Page,
) -> None:
    await page.goto("/dashboard")
    table = page.get_by_role("table", name="Latency by service today")
    rows = table.locator("tbody tr")
    await expect(rows).to_have_count(2)
    expected = {ECHO: ["6", "30ms", "60ms", "60ms"], TAX: ["2", "120ms", "2s", "2s"]}
    for service, cells in expected.items():
        row = rows.filter(has=page.get_by_role("rowheader", name=service, exact=True))
        await expect(row.get_by_role("cell")).to_have_text(cells)
    await page.screenshot(path=str(DASHBOARD_SCREENSHOT), full_page=True)


async def test_dashboard_refreshes_every_30_seconds_until_you_leave(page: Page) -> None:
    await page.clock.install()
    requests = _dashboard_requests(page)
    await page.goto("/dashboard")
    await expect(_tile(page, "Transactions today").locator(".tile-value")).to_have_text("8")
    assert len(requests) == 1

    async with page.expect_response(DASHBOARD_API):
        await page.clock.run_for(30_000)
    async with page.expect_response(DASHBOARD_API):
        await page.get_by_role("button", name="Refresh").click()
    await expect(_tile(page, "Transactions today").locator(".tile-value")).to_have_text("8")
    assert len(requests) == 3

    # Leaving the page (client-side, so the old page's timer would survive) stops the refreshes.
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Reports").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Quarterly reports")
    await page.clock.run_for(120_000)
    # A round trip to the server after the timers would have fired: any refresh was sent by now.
    await page.evaluate("fetch('/api/tabadol/reports')")
    assert len(requests) == 3


async def test_reports_list_the_current_quarter_and_open_its_html_report(
    page: Page, ledger: Ledger
) -> None:
    quarter = str(ledger.quarter)
    await page.goto("/reports")
    rows = page.locator(".reports-table tbody tr")
    await expect(rows).to_have_count(8)
    current = rows.first
    await expect(current.get_by_role("rowheader")).to_have_text(
        re.compile(f"^{quarter}\\s*current$")
    )
    await expect(current).to_contain_text(ledger.quarter.months)
    await expect(current).to_contain_text(ledger.quarter.period)
    await expect(rows.nth(1).get_by_role("rowheader")).to_have_text(str(ledger.quarter.previous()))

    csv_link = current.get_by_role("link", name="CSV")
    await expect(csv_link).to_have_attribute("href", f"/reports/quarterly-{quarter}.csv")
    await expect(current.get_by_role("link", name="JSON")).to_have_attribute(
        "href", f"/reports/quarterly-{quarter}.json"
    )
    await page.screenshot(path=str(REPORTS_SCREENSHOT), full_page=True)
    async with page.expect_download() as started:
        await csv_link.click()
    download = await started.value
    assert download.suggested_filename == f"quarterly-{quarter}.csv"
    text = await asyncio.to_thread(Path(await download.path()).read_text, encoding="utf-8")
    assert {row["agency_id"] for row in csv.DictReader(io.StringIO(text))} == AGENCIES

    # The report is the server's own page, loaded whole: not a route of the viewer.
    await current.get_by_role("link", name="Open report").click()
    await expect(page).to_have_url(re.compile(f"/reports/quarterly-{quarter}\\.html$"))
    await expect(page).to_have_title(re.compile(quarter))
    await expect(page.get_by_role("heading", level=1)).to_contain_text(quarter)
    await expect(page.locator(".topbar")).to_have_count(0)


async def test_without_a_ledger_the_pages_say_to_start_with_a_config(
    browser: Browser, no_ledger_ops: OpsServer, pki: CertificateAuthority
) -> None:
    async with console_page(browser, no_ledger_ops, operator_bundle(pki)) as page:
        await _say_to_start_with_a_config(page, no_ledger_ops)


async def _say_to_start_with_a_config(page: Page, no_ledger_ops: OpsServer) -> None:
    for path, heading in (("/dashboard", "Dashboard"), ("/reports", "Quarterly reports")):
        await page.goto(f"{no_ledger_ops.http_url}{path}")
        await expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        notice = page.locator(".no-ledger")
        await expect(notice).to_contain_text("No ledger to read")
        await expect(notice).to_contain_text("This trace viewer has no ledger")
        await expect(notice.locator("code")).to_have_text("tabadol ops --config broker.toml")
        await expect(page.locator(".banner")).to_be_hidden()
        await expect(page.get_by_role("table")).to_have_count(0)
