"""Hostile input gets a clean error, and the broker keeps serving everyone else.

The pure core is fed arbitrary input (hypothesis) and may only raise the errors it
documents. The running broker is fed garbage below gRPC (bytes, TLS, HTTP/2 frames) and
abuse within it (huge messages, thousands of streams); after each attack a normal call
from another agency still gets through.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import math
import random
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tabadol import config
from tabadol.broker import Broker
from tabadol.client import connect
from tabadol.errors import ConfigError
from tabadol.identity import IdentityRejected, identify_consumer
from tabadol.ledger.record import Seal
from tabadol.ledger.verify import read_anchor
from tabadol.metadata import (
    CONSUMER_KEY,
    HOP_BY_HOP,
    PLATFORM_PREFIX,
    REQUEST_ID_KEY,
    STATUS_DETAILS_KEY,
    request_metadata,
    response_metadata,
)
from tabadol.ops.query import parse_duration_ns, parse_status, parse_tags, trace_query
from tabadol.pki import CertificateAuthority
from tabadol.spiffe import broker_dns_name, trust_domain_of_agency
from tests.conftest import DEFAULT_GRANTS, TRUST_DOMAIN, RunningProvider, start_broker
from tests.support.certs import self_signed
from tests.support.echo import BIDI, SERVER_STREAM, UNARY
from tests.support.h2raw import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WAIT_S,
    WINDOW_UPDATE,
    RawH2,
    StreamEnd,
    frame,
    grpc_message,
    tls_context,
)

Channel = Callable[[str], grpc.aio.Channel]
BROKER_DNS = broker_dns_name(TRUST_DOMAIN)
MIB = 1024 * 1024
# Hypothesis keeps caches in ./.hypothesis by default: not in the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "tabadol-hypothesis")
# Derandomized and without an example database: the same examples on every run, no files.
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


async def assert_still_serves(channel_for: Channel) -> None:
    """Another agency's ordinary call still gets through."""
    reply = await channel_for("post").unary_unary(UNARY)(b"still here", timeout=10)
    assert reply == b"still here"


# --- The pure core, on arbitrary input -----------------------------------------------------

CONFIG_PATH = Path("/etc/tabadol/broker.toml")
CONFIG_KEYS = (
    "broker", "tracing", "ledger", "agency", "service", "grant", "listen", "trust_domain",
    "pki_dir", "contracts", "max_message_bytes", "shutdown_grace_seconds", "metrics_listen",
    "instance", "path", "mode", "batch_interval_ms", "buffer_records", "payload_digests",
    "enabled", "service_name", "sampler", "sampler_arg", "exporter", "otlp_endpoint", "id",
    "name", "government_services", "visits_per_exchange", "in_person_visits_per_quarter",
    "provider", "endpoints", "consumer", "methods",
)  # fmt: skip
CONFIG_WORDS = (
    "127.0.0.1:0", "[::1]:7443", "host:99999", "tabadol.example", "Bad_Domain", "pki",
    "contracts/echo.pb", "nocr", "post", "NOCR", "*", "Unary", "tabadol.test.v1.Echo",
    "otlp", "none", "strict", "batched", "always_on", "parentbased_traceidratio", "",
)  # fmt: skip
TOML_FRAGMENTS = (
    "[broker]\n", "[[agency]]\n", "[[grant]]\n", "[tracing]\n", "[ledger]\n", "\n", " = ",
    "=", '"', "'", '"""', "'''", "[", "]", "{", "}", ",", ".", "#", "\\", "\\u", "listen",
    "id", "methods", "1", "-1", "1e999", "nan", "true", "1979-05-27T07:32:00Z", "0x",
    "\x00", "\x7f", "\r", "é",
)  # fmt: skip


def toml_string(text: str) -> str:
    """A TOML basic string: every control character escaped, nothing else."""
    escaped = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in '"\\' else c
        for c in text
    )
    return f'"{escaped}"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, dt.date):  # datetime is a date too
        return value.isoformat()
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(document: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in document.items())


