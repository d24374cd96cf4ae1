"""The broker and providers as real processes: crashes, signals and reloads."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc
import grpc.aio
import pytest

from tabadol import config
from tabadol.client import connect
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, RunningProvider, broker_toml, start_broker
from tests.support.echo import SERVER_STREAM, SERVICE, UNARY
from tests.support.processes import TABADOL, Process


async def test_provider_killed_mid_stream_gives_unavailable_then_broker_serves_on(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    provider = await Process.start(
        sys.executable,
        "-m",
        "tests.support.echo_process",
        str(pki.dir / "agencies" / "echo"),
        read="stdout",
    )
    port = int((await provider.wait_for(r"listening on (\d+)"))[1])
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [f"127.0.0.1:{port}"])
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            md = (("x-test-count", "1000"), ("x-test-pause", "0.05"))
            call = channel.unary_stream(SERVER_STREAM)(b"", metadata=md, timeout=60)
            assert await call.read() != grpc.aio.EOF
            provider.kill()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            # The broker itself is fine: another call gets a clean answer, not a hang.
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await channel.unary_unary(UNARY)(b"", timeout=10)
            assert again.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await provider.stop()
        await broker.stop(0)


def _write_config(
    path: Path, pki: CertificateAuthority, contracts: Path, endpoint: str, grants: str
) -> None:
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=contracts, endpoints=[endpoint], grants=grants)
    )


GRANT_CRA = f"""
[[grant]]
consumer = "cra"
service = "{SERVICE}"
methods = ["Unary"]
"""


async def test_sighup_reloads_a_good_file_and_refuses_a_bad_one_without_dropping_calls(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    config = tmp_path / "broker.toml"
    _write_config(config, pki, echo_contracts, echo_provider.address, DEFAULT_GRANTS)
    broker = await Process.start(str(TABADOL), "broker", "--config", str(config))
    try:
        port = (await broker.wait_for(r"broker listening on 127\.0\.0\.1:(\d+)"))[1]
        post = connect(f"127.0.0.1:{port}", pki.dir / "agencies" / "post")
        cra = connect(f"127.0.0.1:{port}", pki.dir / "agencies" / "cra")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cra.unary_unary(UNARY)(b"", timeout=10)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED

        # A good file: cra gains a grant; a call in flight across the reload completes.
        in_flight = asyncio.ensure_future(
            post.unary_unary(UNARY)(b"slow", metadata=(("x-test-sleep", "1"),), timeout=30)
        )
        _write_config(
            config, pki, echo_contracts, echo_provider.address, DEFAULT_GRANTS + GRANT_CRA
        )
        broker.proc.send_signal(signal.SIGHUP)
        await broker.wait_for("configuration reloaded")
        assert await cra.unary_unary(UNARY)(b"now", timeout=10) == b"now"
        assert await in_flight == b"slow"

        # A bad file: refused with the reason, and the previous configuration keeps serving.
        config.write_text(config.read_text().replace('consumer = "cra"', 'consumer = "nobody"'))
        broker.proc.send_signal(signal.SIGHUP)
        match = await broker.wait_for("reload refused")
        assert match
        problem = await broker.wait_for(r"consumer 'nobody' is not a declared \[\[agency\]\]")
        assert str(config) in problem.string
        assert await cra.unary_unary(UNARY)(b"still", timeout=10) == b"still"
        await post.close()
        await cra.close()

        broker.proc.send_signal(signal.SIGTERM)
        await broker.wait_for("broker stopped")
        assert await broker.exit_status() == 0
    finally:
        await broker.stop()


async def test_broker_refuses_to_start_on_a_bad_file_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[broker]\nlisten = "127.0.0.1:7443"\n')
    broker = await Process.start(str(TABADOL), "broker", "--config", str(config))
    await broker.wait_for(
        r"tabadol: error: .*broker\.toml: \[broker\] trust_domain: Field required"
    )
    assert await broker.exit_status() == 2


async def test_reload_that_moves_a_service_lets_calls_in_flight_finish_on_the_old_endpoint(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    from tabadol.client import ProviderServer
    from tests.support.echo import EchoProvider

    second = ProviderServer(pki.dir / "agencies" / "echo")
    second_echo = EchoProvider()
    second.server.add_generic_rpc_handlers((second_echo,))
    await second.start()
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [echo_provider.address])
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            echo_provider.echo.call_started.clear()
            in_flight = asyncio.ensure_future(
                channel.unary_unary(UNARY)(b"slow", metadata=(("x-test-sleep", "1"),))
            )
            await echo_provider.echo.call_started.wait()
            (tmp_path / "broker.toml").write_text(
                broker_toml(
                    pki_dir=pki.dir, contracts=echo_contracts, endpoints=[second.address],
                    grants=DEFAULT_GRANTS,
                )
            )  # fmt: skip
            broker.reload(config.load(tmp_path / "broker.toml"))
            # No deadline on the slow call: if the old channel were closed under it, this
            # would hang or fail instead.
            assert await asyncio.wait_for(in_flight, timeout=30) == b"slow"
            assert await channel.unary_unary(UNARY)(b"new", timeout=10) == b"new"
            assert len(second_echo.calls) == 1
    finally:
        await broker.stop(0)
        await second.stop(0)
