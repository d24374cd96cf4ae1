"""Scraping the broker's ``/metrics``: HTTPS, with an operator's certificate, as Prometheus does."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.ops import tls_context

SCRAPER = "prometheus"  # the operator the tests' PKI issues for scraping (tests/conftest.py)


def scrape(url: str, pki_dir: Path, bundle: Path | None = None) -> str:
    """The text of a ``/metrics`` scrape as ``bundle`` (operators/prometheus by default);
    an HTTP error status raises."""
    verify = tls_context(pki_dir / "ca.crt", bundle or pki_dir / "operators" / SCRAPER)
    response = httpx.get(url, verify=verify, timeout=10)
    response.raise_for_status()
    return response.text


async def scrape_async(url: str, pki_dir: Path, bundle: Path | None = None) -> str:
    """``scrape``, without holding up the event loop."""
    verify = tls_context(pki_dir / "ca.crt", bundle or pki_dir / "operators" / SCRAPER)
    async with httpx.AsyncClient(verify=verify, timeout=10) as client:
        response = await client.get(url)
    response.raise_for_status()
    return response.text
