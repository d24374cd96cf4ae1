"""``tabadol access``: the whole access loop from the command line, as agencies and an
operator run it, against a real broker whose registry is an embedded SQLite database."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tabadol import cli, config
from tabadol.broker import Broker
from tabadol.pki import CertificateAuthority
from tests.conftest import TRUST_DOMAIN, RunningProvider
from tests.support.echo import SERVICE
from tests.support.registry import (
    imported_registry,
    registry_toml,
    tabadol,
)

OPERATOR = "leila"
PURPOSE = "Verifying a sender's identity for registered mail"
REFERENCE = "Postal Act art. 12"


class Exchange:
    """One broker on a SQLite registry, and the ``tabadol`` command run against it."""

    def __init__(self, broker: Broker, pki: CertificateAuthority, contracts: Path) -> None:
        self.broker, self.pki, self.contracts = broker, pki, contracts

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def credentials(self, who: str) -> Path:
        return self.pki.dir / ("operators/" + OPERATOR if who == "operator" else f"agencies/{who}")

    async def access(self, who: str, *argv: str) -> tuple[int, str, str]:
        """``tabadol access ACTION ...`` as agency ``who`` (or "operator"), in a thread: the
        command runs its own event loop while the broker serves in this one."""
        action, *rest = argv
        return await asyncio.to_thread(
            tabadol, "access", action, "--broker", self.address,
            "--credentials", str(self.credentials(who)), *rest,
        )  # fmt: skip

    async def call(self, agency: str) -> tuple[int, str, str]:
        body = json.dumps({"data": base64.b64encode(b"ping").decode()})
        return await asyncio.to_thread(
            tabadol, "call", "--broker", self.address, "--credentials",
            str(self.credentials(agency)), "--contracts", str(self.contracts),
            f"{SERVICE}/Unary", body,
        )  # fmt: skip


@pytest.fixture
async def exchange(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> AsyncIterator[Exchange]:
    pki.issue_person("operator", OPERATOR, force=True)
    url = f"sqlite:///{tmp_path}/registry.db"
    entries = registry_toml([echo_provider.address], grants="")  # nobody may call echo
    path = imported_registry(tmp_path, pki.dir, echo_contracts, url, entries, by="setup")
    broker = Broker(config.load(path))
    await broker.start()
    try:
        yield Exchange(broker, pki, echo_contracts)
    finally:
        await broker.stop(0)


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def test_request_approve_call_revoke_refuse_from_the_command_line(
    exchange: Exchange, echo_provider: RunningProvider
) -> None:
    # The consumer asks; --json is the broker's answer as proto3 JSON.
    code, out, err = await exchange.access(
        "nocr", "request", "--service", SERVICE, "--method", "Unary",
        "--purpose", PURPOSE, "--reference", REFERENCE, "--expires", "90d", "--json",
    )  # fmt: skip
    assert code == 0, err
    made = json.loads(out)["request"]
    assert made["state"] == "REQUEST_STATE_PENDING"
    assert (made["consumer"], made["provider"], made["methods"]) == ("nocr", "echo", ["Unary"])
    assert made["purpose"] == {"text": PURPOSE, "reference": REFERENCE}
    request_id = made["id"]

    # Before the grant, the broker refuses the call.
    code, _, err = await exchange.call("nocr")
    assert code == 1 and "PERMISSION_DENIED" in err

    # The provider sees it pending, and approves it.
    code, out, err = await exchange.access("echo", "list", "requests", "--state", "pending")
    assert code == 0, err
    assert f"{request_id}  pending  'nocr' asks 'echo' for Unary of {SERVICE}" in out
    assert f"purpose: {PURPOSE} ({REFERENCE})" in out
    for consumer, ids in (("nocr", [request_id]), ("post", [])):  # as text or JSON alike
        code, out, err = await exchange.access(
            "echo", "list", "requests", "--consumer", consumer, "--json"
        )
        assert code == 0, err
        assert [r["id"] for r in json.loads(out).get("requests", [])] == ids
    code, out, err = await exchange.access("echo", "approve", request_id)
    assert code == 0, err
    assert (
        out.startswith(f"approved request {request_id} as grant g-")
        and f"'nocr' may call Unary of {SERVICE}" in out
    )

    code, out, err = await exchange.access("echo", "list", "grants", "--json")
    assert code == 0, err
    (grant,) = json.loads(out)["grants"]
    assert (grant["consumer"], grant["requestId"]) == ("nocr", request_id)
    assert grant["grantedBy"] == f"spiffe://{TRUST_DOMAIN}/agency/echo"
    code, out, _ = await exchange.access("nocr", "list")  # the consumer sees it too
    assert grant["id"] in out and "GRANT" in out.splitlines()[0]

    # The call now succeeds, and the provider is told under which grant and purpose.
    code, out, err = await exchange.call("nocr")
    assert code == 0, err
    assert json.loads(out) == {"data": base64.b64encode(b"ping").decode()}
    seen = echo_provider.echo.calls[-1].metadata
    assert seen["x-tabadol-grant"] == grant["id"]
    assert urllib.parse.unquote(seen["x-tabadol-purpose"]) == REFERENCE

    # The provider revokes, with a reason; the next call is refused.
    code, out, err = await exchange.access(
        "echo", "revoke", grant["id"], "--reason", "the agreement ended"
    )
    assert code == 0, err
    assert out.startswith(f"revoked grant {grant['id']}")
    code, _, err = await exchange.call("nocr")
    assert code == 1
    assert "PERMISSION_DENIED" in err

    # The consumer's request shows what became of it.
    code, out, _ = await exchange.access("nocr", "list", "requests")
    assert f"{request_id}  approved" in out and f"grant: {grant['id']}" in out

    # The operator's audit trail names each actor, action and reason.
    code, out, err = await exchange.access("operator", "audit")
    assert code == 0, err
    versions = out.split("version ")[1:]
    assert [v.split()[0] for v in versions] == ["1", "2", "3", "4"]
    assert "setup" in versions[0] and "the first registry" in versions[0]
    assert f"spiffe://{TRUST_DOMAIN}/agency/nocr" in versions[1]
    assert f"request {request_id}" in versions[1] and PURPOSE in versions[1]
    assert f"spiffe://{TRUST_DOMAIN}/agency/echo" in versions[2]
    assert f"approve request {request_id}" in versions[2] and "+ [[grant]]" in versions[2]
    assert f"revoke grant {grant['id']}" in versions[3]
    assert "the agreement ended" in versions[3] and "- [[grant]]" in versions[3]

    code, out, err = await exchange.access("operator", "audit", "--after", "2", "--json")
    assert code == 0, err
    entries = json.loads(out)["entries"]
    assert [(e["version"], e["actor"]) for e in entries] == [
        ("3", f"spiffe://{TRUST_DOMAIN}/agency/echo"),  # uint64 is a string in proto3 JSON
        ("4", f"spiffe://{TRUST_DOMAIN}/agency/echo"),
    ]


async def test_a_consumer_approving_its_own_request_is_refused(exchange: Exchange) -> None:
    code, out, _ = await exchange.access(
        "nocr", "request", "--service", SERVICE, "--method", "*", "--purpose", PURPOSE, "--json"
    )
    request_id = json.loads(out)["request"]["id"]
    code, out, err = await exchange.access("nocr", "approve", request_id)
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith("tabadol: PERMISSION_DENIED: Tabadol broker: ")
    assert "only 'echo' (or an operator) may approve it" in line
    # Still pending; the agency that asked may withdraw it.
    code, out, err = await exchange.access("nocr", "withdraw", request_id, "--reason", "not needed")
    assert code == 0, err
    assert f"{request_id}  withdrawn" in out and "not needed" in out


async def test_a_revocation_without_a_reason_is_refused_before_reaching_the_broker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["access", "revoke", "g-1", "--broker", "127.0.0.1:1", "--credentials", "x"])
    assert e.value.code == 2
    assert "the following arguments are required: --reason" in capsys.readouterr().err


async def test_operators_onboard_set_limits_and_retire(exchange: Exchange) -> None:
    code, out, err = await exchange.access(
        "operator", "onboard", "--agency", "mof", "--name", "Ministry of Finance",
        "--reason", "joins the exchange",
    )  # fmt: skip
    assert code == 0, err
    assert f"spiffe://{TRUST_DOMAIN}/agency/mof" in out
    assert "tabadol pki issue --dir PKI_DIR --agency mof" in out

    code, out, err = await exchange.access(
        "operator", "limit", "--consumer", "post", "--rate", "50", "--concurrency", "4"
    )
    assert code == 0, err
    assert out.startswith("limited 'post' on all services to 50 calls/s, 4 in flight")
    code, _, err = await exchange.access("operator", "limit", "--consumer", "post", "--clear")
    assert code == 0, err

    code, out, err = await exchange.access(
        "operator", "grant", "--consumer", "post", "--service", SERVICE, "--method", "Unary",
        "--purpose", PURPOSE,
    )  # fmt: skip
    assert code == 0, err
    grant_id = out.split()[1].rstrip(":")
    code, out, err = await exchange.access(
        "operator", "retire", "--service", SERVICE, "--reason", "replaced by v2"
    )
    assert code == 0, err
    assert f"grants revoked with it: {grant_id}" in out

    # An agency is no operator.
    code, _, err = await exchange.access("echo", "onboard", "--agency", "x", "--name", "X")
    assert code == 1
    assert one_line(err).startswith("tabadol: PERMISSION_DENIED: ")


async def test_a_provider_grants_only_on_its_own_services(exchange: Exchange) -> None:
    code, out, err = await exchange.access(
        "post", "grant", "--consumer", "nocr", "--service", SERVICE, "--method", "*",
        "--purpose", PURPOSE,
    )  # fmt: skip
    assert (code, out) == (1, "")
    assert "PERMISSION_DENIED" in one_line(err) and "'echo' provides it" in err


async def test_a_file_registry_answers_lists_and_refuses_changes_saying_how_to_move(
    broker: Broker, pki: CertificateAuthority
) -> None:
    """The session's broker keeps its registry in its configuration file."""
    common = ["--broker", f"127.0.0.1:{broker.port}"]
    common += ["--credentials", str(pki.dir / "agencies" / "echo")]
    code, out, err = await asyncio.to_thread(tabadol, "access", "list", *common)
    assert code == 0, err
    assert "post" in out and "nocr" in out and "registry version 0" in out
    code, _, err = await asyncio.to_thread(
        tabadol, "access", "grant", *common, "--consumer", "cra", "--service", SERVICE,
        "--method", "Unary", "--purpose", PURPOSE,
    )  # fmt: skip
    assert code == 1
    line = one_line(err)
    assert line.startswith("tabadol: FAILED_PRECONDITION: ")
    assert "sqlite:///registry.db" in line and "tabadol registry import" in line


async def test_an_unreachable_broker_is_named(pki: CertificateAuthority) -> None:
    code, _, err = await asyncio.to_thread(
        tabadol, "access", "list", "--broker", "127.0.0.1:1", "--timeout", "5",
        "--credentials", str(pki.dir / "agencies" / "post"),
    )  # fmt: skip
    assert code == 1
    assert one_line(err).startswith("tabadol: UNAVAILABLE: cannot reach the broker at 127.0.0.1:1")


async def test_credentials_of_neither_kind_and_a_bad_expiry_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In a thread, as every command that runs its own event loop here: asyncio.run on the
    # main thread would leave the session's loop unset for the tests after it.
    code, _, err = await asyncio.to_thread(
        tabadol, "access", "list", "--broker", "127.0.0.1:1", "--credentials", str(tmp_path)
    )
    assert code == 2
    assert f"{tmp_path}: holds neither agency.crt" in err
    with pytest.raises(SystemExit):
        cli.main([
            "access", "approve", "r-1", "--expires", "next week",
            "--broker", "127.0.0.1:1", "--credentials", str(tmp_path),
        ])  # fmt: skip
    assert "argument --expires: 'next week' is not a time: give 90d" in capsys.readouterr().err
