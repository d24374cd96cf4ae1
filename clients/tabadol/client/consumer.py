"""The consumer side: one call gives a channel to the broker, or its nodes, with mTLS set up."""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor, descriptor_pool
from opentelemetry.trace import TracerProvider

from tabadol.client.call_status import keep_call_status
from tabadol.client.credentials import AgencyCredentials
from tabadol.client.nodes import (
    RECONNECT_BACKOFF,
    broker_target,
    idempotent_unary_methods,
    service_config,
)
from tabadol.client.tracing_interceptor import tracing_interceptors
from tabadol.protocol import KEEPALIVE_DIAL
from tabadol.spiffe import broker_dns_name


def connect(
    broker_address: str | Sequence[str],
    credentials_dir: str | Path,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    tracer_provider: TracerProvider | None = None,
    idempotent_methods: Collection[str] | None = None,
) -> grpc.aio.Channel:
    """A ``grpc.aio.Channel`` to the broker, authenticated with this agency's certificate.

    ``broker_address`` is one ``host:port`` or a list of the broker nodes' addresses
    (``["10.0.0.1:7443", "10.0.0.2:7443"]``). One IP address is one node, dialed as before.
    A list, or one DNS name (which may resolve to several nodes), is balanced by gRPC
    itself: round robin over the nodes whose standard health check says SERVING (a draining
    node says NOT_SERVING and gets no new calls), and a unary call the contract marks
    ``idempotency_level = IDEMPOTENT`` or ``NO_SIDE_EFFECTS`` that fails UNAVAILABLE is
    retried, up to three attempts, each on the next node. Other calls are not retried once
    they may have reached a node; gRPC only retries, transparently, a call that never left
    the client. The idempotent methods are read from the contracts whose ``*_pb2`` modules
    are imported when ``connect`` is called, or given as ``idempotent_methods``
    (``/pkg.Service/Method`` paths, replacing what the contracts say). Several addresses
    must be IP addresses of one family: a host name there raises
    :class:`~tabadol.client.nodes.BrokerAddressError` (a ValueError), as do an empty list
    and a malformed address; each error names the address.

    TLS verifies the broker by its platform name, ``broker.<trust-domain>``, whatever
    address it is reached at. Calls are traced with OpenTelemetry (W3C trace context goes
    to the broker) through ``tracer_provider``, or the global one when not given. A call
    that ends while a request is being written reports the status its peer sent
    (:mod:`tabadol.client.call_status`).
    """
    target = broker_target(broker_address)
    if isinstance(idempotent_methods, str):
        raise ValueError(f"idempotent_methods={idempotent_methods!r}: give a list of paths")
    if idempotent_methods is None and target.several:
        idempotent_methods = idempotent_unary_methods(_imported_contracts())
    config = service_config(idempotent_methods or ())  # a malformed method path raises here
    balancing: list[tuple[str, Any]] = []
    if target.several:
        balancing = [
            ("grpc.service_config", config),
            ("grpc.enable_retries", 1),
            *RECONNECT_BACKOFF,
        ]
    keep_call_status()
    creds = AgencyCredentials.load(credentials_dir)
    channel_creds = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    return grpc.aio.secure_channel(
        target.uri,
        channel_creds,
        options=[
            ("grpc.ssl_target_name_override", broker_dns_name(creds.trust_domain)),
            *KEEPALIVE_DIAL,
            *balancing,
            *options,
        ],
        interceptors=[*tracing_interceptors(tracer_provider), *interceptors],
    )


def _imported_contracts() -> Iterator[descriptor.FileDescriptor]:
    """The contract of every generated ``*_pb2`` module imported so far (they live in the
    default descriptor pool)."""
    pool = descriptor_pool.Default()
    for module in list(sys.modules.values()):
        # vars(), not getattr: a module's own __getattr__ may import or raise.
        file = vars(module).get("DESCRIPTOR") if hasattr(module, "__dict__") else None
        if isinstance(file, descriptor.FileDescriptor) and file.pool is pool:
            yield file