config_keys = st.sampled_from(CONFIG_KEYS) | st.text(max_size=10)
config_scalars = (
    st.sampled_from(CONFIG_WORDS)
    | st.text(max_size=20)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.dates()
    | st.datetimes()
)
config_values = st.recursive(
    config_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(config_keys, inner, max_size=5),
    max_leaves=12,
)
tables = st.dictionaries(config_keys, config_values, max_size=6)
config_documents = st.fixed_dictionaries(
    {},
    optional={
        "broker": tables,
        "tracing": tables,
        "ledger": tables,
        "agency": st.lists(tables, max_size=3),
        "service": st.lists(tables, max_size=3),
        "grant": st.lists(tables, max_size=3),
    },
) | st.dictionaries(config_keys, config_values, max_size=6)


def assert_config_error_names_the_file(text: str) -> None:
    try:
        config.parse(text, CONFIG_PATH)
    except ConfigError as e:
        assert str(CONFIG_PATH) in str(e)


@PROPERTY
@given(st.text() | st.lists(st.sampled_from(TOML_FRAGMENTS), max_size=40).map("".join))
def test_config_text_of_any_shape_is_valid_or_a_config_error_naming_the_file(text: str) -> None:
    assert_config_error_names_the_file(text)


@PROPERTY
@given(config_documents)
def test_config_tables_of_any_shape_are_valid_or_a_config_error_naming_the_file(
    document: dict[str, Any],
) -> None:
    assert_config_error_names_the_file(toml_document(document))


def test_a_deeply_nested_config_is_a_config_error_naming_the_file() -> None:
    assert_config_error_names_the_file("contracts = " + "[" * 2000 + "]" * 2000)
    assert_config_error_names_the_file("broker = " + "{ a = " * 2000 + "1" + " }" * 2000)


