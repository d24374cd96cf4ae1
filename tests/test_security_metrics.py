"""The broker's /metrics, as an attacker sees it: HTTPS, and only operators and auditors read.

Its series name every agency, service and method and how often they trade; whoever reaches
the port must not read them without a platform certificate of an operator or an auditor.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN, RunningProvider, start_broker
from tests.support.metrics import SCRAPER
from tests.support.ops import tls_context
from tests.test_workers import two_workers, write_config

SERIES = "tabadol_calls_in_flight"
# How a refused handshake reaches an HTTPS client: with TLS 1.3 the server's alert may come
# only once the client reads, and httpx then raises the ssl module's own error.
HANDSHAKE_REFUSED = (httpx.TransportError, ssl.SSLError)


async def get(port: int, pki_dir: Path, bundle: Path | None) -> httpx.Response:
    """GET /metrics presenting ``bundle``'s certificate (None: no certificate at all)."""
    verify = tls_context(pki_dir / "ca.crt", bundle)
    async with httpx.AsyncClient(verify=verify, timeout=10) as client:
        return await client.get(f"https://127.0.0.1:{port}/metrics")


@pytest.fixture
def own_ca(tmp_path: Path, pki: CertificateAuthority) -> CertificateAuthority:
    """The session's CA in a directory of the test's own: its revocations stay there."""
    return CertificateAuthority(Path(shutil.copytree(pki.dir, tmp_path / "pki")))


@pytest.fixture
async def own_broker(
    tmp_path: Path,
    own_ca: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> AsyncIterator[Broker]:
    """A broker of ``own_ca``, its configuration in ``tmp_path / "broker.toml"``."""
    broker = await start_broker(tmp_path, own_ca.dir, echo_contracts, [echo_provider.address])
    yield broker
    await broker.stop(0)


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> str:
    """The first log line holding ``text``; the server may write it just after answering."""
    async with asyncio.timeout(10):
        while True:
            for record in caplog.records:
                if text in record.getMessage():
                    return record.getMessage()
            await asyncio.sleep(0.01)  # a bounded poll: the line comes from another thread


async def test_a_client_without_a_platform_certificate_fails_the_tls_handshake(
    broker: Broker, pki: CertificateAuthority, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(HANDSHAKE_REFUSED):
        await get(broker.metrics.port, pki.dir, None)
    assert "refused a TLS handshake from 127.0.0.1" in await logged(caplog, "metrics: refused")

    # A look-alike operator certificate from a CA of the attacker's own, same trust domain.
    rogue = CertificateAuthority.init(tmp_path / "rogue", TRUST_DOMAIN)
    with pytest.raises(HANDSHAKE_REFUSED):
        await get(broker.metrics.port, pki.dir, rogue.issue_person("operator", "eve"))

    # Plain HTTP, as the port answered before.
    async with httpx.AsyncClient(timeout=10) as client:
        with pytest.raises(HANDSHAKE_REFUSED):
            await client.get(f"http://127.0.0.1:{broker.metrics.port}/metrics")


@pytest.mark.parametrize("bundle", ["agencies/post", "broker"])
async def test_an_agency_or_the_broker_certificate_is_forbidden(
    broker: Broker, pki: CertificateAuthority, caplog: pytest.LogCaptureFixture, bundle: str
) -> None:
    if bundle == "broker":  # the broker's own key, should it leak from a worker host
        ssl_context = tls_context(pki.dir / "ca.crt")
        ssl_context.load_cert_chain(pki.dir / "broker.crt", pki.dir / "broker.key")
        async with httpx.AsyncClient(verify=ssl_context, timeout=10) as client:
            refused = await client.get(f"https://127.0.0.1:{broker.metrics.port}/metrics")
        who = "the broker"
    else:
        refused = await get(broker.metrics.port, pki.dir, pki.dir / bundle)
        who = "agency 'post'"
    assert refused.status_code == 403
    assert SERIES not in refused.text
    assert f"{who} may not read the broker's metrics" in refused.text
    line = await logged(caplog, f"{who} may not read")
    assert "metrics: refused a scrape from 127.0.0.1 (403 Forbidden)" in line


async def test_refused_scrapes_are_logged_once_per_interval_not_once_each(
    broker: Broker, pki: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(20):
        assert (
            await get(broker.metrics.port, pki.dir, pki.dir / "agencies" / "cra")
        ).status_code == 403
    await logged(caplog, "agency 'cra' may not read")
    lines = [r.getMessage() for r in caplog.records if "agency 'cra'" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize("role", ["operator", "auditor"])
async def test_operators_and_auditors_read_the_series(
    broker: Broker, pki: CertificateAuthority, role: str
) -> None:
    bundle = pki.dir / f"{role}s" / f"reader-{role}"
    if not bundle.exists():
        pki.issue_person(role, f"reader-{role}")
    answer = await get(broker.metrics.port, pki.dir, bundle)
    assert answer.status_code == 200
    assert SERIES in answer.text


async def test_a_revoked_operator_is_refused_once_the_broker_reloads(
    tmp_path: Path,
    own_ca: CertificateAuthority,
    own_broker: Broker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca, port = own_ca, own_broker.metrics.port
    mallory = ca.issue_person("operator", "mallory")
    assert (await get(port, ca.dir, mallory)).status_code == 200
    ca.revoke_person("operator", "mallory")
    own_broker.reload(config.load(tmp_path / "broker.toml"))

    refused = await get(port, ca.dir, mallory)
    assert refused.status_code == 401
    assert "revoked" in refused.text
    assert SERIES not in refused.text
    assert "(401 Unauthorized)" in await logged(caplog, "operator 'mallory' has been revoked")
    # Everyone else reads on.
    assert (await get(port, ca.dir, ca.dir / "operators" / SCRAPER)).status_code == 200


async def test_a_new_broker_certificate_serves_the_metrics_once_the_broker_reloads(
    tmp_path: Path, own_ca: CertificateAuthority, own_broker: Broker
) -> None:
    own_ca.issue_broker(force=True)  # the old one is revoked as superseded
    own_broker.reload(config.load(tmp_path / "broker.toml"))
    context = tls_context(own_ca.dir / "ca.crt", own_ca.dir / "operators" / SCRAPER)
    _, writer = await asyncio.open_connection("127.0.0.1", own_broker.metrics.port, ssl=context)
    served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    assert served == ssl.PEM_cert_to_DER_cert((own_ca.dir / "broker.crt").read_text())


async def test_the_supervisors_metrics_admit_only_operators_and_auditors_and_follow_its_reloads(
    tmp_path: Path,
    own_ca: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> None:
    ca = own_ca
    trudy = ca.issue_person("auditor", "trudy")
    broker_config, _, port = write_config(tmp_path, ca, echo_contracts, echo_provider.address)
    async with two_workers(broker_config) as supervisor:
        with pytest.raises(HANDSHAKE_REFUSED):
            await get(port, ca.dir, None)
        assert (await get(port, ca.dir, ca.dir / "agencies" / "post")).status_code == 403
        answer = await get(port, ca.dir, trudy)
        assert answer.status_code == 200
        assert SERIES in answer.text

        ca.revoke_person("auditor", "trudy")
        supervisor.proc.send_signal(signal.SIGHUP)
        await supervisor.wait_for(r"configuration checked; asking 2 workers to reload")
        refused = await get(port, ca.dir, trudy)
        assert refused.status_code == 401
        assert "revoked" in refused.text
        await supervisor.wait_for(r"metrics: refused a scrape from 127\.0\.0\.1 \(401")
