"""Only a verified, unrevoked agency certificate gets in, and only to what it was granted."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tabadol.broker import Broker
from tabadol.client import ProviderServer, connect
from tabadol.pki import CertificateAuthority
from tabadol.spiffe import broker_dns_name
from tests.conftest import TRUST_DOMAIN, RunningProvider, start_broker
from tests.support.echo import SERVER_STREAM, UNARY, EchoProvider

Channel = Callable[[str], grpc.aio.Channel]


async def call_unary(channel: grpc.aio.Channel) -> bytes:
    result: bytes = await channel.unary_unary(UNARY)(b"ping", timeout=10)
    return result


async def refused(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call_unary(channel)
    return err.value


def raw_channel(
    broker: Broker, ca_pem: bytes, key: bytes | None, cert: bytes | None
) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(ca_pem, key, cert)
    return grpc.aio.secure_channel(
        f"127.0.0.1:{broker.port}",
        creds,
        options=[("grpc.ssl_target_name_override", broker_dns_name(TRUST_DOMAIN))],
    )


async def test_granted_agency_gets_through(channel_for: Channel) -> None:
    assert await call_unary(channel_for("post")) == b"ping"


async def test_no_client_certificate_is_refused_at_the_handshake(
    broker: Broker, pki: CertificateAuthority, channel_for: Channel
) -> None:
    async with raw_channel(broker, pki.cert_pem(), None, None) as channel:
        assert (await refused(channel)).code() is grpc.StatusCode.UNAVAILABLE
    assert await call_unary(channel_for("post")) == b"ping"


async def test_certificate_from_another_ca_is_refused(
    broker: Broker, tmp_path: Path, channel_for: Channel
) -> None:
    rogue = CertificateAuthority.init(tmp_path / "rogue", TRUST_DOMAIN)
    rogue.issue_agency("post")
    async with connect(f"127.0.0.1:{broker.port}", rogue.dir / "agencies" / "post") as channel:
        assert (await refused(channel)).code() is grpc.StatusCode.UNAVAILABLE
    assert await call_unary(channel_for("post")) == b"ping"


async def test_expired_certificate_is_refused(
    broker: Broker, pki: CertificateAuthority, tmp_path: Path
) -> None:
    bundle = pki.issue_agency(
        "post", force=True, days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    )
    expired = tmp_path / "expired"
    shutil.copytree(bundle, expired)
    pki.issue_agency("post", force=True)  # the session's other tests keep a valid one
    async with connect(f"127.0.0.1:{broker.port}", expired) as channel:
        assert (await refused(channel)).code() is grpc.StatusCode.UNAVAILABLE


async def test_broker_certificate_cannot_be_used_to_call_as_a_consumer(
    broker: Broker, pki: CertificateAuthority
) -> None:
    key, cert = (pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes()
    async with raw_channel(broker, pki.cert_pem(), key, cert) as channel:
        error = await refused(channel)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not an agency" in (error.details() or "")


async def test_unknown_methods_are_not_revealed_to_an_identity_that_is_refused(
    broker: Broker, pki: CertificateAuthority
) -> None:
    key, cert = (pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes()
    async with raw_channel(broker, pki.cert_pem(), key, cert) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/tabadol.test.v1.Echo/Nope")(b"", timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_agency_without_a_grant_is_denied_with_a_message_naming_everything(
    channel_for: Channel,
) -> None:
    error = await refused(channel_for("cra"))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    details = error.details() or ""
    assert "'cra'" in details and "'Unary'" in details and "tabadol.test.v1.Echo" in details


async def test_grant_for_one_method_does_not_allow_another(channel_for: Channel) -> None:
    assert await call_unary(channel_for("nocr")) == b"ping"
    call = channel_for("nocr").unary_stream(SERVER_STREAM)(b"", timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'ServerStream'" in (err.value.details() or "")


async def test_agency_cannot_bypass_the_broker_to_reach_a_provider(
    echo_provider: RunningProvider, pki: CertificateAuthority
) -> None:
    creds = grpc.ssl_channel_credentials(
        pki.cert_pem(),
        (pki.dir / "agencies/post/agency.key").read_bytes(),
        (pki.dir / "agencies/post/agency.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "echo.agency." + TRUST_DOMAIN)]
    async with grpc.aio.secure_channel(echo_provider.address, creds, options=options) as channel:
        error = await refused(channel)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "only from the Tabadol broker" in (error.details() or "")


async def test_revoked_agency_is_refused_after_reload(
    tmp_path: Path, echo_contracts: Path, echo_provider: RunningProvider, pki: CertificateAuthority
) -> None:
    own = CertificateAuthority.init(tmp_path / "pki", TRUST_DOMAIN)
    own.issue_broker()
    own.issue_agency("post")
    # A PKI of its own, so revoking here leaves the session's agencies alone.
    provider_bundle = own.issue_agency("echo")
    provider = ProviderServer(provider_bundle)
    provider.server.add_generic_rpc_handlers((EchoProvider(),))
    await provider.start()
    broker = await start_broker(tmp_path, own.dir, echo_contracts, [provider.address])
    try:
        async with connect(f"127.0.0.1:{broker.port}", own.dir / "agencies" / "post") as channel:
            assert await call_unary(channel) == b"ping"
            own.revoke_agency("post")
            broker.reload(broker.config)
            error = await refused(channel)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (error.details() or "")
    finally:
        await broker.stop(0)
        await provider.stop(0)


async def test_provider_endpoint_with_another_agencys_certificate_is_not_trusted(
    tmp_path: Path, echo_contracts: Path, pki: CertificateAuthority
) -> None:
    impostor = ProviderServer(pki.dir / "agencies" / "tax")  # configured as echo's endpoint
    impostor.server.add_generic_rpc_handlers((EchoProvider(),))
    await impostor.start()
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [impostor.address])
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            error = await refused(channel)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert "'echo'" in (error.details() or "")
    finally:
        await broker.stop(0)
        await impostor.stop(0)


async def test_unreachable_provider_gives_unavailable_naming_it(
    tmp_path: Path, echo_contracts: Path, pki: CertificateAuthority
) -> None:
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, ["127.0.0.1:1"])
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            error = await refused(channel)
            assert error.code() is grpc.StatusCode.UNAVAILABLE
            assert "provider 'echo'" in (error.details() or "")
            assert (await refused(channel)).code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await broker.stop(0)
