"""A consumer that knows several broker nodes: three real brokers on 127.0.0.1, .2 and .3.

Balancing, health checking and retries are gRPC's own, configured by ``connect``: these
tests show that they really happen, and where their limits are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2

from tabadol import config
from tabadol.broker import Broker
from tabadol.client import connect, nodes
from tabadol.client.nodes import (
    BrokerAddressError,
    broker_target,
    idempotent_unary_methods,
    method_name,
    service_config,
)
from tabadol.pki import CertificateAuthority
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, broker_toml
from tests.support.echo import (
    CLIENT_STREAM,
    UNARY,
    EchoProvider,
    echo_file_descriptor,
    own_pki,
    start_echo,
    write_echo_contracts,
)
from tests.support.exchange import eventually
from tests.support.processes import TABADOL, Process

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


@dataclass
class Nodes:
    """Three broker nodes of one exchange (one PKI, one registry), before one echo provider."""

    brokers: list[Broker]
    addresses: list[str]
    echo: EchoProvider
    post: Path  # the consumer agency's credentials

    def consumer(self, **kwargs: object) -> grpc.aio.Channel:
        return connect(self.addresses, self.post, **kwargs)  # type: ignore[arg-type]


def _write_node_config(directory: Path, host: str, pki: CertificateAuthority, contracts: Path,
                       endpoint: str) -> Path:  # fmt: skip
    """A node's configuration: the exchange's, but for its listen address; its ledger is
    beside it, in its own directory."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "broker.toml"
    path.write_text(
        broker_toml(
            pki_dir=pki.dir,
            contracts=contracts,
            endpoints=[endpoint],
            grants=DEFAULT_GRANTS,
            listen=f"{host}:0",
        )
    )
    return path


@contextlib.asynccontextmanager
async def three_nodes(
    directory: Path, pki: CertificateAuthority, in_process: int = 3
) -> AsyncIterator[tuple[Nodes, list[Process]]]:
    """Brokers on HOSTS: the first ``in_process`` in this process (their metrics readable),
    the rest as ``tabadol broker`` processes (to kill -9)."""
    contracts = write_echo_contracts(directory / "echo.pb", idempotent=True)
    provider, echo = await start_echo(pki.dir / "agencies" / "echo")
    brokers: list[Broker] = []
    processes: list[Process] = []
    addresses: list[str] = []
    try:
        for i, host in enumerate(HOSTS):
            path = _write_node_config(
                directory / f"node{i + 1}", host, pki, contracts, provider.address
            )
            if i < in_process:
                broker = Broker(config.load(path))
                await broker.start()
                brokers.append(broker)
                addresses.append(f"{host}:{broker.port}")
            else:
                process = await Process.start(str(TABADOL), "broker", "--config", str(path))
                processes.append(process)
                port = (await process.wait_for(rf"broker listening on {host}:(\d+)"))[1]
                addresses.append(f"{host}:{port}")
        yield Nodes(brokers, addresses, echo, pki.dir / "agencies" / "post"), processes
    finally:
        for process in processes:
            await process.stop()
        for broker in brokers:
            if not broker.drain.active:
                await broker.stop(0)
        await provider.stop(0)


def calls(broker: Broker, method: str, code: str | None = "OK") -> int:
    """Calls of the echo ``method`` (its name) this node ended with ``code`` (None: any),
    by its metrics (a call refused before identification counts under no consumer)."""
    return int(
        sum(
            sample.value
            for metric in broker.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "tabadol_calls_total"
            and sample.labels["method"] == method
            and code in (None, sample.labels["code"])
        )
    )


async def upload(channel: grpc.aio.Channel, **kwargs: object) -> bytes:
    """One ClientStream call: a method the contract does not mark idempotent."""
    result: bytes = await channel.stream_unary(CLIENT_STREAM)(iter([b"x"]), timeout=10, **kwargs)  # type: ignore[arg-type]
    return result


