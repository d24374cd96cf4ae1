"""A test provider for one contract of every RPC kind, speaking raw bytes.

The broker never parses payloads, so the tests send arbitrary bytes (not even protobuf):
anything that arrives altered would be the broker's doing. Behaviour is steered by request
metadata, and everything the provider observed is kept for the test to assert on.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2

from tabadol.client import ProviderServer, consumer_agency
from tabadol.pki import CertificateAuthority

SERVICE = "tabadol.test.v1.Echo"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"


def echo_file_descriptor(
    version: str = "v1", *, idempotent: bool = False
) -> descriptor_pb2.FileDescriptorProto:
    """The echo contract; another ``version`` is the same service in a new major package.
    ``idempotent`` marks Unary with ``option idempotency_level = IDEMPOTENT``."""
    fd = descriptor_pb2.FileDescriptorProto(
        name=f"tabadol/test/{version}/echo.proto",
        package=f"tabadol.test.{version}",
        syntax="proto3",
    )
    msg = fd.message_type.add(name="Blob")
    msg.field.add(name="data", number=1, type=12, label=1)  # bytes
    svc = fd.service.add(name="Echo")
    for name, cs, ss in [
        ("Unary", False, False),
        ("ServerStream", False, True),
        ("ClientStream", True, False),
        ("Bidi", True, True),
    ]:
        svc.method.add(
            name=name,
            input_type=f".tabadol.test.{version}.Blob",
            output_type=f".tabadol.test.{version}.Blob",
            client_streaming=cs,
            server_streaming=ss,
        )
    if idempotent:
        svc.method[0].options.idempotency_level = descriptor_pb2.MethodOptions.IDEMPOTENT
    return fd


def write_echo_contracts(
    path: Path, versions: tuple[str, ...] = ("v1",), *, idempotent: bool = False
) -> Path:
    files = [echo_file_descriptor(v, idempotent=idempotent) for v in versions]
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())
    return path


@dataclass
class Seen:
    """What the provider saw of one call."""

    method: str
    consumer: str  # as the provider-side helper reports it
    metadata: dict[str, Any]
    time_remaining: float | None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class EchoProvider(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.calls: list[Seen] = []
        self.call_started = asyncio.Event()

    def _begin(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Seen:
        seen = Seen(
            method,
            consumer_agency(context),
            dict(context.invocation_metadata() or ()),
            context.time_remaining(),
        )
        self.calls.append(seen)
        self.call_started.set()
        return seen

    async def _steer(self, seen: Seen, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        md = seen.metadata
        if "x-test-initial" in md:
            await context.send_initial_metadata((("x-test-initial", md["x-test-initial"]),))
        trailers: list[tuple[str, Any]] = [
            ("x-test-consumer-seen", md.get("x-tabadol-consumer", ""))
        ]
        if "x-test-trailer-bin" in md:
            trailers.append(("x-test-trailer-bin", md["x-test-trailer-bin"]))
        if "x-test-status-details-bin" in md:
            trailers.append(("grpc-status-details-bin", md["x-test-status-details-bin"]))
        context.set_trailing_metadata(tuple(trailers))
        if "x-test-sleep" in md:
            try:
                await asyncio.sleep(float(md["x-test-sleep"]))
            except asyncio.CancelledError:
                seen.cancelled.set()
                raise
        if "x-test-status" in md:
            await context.abort(
                grpc.StatusCode[md["x-test-status"]],
                md.get("x-test-details", ""),
                tuple(trailers),
            )

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen = self._begin(UNARY, context)
        await self._steer(seen, context)
        return request

    async def server_stream(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        seen = self._begin(SERVER_STREAM, context)
        count = int(seen.metadata.get("x-test-count", "1"))
        fail_after = int(seen.metadata.get("x-test-fail-after", "-1"))
        for i in range(count):
            if i == fail_after:
                await self._steer(seen, context)
            yield i.to_bytes(4, "big") + request
            if "x-test-pause" in seen.metadata:
                await asyncio.sleep(float(seen.metadata["x-test-pause"]))
        await self._steer(seen, context)

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        seen = self._begin(CLIENT_STREAM, context)
        digest, count = hashlib.sha256(), 0
        try:
            async for message in requests:
                digest.update(message)
                count += 1
                if "x-test-end-early" in seen.metadata:  # answer while the consumer still sends
                    await self._steer(seen, context)
                    break
        except asyncio.CancelledError:
            seen.cancelled.set()
            raise
        await self._steer(seen, context)
        return f"{count}:{digest.hexdigest()}".encode()

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        seen = self._begin(BIDI, context)
        async for message in requests:
            yield message
            if "x-test-end-early" in seen.metadata:
                break
        await self._steer(seen, context)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handlers = {
            UNARY: grpc.unary_unary_rpc_method_handler(self.unary),
            SERVER_STREAM: grpc.unary_stream_rpc_method_handler(self.server_stream),
            CLIENT_STREAM: grpc.stream_unary_rpc_method_handler(self.client_stream),
            BIDI: grpc.stream_stream_rpc_method_handler(self.bidi),
        }
        # Every major version of the echo contract behaves alike.
        return handlers.get(re.sub(r"^/tabadol\.test\.v\d+\.", "/tabadol.test.v1.", details.method))


def own_pki(directory: Path, trust_domain: str, *agencies: str) -> CertificateAuthority:
    """A PKI of a test's own, with a broker and these agencies: revoking or renewing in it
    leaves the session's PKI alone."""
    ca = CertificateAuthority.init(directory / "pki", trust_domain)
    ca.issue_broker()
    for agency in agencies:
        ca.issue_agency(agency)
    return ca


async def start_echo(bundle: Path, **options: Any) -> tuple[ProviderServer, EchoProvider]:
    """An echo provider serving with the agency credentials in ``bundle``, started."""
    server = ProviderServer(bundle, **options)
    echo = EchoProvider()
    server.server.add_generic_rpc_handlers((echo,))
    await server.start()
    return server, echo
