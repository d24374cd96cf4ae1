"""The consumer side: one call gives a channel to the broker with mTLS set up."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from opentelemetry.trace import TracerProvider

from tabadol.client.call_status import keep_call_status
from tabadol.client.credentials import AgencyCredentials
from tabadol.client.tracing_interceptor import tracing_interceptors
from tabadol.protocol import KEEPALIVE_DIAL
from tabadol.spiffe import broker_dns_name


def connect(
    broker_address: str,
    credentials_dir: str | Path,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    tracer_provider: TracerProvider | None = None,
) -> grpc.aio.Channel:
    """A ``grpc.aio.Channel`` to the broker, authenticated with this agency's certificate.

    TLS verifies the broker by its platform name, ``broker.<trust-domain>``, whatever
    address it is reached at. Calls are traced with OpenTelemetry (W3C trace context goes
    to the broker) through ``tracer_provider``, or the global one when not given. A call
    that ends while a request is being written reports the status its peer sent
    (:mod:`tabadol.client.call_status`).
    """
    keep_call_status()
    creds = AgencyCredentials.load(credentials_dir)
    channel_creds = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    return grpc.aio.secure_channel(
        broker_address,
        channel_creds,
        options=[
            ("grpc.ssl_target_name_override", broker_dns_name(creds.trust_domain)),
            *KEEPALIVE_DIAL,
            *options,
        ],
        interceptors=[*tracing_interceptors(tracer_provider), *interceptors],
    )
