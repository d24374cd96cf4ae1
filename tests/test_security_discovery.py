"""Discovery, reflection and health as an attacker tries them, and what the broker tells.

An agency sees the names of every service (so that it can ask for access), but a contract,
and every type defined only for it, only with a grant or where the service makes its
contract public. Health answers identified, declared agencies only. A consumer is never
told a provider's internal address, nor may it hold calls or streams without bound, and
`tabadol describe` never lets a contract's text drive the reader's terminal.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tabadol import config
from tabadol.broker import Broker
from tabadol.broker.server import _limit_rules
from tabadol.catalogue import Catalogue
from tabadol.client import ProviderServer, connect
from tabadol.describe import describe, printable, services_table
from tabadol.ledger.store import SqliteLedgerStore
from tabadol.limits import (
    ANY_OTHER,
    UNDECLARED_BURST,
    UNDECLARED_RATE,
    Admission,
    LimitRule,
    Limits,
    Refusal,
)
from tabadol.pki import CertificateAuthority
from tabadol.platform.v1 import discovery_pb2, discovery_pb2_grpc
from tests.conftest import (
    DEFAULT_GRANTS,
    TRUST_DOMAIN,
    RunningProvider,
    broker_toml,
    start_broker,
)
from tests.support.echo import (
    BIDI,
    SERVICE,
    UNARY,
    EchoProvider,
    echo_file_descriptor,
    own_pki,
    start_echo,
)
from tests.support.exchange import own_exchange
from tests.test_platform import reflect, run_cli

OPEN = "tabadol.open.v1.Open"  # granted to post
SECRET = "tabadol.secret.v1.Secret"  # granted to nobody
DATE_FILE, OPEN_FILE, SECRET_FILE = (
    "tabadol/type/v1/date.proto",
    "tabadol/open/v1/open.proto",
    "tabadol/secret/v1/secret.proto",
)


def contract_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """A shared Date type, a service that uses it, and a secret one that uses it too."""
    date = descriptor_pb2.FileDescriptorProto(
        name=DATE_FILE, package="tabadol.type.v1", syntax="proto3"
    )
    date.message_type.add(name="Date").field.add(name="year", number=1, type=5, label=1)
    files = [date]
    for name, package, service, request, answer in (
        (OPEN_FILE, "tabadol.open.v1", "Open", "OpenRequest", ".tabadol.type.v1.Date"),
        (SECRET_FILE, "tabadol.secret.v1", "Secret", "SecretRequest", "SecretAnswer"),
    ):
        fd = descriptor_pb2.FileDescriptorProto(
            name=name, package=package, syntax="proto3", dependency=[DATE_FILE]
        )
        fd.message_type.add(name=request).field.add(name="id", number=1, type=9, label=1)
        if answer == "SecretAnswer":
            message = fd.message_type.add(name=answer)
            message.field.add(
                name="born", number=1, type=11, label=1, type_name=".tabadol.type.v1.Date"
            )
            message.nested_type.add(name="Detail")
            fd.enum_type.add(name="SecretKind").value.add(name="SECRET_KIND_UNSPECIFIED", number=0)
            answer = f".{package}.{answer}"
        fd.service.add(name=service).method.add(
            name="Get", input_type=f".{package}.{request}", output_type=answer
        )
        files.append(fd)
    return files


# -- The catalogue (pure): what one agency may see -------------------------------------------


def test_a_type_defined_only_for_a_service_without_a_grant_is_hidden() -> None:
    catalogue = Catalogue({f.name: f for f in contract_files()}, [OPEN])
    for symbol in (
        "tabadol.secret.v1.SecretRequest",
        "tabadol.secret.v1.SecretAnswer",
        "tabadol.secret.v1.SecretAnswer.Detail",
        "tabadol.secret.v1.SecretKind",
        SECRET,
        f"{SECRET}.Get",
    ):
        assert catalogue.file_of(symbol) is None, symbol
    assert not catalogue.visible_file(SECRET_FILE)


def test_a_shared_type_a_granted_service_uses_is_shown() -> None:
    catalogue = Catalogue({f.name: f for f in contract_files()}, [OPEN])
    assert catalogue.file_of("tabadol.type.v1.Date") == DATE_FILE
    assert catalogue.file_of("tabadol.open.v1.OpenRequest") == OPEN_FILE
    assert catalogue.visible_file(DATE_FILE) and catalogue.visible_file(OPEN_FILE)
    assert [f.name for f in catalogue.closure(OPEN_FILE)] == [DATE_FILE, OPEN_FILE]


def test_an_agency_with_no_grant_sees_no_contract_type_at_all() -> None:
    catalogue = Catalogue({f.name: f for f in contract_files()}, [])
    assert catalogue.file_of("tabadol.type.v1.Date") is None
    assert catalogue.file_of("tabadol.open.v1.OpenRequest") is None
    assert not catalogue.visible_file(DATE_FILE)
    # The platform's own contracts stay describable to everyone.
    assert catalogue.file_of("tabadol.platform.v1.ListServicesRequest") is not None


# -- A running exchange with a PKI of its own: a revoked and an undeclared agency ------------


@pytest.fixture(scope="module")
async def exchange(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Broker, Path]]:
    """post is granted Open; echo's service makes its contract public; nocr is revoked and
    ghost holds a valid certificate but is no declared agency. Providers are all down."""
    root = tmp_path_factory.mktemp("discovery")
    own = CertificateAuthority.init(root / "pki", TRUST_DOMAIN)
    own.issue_broker()
    for agency in ("post", "cra", "nocr", "ghost"):
        own.issue_agency(agency)
    own.revoke_agency("nocr")
    contracts = root / "contracts.pb"
    contracts.write_bytes(
        descriptor_pb2.FileDescriptorSet(
            file=[echo_file_descriptor(), *contract_files()]
        ).SerializeToString()
    )
    services = "".join(
        f'\n[[service]]\nname = "{name}"\nprovider = "tax"\nendpoints = ["127.0.0.1:1"]\n'
        for name in (OPEN, SECRET)
    )
    text = (
        broker_toml(
            pki_dir=own.dir,
            contracts=contracts,
            endpoints=["127.0.0.1:1"],
            grants=f'[[grant]]\nconsumer = "post"\nservice = "{OPEN}"\nmethods = ["*"]\n',
        ).replace(f'name = "{SERVICE}"', f'name = "{SERVICE}"\ncontract_public = true')
        + services
    )
    (root / "broker.toml").write_text(text)
    broker = Broker(config.load(root / "broker.toml"))
    await broker.start()
    yield broker, own.dir
    await broker.stop(0)


def as_agency(exchange: tuple[Broker, Path], agency: str) -> grpc.aio.Channel:
    broker, pki_dir = exchange
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


async def get_contract(channel: grpc.aio.Channel, service: str) -> descriptor_pb2.FileDescriptorSet:
    stub = discovery_pb2_grpc.DiscoveryStub(channel)
    answer: descriptor_pb2.FileDescriptorSet = await stub.GetContract(
        discovery_pb2.GetContractRequest(service=service), timeout=10
    )
    return answer


async def test_get_contract_of_a_service_without_a_grant_is_refused_naming_it(
    exchange: tuple[Broker, Path],
) -> None:
    async with as_agency(exchange, "post") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_contract(channel, SECRET)
        # ...while its name and methods stay listed, so that access can be asked for.
        listed = await discovery_pb2_grpc.DiscoveryStub(channel).ListMethods(
            discovery_pb2.ListMethodsRequest(service=SECRET), timeout=10
        )
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert SECRET in (err.value.details() or "") and "'post'" in (err.value.details() or "")
    assert [m.name for m in listed.methods] == ["Get"] and not listed.methods[0].allowed


async def test_get_contract_of_a_granted_service_brings_the_shared_types_it_uses(
    exchange: tuple[Broker, Path],
) -> None:
    async with as_agency(exchange, "post") as channel:
        contract = await get_contract(channel, OPEN)
    assert [f.name for f in contract.file] == [DATE_FILE, OPEN_FILE]


async def test_reflection_hides_the_types_and_files_of_a_service_without_a_grant(
    exchange: tuple[Broker, Path],
) -> None:
    async with as_agency(exchange, "post") as channel:
        for request in (
            {"file_containing_symbol": "tabadol.secret.v1.SecretAnswer"},
            {"file_containing_symbol": "tabadol.secret.v1.SecretAnswer.Detail"},
            {"file_containing_symbol": "tabadol.secret.v1.SecretKind"},
            {"file_by_filename": SECRET_FILE},
        ):
            hidden = await reflect(channel, **request)
            assert hidden.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], request
        shared = await reflect(channel, file_containing_symbol="tabadol.type.v1.Date")
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in shared.file_descriptor_response.file_descriptor_proto
    ]
    assert names == [DATE_FILE]


async def test_a_public_contract_is_shown_to_declared_agencies_without_a_grant_only(
    exchange: tuple[Broker, Path],
) -> None:
    async with as_agency(exchange, "cra") as channel:
        contract = await get_contract(channel, SERVICE)
        shown = await reflect(channel, file_containing_symbol="tabadol.test.v1.Blob")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_contract(channel, SECRET)  # public is per service
    assert [f.name for f in contract.file] == ["tabadol/test/v1/echo.proto"]
    assert shown.HasField("file_descriptor_response")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    async with as_agency(exchange, "ghost") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_contract(channel, SERVICE)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def health_refusal(channel: grpc.aio.Channel) -> list[grpc.StatusCode]:
    """How the broker's health service answers this channel, to Check and to Watch."""
    stub = health_pb2_grpc.HealthStub(channel)
    codes = []
    for call in (
        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10),
        stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10).read(),
    ):
        try:
            await call
        except grpc.aio.AioRpcError as e:
            codes.append(e.code())
        else:
            codes.append(grpc.StatusCode.OK)
    return codes


