"""The consumer side: one call gives a channel to the broker with mTLS set up."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.trace import TracerProvider

from tabadol.client.credentials import AgencyCredentials
from tabadol.spiffe import broker_dns_name


class _PropagateCancel(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    """Await unary responses here, so that cancelling the caller's call cancels the RPC.

    OpenTelemetry's aio client interceptors swallow a cancel of unary-response calls
    (opentelemetry-python-contrib issue 3271): without this, the provider would go on
    working for a consumer that has given up.
    """

    async def _settle(self, call: Any) -> Any:
        try:
            await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError:
            pass  # the caller sees it when it awaits the call we return
        return call

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self._settle(await continuation(client_call_details, request))

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._settle(await continuation(client_call_details, request_iterator))


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
    to the broker) through ``tracer_provider``, or the global one when not given.
    """
    creds = AgencyCredentials.load(credentials_dir)
    channel_creds = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    return grpc.aio.secure_channel(
        broker_address,
        channel_creds,
        options=[("grpc.ssl_target_name_override", broker_dns_name(creds.trust_domain)), *options],
        interceptors=[
            *aio_client_interceptors(tracer_provider=tracer_provider),  # type: ignore[no-untyped-call]
            _PropagateCancel(),
            *interceptors,
        ],
    )
