"""The broker forwards every RPC kind transparently: bytes, metadata, deadlines, status."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
import pytest

from tabadol.broker import Broker
from tabadol.client import keep_call_status
from tabadol.metadata import Metadata
from tabadol.pki import CertificateAuthority
from tests.conftest import RunningProvider, plain_channel
from tests.support.echo import BIDI, CLIENT_STREAM, SERVER_STREAM, UNARY, Seen

Channel = Callable[[str], grpc.aio.Channel]


def tagged(*pairs: tuple[str, str | bytes]) -> tuple[str, tuple[tuple[str, str | bytes], ...]]:
    tag = uuid.uuid4().hex
    return tag, (("x-test-id", tag), *pairs)


def seen(provider: RunningProvider, tag: str) -> Seen:
    matches = [c for c in provider.echo.calls if c.metadata.get("x-test-id") == tag]
    assert len(matches) == 1, f"provider saw {len(matches)} calls tagged {tag}"
    return matches[0]


async def test_unary_payload_arrives_byte_identical_both_ways(channel_for: Channel) -> None:
    # Not protobuf at all: a broker that parsed or re-serialized would mangle it.
    payload = os.urandom(70_000) + b"\xff\x00\x80"
    response = await channel_for("post").unary_unary(UNARY)(payload, timeout=10)
    assert response == payload


async def test_message_of_four_mib_passes_through(channel_for: Channel) -> None:
    payload = os.urandom(4 * 1024 * 1024 + 17)
    assert await channel_for("post").unary_unary(UNARY)(payload, timeout=30) == payload


async def test_message_over_the_configured_limit_is_refused(channel_for: Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel_for("post").unary_unary(UNARY)(b"x" * (9 * 1024 * 1024), timeout=30)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_server_stream_of_ten_thousand_messages_arrives_in_order(
    channel_for: Channel,
) -> None:
    _, md = tagged(("x-test-count", "10000"))
    call = channel_for("post").unary_stream(SERVER_STREAM)(b"addr", metadata=md, timeout=60)
    received = [message async for message in call]
    assert received == [i.to_bytes(4, "big") + b"addr" for i in range(10_000)]
    assert await call.code() is grpc.StatusCode.OK


async def test_client_stream_of_ten_thousand_messages_arrives_whole(channel_for: Channel) -> None:
    messages = [os.urandom(100) for _ in range(10_000)]
    response = await channel_for("post").stream_unary(CLIENT_STREAM)(iter(messages), timeout=60)
    digest = hashlib.sha256(b"".join(messages)).hexdigest()
    assert response == f"10000:{digest}".encode()


async def test_bidi_stream_of_ten_thousand_messages_echoes_each(channel_for: Channel) -> None:
    messages = [i.to_bytes(3, "big") + os.urandom(50) for i in range(10_000)]
    call = channel_for("post").stream_stream(BIDI)(iter(messages), timeout=60)
    assert [m async for m in call] == messages


async def test_bidi_stream_flows_message_by_message(channel_for: Channel) -> None:
    # Each answer must arrive before the next question is sent: nothing is buffered whole.
    call = channel_for("post").stream_stream(BIDI)(timeout=30)
    for i in range(5):
        await call.write(f"q{i}".encode())
        assert await call.read() == f"q{i}".encode()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK


async def test_provider_sees_the_consumers_deadline(
    channel_for: Channel, echo_provider: RunningProvider
) -> None:
    tag, md = tagged()
    await channel_for("post").unary_unary(UNARY)(b"", metadata=md, timeout=7)
    remaining = seen(echo_provider, tag).time_remaining
    assert remaining is not None
    # gRPC re-encodes the timeout per hop with coarse units, so allow rounding, not a bogus
    # far-future deadline.
    assert 0 < remaining < 7.5


async def test_no_deadline_stays_no_deadline(
    channel_for: Channel, echo_provider: RunningProvider
) -> None:
    tag, md = tagged()
    await channel_for("post").unary_unary(UNARY)(b"", metadata=md)
    assert seen(echo_provider, tag).time_remaining is None


async def test_slow_provider_gives_deadline_exceeded(channel_for: Channel) -> None:
    _, md = tagged(("x-test-sleep", "5"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel_for("post").unary_unary(UNARY)(b"", metadata=md, timeout=0.3)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("method", [UNARY, SERVER_STREAM])
async def test_consumer_cancel_reaches_the_provider_within_a_second(
    channel_for: Channel, echo_provider: RunningProvider, method: str
) -> None:
    tag, md = tagged(("x-test-sleep", "30"), ("x-test-count", "1"), ("x-test-fail-after", "0"))
    echo_provider.echo.call_started.clear()
    channel = channel_for("post")
    multi = channel.unary_unary(method) if method == UNARY else channel.unary_stream(method)
    call = multi(b"", metadata=md, timeout=60)
    while not any(c.metadata.get("x-test-id") == tag for c in echo_provider.echo.calls):
        await echo_provider.echo.call_started.wait()
        echo_provider.echo.call_started.clear()
    call.cancel()
    await asyncio.wait_for(seen(echo_provider, tag).cancelled.wait(), timeout=1)


async def test_status_details_and_trailers_come_back_unchanged(channel_for: Channel) -> None:
    rich_status = b"\x08\x05\x12\x04nope\x1a\x00"  # opaque to the broker
    _, md = tagged(
        ("x-test-status", "NOT_FOUND"),
        ("x-test-details", "no person with national id 0012345679"),
        ("x-test-trailer-bin", b"\x00\x01\x02"),
        ("x-test-status-details-bin", rich_status),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel_for("post").unary_unary(UNARY)(b"", metadata=md, timeout=10)
    error = err.value
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "no person with national id 0012345679"
    trailers = dict(error.trailing_metadata() or ())
    assert trailers["x-test-trailer-bin"] == b"\x00\x01\x02"
    assert trailers["grpc-status-details-bin"] == rich_status
    assert len(trailers["x-tabadol-request-id"]) == 32


async def test_stream_failure_mid_way_keeps_messages_and_status(channel_for: Channel) -> None:
    _, md = tagged(
        ("x-test-count", "10"),
        ("x-test-fail-after", "3"),
        ("x-test-status", "ABORTED"),
        ("x-test-details", "ledger conflict"),
    )
    call = channel_for("post").unary_stream(SERVER_STREAM)(b"m", metadata=md, timeout=10)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for message in call:
            received.append(message)
    assert len(received) == 3
    assert err.value.code() is grpc.StatusCode.ABORTED
    assert err.value.details() == "ledger conflict"


async def _ended_early(channel: grpc.aio.Channel, method: str, md: Metadata) -> grpc.aio.Call:
    """A call whose provider answers after the first of 200 messages of 64 KiB."""

    async def requests() -> AsyncIterator[bytes]:
        for _ in range(200):
            yield b"i" * 65536

    if method == CLIENT_STREAM:
        call = channel.stream_unary(method)(requests(), metadata=md, timeout=10)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        return call
    stream = channel.stream_stream(method)(requests(), metadata=md, timeout=10)
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in stream:
            pass
    return stream


@pytest.mark.parametrize("method", [CLIENT_STREAM, BIDI])
@pytest.mark.parametrize("status", ["INVALID_ARGUMENT", "OK"])
async def test_a_status_sent_while_the_consumer_is_still_sending_arrives_as_sent(
    channel_for: Channel, method: str, status: str
) -> None:
    # The provider answers the first message while more are on their way. A write that
    # races the call's end made grpc.aio report INTERNAL in place of the provider's status
    # (grpc#36066), on the broker's provider leg and in the consumer alike; in about one
    # call in four, so fifty calls show it.
    md: Metadata = (("x-test-end-early", "1"),)
    if status != "OK":
        md += (("x-test-status", status), ("x-test-details", "bad invoice 1"))
    outcomes = set()
    for _ in range(50):
        call = await _ended_early(channel_for("post"), method, md)
        outcomes.add(((await call.code()).name, await call.details()))
    assert outcomes == {(status, "bad invoice 1" if status != "OK" else "")}


def test_the_write_correction_applies_to_this_grpcio() -> None:
    assert keep_call_status(), (
        f"grpcio {grpc.__version__} has a different grpc.aio write step: check whether it still "
        "masks statuses (the test above) and update tabadol.client.call_status"
    )


async def test_initial_metadata_comes_back(channel_for: Channel) -> None:
    _, md = tagged(("x-test-initial", "from-provider"))
    call = channel_for("post").unary_unary(UNARY)(b"", metadata=md, timeout=10)
    await call
    assert dict(await call.initial_metadata())["x-test-initial"] == "from-provider"


async def test_request_metadata_crosses_but_platform_keys_are_the_brokers(
    channel_for: Channel, echo_provider: RunningProvider
) -> None:
    tag, md = tagged(
        ("x-agency-trace", "abc"),
        ("x-blob-bin", b"\xde\xad"),
        ("x-tabadol-consumer", "nocr"),
        ("x-tabadol-request-id", "forged"),
        ("x-tabadol-anything", "forged"),
    )
    await channel_for("post").unary_unary(UNARY)(b"", metadata=md, timeout=10)
    call = seen(echo_provider, tag)
    assert call.consumer == "post"
    metadata = call.metadata
    assert metadata["x-agency-trace"] == "abc"
    assert metadata["x-blob-bin"] == b"\xde\xad"
    assert metadata["x-tabadol-consumer"] == "post"
    assert metadata["x-tabadol-request-id"] != "forged"
    assert "x-tabadol-anything" not in metadata


async def test_each_call_gets_its_own_request_id(
    channel_for: Channel, echo_provider: RunningProvider
) -> None:
    ids = set()
    for _ in range(3):
        tag, md = tagged()
        await channel_for("post").unary_unary(UNARY)(b"", metadata=md, timeout=10)
        ids.add(seen(echo_provider, tag).metadata["x-tabadol-request-id"])
    assert len(ids) == 3


async def test_unknown_service_is_unimplemented_and_named(channel_for: Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel_for("post").unary_unary("/tabadol.nope.v1.Ghost/Haunt")(b"", timeout=10)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "tabadol.nope.v1.Ghost" in (err.value.details() or "")


async def test_unknown_method_of_a_known_service_is_unimplemented(channel_for: Channel) -> None:
    call = channel_for("post").stream_stream("/tabadol.test.v1.Echo/Nope")(iter([b""]), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "'Nope'" in (err.value.details() or "")


async def test_broker_keeps_serving_after_errors(
    channel_for: Channel, broker: Broker, pki: CertificateAuthority
) -> None:
    async with plain_channel(broker, pki, "post") as hostile:
        for path in ("/x/y", "/tabadol.test.v1.Echo/Nope", "garbage", "//", "/a/b/c"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await hostile.unary_unary(path)(b"", timeout=10)
            assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert await channel_for("post").unary_unary(UNARY)(b"ok", timeout=10) == b"ok"


async def test_consumer_cancel_mid_client_stream_reaches_the_provider(
    channel_for: Channel, echo_provider: RunningProvider
) -> None:
    tag, md = tagged(("x-test-sleep", "30"))  # the provider then works on what it got
    call = channel_for("post").stream_unary(CLIENT_STREAM)(metadata=md, timeout=60)
    await call.write(b"invoice-1")
    await call.write(b"invoice-2")
    while not any(c.metadata.get("x-test-id") == tag for c in echo_provider.echo.calls):
        echo_provider.echo.call_started.clear()
        await echo_provider.echo.call_started.wait()
    call.cancel()
    await asyncio.wait_for(seen(echo_provider, tag).cancelled.wait(), timeout=5)


async def test_a_request_stream_cut_by_a_cancel_ends_in_a_cancel_not_a_half_close() -> None:
    # gRPC ends a server's request iterator alike for a half-close and a cancel; the broker
    # must pass a cancel on as a cancel, or a provider could commit an abandoned batch.
    from tabadol.admission import CallFacts
    from tabadol.broker.call import Call, Traffic
    from tabadol.broker.forward import requests_of
    from tabadol.broker.tracing import NOT_TRACED
    from tabadol.broker.upstream import Route
    from tabadol.contracts import MethodContract, RpcKind

    async def two() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    method = MethodContract("s.S", "M", RpcKind.CLIENT_STREAMING)
    route = Route(method, "p", ())

    def call() -> Call:
        return Call(CallFacts(method, "p", "r", None, ()), NOT_TRACED, Traffic())

    async def relay(handler: asyncio.Task[None] | None) -> list[bytes]:
        return [m async for m in requests_of(two(), call(), handler, route)]

    calm = asyncio.create_task(asyncio.sleep(3600))
    assert await relay(calm) == [b"a", b"b"]  # a genuine half-close stays one

    cancelled = asyncio.create_task(asyncio.sleep(3600))
    cancelled.cancel()  # as gRPC does to the handler when the consumer goes away
    with pytest.raises(asyncio.CancelledError):
        await relay(cancelled)
    calm.cancel()


async def test_providers_own_unavailable_details_pass_unchanged(channel_for: Channel) -> None:
    _, md = tagged(
        ("x-test-status", "UNAVAILABLE"),
        ("x-test-details", "our registry database is down for maintenance"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel_for("post").unary_unary(UNARY)(b"", metadata=md, timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "our registry database is down for maintenance"


async def test_broker_refusals_carry_a_request_id(channel_for: Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel_for("cra").unary_unary(UNARY)(b"", timeout=10)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(dict(err.value.trailing_metadata() or ())["x-tabadol-request-id"]) == 32


def test_request_ids_are_128_random_bits_each_and_never_repeat() -> None:
    from tabadol.broker.call import RequestIds

    ids = RequestIds()
    drawn = [ids.next() for _ in range(1000)]  # several 4 KiB reads of the OS's source
    assert len(set(drawn)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in drawn)
    assert RequestIds().next() not in drawn  # another pool, another read
