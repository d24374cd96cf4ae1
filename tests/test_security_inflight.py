"""Revocation reaches the calls already in flight, not only the calls after it.

An attacker whose certificate is about to be revoked opens long-lived calls first: client
and bidi streams, a server stream, a unary call the provider is slow to answer, a reflection
stream. Once operators revoke the certificate and the broker reloads, every one of them
ends with UNAUTHENTICATED, the provider's half of a stream is cancelled (never half-closed,
so no abandoned batch is committed), and the ledger records the end. The same holds at a
provider built on tabadol.client for a broker certificate its CRL now revokes, and for every
call in flight once the CRL goes stale under ``stale_crl = "refuse"``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tabadol.client import ProviderServer, connect
from tabadol.pki import CertificateAuthority
from tabadol.protocol import CONSUMER_KEY
from tests.conftest import TRUST_DOMAIN, start_broker
from tests.support.echo import (
    BIDI,
    CLIENT_STREAM,
    SERVER_STREAM,
    SERVICE,
    UNARY,
    EchoProvider,
    own_pki,
    start_echo,
)
from tests.support.exchange import OwnExchange, crl_signed_by, eventually, own_exchange

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


GRANTS = f"""
[[grant]]
consumer = "post"
service = "{SERVICE}"
methods = ["*"]

