"""Discovery, reflection and health: what the exchange offers, seen by each agency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tabadol.broker import Broker
from tabadol.catalogue import PLATFORM_SERVICES
from tabadol.pki import CertificateAuthority
from tabadol.platform.v1 import discovery_pb2, discovery_pb2_grpc
from tests.conftest import AGENCIES, TRUST_DOMAIN, start_broker
from tests.support.echo import SERVICE

Channel = Callable[[str], grpc.aio.Channel]


def discovery(channel_for: Channel, agency: str) -> discovery_pb2_grpc.DiscoveryStub:
    return discovery_pb2_grpc.DiscoveryStub(channel_for(agency))


async def test_list_agencies_gives_the_registry(channel_for: Channel) -> None:
    answer = await discovery(channel_for, "post").ListAgencies(discovery_pb2.ListAgenciesRequest())
    assert [a.id for a in answer.agencies] == sorted(AGENCIES)
    assert answer.agencies[0].name.startswith("Agency ")


async def test_list_services_marks_what_the_caller_may_call(channel_for: Channel) -> None:
    for agency, allowed in (
        ("post", {"Unary", "ServerStream", "ClientStream", "Bidi"}),
        ("nocr", {"Unary"}),
    ):
        answer = await discovery(channel_for, agency).ListServices(
            discovery_pb2.ListServicesRequest()
        )
        [service] = answer.services
        assert (service.name, service.provider, service.version) == (SERVICE, "echo", "v1")
        assert service.package == "tabadol.test.v1"
        kinds = {m.name: m.kind for m in service.methods}
        assert kinds == {
            "Unary": discovery_pb2.RPC_KIND_UNARY,
            "ServerStream": discovery_pb2.RPC_KIND_SERVER_STREAMING,
            "ClientStream": discovery_pb2.RPC_KIND_CLIENT_STREAMING,
            "Bidi": discovery_pb2.RPC_KIND_BIDI_STREAMING,
        }
        assert {m.name for m in service.methods if m.allowed} == allowed
        assert service.methods[0].input_type == "tabadol.test.v1.Blob"


async def test_allowed_methods_follow_the_callers_grants(channel_for: Channel) -> None:
    nocr = await discovery(channel_for, "nocr").AllowedMethods(
        discovery_pb2.AllowedMethodsRequest()
    )
    assert nocr.agency == "nocr"
    assert [(m.service, m.method) for m in nocr.methods] == [(SERVICE, "Unary")]
    cra = await discovery(channel_for, "cra").AllowedMethods(discovery_pb2.AllowedMethodsRequest())
    assert list(cra.methods) == []


async def test_list_methods_and_get_contract_of_an_unknown_service_are_not_found(
    channel_for: Channel,
) -> None:
    stub = discovery(channel_for, "post")
    for call in (
        stub.ListMethods(discovery_pb2.ListMethodsRequest(service="tabadol.nope.v1.Ghost")),
        stub.GetContract(discovery_pb2.GetContractRequest(service="tabadol.nope.v1.Ghost")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert "tabadol.nope.v1.Ghost" in (err.value.details() or "")


async def test_get_contract_returns_a_descriptor_set_that_builds_the_service(
    channel_for: Channel,
) -> None:
    contract = await discovery(channel_for, "nocr").GetContract(
        discovery_pb2.GetContractRequest(service=SERVICE)
    )
    assert isinstance(contract, descriptor_pb2.FileDescriptorSet)
    pool = descriptor_pool.DescriptorPool()
    for fd in contract.file:
        pool.Add(fd)
    service = pool.FindServiceByName(SERVICE)
    assert [m.name for m in service.methods] == ["Unary", "ServerStream", "ClientStream", "Bidi"]


async def test_discovery_refuses_an_identity_that_is_not_an_agency(
    broker: Broker, pki: CertificateAuthority
) -> None:
    from tests.test_broker_security import raw_channel

    key, cert = (pki.dir / "broker.key").read_bytes(), (pki.dir / "broker.crt").read_bytes()
    async with raw_channel(broker, pki.cert_pem(), key, cert) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await discovery_pb2_grpc.DiscoveryStub(channel).ListAgencies(
                discovery_pb2.ListAgenciesRequest()
            )
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def reflect(
    channel: grpc.aio.Channel, **request: str | bool
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]))
    responses = [r async for r in call]
    assert len(responses) == 1
    return responses[0]


async def test_reflection_lists_only_the_services_the_caller_may_call(channel_for: Channel) -> None:
    post = await reflect(channel_for("post"), list_services="*")
    assert {s.name for s in post.list_services_response.service} == {SERVICE, *PLATFORM_SERVICES}
    cra = await reflect(channel_for("cra"), list_services="*")
    assert {s.name for s in cra.list_services_response.service} == set(PLATFORM_SERVICES)


async def test_reflection_tells_nothing_of_a_service_the_caller_may_not_call(
    channel_for: Channel,
) -> None:
    hidden = await reflect(channel_for("cra"), file_containing_symbol=SERVICE)
    assert hidden.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    by_name = await reflect(channel_for("cra"), file_by_filename="tabadol/test/v1/echo.proto")
    assert by_name.HasField("error_response")
    shown = await reflect(channel_for("post"), file_containing_symbol=f"{SERVICE}.Unary")
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in shown.file_descriptor_response.file_descriptor_proto
    ]
    assert "tabadol/test/v1/echo.proto" in [f.name for f in files]


async def test_a_grpcurl_style_client_discovers_and_calls_through_the_broker(
    broker: Broker, pki: CertificateAuthority
) -> None:
    # The standard reflection client builds the contract from the broker alone, then calls.
    # It is a blocking client: it runs in a thread while the broker serves on this loop.
    answer = await asyncio.to_thread(_discover_and_call, broker, pki)
    assert answer.data == b"from reflection"


def _discover_and_call(broker: Broker, pki: CertificateAuthority) -> Any:
    bundle = pki.dir / "agencies" / "post"
    creds = grpc.ssl_channel_credentials(
        pki.cert_pem(), (bundle / "agency.key").read_bytes(), (bundle / "agency.crt").read_bytes()
    )
    options = [("grpc.ssl_target_name_override", f"broker.{TRUST_DOMAIN}")]
    with grpc.secure_channel(f"127.0.0.1:{broker.port}", creds, options=options) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName(SERVICE).FindMethodByName("Unary")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{SERVICE}/Unary",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        return call(request_cls(data=b"from reflection"), timeout=10)


async def watch(channel: grpc.aio.Channel, service: str, wanted: int) -> None:
    """Wait, boundedly, for a service's health to become ``wanted``."""
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=service), timeout=20
    )
    async for status in stream:
        if status.status == wanted:
            stream.cancel()
            return
    raise AssertionError(f"{service} never became {wanted}")


