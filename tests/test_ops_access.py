"""The ops console's Access page over HTTPS: each identity sees and changes only what the
access desk allows it, and no other site can make a change with a viewer's credentials.

A console on a loopback port with the session's PKI, on a registry in a SQLite file (or in
the configuration file itself), as `tabadol ops --config` opens it. echo provides the echo
service; post holds a grant on it; nocr asks for one; tax is no party to anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tabadol import config
from tabadol.access.desk import Actor
from tabadol.ops.access import family_of, unsafe_request_problem
from tabadol.ops.server import OpsServer, follow_registry
from tabadol.pki import CertificateAuthority
from tabadol.registry.current import load_current
from tests.conftest import TRUST_DOMAIN, broker_toml
from tests.support.echo import SERVICE
from tests.support.exchange import eventually
from tests.support.ops import AUDITOR, console_client, operator_bundle, person_bundle, running_ops
from tests.support.registry import import_registry, registry_config, registry_toml

GRANTS = f"""
[[grant]]
consumer = "post"
service = "{SERVICE}"
methods = ["*"]
purpose = "Delivering registered mail"
"""
ACCESS = "/api/tabadol/access"
AUDIT = "/api/tabadol/access/audit"
PURPOSE = "Verifying a citizen's identity"


@dataclass
class Console:
    server: OpsServer
    pki: CertificateAuthority

    def client(self, who: str | None) -> httpx.AsyncClient:
        """As agency ``who``, as the tests' operator ("operator") or auditor ("auditor")."""
        if who == "operator":
            bundle: Path | None = operator_bundle(self.pki)
        elif who == "auditor":
            bundle = person_bundle(self.pki, "auditor", AUDITOR)
        else:
            bundle = self.pki.dir / "agencies" / who if who else None
        return console_client(self.server, bundle)

    async def post(self, who: str, path: str, body: dict[str, Any]) -> httpx.Response:
        """A change as the console's own page sends it: JSON, from the console's origin."""
        async with self.client(who) as client:
            return await client.post(path, json=body, headers={"Origin": self.server.http_url})

    async def get(self, who: str, path: str = ACCESS) -> httpx.Response:
        async with self.client(who) as client:
            return await client.get(path)

    async def request(self, who: str = "nocr", methods: tuple[str, ...] = ("Unary",)) -> str:
        made = await self.post(
            who,
            f"{ACCESS}/requests",
            {"service": SERVICE, "methods": list(methods), "purpose": PURPOSE,
             "reference": "Civil Registry Act art. 4"},
        )  # fmt: skip
        assert made.status_code == 200, made.text
        request_id: str = made.json()["request"]["id"]
        return request_id


def message(response: httpx.Response) -> str:
    text: str = response.json()["errors"][0]["msg"]
    return text


async def post_grant(console: Console) -> str:
    grants = (await console.get("operator")).json()["grants"]
    found: str = next(g["id"] for g in grants if g["consumer"] == "post")
    return found


