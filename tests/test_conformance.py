"""gRPC's interop test cases, run straight to a provider and through the broker.

The cases follow https://github.com/grpc/grpc/blob/master/doc/interop-test-descriptions.md
against the conformance contract (protos/tabadol/conformance/v1/test_service.proto). Each case
checks what the interop descriptions require and returns what a caller could observe of its
calls; the broker is transparent when every case observes the same both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tabadol import config
from tabadol.broker import Broker
from tabadol.client import ProviderServer, connect
from tabadol.conformance import server as conformance
from tabadol.conformance.v1 import test_service_pb2 as pb
from tabadol.conformance.v1 import test_service_pb2_grpc as pb_grpc
from tabadol.pki import CertificateAuthority
from tabadol.protocol import REQUEST_ID_KEY
from tabadol.spiffe import agency_dns_name
from tests.conftest import TRUST_DOMAIN

CONTRACTS = Path(__file__).resolve().parents[1] / "build" / "contracts.pb"
SERVICE = conformance.SERVICE_NAME
TIMEOUT = 10.0  # for every call that is not about deadlines
OBSERVE_TIMEOUT = 5.0  # how long the provider may take to notice a cancel
CALL_ID_KEY = "x-conformance-call-id"  # lets a case find its own call among the provider's

Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True)
class Target:
    """Where a case's calls go: straight to the provider, or through the broker."""

    name: str
    channel: grpc.aio.Channel
    provider: conformance.ConformanceService

    @property
    def stub(self) -> pb_grpc.TestServiceAsyncStub:
        return pb_grpc.TestServiceStub(self.channel)


@dataclass(frozen=True)
class Outcome:
    """What a caller observed of a case: status, metadata and the sizes of the responses."""

    code: grpc.StatusCode
    details: str | None
    initial_metadata: Metadata
    trailing_metadata: Metadata
    response_sizes: tuple[int, ...] = ()