# Keys as gRPC delivers them (lower-case: its HTTP/2 layer refuses any other), plus any text.
metadata_keys = (
    st.sampled_from(
        (
            CONSUMER_KEY,
            REQUEST_ID_KEY,
            CONSUMER_KEY + "-bin",
            PLATFORM_PREFIX,
            "x-tabadol-x",
            "grpc-timeout",
            "grpc-encoding",
            STATUS_DETAILS_KEY,
            ":path",
            ":authority",
            "host",
            "te",
            "content-type",
            "user-agent",
            "traceparent",
            "tracestate",
            "x-test",
        )
    )
    | st.from_regex(r"[a-z0-9_.-]{1,24}", fullmatch=True)
    | st.from_regex(r"x-tabadol-[a-z0-9_.-]{0,12}", fullmatch=True)
    | st.text(max_size=24)
)
metadata = st.lists(st.tuples(metadata_keys, st.text(max_size=20) | st.binary(max_size=20)))
trace_headers = st.sampled_from(((), (("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),)))


@PROPERTY
@given(metadata, st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True), st.text(), trace_headers)
def test_request_metadata_never_passes_a_callers_platform_key_and_ends_with_the_brokers(
    incoming: list[tuple[str, str | bytes]],
    consumer: str,
    request_id: str,
    trace: tuple[tuple[str, str], ...],
) -> None:
    out = request_metadata(incoming, consumer, request_id, trace)

    assert out[-2:] == ((CONSUMER_KEY, consumer), (REQUEST_ID_KEY, request_id))
    passed = out[: len(out) - 2 - len(trace)]
    for key, _ in passed:
        assert not key.startswith((PLATFORM_PREFIX, "grpc-", ":")), key
        assert key not in HOP_BY_HOP, key
    assert all(pair in incoming for pair in passed)
    assert out[len(passed) : len(out) - 2] == trace


@PROPERTY
@given(metadata | st.none())
def test_response_metadata_never_passes_a_providers_platform_key(
    incoming: list[tuple[str, str | bytes]] | None,
) -> None:
    out = response_metadata(incoming)

    for key, _ in out:
        assert not key.startswith(PLATFORM_PREFIX), key
        assert key == STATUS_DETAILS_KEY or not key.startswith(("grpc-", ":")), key
    assert all(pair in (incoming or ()) for pair in out)


durations = st.text(max_size=30) | st.from_regex(
    r"\s?[0-9\u0660-\u0669]{0,25}(\.[0-9]{0,12})?\s?(ns|us|µs|μs|ms|s|m|h|d|x|)\s?", fullmatch=True
)


@PROPERTY
@given(durations)
def test_durations_of_any_text_parse_or_raise_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_duration_ns(text) >= 0


def test_a_duration_in_micro_seconds_written_with_greek_mu_parses() -> None:
    # The pattern accepts both micro signs, U+00B5 and U+03BC (Go accepts both too).
    assert parse_duration_ns("250\u00b5s") == parse_duration_ns("250\u03bcs") == 250_000


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
tag_texts = (
    st.text(max_size=40)
    | json_values.map(json.dumps)
    | st.lists(st.sampled_from(("{", "[", "}", "]", '"', ":", ",", "=", "k", "1"))).map("".join)
)


@PROPERTY
@given(st.lists(tag_texts, max_size=4))
def test_tags_of_any_text_parse_or_raise_value_error(values: list[str]) -> None:
    with contextlib.suppress(ValueError):
        parse_tags(values)


def test_deeply_nested_json_tags_raise_value_error() -> None:
    # tags come straight from the trace viewer's URL: anything else is a 500 for a bad query.
    with pytest.raises(ValueError):
        parse_tags(["[" * 100_000])


@PROPERTY
@given(st.text(max_size=30) | st.none())
def test_status_of_any_text_parses_or_raises_value_error(text: str | None) -> None:
    with contextlib.suppress(ValueError):
        parse_status(text)


query_names = st.sampled_from(
    (
        "service", "operation", "tags", "tag", "minDuration", "maxDuration", "start", "end",
        "lookback", "limit", "offset", "status", "other",
    )
)  # fmt: skip
query_values = tag_texts | durations | st.integers().map(str)


@PROPERTY
@given(st.dictionaries(query_names, st.lists(query_values, max_size=3)), st.integers(0, 2**63))
def test_trace_queries_of_any_parameters_build_or_raise_value_error(
    params: dict[str, list[str]], now_ns: int
) -> None:
    with contextlib.suppress(ValueError):
        trace_query(params, now_ns)


def spiffe_texts() -> st.SearchStrategy[str]:
    return st.text(max_size=40) | st.text(max_size=40).map(lambda t: "spiffe://" + t)


@PROPERTY
@given(spiffe_texts() | st.from_regex(r"spiffe://[a-z.]{0,12}/agency/[a-zA-Z0-9/-]{0,12}"))
def test_spiffe_ids_of_any_text_split_or_raise_value_error(text: str) -> None:
    try:
        domain, agency = trust_domain_of_agency(text)
    except ValueError:
        return
    assert text == f"spiffe://{domain}/agency/{agency}"


def pem_certificate(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def self_signed_der(extensions: list[x509.ExtensionType]) -> bytes:
    """Identify_consumer trusts TLS for the signature, so any self-signed certificate will do."""
    return self_signed(extensions, "nocr").public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def a_certificate(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    ca = CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "pki", TRUST_DOMAIN)
    return der_of((ca.issue_agency("nocr") / "agency.crt").read_bytes())


def mutated(der: bytes, seed: int, flips: int) -> bytes:
    """A real certificate with a few bytes of its DER changed."""
    changed, rng = bytearray(der), random.Random(seed)
    for _ in range(flips):
        changed[rng.randrange(len(changed))] = rng.randrange(256)
    return bytes(changed)


def assert_identified_or_rejected(cert_pem: bytes) -> None:
    with contextlib.suppress(IdentityRejected, ValueError):
        identify_consumer(cert_pem, trust_domain=TRUST_DOMAIN, revoked=frozenset())


@PROPERTY
@given(st.binary(max_size=600), st.integers(0, 2**32), st.integers(1, 8))
def test_identify_consumer_on_arbitrary_bytes_raises_only_identity_rejected_or_value_error(
    a_certificate: bytes, garbage: bytes, seed: int, flips: int
) -> None:
    assert_identified_or_rejected(garbage)
    assert_identified_or_rejected(pem_certificate(garbage))
    assert_identified_or_rejected(pem_certificate(mutated(a_certificate, seed, flips)))


VICTIM_URI = x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/agency/nocr")
SAN_OID, SPARE_OID = bytes.fromhex("0603551d11"), bytes.fromhex("0603551d63")  # 2.5.29.17/.99


def two_san_extensions() -> bytes:
    # Builders refuse to repeat an extension: add the second under a spare OID of the same
    # length, then rename it. The signature breaks, which identify_consumer does not check.
    attacker = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/agency/cra")]
    )
    der = self_signed_der(
        [
            x509.SubjectAlternativeName([VICTIM_URI]),
            x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), attacker.public_bytes()),
        ]
    )
    assert der.count(SPARE_OID) == 1
    return der.replace(SPARE_OID, SAN_OID)


def version_125() -> bytes:
    der = self_signed_der([x509.SubjectAlternativeName([VICTIM_URI])])
    v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2, i.e. X.509 v3
    assert der.count(v3) == 1
    return der.replace(v3, bytes.fromhex("a00302017d"))


def x400_address_in_the_san() -> bytes:
    uri = f"spiffe://{TRUST_DOMAIN}/agency/nocr".encode()
    general_names = bytes([0x86, len(uri)]) + uri + bytes.fromhex("a3023000")  # [3] x400Address
    san = bytes([0x30, len(general_names)]) + general_names
    return self_signed_der([x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.17"), san)])


@pytest.mark.parametrize(
    "build",
    [two_san_extensions, x400_address_in_the_san, version_125],
    ids=["two-san-extensions", "x400-address-in-san", "x509-version-125"],
)
def test_a_certificate_the_x509_library_cannot_read_is_rejected_not_crashed(
    build: Callable[[], bytes],
) -> None:
    with pytest.raises((IdentityRejected, ValueError)):
        identify_consumer(pem_certificate(build()), trust_domain=TRUST_DOMAIN, revoked=())


SEAL_NUMBERS, SEAL_TEXTS = ("seq", "count", "sealed_ns"), ("head_digest", "signer", "signature")
SEAL_FIELDS = SEAL_NUMBERS + SEAL_TEXTS
A_SEAL = dict(seq=1, count=4, head_digest="ab" * 32, sealed_ns=1, signer="cd" * 32, signature="00")
anchor_lines = (
    st.just(json.dumps(A_SEAL))
    | json_values.map(json.dumps)
    | st.fixed_dictionaries({f: json_values for f in SEAL_FIELDS}).map(json.dumps)
    | st.text(max_size=40)
)


@pytest.fixture(scope="module")
def anchor_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("anchor") / "ledger.db.seals"


@PROPERTY
@given(st.binary(max_size=300) | st.lists(anchor_lines, max_size=6).map("\n".join).map(str.encode))
def test_anchor_files_of_any_bytes_are_read_without_raising(anchor_file: Path, data: bytes) -> None:
    anchor_file.write_bytes(data)
    read_anchor(anchor_file)


@PROPERTY
@given(st.lists(anchor_lines, max_size=6))
def test_anchor_seals_read_from_any_lines_have_the_types_verify_compares(
    anchor_file: Path, lines: list[str]
) -> None:
    anchor_file.write_text("\n".join(lines))
    for seal in read_anchor(anchor_file):
        assert isinstance(seal, Seal)
        assert all(type(getattr(seal, f)) is int for f in SEAL_NUMBERS), seal
        assert all(type(getattr(seal, f)) is str for f in SEAL_TEXTS), seal


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe\x00 not UTF-8\n", b"[" * 100_000 + b"\n"],
    ids=["not-utf8", "deeply-nested-json-line"],
)
def test_an_anchor_file_of_garbage_is_read_without_raising(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "ledger.db.seals").write_bytes(data)
    assert read_anchor(tmp_path / "ledger.db.seals") == []


# --- Bytes at the broker's port, before and instead of TLS ---------------------------------


def client_hello(bundle: Path) -> bytes:
    """The first flight of a genuine TLS client, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_context(bundle).wrap_bio(incoming, outgoing, server_hostname=BROKER_DNS)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


GARBAGE = random.Random(20240601).randbytes(64 * 1024)
PLAIN_ATTACKS = {
    "random-bytes": lambda hello: GARBAGE,
    "client-hello-then-garbage": lambda hello: hello + GARBAGE,
    "http1-request": lambda hello: b"GET / HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n",
    "cleartext-http2-preface": lambda hello: PREFACE + frame(SETTINGS, 0, 0, b""),
    "tls-record-over-the-size-tls-allows": lambda hello: b"\x16\x03\x01\xff\xff" + GARBAGE,
}


@pytest.mark.parametrize("attack", PLAIN_ATTACKS.values(), ids=PLAIN_ATTACKS.keys())
async def test_garbage_instead_of_tls_is_dropped_and_the_broker_still_serves(
    broker: Broker,
    pki: CertificateAuthority,
    channel_for: Channel,
    attack: Callable[[bytes], bytes],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    try:
        writer.write(attack(client_hello(pki.dir / "agencies" / "post")))
        await writer.drain()
        async with asyncio.timeout(WAIT_S):  # the broker hangs up; it does not wait for more
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass  # reset rather than closed: dropped all the same
    finally:
        writer.transport.abort()
    await assert_still_serves(channel_for)


async def test_a_truncated_handshake_abandoned_by_the_client_leaves_the_broker_serving(
    broker: Broker, pki: CertificateAuthority, channel_for: Channel
) -> None:
    hello = client_hello(pki.dir / "agencies" / "post")
    for cut in (1, 5, len(hello) // 2, len(hello) - 1):
        _, writer = await asyncio.open_connection("127.0.0.1", broker.port)
        writer.write(hello[:cut])
        await writer.drain()
        writer.transport.abort()
    await assert_still_serves(channel_for)


async def test_tls_without_http2_in_alpn_is_refused_and_the_broker_still_serves(
    broker: Broker, pki: CertificateAuthority, channel_for: Channel
) -> None:
    context = tls_context(pki.dir / "agencies" / "post", alpn=["http/1.1"])
    try:
        async with asyncio.timeout(WAIT_S):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", broker.port, ssl=context, server_hostname=BROKER_DNS
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n")
            await writer.drain()
            assert await reader.read(65536) == b""
            writer.transport.abort()
    except (ssl.SSLError, ConnectionError):
        pass  # refused during the handshake
    await assert_still_serves(channel_for)


# --- HTTP/2 over a genuine mTLS connection -------------------------------------------------


@pytest.fixture
async def raw(broker: Broker, pki: CertificateAuthority) -> AsyncIterator[RawH2]:
    connection = await RawH2.open(broker.port, pki.dir / "agencies" / "post", BROKER_DNS)
    yield connection
    connection.close()


INDEXED_METHOD_GET = b"\x82"  # HPACK static table entry 2


def setting(identifier: int, value: int) -> bytes:
    return frame(SETTINGS, 0, 0, identifier.to_bytes(2, "big") + value.to_bytes(4, "big"))


BAD_FRAMES = {
    "random-bytes-after-preface": GARBAGE[:4096],
    "data-on-stream-0": frame(DATA, 0, 0, b"x"),
    "headers-on-an-even-stream": frame(HEADERS, END_HEADERS, 2, INDEXED_METHOD_GET),
    "headers-with-broken-hpack": frame(HEADERS, END_HEADERS, 1, b"\xff" * 64),
    "continuation-without-headers": frame(CONTINUATION, END_HEADERS, 1, INDEXED_METHOD_GET),
    "rst-stream-on-an-idle-stream": frame(RST_STREAM, 0, 7, (8).to_bytes(4, "big")),
    "window-update-of-zero": frame(WINDOW_UPDATE, 0, 0, (0).to_bytes(4, "big")),
    "window-overflow": frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big")) * 2,
    "initial-window-over-2-31": setting(0x4, 2**31),
    "max-frame-size-too-small": setting(0x5, 1),
    "settings-of-the-wrong-length": frame(SETTINGS, 0, 0, b"\0" * 5),
    "ping-of-the-wrong-length": frame(PING, 0, 0, b"abc"),
    "frame-over-the-max-size": frame(DATA, 0, 1, GARBAGE[:16384], length=2**24 - 1),
    "headers-that-depend-on-themselves": frame(
        HEADERS,
        END_HEADERS | PRIORITY_FLAG,
        1,
        (1).to_bytes(4, "big") + b"\x0f" + INDEXED_METHOD_GET,
    ),
}


@pytest.mark.parametrize("frames", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_malformed_http2_frames_end_the_connection_or_are_ignored_and_the_broker_still_serves(
    raw: RawH2, channel_for: Channel, frames: bytes
) -> None:
    await raw.send_raw(frames)
    assert await raw.probe() in ("goaway", "closed", "alive")  # anything but silence
    await assert_still_serves(channel_for)


async def test_unknown_frame_types_are_ignored_and_the_connection_serves_a_call(
    raw: RawH2, channel_for: Channel
) -> None:
    unknown = frame(0xFA, 0xFF, 0, b"whatever")
    await raw.send_raw(unknown * 3 + frame(PING, 0, 0, b"12345678"))
    end = await raw.call(UNARY, BROKER_DNS, grpc_message(b"hello"))
    assert end.grpc_status is grpc.StatusCode.OK, end
    assert end.data == grpc_message(b"hello")
    await assert_still_serves(channel_for)


def assert_ended_cleanly(end: StreamEnd) -> None:
    """A gRPC error status, a reset stream or a GOAWAY: never OK, never silence."""
    if end.grpc_status is not None:
        assert end.grpc_status is not grpc.StatusCode.OK, end
    else:
        assert end.reset is not None or end.goaway is not None or end.closed, end


CALLS: dict[str, dict[str, Any]] = {
    "length-prefix-claims-1-mib-sends-10-bytes": dict(
        body=grpc_message(b"0123456789", declared_length=MIB)
    ),
    "compressed-flag-without-grpc-encoding": dict(body=grpc_message(b"hello", compressed=True)),
    "compressed-flag-with-unknown-encoding": dict(
        body=grpc_message(b"hello", compressed=True), extra_headers=[("grpc-encoding", "zstd-9000")]
    ),
    "gzip-encoding-with-a-body-that-is-not-gzip": dict(
        body=grpc_message(b"hello", compressed=True), extra_headers=[("grpc-encoding", "gzip")]
    ),
    "half-a-length-prefix": dict(body=b"\x00\x00\x00"),
    "unary-without-a-message": dict(body=None),
    "server-stream-without-a-message": dict(path=SERVER_STREAM, body=None),
    "huge-metadata-value": dict(
        body=grpc_message(b"x"), extra_headers=[("x-test-huge", "v" * MIB)]
    ),
    "ten-thousand-metadata-keys": dict(
        body=grpc_message(b"x"), extra_headers=[(f"x-k{i}", "v") for i in range(10_000)]
    ),
    "grpc-timeout-garbage": dict(
        body=grpc_message(b"x"), extra_headers=[("grpc-timeout", "soon"), ("x-test-sleep", "30")]
    ),
    **{
        f"path-{name}": dict(path=path, body=grpc_message(b"x"))
        for name, path in {
            "slash": "/",
            "empty": "",
            "one-segment": "/a",
            "double-slash": "//",
            "nul-byte": "/%00/x",
            "raw-nul-byte": "/\x00/x",
            "three-segments": "/x/y/z",
            "10-kb": "/" + "s" * 5000 + "/" + "m" * 5000,
            "method-with-query": UNARY + "?admin=1",
        }.items()
    },
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_malformed_grpc_calls_end_with_an_error_and_the_broker_still_serves(
    raw: RawH2, channel_for: Channel, call: dict[str, Any]
) -> None:
    end = await raw.call(
        call.get("path", UNARY),
        BROKER_DNS,
        call["body"],
        extra_headers=call.get("extra_headers", ()),
    )
    assert_ended_cleanly(end)
    await assert_still_serves(channel_for)


async def test_a_method_path_without_its_leading_slash_is_named_as_not_a_method_path(
    raw: RawH2, channel_for: Channel
) -> None:
    end = await raw.call(UNARY.removeprefix("/"), BROKER_DNS, grpc_message(b"x"))
    assert end.grpc_status is grpc.StatusCode.UNIMPLEMENTED, end
    assert "is not a gRPC method path" in (end.trailer("grpc-message") or ""), end
    await assert_still_serves(channel_for)


@pytest.mark.parametrize("path", [UNARY, SERVER_STREAM], ids=["unary", "server-stream"])
async def test_a_single_request_call_with_two_messages_forwards_only_the_first(
    raw: RawH2, channel_for: Channel, echo_provider: RunningProvider, path: str
) -> None:
    # gRPC Python's server reads one message for these kinds and drops the rest; what
    # matters is that the provider never receives more than the broker accounted for.
    before = len(echo_provider.echo.calls)
    end = await raw.call(path, BROKER_DNS, grpc_message(b"first") + grpc_message(b"second"))
    if end.grpc_status is grpc.StatusCode.OK:
        assert len(echo_provider.echo.calls) == before + 1
        assert end.data.endswith(b"first"), end.data
    else:
        assert_ended_cleanly(end)
    await assert_still_serves(channel_for)


# --- Abuse within gRPC -----------------------------------------------------------------------


async def test_a_100_mib_message_is_refused_as_too_large_and_the_broker_still_serves(
    broker: Broker, pki: CertificateAuthority, channel_for: Channel
) -> None:
    options = [("grpc.max_send_message_length", 200 * MIB)]
    bundle = pki.dir / "agencies" / "post"
    async with connect(f"127.0.0.1:{broker.port}", bundle, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(UNARY)(bytes(100 * MIB), timeout=30)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await assert_still_serves(channel_for)


async def wait_for_in_flight(broker: Broker, wanted: Callable[[float], bool]) -> None:
    """Poll the broker's in-flight gauge until ``wanted`` holds; fail after 30 s."""
    value = broker.metrics.in_flight._value.get()
    try:
        async with asyncio.timeout(30):
            # A gauge has no event to wait on: poll it, boundedly.
            while not wanted(value := broker.metrics.in_flight._value.get()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"the broker's in-flight gauge stayed at {value}") from None


async def test_two_thousand_idle_streams_cancelled_at_once_leave_nothing_in_flight(
    tmp_path: Path,
    pki: CertificateAuthority,
    echo_contracts: Path,
    echo_provider: RunningProvider,
) -> None:
    streams = 2000
    # By default an agency holds at most 200 calls in flight; this one is allowed them all,
    # so that a whole connection's worth of streams is in flight when they are cancelled.
    allowed = f'{DEFAULT_GRANTS}\n[[limit]]\nconsumer = "post"\nconcurrency = {streams}\n'
    broker = await start_broker(
        tmp_path, pki.dir, echo_contracts, [echo_provider.address], grants=allowed
    )
    try:
        raw = await RawH2.open(broker.port, pki.dir / "agencies" / "post", BROKER_DNS)
        try:
            per_connection = await raw.max_concurrent_streams()  # the rest wait in the client
        finally:
            raw.close()
        async with connect(f"127.0.0.1:{broker.port}", pki.dir / "agencies" / "post") as channel:
            bidi = channel.stream_stream(BIDI)
            calls = [bidi(timeout=60) for _ in range(streams)]
            await wait_for_in_flight(broker, lambda n: n >= min(streams, per_connection))
            for call in calls:
                call.cancel()
            for call in calls:
                assert await call.code() is grpc.StatusCode.CANCELLED
            await wait_for_in_flight(broker, lambda n: n == 0)
            assert await channel.unary_unary(UNARY)(b"still here", timeout=10) == b"still here"
    finally:
        await broker.stop(0)


# --- What `tabadol services` and `tabadol describe` print of a contract ---------------------

TERMINAL_CONTROLS = {*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0))} | set(
    "\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


@PROPERTY
@given(st.text())
def test_printable_text_of_any_characters_carries_no_terminal_control(text: str) -> None:
    from tabadol.describe import printable

    assert not set(printable(text)) & TERMINAL_CONTROLS
    comment = printable(text, multiline=True)
    assert not set(comment) & (TERMINAL_CONTROLS - {"\n", "\t"})
    assert comment.count("\t") == text.count("\t")
    assert comment.count("\n") == text.count("\n")  # a "\r\n" is kept as its "\n"


# --- What reaches the ledger from a consumer: trace ids, refused certificates, journal lines ---

HEX = "0123456789abcdef"
traceparents = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda v, t, p, f: f"{v}-{t}-{p}-{f}",
        st.sampled_from(["00", "01", "ff", "0", "zz"]),
        st.text(alphabet=HEX + "ABCDEFx", min_size=30, max_size=34),
        st.text(alphabet=HEX, min_size=15, max_size=17),
        st.text(alphabet=HEX, min_size=2, max_size=2),
    ),
)