async def every_node_takes_calls(channel: grpc.aio.Channel, nodes: Nodes) -> bool:
    """Whether three calls in a row land one on each node (then each is connected and
    healthy: round robin turns strictly over the ready ones)."""
    before = [calls(b, "Unary") for b in nodes.brokers]
    for _ in range(3):
        assert await channel.unary_unary(UNARY)(b"warm", timeout=10) == b"warm"
    return [calls(b, "Unary") - n for b, n in zip(nodes.brokers, before, strict=True)] == [1] * len(
        nodes.brokers
    )


async def all_succeed(channel: grpc.aio.Channel, count: int) -> bool:
    """Whether ``count`` non-idempotent calls in a row all succeed."""
    for _ in range(count):
        try:
            await upload(channel)
        except grpc.aio.AioRpcError as e:
            assert e.code() is grpc.StatusCode.UNAVAILABLE, e
            return False
    return True


async def test_calls_are_spread_over_every_node(tmp_path: Path, pki: CertificateAuthority) -> None:
    async with three_nodes(tmp_path, pki) as (nodes, _):
        async with nodes.consumer() as channel:
            assert await eventually(lambda: every_node_takes_calls(channel, nodes))
            before = [calls(b, "Unary") for b in nodes.brokers]
            for i in range(30):
                assert await channel.unary_unary(UNARY)(b"%d" % i, timeout=10) == b"%d" % i
            for _ in range(30):
                await upload(channel)
        # Round robin over three ready nodes: every node takes its share.
        assert await eventually(
            lambda: (
                [calls(b, "Unary") - n for b, n in zip(nodes.brokers, before, strict=True)]
                == [10] * 3
            )
        )
        assert await eventually(
            lambda: [calls(b, "ClientStream") for b in nodes.brokers] == [10] * 3
        )