async def test_health_refuses_a_revoked_agency(exchange: tuple[Broker, Path]) -> None:
    async with as_agency(exchange, "nocr") as channel:
        assert await health_refusal(channel) == [grpc.StatusCode.UNAUTHENTICATED] * 2


async def test_health_refuses_an_agency_the_registry_does_not_declare(
    exchange: tuple[Broker, Path],
) -> None:
    async with as_agency(exchange, "ghost") as channel:
        assert await health_refusal(channel) == [grpc.StatusCode.PERMISSION_DENIED] * 2
    async with as_agency(exchange, "cra") as channel:
        assert await health_refusal(channel) == [grpc.StatusCode.OK] * 2


async def discovery_answers(channel: grpc.aio.Channel) -> dict[str, grpc.StatusCode]:
    """How each Discovery method and reflection's list answer this channel."""
    stub = discovery_pb2_grpc.DiscoveryStub(channel)
    calls = {
        "ListAgencies": stub.ListAgencies(discovery_pb2.ListAgenciesRequest(), timeout=10),
        "ListServices": stub.ListServices(discovery_pb2.ListServicesRequest(), timeout=10),
        "ListMethods": stub.ListMethods(discovery_pb2.ListMethodsRequest(service=OPEN), timeout=10),
        "AllowedMethods": stub.AllowedMethods(discovery_pb2.AllowedMethodsRequest(), timeout=10),
        "GetRevocationList": stub.GetRevocationList(
            discovery_pb2.GetRevocationListRequest(), timeout=10
        ),
        "reflection": reflect(channel, list_services="*"),
    }
    codes = {}
    for name, call in calls.items():
        try:
            await call
        except grpc.aio.AioRpcError as e:
            codes[name] = e.code()
        else:
            codes[name] = grpc.StatusCode.OK
    return codes


