"""Traffic management: limits, sizes, stream time, failover and retries, from the config."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.client import ProviderServer, connect
from tabadol.limits import LimitRule, Limits, Refusal, RetryBudget
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, RunningProvider, broker_toml
from tests.support.echo import (
    BIDI,
    CLIENT_STREAM,
    SERVICE,
    UNARY,
    EchoProvider,
    write_echo_contracts,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_rate_limit_admits_its_burst_then_says_when_to_retry() -> None:
    clock = Clock()
    limits = Limits(clock)
    limits.configure([LimitRule("post", None, rate=2.0, burst=2.0, concurrency=None)])
    assert not isinstance(limits.admit("post", "s"), Refusal)
    assert not isinstance(limits.admit("post", "s"), Refusal)
    refused = limits.admit("post", "s")
    assert isinstance(refused, Refusal)
    assert refused.retry_after_s == pytest.approx(0.5)
    assert "rate limit of 2 calls/s across all services" in refused.message
    clock.now += 0.5
    assert not isinstance(limits.admit("post", "s"), Refusal)
    assert not isinstance(limits.admit("tax", "s"), Refusal)  # other agencies are not limited


def test_a_concurrency_limit_counts_calls_in_flight_per_service() -> None:
    limits = Limits(Clock())
    limits.configure([LimitRule("post", "s", rate=None, burst=None, concurrency=1)])
    first = limits.admit("post", "s")
    assert not isinstance(first, Refusal)
    refused = limits.admit("post", "s")
    assert isinstance(refused, Refusal) and "for service 's'" in refused.message
    assert not isinstance(limits.admit("post", "other"), Refusal)
    first.release()
    assert not isinstance(limits.admit("post", "s"), Refusal)


def test_reconfiguring_keeps_calls_in_flight_counted() -> None:
    limits = Limits(Clock())
    limits.configure([LimitRule("post", None, rate=None, burst=None, concurrency=1)])
    held = limits.admit("post", "s")
    limits.configure([LimitRule("post", None, rate=None, burst=None, concurrency=2)])
    assert not isinstance(limits.admit("post", "s"), Refusal)
    assert isinstance(limits.admit("post", "s"), Refusal)
    assert not isinstance(held, Refusal)


def test_the_retry_budget_allows_a_share_of_calls() -> None:
    budget = RetryBudget(0.5, cap=2.0)
    assert budget.spend() and budget.spend() and not budget.spend()
    budget.earn()
    budget.earn()
    assert budget.spend() and not budget.spend()


async def broker_with(
    tmp_path: Path, pki: CertificateAuthority, endpoints: list[str], extra: str = "",
    service_extra: str = "", contracts: Path | None = None,
) -> Broker:  # fmt: skip
    contracts = contracts or write_echo_contracts(tmp_path / "echo.pb")
    text = broker_toml(
        pki_dir=pki.dir, contracts=contracts, endpoints=endpoints, grants=DEFAULT_GRANTS,
        extra_broker="health_check_seconds = 0.2",
    ).replace("[[grant]]", service_extra + "\n[[grant]]", 1) + extra  # fmt: skip
    (tmp_path / "broker.toml").write_text(text)
    broker = Broker(config.load(tmp_path / "broker.toml"))
    await broker.start()
    return broker


async def test_over_the_rate_limit_a_call_gets_resource_exhausted_with_a_retry_hint(
    tmp_path: Path, pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    limit = '\n[[limit]]\nconsumer = "post"\nrate = 1\nburst = 2\n'
    broker = await broker_with(tmp_path, pki, [echo_provider.address], extra=limit)
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            for _ in range(2):
                await channel.unary_unary(UNARY)(b"ok", timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"one too many", timeout=10)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "'post' is over its rate limit of 1 calls/s" in (err.value.details() or "")
            trailers = dict(err.value.trailing_metadata() or ())
            assert int(trailers["x-tabadol-retry-after-ms"]) > 0
            assert trailers["grpc-retry-pushback-ms"] == trailers["x-tabadol-retry-after-ms"]
            # Limits reload with the configuration.
            text = (
                (tmp_path / "broker.toml").read_text().replace("rate = 1\nburst = 2", "rate = 1000")
            )
            (tmp_path / "broker.toml").write_text(text)
            broker.reload(config.load(tmp_path / "broker.toml"))
            assert await channel.unary_unary(UNARY)(b"now", timeout=10) == b"now"
    finally:
        await broker.stop(0)


async def test_over_the_concurrency_limit_a_call_is_refused_until_one_ends(
    tmp_path: Path, pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    limit = f'\n[[limit]]\nconsumer = "post"\nservice = "{SERVICE}"\nconcurrency = 2\n'
    broker = await broker_with(tmp_path, pki, [echo_provider.address], extra=limit)
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            seen = len(echo_provider.echo.calls)
            slow = [
                asyncio.ensure_future(
                    channel.unary_unary(UNARY)(
                        b"slow", metadata=(("x-test-sleep", "1"),), timeout=10
                    )
                )
                for _ in range(2)
            ]
            while len(echo_provider.echo.calls) < seen + 2:  # both reached the provider
                echo_provider.echo.call_started.clear()
                await echo_provider.echo.call_started.wait()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"third", timeout=10)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already has 2 calls in flight" in (err.value.details() or "")
            assert await asyncio.gather(*slow) == [b"slow", b"slow"]
            assert await channel.unary_unary(UNARY)(b"after", timeout=10) == b"after"
    finally:
        await broker.stop(0)


async def test_a_message_over_the_services_size_limit_is_refused_in_every_direction(
    tmp_path: Path, pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    broker = await broker_with(tmp_path, pki, [echo_provider.address], service_extra="", extra="")
    await broker.stop(0)
    text = (
        (tmp_path / "broker.toml")
        .read_text()
        .replace(f'name = "{SERVICE}"', f'name = "{SERVICE}"\nmax_message_bytes = 1000')
    )
    (tmp_path / "broker.toml").write_text(text)
    broker = Broker(config.load(tmp_path / "broker.toml"))
    await broker.start()
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            assert await channel.unary_unary(UNARY)(b"x" * 1000, timeout=10) == b"x" * 1000
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"x" * 1001, timeout=10)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"1001 bytes is over the limit of 1000 bytes for service '{SERVICE}'" in (
                err.value.details() or ""
            )
            upload = channel.stream_unary(CLIENT_STREAM)(iter([b"a" * 10, b"b" * 5000]), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await upload
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await channel.unary_unary(UNARY)(b"still", timeout=10) == b"still"
    finally:
        await broker.stop(0)


async def test_a_stream_past_its_maximum_duration_or_idle_time_is_ended_with_a_reason(
    tmp_path: Path, pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    broker = await broker_with(tmp_path, pki, [echo_provider.address])
    await broker.stop(0)
    text = (
        (tmp_path / "broker.toml")
        .read_text()
        .replace(
            f'name = "{SERVICE}"',
            f'name = "{SERVICE}"\nmax_stream_seconds = 3\nstream_idle_seconds = 0.3',
        )
    )
    (tmp_path / "broker.toml").write_text(text)
    broker = Broker(config.load(tmp_path / "broker.toml"))
    await broker.start()
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            idle = channel.stream_stream(BIDI)(timeout=30)
            await idle.write(b"hello")
            assert await idle.read() == b"hello"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await idle.read()  # and then nothing, either way
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle for 0.3 s" in (err.value.details() or "")

            async def chatty() -> AsyncIterator[bytes]:
                for _ in range(200):
                    yield b"tick"
                    await asyncio.sleep(0.1)  # the consumer's own pace, within the idle limit

            long = channel.stream_stream(BIDI)(chatty(), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in long:
                    pass
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "may last at most 3 s" in (err.value.details() or "")
    finally:
        await broker.stop(0)


async def test_with_one_of_two_endpoints_down_every_call_is_served_by_the_other(
    tmp_path: Path, pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    broker = await broker_with(tmp_path, pki, ["127.0.0.1:1", echo_provider.address])
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            for i in range(40):
                assert (
                    await channel.unary_unary(UNARY)(str(i).encode(), timeout=10) == str(i).encode()
                )
            stream = channel.stream_stream(BIDI)(iter([b"a", b"b"]), timeout=10)
            assert [m async for m in stream] == [b"a", b"b"]
    finally:
        await broker.stop(0)


async def test_an_idempotent_call_is_retried_elsewhere_and_a_non_idempotent_one_is_not(
    tmp_path: Path, pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    # Two live endpoints; one dies. Until the health check notices, calls routed to it fail
    # to connect: the idempotent Unary is retried on the other, ClientStream is not.
    doomed = ProviderServer(pki.dir / "agencies" / "echo")
    doomed.server.add_generic_rpc_handlers((EchoProvider(),))
    await doomed.start()
    contracts = write_echo_contracts(tmp_path / "idem.pb", idempotent=True)
    broker = await broker_with(
        tmp_path, pki, [doomed.address, echo_provider.address], contracts=contracts,
        extra="",
    )  # fmt: skip
    broker.health._interval = 3600  # the health check stays out of it: retries must do it
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            for _ in range(4):  # both endpoints serve while alive
                await channel.unary_unary(UNARY)(b"warm", timeout=10)
            await doomed.stop(0)
            for i in range(6):
                assert (
                    await channel.unary_unary(UNARY)(f"{i}".encode(), timeout=10) == f"{i}".encode()
                )
        # Fresh state for the non-idempotent check: the endpoint may have been ejected by now.
    finally:
        await broker.stop(0)

    broker = await broker_with(
        tmp_path, pki, [doomed.address, echo_provider.address], contracts=contracts
    )
    broker.health._interval = 3600
    for upstream in broker._upstreams.values():
        # As if the dead endpoint had passed its checks just before it died.
        upstream.health.healthy = upstream.health.trusted = True
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            failures = 0
            for _ in range(2):  # round robin: one of these two goes to the dead endpoint
                upload = channel.stream_unary(CLIENT_STREAM)(iter([b"x"]), timeout=10)
                try:
                    await upload
                except grpc.aio.AioRpcError as e:
                    assert e.code() is grpc.StatusCode.UNAVAILABLE
                    assert "provider 'echo' unreachable" in (e.details() or "")
                    failures += 1
            assert failures == 1
    finally:
        await broker.stop(0)