def comparable(metadata: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    # The broker adds its request id to every call's trailers (docs/architecture.md), so that
    # a consumer can quote the exchange's ledger record; the provider alone has nothing to add.
    return tuple((k, v) for k, v in metadata or () if k != REQUEST_ID_KEY)


async def outcome_of(call: grpc.aio.Call, response_sizes: Sequence[int] = ()) -> Outcome:
    """The outcome of a finished call."""
    return Outcome(
        await call.code(),
        await call.details(),
        comparable(await call.initial_metadata()),
        comparable(await call.trailing_metadata()),
        tuple(response_sizes),
    )


async def ended_in_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def zeros(size: int) -> pb.Payload:
    return pb.Payload(body=bytes(size))


def body_of(response: pb.SimpleResponse | pb.StreamingOutputCallResponse, size: int) -> int:
    """The size of a response's payload, after checking it holds ``size`` zero bytes."""
    assert response.payload.body == bytes(size)
    return len(response.payload.body)


def streaming_request(*sizes: int, interval_us: int = 0) -> pb.StreamingOutputCallRequest:
    return pb.StreamingOutputCallRequest(
        response_parameters=[pb.ResponseParameters(size=s, interval_us=interval_us) for s in sizes]
    )


# --- The interop cases, in the order of the interop descriptions ---------------------------


async def empty_unary(target: Target) -> Outcome:
    call = target.stub.EmptyCall(pb.Empty(), timeout=TIMEOUT)
    assert await call == pb.Empty()
    return await outcome_of(call)


async def large_unary(target: Target) -> Outcome:
    request = pb.SimpleRequest(response_size=314159, payload=zeros(271828))
    call = target.stub.UnaryCall(request, timeout=TIMEOUT)
    response = await call
    return await outcome_of(call, [body_of(response, 314159)])


async def client_streaming(target: Target) -> Outcome:
    requests = [pb.StreamingInputCallRequest(payload=zeros(n)) for n in (27182, 8, 1828, 45904)]
    call = target.stub.StreamingInputCall(iter(requests), timeout=TIMEOUT)
    response = await call
    assert response.aggregated_payload_size == 74922
    return await outcome_of(call, [response.aggregated_payload_size])


async def server_streaming(target: Target) -> Outcome:
    sizes = (31415, 9, 2653, 58979)
    call = target.stub.StreamingOutputCall(streaming_request(*sizes), timeout=TIMEOUT)
    responses = [response async for response in call]
    assert len(responses) == len(sizes)
    return await outcome_of(call, [body_of(r, n) for r, n in zip(responses, sizes, strict=True)])


async def ping_pong(target: Target) -> Outcome:
    call = target.stub.FullDuplexCall(timeout=TIMEOUT)
    received = []
    for request_size, response_size in ((27182, 31415), (8, 9), (1828, 2653), (45904, 58979)):
        request = streaming_request(response_size)
        request.payload.CopyFrom(zeros(request_size))
        await call.write(request)
        # Each answer must arrive before the next request is written.
        response = await call.read()
        assert isinstance(response, pb.StreamingOutputCallResponse)
        received.append(body_of(response, response_size))
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return await outcome_of(call, received)


async def empty_stream(target: Target) -> Outcome:
    call = target.stub.FullDuplexCall(timeout=TIMEOUT)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    return await outcome_of(call)


ECHOED = (
    (conformance.ECHO_INITIAL_KEY, "test_initial_metadata_value"),
    (conformance.ECHO_TRAILING_KEY, b"\xab\xab\xab"),
)


def assert_echoed(outcome: Outcome) -> None:
    assert ECHOED[0] in outcome.initial_metadata
    assert ECHOED[1] in outcome.trailing_metadata


async def custom_metadata_unary(target: Target) -> Outcome:
    request = pb.SimpleRequest(response_size=314159, payload=zeros(271828))
    call = target.stub.UnaryCall(request, metadata=ECHOED, timeout=TIMEOUT)
    response = await call
    outcome = await outcome_of(call, [body_of(response, 314159)])
    assert_echoed(outcome)
    return outcome


async def custom_metadata_full_duplex(target: Target) -> Outcome:
    call = target.stub.FullDuplexCall(metadata=ECHOED, timeout=TIMEOUT)
    request = streaming_request(314159)
    request.payload.CopyFrom(zeros(271828))
    await call.write(request)
    await call.done_writing()
    responses = [response async for response in call]
    assert len(responses) == 1
    outcome = await outcome_of(call, [body_of(responses[0], 314159)])
    assert_echoed(outcome)
    return outcome


TEST_STATUS = pb.EchoStatus(code=2, message="test status message")
SPECIAL_STATUS = pb.EchoStatus(
    code=2, message="\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n"
)


# Beyond the interop descriptions, the failing cases also ask for the echoed metadata: a
# status must not cost the caller the metadata that came with it.
async def failed_unary(target: Target, status: pb.EchoStatus) -> Outcome:
    request = pb.SimpleRequest(response_status=status)
    call = target.stub.UnaryCall(request, metadata=ECHOED, timeout=TIMEOUT)
    error = await ended_in_error(call)
    assert error.code() is grpc.StatusCode.UNKNOWN
    assert error.details() == status.message
    outcome = await outcome_of(call)
    assert_echoed(outcome)
    return outcome


async def status_code_and_message_unary(target: Target) -> Outcome:
    return await failed_unary(target, TEST_STATUS)


async def status_code_and_message_full_duplex(target: Target) -> Outcome:
    call = target.stub.FullDuplexCall(metadata=ECHOED, timeout=TIMEOUT)
    await call.write(pb.StreamingOutputCallRequest(response_status=TEST_STATUS))
    await call.done_writing()
    error = await ended_in_error(call.read())
    assert error.code() is grpc.StatusCode.UNKNOWN
    assert error.details() == TEST_STATUS.message
    outcome = await outcome_of(call)
    assert_echoed(outcome)
    return outcome


async def special_status_message(target: Target) -> Outcome:
    return await failed_unary(target, SPECIAL_STATUS)


async def unimplemented_method(target: Target) -> Outcome:
    call = target.stub.UnimplementedCall(pb.Empty(), timeout=TIMEOUT)
    assert (await ended_in_error(call)).code() is grpc.StatusCode.UNIMPLEMENTED
    return await outcome_of(call)


async def unimplemented_service(target: Target) -> Outcome:
    call = target.channel.unary_unary(
        "/tabadol.conformance.v1.UnimplementedService/UnimplementedCall",
        request_serializer=pb.Empty.SerializeToString,
        response_deserializer=pb.Empty.FromString,
    )(pb.Empty(), timeout=TIMEOUT)
    error = await ended_in_error(call)
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
    # A known difference, by design: straight to a provider, gRPC itself answers "Method not
    # found!"; the broker knows the service is in no contract and says so by name. Only the
    # code is part of the outcome.
    if target.name == "brokered":
        assert error.details() == (
            "Tabadol broker: unknown service 'tabadol.conformance.v1.UnimplementedService'"
        )
    return replace(await outcome_of(call), details=None)


def tagged() -> tuple[str, Metadata]:
    call_id = uuid.uuid4().hex
    return call_id, ((CALL_ID_KEY, call_id),)


async def provider_call(target: Target, call_id: str) -> conformance.ObservedCall:
    return await asyncio.wait_for(target.provider.call_with(CALL_ID_KEY, call_id), TIMEOUT)


async def assert_provider_saw_cancel(observed: conformance.ObservedCall) -> None:
    await asyncio.wait_for(observed.cancelled.wait(), OBSERVE_TIMEOUT)


async def cancel_after_begin(target: Target) -> Outcome:
    call_id, metadata = tagged()
    call = target.stub.StreamingInputCall(metadata=metadata, timeout=TIMEOUT)
    # Cancel only once the call has reached the provider, so that it has a cancel to notice.
    observed = await provider_call(target, call_id)
    call.cancel()
    assert await call.code() is grpc.StatusCode.CANCELLED
    await assert_provider_saw_cancel(observed)
    return await outcome_of(call)


async def cancel_after_first_response(target: Target) -> Outcome:
    call_id, metadata = tagged()
    call = target.stub.FullDuplexCall(metadata=metadata, timeout=TIMEOUT)
    request = streaming_request(31415)
    request.payload.CopyFrom(zeros(27182))
    await call.write(request)
    response = await call.read()
    assert isinstance(response, pb.StreamingOutputCallResponse)
    size = body_of(response, 31415)
    observed = await provider_call(target, call_id)
    call.cancel()
    assert await call.code() is grpc.StatusCode.CANCELLED
    await assert_provider_saw_cancel(observed)
    return await outcome_of(call, [size])


async def timeout_on_sleeping_server(target: Target) -> Outcome:
    # The provider waits 10 s before its response; the deadline is 50 ms.
    call = target.stub.FullDuplexCall(timeout=0.05)
    request = streaming_request(31415, interval_us=10_000_000)
    request.payload.CopyFrom(zeros(27182))
    # As the interop client does: the deadline may pass before the write.
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.write(request)
    assert await call.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    return await outcome_of(call)


Case = Callable[[Target], Awaitable[Outcome]]
CASES: dict[str, Case] = {
    case.__name__: case
    for case in (
        empty_unary,
        large_unary,
        client_streaming,
        server_streaming,
        ping_pong,
        empty_stream,
        custom_metadata_unary,
        custom_metadata_full_duplex,
        status_code_and_message_unary,
        status_code_and_message_full_duplex,
        special_status_message,
        unimplemented_method,
        unimplemented_service,
        cancel_after_begin,
        cancel_after_first_response,
        timeout_on_sleeping_server,
    )
}


# --- Fixtures: one conformance provider, a broker in front of it, a channel to each --------


@dataclass
class RunningConformance:
    server: ProviderServer
    service: conformance.ConformanceService


@pytest.fixture(scope="module")
async def conformance_provider(pki: CertificateAuthority) -> AsyncIterator[RunningConformance]:
    server = ProviderServer(pki.dir / "agencies" / "echo")
    service = conformance.add_to_server(server.server)
    await server.start()
    yield RunningConformance(server, service)
    await server.stop(0)


def conformance_broker_toml(pki_dir: Path, provider_address: str, ledger: Path) -> str:
    agencies = "".join(f'[[agency]]\nid = "{a}"\nname = "Agency {a}"\n\n' for a in ("echo", "post"))
    return f"""[broker]
listen = "127.0.0.1:0"
trust_domain = "{TRUST_DOMAIN}"
pki_dir = "{pki_dir}"
contracts = ["{CONTRACTS}"]
metrics_listen = "127.0.0.1:0"

[tracing]
exporter = "none"

[ledger]
path = "{ledger}"

{agencies}
[[service]]
name = "{SERVICE}"
provider = "echo"
endpoints = ["{provider_address}"]

[[grant]]
consumer = "post"
service = "{SERVICE}"
methods = ["*"]
"""


@pytest.fixture(scope="module")
async def conformance_broker(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CertificateAuthority,
    conformance_provider: RunningConformance,
) -> AsyncIterator[Broker]:
    if not CONTRACTS.exists():
        pytest.fail(f"{CONTRACTS} is missing: run `make protos`")
    directory = tmp_path_factory.mktemp("conformance-broker")
    path = directory / "broker.toml"
    path.write_text(
        conformance_broker_toml(pki.dir, conformance_provider.server.address, directory / "l.db")
    )
    broker = Broker(config.load(path))
    await broker.start()
    yield broker
    await broker.stop(0)


@pytest.fixture(scope="module")
async def targets(
    pki: CertificateAuthority,
    conformance_provider: RunningConformance,
    conformance_broker: Broker,
) -> AsyncIterator[dict[str, Target]]:
    # Straight to the provider, which admits only the broker: so the broker's own credentials.
    broker_creds = grpc.ssl_channel_credentials(
        pki.cert_pem(), (pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes()
    )
    direct = grpc.aio.secure_channel(
        conformance_provider.server.address,
        broker_creds,
        options=[("grpc.ssl_target_name_override", agency_dns_name(TRUST_DOMAIN, "echo"))],
    )
    brokered = connect(f"127.0.0.1:{conformance_broker.port}", pki.dir / "agencies" / "post")
    yield {
        "direct": Target("direct", direct, conformance_provider.service),
        "brokered": Target("brokered", brokered, conformance_provider.service),
    }
    await direct.close()
    await brokered.close()


# --- The tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["direct", "brokered"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_interop_case_passes(case: Case, route: str, targets: dict[str, Target]) -> None:
    await case(targets[route])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_interop_case_ends_the_same_through_the_broker_as_directly(
    case: Case, targets: dict[str, Target]
) -> None:
    assert await case(targets["brokered"]) == await case(targets["direct"])


async def test_the_broker_adds_only_its_request_id_to_the_trailers(
    targets: dict[str, Target],
) -> None:
    # Justifies leaving the request id out of every comparison above.
    trailers = {}
    for route, target in targets.items():
        call = target.stub.EmptyCall(pb.Empty(), metadata=ECHOED, timeout=TIMEOUT)
        await call
        trailers[route] = tuple(await call.trailing_metadata())
    added = [(k, v) for k, v in trailers["brokered"] if (k, v) not in trailers["direct"]]
    assert [k for k, _ in added] == [REQUEST_ID_KEY]
    assert len(str(added[0][1])) == 32