@PROPERTY
@given(traceparents)
def test_a_trace_id_is_w3c_form_or_nothing(header: str) -> None:
    from tabadol.metadata import trace_id_of

    trace_id = trace_id_of((("traceparent", header),))
    assert trace_id == "" or (
        len(trace_id) == 32 and set(trace_id) <= set(HEX) and trace_id != "0" * 32
    )


@PROPERTY
@given(st.binary(max_size=600), st.integers(0, 2**32), st.integers(1, 8))
def test_a_refused_certificates_claim_is_an_agency_id_and_serial_or_none(
    a_certificate: bytes, garbage: bytes, seed: int, flips: int
) -> None:
    from tabadol.identity import claimed_agency
    from tabadol.spiffe import AGENCY_ID_PATTERN

    for pem in (
        garbage,
        pem_certificate(garbage),
        pem_certificate(mutated(a_certificate, seed, flips)),
    ):
        claim = claimed_agency(pem)
        assert claim is None or (
            AGENCY_ID_PATTERN.fullmatch(claim[0]) and isinstance(claim[1], int)
        )


def test_a_refused_certificate_claims_the_agency_its_uri_names(a_certificate: bytes) -> None:
    from tabadol.identity import claimed_agency

    serial = x509.load_der_x509_certificate(a_certificate).serial_number
    assert claimed_agency(pem_certificate(a_certificate)) == ("nocr", serial)


