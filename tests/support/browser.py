"""Launch Debian's Chromium for browser tests; Playwright never downloads a browser here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tabadol.ops.server import OpsServer
from tests.support.ops import bundle_files

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Fail (never skip) with what to do when the system browser is not installed."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's Chromium. Run `make setup`.",
            pytrace=False,
        )


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium from the system, closed on exit."""
    require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def page_without_script_errors(
    browser: Browser, base_url: str, **context_options: Any
) -> AsyncIterator[Page]:
    """A fresh page on ``base_url`` (1280x900, downloads allowed); on exit, fails the test if
    any script on it raised. ``context_options`` go to Playwright's ``new_context``."""
    context = await browser.new_context(
        base_url=base_url,
        viewport={"width": 1280, "height": 900},
        accept_downloads=True,
        **context_options,
    )
    opened = await context.new_page()
    script_errors: list[str] = []
    opened.on("pageerror", lambda error: script_errors.append(str(error)))
    yield opened
    await context.close()
    assert not script_errors, f"the page raised script errors: {script_errors}"


def client_certificate_options(server: OpsServer, bundle: Path | None) -> dict[str, Any]:
    """Context options for a browser on the ops console: it accepts the console's
    certificate (from the platform CA, which Chromium does not know) and presents
    ``bundle``'s certificate, when given, as a person would from their browser."""
    options: dict[str, Any] = {"ignore_https_errors": True}
    if bundle is not None:
        cert, key = bundle_files(bundle)
        options["client_certificates"] = [
            {"origin": server.http_url, "certPath": str(cert), "keyPath": str(key)}
        ]
    return options


@asynccontextmanager
async def console_page(
    browser: Browser, server: OpsServer, bundle: Path | None
) -> AsyncIterator[Page]:
    """A page on the ops console logged in with ``bundle``'s client certificate (None: not
    logged in, e.g. to open a login link), failing the test on script errors."""
    options = client_certificate_options(server, bundle)
    async with page_without_script_errors(browser, server.http_url, **options) as page:
        yield page
