"""The access loop in a real Chromium, each agency signed in with its own client
certificate: the consumer asks on the Access page, the provider approves there, the
consumer's call through a real broker succeeds, the provider revokes with a reason, and the
call is refused. The broker and the console share one registry (a SQLite file); the broker
follows it within its poll_seconds. Also: what an auditor sees, and a registry kept in the
configuration file refusing a change in words the page shows as they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from playwright.async_api import Browser, Page, expect

from tabadol import config
from tabadol.broker import Broker
from tabadol.client import connect
from tabadol.ops.server import OpsServer
from tabadol.pki import CertificateAuthority
from tabadol.registry.current import load_current
from tests.conftest import RunningProvider, broker_toml
from tests.support.browser import chromium, console_page
from tests.support.echo import SERVICE, UNARY
from tests.support.exchange import eventually
from tests.support.ops import AUDITOR, operator_bundle, person_bundle, running_ops
from tests.support.registry import (
    imported_registry,
    registry_toml,
)

PURPOSE = "Verifying a citizen's identity"
REASON = "The data-sharing agreement ended"


@dataclass
class Exchange:
    broker: Broker
    console: OpsServer
    pki: CertificateAuthority

    async def call(self, agency: str) -> grpc.StatusCode:
        """One unary call through the broker as ``agency``, with its own certificate."""
        channel = connect(f"127.0.0.1:{self.broker.port}", self.pki.dir / "agencies" / agency)
        try:
            await channel.unary_unary(UNARY)(b"ping", timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
        finally:
            await channel.close()
        return grpc.StatusCode.OK

    async def answers(self, agency: str, expected: grpc.StatusCode) -> bool:
        return await self.call(agency) == expected


@pytest.fixture
async def exchange(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> AsyncIterator[Exchange]:
    url = f"sqlite:///{tmp_path}/registry.db"
    entries = registry_toml([echo_provider.address], grants="")
    path = imported_registry(tmp_path, pki.dir, echo_contracts, url, entries)
    broker = Broker(config.load(path))
    await broker.start()
    try:
        async with running_ops(tmp_path, pki) as console:
            console.show_exchange(load_current(path))
            yield Exchange(broker, console, pki)
    finally:
        await broker.stop(0)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


async def open_access(page: Page) -> None:
    await page.goto("/access")
    await expect(page.locator(".access-body")).not_to_have_attribute("aria-busy", "true")


async def test_request_approve_call_revoke_refused_in_the_browser(
    exchange: Exchange, browser: Browser
) -> None:
    pki, console = exchange.pki, exchange.console
    assert await exchange.call("nocr") == grpc.StatusCode.PERMISSION_DENIED

    # 1. The consumer asks, signed in with its certificate.
    async with console_page(browser, console, pki.dir / "agencies" / "nocr") as consumer:
        await open_access(consumer)
        await expect(consumer.locator("#whoami")).to_have_text("Logged in as agency 'nocr'")
        await expect(consumer.locator("[data-nav=access]")).to_be_visible()
        form = consumer.locator("form[data-form=request]")
        await form.locator("select[name=service]").select_option(SERVICE)
        await form.locator("input[name=methods]").fill("Unary")
        await form.locator("textarea[name=purpose]").fill(PURPOSE)
        await form.locator("input[name=reference]").fill("Civil Registry Act art. 4")
        await form.get_by_role("button", name="Send request").click()
        await expect(consumer.get_by_role("status")).to_contain_text("Sent: request r-")
        row = consumer.locator(".requests-table tbody tr")
        await expect(row).to_have_count(1)
        await expect(row).to_have_attribute("data-state", "pending")
        request = await row.get_attribute("data-request")
        assert request is not None
        # Its own request offers it no approval.
        await expect(row.locator("button[data-action=approve]")).to_have_count(0)
        await expect(row.locator("button[data-action=withdraw]")).to_have_count(1)

    # 2. The provider approves.
    async with console_page(browser, console, pki.dir / "agencies" / "echo") as provider:
        await open_access(provider)
        pending = provider.locator(f'.requests-table tr[data-request="{request}"]')
        await expect(pending).to_contain_text(PURPOSE)
        await pending.get_by_role("button", name=f"Approve request {request}").click()
        await expect(provider.get_by_role("status")).to_contain_text("Approve: done")
        await expect(pending).to_have_attribute("data-state", "approved")
        granted = provider.locator('.grants-table tr[data-consumer="nocr"]')
        await expect(granted).to_have_count(1)
        grant = await granted.get_attribute("data-grant")

        # 3. The consumer's call through the broker now succeeds.
        assert await eventually(lambda: exchange.answers("nocr", grpc.StatusCode.OK))

        # 4. The provider revokes, with a reason.
        await granted.get_by_role("button", name=f"Revoke grant {grant}").click()
        await granted.get_by_role("textbox").fill(REASON)
        await granted.get_by_role("button", name="Revoke", exact=True).click()
        await expect(provider.get_by_role("status")).to_contain_text("Revoke: done")
        await expect(provider.locator('.grants-table tr[data-consumer="nocr"]')).to_have_count(0)

    # 5. The call is refused, once the broker follows the registry.
    assert await eventually(lambda: exchange.answers("nocr", grpc.StatusCode.PERMISSION_DENIED))

    # An operator sees the whole story in the audit trail.
    async with console_page(browser, console, operator_bundle(pki)) as operator:
        await open_access(operator)
        newest = operator.locator(".audit-table tbody tr").first
        await expect(newest).to_contain_text(f"revoke grant {grant}")
        await expect(newest).to_contain_text(REASON)
        await expect(newest).to_contain_text("spiffe://tabadol.example/agency/echo")
        await expect(operator.locator(".audit-table tbody tr")).to_have_count(4)


async def test_a_refusal_is_shown_as_the_server_words_it(
    exchange: Exchange, browser: Browser
) -> None:
    async with console_page(
        browser, exchange.console, exchange.pki.dir / "agencies" / "nocr"
    ) as page:
        await open_access(page)
        form = page.locator("form[data-form=request]")
        await form.locator("select[name=service]").select_option(SERVICE)
        await form.locator("input[name=methods]").fill("NoSuchMethod")
        await form.locator("textarea[name=purpose]").fill(PURPOSE)
        await form.get_by_role("button", name="Send request").click()
        await expect(page.locator("#banner")).to_be_visible()
        await expect(page.locator("#banner .banner-message")).to_contain_text("NoSuchMethod")


async def test_an_auditor_sees_the_audit_trail_and_no_grants(
    exchange: Exchange, browser: Browser
) -> None:
    async with console_page(
        browser, exchange.console, person_bundle(exchange.pki, "auditor", AUDITOR)
    ) as page:
        await open_access(page)
        await expect(page.locator(".audit-table tbody tr")).to_have_count(1)
        await expect(page.locator(".audit-table")).to_contain_text("the first registry")
        await expect(page.locator(".requests-table, .grants-table, form")).to_have_count(0)
        await expect(page.locator("#banner")).to_be_hidden()


async def test_with_the_registry_in_the_configuration_file_a_change_says_why_not(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, browser: Browser
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"],
                    grants="")
    )  # fmt: skip
    async with running_ops(tmp_path, pki) as console:
        console.show_exchange(config.load(path))
        async with console_page(browser, console, pki.dir / "agencies" / "nocr") as page:
            await open_access(page)
            await expect(page.locator(".read-only")).to_contain_text("configuration file")
            form = page.locator("form[data-form=request]")
            await form.locator("select[name=service]").select_option(SERVICE)
            await form.locator("input[name=methods]").fill("Unary")
            await form.locator("textarea[name=purpose]").fill(PURPOSE)
            await form.get_by_role("button", name="Send request").click()
            banner = page.locator("#banner .banner-message")
            await expect(banner).to_contain_text(
                f"this exchange's registry is its configuration file {path}, so changes are refused"
            )
            await expect(banner).to_contain_text("sqlite:///registry.db")