journal_lines = (
    json_values.map(json.dumps)
    | st.fixed_dictionaries(
        {"session": json_values, "accepted": json_values, "written": json_values}
    ).map(json.dumps)
    | st.fixed_dictionaries({"session": st.text(max_size=4), "record": json_values}).map(json.dumps)
    | st.text(max_size=40)
)


@PROPERTY
@given(st.lists(journal_lines, max_size=6).map("\n".join).map(str.encode) | st.binary(max_size=300))
def test_journal_lines_of_any_bytes_parse_to_well_typed_entries_or_nothing(data: bytes) -> None:
    from tabadol.ledger.journal import parse_line
    from tabadol.ledger.record import FIELD_NAMES, FIELD_TYPES

    for raw in data.splitlines():
        entry = parse_line(raw)
        if entry is None:
            continue
        assert isinstance(entry.session, str)
        if entry.record is not None:
            assert all(type(getattr(entry.record, n)) is FIELD_TYPES[n] for n in FIELD_NAMES)
        else:
            assert entry.closed is not None and all(type(n) is int for n in entry.closed)


# --- Invisible and bidi characters in a contract's text (Trojan Source) ----------------------

INVISIBLE = (
    "\u061c\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2066\u2067\u2068\u2069\ufeff"
)


def test_describe_escapes_bidi_marks_and_zero_width_characters_in_a_contract() -> None:
    from tabadol.describe import printable

    # "admin" that reads as "nimda", a word split by an invisible space, a hidden BOM.
    for hostile in ("is\u200fadmin\u200e", "ad\u200bmin", "\ufeffrole", "x\u061cy", *INVISIBLE):
        shown = printable(hostile)
        assert not set(shown) & set(INVISIBLE), repr(shown)
        assert not set(printable(hostile, multiline=True)) & set(INVISIBLE)
    assert printable("ad\u200bmin") == "ad\\u200bmin"
    assert printable("\u061c") == "\\u061c"


@PROPERTY
@given(st.text(alphabet=st.sampled_from(INVISIBLE + "ab\u0627")))
def test_printable_lets_no_invisible_or_bidi_character_through(text: str) -> None:
    from tabadol.describe import printable

    assert not set(printable(text)) & set(INVISIBLE)


def test_persian_and_arabic_text_passes_through_printable_unchanged() -> None:
    from tabadol.describe import printable

    # The zero-width non-joiner (U+200C) and joiner (U+200D) are how Persian is written:
    # mi-khaham, sazman-ha, sabt-e ahval; Arabic letters, Persian and Arabic digits, and
    # Arabic punctuation too.
    for text in (
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
        "\u0633\u0627\u0632\u0645\u0627\u0646\u200c\u0647\u0627",
        "\u062b\u0628\u062a\u200c\u0627\u062d\u0648\u0627\u0644 \u06f1\u06f4\u06f0\u06f3\u060c \u061f",
        "\u0627\u0644\u0633\u0651\u0644\u0627\u0645 \u0639\u0644\u064a\u0643\u0645 \u0660\u0661",
        "\u0644\u200d",
    ):
        assert printable(text) == text
        assert printable(text, multiline=True) == text
