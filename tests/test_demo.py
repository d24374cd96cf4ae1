"""`tabadol demo` runs the whole exchange, and the call it suggests works as printed."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import ssl
from pathlib import Path

import httpx

from tests.support.processes import ROOT, TABADOL, Process


async def test_demo_sends_every_kind_of_traffic_and_its_example_call_works(tmp_path: Path) -> None:
    demo = await Process.start(
        str(TABADOL),
        "demo",
        "--dir",
        str(tmp_path / "var"),
        "--listen",
        "127.0.0.1:0",
        read="stdout",
    )
    try:
        await demo.wait_for("Press Ctrl-C to stop")
        output = "".join(demo.lines)
        for kind in ("(unary)", "(bidi stream)", "(server stream)", "(client stream)"):
            assert any(line.strip().startswith("OK") and kind in line for line in demo.lines), kind
        assert "INVALID_ARGUMENT  post -> nocr InquirePerson with a bad check digit" in output
        assert "check digit" in output
        assert "PERMISSION_DENIED cra  -> post ListAddresses without a grant" in output

        example = next(line.strip() for line in demo.lines if "tabadol call " in line)
        call = await asyncio.create_subprocess_exec(
            *shlex.split(example), cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await call.communicate()
        assert call.returncode == 0
        person = json.loads(stdout)
        assert person["nationalId"] in example
        assert person["lifeStatus"] == "LIFE_STATUS_ALIVE"

        await _login_link_opens_an_operator_session(output, tmp_path / "var" / "pki")

        demo.proc.send_signal(signal.SIGINT)
        assert await demo.exit_status() == 0
    finally:
        await demo.stop()
    # Every exchange it made, the refused ones included, is in a ledger that verifies.
    check = await asyncio.create_subprocess_exec(
        str(TABADOL), "ledger", "verify", "--config", str(tmp_path / "var" / "demo.toml"),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await check.communicate()
    assert check.returncode == 0, out
    assert "OK: 9 records" in out.decode()
    # The PKI it made keeps private keys private, and the span store is private too.
    for key in (tmp_path / "var" / "pki").rglob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key
    for data in (tmp_path / "var" / "ops").glob("traces.db*"):
        assert data.stat().st_mode & 0o077 == 0, data
    # Certificates to log in with, besides the link: an operator's and an auditor's.
    for bundle in ("operators/demo/operator.crt", "auditors/demo/auditor.crt", "ops.crt"):
        assert (tmp_path / "var" / "pki" / bundle).exists(), bundle


async def _login_link_opens_an_operator_session(output: str, pki: Path) -> None:
    """The console line is a one-time login link; it works once, and nothing works without."""
    found = re.search(r"ops console\s+(https://\S+)/login\?token=(\S+)", output)
    assert found, output
    base, token = found[1], found[2]
    trust = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    async with httpx.AsyncClient(base_url=base, verify=trust) as browser:
        assert (await browser.get("/api/tabadol/whoami")).status_code == 401
        opened = await browser.get("/login", params={"token": token})
        assert opened.status_code == 303
        assert opened.headers["location"] == "/"
        # The cookie is Secure and the console is HTTPS, so the client sends it back.
        whoami = (await browser.get("/api/tabadol/whoami")).json()
        assert (whoami["role"], whoami["name"], whoami["via"]) == ("operator", "demo", "login link")
        assert (await browser.get("/api/tabadol/search")).status_code == 200
    async with httpx.AsyncClient(base_url=base, verify=trust) as stranger:
        assert (await stranger.get("/login", params={"token": token})).status_code == 401
