"""The consumer side: one call gives a channel to the broker with mTLS set up."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from tabadol.client.credentials import AgencyCredentials
from tabadol.spiffe import broker_dns_name


def connect(
    broker_address: str,
    credentials_dir: str | Path,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A ``grpc.aio.Channel`` to the broker, authenticated with this agency's certificate.

    TLS verifies the broker by its platform name, ``broker.<trust-domain>``, whatever
    address it is reached at.
    """
    creds = AgencyCredentials.load(credentials_dir)
    channel_creds = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    return grpc.aio.secure_channel(
        broker_address,
        channel_creds,
        options=[("grpc.ssl_target_name_override", broker_dns_name(creds.trust_domain)), *options],
        interceptors=interceptors,
    )
