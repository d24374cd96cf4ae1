"""The Access contract from another language's gRPC stack: a Node.js consumer
(interop/node/access_consumer.js, nothing but @grpc/grpc-js and the published .proto) asks
for access, the Python provider approves, and the Node consumer's call then goes through, on
a broker whose registry is the embedded SQLite database."""

from __future__ import annotations

import contextlib
import json
import re
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.client import connect
from tabadol.pki import CertificateAuthority
from tabadol.platform.v1 import access_pb2 as pb
from tabadol.platform.v1 import access_pb2_grpc
from tests.conftest import TRUST_DOMAIN, RunningProvider
from tests.support.echo import SERVICE, UNARY, Seen
from tests.support.node import ConsumerRun, run_consumer
from tests.support.registry import import_registry, registry_config, registry_toml

CONSUMER = "cra"  # declared, and holds no grant on the echo service
PROVIDER = "echo"
# The legal basis in Persian: it crosses Node, the registry and the provider's metadata intact.
PURPOSE = {
    "text": "احراز هویت مشترک تلفن همراه",
    "reference": "قانون تنظیم مقررات ارتباطات، ماده ۱۲",
}
NO_GRANT = (
    f"Tabadol broker: agency '{CONSUMER}' has no grant for method 'Unary' of service '{SERVICE}'"
)


