"""Attacks on self-service access from outside: a certificate of some kind, the broker's port
and the documentation. Each test is either a guard (the attack fails, and must keep failing)
or shows a weakness (it fails until the weakness is fixed)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tabadol.access import desk as desk_module
from tabadol.access.desk import CHANGE_BURST
from tabadol.pki import CertificateAuthority
from tabadol.platform.v1 import access_pb2 as pb
from tabadol.registry import open_registry
from tabadol.spiffe import broker_dns_name
from tests.conftest import TRUST_DOMAIN, RunningProvider
from tests.support.echo import SERVICE, UNARY
from tests.test_access import PURPOSE, Exchange, access, exchange, refused, soon

__all__ = ["exchange"]  # the fixture, shared with the Access service's own tests

EVERY_METHOD = {
    "ListGrants": pb.ListGrantsRequest(),
    "ListRequests": pb.ListRequestsRequest(),
    "GrantAccess": pb.GrantAccessRequest(
        consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE
    ),
    "RequestAccess": pb.RequestAccessRequest(service=SERVICE, methods=["*"], purpose=PURPOSE),
    "OnboardAgency": pb.OnboardAgencyRequest(id="mallory", name="Mallory"),
    "SetLimit": pb.SetLimitRequest(consumer="post", rate=1),
    "ListAuditEntries": pb.ListAuditEntriesRequest(),
}


def _channel(exchange: Exchange, cert: Path, key: Path, broker: int = 0) -> grpc.aio.Channel:
    pki = exchange.pki.dir
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{exchange.brokers[broker].port}",
        grpc.ssl_channel_credentials(
            (pki / "ca.crt").read_bytes(), key.read_bytes(), cert.read_bytes()
        ),
        options=[("grpc.ssl_target_name_override", broker_dns_name(TRUST_DOMAIN))],
    )
    exchange._channels.append(channel)
    return channel


async def _registry_versions(exchange: Exchange) -> int:
    store = open_registry(exchange.url)
    try:
        head = store.head()
    finally:
        store.close()
    return head.number if head is not None else 0


# -- escalation --------------------------------------------------------------------------------


async def test_an_auditor_and_the_brokers_own_certificate_may_use_no_access_method(
    exchange: Exchange, pki: CertificateAuthority
) -> None:
    auditor = pki.issue_person("auditor", "eve", force=True)
    holders = {
        "auditor": _channel(exchange, auditor / "auditor.crt", auditor / "auditor.key"),
        "broker": _channel(exchange, pki.dir / "broker.crt", pki.dir / "broker.key"),
    }
    before = await _registry_versions(exchange)
    for who, channel in holders.items():
        stub = access(channel)
        for method, message in EVERY_METHOD.items():
            e = await refused(lambda s=stub, m=method, msg=message: getattr(s, m)(msg))
            assert e.code() in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ), (who, method, e.code(), e.details())
    assert await _registry_versions(exchange) == before


async def test_a_revoked_operator_may_change_nothing(
    exchange: Exchange, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    pki.issue_person("operator", "revoked-oscar", force=True)
    pki.revoke_person("operator", "revoked-oscar", reason="key-compromise")
    await exchange.node(echo_contracts)  # loads the CRL that revokes it
    before = await _registry_versions(exchange)
    stub = exchange.access("operator/revoked-oscar", broker=1)
    for method, message in EVERY_METHOD.items():
        e = await refused(lambda m=method, msg=message: getattr(stub, m)(msg))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (method, e.details())
        assert "revoked" in (e.details() or "")
    assert await _registry_versions(exchange) == before


async def test_a_third_agency_sees_no_one_elses_grants_or_requests_whatever_it_filters(
    exchange: Exchange,
) -> None:
    await exchange.access("nocr").RequestAccess(
        pb.RequestAccessRequest(service=SERVICE, methods=["*"], purpose=PURPOSE)
    )
    tax = exchange.access("tax")
    for query in (
        pb.ListGrantsRequest(),
        pb.ListGrantsRequest(consumer="post"),
        pb.ListGrantsRequest(service=SERVICE),
    ):
        assert list((await tax.ListGrants(query)).grants) == []
    for rq in (pb.ListRequestsRequest(), pb.ListRequestsRequest(service=SERVICE)):
        assert list((await tax.ListRequests(rq)).requests) == []


async def test_a_consumer_cannot_forge_the_grant_or_purpose_the_provider_reads(
    exchange: Exchange, echo_provider: RunningProvider
) -> None:
    forged = (
        ("x-tabadol-grant", "g-forged"),
        ("x-tabadol-purpose", "national security"),
        ("x-tabadol-purpose-bin", b"\x00forged"),
        ("x-tabadol-consumer", "echo"),
    )
    await exchange.channel("post").unary_unary(UNARY)(b"ping", metadata=forged, timeout=5)
    seen = echo_provider.echo.calls[-1].metadata
    grants = await exchange.access("post").ListGrants(pb.ListGrantsRequest())
    assert seen["x-tabadol-grant"] == grants.grants[0].id
    assert seen["x-tabadol-consumer"] == "post"
    assert "x-tabadol-purpose-bin" not in seen
    assert seen.get("x-tabadol-purpose", "") != "national security"


async def test_a_purpose_with_line_breaks_reaches_the_provider_as_one_encoded_value(
    exchange: Exchange, echo_provider: RunningProvider
) -> None:
    injected = "Act 1\r\nx-tabadol-consumer: echo\r\n\u202etset"
    try:
        await exchange.access("echo").GrantAccess(
            pb.GrantAccessRequest(
                consumer="nocr", service=SERVICE, methods=["Unary"],
                purpose=pb.Purpose(text="checking", reference=injected),
            )
        )  # fmt: skip
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT  # refused outright: as safe
        return
    assert await exchange.unary("nocr") == grpc.StatusCode.OK
    seen = echo_provider.echo.calls[-1].metadata
    assert seen["x-tabadol-consumer"] == "nocr"
    assert "\r" not in seen["x-tabadol-purpose"] and "\n" not in seen["x-tabadol-purpose"]
    assert seen["x-tabadol-purpose"].isascii()


# -- races -------------------------------------------------------------------------------------


async def test_concurrent_changes_on_two_nodes_lose_no_update(
    exchange: Exchange, echo_contracts: Path
) -> None:
    await exchange.node(echo_contracts)
    made = await asyncio.gather(
        *(
            exchange.access("echo", broker=n % 2).GrantAccess(
                pb.GrantAccessRequest(
                    consumer="nocr", service=SERVICE, methods=["Unary"], purpose=PURPOSE
                )
            )
            for n in range(6)
        ),
        return_exceptions=True,
    )
    # A change that loses the race ATTEMPTS times answers ABORTED having changed nothing;
    # every change that answered OK is there, and the retries let racing changes through.
    failed = [m for m in made if isinstance(m, grpc.aio.AioRpcError)]
    assert {f.code() for f in failed} <= {grpc.StatusCode.ABORTED}
    assert len(failed) < len(made)
    listed = await exchange.access("echo").ListGrants(pb.ListGrantsRequest(consumer="nocr"))
    assert {g.id for g in listed.grants} == {
        m.grant.id for m in made if isinstance(m, pb.GrantAccessResponse)
    }


async def test_one_request_approved_twice_at_once_becomes_one_grant(
    exchange: Exchange, echo_contracts: Path
) -> None:
    await exchange.node(echo_contracts)
    made = await exchange.access("nocr").RequestAccess(
        pb.RequestAccessRequest(service=SERVICE, methods=["*"], purpose=PURPOSE)
    )
    answers = await asyncio.gather(
        *(
            exchange.access("echo", broker=n).ApproveRequest(
                pb.ApproveRequestRequest(request_id=made.request.id)
            )
            for n in (0, 1)
        ),
        return_exceptions=True,
    )
    approved = [a for a in answers if isinstance(a, pb.ApproveRequestResponse)]
    failed = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(approved) == 1
    assert [f.code() for f in failed] == [grpc.StatusCode.FAILED_PRECONDITION]
    listed = await exchange.access("echo").ListGrants(pb.ListGrantsRequest(consumer="nocr"))
    assert len(listed.grants) == 1


# -- sensitive services ------------------------------------------------------------------------


async def test_the_expiry_a_provider_approves_holds_after_the_operator_approves_too(
    exchange: Exchange,
) -> None:
    """On a sensitive service the provider approves first, for a shorter time than asked; the
    operator's approval must not silently give the consumer the longer (or unending) one."""
    operator = exchange.access("operator/maryam")
    endpoints = exchange.brokers[0].config.services[SERVICE].endpoints
    await operator.PublishService(
        pb.PublishServiceRequest(name=SERVICE, provider="echo", endpoints=endpoints, sensitive=True)
    )
    made = await exchange.access("nocr").RequestAccess(  # asks for ever
        pb.RequestAccessRequest(service=SERVICE, methods=["*"], purpose=PURPOSE)
    )
    week = soon(7 * 24 * 3600)
    await exchange.access("echo").ApproveRequest(
        pb.ApproveRequestRequest(request_id=made.request.id, expires_at=week)
    )
    done = await operator.ApproveRequest(pb.ApproveRequestRequest(request_id=made.request.id))
    assert done.grant.HasField("expires_at"), "the grant outlives what its provider approved"
    assert done.grant.expires_at.ToDatetime(dt.UTC) <= week.ToDatetime(dt.UTC)


