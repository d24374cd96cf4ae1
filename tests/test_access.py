"""Self-service access through the broker's Access service: every rule, on a real broker
whose registry is a PostgreSQL database, called with the agencies' and operators' own
certificates."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from tabadol import config
from tabadol.access.cli import open_channel
from tabadol.broker import Broker
from tabadol.client import connect
from tabadol.ledger.store import open_ledger
from tabadol.pki import CertificateAuthority
from tabadol.platform.v1 import access_pb2 as pb
from tabadol.platform.v1 import access_pb2_grpc
from tabadol.registry import open_registry
from tabadol.registry.entries import diff
from tests.conftest import TRUST_DOMAIN, RunningProvider, start_broker
from tests.support.echo import BIDI, SERVICE, UNARY, echo_file_descriptor
from tests.support.exchange import eventually
from tests.support.registry import (
    imported_registry,
    registry_config,
    registry_toml,
)

# post may call every echo method; nocr has no grant. echo provides the service.
GRANTS = f"""
[[grant]]
consumer = "post"
service = "{SERVICE}"
methods = ["*"]
"""
PURPOSE = pb.Purpose(text="Verifying a sender's identity", reference="Postal Act art. 12")


def access(channel: grpc.aio.Channel) -> access_pb2_grpc.AccessStub:
    return access_pb2_grpc.AccessStub(channel)  # type: ignore[no-untyped-call]


class Exchange:
    """Brokers on one registry database, and channels to them as agencies and operators."""

    def __init__(self, tmp_path: Path, pki: CertificateAuthority, url: str) -> None:
        self.tmp_path, self.pki, self.url = tmp_path, pki, url
        self.brokers: list[Broker] = []
        self._channels: list[grpc.aio.Channel] = []

    async def node(self, contracts: Path) -> Broker:
        directory = self.tmp_path / f"node{len(self.brokers)}"
        directory.mkdir()
        broker = Broker(config.load(registry_config(directory, self.pki.dir, contracts, self.url)))
        await broker.start()
        self.brokers.append(broker)
        return broker

    def channel(self, who: str, broker: int = 0) -> grpc.aio.Channel:
        """As agency ``who``, or as operator ``who`` when it starts with "operator/"."""
        role, _, name = who.rpartition("/")
        held = self.pki.dir / (f"{role}s" if role else "agencies") / name
        channel = open_channel(f"127.0.0.1:{self.brokers[broker].port}", held)
        self._channels.append(channel)
        return channel

    def access(self, who: str, broker: int = 0) -> access_pb2_grpc.AccessStub:
        return access(self.channel(who, broker))

    async def unary(self, agency: str, broker: int = 0) -> grpc.StatusCode:
        try:
            await self.channel(agency, broker).unary_unary(UNARY)(b"ping", timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        for broker in self.brokers:
            await broker.stop(0)


@pytest.fixture
async def exchange(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    postgres_url: str,
) -> AsyncIterator[Exchange]:
    pki.issue_person("operator", "maryam", force=True)
    entries = registry_toml([echo_provider.address], GRANTS)
    imported_registry(tmp_path, pki.dir, echo_contracts, postgres_url, entries)
    ex = Exchange(tmp_path, pki, postgres_url)
    await ex.node(echo_contracts)
    try:
        yield ex
    finally:
        await ex.close()


async def refused(call: Callable[[], object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call()  # type: ignore[misc]
    return e.value


def soon(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds))
    return stamp


async def test_a_consumer_requests_the_provider_approves_and_the_call_then_succeeds(
    exchange: Exchange, echo_provider: RunningProvider
) -> None:
    assert await exchange.unary("nocr") == grpc.StatusCode.PERMISSION_DENIED
    made = await exchange.access("nocr").RequestAccess(
        pb.RequestAccessRequest(service=SERVICE, methods=["Unary"], purpose=PURPOSE)
    )
    assert made.request.state == pb.REQUEST_STATE_PENDING
    assert made.request.requested_by == f"spiffe://{TRUST_DOMAIN}/agency/nocr"
    assert made.request.provider == "echo"

    pending = await exchange.access("echo").ListRequests(
        pb.ListRequestsRequest(state=pb.REQUEST_STATE_PENDING)
    )
    assert [r.id for r in pending.requests] == [made.request.id]
    approved = await exchange.access("echo").ApproveRequest(
        pb.ApproveRequestRequest(request_id=made.request.id)
    )
    assert approved.request.state == pb.REQUEST_STATE_APPROVED
    assert approved.grant.consumer == "nocr" and list(approved.grant.methods) == ["Unary"]
    assert approved.grant.purpose == PURPOSE
    assert approved.grant.request_id == made.request.id

    # The answer came once this node applied the version: the very next call is admitted.
    assert await exchange.unary("nocr") == grpc.StatusCode.OK
    seen = echo_provider.echo.calls[-1].metadata
    assert seen["x-tabadol-grant"] == approved.grant.id
    assert seen["x-tabadol-purpose"] == "Postal Act art. 12"
    mine = await exchange.access("nocr").ListRequests(pb.ListRequestsRequest())
    assert [(r.id, r.state, r.grant_id) for r in mine.requests] == [
        (made.request.id, pb.REQUEST_STATE_APPROVED, approved.grant.id)
    ]


async def test_the_ledger_records_which_grant_admitted_each_call(exchange: Exchange) -> None:
    granted = await exchange.access("echo").GrantAccess(
        pb.GrantAccessRequest(consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE)
    )
    assert await exchange.unary("nocr") == grpc.StatusCode.OK
    assert await exchange.unary("tax") == grpc.StatusCode.PERMISSION_DENIED
    broker = exchange.brokers[0]
    await broker.stop(0)
    exchange.brokers.clear()
    with contextlib.closing(open_ledger(broker.config.ledger, readonly=True)) as ledger:
        records = [s.record for s in ledger.records()]
    grants = {(r.consumer, r.status_code): r.grant for r in records if r.method == "Unary"}
    assert grants == {("nocr", 0): granted.grant.id, ("tax", 7): ""}


async def test_a_provider_cannot_grant_on_a_service_it_does_not_provide(
    exchange: Exchange,
) -> None:
    e = await refused(
        lambda: exchange.access("post").GrantAccess(
            pb.GrantAccessRequest(consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE)
        )
    )
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'echo' provides it" in (e.details() or "")
    assert await exchange.unary("nocr") == grpc.StatusCode.PERMISSION_DENIED
    # Nor revoke a grant on it, even one it holds; a third agency is told there is none.
    grants = await exchange.access("post").ListGrants(pb.ListGrantsRequest())
    e = await refused(
        lambda: exchange.access("post").RevokeAccess(
            pb.RevokeAccessRequest(grant_id=grants.grants[0].id, reason="mine now")
        )
    )
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only 'echo', the provider" in (e.details() or "")
    e = await refused(
        lambda: exchange.access("tax").RevokeAccess(
            pb.RevokeAccessRequest(grant_id=grants.grants[0].id, reason="not mine")
        )
    )
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert await exchange.unary("post") == grpc.StatusCode.OK


async def test_a_consumer_cannot_approve_its_own_request(exchange: Exchange) -> None:
    made = await exchange.access("nocr").RequestAccess(
        pb.RequestAccessRequest(service=SERVICE, methods=["*"], purpose=PURPOSE)
    )
    e = await refused(
        lambda: exchange.access("nocr").ApproveRequest(
            pb.ApproveRequestRequest(request_id=made.request.id)
        )
    )
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not the agency that asked" in (e.details() or "")
    # A third agency does not even see it.
    e = await refused(
        lambda: exchange.access("tax").ApproveRequest(
            pb.ApproveRequestRequest(request_id=made.request.id)
        )
    )
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert (await exchange.access("tax").ListRequests(pb.ListRequestsRequest())).requests == []
    assert await exchange.unary("nocr") == grpc.StatusCode.PERMISSION_DENIED


async def test_an_expired_grant_stops_admitting_with_no_one_acting(exchange: Exchange) -> None:
    granted = await exchange.access("echo").GrantAccess(
        pb.GrantAccessRequest(
            consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE,
            expires_at=soon(1.5),
        )
    )  # fmt: skip
    version = granted.registry_version
    assert await exchange.unary("nocr") == grpc.StatusCode.OK
    assert await eventually(
        lambda: _is(exchange.unary("nocr"), grpc.StatusCode.PERMISSION_DENIED), 10
    )
    assert exchange.brokers[0].config.registry_version == version  # nothing was committed
    listed = await exchange.access("echo").ListGrants(pb.ListGrantsRequest(consumer="nocr"))
    assert [(g.id, g.expired) for g in listed.grants] == [(granted.grant.id, True)]
    past = await refused(
        lambda: exchange.access("echo").GrantAccess(
            pb.GrantAccessRequest(
                consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE,
                expires_at=soon(-60),
            )
        )
    )  # fmt: skip
    assert past.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not in the future" in (past.details() or "")


async def _is(code: object, wanted: grpc.StatusCode) -> bool:
    return await code == wanted  # type: ignore[misc]


async def test_a_revoked_grant_stops_working_on_every_broker_node_within_the_bound(
    exchange: Exchange, echo_contracts: Path
) -> None:
    await exchange.node(echo_contracts)
    grants = await exchange.access("echo").ListGrants(pb.ListGrantsRequest(consumer="post"))
    assert [await exchange.unary("post", n) for n in (0, 1)] == [grpc.StatusCode.OK] * 2
    await exchange.access("echo", broker=1).RevokeAccess(
        pb.RevokeAccessRequest(grant_id=grants.grants[0].id, reason="contract ended")
    )
    # Node 1 answered once it applied the change; node 0 follows within poll_seconds.
    assert await exchange.unary("post", 1) == grpc.StatusCode.PERMISSION_DENIED
    assert await eventually(
        lambda: _is(exchange.unary("post", 0), grpc.StatusCode.PERMISSION_DENIED), 5
    )


async def test_a_revocation_needs_a_reason(exchange: Exchange) -> None:
    grants = await exchange.access("echo").ListGrants(pb.ListGrantsRequest())
    for reason in ("", "   "):
        e = await refused(
            lambda reason=reason: exchange.access("echo").RevokeAccess(
                pb.RevokeAccessRequest(grant_id=grants.grants[0].id, reason=reason)
            )
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "a reason for the revocation is required" in (e.details() or "")
    assert await exchange.unary("post") == grpc.StatusCode.OK


async def test_each_action_is_in_the_audit_trail_exactly(exchange: Exchange) -> None:
    made = await exchange.access("nocr").RequestAccess(
        pb.RequestAccessRequest(service=SERVICE, methods=["Unary"], purpose=PURPOSE)
    )
    approved = await exchange.access("echo").ApproveRequest(
        pb.ApproveRequestRequest(request_id=made.request.id)
    )
    await exchange.access("echo").RevokeAccess(
        pb.RevokeAccessRequest(grant_id=approved.grant.id, reason="the agreement ended")
    )
    trail = await exchange.access("operator/maryam").ListAuditEntries(pb.ListAuditEntriesRequest())
    entries = list(trail.entries)
    assert [e.actor for e in entries] == [
        "tester",
        f"spiffe://{TRUST_DOMAIN}/agency/nocr",
        f"spiffe://{TRUST_DOMAIN}/agency/echo",
        f"spiffe://{TRUST_DOMAIN}/agency/echo",
    ]
    rid, gid = made.request.id, approved.grant.id
    assert [e.reason for e in entries[1:]] == [
        f"request {rid}: 'nocr' asks 'echo' for Unary of {SERVICE}: purpose: {PURPOSE.text}",
        f"approve request {rid}: grant {gid} to 'nocr'",
        f"revoke grant {gid}: 'nocr' on {SERVICE}: the agreement ended",
    ]
    assert [list(e.changes) for e in entries[1:]] == [
        [f"+ [[request]] '{rid}'"],
        [f"+ [[grant]] '{gid}'",
         f"~ [[request]] '{rid}': decided_at (unset) -> {_json_time(approved.request.decided_at)}, "
         f"decided_by (unset) -> \"spiffe://{TRUST_DOMAIN}/agency/echo\", "
         f"grant (unset) -> \"{gid}\", state \"pending\" -> \"approved\""],
        [f"- [[grant]] '{gid}'"],
    ]  # fmt: skip
    # The entries are the registry's versions, before and after, as stored.
    store = open_registry(exchange.url)
    try:
        versions = store.history()
    finally:
        store.close()
    assert [v.number for v in versions] == [e.version for e in entries]
    assert [str(c) for c in diff(versions[2].entries, versions[3].entries)] == list(
        entries[3].changes
    )
    # Agencies do not read the audit trail.
    e = await refused(
        lambda: exchange.access("echo").ListAuditEntries(pb.ListAuditEntriesRequest())
    )
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED


def _json_time(stamp: Timestamp) -> str:
    return '"' + stamp.ToDatetime(dt.UTC).isoformat().replace("+00:00", "Z") + '"'


async def test_only_operators_onboard_publish_limit_and_retire(exchange: Exchange) -> None:
    e = await refused(
        lambda: exchange.access("echo").OnboardAgency(pb.OnboardAgencyRequest(id="mof", name="MoF"))
    )
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    operator = exchange.access("operator/maryam")
    onboarded = await operator.OnboardAgency(
        pb.OnboardAgencyRequest(id="mof", name="Ministry of Finance", reason="joins in Q1")
    )
    assert onboarded.spiffe_id == f"spiffe://{TRUST_DOMAIN}/agency/mof"
    assert (
        "tabadol pki issue" in onboarded.issue_certificate
        and "--agency mof" in onboarded.issue_certificate
    )
    again = await refused(
        lambda: operator.OnboardAgency(pb.OnboardAgencyRequest(id="mof", name="x"))
    )
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS
    await operator.SetLimit(pb.SetLimitRequest(consumer="post", rate=100, reason="fair share"))
    bad = await refused(lambda: operator.SetLimit(pb.SetLimitRequest(consumer="post", rate=-1)))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "rate" in (bad.details() or "")
    retired = await operator.RetireService(
        pb.RetireServiceRequest(name=SERVICE, reason="v2 is out")
    )
    assert len(retired.revoked_grants) == 1
    assert await exchange.unary("post") == grpc.StatusCode.UNIMPLEMENTED
    missing = await refused(
        lambda: operator.PublishService(
            pb.PublishServiceRequest(
                name="nowhere.v1.Nothing", provider="echo", endpoints=["127.0.0.1:1"]
            )
        )
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert "not in the broker's loaded contracts" in (missing.details() or "")


async def test_an_agency_the_registry_does_not_declare_cannot_use_access(
    exchange: Exchange, pki: CertificateAuthority
) -> None:
    pki.issue_agency("stranger", force=True)
    e = await refused(lambda: exchange.access("stranger").ListGrants(pb.ListGrantsRequest()))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a registered agency" in (e.details() or "")


async def test_a_grant_on_a_sensitive_service_needs_an_operator_too(exchange: Exchange) -> None:
    operator = exchange.access("operator/maryam")
    endpoints = exchange.brokers[0].config.services[SERVICE].endpoints
    await operator.PublishService(
        pb.PublishServiceRequest(name=SERVICE, provider="echo", endpoints=endpoints, sensitive=True)
    )
    made = await exchange.access("nocr").RequestAccess(
        pb.RequestAccessRequest(service=SERVICE, methods=["*"], purpose=PURPOSE)
    )
    early = await refused(
        lambda: operator.ApproveRequest(pb.ApproveRequestRequest(request_id=made.request.id))
    )
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    halfway = await exchange.access("echo").ApproveRequest(
        pb.ApproveRequestRequest(request_id=made.request.id)
    )
    assert halfway.request.state == pb.REQUEST_STATE_AWAITING_OPERATOR
    assert not halfway.HasField("grant")
    assert await exchange.unary("nocr") == grpc.StatusCode.PERMISSION_DENIED
    done = await operator.ApproveRequest(pb.ApproveRequestRequest(request_id=made.request.id))
    assert done.request.state == pb.REQUEST_STATE_APPROVED
    assert done.request.provider_approved_by == f"spiffe://{TRUST_DOMAIN}/agency/echo"
    assert done.grant.granted_by == f"spiffe://{TRUST_DOMAIN}/operator/maryam"
    assert await exchange.unary("nocr") == grpc.StatusCode.OK


async def test_requests_are_rejected_or_withdrawn_only_by_their_parties(
    exchange: Exchange,
) -> None:
    first, second = [
        (
            await exchange.access("nocr").RequestAccess(
                pb.RequestAccessRequest(service=SERVICE, methods=["*"], purpose=PURPOSE)
            )
        ).request
        for _ in range(2)
    ]
    no_reason = await refused(
        lambda: exchange.access("echo").RejectRequest(pb.RejectRequestRequest(request_id=first.id))
    )
    assert no_reason.code() == grpc.StatusCode.INVALID_ARGUMENT
    rejected = await exchange.access("echo").RejectRequest(
        pb.RejectRequestRequest(request_id=first.id, reason="no legal basis given")
    )
    assert rejected.request.state == pb.REQUEST_STATE_REJECTED
    assert rejected.request.reason == "no legal basis given"
    closed = await refused(
        lambda: exchange.access("echo").ApproveRequest(
            pb.ApproveRequestRequest(request_id=first.id)
        )
    )
    assert closed.code() == grpc.StatusCode.FAILED_PRECONDITION
    not_theirs = await refused(
        lambda: exchange.access("echo").WithdrawRequest(
            pb.WithdrawRequestRequest(request_id=second.id)
        )
    )
    assert not_theirs.code() == grpc.StatusCode.PERMISSION_DENIED
    withdrawn = await exchange.access("nocr").WithdrawRequest(
        pb.WithdrawRequestRequest(request_id=second.id)
    )
    assert withdrawn.request.state == pb.REQUEST_STATE_WITHDRAWN
    assert await exchange.unary("nocr") == grpc.StatusCode.PERMISSION_DENIED


async def test_a_file_registry_answers_reads_and_refuses_changes_plainly(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [echo_provider.address])
    channel = connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "echo")
    try:
        listed = await access(channel).ListGrants(pb.ListGrantsRequest())
        assert {g.consumer for g in listed.grants} >= {"post"}
        assert listed.registry_version == 0
        assert all(g.id.startswith("file-") for g in listed.grants)
        e = await refused(
            lambda: access(channel).GrantAccess(
                pb.GrantAccessRequest(
                    consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE
                )
            )
        )
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert str(broker.config.path) in (e.details() or "")
        assert "sqlite:///registry.db" in (e.details() or "")
    finally:
        await channel.close()
        await broker.stop(0)


async def test_a_stream_open_under_a_revoked_grant_is_ended(exchange: Exchange) -> None:
    grants = await exchange.access("echo").ListGrants(pb.ListGrantsRequest(consumer="post"))
    stream = exchange.channel("post").stream_stream(BIDI)(timeout=60)
    await stream.write(b"person 1")
    assert await stream.read() == b"person 1"
    await exchange.access("echo").RevokeAccess(
        pb.RevokeAccessRequest(grant_id=grants.grants[0].id, reason="the agreement ended")
    )
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        await stream.write(b"person 2")
        await stream.read()
    assert await stream.code() == grpc.StatusCode.PERMISSION_DENIED
    details = await stream.details()
    assert f"grant {grants.grants[0].id} of agency 'post' no longer admits" in details


async def test_a_stream_open_when_its_grant_expires_is_ended(exchange: Exchange) -> None:
    await exchange.access("echo").GrantAccess(
        pb.GrantAccessRequest(
            consumer="nocr", service=SERVICE, methods=["Bidi"], purpose=PURPOSE,
            expires_at=soon(2),
        )
    )  # fmt: skip
    stream = exchange.channel("nocr").stream_stream(BIDI)(timeout=60)
    await stream.write(b"person 1")
    assert await stream.read() == b"person 1"
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        for n in range(600):  # ends within a second of the expiry; the bound is the timeout
            await stream.write(f"person {n}".encode())
            await stream.read()
            await asyncio.sleep(0.02)
    assert await stream.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked or expired during the call" in await stream.details()


async def test_a_service_is_published_only_if_the_providers_contract_breaks_no_consumer(
    exchange: Exchange,
) -> None:
    operator = exchange.access("operator/maryam")
    endpoints = exchange.brokers[0].config.services[SERVICE].endpoints
    same = descriptor_pb2.FileDescriptorSet(file=[echo_file_descriptor()])
    published = await operator.PublishService(
        pb.PublishServiceRequest(
            name=SERVICE, provider="echo", endpoints=endpoints,
            contract=same.SerializeToString(), reason="new endpoints",
        )
    )  # fmt: skip
    assert published.registry_version == 2
    fd = echo_file_descriptor()
    kept = [m for m in fd.service[0].method if m.name != "Bidi"]
    del fd.service[0].method[:]
    fd.service[0].method.extend(kept)
    breaking = descriptor_pb2.FileDescriptorSet(file=[fd])
    e = await refused(
        lambda: operator.PublishService(
            pb.PublishServiceRequest(
                name=SERVICE, provider="echo", endpoints=endpoints,
                contract=breaking.SerializeToString(),
            )
        )
    )  # fmt: skip
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "breaks the published" in (e.details() or "") and "Bidi" in (e.details() or "")
    garbage = await refused(
        lambda: operator.PublishService(
            pb.PublishServiceRequest(
                name=SERVICE, provider="echo", endpoints=endpoints, contract=b"\xff\xff"
            )
        )
    )
    assert garbage.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exchange.brokers[0].config.registry_version == 2
