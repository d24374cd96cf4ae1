"""The ops span collector alone (OTLP/gRPC over mTLS into a span store), on a free loopback
port, and exporters that dial it with a platform certificate."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from tabadol.ops.ingest import SpanLimits
from tabadol.ops.otlp import TraceCollector, add_otlp_port, server_options
from tabadol.ops.store import SqliteSpanStore, StoreLimits
from tabadol.ops.trust import OpsTrust
from tabadol.pki import CertificateAuthority
from tabadol.spiffe import ops_dns_name


@dataclass
class RunningCollector:
    collector: TraceCollector
    store: SqliteSpanStore
    trust: OpsTrust
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"https://{self.address}"


def ops_trust(ca: CertificateAuthority) -> OpsTrust:
    """The ops console's trust for this CA, issuing its certificate the first time."""
    if not (ca.dir / "ops.key").exists():
        ca.issue_ops()
    return OpsTrust.load(ca.dir, ca.trust_domain)


@contextlib.asynccontextmanager
async def running_collector(
    directory: Path,
    ca: CertificateAuthority,
    *,
    store_limits: StoreLimits | None = None,
    span_limits: SpanLimits | None = None,
    max_request_bytes: int | None = None,
    agencies: frozenset[str] | None = None,
) -> AsyncIterator[RunningCollector]:
    """A collector on a free port; ``agencies`` are those the exchange declares (None: the
    collector was given no configuration, as when embedded)."""
    trust = ops_trust(ca)
    trust.agencies = agencies
    store = SqliteSpanStore(directory / "traces.db", store_limits)
    collector = TraceCollector(store, trust, limits=span_limits)
    server = grpc.aio.server(
        options=server_options() if max_request_bytes is None else server_options(max_request_bytes)
    )
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        collector, server
    )
    port = add_otlp_port(server, "127.0.0.1:0", trust)
    await server.start()
    try:
        yield RunningCollector(collector, store, trust, port)
    finally:
        await server.stop(None)
        store.close()


def export_stub(
    running: RunningCollector | tuple[str, str],
    bundle: tuple[bytes, bytes] | None,
    ca_pem: bytes,
) -> tuple[grpc.aio.Channel, trace_service_pb2_grpc.TraceServiceStub]:
    """A raw OTLP client holding ``bundle`` (key, certificate), or none, to a collector:
    a running one, or (address, trust domain) of one an OpsServer runs."""
    address, trust_domain = (
        (running.address, running.trust.trust_domain)
        if isinstance(running, RunningCollector)
        else running
    )
    credentials = grpc.ssl_channel_credentials(
        ca_pem, *(bundle if bundle is not None else (None, None))
    )
    channel = grpc.aio.secure_channel(
        address,
        credentials,
        options=[
            ("grpc.ssl_target_name_override", ops_dns_name(trust_domain)),
            ("grpc.max_send_message_length", 128 * 1024 * 1024),
        ],
    )
    return channel, trace_service_pb2_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