[[grant]]
consumer = "nocr"
service = "{SERVICE}"
methods = ["*"]
"""


@pytest.fixture
async def exchange(tmp_path: Path, echo_contracts: Path) -> AsyncIterator[OwnExchange]:
    async with own_exchange(tmp_path, echo_contracts, ("post", "nocr"), GRANTS) as running:
        yield running


def revoked_during_the_call(error: grpc.aio.AioRpcError) -> bool:
    details = error.details() or ""
    return error.code() is UNAUTHENTICATED and "was revoked during the call" in details


async def provider_has(echo: EchoProvider, method: str) -> None:
    assert await eventually(lambda: any(c.method == method for c in echo.calls))


# --- The broker ends a revoked consumer's calls in flight ------------------------------------


async def test_a_client_stream_opened_before_revocation_ends_unauthenticated_at_reload(
    exchange: OwnExchange,
) -> None:
    async with exchange.consumer("post") as channel:
        # The provider works on what it got once the stream ends: a cancel interrupts it.
        stream = channel.stream_unary(CLIENT_STREAM)(timeout=60, metadata=(("x-test-sleep", "50"),))
        await stream.write(b"invoice 1")
        await provider_has(exchange.echo, CLIENT_STREAM)

        exchange.revoke_and_reload("post")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream
    assert revoked_during_the_call(err.value), err.value
    assert "'post'" in (err.value.details() or "")
    # The provider saw a cancel, not a half-close: it commits nothing of the batch.
    (seen,) = [c for c in exchange.echo.calls if c.method == CLIENT_STREAM]
    assert await eventually(seen.cancelled.is_set)
    await exchange.broker.stop(0)
    assert ("post", "ClientStream", UNAUTHENTICATED.value[0], True) in exchange.ledger()


async def test_a_bidi_stream_opened_before_revocation_ends_unauthenticated_at_reload(
    exchange: OwnExchange,
) -> None:
    async with exchange.consumer("post") as channel:
        stream = channel.stream_stream(BIDI)(timeout=60)
        await stream.write(b"person 1")
        assert await stream.read() == b"person 1"

        exchange.revoke_and_reload("post")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.write(b"person 2")
            await stream.read()
    assert revoked_during_the_call(err.value), err.value


async def test_a_server_stream_is_cut_when_its_consumer_is_revoked(exchange: OwnExchange) -> None:
    metadata = (("x-test-count", "100000"), ("x-test-pause", "0.01"))
    async with exchange.consumer("post") as channel:
        stream = channel.unary_stream(SERVER_STREAM)(b"page", timeout=60, metadata=metadata)
        assert (await stream.read()).endswith(b"page")

        exchange.revoke_and_reload("post")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stream:
                pass
    assert revoked_during_the_call(err.value), err.value


async def test_a_unary_call_waiting_on_its_provider_ends_when_its_consumer_is_revoked(
    exchange: OwnExchange,
) -> None:
    async with exchange.consumer("post") as channel:
        call = channel.unary_unary(UNARY)(b"slow", timeout=60, metadata=(("x-test-sleep", "50"),))
        await provider_has(exchange.echo, UNARY)

        exchange.revoke_and_reload("post")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert revoked_during_the_call(err.value), err.value
    assert await eventually(exchange.echo.calls[0].cancelled.is_set)


async def test_a_call_held_open_before_its_request_message_ends_when_its_consumer_is_revoked(
    exchange: OwnExchange,
) -> None:
    """An attacker opens a unary call and never sends its message: nothing is forwarded yet,
    and still the call ends with the revocation."""
    async with exchange.consumer("post") as channel:
        held = channel.stream_unary(UNARY)(timeout=60)  # the same path, the request withheld
        await held.wait_for_connection()
        assert await eventually(lambda: bool(exchange.broker.drain.calls))

        exchange.revoke_and_reload("post")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await held
    assert revoked_during_the_call(err.value), err.value
    assert exchange.echo.calls == []


async def test_other_agencies_calls_in_flight_go_on_through_a_revocation(
    exchange: OwnExchange,
) -> None:
    async with exchange.consumer("post") as post, exchange.consumer("nocr") as nocr:
        revoked = post.stream_stream(BIDI)(timeout=60)
        await revoked.write(b"post")
        assert await revoked.read() == b"post"
        kept = nocr.stream_stream(BIDI)(timeout=60)
        await kept.write(b"nocr 1")
        assert await kept.read() == b"nocr 1"

        exchange.revoke_and_reload("post")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await revoked.read()
        await kept.write(b"nocr 2")
        assert await kept.read() == b"nocr 2"
        await kept.done_writing()
        assert await kept.code() is grpc.StatusCode.OK
    assert revoked_during_the_call(err.value)


async def test_a_reload_that_revokes_nobody_in_flight_ends_nothing(exchange: OwnExchange) -> None:
    async with exchange.consumer("post") as channel:
        stream = channel.stream_stream(BIDI)(timeout=60)
        await stream.write(b"one")
        assert await stream.read() == b"one"
        exchange.revoke_and_reload("nocr")
        await stream.write(b"two")
        assert await stream.read() == b"two"
        await stream.done_writing()
        assert await stream.code() is grpc.StatusCode.OK


async def test_calls_in_flight_end_when_the_crl_goes_stale_under_refuse(
    tmp_path: Path, echo_contracts: Path
) -> None:
    ca = own_pki(tmp_path, TRUST_DOMAIN, "post", "echo")
    provider, _ = await start_echo(ca.dir / "agencies" / "echo")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    (ca.dir / "crl.pem").write_bytes(crl_signed_by(ca, number=60, next_update=soon))
    broker = await start_broker(tmp_path, ca.dir, echo_contracts, [provider.address])
    try:
        async with connect(f"127.0.0.1:{broker.port}", ca.dir / "agencies" / "post") as channel:
            stream = channel.stream_stream(BIDI)(timeout=60)
            await stream.write(b"before")
            assert await stream.read() == b"before"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stream.read()  # nothing more comes: the stream ends once the CRL is stale
    finally:
        await broker.stop(0)
        await provider.stop(0)
    assert err.value.code() is UNAUTHENTICATED
    assert "went stale during the call" in (err.value.details() or "")


# --- Reflection streams are judged per request -----------------------------------------------


async def reflection_stream(
    channel: grpc.aio.Channel,
) -> grpc.aio.StreamStreamCall[
    reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call: grpc.aio.StreamStreamCall[
        reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse
    ] = stub.ServerReflectionInfo(timeout=60)
    return call


async def test_a_reflection_stream_stops_answering_once_its_agency_is_revoked(
    exchange: OwnExchange,
) -> None:
    async with exchange.consumer("post") as channel:
        stream = await reflection_stream(channel)
        await stream.write(reflection_pb2.ServerReflectionRequest(list_services="*"))
        listed = await stream.read()
        assert SERVICE in [s.name for s in listed.list_services_response.service]

        exchange.revoke_and_reload("post")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services="*"))
            await stream.read()
    assert err.value.code() is UNAUTHENTICATED
    assert "revoked" in (err.value.details() or "")


async def test_a_reflection_stream_follows_a_grant_removed_while_it_is_open(
    exchange: OwnExchange,
) -> None:
    async with exchange.consumer("nocr") as channel:
        stream = await reflection_stream(channel)
        await stream.write(reflection_pb2.ServerReflectionRequest(list_services="*"))
        assert SERVICE in [s.name for s in (await stream.read()).list_services_response.service]

        config = exchange.broker.config.path
        config.write_text(config.read_text().replace('consumer = "nocr"', 'consumer = "post"'))
        from tabadol.config import load

        exchange.broker.reload(load(config))

        await stream.write(reflection_pb2.ServerReflectionRequest(list_services="*"))
        after = await stream.read()
        await stream.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
        hidden = await stream.read()
        await stream.done_writing()
    assert SERVICE not in [s.name for s in after.list_services_response.service]
    assert hidden.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# --- A provider built on tabadol.client ends a revoked broker certificate's calls ------------


async def open_to_provider(
    provider: ProviderServer, ca: CertificateAuthority, cert: bytes, key: bytes
) -> tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall[bytes, bytes]]:
    """A bidi stream straight to the provider, as whoever holds this broker key."""
    channel = grpc.aio.secure_channel(
        provider.address,
        grpc.ssl_channel_credentials(ca.cert_pem(), key, cert),
        options=[("grpc.ssl_target_name_override", f"echo.agency.{TRUST_DOMAIN}")],
    )
    stream: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(BIDI)(
        timeout=60, metadata=((CONSUMER_KEY, "tax"),)
    )
    return channel, stream


async def test_a_provider_ends_a_stream_from_a_broker_certificate_superseded_meanwhile(
    exchange: OwnExchange,
) -> None:
    """The old broker key leaked; its holder opened a stream to the provider before the
    broker was reissued. The provider ends that stream once it takes the new CRL."""
    old_cert = (exchange.ca.dir / "broker.crt").read_bytes()
    old_key = (exchange.ca.dir / "broker.key").read_bytes()
    channel, stream = await open_to_provider(exchange.provider, exchange.ca, old_cert, old_key)
    try:
        await stream.write(b"forged 1")
        assert await stream.read() == b"forged 1"

        exchange.ca.issue_broker(force=True)  # the old certificate: revoked as superseded
        exchange.broker.reload(exchange.broker.config)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.read()
    finally:
        await channel.close()
    assert err.value.code() is UNAUTHENTICATED
    assert "was revoked during the call" in (err.value.details() or "")
    # The broker, with its new certificate, still gets through.
    async with exchange.consumer("post") as broker_channel:
        assert await broker_channel.unary_unary(UNARY)(b"ping", timeout=10) == b"ping"


async def test_a_provider_ends_a_slow_unary_call_when_its_broker_certificate_is_revoked(
    exchange: OwnExchange,
) -> None:
    old_cert = (exchange.ca.dir / "broker.crt").read_bytes()
    old_key = (exchange.ca.dir / "broker.key").read_bytes()
    async with grpc.aio.secure_channel(
        exchange.provider.address,
        grpc.ssl_channel_credentials(exchange.ca.cert_pem(), old_key, old_cert),
        options=[("grpc.ssl_target_name_override", f"echo.agency.{TRUST_DOMAIN}")],
    ) as channel:
        call = channel.unary_unary(UNARY)(
            b"slow", timeout=60, metadata=((CONSUMER_KEY, "tax"), ("x-test-sleep", "50"))
        )
        await provider_has(exchange.echo, UNARY)

        exchange.ca.issue_broker(force=True)
        exchange.broker.reload(exchange.broker.config)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert err.value.code() is UNAUTHENTICATED
    assert "was revoked during the call" in (err.value.details() or "")


# --- The demo takes a revocation on SIGHUP, as a real broker does ---------------------------


async def test_the_demo_takes_a_revocation_on_sighup_and_keeps_running(tmp_path: Path) -> None:
    import shlex
    import signal

    from tabadol.cli import main
    from tests.support.processes import ROOT, TABADOL, Process

    var = tmp_path / "var"
    demo = await Process.start(
        str(TABADOL), "demo", "--dir", str(var), "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--ops-http", "127.0.0.1:0",
        "--ops-otlp", "127.0.0.1:0", "--gateway-listen", "127.0.0.1:0",
        "--traffic-every", "0", read="stdout",
    )  # fmt: skip
    try:
        await demo.wait_for("Press Ctrl-C to stop")
        example = next(line.strip() for line in demo.lines if "tabadol call " in line)

        async def call_as_post() -> tuple[int, str]:
            call = await asyncio.create_subprocess_exec(
                *shlex.split(example), cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await call.communicate()
            return call.returncode or 0, out.decode()

        assert (await call_as_post())[0] == 0
        assert main(["pki", "revoke", "--dir", str(var / "pki"), "--agency", "post"]) == 0
        demo.proc.send_signal(signal.SIGHUP)

        async def post_refused() -> bool:
            code, out = await call_as_post()
            return code != 0 and "UNAUTHENTICATED" in out and "revoked" in out

        assert await eventually(post_refused, seconds=30)
        assert demo.proc.returncode is None  # SIGHUP did not end it
        demo.proc.send_signal(signal.SIGINT)
        assert await demo.exit_status() == 0
    finally:
        await demo.stop()