async def test_health_is_serving_overall_and_per_service_while_its_provider_answers(
    channel_for: Channel,
) -> None:
    health = health_pb2_grpc.HealthStub(channel_for("post"))
    overall = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    await watch(channel_for("post"), SERVICE, health_pb2.HealthCheckResponse.SERVING)


async def test_health_of_a_service_whose_provider_is_down_is_not_serving(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path
) -> None:
    from tabadol.client import connect

    broker = await start_broker(tmp_path, pki.dir, echo_contracts, ["127.0.0.1:1"])
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            await asyncio.wait_for(
                watch(channel, SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING), timeout=30
            )
            unknown = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tabadol.nope.v1.Ghost"), timeout=10
            )
    except grpc.aio.AioRpcError as e:
        assert e.code() is grpc.StatusCode.NOT_FOUND  # the standard answer for an unknown service
    else:
        pytest.fail(f"an unknown service got a health status: {unknown}")
    finally:
        await broker.stop(0)


async def test_a_drain_sees_watchers_told_not_serving_and_does_not_wait_out_their_streams(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: Any
) -> None:
    from tabadol.client import connect

    broker = await start_broker(tmp_path, pki.dir, echo_contracts, [echo_provider.address])
    async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120
        )
        assert (await stream.read()).status == health_pb2.HealthCheckResponse.SERVING
        # A Watch stream never ends by itself: the drain tells it NOT_SERVING and ends the
        # server without waiting out a long grace period for it.
        stopping = asyncio.ensure_future(broker.stop(grace=60))
        assert (await stream.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.wait_for(stopping, 20)


async def run_cli(*argv: str) -> tuple[int, str]:
    from tests.support.processes import TABADOL

    process = await asyncio.create_subprocess_exec(
        str(TABADOL), *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def test_services_command_lists_services_and_marks_the_callers_methods(
    broker: Broker, pki: CertificateAuthority
) -> None:
    code, out = await run_cli(
        "services", "--broker", f"127.0.0.1:{broker.port}",
        "--credentials", str(pki.dir / "agencies" / "nocr"),
    )  # fmt: skip
    assert code == 0, out
    assert f"{SERVICE}  (v1, provided by echo)" in out
    assert "✓ Unary" in out
    assert "  Bidi" in out and "✓ Bidi" not in out


async def test_describe_command_shows_the_contract_with_its_documentation(
    broker: Broker, pki: CertificateAuthority
) -> None:
    code, out = await run_cli(
        "describe", "--broker", f"127.0.0.1:{broker.port}",
        "--credentials", str(pki.dir / "agencies" / "nocr"), SERVICE,
    )  # fmt: skip
    assert code == 0, out
    assert f"service {SERVICE} {{  // provided by echo" in out
    assert "rpc Bidi(stream tabadol.test.v1.Blob) returns (stream tabadol.test.v1.Blob);" in out
    assert "you have no grant for this method" in out
    assert "message tabadol.test.v1.Blob {" in out and "bytes data = 1;" in out
    code, out = await run_cli(
        "describe", "--broker", f"127.0.0.1:{broker.port}",
        "--credentials", str(pki.dir / "agencies" / "nocr"), "tabadol.nope.v1.Ghost",
    )  # fmt: skip
    assert code == 2
    assert "NOT_FOUND" in out and "tabadol.nope.v1.Ghost" in out


async def test_describe_command_of_a_service_without_a_grant_says_permission_denied(
    broker: Broker, pki: CertificateAuthority
) -> None:
    code, out = await run_cli(
        "describe", "--broker", f"127.0.0.1:{broker.port}",
        "--credentials", str(pki.dir / "agencies" / "cra"), SERVICE,
    )  # fmt: skip
    assert code == 2
    assert "PERMISSION_DENIED" in out and SERVICE in out and "'cra'" in out
    assert "message tabadol.test.v1.Blob" not in out


async def test_a_v2_contract_lives_beside_v1_and_the_broker_routes_both(
    tmp_path: Path, pki: CertificateAuthority, echo_provider: Any
) -> None:
    from tabadol.client import connect
    from tests.conftest import broker_toml
    from tests.support.echo import write_echo_contracts

    contracts = write_echo_contracts(tmp_path / "both.pb", versions=("v1", "v2"))
    config = broker_toml(
        pki_dir=pki.dir, contracts=contracts, endpoints=[echo_provider.address],
        grants=f'[[grant]]\nconsumer = "post"\nservice = "{SERVICE}"\nmethods = ["*"]\n'
        '[[grant]]\nconsumer = "post"\nservice = "tabadol.test.v2.Echo"\nmethods = ["*"]\n',
    ) + (
        '\n[[service]]\nname = "tabadol.test.v2.Echo"\nprovider = "echo"\n'
        f'endpoints = ["{echo_provider.address}"]\n'
    )  # fmt: skip
    (tmp_path / "broker.toml").write_text(config)
    from tabadol import config as config_module

    broker = Broker(config_module.load(tmp_path / "broker.toml"))
    await broker.start()
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            for version in ("v1", "v2"):
                path = f"/tabadol.test.{version}.Echo/Unary"
                assert (
                    await channel.unary_unary(path)(version.encode(), timeout=10)
                    == version.encode()
                )
            listed = await discovery_pb2_grpc.DiscoveryStub(channel).ListServices(
                discovery_pb2.ListServicesRequest()
            )
        assert [(s.name, s.version) for s in listed.services] == [
            (SERVICE, "v1"),
            ("tabadol.test.v2.Echo", "v2"),
        ]
    finally:
        await broker.stop(0)