async def test_discovery_and_reflection_refuse_an_agency_the_registry_does_not_declare(
    exchange: tuple[Broker, Path],
) -> None:
    """A decommissioned agency whose certificate was never revoked learns nothing: not the
    services, nor the agencies, nor the CRL."""
    async with as_agency(exchange, "ghost") as channel:
        answers = await discovery_answers(channel)
    assert answers == dict.fromkeys(answers, grpc.StatusCode.PERMISSION_DENIED), answers
    async with as_agency(exchange, "cra") as channel:
        answers = await discovery_answers(channel)
    assert answers == dict.fromkeys(answers, grpc.StatusCode.OK), answers


async def test_discovery_and_reflection_refuse_a_revoked_agency(
    exchange: tuple[Broker, Path],
) -> None:
    async with as_agency(exchange, "nocr") as channel:
        answers = await discovery_answers(channel)
    assert answers == dict.fromkeys(answers, grpc.StatusCode.UNAUTHENTICATED), answers


async def test_an_unreachable_provider_is_named_but_its_address_is_not(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tabadol.broker")
    provider = ProviderServer(pki.dir / "agencies" / "echo")
    provider.server.add_generic_rpc_handlers((EchoProvider(),))
    await provider.start()
    broker = await start_with(tmp_path, pki, echo_contracts, provider.address, "")
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            assert await channel.unary_unary(UNARY)(b"up", timeout=10) == b"up"
            await provider.stop(0)  # the endpoint was checked and trusted; now it is gone
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(UNARY)(b"down", timeout=10)
    finally:
        await broker.stop(0)
        await provider.stop(0)
    details, port = err.value.details() or "", provider.address.rpartition(":")[2]
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "provider 'echo' unreachable" in details and SERVICE in details
    assert "127.0.0.1" not in details and port not in details and "ipv4" not in details
    # The operator still learns which endpoint failed, and why.
    assert any(provider.address in r.getMessage() for r in caplog.records)


# -- Defaults that bound what one agency can hold --------------------------------------------


def test_the_broker_bounds_streams_and_calls_in_flight_by_default(
    tmp_path: Path, echo_contracts: Path, pki: CertificateAuthority
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        broker_toml(pki_dir=pki.dir, contracts=echo_contracts, endpoints=["127.0.0.1:1"], grants="")
        + '\n[[limit]]\nconsumer = "post"\nrate = 5\n'
        + '\n[[limit]]\nconsumer = "tax"\nconcurrency = 500\n'
        + f'\n[[limit]]\nconsumer = "cra"\nservice = "{SERVICE}"\nconcurrency = 3\n'
    )
    cfg = config.load(path)
    assert (cfg.broker.max_stream_seconds, cfg.broker.stream_idle_seconds) == (3600, 300)
    rules = {(r.consumer, r.service): r for r in _limit_rules(cfg)}
    assert rules[("post", None)] == LimitRule("post", None, 5, None, 200)  # rate, and the default
    assert rules[("tax", None)].concurrency == 500  # an agency's own limit replaces the default
    assert rules[("cra", SERVICE)].concurrency == 3
    assert rules[("cra", None)].concurrency == 200  # ...and over all services, the default
    # Every declared agency, and any other identified one (ANY_OTHER: "*"), is bounded.
    assert {a for a, s in rules if s is None} == {*cfg.agencies, ANY_OTHER}
    assert rules[(ANY_OTHER, None)] == LimitRule(
        ANY_OTHER, None, UNDECLARED_RATE, UNDECLARED_BURST, 200
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_undeclared_agency_gets_the_default_limits_on_its_own() -> None:
    clock = Clock()
    limits = Limits(clock)
    limits.configure([LimitRule("post", None, None, None, 200), LimitRule("*", None, 5, 20, 2)])
    held = [limits.admit("ghost", SERVICE) for _ in range(3)]
    assert [type(v) for v in held] == [Admission, Admission, Refusal]  # 2 in flight at most
    assert "already has 2 calls in flight" in cast(Refusal, held[2]).message
    for admission in held[:2]:
        cast(Admission, admission).release()

    def one(agency: str) -> Admission | Refusal:
        verdict = limits.admit(agency, SERVICE)
        if isinstance(verdict, Admission):
            verdict.release()
        return verdict

    verdicts = [one("ghost") for _ in range(30)]
    assert [type(v) for v in verdicts] == [Admission] * 18 + [Refusal] * 12  # 20 tokens in all
    assert "rate limit of 5 calls/s" in cast(Refusal, verdicts[-1]).message
    # Another undeclared agency has a bucket of its own; a declared one is not rate limited.
    assert isinstance(one("spectre"), Admission)
    assert all(isinstance(one("post"), Admission) for _ in range(100))
    clock.now += 1.0  # five more a second
    assert [type(one("ghost")) for _ in range(6)] == [Admission] * 5 + [Refusal]


def test_a_refused_certificate_may_be_refused_only_so_fast() -> None:
    clock = Clock()
    limits = Limits(clock, refused_rate=5, refused_burst=20)
    verdicts = [limits.admit_refused("nocr/1f") for _ in range(30)]
    assert verdicts[:20] == [None] * 20
    assert all(isinstance(v, Refusal) for v in verdicts[20:])
    assert limits.admit_refused("nocr/20") is None  # another certificate: its own bucket
    clock.now += 1.0
    assert [limits.admit_refused("nocr/1f") for _ in range(6)].count(None) == 5


async def start_with(
    tmp_path: Path, pki: CertificateAuthority, contracts: Path, endpoint: str, extra: str
) -> Broker:
    """A broker for the echo service with ``extra`` lines in its [broker] section."""
    text = broker_toml(
        pki_dir=pki.dir, contracts=contracts, endpoints=[endpoint], grants=DEFAULT_GRANTS,
        extra_broker=extra,
    )  # fmt: skip
    (tmp_path / "broker.toml").write_text(text)
    broker = Broker(config.load(tmp_path / "broker.toml"))
    await broker.start()
    return broker


async def test_an_idle_stream_is_ended_by_the_brokers_default_when_its_service_sets_none(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_with(
        tmp_path, pki, echo_contracts, echo_provider.address, "stream_idle_seconds = 0.3"
    )
    try:
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            idle = channel.stream_stream(BIDI)(timeout=30)
            await idle.write(b"hello")
            assert await idle.read() == b"hello"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await idle.read()  # and then nothing, either way
    finally:
        await broker.stop(0)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle for 0.3 s" in (err.value.details() or "")


async def test_one_agency_cannot_hold_more_calls_than_the_default_over_many_connections(
    tmp_path: Path, pki: CertificateAuthority, echo_contracts: Path, echo_provider: RunningProvider
) -> None:
    broker = await start_with(
        tmp_path, pki, echo_contracts, echo_provider.address, "consumer_concurrency = 2"
    )
    address, post = f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post"
    try:
        async with connect(address, post) as first, connect(address, post) as second:
            held = []
            for channel in (first, second):  # one stream held open on each connection
                stream = channel.stream_stream(BIDI)(timeout=30)
                await stream.write(b"held")
                assert await stream.read() == b"held"
                held.append(stream)
            async with connect(address, post) as third:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await third.unary_unary(UNARY)(b"one more", timeout=10)
            async with connect(address, pki.dir / "agencies" / "nocr") as other:
                assert await other.unary_unary(UNARY)(b"others", timeout=10) == b"others"
            for stream in held:
                stream.cancel()
    finally:
        await broker.stop(0)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'post' already has 2 calls in flight" in (err.value.details() or "")


async def flood(channel: grpc.aio.Channel, calls: int) -> tuple[dict[str, int], set[str]]:
    """``calls`` calls at once: how many ended with each status, and the details seen."""
    answers = await asyncio.gather(
        *(channel.unary_unary(UNARY)(b"x", timeout=30) for _ in range(calls)),
        return_exceptions=True,
    )
    codes: dict[str, int] = {}
    details = set()
    for answer in answers:
        assert isinstance(answer, grpc.aio.AioRpcError), answer
        codes[answer.code().name] = codes.get(answer.code().name, 0) + 1
        details.add(answer.details() or "")
    return codes, details


async def test_a_flood_from_a_revoked_or_undeclared_certificate_is_throttled_and_recorded(
    tmp_path: Path, echo_contracts: Path
) -> None:
    """Refusals are not free: past a small burst, a revoked certificate and an undeclared
    agency get RESOURCE_EXHAUSTED (gRPC's pushback with it). Every refusal within the burst
    has its ledger record (the revoked ones marked unverified); of the throttled ones, one a
    second is recorded and the rest are counted, so a flood cannot fill the ledger's disk.
    A declared agency is not slowed."""
    own = own_pki(tmp_path, TRUST_DOMAIN, "post", "nocr", "ghost", "echo")
    own.revoke_agency("nocr")
    provider, _ = await start_echo(own.dir / "agencies" / "echo")
    broker = await start_broker(tmp_path, own.dir, echo_contracts, [provider.address])
    address = f"127.0.0.1:{broker.port}"
    try:
        async with connect(address, own.dir / "agencies" / "nocr") as revoked:
            revoked_codes, revoked_details = await flood(revoked, 120)
        async with connect(address, own.dir / "agencies" / "ghost") as ghost:
            ghost_codes, ghost_details = await flood(ghost, 120)
        async with connect(address, own.dir / "agencies" / "post") as post:
            answers = await asyncio.gather(
                *(post.unary_unary(UNARY)(b"ok", timeout=30) for _ in range(60))
            )
        assert answers == [b"ok"] * 60
    finally:
        await broker.stop(0)
        await provider.stop(0)
    assert set(revoked_codes) == {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, revoked_codes
    assert any("revoked" in d and "at most 5 calls/s" in d for d in revoked_details)
    assert set(ghost_codes) == {"PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}, ghost_codes
    assert any("over its rate limit of 5 calls/s" in d for d in ghost_details)
    store = SqliteLedgerStore(broker.config.ledger.path, readonly=True)
    try:
        records = [s.record for s in store.records()]
    finally:
        store.close()
    by = {
        agency: [r for r in records if r.consumer == agency] for agency in ("nocr", "ghost", "post")
    }
    unrecorded = broker.metrics.registry.get_sample_value(
        "tabadol_calls_refused_total", {"reason": "flood_unrecorded"}
    )
    for agency, codes, first in (
        ("nocr", revoked_codes, "UNAUTHENTICATED"),
        ("ghost", ghost_codes, "PERMISSION_DENIED"),
    ):
        written = by[agency]
        throttled = [
            r for r in written if r.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        ]
        # Every refusal within the burst is written; of the throttled ones, at least one.
        assert len(written) - len(throttled) == codes[first]
        assert 1 <= len(throttled) < codes["RESOURCE_EXHAUSTED"]
    assert not any(r.consumer_verified for r in by["nocr"])
    assert all(r.consumer_verified for r in by["ghost"])
    assert unrecorded == 240 - len(by["nocr"]) - len(by["ghost"])
    assert len(by["post"]) == 60


# -- What `tabadol services` and `tabadol describe` print ------------------------------------

HOSTILE = "\x1b[2J\x1b]0;owned\x07\x9b31m\rfake\u202eevil\x00"


def hostile_contract() -> descriptor_pb2.FileDescriptorProto:
    """The echo contract with comments that try to clear the screen, retitle the terminal,
    colour it, overwrite the line and reverse the text."""
    fd = echo_file_descriptor()
    for path in ([6, 0], [6, 0, 2, 0], [4, 0], [4, 0, 2, 0]):
        fd.source_code_info.location.add(
            path=path, leading_comments=f" Safe line\n\tindented {HOSTILE}\n"
        )
    return fd


def assert_harmless(text: str) -> None:
    unsafe = [c for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F]
    assert not unsafe, unsafe
    assert "\u202e" not in text and "\u2028" not in text


def test_describe_escapes_control_characters_and_keeps_newlines_and_tabs_of_comments() -> None:
    out = describe(
        descriptor_pb2.FileDescriptorSet(file=[hostile_contract()]),
        SERVICE,
        [discovery_pb2.Method(name="Unary", allowed=True)],
        "echo\x1b[5m",
    )
    assert_harmless(out)
    assert "// Safe line\n//\tindented \\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\rfake\\u202eevil" in out
    assert "provided by echo\\x1b[5m" in out


def test_services_table_escapes_control_characters_in_every_name() -> None:
    service = discovery_pb2.Service(
        name=f"tabadol.evil.v1.Evil{HOSTILE}",
        provider="evil\n  ✓ Forged",
        version="v1\x1b[8m",
        methods=[discovery_pb2.Method(name="Get\x1b[1A✓", allowed=False)],
    )
    out = services_table([service], "post\x1b[31m")
    assert_harmless(out)
    assert "\n  ✓ Forged" not in out and "evil\\n  ✓ Forged" in out
    assert len(out.splitlines()) == 4  # header, blank, service, method: no forged line
    assert "agency 'post\\x1b[31m' may call it" in out


def test_printable_leaves_ordinary_text_alone() -> None:
    # Persian (its zero-width non-joiner included), quotes, a dash, a check mark.
    text = "\u062a\u0628\u0627\u062f\u0644\u200c\u0627\u0637\u0644\u0627\u0639: «Tabadol» — 2024 ✓"
    assert printable(text) == text
    assert printable("a\n\tb", multiline=True) == "a\n\tb"
    assert printable("a\r\nb", multiline=True) == "a\nb"


async def test_the_describe_command_prints_no_terminal_control_from_a_contract(
    tmp_path: Path, pki: CertificateAuthority, echo_provider: RunningProvider
) -> None:
    contracts = tmp_path / "hostile.pb"
    contracts.write_bytes(
        descriptor_pb2.FileDescriptorSet(file=[hostile_contract()]).SerializeToString()
    )
    (tmp_path / "broker.toml").write_text(
        broker_toml(
            pki_dir=pki.dir, contracts=contracts, endpoints=[echo_provider.address],
            grants=DEFAULT_GRANTS,
        )
    )  # fmt: skip
    broker = Broker(config.load(tmp_path / "broker.toml"))
    await broker.start()
    try:
        code, out = await run_cli(
            "describe", "--broker", f"127.0.0.1:{broker.port}",
            "--credentials", str(pki.dir / "agencies" / "post"), SERVICE,
        )  # fmt: skip
    finally:
        await broker.stop(0)
    assert code == 0, out
    assert_harmless(out)
    assert "\\x1b[2J" in out and "// Safe line" in out


# --- Refusals on the platform services: logged, counted and throttled like the request path's


async def statuses(calls: int, call: Callable[[], Awaitable[object]]) -> Counter[str]:
    """``calls`` concurrent calls; how many ended with each status."""

    async def one() -> str:
        try:
            await call()
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "OK"

    return Counter(await asyncio.gather(*(one() for _ in range(calls))))


def refused_count(broker: Broker, reason: str) -> float:
    value = broker.metrics.registry.get_sample_value(
        "tabadol_calls_refused_total", {"reason": reason}
    )
    return value or 0.0


async def test_a_revoked_certificate_flooding_discovery_is_logged_counted_and_throttled(
    tmp_path: Path, echo_contracts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tabadol.broker")
    async with own_exchange(tmp_path, echo_contracts) as exchange:
        exchange.revoke_and_reload("post")
        async with exchange.consumer("post") as channel:
            stub = discovery_pb2_grpc.DiscoveryStub(channel)
            codes = await statuses(
                200, lambda: stub.ListServices(discovery_pb2.ListServicesRequest(), timeout=10)
            )

        assert codes["UNAUTHENTICATED"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0, codes
        assert refused_count(exchange.broker, "platform_unauthenticated") == 200
        lines = [
            r.getMessage() for r in caplog.records if "Discovery/ListServices" in r.getMessage()
        ]
        assert lines and "revoked" in lines[0]
        assert len(lines) < 10  # rate-limited, not one line a refusal


async def test_an_undeclared_agency_flooding_health_checks_is_logged_counted_and_throttled(
    tmp_path: Path, echo_contracts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tabadol.broker")
    async with own_exchange(tmp_path, echo_contracts) as exchange:
        exchange.ca.issue_agency("ghost")  # the CA's, but not in the registry
        async with exchange.consumer("ghost") as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type it sync
            codes = await statuses(
                200, lambda: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            )

        assert codes["PERMISSION_DENIED"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0, codes
        assert refused_count(exchange.broker, "platform_undeclared") == 200
        lines = [r.getMessage() for r in caplog.records if "Health/Check" in r.getMessage()]
        assert lines and "'ghost'" not in lines[0] and "ghost" in lines[0]
        assert len(lines) < 10
