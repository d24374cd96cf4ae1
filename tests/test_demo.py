"""`tabadol demo` runs the whole exchange, and the call it suggests works as printed."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
from pathlib import Path

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
    # The PKI it made keeps private keys private.
    for key in (tmp_path / "var" / "pki").rglob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key