@pytest.fixture
async def console(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> AsyncIterator[Console]:
    path = registry_config(tmp_path, pki.dir, echo_contracts, f"sqlite:///{tmp_path}/registry.db")
    file = tmp_path / "registry.toml"
    file.write_text(registry_toml(["127.0.0.1:1"], GRANTS))
    import_registry(
        path, file, reason="the first registry", by="spiffe://tabadol.example/operator/olivia"
    )
    async with running_ops(tmp_path, pki) as server:
        server.show_exchange(load_current(path))
        yield Console(server, pki)


async def test_a_consumer_asks_the_provider_approves_and_the_audit_trail_says_who_and_why(
    console: Console,
) -> None:
    request = await console.request("nocr")
    asked = (await console.get("nocr")).json()
    assert [(r["id"], r["state"], r["actions"]) for r in asked["requests"]] == [
        (request, "pending", ["withdraw"])
    ]
    provider = (await console.get("echo")).json()
    row = next(r for r in provider["requests"] if r["id"] == request)
    assert row["actions"] == ["approve", "reject"]
    assert (row["consumer"], row["provider"], row["purpose"]) == ("nocr", "echo", PURPOSE)

    approved = await console.post("echo", f"{ACCESS}/requests/{request}/approve", {})
    assert approved.status_code == 200, approved.text
    grant = approved.json()["grant"]
    assert (grant["consumer"], grant["methods"], grant["request"]) == ("nocr", ["Unary"], request)
    assert grant["grantedBy"] == f"spiffe://{TRUST_DOMAIN}/agency/echo"
    assert approved.json()["request"]["state"] == "approved"
    held = (await console.get("nocr")).json()["grants"]
    assert [(g["id"], g["actions"]) for g in held] == [(grant["id"], [])]

    trail = (await console.get("operator", AUDIT)).json()
    newest, asking = trail["entries"][0], trail["entries"][1]
    assert [newest["version"], asking["version"]] == [3, 2]
    assert asking["actor"] == f"spiffe://{TRUST_DOMAIN}/agency/nocr"
    assert asking["reason"].startswith(f"request {request}: 'nocr' asks 'echo' for Unary")
    assert asking["reason"].endswith(f"purpose: {PURPOSE}")
    assert asking["changes"] == [f"+ [[request]] '{request}'"]
    assert newest["actor"] == f"spiffe://{TRUST_DOMAIN}/agency/echo"
    assert f"+ [[grant]] '{grant['id']}'" in newest["changes"]
    assert trail["more"] is False


async def test_an_agency_sees_and_acts_on_nothing_it_is_no_party_to(console: Console) -> None:
    request = await console.request("nocr")
    grant = await post_grant(console)
    outsider = (await console.get("tax")).json()
    assert outsider["grants"] == [] and outsider["requests"] == []
    for path, body in (
        (f"{ACCESS}/requests/{request}/approve", {}),
        (f"{ACCESS}/requests/{request}/reject", {"reason": "not mine to judge"}),
        (f"{ACCESS}/requests/{request}/withdraw", {}),
        (f"{ACCESS}/grants/{grant}/revoke", {"reason": "not mine to revoke"}),
    ):
        response = await console.post("tax", path, body)
        assert response.status_code == 404, (path, response.text)
        assert "that concerns agency 'tax'" in message(response)
        assert response.json()["code"] == "NOT_FOUND"
    # Nor may tax grant on a service it does not provide.
    granted = await console.post(
        "tax",
        f"{ACCESS}/grants",
        {"consumer": "cra", "service": SERVICE, "methods": ["*"], "purpose": PURPOSE},
    )
    assert granted.status_code == 403, granted.text
    assert "only a service's provider (or an operator) grants access" in message(granted)
    assert (await console.get("operator")).json()["registryVersion"] == 2


async def test_a_consumer_cannot_approve_its_own_request_nor_revoke_its_grant(
    console: Console,
) -> None:
    request = await console.request("nocr")
    approved = await console.post("nocr", f"{ACCESS}/requests/{request}/approve", {})
    assert approved.status_code == 403, approved.text
    assert "only 'echo' (or an operator) may approve it" in message(approved)
    revoked = await console.post(
        "post", f"{ACCESS}/grants/{await post_grant(console)}/revoke", {"reason": "done"}
    )
    assert revoked.status_code == 403, revoked.text
    assert "only 'echo', the provider of" in message(revoked)


async def test_a_revocation_and_a_rejection_need_a_reason(console: Console) -> None:
    grant = await post_grant(console)
    revoked = await console.post("echo", f"{ACCESS}/grants/{grant}/revoke", {"reason": "  "})
    assert revoked.status_code == 400, revoked.text
    assert message(revoked) == "a reason for the revocation is required"
    request = await console.request("nocr")
    rejected = await console.post("echo", f"{ACCESS}/requests/{request}/reject", {})
    assert rejected.status_code == 400
    assert message(rejected) == "a reason for the rejection is required"

    revoked = await console.post(
        "echo", f"{ACCESS}/grants/{grant}/revoke", {"reason": "the contract ended"}
    )
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked"] == [grant]
    assert (await console.get("post")).json()["grants"] == []
    trail = (await console.get("operator", AUDIT)).json()["entries"]
    assert trail[0]["reason"].endswith(": the contract ended")
    assert trail[0]["changes"] == [f"- [[grant]] 'post' '{SERVICE}'"]  # a file's grant


async def test_an_operator_sees_every_grant_and_request_and_grants_directly(
    console: Console,
) -> None:
    request = await console.request("nocr")
    everything = (await console.get("operator")).json()
    assert [g["consumer"] for g in everything["grants"]] == ["post"]
    assert everything["grants"][0]["actions"] == ["revoke"]
    assert [(r["id"], r["actions"]) for r in everything["requests"]] == [
        (request, ["approve", "reject"])
    ]
    granted = await console.post(
        "operator",
        f"{ACCESS}/grants",
        {"consumer": "tax", "service": SERVICE, "methods": ["Unary"], "purpose": PURPOSE,
         "expiresAt": "2099-01-01T00:00:00Z"},
    )  # fmt: skip
    assert granted.status_code == 200, granted.text
    assert granted.json()["grant"]["expiresAt"] == "2099-01-01T00:00:00+00:00"
    assert granted.json()["grant"]["grantedBy"] == f"spiffe://{TRUST_DOMAIN}/operator/olivia"
    asked = await console.post(
        "operator", f"{ACCESS}/requests", {"service": SERVICE, "methods": ["*"], "purpose": "x"}
    )
    assert asked.status_code == 403
    assert "only an agency requests access" in message(asked)


async def test_bad_input_is_refused_naming_the_field(console: Console) -> None:
    for body, expected in (
        ({"service": SERVICE, "methods": "Unary", "purpose": PURPOSE}, "methods: expected a list"),
        ({"service": SERVICE, "methods": [], "purpose": PURPOSE}, "methods: name at least one"),
        ({"service": SERVICE, "methods": ["Unary"], "purpose": ""}, "a purpose (the legal basis"),
        ({"service": SERVICE, "methods": ["Unary"], "purpose": PURPOSE,
          "expiresAt": "2099-01-01T00:00:00"}, "expiresAt: '2099-01-01T00:00:00' has no time zone"),
        ({"service": SERVICE, "methods": ["Unary"], "purpose": PURPOSE,
          "expiresAt": "soon"}, "expiresAt: 'soon' is not an ISO 8601 time"),
        ({"service": "no.such.Service", "methods": ["*"], "purpose": PURPOSE},
         "the exchange routes no service 'no.such.Service'"),
        ({"service": SERVICE, "methods": ["NoSuchMethod"], "purpose": PURPOSE}, "NoSuchMethod"),
    ):  # fmt: skip
        response = await console.post("nocr", f"{ACCESS}/requests", body)
        assert response.status_code in (400, 404), (body, response.text)
        assert expected in message(response), body
    async with console.client("nocr") as nocr:
        response = await nocr.post(
            f"{ACCESS}/requests",
            content=b"[1, 2]",
            headers={"Origin": console.server.http_url, "Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert message(response) == "the request body must be a JSON object"


SELF = "(the console's own origin)"
JSON = "application/json"
FORGED: list[tuple[dict[str, str], str]] = [
    ({"Content-Type": "application/x-www-form-urlencoded", "Origin": SELF}, "must send JSON"),
    ({"Content-Type": "text/plain", "Origin": SELF},
     "must send JSON (Content-Type: application/json), not text/plain"),
    ({"Content-Type": JSON, "Origin": "https://evil.example"},
     "from another origin (https://evil.example) is refused"),
    ({"Content-Type": JSON, "Origin": "null"}, "from another origin (null)"),
    ({"Content-Type": JSON, "Origin": SELF, "Sec-Fetch-Site": "cross-site"},
     "from another site is refused (Sec-Fetch-Site: cross-site)"),
    ({"Content-Type": JSON, "Origin": SELF, "Sec-Fetch-Site": "same-site"},
     "Sec-Fetch-Site: same-site"),
    ({"Content-Type": JSON}, "must say where it comes from (an Origin header"),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "why"), FORGED)
async def test_a_change_not_sent_as_json_from_the_consoles_own_origin_is_refused(
    console: Console, headers: dict[str, str], why: str
) -> None:
    grant = await post_grant(console)
    sent = {k: console.server.http_url if v == SELF else v for k, v in headers.items()}
    async with console.client("echo") as echo:
        response = await echo.post(
            f"{ACCESS}/grants/{grant}/revoke",
            content=b'{"reason": "a forged revocation"}',
            headers=sent,
        )
    assert response.status_code == 403, response.text
    assert why in message(response)
    assert (await console.get("post")).json()["grants"] != []  # nothing was revoked


def test_unsafe_request_problem_lets_only_same_origin_json_through() -> None:
    host = "127.0.0.1:8443"
    origin = f"https://{host}"
    ok = unsafe_request_problem(
        "POST", "application/json; charset=utf-8", origin, "same-origin", host
    )
    assert ok is None
    assert (
        unsafe_request_problem(
            "POST", "application/json", "https://ops.example", None, "ops.example:443"
        )
        is None
    )
    assert unsafe_request_problem("GET", None, None, "cross-site", host) is None
    assert unsafe_request_problem("DELETE", "application/json", None, None, host) is not None
    assert (
        unsafe_request_problem("POST", "application/json", f"http://{host}", None, host) is not None
    )


async def test_the_access_api_needs_an_identity_and_the_right(console: Console) -> None:
    for who, path, status in (
        (None, ACCESS, 401),
        (None, AUDIT, 401),
        ("auditor", ACCESS, 403),
        ("echo", AUDIT, 403),
        ("auditor", AUDIT, 200),
        ("operator", AUDIT, 200),
    ):
        async with console.client(who) as client:
            response = await client.get(path)
        assert response.status_code == status, (who, path, response.text)
    async with console.client(None) as anonymous:
        refused = await anonymous.post(
            f"{ACCESS}/requests", json={}, headers={"Origin": console.server.http_url}
        )
    assert refused.status_code == 401
    auditor = await console.post("auditor", f"{ACCESS}/requests", {"service": SERVICE})
    assert auditor.status_code == 403
    assert "auditor 'arash' may not see grants and access requests" in message(auditor)
    assert family_of(AUDIT) == "audit"
    assert family_of(f"{ACCESS}/requests/r-1/approve") == "access"


async def test_an_auditor_reads_the_audit_trail(console: Console) -> None:
    await console.request("nocr")
    trail = (await console.get("auditor", AUDIT)).json()
    assert [e["version"] for e in trail["entries"]] == [2, 1]
    assert trail["entries"][1]["reason"] == "the first registry"


async def test_with_the_registry_in_the_configuration_file_changes_are_refused_plainly(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"],
                    grants=GRANTS)
    )  # fmt: skip
    async with running_ops(tmp_path, pki) as server:
        server.show_exchange(config.load(path))
        console = Console(server, pki)
        shown = (await console.get("post")).json()
        assert shown["changeable"] is False and shown["registryVersion"] == 0
        assert [g["consumer"] for g in shown["grants"]] == ["post"]
        asked = await console.post(
            "nocr", f"{ACCESS}/requests", {"service": SERVICE, "methods": ["*"], "purpose": PURPOSE}
        )
        assert asked.status_code == 409, asked.text
        assert asked.json()["code"] == "FAILED_PRECONDITION"
        assert message(asked).startswith(
            f"this exchange's registry is its configuration file {path}, so changes are refused"
        )
        assert "sqlite:///registry.db" in message(asked)
        trail = await console.get("operator", AUDIT)
        assert trail.status_code == 409
        assert "so no audit trail to read" in message(trail)


async def test_a_console_without_a_configuration_says_how_to_manage_access(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    async with running_ops(tmp_path, pki) as server:
        response = await Console(server, pki).get("operator")
    assert response.status_code == 404
    assert "start it with `tabadol ops --config broker.toml`" in message(response)


async def test_the_audit_trail_pages_back_from_a_version(console: Console) -> None:
    request = await console.request("nocr")
    await console.post("nocr", f"{ACCESS}/requests/{request}/withdraw", {"reason": "by mistake"})
    newest = (await console.get("operator", AUDIT)).json()
    assert [e["version"] for e in newest["entries"]] == [3, 2, 1]
    assert newest["entries"][0]["reason"] == f"withdraw request {request}: by mistake"
    older = (await console.get("operator", f"{AUDIT}?before=3")).json()
    assert [e["version"] for e in older["entries"]] == [2, 1]
    assert (await console.get("operator", f"{AUDIT}?before=1")).json()["entries"] == []
    bad = await console.get("operator", f"{AUDIT}?before=latest")
    assert bad.status_code == 400
    assert "before: 'latest' is not a registry version number" in message(bad)


async def test_an_agency_onboarded_in_the_registry_may_open_the_console_without_a_restart(
    tmp_path: Path, console: Console
) -> None:
    path = tmp_path / "broker.toml"
    console.pki.issue_agency("newcomer", force=True)
    follow = asyncio.create_task(follow_registry(console.server, path, load_current(path)))
    try:
        assert (await console.get("newcomer")).status_code == 403  # not declared yet
        # Onboarded as the broker's Access service does it (the console does not onboard).
        desk = console.server.app.state.desk
        desk.onboard(Actor.operator(TRUST_DOMAIN, "olivia"), "newcomer", "New Agency", "joins")
        assert await eventually(lambda: "newcomer" in console.server.trust.agencies)
        assert (await console.get("newcomer")).status_code == 200
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
