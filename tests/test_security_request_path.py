"""The request path (admission, Call/Ending, tracing, span export) against a hostile agency
(its certificate, a revoked one) or a hostile provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tabadol.broker import Broker
from tabadol.broker.upstream import Upstream
from tabadol.client import ProviderServer
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, RunningProvider, start_broker
from tests.support.echo import SERVER_STREAM, SERVICE, UNARY, start_echo
from tests.support.exchange import eventually


def plain(broker: Broker, pki_dir: Path, agency: str) -> grpc.aio.Channel:
    """mTLS as any gRPC client opens it: no Tabadol helpers, no interceptors of ours."""
    bundle = pki_dir / "agencies" / agency
    creds = grpc.ssl_channel_credentials(
        (pki_dir / "ca.crt").read_bytes(),
        (bundle / "agency.key").read_bytes(),
        (bundle / "agency.crt").read_bytes(),
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{broker.port}",
        creds,
        options=[("grpc.ssl_target_name_override", f"broker.{TRUST_DOMAIN}")],
    )


def ledger_records(path: Path) -> list[Any]:
    store = SqliteLedgerStore(path, readonly=True)
    try:
        return [stored.record for stored in store.records()]
    finally:
        store.close()


class Recorder(grpc.GenericRpcHandler):
    """A provider that keeps every metadata pair it received, duplicates and order kept."""

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[str, Any], ...]] = []

    async def _unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.seen.append(tuple(context.invocation_metadata() or ()))
        return request

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        if details.method == UNARY:
            return grpc.unary_unary_rpc_method_handler(self._unary)
        return None


@pytest.fixture
async def recording_provider(pki: CertificateAuthority) -> AsyncIterator[tuple[str, Recorder]]:
    server = ProviderServer(pki.dir / "agencies" / "echo")
    recorder = Recorder()
    server.server.add_generic_rpc_handlers((recorder,))
    await server.start()
    yield server.address, recorder
    await server.stop(0)


# --- Trace context: what a consumer sends never reaches the provider as its own ------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
# gRPC itself keeps one traceparent, the last sent (its core treats the key as single).
SMUGGLED = (
    ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
    ("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01"),
    ("tracestate", "vendor=ok"),
    ("tracestate", "other=fine,Upper=no"),  # not a valid member: the whole tracestate goes
    ("tracestate-bin", b"\x00\xff"),
)


async def test_the_provider_gets_only_the_brokers_trace_context_and_the_ledger_the_first_id(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    recording_provider: tuple[str, Recorder],
) -> None:
    address, recorder = recording_provider
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [address],
        tracing='exporter = "none"', ledger='path = "ledger.db"',
    )  # fmt: skip
    try:
        channel = plain(broker, pki.dir, "post")
        assert await eventually(lambda: all(u.health.trusted for u in broker._upstreams.values()))
        assert await channel.unary_unary(UNARY)(b"x", metadata=SMUGGLED, timeout=10) == b"x"
        valid = (("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01"), ("tracestate", "k=v"))
        await channel.unary_unary(UNARY)(b"y", metadata=valid, timeout=10)
        await channel.close()
    finally:
        await broker.stop()
    first, second = recorder.seen
    parents = [v for k, v in first if k == "traceparent"]
    states = [v for k, v in first if k == "tracestate"]
    assert len(parents) == 1 and parents[0].split("-")[1] == TRACE
    assert parents[0].split("-")[2] != "00f067aa0ba902b7"  # the broker's hop is the parent
    assert states == []  # one malformed member drops the consumer's tracestate whole
    assert [k for k, _ in first if k.startswith("x-tabadol-")] == [
        "x-tabadol-consumer",
        "x-tabadol-request-id",
        "x-tabadol-grant",  # a file grant without a purpose: its id, and no x-tabadol-purpose
    ]
    assert dict(first)["x-tabadol-consumer"] == "post"
    assert dict(first)["x-tabadol-grant"].startswith("file-")
    assert [v for k, v in second if k == "tracestate"] == ["k=v"]
    trace_ids = [r.trace_id for r in ledger_records(tmp_path / "ledger.db")]
    assert trace_ids == [TRACE, TRACE]


# --- Endpoint health and the ledger: only a call that was forwarded names an endpoint -------


async def test_calls_that_cannot_reach_an_endpoint_set_it_aside(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    """eject_after calls in a row that could not reach an endpoint set it aside; a
    non-idempotent call (never retried) that failed to connect counts as one of them."""
    provider, _ = await start_echo(pki.dir / "agencies" / "echo")
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [provider.address])
    try:
        (dead,) = broker._upstreams.values()
        assert await eventually(lambda: dead.health.trusted is True)
        await provider.stop(0)  # the endpoint dies after it was trusted
        channel = plain(broker, pki.dir, "post")
        for _ in range(dead.health.eject_after):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"v", timeout=10)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "unreachable" in (err.value.details() or "")
        await channel.close()
        assert dead.health.ejections == 1, (
            f"{dead.health.eject_after} calls failed to connect, yet the endpoint was counted "
            f"as reached ({dead.health.failures} failures on record)"
        )
    finally:
        await broker.stop()
        await provider.stop(0)


async def test_a_call_never_forwarded_names_no_endpoint_and_does_not_vouch_for_it(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    """A unary call that half-closes without its message is admitted and given an endpoint,
    but never forwarded: its record must not say it went there, nor count as reaching it."""
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address], ledger='path = "ledger.db"'
    )
    try:
        (upstream,) = broker._upstreams.values()
        assert await eventually(lambda: upstream.health.trusted is True)
        upstream.health.failures = 2  # as two calls before that could not connect left it
        channel = plain(broker, pki.dir, "post")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.stream_unary(UNARY)(iter(()), timeout=10)
        assert err.value.code() is grpc.StatusCode.INTERNAL
        await channel.close()
        failures = upstream.health.failures
    finally:
        await broker.stop()
    (record,) = ledger_records(tmp_path / "ledger.db")
    assert (record.status_code, record.endpoint) == (13, ""), record.endpoint
    assert failures == 2


# --- Accounting: every way a call ends gives back what it held ------------------------------


def in_flight_of(broker: Broker) -> tuple[int, int]:
    upstreams: list[Upstream] = list(broker._upstreams.values())
    return broker.drain.in_flight, sum(u.in_flight for u in upstreams)


LIMITED = DEFAULT_GRANTS + (
    f'\n[[limit]]\nconsumer = "post"\nservice = "{SERVICE}"\nconcurrency = 1\n'
    '\n[[limit]]\nconsumer = "nocr"\nconcurrency = 1\n'
)


async def test_every_ending_gives_back_the_concurrency_permit_and_the_in_flight_count(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address], grants=LIMITED,
        ledger='path = "ledger.db"',
    )  # fmt: skip
    try:
        assert await eventually(lambda: all(u.health.trusted for u in broker._upstreams.values()))
        post = plain(broker, pki.dir, "post")
        nocr = plain(broker, pki.dir, "nocr")
        # nocr: refused by policy after its concurrency limit admitted it, many times over.
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await nocr.unary_stream(SERVER_STREAM)(b"no grant", timeout=10).read()
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # post: a request without a message, an error relayed from the provider, a call
        # cancelled while the provider sleeps, and a server stream abandoned mid-way.
        with pytest.raises(grpc.aio.AioRpcError):
            await post.stream_unary(UNARY)(iter(()), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await post.unary_unary(UNARY)(
                b"e", metadata=(("x-test-status", "NOT_FOUND"),), timeout=10
            )
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        slow = post.unary_unary(UNARY)(b"s", metadata=(("x-test-sleep", "30"),), timeout=30)
        assert await eventually(lambda: broker.drain.in_flight == 1)
        slow.cancel()
        assert await eventually(lambda: in_flight_of(broker) == (0, 0))
        stream = post.unary_stream(SERVER_STREAM)(
            b"m", metadata=(("x-test-count", "1000"), ("x-test-pause", "0.01")), timeout=30
        )
        await stream.read()
        stream.cancel()
        assert await eventually(lambda: in_flight_of(broker) == (0, 0))
        # Each permit came back: one call at a time still goes.
        assert await post.unary_unary(UNARY)(b"ok", timeout=10) == b"ok"
        assert await nocr.unary_unary(UNARY)(b"ok", timeout=10) == b"ok"
        await post.close()
        await nocr.close()
    finally:
        await broker.stop()
    codes = [r.status_code for r in ledger_records(tmp_path / "ledger.db")]
    assert codes == [7, 7, 7, 13, 5, 1, 1, 0, 0]


# --- A hostile provider: its failures never show the consumer the exchange's addresses ------


async def test_a_provider_that_dies_mid_stream_does_not_reveal_its_address(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    provider, _ = await start_echo(pki.dir / "agencies" / "echo")
    port = provider.address.rpartition(":")[2]
    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [provider.address])
    try:
        assert await eventually(lambda: all(u.health.trusted for u in broker._upstreams.values()))
        channel = plain(broker, pki.dir, "post")
        stream = channel.unary_stream(SERVER_STREAM)(
            b"m", metadata=(("x-test-count", "100000"), ("x-test-pause", "0.01")), timeout=30
        )
        await stream.read()
        await provider.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                if await stream.read() is grpc.aio.EOF:
                    break
        details = err.value.details() or ""
        assert port not in details and "127.0.0.1" not in details and "ipv4:" not in details
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(UNARY)(b"after", timeout=10)
        details = err.value.details() or ""
        assert port not in details and "127.0.0.1" not in details, details
        await channel.close()
    finally:
        await broker.stop()
        await provider.stop(0)


# --- Strict ledger: a consumer that goes away while its record is being written -------------


async def test_a_call_cancelled_while_strict_mode_waits_for_the_ledger_leaks_nothing(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    from tests.test_security_ledger import locked

    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address], grants=LIMITED,
        ledger='path = "ledger.db"\nmode = "strict"\nbatch_interval_ms = 10\n'
        "max_unwritten_seconds = 30",
    )  # fmt: skip
    try:
        assert await eventually(lambda: all(u.health.trusted for u in broker._upstreams.values()))
        post = plain(broker, pki.dir, "post")
        with locked(tmp_path / "ledger.db"):
            waiting = post.unary_unary(UNARY)(b"w", timeout=30)
            assert await eventually(lambda: broker.drain.in_flight == 1)
            # Answered by the provider; its record handed to the locked ledger, waiting.
            assert await eventually(lambda: broker.ledger.backlog >= 1)
            waiting.cancel()
            assert await eventually(lambda: in_flight_of(broker) == (0, 0))
        assert await post.unary_unary(UNARY)(b"ok", timeout=10) == b"ok"  # permit came back
        await post.close()
    finally:
        await broker.stop()
    records = ledger_records(tmp_path / "ledger.db")
    assert len(records) == 2