# -- input the registry should never hold ------------------------------------------------------


async def test_a_request_may_not_list_a_method_many_times(exchange: Exchange) -> None:
    """Every version holds every entry, every node applies it and no request is ever dropped:
    one agency's megabytes of method names would be copied into every later version."""
    before = await _registry_versions(exchange)
    e = await refused(
        lambda: exchange.access("nocr").RequestAccess(
            pb.RequestAccessRequest(service=SERVICE, methods=["Unary"] * 200_000, purpose=PURPOSE)
        )
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "methods" in (e.details() or "")
    assert await _registry_versions(exchange) == before


async def test_many_unknown_method_names_are_refused_in_a_short_message(
    exchange: Exchange,
) -> None:
    e = await refused(
        lambda: exchange.access("nocr").RequestAccess(
            pb.RequestAccessRequest(
                service=SERVICE, methods=[f"M{n}" for n in range(20_000)], purpose=PURPOSE
            )
        )
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(e.details() or "") < 4096


@pytest.mark.parametrize(
    "text",
    [
        "ok\nrevoke grant g-0000000000000000: 'post' on x: by operator maryam",
        "ok\x1b[2J\x1b[Hall clear",
        "ok\u202e",
        "ok\x00",
    ],
    ids=["newline", "terminal-escape", "bidi-override", "nul"],
)
async def test_a_reason_cannot_carry_control_characters_into_the_audit_trail(
    exchange: Exchange, text: str
) -> None:
    before = await _registry_versions(exchange)
    e = await refused(
        lambda: exchange.access("nocr").RequestAccess(
            pb.RequestAccessRequest(
                service=SERVICE, methods=["Unary"], purpose=pb.Purpose(text=text)
            )
        )
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert "purpose" in (e.details() or "")
    assert await _registry_versions(exchange) == before


async def test_an_expiry_beyond_the_timestamp_range_is_refused_plainly(
    exchange: Exchange,
) -> None:
    far = Timestamp(seconds=2**62)
    e = await refused(
        lambda: exchange.access("echo").GrantAccess(
            pb.GrantAccessRequest(
                consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE, expires_at=far
            )
        )
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert "expires_at" in (e.details() or "")


async def test_an_expiry_at_the_end_of_the_timestamp_range_is_kept(exchange: Exchange) -> None:
    last = Timestamp()
    last.FromDatetime(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
    granted = await exchange.access("echo").GrantAccess(
        pb.GrantAccessRequest(
            consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE, expires_at=last
        )
    )
    assert granted.grant.expires_at == last
    assert await exchange.unary("nocr") == grpc.StatusCode.OK


async def test_a_long_persian_purpose_does_not_break_the_calls_its_grant_admits(
    exchange: Exchange,
) -> None:
    """The registry takes a purpose of 2000 characters; percent-encoded, a Persian letter takes
    six bytes of x-tabadol-purpose: about 10 KiB, past the 8 KiB a gRPC server is sure to read."""
    purpose = ("احراز هویت فرستنده " * 120)[:2000]
    await exchange.access("echo").GrantAccess(
        pb.GrantAccessRequest(
            consumer="nocr", service=SERVICE, methods=["*"], purpose=pb.Purpose(text=purpose)
        )
    )
    # Between gRPC's soft (8 KiB) and hard (16 KiB) metadata limits a server refuses a share
    # of the calls at random: every one of these must pass.
    unary = exchange.channel("nocr").unary_unary(UNARY)
    for _ in range(30):
        try:
            await unary(b"ping", timeout=5)
        except grpc.aio.AioRpcError as e:
            pytest.fail(f"{e.code()}: {e.details()}")


# -- flooding ----------------------------------------------------------------------------------


async def test_every_node_stops_an_agency_making_changes_too_fast(
    exchange: Exchange, echo_contracts: Path
) -> None:
    """Each node keeps its own budget (docs/access.md says so): with N nodes an agency makes
    at most N bursts of changes before each node refuses it."""
    await exchange.node(echo_contracts)
    made = []
    for node in (0, 1):
        stub = exchange.access("nocr", broker=node)
        count = 0
        while count <= 2 * CHANGE_BURST:
            try:
                rq = await stub.RequestAccess(
                    pb.RequestAccessRequest(service=SERVICE, methods=["Unary"], purpose=PURPOSE)
                )
                await stub.WithdrawRequest(pb.WithdrawRequestRequest(request_id=rq.request.id))
                count += 2
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert "too many changes" in (e.details() or "")
                break
        made.append(count)
    assert all(count <= CHANGE_BURST + 2 for count in made), made


async def test_closed_requests_do_not_pile_up_in_every_version(
    exchange: Exchange, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking and withdrawing must not grow every later version (and every node's copy)
    without bound: the entries keep a consumer's newest answered requests, the history all."""
    monkeypatch.setattr(desk_module, "KEPT_CLOSED", 3)
    stub = exchange.access("nocr")
    made = []
    for _ in range(8):
        rq = await stub.RequestAccess(
            pb.RequestAccessRequest(service=SERVICE, methods=["Unary"], purpose=PURPOSE)
        )
        await stub.WithdrawRequest(pb.WithdrawRequestRequest(request_id=rq.request.id))
        made.append(rq.request.id)
    store = open_registry(exchange.url)
    try:
        current = store.current()
        history = store.history()
    finally:
        store.close()
    assert current is not None
    assert [r["id"] for r in current.entries.get("request", [])] == made[-3:]
    ever = {r["id"] for v in history for r in v.entries.get("request", [])}
    assert ever == set(made)


# -- the registry unreachable ------------------------------------------------------------------


async def test_a_change_while_the_registry_is_down_is_unavailable_and_calls_go_on(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
    own_postgres: object,
) -> None:
    from tests.support.registry import import_registry, registry_config, registry_toml
    from tests.test_access import GRANTS

    cluster = own_postgres
    url = cluster.create_database()  # type: ignore[attr-defined]
    pki.issue_person("operator", "maryam", force=True)
    file = tmp_path / "registry.toml"
    file.write_text(registry_toml([echo_provider.address], GRANTS))
    first = tmp_path / "import.toml"
    registry_config(tmp_path, pki.dir, echo_contracts, url).rename(first)
    import_registry(first, file, reason="the first registry")
    ex = Exchange(tmp_path, pki, url)
    await ex.node(echo_contracts)
    try:
        cluster.stop()  # type: ignore[attr-defined]
        e = await refused(
            lambda: ex.access("echo").GrantAccess(
                pb.GrantAccessRequest(
                    consumer="nocr", service=SERVICE, methods=["*"], purpose=PURPOSE
                )
            )
        )
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
        assert await ex.unary("post") == grpc.StatusCode.OK
        assert await ex.unary("nocr") == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await ex.close()


async def test_one_consumers_request_does_not_stop_its_provider_reading_its_inbox(
    exchange: Exchange,
) -> None:
    """A request of a million method names (7 MB, under the broker's 8 MiB) is stored whole:
    the provider's ListRequests answer then outgrows what a gRPC client takes (4 MiB)."""
    # Refused; or committed, and the answer echoing it too large to receive.
    with contextlib.suppress(grpc.aio.AioRpcError):
        await exchange.access("nocr").RequestAccess(
            pb.RequestAccessRequest(
                service=SERVICE, methods=["Unary"] * 1_000_000, purpose=PURPOSE
            ),
            timeout=60,
        )
    listed = await exchange.access("echo").ListRequests(pb.ListRequestsRequest(), timeout=60)
    assert all(len(r.methods) <= 2 for r in listed.requests)
    assert await exchange.unary("post") == grpc.StatusCode.OK
