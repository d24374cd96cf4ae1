"""`tabadol demo` runs the whole exchange on a SQLite registry, the call it suggests works as
printed, and the access request it leaves for the newcomer, once approved, lets the call
it was refused through."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import ssl
from pathlib import Path
from typing import Any

import httpx

from tabadol import config
from tabadol.client import connect
from tabadol.demo import GRANTS, REQUEST, demo_entries, moved_providers
from tabadol.demo_agencies import SERVICES
from tabadol.platform.v1 import access_pb2, access_pb2_grpc
from tabadol.registry.store.sqlite import SqliteRegistryStore
from tests.support.processes import ROOT, TABADOL, Process


def _demo(var: Path) -> list[str]:
    """`tabadol demo` on ``var``, every port the system's choice."""
    ports = ("--listen", "--ops-http", "--ops-otlp", "--metrics-listen", "--gateway-listen")
    return [
        str(TABADOL),
        "demo",
        "--dir",
        str(var),
        *(a for p in ports for a in (p, "127.0.0.1:0")),
    ]


async def test_demo_sends_traffic_its_printed_calls_and_access_request_work_and_it_reruns(
    tmp_path: Path,
) -> None:
    demo = await Process.start(*_demo(tmp_path / "var"), read="stdout")
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
        await _the_printed_curl_line_gets_the_person_over_rest(demo.lines, person)

        await _login_link_opens_an_operator_session(output, tmp_path / "var" / "pki")
        await _the_pending_request_once_approved_lets_cra_call(output, tmp_path / "var")

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
    assert "OK: 11 records" in out.decode()  # the traffic, the example calls and cra's
    # The PKI it made keeps private keys private, and the span store is private too.
    for key in (tmp_path / "var" / "pki").rglob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key
    for data in (tmp_path / "var" / "ops").glob("traces.db*"):
        assert data.stat().st_mode & 0o077 == 0, data
    # Certificates to log in with, besides the link: an operator's and an auditor's.
    for bundle in ("operators/demo/operator.crt", "auditors/demo/auditor.crt", "ops.crt"):
        assert (tmp_path / "var" / "pki" / bundle).exists(), bundle
    await _a_second_run_keeps_the_registry_as_left(tmp_path / "var")