async def test_a_dns_name_is_balanced_and_tls_still_verifies_the_platform_name(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    # localhost goes through gRPC's dns resolver; the node answers as broker.<trust-domain>.
    async with three_nodes(tmp_path, pki) as (nodes, _):
        port = nodes.brokers[0].port
        assert broker_target(f"localhost:{port}").several
        async with connect(f"localhost:{port}", nodes.post) as channel:
            assert await channel.unary_unary(UNARY)(b"hi", timeout=10) == b"hi"


async def test_a_draining_node_gets_no_new_calls_while_its_own_are_in_flight(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    async with three_nodes(tmp_path, pki) as (nodes, _):
        draining = nodes.brokers[1]
        async with nodes.consumer() as channel, connect(nodes.addresses[1], nodes.post) as direct:
            assert await eventually(lambda: every_node_takes_calls(channel, nodes))
            # A call in flight on the node keeps it draining, not stopped, until it ends.
            held = direct.unary_unary(UNARY)(b"", metadata=(("x-test-sleep", "120"),), timeout=180)
            assert await eventually(
                lambda: any(s.metadata.get("x-test-sleep") for s in nodes.echo.calls)
            )
            stopping = asyncio.create_task(draining.stop(150))
            assert await eventually(lambda: draining.drain.active)
            # It says NOT_SERVING on its health Watch; once the channel has heard it, calls
            # that are never retried all succeed, on the two other nodes.
            assert await eventually(lambda: all_succeed(channel, 6))
            before = calls(draining, "ClientStream", None)
            assert await all_succeed(channel, 30)
            assert calls(draining, "ClientStream", None) == before
            assert not stopping.done() and not held.done()
            held.cancel()
            await stopping


async def test_a_node_saying_not_serving_gets_no_calls_though_it_would_answer(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    # The client's health check alone steers: the node would serve, were it asked.
    async with three_nodes(tmp_path, pki) as (nodes, _):
        sick = nodes.brokers[2]
        async with nodes.consumer() as channel:
            assert await eventually(lambda: every_node_takes_calls(channel, nodes))
            await sick.health.servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert await eventually(lambda: _no_new_calls(channel, sick))
            await sick.health.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            # And it takes calls again once it says SERVING.
            assert await eventually(lambda: _takes_calls(channel, sick))


async def _no_new_calls(channel: grpc.aio.Channel, node: Broker) -> bool:
    before = calls(node, "ClientStream")
    assert await all_succeed(channel, 9)
    return calls(node, "ClientStream") == before


async def _takes_calls(channel: grpc.aio.Channel, node: Broker) -> bool:
    before = calls(node, "ClientStream")
    assert await all_succeed(channel, 3)
    return calls(node, "ClientStream") > before


async def test_a_killed_node_is_avoided_and_idempotent_calls_in_flight_succeed_by_retry(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    async with three_nodes(tmp_path, pki, in_process=2) as (nodes, processes):
        victim = processes[0]
        async with nodes.consumer(idempotent_methods=[UNARY]) as channel:
            assert await eventually(lambda: every_node_takes_calls(channel, nodes))
            slow = (("x-test-sleep", "1"),)
            seen = len(nodes.echo.calls)
            idempotent = [
                asyncio.ensure_future(
                    channel.unary_unary(UNARY)(b"%d" % i, metadata=slow, timeout=30)
                )
                for i in range(6)
            ]
            others = [asyncio.ensure_future(upload(channel, metadata=slow)) for _ in range(6)]
            # All twelve are at the provider, a third of them through the doomed node.
            assert await eventually(lambda: len(nodes.echo.calls) >= seen + 12)
            victim.kill()  # kill -9
            assert await asyncio.gather(*idempotent) == [b"%d" % i for i in range(6)]
            results = await asyncio.gather(*others, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            for error in failed:
                assert isinstance(error, grpc.aio.AioRpcError)
                assert error.code() is grpc.StatusCode.UNAVAILABLE
            # Only the non-idempotent calls in flight on the killed node may fail.
            assert len(failed) <= 2
            # New calls avoid the dead node: soon every call succeeds, on the two others.
            assert await eventually(lambda: all_succeed(channel, 6))
            before = sum(calls(b, "ClientStream") for b in nodes.brokers)
            assert await all_succeed(channel, 30)
            assert await eventually(
                lambda: sum(calls(b, "ClientStream") for b in nodes.brokers) == before + 30
            )


async def test_an_idempotent_call_refused_unavailable_by_a_node_is_retried_on_another(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    async with three_nodes(tmp_path, pki) as (nodes, _):
        refusing = nodes.brokers[0]
        async with nodes.consumer(idempotent_methods=[UNARY]) as channel:
            assert await eventually(lambda: every_node_takes_calls(channel, nodes))
            # Refuses new calls (UNAVAILABLE, "shutting down") before its health says so.
            refusing.drain.active = True
            for i in range(30):
                assert await channel.unary_unary(UNARY)(b"%d" % i, timeout=10) == b"%d" % i
            assert calls(refusing, "Unary", "UNAVAILABLE") > 0
            # A method that is not idempotent is not retried: the refusals reach the caller.
            failures = 0
            for _ in range(30):
                try:
                    await upload(channel)
                except grpc.aio.AioRpcError as e:
                    assert e.code() is grpc.StatusCode.UNAVAILABLE
                    assert "shutting down" in (e.details() or "")
                    failures += 1
            assert failures == calls(refusing, "ClientStream", "UNAVAILABLE") > 0
            refusing.drain.active = False


async def test_only_idempotent_methods_are_retried_once_they_reached_the_provider(
    tmp_path: Path, pki: CertificateAuthority, echo_contract_imported: None
) -> None:
    # The provider answers UNAVAILABLE. Unary, idempotent by the imported contract, is tried
    # three times in all; under a client told that nothing is idempotent, only once.
    fail = (("x-test-status", "UNAVAILABLE"), ("x-test-details", "try later"))
    async with three_nodes(tmp_path, pki) as (nodes, _):
        for idempotent, attempts in ((None, 3), ((), 1)):
            async with nodes.consumer(idempotent_methods=idempotent) as channel:
                seen = len(nodes.echo.calls)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await channel.unary_unary(UNARY)(b"", metadata=fail, timeout=10)
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                assert err.value.details() == "try later"
                assert len(nodes.echo.calls) - seen == attempts
                # Each attempt on the next node.
                assert (
                    len({s.metadata["x-tabadol-request-id"] for s in nodes.echo.calls[seen:]})
                    == attempts
                )


async def test_an_agency_the_exchange_does_not_declare_learns_why_from_one_node(
    tmp_path: Path,
) -> None:
    # The broker answers health checks of declared agencies only: to any other agency every
    # node fails its health check, so a balanced call says no more than that. The same call
    # to one node's address names the reason.
    ca = own_pki(tmp_path, TRUST_DOMAIN, "echo", "post", "ghost")
    async with three_nodes(tmp_path, ca) as (nodes, _):
        ghost = ca.dir / "agencies" / "ghost"
        async with connect(nodes.addresses, ghost) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"", timeout=10)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "health check call failed" in (err.value.details() or "")
        async with connect(nodes.addresses[0], ghost) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"", timeout=10)
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "agency 'ghost' is not a registered agency" in (err.value.details() or "")


async def test_tabadol_call_takes_the_nodes_as_a_comma_separated_list(
    tmp_path: Path, pki: CertificateAuthority
) -> None:
    async with three_nodes(tmp_path, pki) as (nodes, _):

        async def tabadol_call(brokers: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                str(TABADOL), "call", "--broker", brokers, "--credentials", str(nodes.post),
                "--contracts", str(tmp_path / "echo.pb"), "tabadol.test.v1.Echo/Unary",
                '{"data": "aGk="}',
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        code, out, _ = await tabadol_call(",".join(nodes.addresses))
        assert (code, json.loads(out)) == (0, {"data": "aGk="})
        code, _, err = await tabadol_call(f"{nodes.addresses[0]},broker.example:7443")
        assert code == 2
        assert "'broker.example:7443': in a list of several, each must be an IP address" in err


@pytest.fixture
def echo_contract_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """The echo contract, Unary idempotent, as if its generated ``*_pb2`` module were
    imported (it joins the default descriptor pool, as generated modules do)."""
    pool = descriptor_pool.Default()
    fd = echo_file_descriptor(idempotent=True)
    try:
        file = pool.FindFileByName(fd.name)
    except KeyError:
        file = pool.AddSerializedFile(fd.SerializeToString())
    module = types.ModuleType("tests_echo_pb2")
    module.DESCRIPTOR = file  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tests_echo_pb2", module)


# --- The pure part: addresses to a target, contracts to a service config -------------------


@pytest.mark.parametrize(
    ("addresses", "uri", "several"),
    [
        ("127.0.0.1:7443", "127.0.0.1:7443", False),  # one node, dialed as before
        (["10.0.0.1:7443"], "10.0.0.1:7443", False),
        ("[::1]:7443", "[::1]:7443", False),
        ("broker.exchange.example:7443", "dns:///broker.exchange.example:7443", True),
        ("dns:///broker.exchange.example:7443", "dns:///broker.exchange.example:7443", True),
        ("unix:/run/tabadol.sock", "unix:/run/tabadol.sock", False),
        (
            ["127.0.0.1:7443", "127.0.0.2:7443", "127.0.0.3:7444"],
            "ipv4:127.0.0.1:7443,127.0.0.2:7443,127.0.0.3:7444",
            True,
        ),
        (("[::1]:7443", "[fd00::2]:7443"), "ipv6:[::1]:7443,[fd00::2]:7443", True),
    ],
)
def test_addresses_become_one_grpc_target(
    addresses: str | list[str], uri: str, several: bool
) -> None:
    target = broker_target(addresses)
    assert (target.uri, target.several) == (uri, several)


@pytest.mark.parametrize(
    ("addresses", "named", "why"),
    [
        ([], "", "the list is empty"),
        ("", "''", "empty"),
        (["127.0.0.1:7443", ""], "''", "empty"),
        ("127.0.0.1", "'127.0.0.1'", "not host:port"),
        (":7443", "':7443'", "not host:port"),
        ("127.0.0.1:0", "'127.0.0.1:0'", "not 1-65535"),
        ("127.0.0.1:65536", "'127.0.0.1:65536'", "not 1-65535"),
        ("127.0.0.1:https", "'127.0.0.1:https'", "not 1-65535"),
        ("::1:7443", "'::1:7443'", "in brackets"),
        ("[not-v6]:7443", "'[not-v6]:7443'", "not an IPv6 address"),
        ("bad_host!:7443", "'bad_host!:7443'", "not a host name"),
        ("256.1.1.1:7443", "'256.1.1.1:7443'", "not a host name"),
        (" 127.0.0.1:7443", "' 127.0.0.1:7443'", "spaces"),
        (["127.0.0.1:7443", "broker.example:7443"], "'broker.example:7443'", "IP address"),
        (["127.0.0.1:7443", "127.0.0.1:7443"], "'127.0.0.1:7443'", "listed twice"),
        (["127.0.0.1:7443", "[::1]:7443"], "[::1]:7443", "mix IPv4 and IPv6"),
        (["127.0.0.1:7443", "ipv4:127.0.0.2:7443"], "'ipv4:127.0.0.2:7443'", "gRPC URI"),
        ([b"127.0.0.1:7443"], "b'127.0.0.1:7443'", "not a string"),
        (["127.0.0.1:7443", None], "None", "not a string"),
    ],
)
def test_a_bad_address_list_is_refused_naming_the_address(
    addresses: object, named: str, why: str
) -> None:
    with pytest.raises(BrokerAddressError) as err:
        broker_target(addresses)  # type: ignore[arg-type]
    assert named in str(err.value)
    assert why in str(err.value)
    assert isinstance(err.value, ValueError)


def test_connect_refuses_a_bad_list_before_reading_credentials(tmp_path: Path) -> None:
    with pytest.raises(BrokerAddressError, match=re.escape("'127.0.0.2' is not host:port")):
        connect(["127.0.0.1:7443", "127.0.0.2"], tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("idempotent", "message"),
    [
        ("/tabadol.test.v1.Echo/Unary", "give a list of paths"),
        (["tabadol.test.v1.Echo"], "idempotent method 'tabadol.test.v1.Echo'"),
    ],
)
def test_connect_refuses_a_malformed_idempotent_method(
    pki: CertificateAuthority, idempotent: object, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        connect("127.0.0.1:7443", pki.dir / "agencies" / "post", idempotent_methods=idempotent)  # type: ignore[arg-type]


def test_the_service_config_balances_checks_health_and_retries_only_what_it_is_told() -> None:
    config = json.loads(service_config(["/a.v1.S/Get", "a.v1.S/Get", "/a.v1.S/List"]))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    [method_config] = config["methodConfig"]
    assert method_config["name"] == [
        {"service": "a.v1.S", "method": "Get"},
        {"service": "a.v1.S", "method": "List"},
    ]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "methodConfig" not in json.loads(service_config([]))
    for bad in ("a.v1.S", "/a.v1.S/", "a.v1.S/Get/More", "/Get"):
        with pytest.raises(ValueError, match=re.escape(f"idempotent method {bad!r}")):
            method_name(bad)


def test_idempotent_unary_methods_are_read_from_the_contracts() -> None:
    fd = descriptor_pb2.FileDescriptorProto(name="t/v1/t.proto", package="t.v1", syntax="proto3")
    fd.message_type.add(name="M")
    service = fd.service.add(name="S")
    levels = descriptor_pb2.MethodOptions
    for name, level, streaming in [
        ("Get", levels.NO_SIDE_EFFECTS, False),
        ("Put", levels.IDEMPOTENT, False),
        ("Create", levels.IDEMPOTENCY_UNKNOWN, False),
        ("Plain", None, False),
        ("Watch", levels.NO_SIDE_EFFECTS, True),  # streaming: never retried
    ]:
        method = service.method.add(
            name=name, input_type=".t.v1.M", output_type=".t.v1.M", server_streaming=streaming
        )
        if level is not None:
            method.options.idempotency_level = level
    pool = descriptor_pool.DescriptorPool()
    file = pool.AddSerializedFile(fd.SerializeToString())
    assert idempotent_unary_methods([file]) == {"/t.v1.S/Get", "/t.v1.S/Put"}


def test_the_nodes_module_is_pure() -> None:
    # Loaded by its file: the tabadol.client package itself brings gRPC in.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('nodes', {str(nodes.__file__)!r})\n"
        "sys.modules['nodes'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('grpc', 'asyncio', 'opentelemetry') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
