"""The quarterly report page in a real Chromium, opened from disk: charts drawn, flags visible.

The page is the one ``write_quarterly`` writes for the hand-computed fixture of
tests/test_reports.py (nocr, tax, cra, post in rank order; tax, cra and post behind target).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, FloatRect, Locator, Page

from tabadol.reports import QuarterlyReport, write_quarterly
from tests.support.browser import chromium
from tests.test_reports import fixture_report

SCREENSHOT = Path("/tmp/report.png")
AGENCIES = 4
CHART_SERIES = {
    "chart-transactions": ("served", "consumed"),
    "chart-e-service-share": ("share",),
    "chart-visit-reduction": ("reduction",),
    "chart-latency": ("p50", "p95"),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> QuarterlyReport:
    return fixture_report(tmp_path_factory.mktemp("fixture"))


@pytest.fixture(scope="module")
def html_file(report: QuarterlyReport, tmp_path_factory: pytest.TempPathFactory) -> Path:
    html, *_ = write_quarterly(report, tmp_path_factory.mktemp("out"))
    return html


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


@pytest.fixture
async def page(browser: Browser, html_file: Path) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    requests: list[str] = []
    opened.on("request", lambda request: requests.append(request.url))
    await opened.goto(html_file.as_uri())
    yield opened
    await context.close()
    assert requests == [html_file.as_uri()], "the page fetched something besides itself"


async def _box(locator: Locator) -> FloatRect:
    box = await locator.bounding_box()
    assert box is not None, f"{locator} is not rendered"
    return box


def _bar(page: Page, chart: str, series: str, agency: str) -> Locator:
    return page.locator(f'#{chart} rect.bar.{series}[data-agency="{agency}"]')


async def test_every_chart_draws_one_bar_per_agency_for_each_series(page: Page) -> None:
    for chart, series in CHART_SERIES.items():
        for key in series:
            bars = page.locator(f"#{chart} rect.bar.{key}")
            assert await bars.count() == AGENCIES, f"{chart} {key}"


async def test_bars_with_a_figure_have_a_size_and_are_proportional(page: Page) -> None:
    served = {
        agency: await _box(_bar(page, "chart-transactions", "served", agency))
        for agency in ("nocr", "tax")
    }
    consumed = await _box(_bar(page, "chart-transactions", "consumed", "post"))
    for box in (*served.values(), consumed):
        assert box["width"] > 0
        assert box["height"] > 0
    # nocr served 8 (the broker refused two more), tax 8, post consumed 16.
    assert served["nocr"]["width"] / served["tax"]["width"] == pytest.approx(8 / 8, rel=0.02)
    assert consumed["width"] / served["nocr"]["width"] == pytest.approx(16 / 8, rel=0.02)

    for chart, key, agency in [
        ("chart-e-service-share", "share", "nocr"),
        ("chart-e-service-share", "share", "tax"),
        ("chart-visit-reduction", "reduction", "nocr"),
        ("chart-visit-reduction", "reduction", "tax"),
        ("chart-latency", "p50", "nocr"),
        ("chart-latency", "p95", "tax"),
    ]:
        box = await _box(_bar(page, chart, key, agency))
        assert box["width"] > 0 and box["height"] > 0, f"{chart} {agency}"


async def test_agencies_without_a_figure_get_an_empty_bar_and_say_so(page: Page) -> None:
    missing = page.locator("#chart-e-service-share rect.bar.missing")
    assert await missing.count() == 1
    assert await missing.get_attribute("data-agency") == "post"
    assert await missing.get_attribute("width") == "0"
    values = await page.locator("#chart-e-service-share text.value").all_text_contents()
    assert "no data" in values
    latency = await page.locator("#chart-latency text.value").all_text_contents()
    assert latency.count("no answered calls") == 2  # cra and post serve nothing


async def test_target_lines_are_drawn_where_the_targets_are(page: Page) -> None:
    for chart in ("chart-e-service-share", "chart-visit-reduction"):
        line = page.locator(f"#{chart} > line.target")
        assert await line.count() == 1, chart
        assert (await _box(line))["height"] > 0
    # nocr's share is exactly 100% and tax's reduction exactly 12%: their bars end on the line.
    for chart, key, agency in [
        ("chart-e-service-share", "share", "nocr"),
        ("chart-visit-reduction", "reduction", "tax"),
    ]:
        bar = await _box(_bar(page, chart, key, agency))
        target = await _box(page.locator(f"#{chart} > line.target"))
        assert bar["x"] + bar["width"] == pytest.approx(target["x"] + target["width"] / 2, abs=1)


async def test_agencies_behind_target_are_marked_in_the_table_and_the_charts(page: Page) -> None:
    rows = page.locator("table.indicators tbody tr")
    assert [await r.get_attribute("data-agency") for r in await rows.all()] == [
        "nocr",
        "tax",
        "cra",
        "post",
    ]
    behind = page.locator("table.indicators tr.behind")
    assert sorted([await r.get_attribute("data-agency") or "" for r in await behind.all()]) == [
        "cra",
        "post",
        "tax",
    ]
    assert await page.locator("tr.behind .flag.behind").count() == 3
    assert await page.locator('tr.met[data-agency="nocr"] .flag.met').count() == 1
    assert "below the 100% target" in await rows.nth(1).inner_text()

    # In the share chart: tax and cra are below 100% (post has no figure), nocr meets it.
    share_behind = page.locator("#chart-e-service-share rect.bar.behind")
    assert sorted(
        [await b.get_attribute("data-agency") or "" for b in await share_behind.all()]
    ) == [
        "cra",
        "tax",
    ]
    marks = page.locator("#chart-e-service-share .behind-mark")
    assert await marks.count() == 3  # tax, cra, post

    met_fill = await _bar(page, "chart-e-service-share", "share", "nocr").evaluate(
        "e => getComputedStyle(e).fill"
    )
    behind_fill = await _bar(page, "chart-e-service-share", "share", "tax").evaluate(
        "e => getComputedStyle(e).fill"
    )
    assert met_fill != behind_fill
    row_colour = await page.locator('tr[data-agency="tax"].behind').evaluate(
        "e => getComputedStyle(e).backgroundColor"
    )
    assert row_colour not in ("rgba(0, 0, 0, 0)", "transparent")


async def test_the_page_shows_escaped_names_and_both_calendars(page: Page) -> None:
    heading = await page.locator("h1").inner_text()
    assert "1405-Q3" in heading
    period = await page.locator(".period").inner_text()
    assert "1405/07/01 (2026-09-23)" in period
    assert "1405/09/30 (2026-12-21)" in period
    # The name with markup characters is shown as text, not parsed as markup.
    names = await page.locator("table.indicators .name").all_inner_texts()
    assert 'Post <&> "Parcels"' in names


async def test_the_whole_page_renders_to_a_screenshot_for_review(page: Page) -> None:
    image = await page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert image.startswith(b"\x89PNG")