async def _the_printed_curl_line_gets_the_person_over_rest(
    lines: list[str], person: dict[str, Any]
) -> None:
    """The curl line works as printed: the post's certificate, the broker verified by the
    name dialed, and the same person over REST/JSON as over gRPC."""
    line = next(line.strip() for line in lines if line.strip().startswith("curl "))
    assert "https://localhost:" in line and "/v1/people/" in line
    assert "--insecure" not in line and " -k " not in line
    curl = await asyncio.create_subprocess_exec(
        *shlex.split(line), "--silent", "--show-error", "--write-out", "\n%{http_code}",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await curl.communicate()
    assert curl.returncode == 0, stderr
    body, _, status = stdout.decode().rpartition("\n")
    assert status == "200", body
    assert json.loads(body) == person


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


async def _the_pending_request_once_approved_lets_cra_call(output: str, var: Path) -> None:
    """The registry is the SQLite one beside the configuration, written first by the demo
    and then by cra through the Access service; post approves, and cra's call works."""
    cfg = config.load(var / "demo.toml")
    assert cfg.registry.url == f"sqlite:///{var / 'registry.db'}"
    assert not cfg.grants  # the entries are in the database, not the file
    assert f"registry     {var / 'registry.db'}  (audit trail: " in output
    store = SqliteRegistryStore(var / "registry.db")
    try:
        first, asked = store.history()
    finally:
        store.close()
    assert first.created_by == "tabadol demo" and first.reason
    assert len(first.entries["grant"]) == len(GRANTS)
    assert all(g["purpose"] and g["purpose_reference"] for g in first.entries["grant"])
    assert asked.created_by == "spiffe://tabadol.example/agency/cra"
    assert asked.reason.startswith("request ")

    consumer, provider, method, purpose, reference = REQUEST
    broker = re.search(r"broker\s+(\S+)", output)
    assert broker, output
    async with connect(broker[1], var / "pki" / "agencies" / provider) as channel:
        access = access_pb2_grpc.AccessStub(channel)
        [request] = (
            await access.ListRequests(access_pb2.ListRequestsRequest(), timeout=10)
        ).requests
        assert (request.consumer, request.provider, list(request.methods)) == (
            consumer, provider, [method],
        )  # fmt: skip
        assert (request.purpose.text, request.purpose.reference) == (purpose, reference)
        assert request.state == access_pb2.REQUEST_STATE_PENDING
        assert request.requested_by == f"spiffe://tabadol.example/agency/{consumer}"
        # The commands printed for the newcomer name this request and post's credentials,
        # and work as printed.
        printed = [line.strip() for line in output.splitlines() if "tabadol access " in line]
        assert [shlex.split(line)[2:4] for line in printed] == [
            ["list", "requests"], ["approve", request.id],
        ]  # fmt: skip
        assert all(f"--credentials {var / 'pki' / 'agencies' / provider}" in c for c in printed)
        for command in printed:
            run = await asyncio.create_subprocess_exec(
                *shlex.split(command), cwd=ROOT, stdout=asyncio.subprocess.PIPE
            )
            said, _ = await run.communicate()
            assert run.returncode == 0, said
            assert request.id in said.decode()
        [approved] = (
            await access.ListRequests(access_pb2.ListRequestsRequest(), timeout=10)
        ).requests
        assert approved.state == access_pb2.REQUEST_STATE_APPROVED
        assert approved.decided_by == f"spiffe://tabadol.example/agency/{provider}"

    as_cra = next(
        line.strip() for line in output.splitlines() if "tabadol call " in line and "/cra " in line
    )
    call = await asyncio.create_subprocess_exec(
        *shlex.split(as_cra), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await call.communicate()
    assert call.returncode == 0
    addresses = _json_values(stdout.decode())
    assert [a["province"] for a in addresses] == ["Tehran"] * 3


async def _a_second_run_keeps_the_registry_as_left(var: Path) -> None:
    """Run again on the same directory: the providers move to new ports in a version of the
    demo's own, cra's approved grant still admits its call, and no new request is made."""
    again = await Process.start(*_demo(var), "--once", read="stdout")
    try:
        assert await again.exit_status() == 0
    finally:
        await again.stop()
    output = "".join(again.lines)
    assert "OK                cra  -> post ListAddresses, granted on request" in output
    assert "tabadol access " not in output
    assert "was approved on an earlier run (grant g-" in output
    store = SqliteRegistryStore(var / "registry.db")
    try:
        *_, newest = store.history()
    finally:
        store.close()
    assert (newest.created_by, newest.reason) == (
        "tabadol demo", "the demo's providers started on new ports",
    )  # fmt: skip
    assert len(newest.entries["request"]) == 1
    assert len(newest.entries["grant"]) == len(GRANTS) + 1


async def test_a_request_still_open_is_not_asked_again(tmp_path: Path) -> None:
    printed = []
    for _ in range(2):
        demo = await Process.start(*_demo(tmp_path / "var"), "--once", read="stdout")
        try:
            assert await demo.exit_status() == 0
        finally:
            await demo.stop()
        printed += [shlex.split(line)[3] for line in demo.lines if "tabadol access approve" in line]
    store = SqliteRegistryStore(tmp_path / "var" / "registry.db")
    try:
        current = store.current()
    finally:
        store.close()
    assert current is not None
    [request] = current.entries["request"]
    assert printed == [request["id"]] * 2


def test_a_later_run_moves_only_the_demo_providers() -> None:
    first = demo_entries({agency: "127.0.0.1:1000" for agency in SERVICES})
    assert moved_providers(first, {agency: "127.0.0.1:1000" for agency in SERVICES}) is None
    moved = moved_providers(first, {agency: "127.0.0.1:2000" for agency in SERVICES})
    assert moved is not None
    assert {s.endpoints[0] for s in moved.service} == {"127.0.0.1:2000"}
    assert (moved.agency, moved.grant) == (first.agency, first.grant)


def _json_values(text: str) -> list[Any]:
    """The JSON values `tabadol call` printed, one per response, each over several lines."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        value, at = decoder.raw_decode(text, len(text) - len(text[at:].lstrip()))
        values.append(value)
    return values