def spiffe(agency: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/agency/{agency}"


@pytest.fixture
async def broker(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> AsyncIterator[str]:
    """A broker on a registry of its own in SQLite, where post and nocr hold grants and cra
    none; yields its address."""
    cfg = registry_config(
        tmp_path, pki.dir, echo_contracts, f"sqlite:///{tmp_path / 'registry.db'}"
    )
    entries = tmp_path / "registry.toml"
    entries.write_text(registry_toml([echo_provider.address]))
    import_registry(cfg, entries, reason="the first registry")
    running = Broker(config.load(cfg))
    await running.start()
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop(0)


async def node(broker: str, pki: CertificateAuthority, case: str, *args: str) -> ConsumerRun:
    """Run ``access_consumer.js CASE ARGS...`` as the consumer agency; what it printed."""
    credentials = pki.dir / "agencies" / CONSUMER
    return await run_consumer(broker, credentials, case, *args, script="access_consumer.js")


async def node_access(
    broker: str, pki: CertificateAuthority, rpc: str, request: dict[str, Any]
) -> ConsumerRun:
    return await node(broker, pki, "access", rpc, json.dumps(request, ensure_ascii=False))


async def node_echo(broker: str, pki: CertificateAuthority, text: str) -> ConsumerRun:
    return await node(broker, pki, "call", UNARY, text)


@contextlib.asynccontextmanager
async def as_provider(
    broker: str, pki: CertificateAuthority
) -> AsyncIterator[access_pb2_grpc.AccessAsyncStub]:
    """The Access service as the provider agency, over gRPC with its own certificate."""
    async with connect(broker, pki.dir / "agencies" / PROVIDER) as channel:
        yield access_pb2_grpc.AccessStub(channel)


def assert_refused(run: ConsumerRun) -> None:
    """The broker refused the Node consumer's echo call: it holds no grant."""
    assert (run.exit_code, run.document["code"], run.document["details"]) == (
        1, "PERMISSION_DENIED", NO_GRANT,
    ), run  # fmt: skip
    assert run.document["response"] is None


def seconds(node_timestamp: dict[str, Any] | None) -> int:
    """A google.protobuf.Timestamp as proto-loader prints it: int64 seconds as a string."""
    assert node_timestamp is not None and re.fullmatch(r"[0-9]+", node_timestamp["seconds"])
    return int(node_timestamp["seconds"])


def seen_by_provider(provider: RunningProvider, request_id: str) -> list[Seen]:
    return [s for s in provider.echo.calls if s.metadata.get("x-tabadol-request-id") == request_id]


async def request_access(broker: str, pki: CertificateAuthority) -> dict[str, Any]:
    """The Node consumer asks for Unary with PURPOSE; the pending request it was answered."""
    run = await node_access(
        broker, pki, "RequestAccess", {"service": SERVICE, "methods": ["Unary"], "purpose": PURPOSE}
    )
    assert run.exit_code == 0, run
    assert (run.document["ok"], run.document["code"], run.document["details"]) == (True, "OK", "")
    assert run.document["method"] == "/tabadol.platform.v1.Access/RequestAccess"
    assert run.document["consumer"] == CONSUMER
    assert run.document["response"]["registry_version"] == "2"  # uint64, as a decimal string
    request: dict[str, Any] = run.document["response"]["request"]
    return request


async def test_node_consumer_requests_python_provider_approves_and_the_node_call_goes_through(
    broker: str, pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    before = await node_echo(broker, pki, "before")
    assert_refused(before)
    assert re.fullmatch(r"[0-9a-f]{32}", before.document["request_id"])
    assert not seen_by_provider(echo_provider, before.document["request_id"])

    request = await request_access(broker, pki)
    assert re.fullmatch(r"r-[0-9a-f]{16}", request["id"])
    requested_at = seconds(request["requested_at"])
    assert request == {
        "id": request["id"],
        "consumer": CONSUMER,
        "provider": PROVIDER,
        "service": SERVICE,
        "methods": ["Unary"],
        "purpose": PURPOSE,
        "expires_at": None,
        "state": "REQUEST_STATE_PENDING",
        "requested_by": spiffe(CONSUMER),
        "requested_at": request["requested_at"],
        "decided_by": "",
        "decided_at": None,
        "reason": "",
        "grant_id": "",
        "provider_approved_by": "",
    }
    # The provider sees what the Node consumer asked for, exactly.
    async with as_provider(broker, pki) as access:
        listed = await access.ListRequests(pb.ListRequestsRequest(service=SERVICE), timeout=10)
    [pending] = listed.requests
    assert (pending.id, pending.consumer, pending.state) == (
        request["id"], CONSUMER, pb.REQUEST_STATE_PENDING,
    )  # fmt: skip
    assert (pending.purpose.text, pending.purpose.reference) == (
        PURPOSE["text"], PURPOSE["reference"],
    )  # fmt: skip
    assert pending.requested_at.seconds == requested_at

    async with as_provider(broker, pki) as access:
        approved = await access.ApproveRequest(
            pb.ApproveRequestRequest(request_id=request["id"]), timeout=10
        )
    grant = approved.grant
    assert re.fullmatch(r"g-[0-9a-f]{16}", grant.id)
    assert (grant.consumer, grant.provider, grant.service, list(grant.methods)) == (
        CONSUMER, PROVIDER, SERVICE, ["Unary"],
    )  # fmt: skip
    assert (grant.granted_by, grant.request_id, grant.expired) == (
        spiffe(PROVIDER), request["id"], False,
    )  # fmt: skip
    assert (approved.request.state, approved.registry_version) == (pb.REQUEST_STATE_APPROVED, 3)

    after = await node_echo(broker, pki, "بعد از تأیید")
    assert after.exit_code == 0, after
    assert (after.document["ok"], after.document["code"]) == (True, "OK")
    assert after.document["response"] == "بعد از تأیید"  # the provider's echo, byte for byte
    assert after.document["metadata"]["trailing"]["x-test-consumer-seen"] == [CONSUMER]
    [seen] = seen_by_provider(echo_provider, after.document["request_id"])
    assert (seen.method, seen.consumer) == (UNARY, CONSUMER)
    assert seen.metadata["x-tabadol-grant"] == grant.id
    purpose = seen.metadata["x-tabadol-purpose"]
    assert purpose.isascii() and urllib.parse.unquote(purpose) == PURPOSE["reference"]

    mine = await node_access(broker, pki, "ListRequests", {})
    assert mine.exit_code == 0, mine
    assert mine.document["response"]["registry_version"] == "3"
    [decided] = mine.document["response"]["requests"]
    assert decided == {
        **request,
        "state": "REQUEST_STATE_APPROVED",
        "decided_by": spiffe(PROVIDER),
        "decided_at": decided["decided_at"],
        "grant_id": grant.id,
    }
    assert seconds(decided["decided_at"]) == approved.request.decided_at.seconds

    grants = await node_access(broker, pki, "ListGrants", {"service": SERVICE})
    assert grants.exit_code == 0, grants
    [held] = grants.document["response"]["grants"]  # a consumer sees only the grants it holds
    assert held == {
        "id": grant.id,
        "consumer": CONSUMER,
        "provider": PROVIDER,
        "service": SERVICE,
        "methods": ["Unary"],
        "purpose": PURPOSE,
        "expires_at": None,
        "granted_by": spiffe(PROVIDER),
        "granted_at": held["granted_at"],
        "request_id": request["id"],
        "expired": False,
    }
    assert seconds(held["granted_at"]) == grant.granted_at.seconds


async def test_node_consumer_cannot_approve_its_own_request(
    broker: str, pki: CertificateAuthority
) -> None:
    request = await request_access(broker, pki)
    run = await node_access(broker, pki, "ApproveRequest", {"request_id": request["id"]})
    assert run.exit_code == 1, run
    assert run.document["code"] == "PERMISSION_DENIED"
    assert run.document["details"] == (
        f"Tabadol broker: request {request['id']} is for {SERVICE}, which '{PROVIDER}' provides: "
        f"only '{PROVIDER}' (or an operator) may approve it, not the agency that asked"
    )
    assert run.document["response"] is None
    listed = await node_access(broker, pki, "ListRequests", {"state": "REQUEST_STATE_PENDING"})
    assert listed.exit_code == 0, listed
    assert listed.document["response"]["requests"] == [request]
    assert listed.document["response"]["registry_version"] == "2"  # nothing was committed
    assert_refused(await node_echo(broker, pki, "still refused"))


async def test_node_consumer_sees_why_the_python_provider_rejected_its_request(
    broker: str, pki: CertificateAuthority
) -> None:
    request = await request_access(broker, pki)
    reason = "این دسترسی در قرارداد خدمات پیش‌بینی نشده است"  # not in the service agreement
    async with as_provider(broker, pki) as access:
        rejected = await access.RejectRequest(
            pb.RejectRequestRequest(request_id=request["id"], reason=reason), timeout=10
        )
    assert (rejected.request.state, rejected.registry_version) == (pb.REQUEST_STATE_REJECTED, 3)
    listed = await node_access(broker, pki, "ListRequests", {"service": SERVICE})
    assert listed.exit_code == 0, listed
    [decided] = listed.document["response"]["requests"]
    assert decided == {
        **request,
        "state": "REQUEST_STATE_REJECTED",
        "decided_by": spiffe(PROVIDER),
        "decided_at": decided["decided_at"],
        "reason": reason,
    }
    assert seconds(decided["decided_at"]) == rejected.request.decided_at.seconds
    grants = await node_access(broker, pki, "ListGrants", {})
    assert (grants.exit_code, grants.document["response"]["grants"]) == (0, [])
    assert_refused(await node_echo(broker, pki, "still refused"))
